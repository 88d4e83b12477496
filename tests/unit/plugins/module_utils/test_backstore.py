# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import json
import os

import pytest

from ansible_collections.liveclone.core.plugins.module_utils import _backstore as bs
from ansible_collections.liveclone.core.plugins.module_utils._command import (
    CommandError,
    CommandRunner,
)

MIB = bs.MIB
GIB = 1024 * MIB


@pytest.mark.parametrize("value, expected", [
    (256, 256 * MIB),
    ("256", 256 * MIB),
    (1.5, 2 * MIB),
    ("512M", 512 * MIB),
    ("512MB", 512 * MIB),
    ("2G", 2 * GIB),
    ("1.5GiB", 1536 * MIB),
    ("10MiB", 10 * MIB),
    ("1 G", GIB),
    ("1000K", MIB),          # rounded up to whole MiB
    ("3000000", 3000000 * MIB),
])
def test_parse_size(value, expected):
    assert bs.parse_size(value) == expected


@pytest.mark.parametrize("value", ["big", "12Q", "", "-5", 0, True, "0M"])
def test_parse_size_refuses(value):
    with pytest.raises(bs.BackstoreError, match="size"):
        bs.parse_size(value)


def params(**overrides):
    values = dict(path="/srv/store.img", state="present", size=None, layout="plain",
                  fstype=None, label=None, allocation="sparse", persistence_conf=None)
    values.update(overrides)
    return values


def desired(**overrides):
    return bs.Desired.from_params(params(**overrides))


def test_desired_defaults_per_layout(tmp_path):
    live = desired(path=str(tmp_path), layout="live-boot", size="1G")
    assert (live.path, live.fstype, live.label) == (str(tmp_path / "persistence"), "ext4", "persistence")
    assert live.persistence_conf == ["/ union"]
    rescue = desired(path=str(tmp_path), layout="sysrescue")
    assert (rescue.path, rescue.fstype, rescue.label) == (str(tmp_path / "sysrcd.bs"), "ext3", None)
    arch = desired(path=str(tmp_path), layout="archiso", label="COW")
    assert arch.path == str(tmp_path / "persistent_COW.img")
    explicit = desired(path=str(tmp_path / "x.img"), layout="casper", fstype="xfs", label="c")
    assert (explicit.path, explicit.fstype, explicit.label) == (str(tmp_path / "x.img"), "xfs", "c")


def test_relative_path_refused():
    with pytest.raises(bs.BackstoreError, match="relative"):
        desired(path="store.img")


def current(**overrides):
    values = dict(path="/srv/store.img", dir_fstype="ext4", dir_free=100 * GIB)
    values.update(overrides)
    return bs.Current(**values)


def existing(size=256 * MIB, fstype="ext4", **overrides):
    values = dict(exists=True, file_size=size, fs_size=size, fstype=fstype, label=None)
    values.update(overrides)
    return current(**values)


LOOP = [{"name": "/dev/loop7", "offset": 0, "sizelimit": 0}]

# (description, desired overrides, current state, expected actions)
PLANS = [
    ("create", dict(size="256"), current(), ["create"]),
    ("nothing to do", dict(size="256"), existing(), []),
    ("no size keeps an existing store", dict(), existing(), []),
    ("within tolerance", dict(size=256), existing(256 * MIB + 512 * 1024), []),
    ("grow offline", dict(size="512M"), existing(), ["extend_file", "grow_filesystem"]),
    ("grow attached, unmounted", dict(size="512M"), existing(loop_devices=LOOP),
     ["extend_file", "refresh_loop", "grow_filesystem"]),
    ("grow online", dict(size="512M"), existing(loop_devices=LOOP, mount_points=["/mnt/p"]),
     ["extend_file", "refresh_loop", "grow_filesystem"]),
    ("resume an interrupted grow", dict(size="512M"),
     existing(512 * MIB, fs_size=256 * MIB), ["grow_filesystem"]),
    ("resume without size", dict(), existing(512 * MIB, fs_size=256 * MIB), ["grow_filesystem"]),
    ("relabel", dict(size=256, label="new"), existing(), ["relabel"]),
    ("remove", dict(state="absent"), existing(), ["remove"]),
    ("absent already", dict(state="absent"), current(), []),
    ("stale temp file", dict(size=256),
     existing(stale_temp_files=["/srv/.store.img.liveclone-tmp-x"]), ["remove_stale"]),
    ("stale private mount", dict(size=256),
     existing(loop_devices=LOOP, mount_points=["/tmp/liveclone-backstore-abc"]), ["unmount_stale"]),
]


