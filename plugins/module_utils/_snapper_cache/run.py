# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Rootfs backup caches in DistroClone Backup's layout: snapper_cache's entry
point, and the reads (and refusals) that come before each plan.

    BASE/.backup_meta                     KEY="value" metadata DistroClone reads
    BASE/.rootfs_cache/                   btrfs subvolume, the rsync target
    BASE/.rootfs_cache/.snapshots/N/      snapper snapshots (N/snapshot, N/info.xml)
    BASE/.rootfs_cache/.snapshots/@DATE   legacy raw snapshots (+ @DATE.meta)

run() reads the state the Desired state needs (_cache.CacheReader and the
checks below), plans it (_cache_plan) and, unless in check mode, has
_cache_apply carry it out. Unlike the reference tool, the snapshot follows a
successful copy, retention deletes exactly what exceeds `keep`, and metadata
is never run as shell code.

An entry of the layout that is a link, is not a directory, is a mount point
or lies on another filesystem is never a cache, a snapshot directory or a
snapshot: the reader reports it, and nothing is deleted, copied into or
snapshotted through it.
"""

from __future__ import annotations

import contextlib
import os
import stat

from .._cache.layout import (
    CACHE_NAME,
    HOLDER_NAME,
    META_NAME,
    PENDING_NAME,
    RECORD_LIMIT,
    RECORDS_NAME,
    SNAPSHOTS_NAME,
    CacheError,
    CacheReader,
    parse_backup_record,
    record_path,
)
from .._cache.snapper import Snapper
from .._common.beneath import BeneathError, Tree
from .._common.fs import UNCHANGEABLE_FLAGS, check_real_path, inode_flags, is_within
from .._common.plan import Outcome, Result, execute
from .._common.ssh import KNOWN_HOSTS_NAME, Link, RemoteError, check_pinned, fingerprints, parse_known_hosts
from .apply import PROTECT, CacheApplier, rsync_copy, verify_dir
from .plan import (
    BackupState,
    RemoveState,
    RestoreState,
    cache_values,
    choose_versioning,
    diff_view,
    pick_snapshot,
    plan_backup,
    plan_remove,
    plan_restore,
    planned_view,
)
from .read import (
    backup_excludes,
    base_access,
    cache_lock,
    check_base_path,
    check_flags,
    check_no_mounts,
    check_removable,
    check_source,
    check_writable,
    refuse_immutable_paths,
    restore_excludes,
    stale_files,
    stale_records,
    unsafe_mount_warnings,
)

# --- the entry point -----------------------------------------------------------


class _Run:
    """One run on one cache: the runner, the Desired state, and what the run gathers."""

    def __init__(self, runner, desired, check_mode, carried_out):
        self.runner = runner
        self.desired = desired
        self.check_mode = check_mode
        self.carried_out = carried_out
        self.snapper = Snapper(runner, desired.snapper_config)
        self.reader = CacheReader(runner, self.snapper)
        self.warnings = []
        self.link = None

    def read_cache(self):
        """The cache as it is now; its refused entries refuse the run, its ignored ones are warned about."""
        cache = self.reader.read(self.desired.base_dir)
        if cache.problems:
            raise CacheError("; ".join(cache.problems))
        self.warnings += [text for text in cache.ignored if text not in self.warnings]
        return cache

    def applier(self, tree, lock):
        return CacheApplier(self.runner, self.desired, self.snapper, tree, lock, self.carried_out, self.warnings,
                            self.link)

    def link_to_client(self):
        """The link to the client of a pull or a remote restore, or a context of None for a local run."""
        if not self.desired.remote:
            return contextlib.nullcontext()
        return Link(self.desired.remote, self.runner.binary("ssh"))

    def check_client(self, tree, pull):
        """A pull's or a remote restore's client, before anything is copied:
        the keys the controller gathered match the pin, and a pull's key is
        restricted to a read-only rrsync. Returns the pinned keys."""
        remote = self.desired.remote
        pinned = ()
        text = tree.read_text(KNOWN_HOSTS_NAME, 1 << 20)
        if text:
            try:
                pinned = tuple(parse_known_hosts(text))
            except RemoteError:
                pinned = ()  # damaged: the pin is written again from the controller's keys
        problem = check_pinned(remote, pinned)
        if problem:
            raise CacheError(problem)
        self.link.pinned_keys = pinned or remote.host_keys
        if pull:
            try:
                self.link.check_restricted(self.runner)
            except RemoteError as error:
                raise CacheError("%s; nothing was copied and no snapshot was taken" % error) from None
        return pinned

    def remote_values(self, pinned_now):
        remote = self.desired.remote
        if not remote:
            return None
        return {"host": remote.host, "port": remote.port, "user": remote.user,
                "host_key_fingerprints": fingerprints(remote.host_keys), "pinned": pinned_now}

    def result(self, outcome, values):
        before = diff_view(outcome.before.cache.view())
        after = planned_view(outcome.before.cache.view(), outcome.operations) if self.check_mode else \
            diff_view(outcome.after.cache.view())
        return Result.of(outcome, diff={"before": before, "after": after}, values=values, warnings=self.warnings)

    def backup(self):
        desired = self.desired
        check_base_path(desired.base_dir)
        with cache_lock(desired.base_dir, desired.lock_timeout) as lock, Tree(desired.base_dir) as tree, \
                self.link_to_client() as self.link:

            def read():
                cache = self.read_cache()
                check_writable(desired.base_dir, "base_dir", room=True)
                check_no_mounts(cache)
                check_flags(tree, ["", META_NAME, HOLDER_NAME, PENDING_NAME, KNOWN_HOSTS_NAME, CACHE_NAME,
                                   os.path.join(CACHE_NAME, SNAPSHOTS_NAME)])
                excludes = backup_excludes(desired)
                check_source(desired, excludes)
                versioning, warnings = choose_versioning(desired, cache)
                self.warnings += warnings
                state = BackupState(cache, versioning, excludes, stale_files(tree), base_access=base_access(tree),
                                    stale_records=stale_records(tree, cache))
                if desired.remote:
                    self.warnings += unsafe_mount_warnings(desired.base_dir)
                if desired.remote:
                    state.pinned_keys = self.check_client(tree, pull=True)
                if versioning == "snapper" and cache.snapper_manages_cache:
                    state.snapper_settings = self.snapper.get_config()
                if self.check_mode:
                    state.transfer = rsync_copy(self.runner, desired, desired.source_location, cache.cache_dir,
                                                excludes, self.warnings, dry_run=True, protect=PROTECT,
                                                delete_excluded=True, base_dir=desired.base_dir, link=self.link)
                    refuse_immutable_paths(cache.cache_dir, state.transfer, cache.cache_dir)
                return state

            outcome = execute(read, lambda state: plan_backup(desired, state),
                              lambda state, operations: self.applier(tree, lock).backup(
                                  state, operations, self.read_cache),
                              self.check_mode)
        created = next((op.args.get("name") for op in outcome.operations if op.action == "snapshot"), None)
        pruned = [op.args["snapshot"] for op in outcome.operations if op.action == "prune"]
        after = outcome.after
        values = cache_values(
            after.cache, after.versioning, after.transfer, pruned=pruned,
            created=next((snap.view() for snap in after.cache.snapshots if snap.name == created), None))
        values["remote"] = self.remote_values(any(op.action == "pin_host_keys" for op in outcome.operations))
        return self.result(outcome, values)

    def remove(self):
        desired = self.desired
        check_base_path(desired.base_dir, must_exist=False)
        if not os.path.isdir(desired.base_dir):
            state = RemoveState(self.reader.read(desired.base_dir))
            return self.result(Outcome(state, [], state), cache_values(state.cache, None))
        with cache_lock(desired.base_dir, desired.lock_timeout) as lock, Tree(desired.base_dir) as tree:

            def read():
                cache = self.read_cache()
                return RemoveState(cache, [name for name in (META_NAME, HOLDER_NAME, PENDING_NAME, KNOWN_HOSTS_NAME,
                                                             RECORDS_NAME) if tree.lstat(name) is not None])

            def plan(state):
                operations = plan_remove(desired, state)
                if operations:
                    check_writable(desired.base_dir, "base_dir")
                    check_removable(tree, state.cache)
                return operations

            def apply(state, operations):
                self.applier(tree, lock).apply(state, operations)
                return Outcome(state, list(self.carried_out), RemoveState(self.read_cache()))

            outcome = execute(read, plan, apply, self.check_mode)
        return self.result(outcome, cache_values(outcome.after.cache, None))

    def restore(self):
        desired = self.desired
        dest = desired.restore_dest
        info = None
        if not desired.remote:
            problem = check_real_path("restore_dest", dest)
            if problem:
                raise CacheError(problem)
            info = os.lstat(dest) if os.path.lexists(dest) else None
            if info is not None and not stat.S_ISDIR(info.st_mode):
                raise CacheError("restore_dest %s exists and is %s; move it away or give a directory to restore "
                                 "into" % (dest, "a file" if stat.S_ISREG(info.st_mode) else "not a directory"))
        check_base_path(desired.base_dir)
        with cache_lock(desired.base_dir, desired.lock_timeout) as lock, Tree(desired.base_dir) as tree, \
                self.link_to_client() as self.link:

            def read():
                cache = self.read_cache()
                snapshot = pick_snapshot(cache, desired.restore_snapshot)
                if desired.remote:
                    self.check_client(tree, pull=False)
                else:
                    self.check_local_dest(info)
                verify_dir(tree, cache.relative(snapshot.path), subvolume=True)
                source, is_file = self.restore_source(tree, cache, snapshot)
                recorded = parse_backup_record(tree.read_text(record_path(snapshot.name), RECORD_LIMIT), snapshot.name)
                # A remote destination is the role's to check and create (it is on the client).
                state = RestoreState(cache, snapshot, restore_excludes(desired, recorded), source=source,
                                     dest_exists=info is not None or bool(desired.remote), source_is_file=is_file,
                                     recorded=recorded is not None)
                occupied = bool(desired.remote) or (info is not None and bool(os.listdir(dest)))
                if occupied or self.check_mode:
                    state.listing = rsync_copy(self.runner, desired, source, desired.dest_location, state.excludes,
                                               self.warnings, dry_run=True, link=self.link, source_is_file=is_file)
                    if occupied and not desired.remote:
                        refuse_immutable_paths(dest, state.listing, "restore_dest %s" % dest)
                    if self.check_mode:
                        state.transfer = state.listing
                return state

            outcome = execute(read, lambda state: plan_restore(desired, state),
                              lambda state, operations: self.applier(tree, lock).restore(state, operations),
                              self.check_mode)
        after = outcome.after
        values = cache_values(after.cache, after.cache.versioning_found(), after.transfer)
        values["restored"] = after.snapshot.view()
        values["remote"] = self.remote_values(False)
        return self.result(outcome, values)

    def check_local_dest(self, info):
        desired, dest = self.desired, self.desired.restore_dest
        base, real_dest = os.path.realpath(desired.base_dir), os.path.realpath(dest)
        if is_within(real_dest, base):
            raise CacheError("restore_dest %s is inside base_dir; restore somewhere else" % dest)
        if dest != "/" and is_within(base, real_dest):
            raise CacheError("restore_dest %s holds base_dir %s: a restore deletes what the snapshot "
                             "lacks there, the cache with it; restore into a directory outside base_dir"
                             % (dest, desired.base_dir))
        check_writable(dest, "restore_dest", room=True)
        if info is not None:
            with Tree(dest) as target:
                if inode_flags(target.fd) & UNCHANGEABLE_FLAGS:
                    raise CacheError("restore_dest %s is immutable or append-only (lsattr -d %s); clear "
                                     "that with chattr -i -a if the restore is wanted. Nothing was "
                                     "changed." % (dest, dest))

    def restore_source(self, tree, cache, snapshot):
        """(path, is_file) of restore_path in snapshot, found beneath the snapshot (no link followed)."""
        wanted = self.desired.restore_path
        if wanted == "/":
            return snapshot.path, False
        relative = os.path.join(cache.relative(snapshot.path), wanted.lstrip("/"))
        try:
            found = tree.lstat(relative)
        except BeneathError:
            found = None
        if found is None:
            raise CacheError("restore_path %s is not in snapshot %s (or runs through a link there); give a path "
                             "the snapshot holds" % (wanted, snapshot.name))
        return os.path.join(snapshot.path, wanted.lstrip("/")), not stat.S_ISDIR(found.st_mode)


def run(runner, desired, check_mode, carried_out):
    """Read, plan and (unless check_mode) apply desired.state on its cache;
    returns a _plan.Result. Each operation carried out goes into carried_out
    as it is done, so that a failure can say how far the run got."""
    one = _Run(runner, desired, check_mode, carried_out)
    return {"present": one.backup, "absent": one.remove, "restored": one.restore}[desired.state]()
