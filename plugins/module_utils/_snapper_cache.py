# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Rootfs backup caches in DistroClone Backup's layout.

    BASE/.backup_meta                     KEY="value" metadata DistroClone reads
    BASE/.rootfs_cache/                   btrfs subvolume, the rsync target
    BASE/.rootfs_cache/.snapshots/N/      snapper snapshots (N/snapshot, N/info.xml)
    BASE/.rootfs_cache/.snapshots/@DATE   legacy raw snapshots (+ @DATE.meta)

CacheReader reads that state; backup(), remove() and restore() plan from it
and apply. Unlike the reference tool, the snapshot follows a successful copy,
retention deletes exactly what exceeds `keep`, and metadata is never run as
shell code.

Everything in BASE is reached beneath it (_beneath.Tree: no symlink is ever
followed). An entry of the layout that is a link, is not a directory, is a
mount point or lies on another filesystem is never a cache, a snapshot
directory or a snapshot: the reader reports it, and nothing is deleted,
copied into or snapshotted through it. Each subvolume is checked again right
before it is deleted, and deleted by name from a descriptor of its parent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import re
import stat
import time

from ._backup_meta import format_meta, human_size
from ._beneath import BeneathError, Tree, relative_parts
from ._btrfs import Btrfs, destroy_subvolume, is_subvolume
from ._cache import (
    CACHE_NAME,
    HOLDER_NAME,
    META_NAME,
    PENDING_NAME,
    SNAPSHOTS_NAME,
    CacheError,
    CacheReader,
)
from ._command import CommandError
from ._fs import (
    UNCHANGEABLE_FLAGS,
    canonical_path,
    check_path_text,
    check_real_path,
    flags_at,
    free_space,
    inode_flags,
    is_within,
    read_mounts,
    write_at,
)
from ._lock import Lock
from ._roottree import (
    HOME_EXCLUDES,
    STANDARD_EXCLUDES,
    default_base_dir,
    mount_excludes,
    source_kernels,
    source_os_release,
)
from ._rsync import RSYNC_VANISHED, copy_argv, is_excluded, itemized_path, literal_pattern, parse_output
from ._snapper import SNAPSHOT_DESCRIPTION, Snapper, userdata_value
from ._text import check_plain_text, check_snapper_name

CACHE_BUSY = ("%(path)s is locked by another run (%(holder)s); waited %(timeout)d s. Try again when it has "
              "finished, or raise lock_timeout")

# What restore_snapshot may name: latest, a snapper number, a legacy snapshot.
RESTORE_SNAPSHOT = re.compile(r"latest|[0-9]{1,9}|@\d{4}-\d{2}-\d{2}_\d{2}:\d{2}(?:_\d{1,9})?")

# base_dir goes into snapper's config as SUBVOLUME="...": what double quotes do not hold as text.
SNAPPER_QUOTED = re.compile(r'["\\$`]')
# An --exclude argument rsync reads as a rule, not a pattern: "!" clears every
# exclusion (the standard ones too), "+ " and "- " prefixes make includes.
RSYNC_RULE = re.compile(r"!|[+-] .*", re.S)

# Below this, a base_dir is full before the copy starts.
MIN_FREE_BYTES = 1 << 20
MIN_FREE_INODES = 16


def _last_lines(text, count):
    return "\n".join(text.strip().splitlines()[-count:])


def cache_lock(base_dir, timeout):
    """Serialises runs on one base directory (flock on the directory itself).

    claim() records who holds it, for the message of a run that times out;
    it is called only once the run has passed its checks, so that a refused
    run writes nothing.
    """
    return Lock(base_dir, timeout, CACHE_BUSY, holder_name=HOLDER_NAME)


def _diff_view(view):
    return {"exists": view["exists"], "snapshots": [snap["name"] for snap in view["snapshots"]],
            "metadata": view["metadata"]}


def check_cache_params(params, base_dir):
    """The refusal of the parameters every state shares, or None: text that
    would break the files and argv they go into, and numbers out of range."""
    for name in ("base_dir", "source", "restore_dest"):
        problem = check_path_text(name, params.get(name))
        if problem:
            return problem
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
    for name, least, what in (("keep", 1, "how many snapshots retention keeps"),
                              ("lock_timeout", 0, "the seconds to wait for another run on the same base_dir")):
        value = params.get(name)
        if value is None:
            continue
        if isinstance(value, bool):
            return "%s is %s, a boolean; set %s to a number, %d or more (%s)" % (
                name, str(value).lower(), name, least, what)
    return None


