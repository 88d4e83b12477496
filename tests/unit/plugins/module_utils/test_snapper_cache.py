# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import pytest

from ansible_collections.liveclone.core.plugins.module_utils import _snapper_cache as sc


@pytest.mark.parametrize("relative, patterns, expected", [
    ("/mnt/debian_backup", sc.STANDARD_EXCLUDES, True),
    ("/srv/backup", sc.STANDARD_EXCLUDES, False),
    ("/srv/backup", ["/srv/backup"], True),
    ("/srv/backup/inner", ["/srv/*"], True),
    ("/srv/backup", ["backup"], True),
    ("/srv/backupx", ["/srv/backup"], False),
    ("/var/tmp/x", sc.STANDARD_EXCLUDES, True),
])
def test_is_excluded(relative, patterns, expected):
    assert sc.is_excluded(relative, patterns) is expected


MOUNTINFO = """\
22 1 254:1 / / rw - ext4 /dev/vda rw
30 22 0:40 /@ /src rw - btrfs /dev/loop0 rw
31 30 0:40 /@home /src/home rw - btrfs /dev/loop0 rw
32 30 0:41 / /src/tmp rw - tmpfs t rw
33 30 8:17 / /src/boot/efi rw - vfat /dev/sdb1 rw
34 30 8:18 / /src/root rw - ext4 /dev/sdb2 rw
35 22 0:42 / /elsewhere rw - tmpfs t rw
36 30 0:43 / /src/with\\040space rw - tmpfs t rw
"""


@pytest.mark.parametrize("include_home, expected", [
    (False, ["/boot/efi/*", "/root/*", "/tmp/*", "/with space/*"]),
    (True, ["/boot/efi/*", "/tmp/*", "/with space/*"]),
])
def test_mount_excludes(tmp_path, include_home, expected):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    # /src/home is the same btrfs filesystem (0:40): a subvolume, so it is copied.
    assert sc.mount_excludes("/src", include_home, str(mountinfo)) == expected


def snapshot(name, date, kind="snapper"):
    number = int(name) if kind == "snapper" else None
    return sc.Snapshot(name=name, number=number, kind=kind, date=date, description="", userdata={},
                       path="/x/" + name, read_only=True)


def manager(**params):
    values = dict(base_dir="/mnt/test_backup", source="/", state="present",
                  snapper_config="distroclone-backup", versioning="auto", keep=3, exclude=[],
                  include_home=False, snapshot="on_change", checksum=False, restore_snapshot="latest",
                  restore_dest=None, allow_restore_to_root=False, lock_timeout=1)
    values.update(params)
    return sc.CacheManager(None, None, values)


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
    pruned = manager(keep=keep)._prune_list(SNAPSHOTS, adding)
    assert [snap.name for snap in pruned] == expected


@pytest.mark.parametrize("wanted, fstype, snapper, expected", [
    ("auto", "btrfs", True, "snapper"),
    ("auto", "btrfs", False, "btrfs"),
    ("auto", "ext4", True, "none"),
    ("none", "btrfs", True, "none"),
    ("btrfs", "btrfs", True, "btrfs"),
])
def test_versioning(wanted, fstype, snapper, expected):
    cache = sc.Cache(base_dir="/b", base_exists=True, base_fstype=fstype, snapper_installed=snapper)
    chooser = manager(versioning=wanted)
    assert chooser._versioning(cache) == expected
    assert bool(chooser.warnings) == (wanted == "auto" and fstype != "btrfs")


@pytest.mark.parametrize("wanted, fstype, snapper, cache_is_dir, message", [
    ("snapper", "ext4", True, False, "needs base_dir on btrfs"),
    ("btrfs", "xfs", True, False, "needs base_dir on btrfs"),
    ("snapper", "btrfs", False, False, "needs snapper installed"),
    ("auto", "btrfs", True, True, "is a plain directory"),
])
def test_versioning_refusals(wanted, fstype, snapper, cache_is_dir, message):
    cache = sc.Cache(base_dir="/b", base_exists=True, base_fstype=fstype, snapper_installed=snapper,
                     cache_exists=cache_is_dir, cache_is_subvolume=False)
    with pytest.raises(sc.CacheError, match=message):
        manager(versioning=wanted)._versioning(cache)


@pytest.mark.parametrize("mode, changes, pending, expected", [
    ("on_change", 0, False, False),
    ("on_change", 3, False, True),
    ("on_change", 0, True, True),   # an earlier run copied and died before its snapshot
    ("always", 0, False, True),
    ("never", 5, True, False),
])
def test_wants_snapshot(mode, changes, pending, expected):
    from ansible_collections.liveclone.core.plugins.module_utils._rsync import TransferStats

    stats = TransferStats(changes=changes)
    assert manager(snapshot=mode)._wants_snapshot("snapper", stats, pending) is expected
    assert manager(snapshot=mode)._wants_snapshot("none", stats, pending) is False


def test_default_base_dir(tmp_path):
    release = tmp_path / "os-release"
    release.write_text('PRETTY_NAME="Debian GNU/Linux 12"\nID=debian\n')
    assert sc.default_base_dir(str(release)) == "/mnt/debian_backup"


def test_legacy_snapshots_of_one_minute_sort_by_counter():
    names = ["@2026-06-17_14:30_10", "@2026-06-17_14:30", "@2026-06-17_14:30_2"]
    snapshots = [snapshot(name, "2026-06-17 14:30", "btrfs") for name in names]
    assert [snap.name for snap in sorted(snapshots, key=lambda s: s.order)] == [
        "@2026-06-17_14:30", "@2026-06-17_14:30_2", "@2026-06-17_14:30_10"]


class FakeRunner:
    def __init__(self, rc, out):
        self.rc, self.out = rc, out

    def run(self, argv, ok_rcs=(0,)):
        from ansible_collections.liveclone.core.plugins.module_utils._command import CommandError

        if self.rc not in ok_rcs:
            raise CommandError("rsync exited with status %d: some error" % self.rc)
        return self.rc, self.out


def test_rsync_exit_24_is_a_warning():
    copier = manager()
    copier.runner = FakeRunner(24, ">f+++++++++ a\nNumber of regular files transferred: 1\n")
    stats = copier._rsync("/src", "/dst", [], dry_run=False)
    assert stats.files_transferred == 1
    assert copier.warnings == ["some files vanished from /src while they were copied (rsync exit 24); "
                               "the backup is otherwise complete"]


@pytest.mark.parametrize("rc", [1, 11, 23, -9])
def test_other_rsync_failures_fail_before_any_snapshot(rc):
    copier = manager()
    copier.runner = FakeRunner(rc, "")
    with pytest.raises(sc.CacheError, match="the copy failed, so no snapshot was taken and .backup_meta"):
        copier._rsync("/src", "/dst", [], dry_run=False)
