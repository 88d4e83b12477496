# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._cache import layout as cm
from ansible_collections.liveclone.core.plugins.module_utils._cache import snapper as sn
from ansible_collections.liveclone.core.plugins.module_utils._common.command import CommandStalled, CommandTimeout
from ansible_collections.liveclone.core.plugins.module_utils._common.fs import canonical_path
from ansible_collections.liveclone.core.plugins.module_utils._common.lock import LockError
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache import apply as ca
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache import desired as desired_
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache import plan as cp
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache import run as sc


def snapshot(name, date, kind="snapper"):
    number = int(name) if kind == "snapper" else None
    return cm.Snapshot(name=name, number=number, kind=kind, date=date, description="", userdata={},
                       path="/x/" + name, read_only=True)


def params(**overrides):
    values = dict(base_dir="/mnt/test_backup", source="/", state="present",
                  snapper_config="distroclone-backup", versioning="auto", keep=3, exclude=[],
                  include_home=False, snapshot="on_change", checksum=False, restore_snapshot="latest",
                  restore_dest=None, restore_delete_extra=False, allow_restore_to_root=False, lock_timeout=1)
    values.update(overrides)
    return values


def desired(**overrides):
    return desired_.Desired.from_params(params(**overrides))


SNAPSHOTS = [
    snapshot("@2024-01-01_10:00", "2024-01-01 10:00", "btrfs"),
    snapshot("7", "2026-06-01 09:00:00"),
    snapshot("8", "2026-06-02 09:00:00"),
    snapshot("@2025-01-01_10:00", "2025-01-01 10:00", "btrfs"),
    snapshot("9", "2026-06-03 09:00:00"),
]


@pytest.mark.parametrize("keep, adding, expected", [
    (3, False, ["@2024-01-01_10:00", "@2025-01-01_10:00"]),
    (3, True, ["@2024-01-01_10:00", "@2025-01-01_10:00", "7"]),
    (10, True, []),
    (1, False, ["@2024-01-01_10:00", "@2025-01-01_10:00", "7", "8"]),
])
def test_prune_list_keeps_the_newest_of_both_kinds(keep, adding, expected):
    pruned = cp.prune_list(SNAPSHOTS, keep, adding)
    assert [snap.name for snap in pruned] == expected


@pytest.mark.parametrize("wanted, fstype, snapper, expected", [
    ("auto", "btrfs", True, "snapper"),
    ("auto", "btrfs", False, "btrfs"),
    ("auto", "ext4", True, "none"),
    ("none", "btrfs", True, "none"),
    ("btrfs", "btrfs", True, "btrfs"),
])
def test_versioning(wanted, fstype, snapper, expected):
    cache = cm.Cache(base_dir="/b", base_exists=True, base_fstype=fstype, snapper_installed=snapper)
    versioning, warnings = cp.choose_versioning(desired(versioning=wanted), cache)
    assert versioning == expected
    assert bool(warnings) == (wanted == "auto" and fstype != "btrfs")


@pytest.mark.parametrize("wanted, fstype, snapper, cache_is_dir, message", [
    ("snapper", "ext4", True, False, "needs base_dir on btrfs"),
    ("btrfs", "xfs", True, False, "needs base_dir on btrfs"),
    ("snapper", "btrfs", False, False, "needs snapper installed"),
    ("auto", "btrfs", True, True, "is a plain directory"),
])
def test_versioning_refusals(wanted, fstype, snapper, cache_is_dir, message):
    cache = cm.Cache(base_dir="/b", base_exists=True, base_fstype=fstype, snapper_installed=snapper,
                     cache_exists=cache_is_dir, cache_is_subvolume=False)
    with pytest.raises(cm.CacheError, match=message):
        cp.choose_versioning(desired(versioning=wanted), cache)


def test_versioning_refuses_a_snapper_config_of_another_subvolume():
    cache = cm.Cache(base_dir="/b", base_exists=True, base_fstype="btrfs", snapper_installed=True,
                     snapper_subvolume="/elsewhere")
    with pytest.raises(cm.CacheError, match="snapper config 'distroclone-backup' already manages /elsewhere"):
        cp.choose_versioning(desired(), cache)


@pytest.mark.parametrize("mode, changes, pending, expected", [
    ("on_change", 0, False, False),
    ("on_change", 3, False, True),
    ("on_change", 0, True, True),   # an earlier run copied and died before its snapshot
    ("always", 0, False, True),
    ("never", 5, True, False),
])
def test_wants_snapshot(mode, changes, pending, expected):
    assert cp.wants_snapshot(mode, "snapper", changes, pending) is expected
    assert cp.wants_snapshot(mode, "none", changes, pending) is False