class CacheManager:
    """Backs up into, removes and restores from one cache."""

    def __init__(self, runner, params):
        self.runner = runner
        self.params = params
        # Canonical before any rule: `//` is `/`, trailing slashes and `/./` go.
        self.base_dir = canonical_path(params["base_dir"] or default_base_dir())
        self.source = canonical_path(params.get("source") or "/")
        self.restore_dest = canonical_path(params.get("restore_dest"))
        self.snapper = Snapper(runner, params["snapper_config"])
        self.reader = CacheReader(runner, self.snapper)
        self.btrfs = Btrfs(runner)
        self.warnings = []
        self.operations = []
        self.before = None
        self.tree = None  # base_dir, held open while a run acts on it

    # --- validation --------------------------------------------------------

    def _check_params(self):
        problem = check_cache_params(self.params, self.base_dir)
        if problem:
            raise CacheError(problem)
        if self.params["keep"] < 1:
            raise CacheError("keep is %d; retention keeps at least 1 snapshot, so set keep: 1 or "
                             "more (or versioning: none for no versions)" % self.params["keep"])
        if self.params["lock_timeout"] < 0:
            raise CacheError("lock_timeout is %d; set lock_timeout to 0 or more (the seconds to wait "
                             "for another run on the same base_dir)" % self.params["lock_timeout"])

    def _check_base_path(self, must_exist=True):
        if not os.path.isabs(self.base_dir):
            raise CacheError("base_dir %r is relative; give an absolute path" % self.base_dir)
        if self.base_dir == "/":
            raise CacheError("base_dir %s would put the cache over the root filesystem; give a "
                             "directory such as /mnt/debian_backup" % self.base_dir)
        problem = check_real_path("base_dir", self.base_dir)
        if problem:
            raise CacheError(problem)
        if must_exist and not os.path.isdir(self.base_dir):
            raise CacheError("base_dir %s does not exist; mount the backup volume there (or "
                             "create the directory) first" % self.base_dir)

    def _check_snapper_config(self, cache):
        if cache.snapper_registered and not cache.snapper_manages_cache:
            raise CacheError("snapper config %r already manages %s, not %s; choose another "
                             "snapper_config" % (self.snapper.config, cache.snapper_subvolume,
                                                 cache.cache_dir))

    def _read(self):
        """The cache as it is now; its refused entries refuse the run, its ignored ones are warned about."""
        cache = self.reader.read(self.base_dir)
        if cache.problems:
            raise CacheError("; ".join(cache.problems))
        for text in cache.ignored:
            if text not in self.warnings:
                self.warnings.append(text)
        return cache

    def _check_writable(self, path, what, room=False):
        """Before anything is changed: the filesystem of path (or of its nearest
        existing parent) is writable and, with room, has space and inodes left."""
        while not os.path.lexists(path):
            path = os.path.dirname(path)
        space = free_space(path)
        if space.read_only:
            raise CacheError("%s %s is on a read-only filesystem; remount it read-write (mount -o remount,rw) "
                             "or choose another %s. Nothing was changed." % (what, path, what))
        if not room:
            return
        if space.free_bytes < MIN_FREE_BYTES:
            raise CacheError(
                "%s %s is full (%d KiB free; No space left on device); free space on it (lower keep, or delete "
                "old snapshots) or grow the volume, then run again. Nothing was changed."
                % (what, path, space.free_bytes // 1024))
        if space.free_inodes is not None and space.free_inodes < MIN_FREE_INODES:
            raise CacheError(
                "%s %s has no free inodes left (%d; see df -i): free space on it by deleting files, or make "
                "its filesystem with more inodes, then run again. Nothing was changed."
                % (what, path, space.free_inodes))

    def _check_flags(self, relatives):
        """Refuse when one of the entries of base_dir a run would change is immutable or append-only."""
        for relative in relatives:
            parts = relative_parts(relative)
            try:
                if not parts:
                    flags = inode_flags(self.tree.fd)
                else:
                    with self.tree.parent(relative) as (dir_fd, name):
                        flags = flags_at(dir_fd, name)
            except (FileNotFoundError, BeneathError):
                continue
            if flags & UNCHANGEABLE_FLAGS:
                path = self.tree.path(relative)
                raise CacheError("%s is immutable or append-only (lsattr %s), so the run cannot change it; clear "
                                 "that with chattr -i -a %s if the change is wanted, then run again. Nothing was "
                                 "changed." % (path, path, path))

    def _refuse_immutable_paths(self, root, stats, what):
        """Check mode's and restore's look at what rsync would change or delete in
        root: an immutable or append-only file or directory there refuses the run."""
        found = []
        try:
            tree = Tree(root)
        except (FileNotFoundError, BeneathError):
            return
        with tree:
            seen = set()
            for line in stats.itemized:
                relative = itemized_path(line).rstrip("/")
                for candidate in (relative, os.path.dirname(relative)):
                    if candidate in seen:
                        continue
                    seen.add(candidate)
                    try:
                        if candidate in ("", "."):
                            flags = inode_flags(tree.fd)
                        else:
                            with tree.parent(candidate) as (dir_fd, name):
                                flags = flags_at(dir_fd, name)
                    except (OSError, BeneathError):
                        continue
                    if flags & UNCHANGEABLE_FLAGS:
                        found.append(tree.path(candidate))
                if len(found) >= 5:
                    break
        if found:
            raise CacheError("%s holds immutable or append-only entries that the copy would change or delete "
                             "(%s); clear that with chattr -i -a if the change is wanted, then run again. "
                             "Nothing was changed." % (what, ", ".join(found)))

    def _verify_dir(self, relative, subvolume=False):
        """Right before a subvolume is deleted or rsync --delete copies into it:
        relative is a real directory beneath base_dir (no link on the way or at
        its end), not a mount point, on base_dir's filesystem, and with
        subvolume, a btrfs subvolume. Returns False if it is missing."""
        problem = CacheReader.not_a_layout_dir(self.tree, relative, self.tree.lstat(relative),
                                               frozenset(mount.point for mount in read_mounts()),
                                               "part of the cache")
        if problem:
            raise CacheError(problem)
        info = self.tree.lstat(relative)
        if info is None:
            return False
        if subvolume and not is_subvolume(info):
            raise CacheError("%s is not a btrfs subvolume, so it is not deleted as one; move it away, then "
                             "run again" % self.tree.path(relative))
        return True

    def _delete_subvolume(self, relative):
        """Delete the subvolume at relative (beneath base_dir), after checking it is one of the cache's."""
        if not self._verify_dir(relative, subvolume=True):
            return
        path = self.tree.path(relative)
        with self.tree.parent(relative) as (dir_fd, name):
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not is_subvolume(info):
                raise CacheError("%s changed while the run checked it; nothing was deleted, run again" % path)
            try:
                destroy_subvolume(dir_fd, name)
            except OSError as error:
                if error.errno == errno.ENOTEMPTY:
                    raise CacheError(
                        "%s holds a btrfs subvolume the cache does not know (btrfs subvolume list -o %s); the "
                        "module deletes only its own, so delete or move that one, then run again" % (path, path)
                    ) from None
                raise OSError(error.errno, error.strerror, path) from None

    def _versioning(self, cache):
        versioning = self._resolve_versioning(cache)
        if versioning != "none" and cache.cache_exists and not cache.cache_is_subvolume:
            raise CacheError("%s is a plain directory, so it cannot be snapshotted; remove the "
                             "cache (state: absent) and back up again to convert it, or use "
                             "versioning: none" % cache.cache_dir)
        return versioning

    def _resolve_versioning(self, cache):
        wanted = self.params["versioning"]
        btrfs = cache.base_fstype == "btrfs"
        if wanted == "auto":
            if btrfs:
                return "snapper" if cache.snapper_installed else "btrfs"
            self.warnings.append(
                "%s is on %s, not btrfs: the cache is a plain rsync copy with no versions"
                % (self.base_dir, cache.base_fstype))
            return "none"
        if wanted in ("snapper", "btrfs") and not btrfs:
            raise CacheError("versioning %s needs base_dir on btrfs, and %s is on %s; use "
                             "versioning: none, or put base_dir on a btrfs volume"
                             % (wanted, self.base_dir, cache.base_fstype))
        if wanted == "snapper" and not cache.snapper_installed:
            raise CacheError("versioning snapper needs snapper installed on this host; install "
                             "it, or use versioning: btrfs")
        return wanted

    def _excludes(self, source):
        excludes = list(STANDARD_EXCLUDES)
        if not self.params["include_home"]:
            excludes += HOME_EXCLUDES
        excludes += mount_excludes(source, self.params["include_home"])
        excludes += self.params["exclude"] or []
        return excludes

    def _check_source(self, source, excludes):
        if not os.path.isdir(source):
            raise CacheError("source %s does not exist or is not a directory; give a directory: the "
                             "root of the tree to back up (/ for the whole host)" % source)
        base = os.path.realpath(self.base_dir)
        if is_within(base, os.path.realpath(source)):
            relative = "/" + os.path.relpath(base, os.path.realpath(source))
            if relative == "/." or not is_excluded(relative, excludes):
                raise CacheError(
                    "base_dir %s is inside source %s and not excluded, so each backup would copy "
                    "the cache into itself; add %s to exclude, or move base_dir (for example "
                    "under /mnt)" % (self.base_dir, source, relative))

    # --- planning ---------------------------------------------------------

    def _layout_operations(self, cache, versioning):
        operations = []
        if not cache.cache_exists:
            kind = "btrfs subvolume" if versioning != "none" else "directory"
            operations.append(("create_cache", "create the %s %s" % (kind, cache.cache_dir)))
        if versioning == "snapper":
            if not cache.snapper_manages_cache:
                operations.append(("create_config", "create snapper config %s for %s" % (
                    self.snapper.config, cache.cache_dir)))
                operations.append(("set_config", "set snapper config %s: %s" % (
                    self.snapper.config, self._settings_text())))
            else:
                current = self.snapper.get_config()
                if any(current.get(key) != value for key, value in self.snapper.settings(self.params["keep"]).items()):
                    operations.append(("set_config", "set snapper config %s: %s" % (
                        self.snapper.config, self._settings_text())))
        elif versioning == "btrfs" and not cache.snapshots_dir_exists:
            operations.append(("create_snapshots_dir", "create the btrfs subvolume %s" % cache.snapshots_dir))
        return operations

    def _settings_text(self):
        return " ".join("%s=%s" % item for item in sorted(self.snapper.settings(self.params["keep"]).items()))

    def _prune_list(self, snapshots, adding):
        keep = self.params["keep"] - (1 if adding else 0)
        ordered = sorted(snapshots, key=lambda snap: snap.order)
        return ordered[:max(len(ordered) - keep, 0)]

    # --- applying ---------------------------------------------------------

    def _apply_layout(self, operations, cache, versioning):
        snapshots = os.path.join(CACHE_NAME, SNAPSHOTS_NAME)
        for action, text in operations:
            if action == "create_cache":
                if versioning != "none":
                    self.btrfs.create_subvolume(cache.cache_dir)
                else:
                    os.mkdir(CACHE_NAME, 0o755, dir_fd=self.tree.fd)
            elif action == "create_config":
                self._verify_dir(CACHE_NAME, subvolume=True)
                self.snapper.create_config(cache.cache_dir)
            elif action == "set_config":
                self.snapper.set_config(self.snapper.settings(self.params["keep"]))
            elif action == "create_snapshots_dir":
                self._verify_dir(CACHE_NAME, subvolume=True)
                if self.tree.lstat(snapshots) is not None:
                    raise CacheError("%s appeared while the run checked the cache; run again" % cache.snapshots_dir)
                self.btrfs.create_subvolume(cache.snapshots_dir)
            self.operations.append(text)

    def _rsync(self, source, dest, excludes, dry_run, protect=(), delete_excluded=False, purpose="backup"):
        argv = copy_argv(source, dest, excludes=excludes, protect=protect,
                         checksum=self.params["checksum"], dry_run=dry_run,
                         delete_excluded=delete_excluded)
        kept = ("no snapshot was taken and .backup_meta and every snapshot were left as they were"
                if purpose == "backup" else "the snapshot is unchanged; restore_dest holds part of it")
        try:
            rc, out = self.runner.run(argv, ok_rcs=(0, RSYNC_VANISHED))
        except CommandError as error:
            text = str(error)
            if "No space left on device" in text:
                where = ("base_dir %s" % self.base_dir) if purpose == "backup" else ("restore_dest %s" % dest)
                raise CacheError(
                    "%s is full (No space left on device: of data or of inodes, see df -h and df -i) after part "
                    "of the copy; free space on it (lower keep, or delete old snapshots) or grow the volume, then "
                    "run again. %s; the next run finishes the copy. %s"
                    % (where, kept[0].upper() + kept[1:], _last_lines(text, 3))) from None
            advice = ""
            if "Operation not permitted" in text:
                advice = ("the kernel refused to change a file there: it is immutable or append-only (lsattr -R %s); "
                          "clear that with chattr -i -a, then run again. " % dest)
            elif "Read-only file system" in text:
                advice = "%s is on a read-only filesystem; remount it read-write, then run again. " % dest
            raise CacheError("the copy failed, so %s: %s%s" % (kept, advice, text)) from None
        if rc == RSYNC_VANISHED:
            self.warnings.append("some files vanished from %s while they were copied (rsync exit "
                                 "24); the backup is otherwise complete" % source)
        return parse_output(out)

    def _snapshot(self, cache, versioning, userdata):
        snapshots = os.path.join(CACHE_NAME, SNAPSHOTS_NAME)
        self._verify_dir(CACHE_NAME, subvolume=True)
        # An older tool's .snapshots may be a plain directory: real, beneath base_dir, is what counts.
        if not self._verify_dir(snapshots):
            raise CacheError("%s is missing, so no snapshot can be taken; run again" % cache.snapshots_dir)
        if versioning == "snapper":
            number = self.snapper.create(userdata)
            return number, str(number)
        stamp = time.strftime("%Y-%m-%d_%H:%M")
        name, counter = "@" + stamp, 1
        while (self.tree.lstat(os.path.join(snapshots, name)) is not None
               or self.tree.lstat(os.path.join(snapshots, name + ".meta")) is not None):
            counter += 1
            name = "@%s_%d" % (stamp, counter)
        path = os.path.join(cache.snapshots_dir, name)
        self.btrfs.snapshot(cache.cache_dir, path, read_only=True)
        meta = {"META_DATE": stamp.replace("_", " "), "META_DESCRIPTION": SNAPSHOT_DESCRIPTION}
        meta.update({"META_" + key.upper(): userdata_value(value) for key, value in userdata.items()})
        with self.tree.directory(snapshots) as fd:
            write_at(fd, name + ".meta", format_meta(meta), sync=True)
        return None, name

    def _delete_snapshot(self, cache, snapshot):
        relative = cache.relative(snapshot.path)
        if snapshot.kind == "snapper":
            # snapper deletes by its own paths: check them first.
            self._verify_dir(os.path.dirname(relative))
            self._verify_dir(relative, subvolume=True)
            self.snapper.delete([snapshot.number])
        else:
            self._delete_subvolume(relative)
            self.tree.remove(relative + ".meta")

    # --- the three states -------------------------------------------------

    def backup(self, check_mode):
        self._check_params()
        source = self.source
        self._check_base_path()
        with cache_lock(self.base_dir, self.params["lock_timeout"]) as lock, Tree(self.base_dir) as self.tree:
            cache = self._read()
            self.before = cache.view()
            self._check_writable(self.base_dir, "base_dir", room=True)
            self._check_no_mounts(cache)
            self._check_flags(["", META_NAME, HOLDER_NAME, PENDING_NAME, CACHE_NAME,
                               os.path.join(CACHE_NAME, SNAPSHOTS_NAME)])
            excludes = self._excludes(source)
            self._check_source(source, excludes)
            versioning = self._versioning(cache)
            if versioning == "snapper":
                self._check_snapper_config(cache)
            layout = self._layout_operations(cache, versioning)
            protect = ["/" + SNAPSHOTS_NAME]
            if check_mode:
                stats = self._rsync(source, cache.cache_dir, excludes, True, protect, True)
                self._refuse_immutable_paths(cache.cache_dir, stats, cache.cache_dir)
                snapshotting = self._wants_snapshot(versioning, stats, cache.pending)
                pruned = self._prune_list(cache.snapshots, snapshotting) if versioning != "none" else []
                self.operations = ["remove the incomplete snapshot %s" % self.tree.path(path)
                                   for path in cache.incomplete]
                self.operations += [text for _action, text in layout]
                self._describe_copy(stats, source, cache, dry_run=True)
                if snapshotting:
                    self.operations.append("take a %s snapshot of %s" % (versioning, cache.cache_dir))
                self.operations += ["delete snapshot %s" % snap.name for snap in pruned]
                predicted = _diff_view(cache.view())
                predicted["exists"] = True
                predicted["snapshots"] = [name for name in predicted["snapshots"]
                                          if name not in {snap.name for snap in pruned}]
                predicted["snapshots"] += ["(new)"] if snapshotting else []
                return self._result(cache, versioning, stats, None, pruned, bool(self.operations), predicted)
            lock.claim()
            self._remove_stale_files()
            self._remove_incomplete(cache)
            self._apply_layout(layout, cache, versioning)
            write_at(self.tree.fd, PENDING_NAME, "")
            # rsync --delete runs into .rootfs_cache: it is checked right before.
            self._verify_dir(CACHE_NAME, subvolume=versioning != "none")
            stats = self._rsync(source, cache.cache_dir, excludes, False, protect, True)
            self._describe_copy(stats, source, cache, dry_run=False)
            created = None
            snapshotting = self._wants_snapshot(versioning, stats, cache.pending)
            if stats.changes or cache.pending or snapshotting:
                cache = self._read()
                userdata = self._userdata(source, stats)
                if snapshotting:
                    _number, created = self._snapshot(cache, versioning, userdata)
                    self.operations.append("took %s snapshot %s" % (versioning, created))
                meta = {"META_DATE": time.strftime("%Y-%m-%d %H:%M"), "META_DISTRO": userdata["distro"],
                        "META_SIZE": human_size(stats.total_size), "META_KERNEL": userdata["kernel"]}
                if created:
                    meta["META_SNAPSHOT"] = created
                write_at(self.tree.fd, META_NAME, format_meta(meta), sync=True)
                self.operations.append("wrote %s" % cache.meta_path)
            self.tree.remove(PENDING_NAME)
            # Read the cache again only when this run changed it: an unchanged run is common and each
            # read costs several snapper and btrfs calls.
            if self.operations:
                cache = self._read()
            else:
                cache.pending = False
            pruned = self._prune_list(cache.snapshots, False) if versioning != "none" else []
            for snapshot in pruned:
                self._delete_snapshot(cache, snapshot)
                self.operations.append("deleted snapshot %s" % snapshot.name)
            if pruned:
                cache = self._read()
            created_view = next((s.view() for s in cache.snapshots if s.name == created), None)
            return self._result(cache, versioning, stats, created_view, pruned, bool(self.operations))

    def _remove_incomplete(self, cache):
        for relative in cache.incomplete:
            self._verify_dir(relative)
            self._delete_subvolume(os.path.join(relative, "snapshot"))
            with self.tree.parent(relative) as (dir_fd, name):
                os.rmdir(name, dir_fd=dir_fd)
            self.operations.append("removed the incomplete snapshot %s left by an interrupted run"
                                   % self.tree.path(relative))

    def _remove_stale_files(self):
        """Temporary copies of .backup_meta, the lock and the marker that a killed run left (we hold the lock)."""
        prefixes = tuple("." + name + "." for name in (META_NAME, HOLDER_NAME, PENDING_NAME))
        for name in self.tree.listdir():
            if name.startswith(prefixes) and not self.tree.is_dir(name):
                self.tree.remove(name)
                self.operations.append("removed %s left by an interrupted run" % self.tree.path(name))

    def _wants_snapshot(self, versioning, stats, pending):
        mode = self.params["snapshot"]
        if versioning == "none" or mode == "never":
            return False
        return mode == "always" or bool(stats.changes) or pending

    def _describe_copy(self, stats, source, cache, dry_run):
        if stats.changes:
            self.operations.append("%s %d changes from %s to %s (%d files, %d bytes%s)" % (
                "copy" if dry_run else "copied", stats.changes, source, cache.cache_dir,
                stats.files_transferred, stats.bytes_transferred,
                ", %d deleted" % stats.files_deleted if stats.files_deleted else ""))

    def _userdata(self, source, stats):
        """distro and kernel of the source, as data: read beneath source, made
        safe for snapper's userdata and .backup_meta whatever they hold."""
        release = source_os_release(source)
        if os.path.realpath(source) == "/":
            kernel = platform.release()
        else:
            kernels = source_kernels(source)
            kernel = kernels[-1] if kernels else "unknown"
        return {"distro": userdata_value(release.get("NAME") or release.get("ID") or "unknown"),
                "kernel": userdata_value(kernel), "size_kb": str(stats.total_size // 1024)}

    def _result(self, cache, versioning, stats, created, pruned, changed, predicted=None):
        """The module's result; `predicted` is the after-state of a check-mode run."""
        result = cache.view()
        result.update(changed=changed, versioning=versioning, operations=self.operations,
                      snapshot_created=created, snapshots_pruned=[snap.view() for snap in pruned],
                      transfer=stats.view() if stats else None)
        result["diff"] = {"before": _diff_view(self.before or cache.view()),
                          "after": predicted or _diff_view(cache.view())}
        return result

    def remove(self, check_mode):
        self._check_params()
        self._check_base_path(must_exist=False)
        if not os.path.isdir(self.base_dir):
            return self._result(self.reader.read(self.base_dir), None, None, None, [], False)
        with cache_lock(self.base_dir, self.params["lock_timeout"]), Tree(self.base_dir) as self.tree:
            cache = self._read()
            self.before = cache.view()
            plan = [("snapshot", snap) for snap in sorted(cache.snapshots, key=lambda s: s.order)]
            plan += [("incomplete", relative) for relative in cache.incomplete]
            if cache.snapper_manages_cache:
                plan.append(("delete_config", None))
            if cache.snapshots_dir_exists:
                plan.append(("snapshots_dir", None))
            if cache.cache_exists:
                plan.append(("cache_dir", None))
            for name in (META_NAME, HOLDER_NAME, PENDING_NAME):
                if self.tree.lstat(name) is not None:
                    plan.append(("file", name))
            if plan:
                self._check_writable(self.base_dir, "base_dir")
                self._check_removable(cache)
            texts = {
                "delete_config": "delete snapper config %s" % self.snapper.config,
                "snapshots_dir": "delete %s" % cache.snapshots_dir,
                "cache_dir": "delete %s" % cache.cache_dir,
            }
            for kind, item in plan:
                text = ("delete snapshot %s" % item.name if kind == "snapshot" else
                        "delete the incomplete snapshot %s" % self.tree.path(item) if kind == "incomplete" else
                        "delete %s" % os.path.join(self.base_dir, item) if kind == "file" else texts[kind])
                if not check_mode:
                    self._remove_one(kind, item, cache)
                self.operations.append(text)
            if check_mode:
                return self._result(cache, None, None, None, [], bool(plan),
                                    {"exists": False, "snapshots": [], "metadata": None})
            return self._result(self._read(), None, None, None, [], bool(plan))

    @staticmethod
    def _check_no_mounts(cache):
        """Nothing is mounted inside the cache: rsync --delete and removal never reach through a mount."""
        real = os.path.realpath(cache.cache_dir)
        mounted = [mount.point for mount in read_mounts() if is_within(mount.point, real)]
        if mounted:
            raise CacheError("%s has filesystems mounted inside (%s); unmount them, then run again"
                             % (cache.cache_dir, ", ".join(mounted)))

    def _check_removable(self, cache):
        """Before anything is deleted: no mount inside the cache, nothing the
        kernel would refuse to delete (immutable or append-only)."""
        self._check_no_mounts(cache)
        snapshots = os.path.join(CACHE_NAME, SNAPSHOTS_NAME)
        entries = ["", META_NAME, HOLDER_NAME, PENDING_NAME, CACHE_NAME, snapshots]
        for snapshot in cache.snapshots:
            relative = cache.relative(snapshot.path)
            entries += [os.path.dirname(relative), relative]
        for relative in cache.incomplete:
            entries += [relative, os.path.join(relative, "snapshot")]
        self._check_flags(entries)
        if cache.cache_exists and not cache.cache_is_subvolume:
            # A plain tree is deleted file by file: every one of them must be deletable.
            for directory, dirs, files in self.tree.walk(CACHE_NAME):
                self._check_flags([os.path.join(directory, name) for name in dirs + files])

    def _remove_one(self, kind, item, cache):
        # Read-only snapshots first (rm -rf cannot remove them), then snapper's
        # config while its subvolume still exists, then the subvolumes.
        snapshots = os.path.join(CACHE_NAME, SNAPSHOTS_NAME)
        if kind == "snapshot":
            relative = cache.relative(item.path)
            if item.kind == "snapper":
                self._verify_dir(os.path.dirname(relative))
            self._delete_subvolume(relative)
            if item.kind == "btrfs":
                self.tree.remove(relative + ".meta")
        elif kind == "incomplete":
            self._verify_dir(item)
            self._delete_subvolume(os.path.join(item, "snapshot"))
            with self.tree.parent(item) as (dir_fd, name):
                os.rmdir(name, dir_fd=dir_fd)
        elif kind == "delete_config":
            # snapper deletes .snapshots by its own path: check it first.
            self._verify_dir(snapshots)
            self.snapper.delete_config()
        elif kind in ("snapshots_dir", "cache_dir"):
            relative = snapshots if kind == "snapshots_dir" else CACHE_NAME
            info = self.tree.lstat(relative)
            if info is None:
                return  # snapper delete-config removed .snapshots already
            if cache.base_fstype == "btrfs" and is_subvolume(info):
                self._delete_subvolume(relative)
            else:
                self._verify_dir(relative)
                # File by file beneath base_dir: a link in it is removed, never followed,
                # and nothing is deleted through a mount point.
                self.tree.remove(relative)
        else:
            self.tree.remove(item)

    def restore(self, check_mode):
        self._check_params()
        dest = self.restore_dest
        if not dest or not os.path.isabs(dest):
            raise CacheError("state restored needs restore_dest, an absolute path to copy the snapshot into")
        if dest == "/" and not self.params["allow_restore_to_root"]:
            raise CacheError("restoring over / replaces the running system; set allow_restore_to_root: "
                             "true if that is really meant")
        problem = check_real_path("restore_dest", dest)
        if problem:
            raise CacheError(problem)
        info = os.lstat(dest) if os.path.lexists(dest) else None
        if info is not None and not stat.S_ISDIR(info.st_mode):
            raise CacheError("restore_dest %s exists and is %s; move it away or give a directory to restore into"
                             % (dest, "a file" if stat.S_ISREG(info.st_mode) else "not a directory"))
        self._check_base_path()
        with cache_lock(self.base_dir, self.params["lock_timeout"]) as lock, Tree(self.base_dir) as self.tree:
            cache = self._read()
            self.before = cache.view()
            wanted = self.params["restore_snapshot"] or "latest"
            if wanted == "latest":
                snapshot = cache.newest()
            else:
                snapshot = next((s for s in cache.snapshots if s.name == wanted), None)
            if snapshot is None:
                names = ", ".join(s.name for s in sorted(cache.snapshots, key=lambda s: s.order)) or "none"
                raise CacheError("snapshot %s is not in %s (snapshots: %s)" % (wanted, self.base_dir, names))
            base, real_dest = os.path.realpath(self.base_dir), os.path.realpath(dest)
            if is_within(real_dest, base):
                raise CacheError("restore_dest %s is inside base_dir; restore somewhere else" % dest)
            if dest != "/" and is_within(base, real_dest):
                raise CacheError("restore_dest %s holds base_dir %s: a restore deletes what the snapshot lacks "
                                 "there, the cache with it; restore into a directory outside base_dir"
                                 % (dest, self.base_dir))
            self._check_writable(dest, "restore_dest", room=True)
            if info is not None:
                with Tree(dest) as target:
                    if inode_flags(target.fd) & UNCHANGEABLE_FLAGS:
                        raise CacheError("restore_dest %s is immutable or append-only (lsattr -d %s); clear that "
                                         "with chattr -i -a if the restore is wanted. Nothing was changed."
                                         % (dest, dest))
            self._verify_dir(cache.relative(snapshot.path), subvolume=True)
            # A snapshot shows the cache's own .snapshots subvolume as an empty
            # directory: an artifact of the cache, never part of the source.
            if dest == "/":
                # The backup volume stays: the snapshot does not hold it, and --delete would take it.
                excludes = list(STANDARD_EXCLUDES) + ["/" + literal_pattern(os.path.relpath(base, "/"))]
            else:
                excludes = ["/" + SNAPSHOTS_NAME]
            occupied = info is not None and bool(os.listdir(dest))
            stats = None
            if occupied or check_mode:
                stats = self._rsync(snapshot.path, dest, excludes, True, purpose="restore")
                if occupied:
                    self._refuse_immutable_paths(dest, stats, "restore_dest %s" % dest)
                if stats.files_deleted and not self.params["restore_delete_extra"]:
                    raise CacheError(
                        "restore_dest %s is not empty: restoring snapshot %s there would delete %d files that the "
                        "snapshot lacks (%s%s). Set restore_delete_extra: true to delete them, or restore into an "
                        "empty or new directory. Nothing was changed." % (
                            dest, snapshot.name, stats.files_deleted, ", ".join(stats.deleted_paths[:5]),
                            ", ..." if stats.files_deleted > 5 else ""))
            if not check_mode:
                # A backup volume mounted read-only can still be restored from: the holder note is optional.
                with contextlib.suppress(OSError):
                    lock.claim()
                if info is None:
                    os.makedirs(dest, 0o755)
                    self.operations.append("create %s" % dest)
                stats = self._rsync(snapshot.path, dest, excludes, False, purpose="restore")
            if stats.changes:
                self.operations.append("%s snapshot %s into %s (%d changes, %d bytes, %d deleted)" % (
                    "restore" if check_mode else "restored", snapshot.name, dest, stats.changes,
                    stats.bytes_transferred, stats.files_deleted))
            if stats.files_deleted:
                self.operations.append("%s %d files in %s that snapshot %s lacks (%s%s)" % (
                    "delete" if check_mode else "deleted", stats.files_deleted, dest, snapshot.name,
                    ", ".join(stats.deleted_paths[:5]), ", ..." if stats.files_deleted > 5 else ""))
            result = self._result(cache, cache.versioning_found(), stats, None, [], bool(self.operations))
            result["restored"] = snapshot.view()
            return result
