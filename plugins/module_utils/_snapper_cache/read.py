# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""The checks snapper_cache makes of the state it read, each refusing the run
before anything changes, and what a backup or a restore leaves out."""

from __future__ import annotations

import os
import stat

from .._cache.layout import (
    CACHE_NAME,
    HOLDER_NAME,
    META_NAME,
    PENDING_NAME,
    RECORDS_NAME,
    SNAPSHOTS_NAME,
    CacheError,
    record_path,
)
from .._common.beneath import BeneathError, Tree, relative_parts
from .._common.fs import (
    UNCHANGEABLE_FLAGS,
    check_real_path,
    commit_filesystem,
    flags_at,
    free_space,
    inode_flags,
    is_within,
    read_mounts,
)
from .._common.lock import Lock
from .._common.roottree import HOME_EXCLUDES, STANDARD_EXCLUDES, mount_excludes
from .._common.rsync import is_excluded, itemized_path, literal_pattern, pattern_beneath
from .._common.ssh import KNOWN_HOSTS_NAME

CACHE_BUSY = ("%(path)s is locked by another run (%(holder)s); waited %(timeout)d s. Try again when it has "
              "finished, or raise lock_timeout")

# Below this, a base_dir is full before the copy starts.
MIN_FREE_BYTES = 1 << 20
MIN_FREE_INODES = 16


def cache_lock(base_dir, timeout):
    """Serialises runs on one base directory (flock on the directory itself).

    claim() records who holds it, for the message of a run that times out;
    it is called only once the run has passed its checks, so that a refused
    run writes nothing.
    """
    return Lock(base_dir, timeout, CACHE_BUSY, holder_name=HOLDER_NAME)


# --- checks of the state read: each refuses the run before anything changes ----


def check_base_path(base_dir, must_exist=True):
    if not os.path.isabs(base_dir):
        raise CacheError("base_dir %r is relative; give an absolute path" % base_dir)
    if base_dir == "/":
        raise CacheError("base_dir %s would put the cache over the root filesystem; give a "
                         "directory such as /mnt/debian_backup" % base_dir)
    problem = check_real_path("base_dir", base_dir)
    if problem:
        raise CacheError(problem)
    if must_exist and not os.path.isdir(base_dir):
        raise CacheError("base_dir %s does not exist; mount the backup volume there (or "
                         "create the directory) first" % base_dir)


def check_writable(path, what, room=False):
    """The filesystem of path (or of its nearest existing parent) is writable
    and, with room, has space and inodes left."""
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    space = free_space(path)
    if space.read_only:
        raise CacheError("%s %s is on a read-only filesystem; remount it read-write (mount -o remount,rw) "
                         "or choose another %s. Nothing was changed." % (what, path, what))
    if not room:
        return
    if space.free_bytes < MIN_FREE_BYTES or (space.free_inodes is not None and space.free_inodes < MIN_FREE_INODES):
        # Measured again once the filesystem has committed: right after a copy that filled it
        # failed, btrfs still counts the space of the temporary file rsync deleted as used.
        commit_filesystem(path)
        space = free_space(path)
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


def check_flags(tree, relatives):
    """Refuse when one of the entries of base_dir a run would change is immutable or append-only."""
    for relative in relatives:
        parts = relative_parts(relative)
        try:
            if not parts:
                flags = inode_flags(tree.fd)
            else:
                with tree.parent(relative) as (dir_fd, name):
                    flags = flags_at(dir_fd, name)
        except (FileNotFoundError, BeneathError):
            continue
        if flags & UNCHANGEABLE_FLAGS:
            path = tree.path(relative)
            raise CacheError("%s is immutable or append-only (lsattr %s), so the run cannot change it; clear "
                             "that with chattr -i -a %s if the change is wanted, then run again. Nothing was "
                             "changed." % (path, path, path))


def refuse_immutable_paths(root, stats, what):
    """What rsync's dry run would change or delete in root: an immutable or
    append-only file or directory there refuses the run."""
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


def check_no_mounts(cache):
    """Nothing is mounted inside the cache: rsync --delete and removal never reach through a mount."""
    real = os.path.realpath(cache.cache_dir)
    mounted = [mount.point for mount in read_mounts() if is_within(mount.point, real)]
    if mounted:
        raise CacheError("%s has filesystems mounted inside (%s); unmount them, then run again"
                         % (cache.cache_dir, ", ".join(mounted)))


def check_removable(tree, cache):
    """Before anything is deleted: no mount inside the cache, nothing the
    kernel would refuse to delete (immutable or append-only)."""
    check_no_mounts(cache)
    snapshots = os.path.join(CACHE_NAME, SNAPSHOTS_NAME)
    entries = ["", META_NAME, HOLDER_NAME, PENDING_NAME, CACHE_NAME, snapshots]
    for snapshot in cache.snapshots:
        relative = cache.relative(snapshot.path)
        entries += [os.path.dirname(relative), relative]
    for relative in cache.incomplete:
        entries += [relative, os.path.join(relative, "snapshot")]
    check_flags(tree, entries)
    if cache.cache_exists and not cache.cache_is_subvolume:
        # A plain tree is deleted file by file: every one of them must be deletable.
        for directory, dirs, files in tree.walk(CACHE_NAME):
            check_flags(tree, [os.path.join(directory, name) for name in dirs + files])


def backup_excludes(desired):
    """What a backup of desired.source leaves out (a restore over / leaves out the same)."""
    excludes = list(STANDARD_EXCLUDES)
    if not desired.include_home:
        excludes += HOME_EXCLUDES
    if not desired.remote:
        excludes += mount_excludes(desired.source, desired.include_home)
    elif desired.remote.mountinfo:
        excludes += mount_excludes(desired.source, desired.include_home, mounts=desired.remote_mounts())
    # Else this host's mount table says nothing of the client's: the copy stays on one filesystem there.
    return excludes + list(desired.exclude)


def check_source(desired, excludes):
    if desired.remote:
        return  # on the client: the server's base_dir is never inside it
    source = desired.source
    if not os.path.isdir(source):
        raise CacheError("source %s does not exist or is not a directory; give a directory: the "
                         "root of the tree to back up (/ for the whole host)" % source)
    base = os.path.realpath(desired.base_dir)
    if is_within(base, os.path.realpath(source)):
        relative = "/" + os.path.relpath(base, os.path.realpath(source))
        if relative == "/." or not is_excluded(relative, excludes):
            raise CacheError(
                "base_dir %s is inside source %s and not excluded, so each backup would copy "
                "the cache into itself; add %s to exclude, or move base_dir (for example "
                "under /mnt)" % (desired.base_dir, source, literal_pattern(relative)))


def stale_records(tree, cache):
    """Records of snapshots that are gone (deleted by snapper's own cleanup or by hand): a
    snapshot taken later under the same number must not be restored with them."""
    names = {record_path(snapshot.name) for snapshot in cache.snapshots}
    return [relative for relative in (os.path.join(RECORDS_NAME, name) for name in tree.listdir(RECORDS_NAME))
            if relative not in names]


def stale_files(tree):
    """Temporary copies of .backup_meta, the lock and the marker that a killed run left (we hold the lock)."""
    prefixes = tuple("." + name + "." for name in (META_NAME, HOLDER_NAME, PENDING_NAME, KNOWN_HOSTS_NAME))
    return [name for name in tree.listdir() if name.startswith(prefixes) and not tree.is_dir(name)]


def restore_excludes(desired, recorded):
    """A restore leaves out what the backup left out (so that --delete never
    takes what the backup did not hold: DistroClone Backup's v1.2.2 lost data
    that way), anchored at restore_path: the exclusions the snapshot's record
    lists (recorded), or for a snapshot without one, those a backup would
    apply now. A snapshot shows the cache's own .snapshots as an empty
    directory, never part of the source; and a local
    restore over / leaves the backup volume alone."""
    path = desired.restore_path
    excludes = []
    for pattern in backup_excludes(desired) if recorded is None else recorded:
        if not pattern.startswith("/") or path == "/":
            excludes.append(pattern)
        else:
            # Matched as rsync reads it, not as text: a mount's escaped /srv/disk[[]1]/x/* is
            # /x/* beneath /srv/disk[1], and /home/*/.cache is /.cache beneath /home/alice.
            beneath = pattern_beneath(pattern, path)
            if beneath:
                excludes.append(beneath)
    if path == "/":
        excludes.append("/" + SNAPSHOTS_NAME)
        if desired.restore_dest == "/" and not desired.remote:
            excludes.append("/" + literal_pattern(os.path.relpath(os.path.realpath(desired.base_dir), "/")))
    return excludes


def base_access(tree):
    """base_dir's (owner uid, permission bits), read from the descriptor the run holds."""
    info = os.fstat(tree.fd)
    return info.st_uid, stat.S_IMODE(info.st_mode)


def unsafe_mount_warnings(base_dir):
    """A pull's warning when base_dir's filesystem lets the client's files act
    on this host: setuid bits honoured, device nodes opened. base_dir is
    0700, so only root reaches them; nosuid,nodev keep it so through any
    other mount of the same filesystem."""
    flags = os.statvfs(base_dir).f_flag
    missing = [name for name, bit in (("nosuid", os.ST_NOSUID), ("nodev", os.ST_NODEV)) if not flags & bit]
    if not missing:
        return []
    return ["base_dir %s is on a filesystem mounted without %s, so the client's setuid files and device "
            "nodes in the cache work there for whoever reaches them (base_dir is 0700: root alone); mount "
            "the backup volume with nosuid,nodev (the backup_server role does)" % (base_dir, ",".join(missing))]
