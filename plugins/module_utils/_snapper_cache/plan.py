# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""snapper_cache's pure planners, and the states they read.

Each state has a planner from (Desired, the state read) to a list of
_plan.Operation; nothing here reads or changes the system. A backup's and a
restore's copy changes what only rsync knows: in check mode its dry run
stands for the copy (state.transfer), and the plan holds what the copy and
the steps after it would do; a real run plans up to the copy, copies, and
plans the steps after it with these same functions on what the copy did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .._cache.layout import HOLDER_NAME, META_NAME, PENDING_NAME, RECORDS_NAME, Cache, CacheError
from .._cache.snapper import config_settings
from .._common.plan import Operation
from .._common.rsync import TransferStats
from .._common.ssh import KNOWN_HOSTS_NAME, fingerprints

# base_dir's mode: the cache's setuid files and device nodes are root's alone.
BASE_MODE = 0o700

# --- the state each planner reads --------------------------------------------


@dataclass
class BackupState:
    cache: Cache
    versioning: str  # chosen by choose_versioning
    excludes: list
    stale_files: list = field(default_factory=list)  # temporary files of a killed run, names in base_dir
    snapper_settings: dict | None = None  # the config's values, when snapper manages the cache already
    transfer: TransferStats | None = None  # check mode: rsync's dry run, standing for the copy
    pinned_keys: tuple = ()  # a pull's host keys pinned in base_dir (_ssh.HostKey)
    base_access: tuple = (0, 0o700)  # base_dir's (owner uid, permission bits)
    stale_records: list = field(default_factory=list)  # records of snapshots that are gone, relative


@dataclass
class RemoveState:
    cache: Cache
    files: list = field(default_factory=list)  # .backup_meta and the module's own files present


@dataclass
class RestoreState:
    cache: Cache
    snapshot: object  # the _cache.Snapshot restored
    excludes: list
    dest_exists: bool
    source: str = ""  # restore_path in the snapshot
    source_is_file: bool = False
    listing: TransferStats | None = None  # rsync's dry run into restore_dest, when one was read
    transfer: TransferStats | None = None  # check mode: that dry run, standing for the copy
    recorded: bool = True  # the snapshot holds the record of what its backup left out


# --- decisions ---------------------------------------------------------------


def choose_versioning(desired, cache):
    """(versioning, warnings): what the cache is versioned with, or the refusal."""
    wanted = desired.versioning
    btrfs = cache.base_fstype == "btrfs"
    warnings = []
    if wanted == "auto":
        if btrfs:
            versioning = "snapper" if cache.snapper_installed else "btrfs"
        else:
            warnings.append("%s is on %s, not btrfs: the cache is a plain rsync copy with no versions"
                            % (desired.base_dir, cache.base_fstype))
            versioning = "none"
    elif wanted in ("snapper", "btrfs") and not btrfs:
        raise CacheError("versioning %s needs base_dir on btrfs, and %s is on %s; use "
                         "versioning: none, or put base_dir on a btrfs volume"
                         % (wanted, desired.base_dir, cache.base_fstype))
    elif wanted == "snapper" and not cache.snapper_installed:
        raise CacheError("versioning snapper needs snapper installed on this host; install "
                         "it, or use versioning: btrfs")
    else:
        versioning = wanted
    if versioning != "none" and cache.cache_exists and not cache.cache_is_subvolume:
        raise CacheError("%s is a plain directory, so it cannot be snapshotted; remove the "
                         "cache (state: absent) and back up again to convert it, or use "
                         "versioning: none" % cache.cache_dir)
    if versioning == "snapper" and cache.snapper_registered and not cache.snapper_manages_cache:
        raise CacheError("snapper config %r already manages %s, not %s; choose another "
                         "snapper_config" % (desired.snapper_config, cache.snapper_subvolume, cache.cache_dir))
    return versioning, warnings


def prune_list(snapshots, keep, adding):
    """The snapshots retention deletes, oldest first; with adding, one more is about to be taken."""
    keep -= 1 if adding else 0
    ordered = sorted(snapshots, key=lambda snap: snap.order)
    return ordered[:max(len(ordered) - keep, 0)]


def wants_snapshot(mode, versioning, changes, pending):
    if versioning == "none" or mode == "never":
        return False
    return mode == "always" or bool(changes) or pending


def pick_snapshot(cache, wanted):
    """The snapshot restore_snapshot names (latest, or by name), or the refusal."""
    snapshot = cache.snapshot_named(wanted)
    if snapshot is None:
        names = ", ".join(snap.name for snap in sorted(cache.snapshots, key=lambda s: s.order)) or "none"
        raise CacheError("snapshot %s is not in %s (snapshots: %s)" % (wanted, cache.base_dir, names))
    return snapshot


# --- texts of the copies, as planned (done=False) and as carried out ----------


def copy_text(stats, source, cache, done):
    if not stats.changes:
        return None
    return "%s %d changes from %s to %s (%d files, %d bytes%s)" % (
        "copied" if done else "copy", stats.changes, source, cache.cache_dir, stats.files_transferred,
        stats.bytes_transferred, ", %d deleted" % stats.files_deleted if stats.files_deleted else "")


