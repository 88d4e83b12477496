# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""snapper_cache's planners, driven with plain data: no runner, no disk."""

from __future__ import annotations

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._cache import layout as cm
from ansible_collections.liveclone.core.plugins.module_utils._cache.snapper import config_settings
from ansible_collections.liveclone.core.plugins.module_utils._common.rsync import TransferStats
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache import desired as desired_
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache import plan as cp

BASE = "/mnt/b"
CACHE = BASE + "/.rootfs_cache"


def desired(**overrides):
    values = dict(base_dir=BASE, source="/", state="present", snapper_config="cfg", versioning="auto", keep=2,
                  exclude=[], include_home=False, snapshot="on_change", checksum=False,
                  restore_snapshot="latest", restore_dest=None, restore_delete_extra=False,
                  allow_restore_to_root=False, lock_timeout=1)
    values.update(overrides)
    return desired_.Desired.from_params(values)


def snapshot(name, date, kind="snapper"):
    number = int(name) if kind == "snapper" else None
    relative = ".snapshots/%s/snapshot" % name if kind == "snapper" else ".snapshots/" + name
    return cm.Snapshot(name=name, number=number, kind=kind, date=date, description="", userdata={},
                       path="%s/%s" % (CACHE, relative), read_only=True)


def cache(**fields):
    values = dict(base_dir=BASE, base_exists=True, base_fstype="btrfs", snapper_installed=True)
    values.update(fields)
    return cm.Cache(**values)


def snapper_cache(snapshots=(), **fields):
    """A cache snapper manages, with the given snapshots."""
    return cache(cache_exists=True, cache_is_subvolume=True, snapshots_dir_exists=True,
                 snapper_subvolume=CACHE, snapshots=list(snapshots), **fields)


def texts(operations):
    return [str(operation) for operation in operations]


TWO = [snapshot("1", "2026-01-01 10:00:00"), snapshot("2", "2026-01-02 10:00:00")]
COPY = TransferStats(changes=3, files_transferred=2, bytes_transferred=100, files_deleted=1, total_size=4096)


# --- backup ------------------------------------------------------------------

def test_first_backup_in_check_mode_plans_the_layout_the_copy_and_its_snapshot():
    state = cp.BackupState(cache(), "snapper", [], transfer=COPY)
    operations = cp.plan_backup(desired(), state)
    assert texts(operations) == [
        "create the btrfs subvolume %s" % CACHE,
        "create snapper config cfg for %s" % CACHE,
        "set snapper config cfg: NUMBER_CLEANUP=yes NUMBER_LIMIT=2 NUMBER_LIMIT_IMPORTANT=2 NUMBER_MIN_AGE=0 "
        "TIMELINE_CREATE=no",
        "copy 3 changes from / to %s (2 files, 100 bytes, 1 deleted)" % CACHE,
        "take a snapper snapshot of %s" % CACHE,
        "write %s/.backup_meta" % BASE,
    ]
    assert cp.planned_view(state.cache.view(), operations) == {
        "exists": True, "snapshots": ["(new)"], "metadata": None}


def test_a_real_backup_plans_up_to_the_copy():
    state = cp.BackupState(snapper_cache(TWO), "snapper", [], snapper_settings=config_settings(2))
    assert [operation.action for operation in cp.plan_backup(desired(), state)] == ["copy"]


def test_a_backup_that_copies_nothing_plans_nothing():
    state = cp.BackupState(snapper_cache(TWO), "snapper", [], snapper_settings=config_settings(2),
                           transfer=TransferStats())
    assert cp.plan_backup(desired(), state) == []


def test_a_change_past_keep_prunes_the_oldest_for_the_new_snapshot():
    state = cp.BackupState(snapper_cache(TWO), "snapper", [], snapper_settings=config_settings(2), transfer=COPY)
    operations = cp.plan_backup(desired(), state)
    assert texts(operations)[1:] == ["take a snapper snapshot of %s" % CACHE, "write %s/.backup_meta" % BASE,
                                     "delete snapshot 1"]
    assert operations[-1].args["done"] == "deleted snapshot 1"
    assert cp.planned_view(state.cache.view(), operations)["snapshots"] == ["2", "(new)"]


def test_changed_snapper_settings_are_set_again():
    state = cp.BackupState(snapper_cache(TWO), "snapper", [], snapper_settings=config_settings(5),
                           transfer=TransferStats())
    assert [operation.action for operation in cp.plan_backup(desired(), state)] == ["set_config"]


def test_leftovers_of_a_killed_run_go_first_and_report_what_was_done():
    state = cp.BackupState(snapper_cache(TWO, incomplete=[".rootfs_cache/.snapshots/3"], pending=True),
                           "snapper", [], stale_files=[".backup_meta.x1"], snapper_settings=config_settings(2),
                           transfer=TransferStats())
    operations = cp.plan_backup(desired(), state)
    assert texts(operations) == [
        "remove %s/.backup_meta.x1 left by an interrupted run" % BASE,
        "remove the incomplete snapshot %s/.snapshots/3" % CACHE,
        # Copied before and not yet versioned: snapshotted now, though nothing changed.
        "take a snapper snapshot of %s" % CACHE,
        "write %s/.backup_meta" % BASE,
        "delete snapshot 1",
    ]
    assert [operation.args.get("done") for operation in operations[:2]] == [
        "removed %s/.backup_meta.x1 left by an interrupted run" % BASE,
        "removed the incomplete snapshot %s/.snapshots/3 left by an interrupted run" % CACHE]


