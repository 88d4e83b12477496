# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._backstore import apply as _store_apply
from ansible_collections.liveclone.core.plugins.module_utils._backstore import read as _store_reader
from ansible_collections.liveclone.core.plugins.module_utils._backstore.apply import (
    BackstoreApplier,
    layout_tree,
    xfs_protofile,
)
from ansible_collections.liveclone.core.plugins.module_utils._backstore.desired import (
    MIB,
    TEMP_INFIX,
    BackstoreError,
    Desired,
    check_persistence_line,
    name_inside,
    parse_size,
)
from ansible_collections.liveclone.core.plugins.module_utils._backstore.plan import diff_view, plan
from ansible_collections.liveclone.core.plugins.module_utils._backstore.read import (
    CAP_SYS_RESOURCE,
    BackstoreReader,
    Current,
    back_file_name,
    has_capability,
    read_mount_points,
)
from ansible_collections.liveclone.core.plugins.module_utils._backstore.run import run
from ansible_collections.liveclone.core.plugins.module_utils._common.beneath import BeneathError
from ansible_collections.liveclone.core.plugins.module_utils._common.command import (
    CommandError,
    CommandRunner,
)
from ansible_collections.liveclone.core.plugins.module_utils._common.plan import Operation

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
    assert parse_size(value) == expected


@pytest.mark.parametrize("value, words", [
    ("big", "not understood"), ("12Q", "not understood"), ("", "not understood"), ("-5", "not understood"),
    (0, "greater than zero"), (-1, "greater than zero"), (-0.5, "greater than zero"), ("0M", "greater than zero"),
    (True, "boolean"), (False, "boolean"),
    (float("inf"), "not a finite number"), (float("-inf"), "not a finite number"),
    (float("nan"), "not a finite number"), ("inf", "not understood"), (".inf", "not understood"),
    ("nan", "not understood"), ("1e400", "not understood"), ("9" * 400 + "G", "not understood"),
    (1e300, "larger than any file"), ("9" * 30, "larger than any file"), (2 ** 63, "larger than any file"),
    ("256\n512", "not understood"),
])
def test_parse_size_refuses(value, words):
    with pytest.raises(BackstoreError, match="size") as error:
        parse_size(value)
    assert words in str(error.value)
    assert "give a number of MiB" in str(error.value) or "choose a smaller size" in str(error.value)


def params(**overrides):
    values = dict(path="/srv/store.img", state="present", size=None, layout="plain",
                  fstype=None, label=None, allocation="sparse", persistence_conf=None)
    values.update(overrides)
    return values


def desired(**overrides):
    return Desired.from_params(params(**overrides))


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
    with pytest.raises(BackstoreError, match="relative"):
        desired(path="store.img")


@pytest.mark.parametrize("path", ["/", "//", "///", "/./", "//.", "/tmp/..", "/tmp/../..", "//tmp/..//"])
def test_the_root_in_any_spelling_is_refused(path):
    with pytest.raises(BackstoreError, match="root directory of this host; give the path of an image"):
        desired(path=path, size=256)


@pytest.mark.parametrize("path, canonical", [
    ("//liveclone-x.img", "/liveclone-x.img"),
    ("/srv//store.img", "/srv/store.img"),
    ("/srv/./store.img", "/srv/store.img"),
    ("/srv/store.img/", "/srv/store.img"),
    ("/srv/x/../store.img", "/srv/store.img"),
])
def test_paths_are_canonical_before_any_rule(path, canonical):
    assert desired(path=path).path == canonical


def test_a_directory_with_a_trailing_slash_gets_the_layout_name(tmp_path):
    assert desired(path=str(tmp_path) + "//", layout="casper").path == str(tmp_path / "casper-rw")


@pytest.mark.parametrize("path", ["/srv/store\n.img", "/srv/a\tb.img", "/srv/x\x7f.img", "/srv/store.img\n"])
def test_control_characters_in_path_are_refused(path):
    with pytest.raises(BackstoreError, match="control character"):
        desired(path=path)


