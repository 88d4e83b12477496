# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""live_iso's reader: the source, the manifest beside the ISO and whether
it is up to date, what an interrupted build left, and whether the build can
finish."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field

from .._common.beneath import Tree
from .._common.fs import FS_APPEND_FL, FS_IMMUTABLE_FL, flags_at, free_space, read_file
from .boot import ISO_OVERHEAD, MIB
from .desired import WORK_PREFIX, IsoError
from .image import password_hash, read_db, removed_account
from .secure_boot import decide as decide_secure_boot
from .source import (
    Source,
    copies_by_snapshot,
    image_excludes,
    kernels,
    missing_packages,
    resolve_source,
    source_size,
    work_parent,
)

MANIFEST_VERSION = 1
# What the manifest records of the source and options, shown as the diff.
RECORDED_KEYS = ("version", "source_identity", "options_digest", "source", "uefi_chain")
# What the room check before the copy assumes at least of the compression: a
# lower bound (lz4 gives about 2, zstd about 3.3, xz about 4), so that it
# refuses only a build that cannot fit; the exact check follows the squashfs.
ASSUMED_RATIO = 4
# Inodes the build needs beside the copy: the ISO, its checksums, the manifest, temporary names.
SPARE_INODES = 64
STALE_ACTIONS = ("remove_entry", "remove_work", "remove_file")


@dataclass
class Current:
    source: Source
    options_digest: str
    manifest: dict | None = None  # beside an ISO that exists, whatever it records
    up_to_date: bool = False
    work_parent: str = ""
    # What an interrupted build left: (path, "work", "symlink" or "file") in
    # work_parent, then temporary copies of the ISO and its files beside dest.
    stale_work: list = field(default_factory=list)
    stale_files: list = field(default_factory=list)
    by_snapshot: bool = False
    excludes: list = field(default_factory=list)
    missing: list = field(default_factory=list)  # live packages the source lacks
    secure_boot: bool = False  # whether the ISO boots UEFI through the image's signed chain


def options_digest(runner, desired):
    options = desired.recorded_options()
    # The password enters as its salted hash, which the ISO holds anyway.
    options["live_password"] = password_hash(runner, "live", desired.live_password, desired.label)
    options["root_password"] = password_hash(runner, "root", desired.root_password, desired.label)
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def read_manifest(desired):
    """The manifest beside the ISO at dest, or None (no ISO, or no manifest to
    trust: a manifest that is a link is never followed)."""
    if os.path.islink(desired.dest) or not os.path.isfile(desired.dest):
        return None
    try:
        manifest = json.loads(read_file(desired.manifest_path) or "null")
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) else None


def is_up_to_date(desired, manifest, source, digest):
    """Whether no build is due: the ISO at dest is current, and force is off."""
    return not desired.force and is_current(desired, manifest, source, digest)


def is_current(desired, manifest, source, digest):
    """Whether the ISO at dest is what this source and these options make."""
    if manifest is None:
        return False
    if (manifest.get("version") != MANIFEST_VERSION or manifest.get("source_identity") != source.identity
            or manifest.get("options_digest") != digest):
        return False
    st = os.stat(desired.dest)
    if st.st_size != manifest.get("size"):
        return False
    # The ISO as the build left it: no need to read it all again. A file
    # changed since (same size, new mtime) is hashed.
    return st.st_mtime_ns == manifest.get("iso_mtime_ns") or sha256_of(desired.dest) == manifest.get("sha256")