def restore_operations(snapshot, dest, stats, done, path="/"):
    """What a copy of snapshot (its path) into dest changed (or, planned, changes)."""
    operations = []
    what = "snapshot " + snapshot.name if path == "/" else "%s of snapshot %s" % (path, snapshot.name)
    if stats.changes:
        operations.append(Operation("restore", "%s %s into %s (%d changes, %d bytes, %d deleted)" % (
            "restored" if done else "restore", what, dest, stats.changes, stats.bytes_transferred,
            stats.files_deleted)))
    if stats.files_deleted:
        # Done by the copy itself (rsync --delete): listed for the user, not a step of its own.
        operations.append(Operation("deleted_by_copy", "%s %d files in %s that snapshot %s lacks (%s%s)" % (
            "deleted" if done else "delete", stats.files_deleted, dest, snapshot.name,
            ", ".join(stats.deleted_paths[:5]), ", ..." if stats.files_deleted > 5 else "")))
    return operations


# --- the planners ------------------------------------------------------------


def _settings_text(keep):
    return " ".join("%s=%s" % item for item in sorted(config_settings(keep).items()))


def plan_layout(desired, state):
    """The leftovers of a killed run to remove, then what the layout lacks."""
    cache, versioning = state.cache, state.versioning
    operations = []
    for name in state.stale_files:
        path = os.path.join(cache.base_dir, name)
        operations.append(Operation("remove_stale", "remove %s left by an interrupted run" % path,
                                    {"name": name, "done": "removed %s left by an interrupted run" % path}))
    for relative in state.stale_records:
        path = os.path.join(cache.base_dir, relative)
        operations.append(Operation("remove_stale_record", "remove %s, the record of a snapshot that is gone" % path,
                                    {"relative": relative, "done": "removed %s, the record of a snapshot that is "
                                     "gone" % path}))
    for relative in cache.incomplete:
        path = os.path.join(cache.base_dir, relative)
        operations.append(Operation(
            "remove_incomplete", "remove the incomplete snapshot %s" % path,
            {"relative": relative, "done": "removed the incomplete snapshot %s left by an interrupted run" % path}))
    owner, mode = state.base_access
    if owner != 0 or mode != BASE_MODE:
        # A cache holds its source's setuid files and device nodes, and its snapshots keep old ones
        # (a sudo with a known hole): only root may reach them (rsnapshot's 0700 snapshot root).
        operations.append(Operation(
            "secure_base_dir", "make %s root's, mode 0700 (it is uid %d's, mode %04o), so that no other user "
            "reaches the cache's setuid files and device nodes" % (cache.base_dir, owner, mode),
            {"done": "made %s root's, mode 0700 (it was uid %d's, mode %04o)" % (cache.base_dir, owner, mode)}))
    remote = desired.remote
    if remote and set(state.pinned_keys) != set(remote.host_keys):
        operations.append(Operation("pin_host_keys", "pin the host keys of %s (%s) in %s" % (
            remote.host, ", ".join(fingerprints(remote.host_keys)), os.path.join(cache.base_dir, KNOWN_HOSTS_NAME))))
    if not cache.cache_exists:
        kind = "btrfs subvolume" if versioning != "none" else "directory"
        operations.append(Operation("create_cache", "create the %s %s" % (kind, cache.cache_dir)))
    settings = config_settings(desired.keep)
    set_config = Operation("set_config", "set snapper config %s: %s" % (
        desired.snapper_config, _settings_text(desired.keep)))
    if versioning == "snapper":
        if not cache.snapper_manages_cache:
            operations.append(Operation("create_config", "create snapper config %s for %s" % (
                desired.snapper_config, cache.cache_dir)))
            operations.append(set_config)
        elif any((state.snapper_settings or {}).get(key) != value for key, value in settings.items()):
            operations.append(set_config)
    elif versioning == "btrfs" and not cache.snapshots_dir_exists:
        operations.append(Operation("create_snapshots_dir", "create the btrfs subvolume %s" % cache.snapshots_dir))
    return operations


def plan_versions(desired, state, transfer):
    """After a copy that made transfer: the snapshot and .backup_meta."""
    cache, versioning = state.cache, state.versioning
    operations = []
    snapshotting = wants_snapshot(desired.snapshot, versioning, transfer.changes, cache.pending)
    if snapshotting:
        operations.append(Operation("snapshot", "take a %s snapshot of %s" % (versioning, cache.cache_dir)))
    if transfer.changes or cache.pending or snapshotting:
        operations.append(Operation("write_meta", "write %s" % cache.meta_path,
                                    {"done": "wrote %s" % cache.meta_path}))
    return operations


def plan_prune(desired, versioning, snapshots, adding):
    """Retention: every snapshot beyond keep, oldest first."""
    if versioning == "none":
        return []
    return [Operation("prune", "delete snapshot %s" % snap.name,
                      {"snapshot": snap, "done": "deleted snapshot %s" % snap.name})
            for snap in prune_list(snapshots, desired.keep, adding)]


