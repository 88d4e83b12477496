"""The backup volume and the ISO's target filesystem fill up mid-run (small
loop filesystems): a clear error, earlier data intact, no partial file under
a final name; once there is room again, the next run converges."""

from __future__ import annotations

import os
import random
import shutil

from conftest import loop_filesystem, make_small_tree, state_of, tree_digest, write_random
from module_run import run_module


def test_backup_volume_fills_up(sandbox):
    rng = random.Random("disk full")
    source = os.path.join(sandbox, "full-source")
    os.makedirs(os.path.join(source, "etc"))
    with open(os.path.join(source, "etc/os-release"), "w") as handle:
        handle.write("ID=debian\n")
    make_small_tree(source, 500, rng)
    write_random(os.path.join(source, "data/first"), 20 << 20, rng)
    with loop_filesystem(sandbox, "full-volume", 320 << 20, "btrfs") as base:
        params = {"base_dir": base, "source": source, "keep": 3, "snapper_config": "reliability-full",
                  "versioning": "snapper"}
        try:
            first = run_module(sandbox, "snapper_cache", params)
            assert not first.failed, first.msg
            snapshot = first.result["snapshots"][-1]["path"]
            kept = tree_digest(snapshot, skip={".snapshots"})
            with open(os.path.join(base, ".backup_meta")) as handle:
                meta = handle.read()
            old_files = {path: digest for path, digest in kept.items() if digest[0] == "file"}

            for index in range(3):
                write_random(os.path.join(source, "data/big%d" % index), 128 << 20, rng)
            outcome = run_module(sandbox, "snapper_cache", params)
            assert outcome.failed, "a backup larger than its volume succeeded"
            assert "No space left on device" in outcome.msg and base in outcome.msg, outcome.msg
            assert "free space" in outcome.msg, outcome.msg

            assert tree_digest(snapshot, skip={".snapshots"}) == kept, "the earlier snapshot changed"
            with open(os.path.join(base, ".backup_meta")) as handle:
                assert handle.read() == meta, ".backup_meta changed by a failed backup"
            new_files = {path: digest for path, digest in tree_digest(source).items() if digest[0] == "file"}
            cache = tree_digest(os.path.join(base, ".rootfs_cache"), skip={".snapshots"})
            for path, digest in cache.items():
                if digest[0] == "file":
                    assert digest in (new_files.get(path), old_files.get(path)), (
                        "%s in the cache is neither the old nor the new file: a partial file" % path)

            shutil.rmtree(os.path.join(source, "data"))
            write_random(os.path.join(source, "data/second"), 20 << 20, rng)
            again = run_module(sandbox, "snapper_cache", params)
            assert not again.failed, again.msg
            newest = again.result["snapshots"][-1]
            assert tree_digest(newest["path"], skip={".snapshots"}) == tree_digest(source)
            assert tree_digest(snapshot, skip={".snapshots"}) == kept
            assert not run_module(sandbox, "snapper_cache", params).result["changed"]
        finally:
            run_module(sandbox, "snapper_cache", dict(params, state="absent"))


def test_iso_target_fills_up(sandbox, debian_tree):
    rng = random.Random("iso full")
    work_dir = os.path.join(sandbox, "full-iso-work")
    os.makedirs(work_dir)
    with loop_filesystem(sandbox, "full-iso", 96 << 20, "ext4") as target:
        write_random(os.path.join(target, "earlier/data.bin"), 8 << 20, rng)
        before = state_of(target)
        kept = tree_digest(os.path.join(target, "earlier"))
        params = {"dest": os.path.join(target, "live.iso"), "source": "path", "source_path": debian_tree,
                  "compression": "lz4", "work_dir": work_dir}
        outcome = run_module(sandbox, "live_iso", params)
        assert outcome.failed, "an ISO larger than its filesystem was built"
        assert "not enough free space for the ISO in %s" % target in outcome.msg, outcome.msg
        assert "choose a dest on a larger filesystem" in outcome.msg, outcome.msg
        assert tree_digest(os.path.join(target, "earlier")) == kept
        assert state_of(target)["entries"] == before["entries"], "files left behind: %s" % os.listdir(target)
        assert not os.listdir(work_dir), "work files left behind"
