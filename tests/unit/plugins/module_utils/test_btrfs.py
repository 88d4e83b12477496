# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import os

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._common import btrfs as _btrfs

SHOW = """\
/mnt/b/.rootfs_cache/.snapshots/3/snapshot
\tName: \t\t\tsnapshot
\tUUID: \t\t\t0b8f1e4c-1111-2222-3333-444455556666
\tParent UUID: \t\t9c9c9c9c-1111-2222-3333-444455556666
\tReceived UUID: \t\t-
\tCreation time: \t\t2026-06-17 14:30:00 +0200
\tFlags: \t\t\treadonly
"""


class Runner:
    """Answers each argv with a fixed output and records it."""

    def __init__(self, out="", rc=0):
        self.out, self.rc, self.argvs = out, rc, []

    def run(self, argv, ok_rcs=(0,), data=None):
        self.argvs.append(argv)
        return self.rc, self.out


def test_parse_show_takes_the_first_of_each_key():
    fields = _btrfs.parse_show(SHOW)
    assert fields["UUID"] == "0b8f1e4c-1111-2222-3333-444455556666"
    assert fields["Creation time"] == "2026-06-17 14:30:00 +0200"
    assert fields["Flags"] == "readonly"


@pytest.mark.parametrize(("call", "argv"), [
    (lambda b: b.create_subvolume("/c"), ["btrfs", "subvolume", "create", "/c"]),
    (lambda b: b.snapshot("/c", "/s"), ["btrfs", "subvolume", "snapshot", "/c", "/s"]),
    (lambda b: b.snapshot("/c", "/s", read_only=True), ["btrfs", "subvolume", "snapshot", "-r", "/c", "/s"]),
    (lambda b: b.set_read_only("/s"), ["btrfs", "property", "set", "-ts", "/s", "ro", "true"]),
    (lambda b: b.set_read_only("/s", False), ["btrfs", "property", "set", "-ts", "/s", "ro", "false"]),
    (lambda b: b.show("/s"), ["btrfs", "subvolume", "show", "/s"]),
])
def test_btrfs_argv(call, argv):
    runner = Runner()
    call(_btrfs.Btrfs(runner))
    assert runner.argvs == [argv]


@pytest.mark.parametrize(("out", "read_only"), [("ro=true\n", True), ("ro=false\n", False), ("", False)])
def test_read_only(out, read_only):
    assert _btrfs.Btrfs(Runner(out)).read_only("/s") is read_only


def test_filesystem_type_and_uuid():
    runner = Runner("btrfs\n")
    assert _btrfs.filesystem_type(runner, "/b") == "btrfs"
    assert _btrfs.filesystem_uuid(Runner("\n"), "/b") is None
    assert runner.argvs == [["findmnt", "-n", "-o", "FSTYPE", "--target", "/b"]]


def test_is_subvolume_needs_a_directory_with_the_subvolume_inode(tmp_path):
    info = os.lstat(tmp_path)
    assert _btrfs.is_subvolume(info) is (info.st_ino == _btrfs.SUBVOLUME_INODE)
    assert not _btrfs.is_subvolume(os.stat_result((0o100644, _btrfs.SUBVOLUME_INODE) + (0,) * 8))
    assert _btrfs.is_subvolume(os.stat_result((0o040755, _btrfs.SUBVOLUME_INODE) + (0,) * 8))


def test_same_filesystem_by_device(tmp_path):
    (tmp_path / "a").mkdir()
    fd_a = os.open(tmp_path / "a", os.O_RDONLY)
    fd_b = os.open(tmp_path, os.O_RDONLY)
    try:
        assert _btrfs.same_filesystem(fd_a, fd_b)
    finally:
        os.close(fd_a)
        os.close(fd_b)


def test_destroy_subvolume_refuses_a_path():
    with pytest.raises(OSError, match="not one name"):
        _btrfs.destroy_subvolume(0, "a/b")