@pytest.mark.parametrize("description, overrides, state, expected", PLANS,
                         ids=[row[0] for row in PLANS])
def test_plan(description, overrides, state, expected):
    operations = bs.plan(desired(**overrides), state)
    assert [operation.action for operation in operations] == expected


# (description, desired overrides, current state, message fragment)
REFUSALS = [
    ("shrink", dict(size=128), existing(), "never shrunk"),
    ("create without size", dict(), current(), "no size was given"),
    ("no space to create", dict(size="2G"), current(dir_free=GIB), "not enough free space"),
    ("no space to grow", dict(size="2G"), existing(dir_free=GIB), "not enough free space"),
    ("FAT 4 GiB limit", dict(size="4G"), current(dir_fstype="vfat"), "FAT"),
    ("not a filesystem", dict(size=256), existing(fstype=None), "no filesystem signature"),
    ("wrong fstype", dict(size=256, fstype="xfs"), existing(fstype="ext4"), "set fstype: ext4"),
    ("not a regular file", dict(size=256), existing(is_regular=False), "not a regular file"),
    ("absent while attached", dict(state="absent"), existing(loop_devices=LOOP), "in use"),
    ("absent while mounted", dict(state="absent"),
     existing(loop_devices=LOOP, mount_points=["/mnt/p"]), "mounted on /mnt/p"),
    ("ext2 online", dict(size="512M", fstype="ext2"),
     existing(fstype="ext2", loop_devices=LOOP, mount_points=["/mnt/p"]), "ext2 cannot be grown"),
    ("ext4 online without CAP_SYS_RESOURCE", dict(size="512M"),
     existing(loop_devices=LOOP, mount_points=["/mnt/p"], can_resize_ext_online=False),
     "CAP_SYS_RESOURCE"),
    ("xfs relabel while mounted", dict(fstype="xfs", label="x"),
     existing(512 * MIB, fstype="xfs", loop_devices=LOOP, mount_points=["/mnt/p"]), "unmounted"),
    ("label too long", dict(size=256, label="a-label-far-too-long"), current(), "at most 16"),
    ("below the xfs minimum", dict(size=256, fstype="xfs"), current(), "xfs minimum"),
    ("below the btrfs minimum", dict(size=200, fstype="btrfs"), current(), "btrfs minimum"),
    ("missing directory", dict(size=256), current(dir_exists=False), "does not exist"),
    ("several loop devices", dict(size=256), existing(loop_devices=LOOP + [
        {"name": "/dev/loop8", "offset": 0, "sizelimit": 0}]), "several loop devices"),
    ("loop with offset", dict(size=256),
     existing(loop_devices=[{"name": "/dev/loop7", "offset": 512, "sizelimit": 0}]), "offset"),
]


@pytest.mark.parametrize("description, overrides, state, fragment", REFUSALS,
                         ids=[row[0] for row in REFUSALS])
def test_plan_refuses(description, overrides, state, fragment):
    with pytest.raises(bs.BackstoreError) as error:
        bs.plan(desired(**overrides), state)
    assert fragment in str(error.value)


def test_diff_of_a_grow():
    want = desired(size="512M")
    now = existing(label="old")
    operations = bs.plan(want, now)
    diff = bs.diff_view(want, now, operations)
    assert diff["before"] == {"state": "present", "size": 256 * MIB, "fstype": "ext4", "label": "old"}
    assert diff["after"] == {"state": "present", "size": 512 * MIB, "fstype": "ext4", "label": "old"}


