# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Carries out snapper_cache's planned operations on one cache.

Everything in base_dir is reached beneath it (_beneath.Tree: no symlink is
ever followed). Right before each destructive step the entry it acts on is
checked again: a real directory beneath base_dir, not a mount point, on
base_dir's filesystem, and where a subvolume is deleted, a subvolume, deleted
by name from a descriptor of its parent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import platform
import time

from .._cache.layout import (
    CACHE_NAME,
    META_NAME,
    PENDING_NAME,
    RECORDS_NAME,
    SNAPSHOTS_NAME,
    CacheError,
    CacheReader,
    backup_record,
    record_path,
)
from .._cache.snapper import SNAPSHOT_DESCRIPTION, config_settings, userdata_value
from .._common.backup_meta import format_meta, human_size
from .._common.btrfs import Btrfs, destroy_subvolume, is_subvolume
from .._common.command import CommandError, CommandStalled, CommandTimeout
from .._common.fs import read_mounts, write_at
from .._common.plan import Operation, Outcome
from .._common.roottree import source_kernels, source_os_release
from .._common.rsync import RSYNC_VANISHED, copy_argv, parse_output
from .._common.ssh import KNOWN_HOSTS_NAME
from .plan import BASE_MODE, copy_text, plan_prune, plan_versions, restore_operations

SNAPSHOTS = os.path.join(CACHE_NAME, SNAPSHOTS_NAME)
# The cache's own .snapshots is never copied over, nor deleted by rsync --delete.
PROTECT = ("/" + SNAPSHOTS_NAME,)


def _last_lines(text, count):
    return "\n".join(text.strip().splitlines()[-count:])


def rsync_copy(runner, desired, source, dest, excludes, warnings, *, dry_run, protect=(),
               delete_excluded=False, base_dir=None, link=None, source_is_file=False):
    """rsync source into dest (a backup into base_dir's cache when base_dir is
    given, else a restore), within desired's time limits; the dry run is
    check mode's read of what the copy changes. link, for a pull or a remote
    restore, is the _ssh.Link that reaches the client. A failure is a
    CacheError that says what was left as it was."""
    argv = copy_argv(source, dest, excludes=excludes, protect=protect, checksum=desired.checksum,
                     dry_run=dry_run, delete_excluded=delete_excluded, rsh=link.rsync_shell() if link else None,
                     source_is_file=source_is_file,
                     # A restore's --delete stays on dest's filesystem: a filesystem mounted there
                     # (recorded at the backup or mounted since) is never emptied. A pull without
                     # the client's mount table stays on the source's filesystem.
                     one_file_system=base_dir is None or bool(desired.remote and not desired.remote.mountinfo))
    kept = ("no snapshot was taken and .backup_meta and every snapshot were left as they were"
            if base_dir else "the snapshot is unchanged; restore_dest holds part of it")
    try:
        # rsync's own --timeout misses a sender that stops: the generator's keep-alive writes to it
        # count as activity. What rsync reads is the measure of progress.
        rc, out = runner.run_watched(argv, ok_rcs=(0, RSYNC_VANISHED), stall_timeout=desired.io_timeout,
                                     timeout=desired.copy_timeout, watched=("rsync",))
    except CommandStalled:
        raise CacheError("the copy from %s stalled: rsync read nothing for io_timeout (%d s) and was stopped, so "
                         "%s; check the other side (a stopped or hung process, a hung filesystem, the network), "
                         "or raise io_timeout" % (source, desired.io_timeout, kept)) from None
    except CommandTimeout:
        raise CacheError("the copy from %s did not finish within copy_timeout (%d s) and was stopped, so %s; "
                         "raise copy_timeout if the copy is that long, or find what slows it"
                         % (source, desired.copy_timeout, kept)) from None
    except CommandError as error:
        text = str(error)
        if "No space left on device" in text:
            where = ("base_dir %s" % base_dir) if base_dir else ("restore_dest %s" % dest)
            raise CacheError(
                "%s is full (No space left on device: of data or of inodes, see df -h and df -i) after part "
                "of the copy; free space on it (lower keep, or delete old snapshots) or grow the volume, then "
                "run again. %s; the next run finishes the copy. %s"
                % (where, kept[0].upper() + kept[1:], _last_lines(text, 3))) from None
        if link and link.failed_in_ssh(text):
            raise CacheError("%s; %s" % (link.failure(text, "the copy"), kept)) from None
        advice = ""
        if "Operation not permitted" in text:
            advice = ("the kernel refused to change a file there: it is immutable or append-only (lsattr -R %s); "
                      "clear that with chattr -i -a, then run again. " % dest)
        elif "Read-only file system" in text:
            advice = "%s is on a read-only filesystem; remount it read-write, then run again. " % dest
        raise CacheError("the copy failed, so %s: %s%s" % (kept, advice, text)) from None
    if rc == RSYNC_VANISHED:
        warnings.append("some files vanished from %s while they were copied (rsync exit "
                        "24); the backup is otherwise complete" % source)
    return parse_output(out)


