# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""live_iso's request: its parameters checked before anything is read or
written, in check mode too, and made into one frozen `Desired`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

from .._cache.options import cache_directory
from .._common.errors import LivecloneError
from .._common.fs import canonical_path, check_path_text, check_real_path
from .._common.text import (
    check_boot_param,
    check_host_name,
    check_label,
    check_plain_text,
    check_snapper_name,
    check_user_name,
)

WORK_PREFIX = ".liveclone-iso-work-"
MANIFEST_SUFFIX = ".manifest.json"
# An ISO 9660 volume id holds 32 bytes.
ISO_LABEL_BYTES = 32
# `latest`, a snapper number, or a legacy btrfs snapshot's @YYYY-MM-DD_HH:MM[_N].
SNAPSHOT_NAME = re.compile(r"latest|[0-9]+|@[0-9]{4}-[0-9]{2}-[0-9]{2}_[0-9]{2}:[0-9]{2}(?:_[0-9]+)?")
COMPRESSION_LEVELS = {"zstd": (1, 22), "gzip": (1, 9)}
PATH_PARAMS = ("dest", "cache_dir", "source_path", "work_dir")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The parameters' defaults, as the module's argument spec has them (for check_params on a partial dict).
DEFAULTS = dict(
    dest=None, source="cache", cache_dir=None, snapper_config="distroclone-backup", snapshot="latest",
    source_path=None, label="LIVECLONE", hostname="liveclone", live_user="live", live_password=None,
    root_password=None, boot_params=[], persistence=True, installer="none", install_missing=False,
    compression="zstd", compression_level=None, block_size=1048576, exclude=[], keep_home=False,
    keep_users=[], work_dir=None, checksums=["sha256"], force=False, secure_boot="auto")
# The options a build records (as their digest) in its manifest.
RECORDED_OPTIONS = ("label", "hostname", "live_user", "boot_params", "persistence", "installer", "compression",
                    "compression_level", "block_size", "exclude", "keep_home", "keep_users", "checksums", "secure_boot")


class IsoError(LivecloneError):
    """A request that cannot be carried out; the message says what to do."""