def test_legacy_snapshots_of_one_minute_sort_by_counter():
    names = ["@2026-06-17_14:30_10", "@2026-06-17_14:30", "@2026-06-17_14:30_2"]
    snapshots = [snapshot(name, "2026-06-17 14:30", "btrfs") for name in names]
    assert [snap.name for snap in sorted(snapshots, key=lambda s: s.order)] == [
        "@2026-06-17_14:30", "@2026-06-17_14:30_2", "@2026-06-17_14:30_10"]


# What rsync_copy reads of a Desired: checksum and the time limits.
LIMITS = SimpleNamespace(checksum=False, io_timeout=300, copy_timeout=86400, remote=None)


class FakeRunner:
    def __init__(self, rc, out):
        self.rc, self.out = rc, out

    def run_watched(self, argv, ok_rcs=(0,), stall_timeout=0, timeout=0, watched=()):
        from ansible_collections.liveclone.core.plugins.module_utils._common.command import CommandError

        self.argv, self.limits = argv, (stall_timeout, timeout, watched)
        if self.rc not in ok_rcs:
            raise CommandError("rsync exited with status %d: some error" % self.rc)
        return self.rc, self.out


def test_rsync_exit_24_is_a_warning():
    warnings = []
    runner = FakeRunner(24, ">f+++++++++ a\nNumber of regular files transferred: 1\n")
    stats = ca.rsync_copy(runner, LIMITS, "/src", "/dst", [], warnings, dry_run=False, base_dir="/b")
    assert stats.files_transferred == 1
    assert warnings == ["some files vanished from /src while they were copied (rsync exit 24); "
                        "the backup is otherwise complete"]


@pytest.mark.parametrize("rc", [1, 11, 23, -9])
def test_other_rsync_failures_fail_before_any_snapshot(rc):
    with pytest.raises(cm.CacheError, match="the copy failed, so no snapshot was taken and .backup_meta"):
        ca.rsync_copy(FakeRunner(rc, ""), LIMITS, "/src", "/dst", [], [], dry_run=False, base_dir="/b")


def test_the_copy_runs_within_its_time_limits_and_says_which_struck():
    runner = FakeRunner(0, "")
    ca.rsync_copy(runner, LIMITS, "/src", "/dst", [], [], dry_run=False, base_dir="/b")
    assert runner.limits == (300, 86400, ("rsync",))
    assert "--one-file-system" not in runner.argv, "a backup crosses into nested subvolumes"

    class StalledRunner(FakeRunner):
        def run_watched(self, argv, ok_rcs=(0,), stall_timeout=0, timeout=0, watched=()):
            raise CommandStalled("rsync read nothing for %d seconds and was stopped" % stall_timeout)

    with pytest.raises(cm.CacheError, match=r"stalled: rsync read nothing for io_timeout \(300 s\).*no snapshot was "):
        ca.rsync_copy(StalledRunner(0, ""), LIMITS, "user@client:/", "/dst", [], [], dry_run=False, base_dir="/b")


def test_a_copy_past_copy_timeout_fails_saying_so():
    class SlowRunner(FakeRunner):
        def run_watched(self, argv, ok_rcs=(0,), stall_timeout=0, timeout=0, watched=()):
            raise CommandTimeout("rsync did not finish within %d seconds and was stopped" % timeout)

    with pytest.raises(cm.CacheError, match=r"did not finish within copy_timeout \(86400 s\).*restore_dest holds"):
        ca.rsync_copy(SlowRunner(0, ""), LIMITS, "/snap", "/dst", [], [], dry_run=False)


def test_a_restore_never_deletes_into_another_filesystem():
    runner = FakeRunner(0, "")
    ca.rsync_copy(runner, LIMITS, "/snap", "user@client:/", [], [], dry_run=False)
    assert "--one-file-system" in runner.argv


def test_a_failed_restore_copy_says_the_snapshot_is_unchanged():
    with pytest.raises(cm.CacheError, match="the snapshot is unchanged; restore_dest holds part of it"):
        ca.rsync_copy(FakeRunner(23, ""), LIMITS, "/snap", "/dst", [], [], dry_run=False)


# --- trust: parameters, values written into files, links in the layout ---------

BASE_PARAMS = dict(base_dir="/mnt/b", source="/", snapper_config="distroclone-backup", exclude=[],
                   restore_snapshot="latest", restore_dest=None, keep=3, lock_timeout=1)