@pytest.mark.parametrize("versioning, snapshots_dir, expected", [
    ("btrfs", False, ["create_snapshots_dir", "copy", "snapshot", "write_meta"]),
    ("btrfs", True, ["copy", "snapshot", "write_meta"]),
    ("none", False, ["copy", "write_meta"]),
])
def test_btrfs_and_plain_caches(versioning, snapshots_dir, expected):
    state = cp.BackupState(cache(cache_exists=True, cache_is_subvolume=versioning == "btrfs",
                                 snapshots_dir_exists=snapshots_dir), versioning, [], transfer=COPY)
    assert [operation.action for operation in cp.plan_backup(desired(), state)] == expected


def test_snapshot_never_and_always():
    state = cp.BackupState(snapper_cache(), "snapper", [], snapper_settings=config_settings(2),
                           transfer=TransferStats())
    assert cp.plan_backup(desired(snapshot="never"), state) == []
    assert [op.action for op in cp.plan_backup(desired(snapshot="always"), state)] == ["snapshot", "write_meta"]


def test_retention_after_the_snapshot_counts_it():
    three = TWO + [snapshot("3", "2026-01-03 10:00:00")]
    assert texts(cp.plan_prune(desired(), "snapper", three, adding=False)) == ["delete snapshot 1"]
    assert cp.plan_prune(desired(), "none", three, adding=False) == []


# --- removal -----------------------------------------------------------------

def test_removal_deletes_snapshots_then_the_config_then_the_layout():
    legacy = snapshot("@2025-01-01_10:00", "2025-01-01 10:00", "btrfs")
    state = cp.RemoveState(snapper_cache(TWO + [legacy], incomplete=[".rootfs_cache/.snapshots/3"],
                                         meta={"META_DISTRO": "x"}),
                           files=[".liveclone.lock", ".backup_meta"])
    operations = cp.plan_remove(desired(state="absent"), state)
    assert texts(operations) == [
        "delete snapshot @2025-01-01_10:00", "delete snapshot 1", "delete snapshot 2",
        "delete the incomplete snapshot %s/.snapshots/3" % CACHE,
        "delete snapper config cfg",
        "delete %s/.snapshots" % CACHE,
        "delete %s" % CACHE,
        "delete %s/.backup_meta" % BASE,
        "delete %s/.liveclone.lock" % BASE,
    ]
    assert cp.planned_view(state.cache.view(), operations) == {"exists": False, "snapshots": [], "metadata": None}


def test_removal_of_nothing_plans_nothing():
    assert cp.plan_remove(desired(state="absent"), cp.RemoveState(cache())) == []


# --- restore -----------------------------------------------------------------

def restore_state(**fields):
    values = dict(cache=snapper_cache(TWO), snapshot=TWO[1], excludes=["/.snapshots"], dest_exists=True)
    values.update(fields)
    return cp.RestoreState(**values)


def test_pick_snapshot_latest_or_by_name():
    assert cp.pick_snapshot(snapper_cache(TWO), "latest").name == "2"
    assert cp.pick_snapshot(snapper_cache(TWO), "1").name == "1"
    with pytest.raises(cm.CacheError, match=r"snapshot 9 is not in /mnt/b \(snapshots: 1, 2\)"):
        cp.pick_snapshot(snapper_cache(TWO), "9")


def test_restore_in_check_mode_plans_the_copy_and_what_it_deletes():
    listing = TransferStats(changes=4, bytes_transferred=10, files_deleted=2, deleted_paths=["a", "b/"])
    state = restore_state(dest_exists=False, listing=listing, transfer=listing)
    assert texts(cp.plan_restore(desired(state="restored", restore_dest="/srv/r", restore_delete_extra=True),
                                 state)) == [
        "create /srv/r",
        "restore snapshot 2 into /srv/r (4 changes, 10 bytes, 2 deleted)",
        "delete 2 files in /srv/r that snapshot 2 lacks (a, b/)",
    ]


def test_a_real_restore_plans_the_copy():
    state = restore_state(listing=TransferStats())
    operations = cp.plan_restore(desired(state="restored", restore_dest="/srv/r"), state)
    assert [operation.action for operation in operations] == ["restore"]


def test_restore_refuses_to_delete_what_the_snapshot_lacks():
    listing = TransferStats(changes=7, files_deleted=7, deleted_paths=list("abcdefg"))
    with pytest.raises(cm.CacheError, match=r"would delete 7 files that the snapshot lacks \(a, b, c, d, e, \.\.\.\)"):
        cp.plan_restore(desired(state="restored", restore_dest="/srv/r"), restore_state(listing=listing))


def test_a_snapshot_without_its_backups_record_is_never_restored_over_files_it_lacks():
    listing = TransferStats(changes=2, files_deleted=2, deleted_paths=["data/db", "data/"])
    wanted = desired(state="restored", restore_dest="/srv/r", restore_delete_extra=True)
    with pytest.raises(cm.CacheError, match=r"snapshot 2 holds no record of what its backup left out .*2 files in "
                                            r"restore_dest /srv/r that it lacks \(data/db, data/\)"):
        cp.plan_restore(wanted, restore_state(listing=listing, recorded=False))
    # With the record, restore_delete_extra deletes them; into an empty directory, no record is needed.
    assert cp.plan_restore(wanted, restore_state(listing=listing))
    assert cp.plan_restore(wanted, restore_state(listing=TransferStats(changes=3), recorded=False))


def test_restore_texts_when_done():
    stats = TransferStats(changes=1, files_deleted=1, deleted_paths=["x"])
    assert texts(cp.restore_operations(TWO[0], "/srv/r", stats, done=True)) == [
        "restored snapshot 1 into /srv/r (1 changes, 0 bytes, 1 deleted)",
        "deleted 1 files in /srv/r that snapshot 1 lacks (x)"]