@dataclass(frozen=True)
class Desired:
    """The ISO asked for: every parameter, checked, paths canonical, lists as tuples."""

    dest: str
    source: str
    cache_dir: str | None
    snapper_config: str
    snapshot: str
    source_path: str | None
    label: str
    hostname: str
    live_user: str | None
    live_password: str | None
    root_password: str | None
    boot_params: tuple
    persistence: bool
    installer: str
    install_missing: bool
    compression: str
    compression_level: int | None
    block_size: int
    exclude: tuple
    keep_home: bool
    keep_users: tuple
    work_dir: str | None
    checksums: tuple
    force: bool
    secure_boot: str

    @classmethod
    def from_params(cls, params):
        """The module's parameters, checked (IsoError for the first problem)."""
        params = dict(DEFAULTS, **params)
        if params["source"] == "cache":
            params["cache_dir"] = cache_directory(params["cache_dir"])
        params = canonical_params(params)
        check_params(params)
        values = {field.name: params[field.name] for field in fields(cls)}
        for name in ("boot_params", "exclude", "keep_users", "checksums"):
            values[name] = tuple(values[name])
        values["snapshot"] = str(values["snapshot"])
        return cls(**values)

    @property
    def dest_dir(self):
        return os.path.dirname(self.dest)

    @property
    def manifest_path(self):
        return self.dest + MANIFEST_SUFFIX

    def recorded_options(self):
        """The options the manifest records by their digest (passwords apart)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in ((name, getattr(self, name)) for name in RECORDED_OPTIONS)}


def canonical_params(params):
    """params with every path in its canonical form ('//' is '/', no '.', '..'
    or trailing slash): the rules are checked on it, and it is used everywhere after."""
    params = dict(params)
    for name in PATH_PARAMS:
        if params.get(name):
            params[name] = canonical_path(params[name])
    return params


def parameter_problems(params):
    """The messages refusing values that no build could use, or that would
    land unquoted in grub.cfg, passwd, shadow or hostname. Reads nothing."""
    problems = []
    for name in PATH_PARAMS:
        value = params[name]
        if value:
            problems.append(check_path_text(name, value))
            if any(part.startswith(WORK_PREFIX) for part in value.split("/")):
                problems.append("%s %s lies in a work tree of an earlier build (%s*), which the next build "
                                "removes; choose a path elsewhere" % (name, value, WORK_PREFIX))
    problems.append(check_label("label", params["label"], ISO_LABEL_BYTES, "an ISO volume id"))
    problems.append(check_host_name("hostname", params["hostname"]))
    if params["live_user"]:
        problems.append(check_user_name("live_user", params["live_user"]))
    problems += [check_user_name("keep_users", user) for user in params["keep_users"]]
    for name in ("live_password", "root_password"):
        if params[name]:
            problems.append(check_plain_text(name, params[name]))
    problems += [check_boot_param("boot_params", item) for item in params["boot_params"]]
    problems.append(check_snapper_name("snapper_config", params["snapper_config"]))
    if not SNAPSHOT_NAME.fullmatch(str(params["snapshot"])):
        problems.append("snapshot %r is not a snapshot name; give latest, a snapshot number, or a legacy "
                        "@YYYY-MM-DD_HH:MM[_N] name as liveclone.core.snapper_cache_info lists them"
                        % params["snapshot"])
    problems += ["exclude item %r holds a control character (a newline, tab or the like); remove it" % item
                 for item in params["exclude"] if _CONTROL.search(item)]
    compression, level = params["compression"], params["compression_level"]
    if level is not None and compression not in COMPRESSION_LEVELS:
        problems.append("compression %s takes no compression_level; leave it unset" % compression)
    elif level is not None:
        low, high = COMPRESSION_LEVELS[compression]
        if not low <= level <= high:
            problems.append("compression_level %d is out of range for %s; choose a level from %d to %d, or leave "
                            "it unset" % (level, compression, low, high))
    size = params["block_size"]
    if size < 4096 or size > 1048576 or size & (size - 1):
        problems.append("block_size %d is not a power of two from 4096 to 1048576 (what mksquashfs takes); "
                        "use 131072, or 1048576 (the default)" % size)
    return [problem for problem in problems if problem]


def check_params(params, dest=None):
    """Refuse what no build could use, before anything is read or written:
    the values first, then the paths (on their canonical form)."""
    params = dict(DEFAULTS, **params)
    if dest:
        params["dest"] = dest
    params = canonical_params(params)
    problems = parameter_problems(params)
    if problems:
        raise IsoError(problems[0])
    dest = params["dest"]
    if not os.path.isabs(dest):
        raise IsoError("dest %r is relative; give an absolute path" % dest)
    if dest == "/":
        raise IsoError("dest / is a directory; give the ISO's file name, such as /var/lib/liveclone/live.iso")
    dest_dir = os.path.dirname(dest)
    if dest_dir == "/":
        raise IsoError("dest %s lies directly in /, beside the system's own directories (the build puts its "
                       "work tree and temporary files beside dest); choose a directory for ISOs, such as "
                       "/var/lib/liveclone/%s" % (dest, os.path.basename(dest)))
    problem = check_real_path("dest", dest, include_last=False)
    if problem:
        raise IsoError(problem)
    if not os.path.isdir(dest_dir):
        raise IsoError("the directory of dest, %s, does not exist; create it first" % dest_dir)
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise IsoError("dest %s is a directory; give the ISO's file name, such as %s" % (
            dest, os.path.join(dest, "live.iso")))
    wanted = {"cache": "cache_dir", "path": "source_path"}.get(params["source"])
    for name in ("cache_dir", "source_path", "work_dir"):
        path = params[name]
        if not path or name not in (wanted, "work_dir"):
            continue
        if not os.path.isabs(path):
            raise IsoError("%s %r is relative; give an absolute path" % (name, path))
        if path == "/":
            raise IsoError({
                "cache_dir": "cache_dir / is not a cache; give the base_dir of a liveclone.core.snapper_cache "
                             "backup, such as /mnt/debian_backup",
                "source_path": "source_path / is the running system; use source: live to build from it",
                "work_dir": "work_dir / is the root directory; give a directory for the work tree, such as "
                            "/var/tmp"}[name])
        problem = check_real_path(name, path)
        if problem:
            raise IsoError(problem)
    work_dir = params["work_dir"]
    if work_dir and not os.path.isdir(work_dir):
        raise IsoError("work_dir %s does not exist; create it first, or leave work_dir unset" % work_dir)