@pytest.mark.parametrize("overrides, refusal", [
    ({}, None),
    ({"base_dir": "/mnt/b\n"}, "base_dir '/mnt/b\\n' holds a control character"),
    ({"source": "/\t"}, "source"),
    ({"restore_dest": "/srv/r\n"}, "restore_dest"),
    ({"base_dir": '/mnt/a"b'}, "snapper's config"),
    ({"base_dir": "/mnt/$HOME"}, "snapper's config"),
    ({"base_dir": "/mnt/`x`"}, "snapper's config"),
    ({"base_dir": "/mnt/a\\b"}, "snapper's config"),
    ({"base_dir": "/mnt/it's here"}, None),
    ({"snapper_config": "cfg\n"}, "not a snapper config name"),
    ({"snapper_config": "../etc"}, "not a snapper config name"),
    ({"exclude": ["/srv/*", "/x\n/y"]}, "exclude item"),
    ({"exclude": ["!"]}, "filter rule"),
    ({"exclude": ["+ /proc/***"]}, "filter rule"),
    ({"exclude": ["- /etc"]}, "filter rule"),
    ({"exclude": ["-foo", "+x", "!x"]}, None),
    ({"restore_snapshot": "latest\n"}, "not a snapshot name"),
    ({"restore_snapshot": "3"}, None),
    ({"restore_snapshot": "3\n"}, "not a snapshot name"),
    ({"restore_snapshot": "@2026-06-17_14:30_2"}, None),
    ({"restore_snapshot": "@2026-06-17_14:30\n"}, "not a snapshot name"),
    ({"restore_snapshot": "../3"}, "not a snapshot name"),
    ({"keep": True}, "keep is true, a boolean"),
    ({"lock_timeout": False}, "lock_timeout is false, a boolean"),
])
def test_check_cache_params(overrides, refusal):
    values = dict(BASE_PARAMS, **overrides)
    problem = desired_.check_cache_params(values, canonical_path(values["base_dir"]))
    if refusal is None:
        assert problem is None
    else:
        assert problem is not None and refusal in problem, problem


@pytest.mark.parametrize("keep, message", [(True, "a boolean"), (0, "keep is 0"), (-3, "keep is -3")])
def test_keep_must_be_a_number_of_one_or_more(keep, message):
    with pytest.raises(cm.CacheError, match=message):
        desired(keep=keep)


@pytest.mark.parametrize("lock_timeout, message", [(False, "a boolean"), (-1, "lock_timeout is -1")])
def test_lock_timeout_must_be_a_number_of_zero_or_more(lock_timeout, message):
    with pytest.raises(cm.CacheError, match=message):
        desired(lock_timeout=lock_timeout)


@pytest.mark.parametrize("raw, canonical", [
    ("//", "/"), ("/./", "/"), ("/../", "/"), ("/mnt/b/", "/mnt/b"), ("/mnt//b//.", "/mnt/b")])
def test_path_parameters_are_canonical(raw, canonical):
    chosen = desired(base_dir=raw, source=raw, restore_dest=raw)
    assert (chosen.base_dir, chosen.source, chosen.restore_dest) == (canonical,) * 3


def test_base_dir_root_forms_are_refused():
    with pytest.raises(cm.CacheError, match="base_dir / would put the cache over the root filesystem"):
        sc.check_base_path(desired(base_dir="//").base_dir)


@pytest.mark.parametrize("overrides, message", [
    ({}, "state restored needs restore_dest"),
    ({"restore_dest": "srv/r"}, "state restored needs restore_dest"),
    ({"restore_dest": "//"}, "restoring over / replaces the running system"),
])
def test_restore_dest_refusals(overrides, message):
    with pytest.raises(cm.CacheError, match=message):
        desired(state="restored", **overrides)


def test_desired_is_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        desired().keep = 5


def test_snapper_config_name_pattern_refuses_a_trailing_newline():
    assert sn.SNAPPER_CONFIG_NAME.match("cfg")
    assert not sn.SNAPPER_CONFIG_NAME.match("cfg\n")


@pytest.mark.parametrize("text, value", [
    ("Debian GNU/Linux", "Debian GNU/Linux"),
    ("a,b=c", "a b c"),
    ("x\ny\rz\x1b\u2028w", "x y z w"),
    ("", "unknown"),
    (",,,", "unknown"),
    ("x" * 500, "x" * sn.USERDATA_MAX),
])
def test_userdata_value(text, value):
    assert sn.userdata_value(text) == value


class RecordingRunner:
    def __init__(self, out=""):
        self.out, self.argv = out, None

    def run(self, argv, ok_rcs=(0,)):
        self.argv = argv
        return 0, self.out


def test_snapper_userdata_never_gains_keys():
    runner = RecordingRunner("7\n")
    number = sn.Snapper(runner, "cfg").create({"distro": "a,evil=1", "kernel": "6.1=x,y", "size_kb": "4"})
    userdata = runner.argv[runner.argv.index("--userdata") + 1]
    assert number == 7
    assert [pair.split("=")[0] for pair in userdata.split(",")] == ["distro", "kernel", "size_kb"]