def test_diff_of_a_create():
    want = desired(size="1G", layout="casper")
    diff = bs.diff_view(want, current(), bs.plan(want, current()))
    assert diff["before"] == {"state": "absent"}
    assert diff["after"] == {"state": "present", "size": GIB, "fstype": "ext4", "label": "casper-rw"}


def test_layout_tree_and_xfs_protofile(tmp_path):
    want = desired(layout="archiso", label="COW")
    bs.layout_tree(want, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "persistent_COW" / "x86_64")) == ["upperdir", "workdir"]
    assert bs.xfs_protofile(str(tmp_path)).splitlines() == [
        "/dev/null", "0 0", "d--755 0 0",
        " persistent_COW d--755 0 0",
        "  x86_64 d--755 0 0",
        "   upperdir d--755 0 0", "   $",
        "   workdir d--755 0 0", "   $",
        "  $", " $", "$",
    ]


def test_live_boot_conf(tmp_path):
    bs.layout_tree(desired(layout="live-boot", persistence_conf=["/home union", "/var"]), str(tmp_path))
    assert (tmp_path / "persistence.conf").read_text() == "/home union\n/var\n"


def test_read_mount_points(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "36 25 7:0 / /mnt/with\\040space rw,relatime shared:1 - ext4 /dev/loop0 rw\n"
        "37 25 7:1 / /mnt/other rw,relatime - xfs /dev/loop1 rw\n"
        "38 25 7:0 / /srv/again rw - ext4 /dev/loop0 rw\n")
    assert bs.read_mount_points("/dev/loop0", str(mountinfo)) == ["/mnt/with space", "/srv/again"]