def test_an_image_name_that_is_a_link_is_refused_when_path_is_its_directory(tmp_path):
    (tmp_path / "persistence").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BackstoreError, match="runs through the symlink .*persistence"):
        desired(path=str(tmp_path), layout="live-boot")


# (fstype, label, accepted)
LABELS = [
    ("ext4", "a" * 16, True), ("ext4", "a" * 17, False), ("ext2", "b" * 17, False), ("ext3", "c" * 16, True),
    ("xfs", "x" * 12, True), ("xfs", "x" * 13, False), ("btrfs", "b" * 254, True), ("btrfs", "b" * 255, False),
    ("ext4", "persistence", True), ("ext4", "casper-rw", True), ("ext4", "COW_1.2", True),
    ("ext4", "lab\n", False), ("ext4", "lab\nel", False), ("ext4", 'lab"el', False), ("ext4", "lab'el", False),
    ("ext4", "persist\u00e4nce", False), ("ext4", "\u00c4" * 8, False), ("ext4", "..", False),
    ("ext4", "/", False), ("ext4", "x/../../esc", False), ("ext4", "../esc", False), ("ext4", "a b", False),
    ("ext4", "", False), ("ext4", "-x", False), ("ext4", "x\x00", False), ("ext4", "x$(id)", False),
]


@pytest.mark.parametrize("fstype, label, accepted", LABELS)
def test_labels_by_filesystem_bytes_and_characters(fstype, label, accepted):
    if accepted:
        assert desired(fstype=fstype, label=label).label == label
    else:
        with pytest.raises(BackstoreError, match="label"):
            desired(fstype=fstype, label=label)


def test_an_archiso_label_cannot_climb_out_of_path(tmp_path):
    with pytest.raises(BackstoreError, match="label"):
        desired(path=str(tmp_path), layout="archiso", label="x/../../esc")
    with pytest.raises(BackstoreError, match="directly inside"):
        name_inside(str(tmp_path), "persistent_x/../../esc.img", "image file name")
    with pytest.raises(BackstoreError, match="directly inside"):
        name_inside(str(tmp_path), "..", "image file name")


# (line, what the refusal says, or None when accepted)
PERSISTENCE_LINES = [
    ("/ union", None), ("/home", None), ("/home union", None), ("/home bind", None),
    ("/home/user1 link,source=config-files/user1", None), ("/media source=.", None),
    ("/usr union,source=usr", None), ("# a comment", None), ("/var/lib/apt-cache bind", None),
    ("/home union\n/etc bind", "control character"), ("/ union\n", "control character"),
    ("/home\tunion", "control character"), ("/home\runion", "control character"),
    ("", "is empty"), ("   ", "is empty"),
    ("home union", "is relative; live-boot needs an absolute path such as /home"),
    ("/home/../etc", "write it as /etc"), ("/home/./x", "write it as /home/x"), ("/home/", "write it as /home"),
    ("//home", "write it as /home"),
    ("/live", "keeps for itself"), ("/live/image union", "keeps for itself"),
    ("/home unionfs", "knows only union, bind, link and source=PATH"),
    ("/home union,", "knows only union"), ("/home bind,union", "exclude each other"),
    ("/home source=/abs", "is absolute; give it relative"), ("/home source=../up", "'.' or '..'"),
    ("/home source=a,source=b", "more than once"), ("/home union bind", "more than a directory"),
    ("/home$(reboot) union", "may hold only"), ("/h\u00f6me", "may hold only"), ('/home"', "may hold only"),
]


@pytest.mark.parametrize("line, words", PERSISTENCE_LINES)
def test_persistence_conf_lines(line, words):
    problem = check_persistence_line(line)
    if words is None:
        assert problem is None
    else:
        assert problem is not None and words in problem, problem
        assert problem.startswith("persistence_conf item %r" % line)
        with pytest.raises(BackstoreError, match="persistence_conf"):
            desired(layout="live-boot", persistence_conf=["/ union", line])