class IsoReader:
    """Reads the state under the lock on dest's directory; changes nothing.
    The first read resolves the source and, when a build is due, refuses what
    would stop it; a later read (after the build) reads the manifest again."""

    def __init__(self, runner, desired):
        self.runner = runner
        self.desired = desired
        self.warnings = []
        self._first = None

    def read(self):
        if self._first is not None:
            manifest = read_manifest(self.desired)
            # After a build: what it made is current, forced or not.
            return Current(self._first.source, self._first.options_digest, manifest,
                           is_current(self.desired, manifest, self._first.source, self._first.options_digest),
                           self._first.work_parent, secure_boot=self._first.secure_boot)
        desired = self.desired
        source = resolve_source(self.runner, desired, self.warnings)
        digest = options_digest(self.runner, desired)
        manifest = read_manifest(desired)
        current = Current(source, digest, manifest, is_up_to_date(desired, manifest, source, digest),
                          work_parent(desired, source))
        if not current.up_to_date:
            self._preflight(current)
            current.excludes = image_excludes(desired, source)
            current.stale_work = stale_work(current.work_parent)
            current.stale_files = self._stale_files()
        self._first = current
        return current

    def _preflight(self, current):
        """Refuse, before anything is copied or removed, what would stop the
        build later: a kernel that is a link out of the tree, missing live
        packages, a live_user that the source keeps, a read-only, immutable or
        full destination."""
        desired = self.desired
        with Tree(current.source.root) as tree:
            if not kernels(tree, "the source"):
                raise IsoError("the source has no kernel in /boot; install linux-image-amd64 in it")
            current.missing = missing_packages(tree, desired.installer)
            if current.missing and not desired.install_missing:
                raise IsoError(
                    "the source lacks %s; install them in the source (apt-get install %s), or set "
                    "install_missing: true to install them into the image from its own repositories"
                    % (", ".join(current.missing), " ".join(current.missing)))
            current.secure_boot, signed_packages = decide_secure_boot(desired, tree, self.warnings)
            current.missing += signed_packages
            user = desired.live_user
            if user:
                for fields in read_db(tree, "etc/passwd", "the source") or []:
                    if fields[0] == user and not removed_account(desired, fields):
                        raise IsoError("live_user %s already exists in the source as a system user (or one of "
                                       "keep_users); choose another name" % user)
        self._check_can_finish(current)

    def _check_can_finish(self, current):
        """Refuse a destination or work directory that cannot take the build:
        read-only, immutable or append-only, or without room for the copy and
        at least a lower bound of the ISO. Reads only."""
        desired, source, parent = self.desired, current.source, current.work_parent
        dest_dir = desired.dest_dir
        for name, directory in (("the directory of dest", dest_dir), ("the work directory", parent)):
            problem = _unwritable(directory)
            if problem:
                raise IsoError("%s, %s, %s. Nothing was changed." % (name, directory, problem))
        for path in [desired.dest, desired.manifest_path] + ["%s.%s" % (desired.dest, name)
                                                             for name in ("sha256", "md5")]:
            problem = _unchangeable(path)
            if problem:
                raise IsoError("%s %s; the build would fail only at its end. Nothing was changed." % (path, problem))
        size, entries = source_size(desired, source)
        iso = size // ASSUMED_RATIO + ISO_OVERHEAD
        current.by_snapshot = copies_by_snapshot(self.runner, source, parent)
        copy = 0 if current.by_snapshot else size
        needs = {}
        for directory, needed, inodes in ((dest_dir, iso, SPARE_INODES), (parent, copy + iso, entries if copy else 0)):
            device = os.stat(directory).st_dev
            known = needs.setdefault(device, [directory, 0, 0])
            known[1] += needed
            known[2] += inodes
        for directory, needed, inodes in needs.values():
            space = free_space(directory)
            free = space.free_bytes
            if free < needed:
                raise IsoError(
                    "not enough free space for the ISO in %s: about %d MiB needed at least (%s%s MiB for the ISO, a "
                    "quarter of the source's %d MiB and %d MiB for the boot images), %d MiB free; free space there "
                    "or choose a dest on a larger filesystem (or a work_dir elsewhere). Nothing was changed." % (
                        directory, needed // MIB, "%d MiB for the copy, " % (copy // MIB)
                        if directory == parent and copy else "", iso // MIB, size // MIB, ISO_OVERHEAD // MIB,
                        free // MIB))
            if space.free_inodes is not None and space.free_inodes < inodes + SPARE_INODES:
                raise IsoError("the filesystem of %s is out of inodes (%d free, about %d needed for the copy); "
                               "free some (df -i) or choose a work_dir elsewhere. Nothing was changed." % (
                                   directory, space.free_inodes, inodes + SPARE_INODES))

    def _stale_files(self):
        """Temporary copies of the ISO, its manifest and checksums (.NAME.*)
        that a killed build left. The caller holds the lock on dest's directory,
        so no build of ours is writing them. A directory there is not ours and stays."""
        dest = self.desired.dest
        pattern = os.path.join(glob.escape(os.path.dirname(dest)), "." + glob.escape(os.path.basename(dest)) + ".*")
        found = []
        for path in sorted(glob.glob(pattern)):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                self.warnings.append("%s is a directory, not a file left by a build; it was left alone" % path)
                continue
            found.append(path)
        return found


def stale_work(parent):
    """(path, kind) of each work tree an interrupted build left in parent:
    "work" for a directory, else "symlink" or "file" (not a work tree of ours)."""
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(parent), WORK_PREFIX + "*"))):
        mode = os.lstat(path).st_mode
        found.append((path, "work" if stat.S_ISDIR(mode) else "symlink" if stat.S_ISLNK(mode) else "file"))
    return found


def _unwritable(directory):
    """None, or why the build cannot create files in directory."""
    if free_space(directory).read_only:
        return "is on a read-only filesystem; remount it read-write or choose a path on another one"
    flags = flags_at(None, directory)
    if flags & FS_IMMUTABLE_FL:
        return "is immutable (lsattr shows i); clear it with chattr -i, or choose another directory"
    if flags & FS_APPEND_FL:
        return "is append-only (lsattr shows a); clear it with chattr -a, or choose another directory"
    if not os.access(directory, os.W_OK):
        return "is not writable; run as root, and check its mount options and any LSM"
    return None


def _unchangeable(path):
    """None, or why the build could not replace the existing file at path."""
    if not os.path.lexists(path) or os.path.islink(path):
        return None
    flags = flags_at(None, path)
    if flags & FS_IMMUTABLE_FL:
        return "is immutable (lsattr shows i), so the build cannot replace it; clear it with chattr -i"
    if flags & FS_APPEND_FL:
        return "is append-only (lsattr shows a), so the build cannot replace it; clear it with chattr -a"
    return None


def hash_file(path, digest):
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path):
    return hash_file(path, hashlib.sha256())
