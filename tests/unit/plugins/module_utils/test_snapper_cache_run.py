# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""snapper_cache's entry point on a plain (not btrfs) cache in tmp_path, with
the real rsync: check mode returns the plan the real run carries out."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._cache import layout as cm
from ansible_collections.liveclone.core.plugins.module_utils._common.beneath import Tree
from ansible_collections.liveclone.core.plugins.module_utils._common.command import CommandError
from ansible_collections.liveclone.core.plugins.module_utils._common.plan import Operation
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache import desired as desired_
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache import run as sc
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache.apply import CacheApplier

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")


class PlainRunner:
    """findmnt says ext4, snapper is not installed, rsync runs for real."""

    def __init__(self):
        self.argvs = []

    def binary(self, name):
        raise CommandError("no %s" % name)

    def run_watched(self, argv, ok_rcs=(0,), stall_timeout=0, timeout=0, watched=()):
        return self.run(argv, ok_rcs)

    def run(self, argv, ok_rcs=(0,)):
        self.argvs.append(argv)
        if argv[0] == "findmnt":
            return 0, "ext4\n"
        done = subprocess.run(["rsync"] + argv[1:], capture_output=True, text=True, check=False)
        if done.returncode not in ok_rcs:
            raise CommandError("rsync exited with status %d: %s" % (done.returncode, done.stderr))
        return done.returncode, done.stdout


def desired(base, source, **overrides):
    values = dict(base_dir=str(base), source=str(source), state="present", snapper_config="cfg",
                  versioning="auto", keep=2, exclude=[], include_home=False, snapshot="on_change",
                  checksum=False, restore_snapshot="latest", restore_dest=None, restore_delete_extra=False,
                  allow_restore_to_root=False, lock_timeout=1)
    values.update(overrides)
    return desired_.Desired.from_params(values)


@pytest.fixture
def lab(tmp_path):
    source, base = tmp_path / "src", tmp_path / "base"
    (source / "etc").mkdir(parents=True)
    (source / "etc/os-release").write_text('NAME="Test Linux"\n')
    (source / "data").write_text("x" * 1000)
    base.mkdir()
    return source, base


def run(runner, wanted, check_mode, carried_out=None):
    return sc.run(runner, wanted, check_mode, [] if carried_out is None else carried_out)


def test_four_runs_on_a_plain_cache(lab):
    source, base = lab
    wanted = desired(base, source)
    base.chmod(0o755)
    check = run(PlainRunner(), wanted, True)
    cache_dir = "%s/.rootfs_cache" % base
    assert check.changed and not (base / ".rootfs_cache").exists()
    assert check.operations[0] == (
        "make %s root's, mode 0700 (it is uid 0's, mode 0755), so that no other user reaches the cache's setuid "
        "files and device nodes" % base)
    assert (base.stat().st_mode & 0o777) == 0o755, "check mode changed base_dir's mode"
    assert check.operations[1] == "create the directory %s" % cache_dir
    assert check.operations[2].startswith("copy ") and check.operations[3] == "write %s/.backup_meta" % base
    assert check.warnings == ["%s is on ext4, not btrfs: the cache is a plain rsync copy with no versions" % base]
    assert check.diff == {"before": {"exists": False, "snapshots": [], "metadata": None},
                          "after": {"exists": True, "snapshots": [], "metadata": None}}

    applied = run(PlainRunner(), wanted, False)
    assert [text.split(" ", 1)[0] for text in applied.operations] == ["made", "create", "copied", "wrote"]
    assert applied.operations[2].endswith(check.operations[2].split(" changes", 1)[1])
    assert (base.stat().st_mode & 0o777) == 0o700
    assert not (base / ".liveclone-records").exists(), "a plain cache has no snapshots to record"
    values = applied.module_result()
    assert values["exists"] and values["versioning"] == "none" and values["metadata"]["META_DISTRO"] == "Test Linux"
    assert values["transfer"]["files_transferred"] == check.values["transfer"]["files_transferred"] == 2
    assert (base / ".rootfs_cache/data").read_text() == "x" * 1000
    assert not (base / ".liveclone-pending").exists()

    again = run(PlainRunner(), wanted, False)
    assert (again.changed, again.operations, again.values["transfer"]["changes"]) == (False, [], 0)
    assert not run(PlainRunner(), wanted, True).changed


def test_a_killed_run_is_finished_by_the_next_and_check_mode_says_so(lab):
    source, base = lab
    wanted = desired(base, source)
    run(PlainRunner(), wanted, False)
    (base / ".liveclone-pending").write_text("")
    (base / "..backup_meta.0a1b2c3d").write_text("")
    check = run(PlainRunner(), wanted, True)
    assert check.operations == ["remove %s/..backup_meta.0a1b2c3d left by an interrupted run" % base,
                                "write %s/.backup_meta" % base]
    done = run(PlainRunner(), wanted, False)
    assert done.operations == ["removed %s/..backup_meta.0a1b2c3d left by an interrupted run" % base,
                               "wrote %s/.backup_meta" % base]
    assert not (base / "..backup_meta.0a1b2c3d").exists() and not (base / ".liveclone-pending").exists()


def test_removal_carries_out_its_check_mode_plan(lab):
    source, base = lab
    run(PlainRunner(), desired(base, source), False)
    wanted = desired(base, source, state="absent")
    check = run(PlainRunner(), wanted, True)
    done = run(PlainRunner(), wanted, False)
    assert check.operations == done.operations == [
        "delete %s/.rootfs_cache" % base, "delete %s/.backup_meta" % base]
    assert check.diff["after"] == done.diff["after"] == {"exists": False, "snapshots": [], "metadata": None}
    assert list(base.iterdir()) == []
    assert not run(PlainRunner(), wanted, False).changed


def test_a_failure_reports_what_was_carried_out(lab, monkeypatch):
    source, base = lab

    def failing(*args, **kwargs):
        raise cm.CacheError("the copy failed")

    monkeypatch.setattr(sc.CacheApplier, "_write_meta", failing)
    carried_out = []
    with pytest.raises(cm.CacheError, match="the copy failed"):
        run(PlainRunner(), desired(base, source), False, carried_out)
    assert [str(operation).split(" ", 1)[0] for operation in carried_out] == ["made", "create", "copied"]


def test_restore_needs_a_snapshot(lab, tmp_path):
    source, base = lab
    run(PlainRunner(), desired(base, source), False)
    with pytest.raises(cm.CacheError, match=r"snapshot latest is not in .* \(snapshots: none\)"):
        run(PlainRunner(), desired(base, source, state="restored", restore_dest=str(tmp_path / "r")), True)


def test_a_leftover_name_that_became_a_directory_stays(tmp_path):
    """The applier checks a leftover again right before it removes it: a
    directory of that name is not a file of ours and stays; a file goes."""
    (tmp_path / ".backup_meta.tmp1").mkdir()
    (tmp_path / ".backup_meta.tmp1" / "kept").write_text("x")
    (tmp_path / ".backup_meta.tmp2").write_text("left by a killed run")
    with Tree(str(tmp_path)) as tree:
        applier = CacheApplier(None, None, None, tree, None, [], [])
        for name in (".backup_meta.tmp1", ".backup_meta.tmp2"):
            applier._remove_stale(None, Operation("remove_stale", "remove %s" % name, {"name": name}))
    assert (tmp_path / ".backup_meta.tmp1" / "kept").read_text() == "x"
    assert not (tmp_path / ".backup_meta.tmp2").exists()