def current(**overrides):
    values = dict(path="/srv/store.img", dir_fstype="ext4", dir_free=100 * GIB)
    values.update(overrides)
    return Current(**values)


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
    ("read-only, nothing to do", dict(size=256), existing(dir_read_only=True), []),
    ("immutable, nothing to do", dict(size=256), existing(attributes=frozenset({"immutable"})), []),
    ("immutable directory, grow", dict(size="512M"), existing(dir_attributes=frozenset({"immutable"})),
     ["extend_file", "grow_filesystem"]),
    ("no free inodes, grow", dict(size="512M"), existing(dir_free_inodes=0), ["extend_file", "grow_filesystem"]),
]


@pytest.mark.parametrize("description, overrides, state, expected", PLANS,
                         ids=[row[0] for row in PLANS])
def test_plan(description, overrides, state, expected):
    operations = plan(desired(**overrides), state)
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
    ("label too long", dict(size=256, label="a-label-far-too-long"), current(), "longer than the 16 bytes"),
    ("below the xfs minimum", dict(size=256, fstype="xfs"), current(), "xfs minimum"),
    ("below the btrfs minimum", dict(size=200, fstype="btrfs"), current(), "btrfs minimum"),
    ("missing directory", dict(size=256), current(dir_exists=False), "does not exist"),
    ("several loop devices", dict(size=256), existing(loop_devices=LOOP + [
        {"name": "/dev/loop8", "offset": 0, "sizelimit": 0}]), "several loop devices"),
    ("loop with offset", dict(size=256),
     existing(loop_devices=[{"name": "/dev/loop7", "offset": 512, "sizelimit": 0}]), "losetup -d /dev/loop7"),
    ("a filesystem this module does not manage", dict(size=256), existing(fstype="vfat"),
     "this module manages only ext2, ext3, ext4, xfs, btrfs stores"),
    ("read-only, create", dict(size=256), current(dir_read_only=True), "read-only filesystem"),
    ("read-only, grow", dict(size="512M"), existing(dir_read_only=True), "remount it read-write"),
    ("read-only, remove", dict(state="absent"), existing(dir_read_only=True), "read-only filesystem"),
    ("read-only, stale temp file", dict(size=256),
     existing(dir_read_only=True, stale_temp_files=["/srv/.store.img.liveclone-tmp-x"]), "read-only"),
    ("immutable image, grow", dict(size="512M"), existing(attributes=frozenset({"immutable"})),
     "cannot be grown or relabelled; clear it with chattr -i -a /srv/store.img"),
    ("immutable image, remove", dict(state="absent"), existing(attributes=frozenset({"immutable"})),
     "cannot be removed"),
    ("append-only image, relabel", dict(label="new"), existing(attributes=frozenset({"append-only"})),
     "append-only attribute"),
    ("immutable directory, create", dict(size=256), current(dir_attributes=frozenset({"immutable"})),
     "lsattr -d"),
    ("append-only directory, remove", dict(state="absent"), existing(dir_attributes=frozenset({"append-only"})),
     "no file can be made or removed in it"),
    ("no free inodes", dict(size=256), current(dir_free_inodes=0), "no free inodes (df -i)"),
    ("a link at the image", dict(size=256), existing(is_regular=False, link_target="/canary"),
     "symlink (to /canary); it is never followed"),
    ("a link at the image, absent", dict(state="absent"), existing(is_regular=False, link_target="/x"),
     "never followed"),
    ("a directory at the image", dict(size=256), existing(is_regular=False), "not a regular file"),
]


def test_the_advice_is_what_the_module_accepts():
    with pytest.raises(BackstoreError) as error:
        plan(desired(size=256), existing(fstype="vfat"))
    assert "set fstype" not in str(error.value)
    with pytest.raises(BackstoreError, match="set fstype: btrfs"):
        plan(desired(size=256), existing(fstype="btrfs"))