def verify_dir(tree, relative, subvolume=False):
    """Right before a subvolume is deleted or rsync --delete copies into it:
    relative is a real directory beneath base_dir (no link on the way or at
    its end), not a mount point, on base_dir's filesystem, and with
    subvolume, a btrfs subvolume. Returns False if it is missing."""
    info = tree.lstat(relative)
    problem = CacheReader.not_a_layout_dir(tree, relative, info, frozenset(mount.point for mount in read_mounts()),
                                           "part of the cache")
    if problem:
        raise CacheError(problem)
    info = tree.lstat(relative)
    if info is None:
        return False
    if subvolume and not is_subvolume(info):
        raise CacheError("%s is not a btrfs subvolume, so it is not deleted as one; move it away, then "
                         "run again" % tree.path(relative))
    return True


def source_userdata(source, stats):
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


class CacheApplier:
    """Carries out operations on the cache in tree (base_dir, held open and
    locked); each one carried out goes into `carried_out` as it is done, so
    that a failure can say how far the run got."""

    def __init__(self, runner, desired, snapper, tree, lock, carried_out, warnings, link=None):
        self.runner = runner
        self.link = link
        self.desired = desired
        self.snapper = snapper
        self.btrfs = Btrfs(runner)
        self.tree = tree
        self.lock = lock
        self.carried_out = carried_out
        self.warnings = warnings

        # Of the backup being carried out: what the copy did, the source's userdata, the snapshot taken.
        self.copied = self.userdata = self.created = None

    def steps(self):
        """The step that carries out each action apply() is given (the copy and the restore are
        backup()'s and restore()'s own)."""
        return {
            "remove_stale_record": self._remove_stale_record, "secure_base_dir": self._secure_base_dir,
            "pin_host_keys": self._pin_host_keys, "remove_stale": self._remove_stale,
            "remove_incomplete": self._remove_incomplete, "create_cache": self._create_cache,
            "create_config": self._create_config, "set_config": self._set_config,
            "create_snapshots_dir": self._create_snapshots_dir, "snapshot": self._snapshot,
            "write_meta": self._write_meta, "prune": self._prune, "delete_snapshot": self._delete_snapshot,
            "delete_config": self._delete_config, "delete_snapshots_dir": self._delete_snapshots_dir,
            "delete_cache": self._delete_cache, "delete_file": self._delete_file,
        }

    def apply(self, state, operations):
        steps = self.steps()
        for operation in operations:
            done = Operation(operation.action, operation.args.get("done", operation.text), dict(operation.args))
            text = steps[operation.action](state, done)
            if text:
                done.text = text
            self.carried_out.append(done)

    # --- backup ---------------------------------------------------------------

    def backup(self, state, operations, read):
        """The layout steps, the copy, then the snapshot, .backup_meta and
        retention planned on what the copy did. read() reads the cache again."""
        self.lock.claim()
        copy = next(index for index, operation in enumerate(operations) if operation.action == "copy")
        self.apply(state, operations[:copy])
        write_at(self.tree.fd, PENDING_NAME, "")
        # rsync --delete runs into .rootfs_cache: it is checked right before.
        verify_dir(self.tree, CACHE_NAME, subvolume=state.versioning != "none")
        transfer = rsync_copy(self.runner, self.desired, self.desired.source_location, state.cache.cache_dir,
                              state.excludes, self.warnings, dry_run=False, protect=PROTECT, delete_excluded=True,
                              base_dir=state.cache.base_dir, link=self.link)
        text = copy_text(transfer, self.desired.source_location, state.cache, done=True)
        if text:
            self.carried_out.append(Operation("copy", text))
        after = dataclasses.replace(state, transfer=transfer)
        versions = plan_versions(self.desired, state, transfer)
        if versions:
            # Read again before versioning: an entry of the layout swapped meanwhile refuses it.
            after.cache = read()
            self.copied = transfer
            # A pull's distro and kernel are read from the copy: the client is not this host.
            self.userdata = source_userdata(
                state.cache.cache_dir if self.desired.remote else self.desired.source, transfer)
            self.apply(after, versions)
        self.tree.remove(PENDING_NAME)
        # Read the cache again only when this run changed it: an unchanged run is common and each
        # read costs several snapper and btrfs calls.
        after.cache = read() if self.carried_out else dataclasses.replace(after.cache, pending=False)
        pruned = plan_prune(self.desired, state.versioning, after.cache.snapshots, False)
        self.apply(after, pruned)
        if pruned:
            after.cache = read()
        return Outcome(state, list(self.carried_out), after)

    def write_record(self, state, name):
        """The record of what the backup that took snapshot name left out (a snapshot killed
        before it has none: its restores then delete nothing)."""
        desired = self.desired
        record = backup_record(name, desired.source, state.excludes, desired.remote.host if desired.remote else None)
        with self.tree.directory(RECORDS_NAME, create=True, mode=0o700) as fd:
            write_at(fd, name + ".json", record, mode=0o600, sync=True)

    def _remove_stale_record(self, state, operation):
        self.tree.remove(operation.args["relative"])

    def _secure_base_dir(self, state, operation):
        os.fchown(self.tree.fd, 0, 0)
        os.fchmod(self.tree.fd, BASE_MODE)

    def _pin_host_keys(self, state, operation):
        self.tree.write_text(KNOWN_HOSTS_NAME, "".join(key.known_hosts_line() for key in self.desired.remote.host_keys))

    def _remove_stale(self, state, operation):
        name = operation.args["name"]
        # Checked again right before: a directory of that name is not ours, and stays.
        if not self.tree.is_dir(name):
            self.tree.remove(name)

    def _remove_incomplete(self, state, operation):
        relative = operation.args["relative"]
        verify_dir(self.tree, relative)
        self._delete_subvolume(os.path.join(relative, "snapshot"))
        with self.tree.parent(relative) as (dir_fd, name):
            os.rmdir(name, dir_fd=dir_fd)

    def _create_cache(self, state, operation):
        if state.versioning != "none":
            self.btrfs.create_subvolume(state.cache.cache_dir)
        else:
            os.mkdir(CACHE_NAME, 0o755, dir_fd=self.tree.fd)

    def _create_config(self, state, operation):
        verify_dir(self.tree, CACHE_NAME, subvolume=True)
        self.snapper.create_config(state.cache.cache_dir)

    def _set_config(self, state, operation):
        self.snapper.set_config(config_settings(self.desired.keep))

    def _create_snapshots_dir(self, state, operation):
        verify_dir(self.tree, CACHE_NAME, subvolume=True)
        if self.tree.lstat(SNAPSHOTS) is not None:
            raise CacheError("%s appeared while the run checked the cache; run again" % state.cache.snapshots_dir)
        self.btrfs.create_subvolume(state.cache.snapshots_dir)

    def _snapshot(self, state, operation):
        cache, versioning = state.cache, state.versioning
        verify_dir(self.tree, CACHE_NAME, subvolume=True)
        # An older tool's .snapshots may be a plain directory: real, beneath base_dir, is what counts.
        if not verify_dir(self.tree, SNAPSHOTS):
            raise CacheError("%s is missing, so no snapshot can be taken; run again" % cache.snapshots_dir)
        if versioning == "snapper":
            self.created = str(self.snapper.create(self.userdata))
        else:
            stamp = time.strftime("%Y-%m-%d_%H:%M")
            name, counter = "@" + stamp, 1
            while (self.tree.lstat(os.path.join(SNAPSHOTS, name)) is not None
                   or self.tree.lstat(os.path.join(SNAPSHOTS, name + ".meta")) is not None):
                counter += 1
                name = "@%s_%d" % (stamp, counter)
            self.btrfs.snapshot(cache.cache_dir, os.path.join(cache.snapshots_dir, name), read_only=True)
            meta = {"META_DATE": stamp.replace("_", " "), "META_DESCRIPTION": SNAPSHOT_DESCRIPTION}
            meta.update({"META_" + key.upper(): userdata_value(value) for key, value in self.userdata.items()})
            with self.tree.directory(SNAPSHOTS) as fd:
                write_at(fd, name + ".meta", format_meta(meta), sync=True)
            self.created = name
        self.write_record(state, self.created)
        operation.args["name"] = self.created
        return "took %s snapshot %s" % (versioning, self.created)

    def _write_meta(self, state, operation):
        meta = {"META_DATE": time.strftime("%Y-%m-%d %H:%M"), "META_DISTRO": self.userdata["distro"],
                "META_SIZE": human_size(self.copied.total_size),
                "META_KERNEL": self.userdata["kernel"]}
        if self.created:
            meta["META_SNAPSHOT"] = self.created
        write_at(self.tree.fd, META_NAME, format_meta(meta), sync=True)

    def _prune(self, state, operation):
        snapshot = operation.args["snapshot"]
        relative = state.cache.relative(snapshot.path)
        if snapshot.kind == "snapper":
            # snapper deletes by its own paths: check them first.
            verify_dir(self.tree, os.path.dirname(relative))
            verify_dir(self.tree, relative, subvolume=True)
            self.snapper.delete([snapshot.number])
        else:
            self._delete_subvolume(relative)
            self.tree.remove(relative + ".meta")
        self.tree.remove(record_path(snapshot.name))

    # --- removal --------------------------------------------------------------

    def _delete_subvolume(self, relative):
        """Delete the subvolume at relative (beneath base_dir), after checking it is one of the cache's."""
        if not verify_dir(self.tree, relative, subvolume=True):
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

    def _delete_snapshot(self, state, operation):
        snapshot = operation.args["snapshot"]
        relative = state.cache.relative(snapshot.path)
        if snapshot.kind == "snapper":
            verify_dir(self.tree, os.path.dirname(relative))
        self._delete_subvolume(relative)
        if snapshot.kind == "btrfs":
            self.tree.remove(relative + ".meta")
        self.tree.remove(record_path(snapshot.name))

    def _delete_config(self, state, operation):
        # snapper deletes .snapshots by its own path: check it first.
        verify_dir(self.tree, SNAPSHOTS)
        self.snapper.delete_config()

    def _delete_snapshots_dir(self, state, operation):
        self._delete_dir(state, SNAPSHOTS)

    def _delete_cache(self, state, operation):
        self._delete_dir(state, CACHE_NAME)

    def _delete_dir(self, state, relative):
        info = self.tree.lstat(relative)
        if info is None:
            return  # snapper delete-config removed .snapshots already
        if state.cache.base_fstype == "btrfs" and is_subvolume(info):
            self._delete_subvolume(relative)
        else:
            verify_dir(self.tree, relative)
            # File by file beneath base_dir: a link in it is removed, never followed,
            # and nothing is deleted through a mount point.
            self.tree.remove(relative)

    def _delete_file(self, state, operation):
        self.tree.remove(operation.args["name"])

    # --- restore --------------------------------------------------------------

    def restore(self, state, operations):
        """Creates restore_dest if missing, then copies the snapshot into it."""
        # A backup volume mounted read-only can still be restored from: the holder note is optional.
        with contextlib.suppress(OSError):
            self.lock.claim()
        desired = self.desired
        if not state.dest_exists:
            os.makedirs(desired.restore_dest, 0o755)
            self.carried_out.append(next(op for op in operations if op.action == "create_dest"))
        snapshot = state.snapshot
        # The snapshot is the source of a copy with --delete: checked again right before it.
        verify_dir(self.tree, state.cache.relative(snapshot.path), subvolume=True)
        transfer = rsync_copy(self.runner, desired, state.source, desired.dest_location, state.excludes,
                              self.warnings, dry_run=False, link=self.link, source_is_file=state.source_is_file)
        self.carried_out.extend(restore_operations(snapshot, desired.dest_location, transfer, done=True,
                                                   path=desired.restore_path))
        return Outcome(state, list(self.carried_out), dataclasses.replace(state, transfer=transfer))
