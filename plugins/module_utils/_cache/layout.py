# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""A rootfs backup cache in DistroClone Backup's layout, as data, and its
reader (see _snapper_cache for the layout and what is done with it). The
reader changes nothing and follows no link inside the base directory."""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field

from .._common.backup_meta import parse_meta
from .._common.beneath import Tree
from .._common.btrfs import Btrfs, filesystem_type, is_subvolume, same_filesystem
from .._common.command import CommandError
from .._common.errors import LivecloneError
from .._common.fs import read_mounts

CACHE_NAME = ".rootfs_cache"
SNAPSHOTS_NAME = ".snapshots"
META_NAME = ".backup_meta"
# Who holds the lock; and a marker that a copy started and was not yet versioned.
HOLDER_NAME = ".liveclone.lock"
PENDING_NAME = ".liveclone-pending"
# Beside the cache, one file per snapshot (NAME.json): what the backup that took it left out, which
# every restore of it leaves out. Outside the cache, so that the source never writes it.
RECORDS_NAME = ".liveclone-records"
RECORD_LIMIT = 1 << 20
LEGACY_NAME = re.compile(r"\A@(\d{4}-\d{2}-\d{2})_(\d{2}:\d{2})(?:_(\d+))?\Z")


class CacheError(LivecloneError):
    """A request that cannot be carried out; the message says what to do."""


@dataclass
class Snapshot:
    name: str
    number: int | None
    kind: str  # "snapper" or "btrfs" (legacy @DATE snapshots)
    date: str
    description: str
    userdata: dict
    path: str
    read_only: bool

    def view(self):
        return asdict(self)

    @property
    def order(self):
        """Oldest first: by date, then snapper number, then legacy same-minute counter."""
        match = LEGACY_NAME.match(self.name)
        counter = int(match.group(3) or 1) if match else 0
        return (self.date, self.number or 0, counter)


@dataclass
class Cache:
    """What is on disk now under one base directory."""

    base_dir: str
    base_exists: bool = False
    base_fstype: str | None = None
    cache_exists: bool = False
    cache_is_subvolume: bool = False
    # .rootfs_cache is something that is never the cache (a link, a file, a mount point).
    cache_refused: bool = False
    snapshots_dir_exists: bool = False
    snapper_installed: bool = False
    snapper_subvolume: str | None = None  # of the named config, when registered
    snapshots: list = field(default_factory=list)
    meta: dict | None = None
    pending: bool = False
    # .snapshots/N directories (relative to base_dir) snapper does not list
    # (no info.xml): a create that was killed.
    incomplete: list = field(default_factory=list)
    # Entries of the layout that no run may act on: each refuses backup, removal and restore.
    problems: list = field(default_factory=list)
    # Entries of .snapshots that are no snapshots (links, plain directories): never listed, pruned or deleted.
    ignored: list = field(default_factory=list)

    @property
    def cache_dir(self):
        return os.path.join(self.base_dir, CACHE_NAME)

    @property
    def snapshots_dir(self):
        return os.path.join(self.cache_dir, SNAPSHOTS_NAME)

    @property
    def meta_path(self):
        return os.path.join(self.base_dir, META_NAME)

    @property
    def snapper_registered(self):
        return self.snapper_subvolume is not None

    @property
    def snapper_manages_cache(self):
        return self.snapper_registered and not self.cache_refused and (
            os.path.realpath(self.snapper_subvolume) == os.path.realpath(self.cache_dir))

    def versioning_found(self):
        if self.snapper_manages_cache:
            return "snapper"
        if self.cache_is_subvolume:
            return "btrfs"
        return "none" if self.cache_exists else None

    def newest(self):
        return max(self.snapshots, key=lambda snap: snap.order) if self.snapshots else None

    def snapshot_named(self, name):
        """The snapshot a user names: the newest for "latest", else the one of
        that name (a snapper number, a legacy @DATE name); None when there is none."""
        if name == "latest":
            return self.newest()
        return next((snap for snap in self.snapshots if snap.name == name), None)

    def relative(self, path):
        """A path of the cache relative to base_dir, for beneath-the-root operations."""
        return os.path.relpath(path, self.base_dir)

    def view(self):
        return {
            "base_dir": self.base_dir,
            "exists": self.cache_exists,
            "versioning": self.versioning_found(),
            "snapshots": [snap.view() for snap in sorted(self.snapshots, key=lambda s: s.order)],
            "metadata": self.meta,
        }


def _kind(info):
    if info is None:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "link"
    return "dir" if stat.S_ISDIR(info.st_mode) else "other"


class CacheReader:
    """Reads a cache and its source; changes nothing and follows no link inside base_dir."""

    def __init__(self, runner, snapper):
        self.runner = runner
        self.snapper = snapper
        self.btrfs = Btrfs(runner)

    def read(self, base_dir):
        cache = Cache(base_dir=base_dir)
        cache.base_exists = os.path.isdir(base_dir)
        cache.snapper_installed = self._has("snapper")
        if cache.snapper_installed:
            cache.snapper_subvolume = self.snapper.configs().get(self.snapper.config)
        if not cache.base_exists:
            return cache
        cache.base_fstype = filesystem_type(self.runner, base_dir)
        # The info module may be given a base_dir through a link: it only reads.
        with Tree(os.path.realpath(base_dir)) as tree:
            self._read_tree(cache, tree)
        return cache

    def _read_tree(self, cache, tree):
        mounts = frozenset(mount.point for mount in read_mounts())
        btrfs = cache.base_fstype == "btrfs"
        cache_info = tree.lstat(CACHE_NAME)
        problem = self.not_a_layout_dir(tree, CACHE_NAME, cache_info, mounts, "the cache (.rootfs_cache)")
        if problem:
            cache.problems.append(problem)
            cache.cache_refused = True
        elif cache_info is not None:
            cache.cache_exists = True
            cache.cache_is_subvolume = btrfs and is_subvolume(cache_info)
            relative = os.path.join(CACHE_NAME, SNAPSHOTS_NAME)
            info = tree.lstat(relative)
            problem = self.not_a_layout_dir(tree, relative, info, mounts, "the snapshots (.snapshots)")
            if problem:
                cache.problems.append(problem)
            else:
                cache.snapshots_dir_exists = info is not None
        if cache.snapper_manages_cache and cache.cache_exists:
            cache.snapshots += self._snapper_snapshots(cache, tree, mounts)
        if cache.snapshots_dir_exists:
            cache.snapshots += self._legacy_snapshots(cache, tree, mounts)
        if cache.snapper_manages_cache and cache.snapshots_dir_exists:
            listed = {snap.name for snap in cache.snapshots if snap.kind == "snapper"}
            snapshots = os.path.join(CACHE_NAME, SNAPSHOTS_NAME)
            for name in tree.listdir(snapshots):
                relative = os.path.join(snapshots, name)
                if not name.isdigit() or name in listed:
                    continue
                kind = _kind(tree.lstat(relative))
                if kind == "link":
                    cache.ignored.append(self._ignored(tree, relative, "is a symlink"))
                elif kind == "dir" and tree.lstat(os.path.join(relative, "info.xml")) is None:
                    # What a killed `snapper create` leaves: N/ with at most the subvolume N/snapshot.
                    inner = os.path.join(relative, "snapshot")
                    if tree.path(relative) in mounts:
                        cache.ignored.append(self._ignored(tree, relative, "is a mount point"))
                    elif set(tree.listdir(relative)) - {"snapshot"}:
                        cache.ignored.append(self._ignored(tree, relative, "holds more than a snapshot"))
                    elif tree.lstat(inner) is not None and self._snapshot_problem(tree, inner, mounts, False):
                        cache.ignored.append(self._ignored(tree, *self._snapshot_problem(tree, inner, mounts, False)))
                    else:
                        cache.incomplete.append(relative)
        meta_kind = _kind(tree.lstat(META_NAME))
        if meta_kind == "other" and tree.is_file(META_NAME):
            cache.meta = parse_meta(tree.read_text(META_NAME, limit=1 << 20) or "")
        elif meta_kind == "dir" or meta_kind == "other":
            cache.problems.append(
                "%s is %s, where the cache keeps its metadata file; move it away (it is not the "
                "module's to delete), then run again" % (
                    tree.path(META_NAME), "a directory" if meta_kind == "dir" else "not a regular file"))
        for name in (HOLDER_NAME, PENDING_NAME):
            if _kind(tree.lstat(name)) == "dir":
                cache.problems.append("%s is a directory, where the module keeps a small file of its own; "
                                      "move it away, then run again" % tree.path(name))
        cache.pending = tree.lstat(PENDING_NAME) is not None

    @staticmethod
    def not_a_layout_dir(tree, relative, info, mounts, what):
        """None if relative is missing or a real directory on base_dir's
        filesystem; else why it is never taken for `what`."""
        kind = _kind(info)
        path = tree.path(relative)
        if kind is None:
            return None
        if kind == "link":
            target = tree.readlink(relative)
            return ("%s is a symlink (to %s), where base_dir holds %s; a link there is never followed, so "
                    "nothing was changed: remove the link (rm %s) or give the base_dir of the real cache"
                    % (path, target, what, path))
        if kind == "other":
            return "%s is not a directory, where base_dir holds %s; move it away, then run again" % (path, what)
        if path in mounts:
            return ("%s is a mount point, where base_dir holds %s; nothing is deleted, copied or snapshotted "
                    "through a mount: unmount it, then run again" % (path, what))
        with tree.directory(relative) as fd:
            if not same_filesystem(tree.fd, fd):
                return ("%s is on another filesystem than base_dir %s, where base_dir holds %s; unmount it "
                        "or move it away" % (path, tree.root, what))
        return None

    @staticmethod
    def _ignored(tree, relative, why):
        return ("%s %s, so it is not a snapshot: it is never listed, pruned or deleted; remove it if it is "
                "not wanted" % (tree.path(relative), why))

    def _snapshot_problem(self, tree, relative, mounts, parent_too):
        """None if the snapshot at relative (and, for snapper, its N directory) is a real subvolume."""
        steps = [os.path.dirname(relative), relative] if parent_too else [relative]
        for step in steps:
            kind = _kind(tree.lstat(step))
            if kind == "link":
                return step, "is a symlink"
            if kind == "other":
                return step, "is not a directory"
            if kind is None:
                return None
            if tree.path(step) in mounts:
                return step, "is a mount point"
        if not is_subvolume(tree.lstat(relative)):
            return relative, "is not a btrfs subvolume"
        return None

    def _has(self, name):
        try:
            self.runner.binary(name)
        except CommandError:
            return False
        return True

    def _snapper_snapshots(self, cache, tree, mounts):
        found = []
        for item in self.snapper.snapshots():
            relative = os.path.join(CACHE_NAME, SNAPSHOTS_NAME, str(item["number"]), "snapshot")
            problem = self._snapshot_problem(tree, relative, mounts, parent_too=True)
            if problem:
                cache.ignored.append(self._ignored(tree, *problem))
                continue
            path = os.path.join(cache.base_dir, relative)
            found.append(Snapshot(
                name=str(item["number"]), number=item["number"], kind="snapper",
                date=item.get("date") or "", description=item.get("description") or "",
                userdata=item.get("userdata") or {}, path=path,
                read_only=tree.is_dir(relative) and self.btrfs.read_only(path)))
        return found

    def _legacy_snapshots(self, cache, tree, mounts):
        found = []
        snapshots = os.path.join(CACHE_NAME, SNAPSHOTS_NAME)
        for name in tree.listdir(snapshots):
            match = LEGACY_NAME.match(name)
            relative = os.path.join(snapshots, name)
            if not match:
                continue
            problem = self._snapshot_problem(tree, relative, mounts, parent_too=False)
            if problem:
                cache.ignored.append(self._ignored(tree, *problem))
                continue
            if not tree.is_dir(relative):
                continue
            meta = parse_meta(tree.read_text(relative + ".meta", limit=1 << 16) or "")
            userdata = {key[5:].lower(): value for key, value in meta.items()
                        if key not in ("META_DATE", "META_DESCRIPTION")}
            path = os.path.join(cache.base_dir, relative)
            found.append(Snapshot(
                name=name, number=None, kind="btrfs",
                date="%s %s" % (match.group(1), match.group(2)),
                description=meta.get("META_DESCRIPTION", ""), userdata=userdata, path=path,
                read_only=self.btrfs.read_only(path)))
        return found


def record_path(snapshot_name):
    """The record of a snapshot, relative to base_dir."""
    return os.path.join(RECORDS_NAME, snapshot_name + ".json")


def backup_record(snapshot_name, source, excludes, remote_host=None):
    """The record of the backup that took snapshot_name, as JSON text: its
    source and the exclusions it applied (the standard ones, /home, the
    filesystems mounted in the source as its host's mount table showed them,
    the user's)."""
    return json.dumps({"format": 1, "snapshot": snapshot_name, "source": source, "host": remote_host,
                       "excludes": list(excludes)}, indent=1, sort_keys=True) + "\n"


def parse_backup_record(text, snapshot_name):
    """The exclusions the record of snapshot_name lists; None when text is
    missing or not that snapshot's record."""
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("format") != 1 or record.get("snapshot") != snapshot_name:
        return None
    excludes = record.get("excludes")
    if not isinstance(excludes, list) or not all(isinstance(item, str) for item in excludes):
        return None
    return excludes