@pytest.mark.parametrize("description, overrides, state, fragment", REFUSALS,
                         ids=[row[0] for row in REFUSALS])
def test_plan_refuses(description, overrides, state, fragment):
    with pytest.raises(BackstoreError) as error:
        plan(desired(**overrides), state)
    assert fragment in str(error.value)


def test_diff_of_a_grow():
    want = desired(size="512M")
    now = existing(label="old")
    operations = plan(want, now)
    diff = diff_view(want, now, operations)
    assert diff["before"] == {"state": "present", "size": 256 * MIB, "fstype": "ext4", "label": "old"}
    assert diff["after"] == {"state": "present", "size": 512 * MIB, "fstype": "ext4", "label": "old"}


def test_diff_of_a_create():
    want = desired(size="1G", layout="casper")
    diff = diff_view(want, current(), plan(want, current()))
    assert diff["before"] == {"state": "absent"}
    assert diff["after"] == {"state": "present", "size": GIB, "fstype": "ext4", "label": "casper-rw"}


# More plan branches, on plain data: (description, desired overrides, current state, expected actions)
MORE_PLANS = [
    ("no label asked keeps the store's label", dict(size=256), existing(label="old"), []),
    ("the same label is kept", dict(size=256, label="same"), existing(label="same"), []),
    ("ext2 attached but not mounted grows offline", dict(size="512M", fstype="ext2"),
     existing(fstype="ext2", loop_devices=LOOP), ["extend_file", "refresh_loop", "grow_filesystem"]),
    ("xfs relabel unmounted", dict(fstype="xfs", label="x"), existing(512 * MIB, fstype="xfs"), ["relabel"]),
    ("btrfs relabel while mounted", dict(fstype="btrfs", label="x"),
     existing(512 * MIB, fstype="btrfs", loop_devices=LOOP, mount_points=["/mnt/p"]), ["relabel"]),
    ("a file grown, its filesystem within tolerance", dict(size="512M"),
     existing(256 * MIB, fs_size=512 * MIB - 512 * 1024), ["extend_file"]),
    ("the space check counts only what the grow adds", dict(size="512M"), existing(dir_free=300 * MIB),
     ["extend_file", "grow_filesystem"]),
    ("btrfs counts no inodes", dict(size=256, fstype="btrfs"), current(dir_free_inodes=None), ["create"]),
    ("leftovers first, then the rest", dict(size="512M"),
     existing(loop_devices=LOOP, mount_points=["/tmp/liveclone-backstore-abc"],
              stale_temp_files=["/srv/.store.img.liveclone-tmp-x"]),
     ["unmount_stale", "remove_stale", "extend_file", "refresh_loop", "grow_filesystem"]),
    ("read-only, only a leftover mount to undo", dict(size=256),
     existing(dir_read_only=True, loop_devices=LOOP, mount_points=["/tmp/liveclone-backstore-abc"]),
     ["unmount_stale"]),
    ("immutable image, a stale temp file", dict(size=256),
     existing(attributes=frozenset({"immutable"}), stale_temp_files=["/srv/.store.img.liveclone-tmp-x"]),
     ["remove_stale"]),
    ("absent, leftovers of an interrupted create", dict(state="absent"),
     current(stale_temp_files=["/srv/.store.img.liveclone-tmp-x"]), ["remove_stale"]),
]


@pytest.mark.parametrize("description, overrides, state, expected", MORE_PLANS,
                         ids=[row[0] for row in MORE_PLANS])
def test_more_plans(description, overrides, state, expected):
    assert [operation.action for operation in plan(desired(**overrides), state)] == expected