def plan_backup(desired, state):
    """The whole backup when state.transfer says what the copy changes (check
    mode); else up to the copy, after which the applier plans the rest."""
    operations = plan_layout(desired, state)
    transfer = state.transfer
    if transfer is None:
        operations.append(Operation("copy", "copy %s to %s" % (desired.source_location, state.cache.cache_dir)))
        return operations
    text = copy_text(transfer, desired.source_location, state.cache, done=False)
    if text:
        operations.append(Operation("copy", text))
    versions = plan_versions(desired, state, transfer)
    adding = any(operation.action == "snapshot" for operation in versions)
    return operations + versions + plan_prune(desired, state.versioning, state.cache.snapshots, adding)


def plan_remove(desired, state):
    """Read-only snapshots first (rm -rf cannot remove them), then snapper's
    config while its subvolume still exists, then the subvolumes and files."""
    cache = state.cache
    operations = [Operation("delete_snapshot", "delete snapshot %s" % snap.name, {"snapshot": snap})
                  for snap in sorted(cache.snapshots, key=lambda s: s.order)]
    operations += [Operation("remove_incomplete", "delete the incomplete snapshot %s"
                             % os.path.join(cache.base_dir, relative), {"relative": relative})
                   for relative in cache.incomplete]
    if cache.snapper_manages_cache:
        operations.append(Operation("delete_config", "delete snapper config %s" % desired.snapper_config))
    if cache.snapshots_dir_exists:
        operations.append(Operation("delete_snapshots_dir", "delete %s" % cache.snapshots_dir))
    if cache.cache_exists:
        operations.append(Operation("delete_cache", "delete %s" % cache.cache_dir))
    for name in (META_NAME, HOLDER_NAME, PENDING_NAME, KNOWN_HOSTS_NAME, RECORDS_NAME):
        if name in state.files:
            operations.append(Operation("delete_file", "delete %s" % os.path.join(cache.base_dir, name),
                                        {"name": name}))
    return operations


def plan_restore(desired, state):
    """The restore of state.snapshot into restore_dest; refuses to delete what
    the snapshot lacks there unless restore_delete_extra."""
    dest, snapshot, listing = desired.dest_location, state.snapshot, state.listing
    if listing is not None and listing.files_deleted and not state.recorded:
        raise CacheError(
            "snapshot %s holds no record of what its backup left out (it was taken by an older release or "
            "another tool), so nothing proves that the %d files in restore_dest %s that it lacks (%s%s) were "
            "backed up at all, rather than left out; a restore of it deletes nothing. Restore into an empty "
            "or new directory, or take a new backup and restore that. Nothing was changed." % (
                snapshot.name, listing.files_deleted, dest, ", ".join(listing.deleted_paths[:5]),
                ", ..." if listing.files_deleted > 5 else ""))
    if listing is not None and listing.files_deleted and not desired.restore_delete_extra:
        raise CacheError(
            "restore_dest %s is not empty: restoring snapshot %s there would delete %d files that the "
            "snapshot lacks (%s%s). Set restore_delete_extra: true to delete them, or restore into an "
            "empty or new directory. Nothing was changed." % (
                dest, snapshot.name, listing.files_deleted, ", ".join(listing.deleted_paths[:5]),
                ", ..." if listing.files_deleted > 5 else ""))
    operations = [] if state.dest_exists else [Operation("create_dest", "create %s" % dest)]
    if state.transfer is None:
        what = "snapshot " + snapshot.name if desired.restore_path == "/" else "%s of snapshot %s" % (
            desired.restore_path, snapshot.name)
        return operations + [Operation("restore", "restore %s into %s" % (what, dest))]
    return operations + restore_operations(snapshot, dest, state.transfer, done=False, path=desired.restore_path)


# --- what the module returns -------------------------------------------------


def diff_view(view):
    return {"exists": view["exists"], "snapshots": [snap["name"] for snap in view["snapshots"]],
            "metadata": view["metadata"]}


def planned_view(view, operations):
    """The diff's after-state of a check-mode run: the before-state with the plan's operations on it."""
    after = diff_view(view)
    for operation in operations:
        if operation.action == "create_cache":
            after["exists"] = True
        elif operation.action == "delete_cache":
            after["exists"] = False
        elif operation.action == "snapshot":
            after["snapshots"].append("(new)")
        elif operation.action in ("prune", "delete_snapshot"):
            after["snapshots"].remove(operation.args["snapshot"].name)
        elif operation.action == "delete_file" and operation.args["name"] == META_NAME:
            after["metadata"] = None
    return after


def cache_values(cache, versioning, transfer=None, created=None, pruned=()):
    """The module's values: the cache as it is, then what this run did to it."""
    values = cache.view()
    values.update(versioning=versioning, snapshot_created=created,
                  snapshots_pruned=[snap.view() for snap in pruned],
                  transfer=transfer.view() if transfer else None)
    return values
