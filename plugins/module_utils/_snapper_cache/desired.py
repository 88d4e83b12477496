# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""What snapper_cache is asked for: its parameters checked (before anything
is read) into a frozen Desired, every path in canonical form."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .._cache.layout import CacheError
from .._cache.options import cache_directory
from .._common.fs import canonical_path, check_path_text, is_within, parse_mounts
from .._common.rsync import remote_path_problem
from .._common.ssh import Remote, RemoteError
from .._common.text import check_plain_text, check_snapper_name

# What restore_snapshot may name: latest, a snapper number, a legacy snapshot.
RESTORE_SNAPSHOT = re.compile(r"latest|[0-9]{1,9}|@\d{4}-\d{2}-\d{2}_\d{2}:\d{2}(?:_\d{1,9})?")

# base_dir goes into snapper's config as SUBVOLUME="...": what double quotes do not hold as text.
SNAPPER_QUOTED = re.compile(r'["\\$`]')
# An --exclude argument rsync reads as a rule, not a pattern: "!" clears every
# exclusion (the standard ones too), "+ " and "- " prefixes make includes.
RSYNC_RULE = re.compile(r"!|[+-] .*", re.S)


def check_cache_params(params, base_dir):
    """The refusal of the parameters every state shares, or None: text that
    would break the files and argv they go into, and numbers out of range."""
    for name in ("base_dir", "source", "restore_dest", "restore_path"):
        problem = check_path_text(name, params.get(name))
        if problem:
            return problem
    # On a client, source and restore_dest go through rrsync, which splits its command at any whitespace.
    for name in ("source", "restore_dest") if params.get("remote") else ():
        problem = params.get(name) and remote_path_problem(params[name])
        if problem:
            return "%s: %s" % (name, problem)
    if SNAPPER_QUOTED.search(base_dir):
        return ("base_dir %r holds one of \" \\ $ `, which snapper's config (SUBVOLUME=\"...\") cannot hold "
                "as text; choose a path without them" % base_dir)
    problem = check_snapper_name("snapper_config", params["snapper_config"])
    if problem:
        return problem
    for pattern in params.get("exclude") or []:
        problem = check_plain_text("exclude item %r" % pattern, pattern)
        if problem:
            return problem
        if RSYNC_RULE.fullmatch(pattern):
            return ("exclude item %r is read by rsync as a filter rule, not a pattern ('!' clears every "
                    "exclusion, '+ ' and '- ' start rules); give a path pattern such as /srv/scratch/*" % pattern)
    wanted = params.get("restore_snapshot")
    if wanted is not None and not (isinstance(wanted, str) and RESTORE_SNAPSHOT.fullmatch(wanted)):
        return ("restore_snapshot %r is not a snapshot name; give latest, a snapper number such as 3, or a "
                "legacy name such as @2026-06-17_14:30" % (wanted,))
    for name, least, what in TIME_LIMITS + (("keep", 1, "how many snapshots retention keeps"),):
        value = params.get(name)
        if value is None:
            continue
        if isinstance(value, bool):
            return "%s is %s, a boolean; set %s to a number, %d or more (%s)" % (
                name, str(value).lower(), name, least, what)
    return None


# The time limits: (parameter, least value, what it is), each 0 or more (0: none).
TIME_LIMITS = (
    ("lock_timeout", 0, "the seconds to wait for another run on the same base_dir"),
    ("io_timeout", 0, "the seconds a copy may go with rsync reading nothing, 0 for no limit"),
    ("copy_timeout", 0, "the seconds a copy may take in all, 0 for no limit"),
)