MORE_REFUSALS = [
    ("below the ext4 minimum", dict(size=4), current(), "size 4 MiB is below the ext4 minimum of 8 MiB; "
     "choose at least 8M"),
    ("FAT 4 GiB limit on grow", dict(size="4G"), existing(dir_fstype="msdos"), "cannot hold a file of 4 GiB"),
    ("shrink names the size to keep", dict(size=256), existing(512 * MIB),
     "/srv/store.img is 512 MiB and size asks for 256 MiB; backing stores are never shrunk. Keep size at 512M"),
    ("no space to grow by the difference", dict(size="1G"), existing(dir_free=512 * MIB),
     "768 MiB needed, 512 MiB free in /srv"),
]


@pytest.mark.parametrize("description, overrides, state, fragment", MORE_REFUSALS,
                         ids=[row[0] for row in MORE_REFUSALS])
def test_more_refusals(description, overrides, state, fragment):
    with pytest.raises(BackstoreError) as error:
        plan(desired(**overrides), state)
    assert fragment in str(error.value)


@pytest.mark.parametrize("mount_point, named", [("/srv", "/srv"), (None, "/srv")])
def test_a_read_only_refusal_names_the_mount_point_read(mount_point, named):
    with pytest.raises(BackstoreError) as error:
        plan(desired(size=256), current(dir_read_only=True, dir_mount_point=mount_point))
    assert "(mounted on %s); remount it read-write (mount -o remount,rw %s)" % (named, named) in str(error.value)
    with pytest.raises(BackstoreError, match=r"mounted on /mnt/usb\); remount .* remount,rw /mnt/usb\)"):
        plan(desired(size=256), current(dir_read_only=True, dir_mount_point="/mnt/usb"))


def test_operation_texts():
    """The texts are the module's `operations` result: the other tiers match them."""
    assert [str(op) for op in plan(desired(size="1G", layout="casper"), current())] == [
        "create /srv/store.img: 1 GiB ext4, label 'casper-rw', sparse, layout casper"]
    now = existing(loop_devices=LOOP, mount_points=["/tmp/liveclone-backstore-abc", "/mnt/p"], label="old",
                   stale_temp_files=["/srv/.store.img.liveclone-tmp-x"])
    assert [str(op) for op in plan(desired(size="768M", allocation="full", label="new"), now)] == [
        "unmount /tmp/liveclone-backstore-abc left by an interrupted run",
        "remove /srv/.store.img.liveclone-tmp-x left by an interrupted create",
        "extend /srv/store.img from 256 MiB to 768 MiB (full)",
        "refresh the capacity of /dev/loop7",
        "grow the ext4 filesystem from 256 MiB to 768 MiB online on /mnt/p",
        "relabel /srv/store.img from 'old' to 'new'",
    ]
    assert [str(op) for op in plan(desired(), existing(512 * MIB, fs_size=256 * MIB))] == [
        "grow the ext4 filesystem from 256 MiB to 512 MiB offline"]
    assert [str(op) for op in plan(desired(state="absent"), existing())] == ["remove /srv/store.img"]
    assert plan(desired(size="768M"), now)[2].args == {"size": 768 * MIB}


def test_diff_of_a_remove_and_a_relabel():
    diff = diff_view(desired(state="absent"), existing(), [Operation("remove", "remove /srv/store.img")])
    assert (diff["before"]["state"], diff["after"]) == ("present", {"state": "absent"})
    assert diff["before_header"] == diff["after_header"] == "/srv/store.img"
    want = desired(label="new")
    now = existing(label="old")
    assert diff_view(want, now, plan(want, now))["after"] == {
        "state": "present", "size": 256 * MIB, "fstype": "ext4", "label": "new"}
    assert diff_view(want, existing(label="new"), [])["after"]["label"] == "new"


