"""SIGKILL at named moments of a backup, an ISO build and a backing-store
grow. After each, the next run converges, a further run changes nothing, and
nothing kept before the fault is lost or changed (checksums compared)."""

from __future__ import annotations

import glob
import os
import random

import pytest
from conftest import file_sha256, loop_filesystem, make_small_tree, run, tree_digest, write_random
from module_run import run_module

GIB = 1 << 30
SNAPSHOTS = "*/.snapshots/*/snapshot"


def killed_by_fault(outcome, during):
    assert outcome.killed, "the run was not killed (exit %s): %s" % (outcome.returncode, outcome.output[-2000:])
    assert outcome.marker and outcome.marker["fired"], "the fault never fired"
    if during:
        assert outcome.marker["tool_running"], "the tool had already exited: the fault missed its moment"


def converges(work, module, params):
    """The next run succeeds; the one after changes nothing. Returns the first's result."""
    first = run_module(work, module, params)
    assert not first.failed, "the run after the fault failed: %s" % first.msg
    second = run_module(work, module, params)
    assert not second.failed and not second.result["changed"], (
        "not converged: a second run changed %s" % second.result.get("operations"))
    return first.result


# --- backup ---------------------------------------------------------------

BACKUP_FAULTS = {
    "during rsync": {"on": "spawn", "tool": "rsync", "moment": "during", "without": ["--dry-run"],
                     "when_changes": "{base}/.rootfs_cache/data/big/.part*"},
    "between rsync and snapshot": {"on": "spawn", "tool": "snapper", "args": ["create"], "moment": "before"},
    "during snapshot": {"on": "spawn", "tool": "snapper", "args": ["create"], "moment": "during",
                        "when_changes": "{base}/.rootfs_cache/.snapshots/*"},
    # snapper exits a few milliseconds after the subvolume is gone, too soon
    # for a watcher on a busy machine: its removals of the snapshot's files and
    # directory, which come after, are slowed by 2 s each.
    "during retention": {"on": "spawn", "tool": "snapper", "args": ["delete"], "moment": "during",
                         "when_changes": "{base}/.rootfs_cache/.snapshots/*/snapshot",
                         "slow_syscalls": ["unlink", "unlinkat", "rmdir"], "slow_seconds": 2},
    "while writing the metadata": {"on": "fsync", "name": ".backup_meta"},
}


def snapshot_digest(path):
    # A snapshot of the cache holds .snapshots as an empty directory: snapper's own subvolume.
    return tree_digest(path, skip={".snapshots"})


def snapshots(base):
    """{snapper number: path} of the snapshots on disk."""
    found = glob.glob(os.path.join(base, ".rootfs_cache/.snapshots/*/snapshot"))
    return {int(path.split("/")[-2]): path for path in found}


@pytest.fixture(scope="module")
def backup_lab(sandbox):
    """A 2 GiB btrfs backup volume and a source: 3000 small files, 128 MiB in
    four large ones. First backup taken (snapshot 1); snapper keeps 2."""
    rng = random.Random("backup faults")
    source = os.path.join(sandbox, "backup-source")
    os.makedirs(os.path.join(source, "etc"))
    with open(os.path.join(source, "etc/os-release"), "w") as handle:
        handle.write('PRETTY_NAME="Reliability Linux"\nID=reliability\n')
    small = make_small_tree(source, 3000, rng)
    for index in range(4):
        write_random(os.path.join(source, "data/big/part%d" % index), 32 << 20, rng)
    with loop_filesystem(sandbox, "backup-volume", 2 * GIB, "btrfs") as base:
        params = {"base_dir": base, "source": source, "keep": 2, "snapper_config": "reliability-faults",
                  "versioning": "snapper", "lock_timeout": 5}
        first = run_module(sandbox, "snapper_cache", params)
        assert not first.failed, first.msg
        yield {"base": base, "source": source, "small": small, "params": params, "rng": rng,
               "kept": {number: snapshot_digest(path) for number, path in snapshots(base).items()}}
        run_module(sandbox, "snapper_cache", dict(params, state="absent"))