@dataclass(frozen=True)
class Desired:
    """The module's parameters, checked, with every path in canonical form."""

    state: str
    base_dir: str
    source: str
    snapper_config: str
    versioning: str
    keep: int
    exclude: tuple
    include_home: bool
    snapshot: str
    checksum: bool
    restore_snapshot: str
    restore_path: str
    restore_dest: str | None
    restore_delete_extra: bool
    allow_restore_to_root: bool
    lock_timeout: int
    io_timeout: int = 0
    copy_timeout: int = 0
    # The client a backup server pulls from (source is a path there) or restores into (restore_dest is).
    remote: Remote | None = None

    @property
    def source_location(self):
        """The source as rsync names it: a path here, or USER@HOST:PATH on the client."""
        return self.remote.location(self.source) if self.remote else self.source

    @property
    def dest_location(self):
        return self.remote.location(self.restore_dest) if self.remote else self.restore_dest

    def remote_mounts(self):
        """The client's mount table, as the controller gathered it."""
        return parse_mounts(self.remote.mountinfo)

    @classmethod
    def from_params(cls, params):
        # Canonical before any rule: `//` is `/`, trailing slashes and `/./` go.
        base_dir = canonical_path(cache_directory(params["base_dir"]))
        problem = check_cache_params(params, base_dir)
        if problem:
            raise CacheError(problem)
        if params["keep"] < 1:
            raise CacheError("keep is %d; retention keeps at least 1 snapshot, so set keep: 1 or "
                             "more (or versioning: none for no versions)" % params["keep"])
        for name, least, what in TIME_LIMITS:
            if (params.get(name) or 0) < least:
                raise CacheError("%s is %d; set %s to %d or more (%s)" % (name, params[name], name, least, what))
        desired = cls(
            state=params.get("state") or "present", base_dir=base_dir,
            source=canonical_path(params.get("source") or "/"), snapper_config=params["snapper_config"],
            versioning=params.get("versioning") or "auto", keep=params["keep"],
            exclude=tuple(params.get("exclude") or ()), include_home=bool(params.get("include_home")),
            snapshot=params.get("snapshot") or "on_change", checksum=bool(params.get("checksum")),
            restore_snapshot=params.get("restore_snapshot") or "latest",
            restore_path=canonical_path(params.get("restore_path") or "/"),
            restore_dest=canonical_path(params.get("restore_dest")),
            restore_delete_extra=bool(params.get("restore_delete_extra")),
            allow_restore_to_root=bool(params.get("allow_restore_to_root")),
            lock_timeout=params["lock_timeout"], io_timeout=params.get("io_timeout") or 0,
            copy_timeout=params.get("copy_timeout") or 0, remote=_remote(params))
        if not desired.source.startswith("/") or not desired.restore_path.startswith("/"):
            raise CacheError("source and restore_path are absolute paths (%s, %s); give them starting with /"
                             % (desired.source, desired.restore_path))
        if desired.remote and desired.state == "present":
            _check_remote_source(desired)
        if desired.state == "restored":
            dest = desired.restore_dest
            if not dest or not os.path.isabs(dest):
                raise CacheError("state restored needs restore_dest, an absolute path to copy the snapshot into")
            if dest == "/" and not desired.allow_restore_to_root:
                raise CacheError("restoring over / replaces the running system; set allow_restore_to_root: "
                                 "true if that is really meant")
        return desired


def _remote(params):
    """The client of a pull or a restore, checked, or None for a local one."""
    if not params.get("remote"):
        return None
    try:
        return Remote.from_params(params["remote"])
    except RemoteError as error:
        raise CacheError(str(error)) from None


def _check_remote_source(desired):
    """A pull needs the client's mount table: it decides which filesystems are left out."""
    if not desired.remote.mountinfo:
        raise CacheError("a pull from %s needs remote.mountinfo, the text of the client's /proc/self/mountinfo "
                         "(rsync cannot read /proc; the backup_server role gathers it with slurp)"
                         % desired.remote.host)
    try:
        mounts = desired.remote_mounts()
    except ValueError as error:
        raise CacheError("remote.mountinfo is not a mount table: %s; give the text of the client's "
                         "/proc/self/mountinfo" % error) from None
    if not any(is_within(desired.source, mount.point) for mount in mounts):
        raise CacheError("remote.mountinfo has no mount holding source %s; give the client's own "
                         "/proc/self/mountinfo" % desired.source)