def test_check_mode_returns_the_plan_and_changes_nothing(tmp_path):
    module = FakeModule([(["/usr/sbin/findmnt"], (0, "ext4\n", ""))])
    want = desired(path=str(tmp_path / "store.img"), size=16, layout="live-boot")
    result = run(CommandRunner(module), want, True, str(tmp_path))
    assert result.changed and result.operations == [
        "create %s: 16 MiB ext4, label 'persistence', sparse, layout live-boot" % want.path]
    assert result.diff["after"] == {"state": "present", "size": 16 * MIB, "fstype": "ext4", "label": "persistence"}
    assert result.values["exists"] is False and result.values["path"] == want.path
    assert set(result.module_result()) == {
        "path", "layout", "exists", "size", "fs_size", "fstype", "label", "uuid", "loop_device", "mount_point",
        "changed", "operations", "diff"}
    assert os.listdir(tmp_path) == []
    assert [os.path.basename(call[0]) for call in module.calls] == ["findmnt"]


def test_layout_tree_and_xfs_protofile(tmp_path):
    want = desired(layout="archiso", label="COW")
    layout_tree(want, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "persistent_COW" / "x86_64")) == ["upperdir", "workdir"]
    assert xfs_protofile(str(tmp_path)).splitlines() == [
        "/dev/null", "0 0", "d--755 0 0",
        " persistent_COW d--755 0 0",
        "  x86_64 d--755 0 0",
        "   upperdir d--755 0 0", "   $",
        "   workdir d--755 0 0", "   $",
        "  $", " $", "$",
    ]


def test_live_boot_conf(tmp_path):
    layout_tree(desired(layout="live-boot", persistence_conf=["/home union", "/var"]), str(tmp_path))
    assert (tmp_path / "persistence.conf").read_text() == "/home union\n/var\n"


def test_layout_tree_replaces_a_planted_link_and_leaves_its_target(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("keep\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "persistence.conf").symlink_to(canary)
    layout_tree(desired(layout="live-boot"), str(root))
    assert canary.read_text() == "keep\n"
    assert not (root / "persistence.conf").is_symlink()
    assert (root / "persistence.conf").read_text() == "/ union\n"


def test_layout_tree_never_makes_the_cow_tree_through_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "persistent_COW").symlink_to(elsewhere)
    with pytest.raises(BeneathError, match="symlink"):
        layout_tree(desired(layout="archiso", label="COW"), str(root))
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("plant", ["link to a file", "link to a directory", "fifo"])
def test_xfs_protofile_refuses_what_is_not_a_file_or_directory(tmp_path, plant):
    target = tmp_path / "target"
    target.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "persistence.conf").write_text("/ union\n")
    if plant == "fifo":
        os.mkfifo(root / "planted")
    else:
        (root / "planted").symlink_to(target if "directory" in plant else root / "persistence.conf")
    with pytest.raises(BeneathError, match="planted"):
        xfs_protofile(str(root))


def test_xfs_protofile_refuses_names_it_cannot_carry(tmp_path):
    (tmp_path / "a b").write_text("")
    with pytest.raises(BeneathError, match="blank"):
        xfs_protofile(str(tmp_path))


def test_read_mount_points(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "36 25 7:0 / /mnt/with\\040space rw,relatime shared:1 - ext4 /dev/loop0 rw\n"
        "37 25 7:1 / /mnt/other rw,relatime - xfs /dev/loop1 rw\n"
        "38 25 7:0 / /srv/again rw - ext4 /dev/loop0 rw\n")
    assert read_mount_points("/dev/loop0", str(mountinfo)) == ["/mnt/with space", "/srv/again"]