def test_has_capability(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000001fffeffffff\n")
    assert bs.has_capability(21, str(status)) is True
    assert bs.has_capability(bs.CAP_SYS_RESOURCE, str(status)) is False


class FakeModule:
    """Answers run_command from a table of argv prefixes and records the calls."""

    def __init__(self, answers=None):
        self.answers = answers or []
        self.calls = []

    def get_bin_path(self, name, opt_dirs=None):
        return None if name == "missing-tool" else "/usr/sbin/" + name

    def run_command(self, argv, environ_update=None, data=None, check_rc=False):
        assert environ_update == {"LC_ALL": "C"}
        assert isinstance(argv, list)
        self.calls.append(argv)
        for prefix, answer in self.answers:
            if argv[:len(prefix)] == prefix:
                return answer
        return 0, "", ""


def test_runner_reports_failures_and_missing_tools():
    runner = CommandRunner(FakeModule([(["/usr/sbin/resize2fs"], (1, "", "bad magic"))]))
    with pytest.raises(CommandError, match="resize2fs /x exited with status 1: bad magic"):
        runner.run(["resize2fs", "/x"])
    with pytest.raises(CommandError, match="bindep.txt"):
        runner.run(["missing-tool"])


def test_reader_on_an_attached_ext4_store(tmp_path, monkeypatch):
    image = tmp_path / "persistence"
    image.write_bytes(b"\0" * 4096)
    inode = os.stat(image).st_ino
    losetup = {"loopdevices": [
        {"name": "/dev/loop3", "back-file": str(image) + " (deleted)", "back-ino": inode,
         "offset": 0, "sizelimit": 0},
        {"name": "/dev/loop4", "back-file": "/elsewhere", "back-ino": inode, "offset": 0, "sizelimit": 0},
    ]}
    module = FakeModule([
        (["/usr/sbin/findmnt"], (0, "vfat\n", "")),
        (["/usr/sbin/losetup"], (0, json.dumps(losetup), "")),
        (["/usr/sbin/blkid"], (0, "TYPE=ext4\nLABEL=persistence\nUUID=u-1\n", "")),
        (["/usr/sbin/dumpe2fs"], (0, "Block count:   65536\nBlock size:    4096\n", "")),
    ])
    monkeypatch.setattr(bs, "read_mount_points", lambda source: ["/run/live/p"])
    state = bs.BackstoreReader(CommandRunner(module)).read(str(image))
    assert (state.fstype, state.label, state.uuid, state.fs_size) == ("ext4", "persistence", "u-1", 256 * MIB)
    assert (state.loop_device, state.mount_point, state.dir_fstype) == ("/dev/loop3", "/run/live/p", "vfat")
    assert ["/usr/sbin/blkid", "-p", "-o", "export", "-s", "TYPE", "-s", "LABEL", "-s", "UUID",
            "/dev/loop3"] in module.calls


@pytest.mark.parametrize("fstype, output, expected", [
    ("xfs", "meta-data=x isize=512\ndata     =                       bsize=4096   blocks=85248, imaxpct=25\n",
     85248 * 4096),
    ("btrfs", "total_bytes\t\t419430400\ndev_item.total_bytes\t419430400\n", 419430400),
])
def test_filesystem_size(fstype, output, expected):
    reader = bs.BackstoreReader(CommandRunner(FakeModule([([], (0, output, ""))])))
    assert reader.filesystem_size(fstype, "/x.img") == expected


# (fstype, mounted, loop device, expected argv, minus the binary directory)
GROWS = [
    ("ext4", False, None, [["e2fsck", "-f", "-y", "/srv/store.img"], ["resize2fs", "/srv/store.img"]]),
    ("ext3", True, "/dev/loop7", [["losetup", "--set-capacity", "/dev/loop7"], ["resize2fs", "/dev/loop7"]]),
    ("xfs", True, "/dev/loop7", [["losetup", "--set-capacity", "/dev/loop7"], ["xfs_growfs", "/mnt/p"]]),
    ("btrfs", True, "/dev/loop7", [["losetup", "--set-capacity", "/dev/loop7"],
                                   ["btrfs", "filesystem", "resize", "max", "/mnt/p"]]),
]


@pytest.mark.parametrize("fstype, mounted, loop, expected", GROWS)
def test_grow_argv(tmp_path, fstype, mounted, loop, expected):
    module = FakeModule()
    runner = CommandRunner(module)
    size = 512 * MIB
    state = existing(size, fstype=fstype, fs_size=256 * MIB,
                     loop_devices=[dict(LOOP[0], name=loop)] if loop else [],
                     mount_points=["/mnt/p"] if mounted else [])
    want = desired(fstype=fstype)
    operations = [op for op in bs.plan(want, state) if op.action != "extend_file"]
    bs.BackstoreApplier(runner, str(tmp_path)).apply(want, state, operations)
    assert [[os.path.basename(call[0])] + call[1:] for call in module.calls] == expected


def test_create_is_atomic_and_cleans_up_on_failure(tmp_path):
    module = FakeModule([(["/usr/sbin/mkfs.ext4"], (1, "", "mkfs failed"))])
    want = desired(path=str(tmp_path / "store.img"), size=16)
    applier = bs.BackstoreApplier(CommandRunner(module), str(tmp_path))
    with pytest.raises(CommandError):
        applier.apply(want, current(path=want.path), bs.plan(want, current(path=want.path)))
    assert os.listdir(tmp_path) == []
    mkfs = module.calls[0]
    assert mkfs[:3] == ["/usr/sbin/mkfs.ext4", "-q", "-F"] and len(mkfs) == 4
    assert os.path.basename(mkfs[-1]).startswith(".store.img" + bs.TEMP_INFIX)


def test_a_store_seen_at_two_mount_points_grows_online_through_the_first():
    """live-boot bind-mounts /run/live under /usr/lib/live/mount: one filesystem, two paths."""
    now = existing(loop_devices=LOOP, can_resize_ext_online=True,
                   mount_points=["/run/live/persistence/loop1", "/usr/lib/live/mount/persistence/loop1"])
    operations = bs.plan(desired(size="512M"), now)
    assert [operation.action for operation in operations] == ["extend_file", "refresh_loop", "grow_filesystem"]
    assert operations[-1].text.endswith("online on /run/live/persistence/loop1")