class PlainRunner:
    """findmnt says ext4; snapper is not installed."""

    def binary(self, name):
        from ansible_collections.liveclone.core.plugins.module_utils._common.command import CommandError

        raise CommandError("no %s" % name)

    def run(self, argv, ok_rcs=(0,)):
        return 0, "ext4\n"


def read_cache(base):
    return cm.CacheReader(PlainRunner(), sn.Snapper(PlainRunner(), "cfg")).read(str(base))


def test_reader_never_takes_a_link_for_the_cache(tmp_path):
    (tmp_path / "victim").mkdir()
    base = tmp_path / "base"
    base.mkdir()
    (base / ".rootfs_cache").symlink_to(tmp_path / "victim")
    cache = read_cache(base)
    assert not cache.cache_exists and cache.cache_refused
    assert "is a symlink (to %s)" % (tmp_path / "victim") in cache.problems[0]


def test_reader_never_takes_a_link_for_the_snapshots(tmp_path):
    (tmp_path / "victim").mkdir()
    (tmp_path / "base/.rootfs_cache").mkdir(parents=True)
    (tmp_path / "base/.rootfs_cache/.snapshots").symlink_to(tmp_path / "victim")
    cache = read_cache(tmp_path / "base")
    assert cache.cache_exists and not cache.snapshots_dir_exists
    assert ".snapshots is a symlink" in cache.problems[0]


def test_reader_ignores_legacy_entries_that_are_no_subvolumes(tmp_path):
    snapshots = tmp_path / "base/.rootfs_cache/.snapshots"
    snapshots.mkdir(parents=True)
    (tmp_path / "victim").mkdir()
    (snapshots / "@2020-01-01_00:00").symlink_to(tmp_path / "victim")
    (snapshots / "@2020-01-02_00:00").mkdir()
    cache = read_cache(tmp_path / "base")
    assert cache.snapshots == [] and not cache.problems
    assert [text.split(" ")[1:4] for text in cache.ignored] == [
        ["is", "a", "symlink,"], ["is", "not", "a"]]


@pytest.mark.parametrize("kind, problem", [("dir", "is a directory, where the cache keeps its metadata file"),
                                           ("link", None), ("file", None)])
def test_reader_on_backup_meta(tmp_path, kind, problem):
    base = tmp_path / "base"
    base.mkdir()
    meta = base / ".backup_meta"
    if kind == "dir":
        meta.mkdir()
    elif kind == "link":
        (tmp_path / "elsewhere").write_text('META_DISTRO="secret"\n')
        meta.symlink_to(tmp_path / "elsewhere")
    else:
        meta.write_text('META_DISTRO="Debian"\n')
    cache = read_cache(base)
    if problem:
        assert problem in cache.problems[0]
    else:
        assert not cache.problems
        assert cache.meta == ({"META_DISTRO": "Debian"} if kind == "file" else None)


class ConfigListRunner:
    """snapper whose list-configs answers `listed`; records every argv."""

    def __init__(self, listed):
        self.listed, self.argvs = listed, []

    def run(self, argv, ok_rcs=(0,)):
        self.argvs.append(argv)
        if "list-configs" in argv:
            entries = ['{"config": "%s", "subvolume": "/x"}' % name for name in self.listed]
            return 0, '{"configs": [%s]}' % ",".join(entries)
        return 0, ""


def test_create_config_verified_in_the_list(tmp_path, monkeypatch):
    monkeypatch.setattr(sn, "SNAPPER_CONFIGS_LOCK", str(tmp_path / "configs.lock"))
    runner = ConfigListRunner(["other", "cfg"])
    sn.Snapper(runner, "cfg").create_config("/base/.rootfs_cache")
    assert runner.argvs[0][-4:] == ["create-config", "--fstype", "btrfs", "/base/.rootfs_cache"]


def test_create_config_lost_from_the_list_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sn, "SNAPPER_CONFIGS_LOCK", str(tmp_path / "configs.lock"))
    with pytest.raises(cm.CacheError, match="does not list it"):
        sn.Snapper(ConfigListRunner(["other"]), "cfg").create_config("/base/.rootfs_cache")


def test_config_changes_wait_for_the_lock(tmp_path, monkeypatch):
    import fcntl
    import os
    lock = tmp_path / "configs.lock"
    monkeypatch.setattr(sn, "SNAPPER_CONFIGS_LOCK", str(lock))
    monkeypatch.setattr(sn, "SNAPPER_CONFIGS_LOCK_TIMEOUT", 0.5)
    holder = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    runner = ConfigListRunner(["cfg"])
    try:
        with pytest.raises(LockError, match="another run has held"):
            sn.Snapper(runner, "cfg").delete_config()
    finally:
        os.close(holder)
    assert runner.argvs == []
    sn.Snapper(runner, "cfg").delete_config()
    assert runner.argvs == [["snapper", "--no-dbus", "-c", "cfg", "delete-config"]]