def test_has_capability(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000001fffeffffff\n")
    assert has_capability(21, str(status)) is True
    assert has_capability(CAP_SYS_RESOURCE, str(status)) is False


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
    monkeypatch.setattr(_store_reader, "read_mount_points", lambda source: ["/run/live/p"])
    state = BackstoreReader(CommandRunner(module)).read(str(image))
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
    reader = BackstoreReader(CommandRunner(FakeModule([([], (0, output, ""))])))
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
    operations = [op for op in plan(want, state) if op.action != "extend_file"]
    BackstoreApplier(runner, str(tmp_path)).apply(want, state, operations)
    assert [[os.path.basename(call[0])] + call[1:] for call in module.calls] == expected


def test_create_is_atomic_and_cleans_up_on_failure(tmp_path):
    module = FakeModule([(["/usr/sbin/mkfs.ext4"], (1, "", "mkfs failed"))])
    want = desired(path=str(tmp_path / "store.img"), size=16)
    applier = BackstoreApplier(CommandRunner(module), str(tmp_path))
    with pytest.raises(CommandError):
        applier.apply(want, current(path=want.path), plan(want, current(path=want.path)))
    assert os.listdir(tmp_path) == []
    mkfs = module.calls[0]
    assert mkfs[:3] == ["/usr/sbin/mkfs.ext4", "-q", "-F"] and len(mkfs) == 4
    assert os.path.basename(mkfs[-1]).startswith(".store.img" + TEMP_INFIX)


def test_a_store_seen_at_two_mount_points_grows_online_through_the_first():
    """live-boot bind-mounts /run/live under /usr/lib/live/mount: one filesystem, two paths."""
    now = existing(loop_devices=LOOP, can_resize_ext_online=True,
                   mount_points=["/run/live/persistence/loop1", "/usr/lib/live/mount/persistence/loop1"])
    operations = plan(desired(size="512M"), now)
    assert [operation.action for operation in operations] == ["extend_file", "refresh_loop", "grow_filesystem"]
    assert operations[-1].text.endswith("online on /run/live/persistence/loop1")


def losetup_answer(*loops):
    return FakeModule([(["/usr/sbin/losetup"], (0, json.dumps({"loopdevices": list(loops)}), ""))])


def loop(name, back_file, info, device=None):
    entry = {"name": name, "back-file": back_file, "back-ino": info.st_ino, "offset": 0, "sizelimit": 0}
    if device is not None:
        entry["back-maj:min"] = device
    return entry


@pytest.mark.parametrize("file_name", ["store (deleted).img", "store.img (deleted)", "a (deleted) b (deleted)"])
def test_a_store_named_with_deleted_is_seen_attached(tmp_path, file_name):
    image = tmp_path / file_name
    image.write_bytes(b"")
    info = os.stat(image)
    device = "  %d:%d " % (os.major(info.st_dev), os.minor(info.st_dev))
    other = "%d:%d" % (os.major(info.st_dev) + 1, os.minor(info.st_dev))
    reader = BackstoreReader(CommandRunner(losetup_answer(
        loop("/dev/loop1", str(image), info, device),
        loop("/dev/loop2", str(image), info, other),  # the same inode number on another filesystem
    )))
    assert [found["name"] for found in reader.loop_devices(str(image))] == ["/dev/loop1"]


@pytest.mark.parametrize("back_file, attached", [
    ("{image}", True),
    ("{image} (deleted)", True),  # the same inode, reached by a name that is gone
    ("{stem}.img", False),  # the name with " (deleted)" taken out of its middle
])
def test_loop_devices_by_name_where_losetup_gives_no_device(tmp_path, back_file, attached):
    image = tmp_path / "store (deleted).img"
    image.write_bytes(b"")
    info = os.stat(image)
    back = back_file.format(image=image, stem=tmp_path / "store")
    reader = BackstoreReader(CommandRunner(losetup_answer(loop("/dev/loop1", back, info))))
    assert bool(reader.loop_devices(str(image))) is attached


@pytest.mark.parametrize("name, expected", [
    ("/x/a.img (deleted)", "/x/a.img"), ("/x/a (deleted).img", "/x/a (deleted).img"),
    ("/x/a (deleted).img (deleted)", "/x/a (deleted).img"), ("", ""), (None, ""),
])
def test_back_file_name_strips_only_the_trailing_mark(name, expected):
    assert back_file_name(name) == expected


def test_reader_names_the_mount_point_of_a_read_only_directory(tmp_path, monkeypatch):
    from ansible_collections.liveclone.core.plugins.module_utils._common.fs import mount_of

    module = FakeModule([(["/usr/sbin/findmnt"], (0, "ext4\n", ""))])
    reader = BackstoreReader(CommandRunner(module))
    assert reader.read(str(tmp_path / "store.img")).dir_mount_point is None
    monkeypatch.setattr(_store_reader, "free_space", lambda fd: SimpleNamespace(
        free_bytes=GIB, free_inodes=10, read_only=True))
    state = reader.read(str(tmp_path / "store.img"))
    assert state.dir_read_only and state.dir_mount_point == mount_of(str(tmp_path)).point


def test_reader_never_follows_links_in_the_image_directory(tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "file").write_text("keep\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "store.img").symlink_to(canary / "file")
    (work / ".store.img.liveclone-tmp-link").symlink_to(canary / "file")
    (work / ".store.img.liveclone-tmp-dir").mkdir()
    (work / ".store.img.liveclone-tmp-real").write_bytes(b"")
    module = FakeModule([(["/usr/sbin/findmnt"], (0, "ext4\n", ""))])
    state = BackstoreReader(CommandRunner(module)).read(str(work / "store.img"))
    assert state.exists and state.link_target == str(canary / "file") and not state.is_regular
    assert state.stale_temp_files == [str(work / ".store.img.liveclone-tmp-real")]
    assert not any("losetup" in call[0] or "blkid" in call[0] for call in module.calls)
    want = dataclasses.replace(desired(path=str(work / "x.img")), path=str(work / "store.img"), state="absent")
    with pytest.raises(BackstoreError, match="never followed"):
        plan(want, state)


def test_applier_refuses_a_store_replaced_since_it_was_read(tmp_path):
    image = tmp_path / "store.img"
    image.write_bytes(b"")
    want = desired(path=str(image), state="absent")
    now = existing(path=str(image), identity=(1, 2))
    with pytest.raises(BackstoreError, match="no longer the file that was read"):
        BackstoreApplier(CommandRunner(FakeModule()), str(tmp_path)).apply(
            want, now, [Operation("remove", "remove")])
    assert image.exists()


def test_a_missing_directory_and_a_file_in_its_place(tmp_path):
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(BackstoreError, match="is not a directory"):
        run(CommandRunner(FakeModule()), desired(path=str(tmp_path / "file.txt/store.img"), size=16),
            True, str(tmp_path))
    with pytest.raises(BackstoreError, match="is not a directory"):
        run(CommandRunner(FakeModule()), desired(path=str(tmp_path / "file.txt/sub/store.img"), size=16),
            True, str(tmp_path))
    with pytest.raises(BackstoreError, match="does not exist; create it"):
        run(CommandRunner(FakeModule()), desired(path=str(tmp_path / "missing/store.img"), size=16),
            True, str(tmp_path))


def test_an_os_error_half_way_names_the_full_path_and_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC while the image is written (the filesystem filled meanwhile):
    the error names the path in full, and the temporary image is gone."""
    from ansible_collections.liveclone.core.plugins.module_utils._common.fs import describe_os_error

    def full(handle, start, end):
        raise OSError(28, "No space left on device", ".store.img" + TEMP_INFIX + "x")

    monkeypatch.setattr(_store_apply, "_write_zeros", full)
    module = FakeModule([(["/usr/sbin/findmnt"], (0, "ext4\n", ""))])
    with pytest.raises(OSError) as error:
        run(CommandRunner(module), desired(path=str(tmp_path / "store.img"), size=16, allocation="full"),
            False, str(tmp_path))
    assert error.value.filename == str(tmp_path / (".store.img" + TEMP_INFIX + "x"))
    message = describe_os_error(error.value, "backstore:")
    assert message.startswith("backstore: %s/.store.img" % tmp_path)
    assert ": No space left on device; the filesystem is full" in message
    assert os.listdir(tmp_path) == []