def change_source(lab):
    """1% of the small files and all of the large ones get new content."""
    rng = lab["rng"]
    for path in rng.sample(lab["small"], len(lab["small"]) // 100):
        write_random(path, rng.randint(1024, 8192), rng)
    for index in range(4):
        write_random(os.path.join(lab["source"], "data/big/part%d" % index), 32 << 20, rng)


@pytest.mark.parametrize("point", list(BACKUP_FAULTS))
def test_backup_survives_sigkill(sandbox, backup_lab, tally, point):
    lab, base = backup_lab, backup_lab["base"]
    change_source(lab)
    fault = dict(BACKUP_FAULTS[point])
    if "when_changes" in fault:
        fault["when_changes"] = fault["when_changes"].format(base=base)
    with open(os.path.join(base, ".backup_meta")) as handle:
        meta_before = handle.read()
    kept = lab["kept"]
    oldest = min(kept)

    outcome = run_module(sandbox, "snapper_cache", lab["params"], fault=fault)
    killed_by_fault(outcome, during=fault["moment"] == "during" if "moment" in fault else False)
    tally["faults injected"] += 1

    # Right after the fault: every snapshot kept is intact; only retention
    # may have taken the oldest, which the policy (keep 2) deletes anyway.
    on_disk = snapshots(base)
    for number, digest in kept.items():
        if number in on_disk:
            assert snapshot_digest(on_disk[number]) == digest, "snapshot %d changed by the fault" % number
        else:
            assert point == "during retention" and number == oldest, "snapshot %d lost" % number
    with open(os.path.join(base, ".backup_meta")) as handle:
        meta_now = handle.read()
    if point != "during retention":
        assert meta_now == meta_before, ".backup_meta changed although no backup completed"

    result = converges(sandbox, "snapper_cache", lab["params"])
    on_disk = snapshots(base)
    newest = max(on_disk)
    source_digest = tree_digest(lab["source"])
    assert snapshot_digest(on_disk[newest]) == source_digest, "the newest snapshot is not the source"
    assert tree_digest(os.path.join(base, ".rootfs_cache"), skip={".snapshots"}) == source_digest
    assert sorted(on_disk) == sorted(on_disk)[-2:] and len(on_disk) == 2, on_disk
    for number in on_disk:
        if number in kept:
            assert snapshot_digest(on_disk[number]) == kept[number], "snapshot %d changed" % number
    with open(os.path.join(base, ".backup_meta")) as handle:
        assert 'META_SNAPSHOT="%s"' % newest in handle.read()
    assert not os.path.exists(os.path.join(base, ".liveclone-pending"))
    assert not glob.glob(os.path.join(base, "..backup_meta.*")), "a temporary .backup_meta was left"
    assert result["snapshots"][-1]["name"] == str(newest)
    lab["kept"] = {number: snapshot_digest(path) for number, path in on_disk.items()}
    tally["faults survived"] += 1


# --- ISO build --------------------------------------------------------------

ISO_FAULTS = {
    # When the squashfs being written passes 16 MiB: lz4 on an idle machine
    # squashes the test tree in about a second, so a fixed delay can miss it.
    "during mksquashfs": {"on": "spawn", "tool": "mksquashfs", "moment": "during",
                          "when_larger": ["{work_dir}/.liveclone-iso-work-*/iso/live/filesystem.squashfs", 16 << 20]},
    "between squashfs and ISO": {"on": "spawn", "tool": "grub-mkrescue", "moment": "before"},
    "during grub-mkrescue, the ISO half written": {
        "on": "spawn", "tool": "grub-mkrescue", "moment": "during",
        "when_larger": ["{iso_dir}/.live.iso.tmp-*", 100 << 20]},
    "while writing the manifest": {"on": "fsync", "name": "live.iso.manifest.json"},
}


@pytest.fixture(scope="module")
def iso_lab(sandbox, debian_tree):
    """An ISO built from the Debian tree (lz4, for speed), to be kept safe."""
    iso_dir = os.path.join(sandbox, "iso")
    work_dir = os.path.join(sandbox, "iso-work")
    os.makedirs(iso_dir)
    os.makedirs(work_dir)
    params = {"dest": os.path.join(iso_dir, "live.iso"), "source": "path", "source_path": debian_tree,
              "compression": "lz4", "work_dir": work_dir, "hostname": "reliability"}
    first = run_module(sandbox, "live_iso", params)
    assert not first.failed, first.msg
    return {"params": params, "sha256": file_sha256(params["dest"]), "iso_dir": iso_dir, "work_dir": work_dir}


@pytest.mark.parametrize("point", list(ISO_FAULTS))
def test_iso_build_survives_sigkill(sandbox, iso_lab, tally, point):
    dest = iso_lab["params"]["dest"]
    # A new hostname: the ISO must be rebuilt.
    params = dict(iso_lab["params"], hostname="fault-%d" % list(ISO_FAULTS).index(point))
    fault = dict(ISO_FAULTS[point])
    if "when_larger" in fault:
        pattern, size = fault["when_larger"]
        fault["when_larger"] = [pattern.format(iso_dir=iso_lab["iso_dir"], work_dir=iso_lab["work_dir"]), size]
    outcome = run_module(sandbox, "live_iso", params, fault=fault)
    killed_by_fault(outcome, during=fault.get("moment") == "during")
    tally["faults injected"] += 1

    left_by_fault = file_sha256(dest)
    if point == "while writing the manifest":
        # The new ISO was complete and in place; its manifest was not.
        assert left_by_fault != iso_lab["sha256"]
    else:
        assert left_by_fault == iso_lab["sha256"], "the earlier ISO was changed by a killed build"

    result = converges(sandbox, "live_iso", params)
    assert file_sha256(dest) == result["sha256"]
    with open(dest + ".sha256") as handle:
        assert handle.read().split()[0] == result["sha256"]
    if point == "while writing the manifest":
        assert result["sha256"] == left_by_fault, "the rebuilt ISO differs from the complete one the fault left"
    leftovers = [name for name in os.listdir(iso_lab["iso_dir"]) if name.startswith(".")]
    leftovers += os.listdir(iso_lab["work_dir"])
    assert not leftovers, "left behind after convergence: %s" % leftovers
    iso_lab["sha256"] = result["sha256"]
    tally["faults survived"] += 1


# --- backing-store grow -------------------------------------------------------

# Offline only: growing a mounted ext4 needs CAP_SYS_RESOURCE, which root lacks
# on these machines (the e2e tier grows a mounted store inside a live VM).
GROW_FAULTS = {
    "the file extended, before the check": {"on": "spawn", "tool": "e2fsck", "moment": "before"},
    "before resize2fs": {"on": "spawn", "tool": "resize2fs", "moment": "before"},
    "during resize2fs, once it has written": {"on": "spawn", "tool": "resize2fs", "moment": "during",
                                              "when_modified": "{store}"},
}


@pytest.mark.parametrize("point", list(GROW_FAULTS))
def test_grow_survives_sigkill(sandbox, tally, point):
    rng = random.Random(point)
    work = os.path.join(sandbox, "grow-%d" % list(GROW_FAULTS).index(point))
    os.makedirs(work)
    store = os.path.join(work, "persistence")
    params = {"path": store, "size": "1G", "fstype": "ext4", "layout": "live-boot"}
    created = run_module(sandbox, "backstore", params)
    assert not created.failed, created.msg
    mount_point = os.path.join(work, "mnt")
    os.makedirs(mount_point)
    run(["mount", "-o", "loop", store, mount_point])
    try:
        write_random(os.path.join(mount_point, "data/stored"), 200 << 20, rng)
        stored = tree_digest(mount_point, skip={"lost+found"})
    finally:
        run(["umount", mount_point])
    fault = dict(GROW_FAULTS[point])
    if "when_modified" in fault:
        fault["when_modified"] = store

    outcome = run_module(sandbox, "backstore", dict(params, size="8G"), fault=fault)
    killed_by_fault(outcome, during=fault["moment"] == "during")
    tally["faults injected"] += 1

    result = converges(sandbox, "backstore", dict(params, size="8G"))
    assert result["size"] == 8 * GIB and result["fs_size"] == 8 * GIB, result
    run(["e2fsck", "-f", "-n", store])
    run(["mount", "-o", "loop", store, mount_point])
    try:
        assert int(run(["findmnt", "-n", "-b", "-o", "SIZE", mount_point]).stdout) > 7 * GIB
        assert tree_digest(mount_point, skip={"lost+found"}) == stored, "stored files changed"
    finally:
        run(["umount", mount_point])
    tally["faults survived"] += 1
