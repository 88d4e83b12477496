# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""snapper's command line, as the caches use it (no D-Bus, as root)."""

from __future__ import annotations

import contextlib
import json
import re

from .._common.fs import describe_os_error
from .._common.lock import Lock
from .layout import CacheError

# snapper create-config and delete-config rewrite SNAPPER_CONFIGS in
# /etc/default/snapper without a lock of their own: two at once on one host
# (several caches, as on a backup server, or parallel forks) lose one config
# from the list. Ours serialises them; /run is root's alone, unlike /run/lock.
SNAPPER_CONFIGS_LOCK = "/run/liveclone-snapper-configs.lock"
SNAPPER_CONFIGS_LOCK_TIMEOUT = 300
CONFIGS_BUSY = ("another run has held %(path)s for %(timeout)d s while changing snapper's configs; "
                "try again when it has finished")
# snapper keeps each config in /etc/snapper/configs/NAME: no path separators.
# Anchored with \A...\Z: `$` would let a trailing newline through.
SNAPPER_CONFIG_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")

SNAPSHOT_DESCRIPTION = "liveclone.core backup"
# snapper's userdata is "k=v,k=v": a value holds no comma, equals sign or line break.
USERDATA_UNSAFE = re.compile("[,=\x00-\x1f\x7f\x85\u2028\u2029]")
USERDATA_MAX = 200


def userdata_value(text):
    """A value for snapper's userdata (and .backup_meta): no comma, equals
    sign or line break, blanks collapsed, at most USERDATA_MAX characters."""
    value = " ".join(USERDATA_UNSAFE.sub(" ", str(text)).split())[:USERDATA_MAX].strip()
    return value or "unknown"


def config_settings(keep):
    """The config values a cache keeping `keep` snapshots sets: our own
    retention deletes what exceeds `keep`, and these keep snapper's timers in
    step with it instead of fighting it."""
    return {"TIMELINE_CREATE": "no", "NUMBER_CLEANUP": "yes", "NUMBER_LIMIT": str(keep),
            "NUMBER_LIMIT_IMPORTANT": str(keep), "NUMBER_MIN_AGE": "0"}


class Snapper:
    """Thin wrapper of the snapper command line (no D-Bus, as root)."""

    def __init__(self, runner, config):
        self.runner = runner
        self.config = config

    def run(self, *args, **kwargs):
        return self.runner.run(["snapper", "--no-dbus"] + list(args), **kwargs)[1]

    def configs(self):
        out = self.run("--jsonout", "list-configs")
        return {item["config"]: item["subvolume"] for item in json.loads(out).get("configs", [])}

    def snapshots(self):
        out = self.run("--jsonout", "-c", self.config, "list")
        return [item for item in json.loads(out).get(self.config, []) if item["number"] != 0]

    def get_config(self):
        return json.loads(self.run("--jsonout", "-c", self.config, "get-config"))

    @contextlib.contextmanager
    def configs_lock(self):
        """Held while snapper changes its list of configs (see SNAPPER_CONFIGS_LOCK)."""
        lock = Lock(SNAPPER_CONFIGS_LOCK, SNAPPER_CONFIGS_LOCK_TIMEOUT, CONFIGS_BUSY, create=True)
        try:
            lock.acquire()
        except OSError as exc:
            raise CacheError(describe_os_error(exc, "cannot open the lock of snapper's config list")) from None
        try:
            yield
        finally:
            lock.release()

    def create_config(self, subvolume):
        with self.configs_lock():
            self.run("-c", self.config, "create-config", "--fstype", "btrfs", subvolume)
            if self.config not in self.configs():
                raise CacheError("snapper created config %s but does not list it (SNAPPER_CONFIGS in "
                                 "/etc/default/snapper); another tool changed that list at the same time: "
                                 "add %s to it, or delete the config and run again" % (self.config, self.config))

    def set_config(self, settings):
        self.run("-c", self.config, "set-config", *["%s=%s" % item for item in sorted(settings.items())])

    def create(self, userdata):
        # Each value made safe here too: a comma or '=' in one would add keys.
        out = self.run("-c", self.config, "create", "--type", "single", "--cleanup-algorithm", "number",
                       "--description", SNAPSHOT_DESCRIPTION, "--print-number",
                       "--userdata", ",".join("%s=%s" % (key, userdata_value(value))
                                              for key, value in userdata.items()))
        return int(out.strip())

    def delete(self, numbers):
        self.run("-c", self.config, "delete", *[str(number) for number in numbers])

    def delete_config(self):
        with self.configs_lock():
            self.run("-c", self.config, "delete-config")
