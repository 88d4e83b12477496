"""Hostile inputs for backstore: links planted where the module looks (the
image path, its temporary names, a lock file, its mount points), `//`-style
paths (run chrooted in a throwaway root), labels and persistence.conf lines
that would escape their place, sizes that are no numbers, and filesystems
that are read-only, immutable, full or out of inodes. Every case runs in
hostile_case: the canary outside the target must be unchanged, and where the
module refuses, the target directory too (files, mounts, loop devices)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import subprocess

import pytest
from conftest import hostile_case, run, state_of, tree_digest
from module_run import run_module

MIB = 1024 * 1024


def expand(value, **places):
    if isinstance(value, str):
        for key, path in places.items():
            value = value.replace("{%s}" % key, path)
        return value
    if isinstance(value, list):
        return [expand(item, **places) for item in value]
    if isinstance(value, dict):
        return {key: expand(item, **places) for key, item in value.items()}
    return value


def assert_refused(outcome, pattern):
    assert outcome.result is not None, "no result: %s" % outcome.output[-2000:]
    assert outcome.failed, "accepted: %s" % outcome.result.get("operations")
    assert re.search(pattern, outcome.msg), "the message does not say %r: %s" % (pattern, outcome.msg)
    assert "Traceback" not in outcome.output, outcome.output[-2000:]


def assert_done(outcome):
    assert outcome.result is not None, "no result: %s" % outcome.output[-2000:]
    assert not outcome.failed, outcome.msg
    assert "Traceback" not in outcome.output
    return outcome.result


def refused_in_check_mode_and_for_real(sandbox, params, pattern, target, root=None):
    """The module refuses params in check mode and for real, and target (the
    directory it would work in) is left exactly as it was."""
    before = state_of(target)
    for check in (True, False):
        outcome = run_module(sandbox, "backstore", params, check=check, root=root)
        assert_refused(outcome, pattern)
        assert state_of(target) == before, "the refused run (check=%s) changed %s" % (check, target)


@pytest.fixture(scope="module")
def lab(sandbox):
    """The directory of this file's cases, and a victim store that planted links point at."""
    root = os.path.join(sandbox, "hostile-backstore")
    victim_dir = os.path.join(root, "victim")
    os.makedirs(victim_dir)
    victim = os.path.join(victim_dir, "victim.img")
    assert_done(run_module(sandbox, "backstore", {"path": victim, "size": 16, "label": "victim"}))
    return {"root": root, "victim_dir": victim_dir, "victim": victim}


@pytest.fixture
def work(lab, request):
    """A fresh directory for one case."""
    path = os.path.join(lab["root"], "case-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12])
    os.makedirs(path)
    return path


def plant(work, links, places):
    for relative, target in links.items():
        path = os.path.join(work, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(expand(target, **places), path)


def links_as_planted(work, links, places):
    for relative, target in links.items():
        path = os.path.join(work, relative)
        assert os.path.islink(path) and os.readlink(path) == expand(target, **places), \
            "%s is no longer the planted link" % path


# --- links planted where the module looks: refused ---------------------------

# (case, links planted in the case's directory, parameters, what the message must say)
LINK_REFUSALS = [
    ("live-boot image name links to a canary file", {"persistence": "{c}/data/file.txt"},
     {"path": "{w}", "layout": "live-boot", "size": 16}, r"runs through the symlink .*persistence.*give the real path"),
    ("the same, state absent", {"persistence": "{c}/data/file.txt"},
     {"path": "{w}", "layout": "live-boot", "state": "absent"}, r"symlink .*give the real path"),
    ("path names the link itself", {"backstore.img": "{c}/data/file.txt"},
     {"path": "{w}/backstore.img", "size": 16}, r"runs through the symlink .*give the real path"),
    ("image link to a canary directory", {"backstore.img": "{c}/data/home"},
     {"path": "{w}", "size": 16}, r"symlink .*give the real path"),
    ("dangling image link into the canary", {"backstore.img": "{c}/data/new.img"},
     {"path": "{w}", "size": 16}, r"symlink .*give the real path"),
    ("image link to another store, grow", {"backstore.img": "{v}"},
     {"path": "{w}", "size": 64}, r"symlink .*give the real path"),
    ("image link to another store, absent", {"backstore.img": "{v}"},
     {"path": "{w}", "state": "absent"}, r"symlink .*give the real path"),
    ("image link to another store, relabel", {"backstore.img": "{v}"},
     {"path": "{w}", "label": "stolen"}, r"symlink .*give the real path"),
    ("archiso image name links to a canary file", {"persistent_COW.img": "{c}/data/file.txt"},
     {"path": "{w}", "layout": "archiso", "label": "COW", "size": 16}, r"symlink .*give the real path"),
    ("the directory of path is a link", {"dir": "{c}/data/empty"},
     {"path": "{w}/dir/store.img", "size": 16}, r"runs through the symlink .*dir.*give the real path"),
    ("path is a link to a directory", {"dir": "{c}/data/empty"},
     {"path": "{w}/dir", "layout": "casper", "size": 16}, r"symlink .*give the real path"),
]


@pytest.mark.parametrize(("links", "params", "pattern"), [row[1:] for row in LINK_REFUSALS],
                         ids=[row[0] for row in LINK_REFUSALS])
def test_planted_link_is_refused(sandbox, canary, lab, work, links, params, pattern):
    places = {"w": work, "c": canary.path(), "v": lab["victim"]}
    plant(work, links, places)
    with hostile_case(canary, lab["victim_dir"]):
        refused_in_check_mode_and_for_real(sandbox, expand(params, **places), pattern, work)
    links_as_planted(work, links, places)


# --- links planted beside the store: never followed, never removed -----------

# (case, links planted in the case's directory, parameters, image file name)
LINKS_BESIDE = [
    ("temporary names that are links", {".backstore.img.liveclone-tmp-abc123": "{c}/data/file.txt",
                                        ".backstore.img.liveclone-tmp-dir": "{c}/data/home"},
     {"size": 16}, "backstore.img"),
    ("lock files that are links", {".lock": "{c}/data/file.txt", ".liveclone.lock": "{c}/data/etc/passwd",
                                   ".backstore.img.lock": "{c}/data/etc/hostname"},
     {"size": 16}, "backstore.img"),
    ("layout file names beside a live-boot store", {"persistence.conf": "{c}/data/file.txt",
                                                    ".persistence.liveclone-tmp-x": "{c}/data/log/syslog",
                                                    "lost+found": "{c}/data/empty"},
     {"size": 16, "layout": "live-boot", "persistence_conf": ["/home union"]}, "persistence"),
    ("the cow tree name beside an archiso store", {"persistent_COW": "{c}/data/empty",
                                                   ".persistent_COW.img.liveclone-tmp-q": "{c}/data/file.txt"},
     {"size": 16, "layout": "archiso", "label": "COW"}, "persistent_COW.img"),
    ("temporary names beside an xfs store", {".backstore.img.liveclone-tmp-x": "{c}/data/file.txt",
                                             "xfs.proto": "{c}/data/file.txt"},
     {"size": "300M", "fstype": "xfs", "layout": "live-boot"}, "persistence"),
]


@pytest.mark.parametrize(("links", "params", "image"), [row[1:] for row in LINKS_BESIDE],
                         ids=[row[0] for row in LINKS_BESIDE])
def test_links_beside_the_store_are_left_alone(sandbox, canary, lab, work, links, params, image):
    places = {"w": work, "c": canary.path(), "v": lab["victim"]}
    plant(work, links, places)
    params = dict(params, path=work)
    with hostile_case(canary, lab["victim_dir"]):
        made = assert_done(run_module(sandbox, "backstore", params))
        assert made["changed"] and made["path"] == os.path.join(work, image)
        assert os.path.isfile(made["path"]) and not os.path.islink(made["path"])
        links_as_planted(work, links, places)
        again = assert_done(run_module(sandbox, "backstore", params))
        assert not again["changed"], again["operations"]
        gone = assert_done(run_module(sandbox, "backstore", dict(params, state="absent")))
        assert gone["changed"] and not os.path.lexists(made["path"])
        links_as_planted(work, links, places)
    assert sorted(os.listdir(work)) == sorted(links)


# --- `//` and other spellings of a path: chrooted in a throwaway root ---------

ROOT_SPELLINGS = ["//", "///", "/./", "//.", "/tmp/..", "//tmp/..//", "/usr/../"]


@pytest.mark.parametrize("path", ROOT_SPELLINGS)
def test_the_root_in_any_spelling_is_refused(sandbox, canary, throwaway_root, path):
    with hostile_case(canary, throwaway_root):
        refused_in_check_mode_and_for_real(
            sandbox, {"path": path, "size": 16, "layout": "live-boot"},
            r"root directory of this host; give the path of an image file", throwaway_root, root=throwaway_root)
        refused_in_check_mode_and_for_real(sandbox, {"path": path, "state": "absent"},
                                           r"root directory", throwaway_root, root=throwaway_root)


@pytest.mark.parametrize(("path", "canonical"), [("//x.img", "/x.img"), ("//.//x.img/", "/x.img")])
def test_a_double_slash_file_is_the_file_in_the_root(sandbox, canary, throwaway_root, path, canonical):
    """`//x.img` is /x.img of the (throwaway) root; removed again, the root is as before."""
    with hostile_case(canary, throwaway_root):
        before = tree_digest(throwaway_root)
        planned = assert_done(run_module(sandbox, "backstore", {"path": path, "size": 16}, check=True,
                                         root=throwaway_root))
        assert planned["path"] == canonical and planned["changed"] and not planned["exists"]
        assert tree_digest(throwaway_root) == before
        made = assert_done(run_module(sandbox, "backstore", {"path": path, "size": 16}, root=throwaway_root))
        assert made["path"] == canonical and made["exists"]
        assert set(tree_digest(throwaway_root)) - set(before) == {canonical.lstrip("/")}
        gone = assert_done(run_module(sandbox, "backstore", {"path": path, "state": "absent"},
                                      root=throwaway_root))
        assert gone["changed"] and not gone["exists"]


def test_double_slashes_and_a_trailing_slash_inside_the_root(sandbox, canary, throwaway_root):
    """In the chroot, /tmp is the throwaway root's own tmpfs."""
    with hostile_case(canary, throwaway_root):
        for check in (True, False):
            outcome = assert_done(run_module(sandbox, "backstore", {"path": "//tmp//store.img/", "size": 16},
                                             check=check, root=throwaway_root))
            assert outcome["path"] == "/tmp/store.img" and outcome["changed"]
        listed = assert_done(run_module(sandbox, "backstore", {"path": "//tmp/./", "layout": "casper", "size": 16},
                                        root=throwaway_root))
        assert listed["path"] == "/tmp/casper-rw"


@pytest.mark.parametrize(("spelling", "image"), [
    ("{w}/", "{w}/backstore.img"), ("{w}//./sub/..//", "{w}/backstore.img"), ("{w}//store.img", "{w}/store.img"),
    ("/{w}/./store.img/", "{w}/store.img")])
def test_spellings_of_a_path_act_on_their_canonical_form(sandbox, canary, work, spelling, image):
    params = {"path": expand(spelling, w=work), "size": 16}
    with hostile_case(canary):
        made = assert_done(run_module(sandbox, "backstore", params))
        assert made["path"] == expand(image, w=work) and os.path.isfile(made["path"])
        assert not assert_done(run_module(sandbox, "backstore", params))["changed"]
        assert sorted(os.listdir(work)) == [os.path.basename(made["path"])]


# --- labels: bytes per filesystem, characters, names they build ---------------

# (case, fstype, layout, label, what the message must say)
BAD_LABELS = [
    ("archiso label climbing out of path", "ext4", "archiso", "x/../../esc", r"not a label ext4 can hold"),
    ("archiso label ..-first", "ext4", "archiso", "../esc", r"not a label"),
    ("archiso label ..", "ext4", "archiso", "..", r"not a label"),
    ("archiso label /", "ext4", "archiso", "/", r"not a label"),
    ("label with a slash", "ext4", "plain", "a/b", r"not a label"),
    ("label with a trailing newline", "ext4", "live-boot", "persistence\n", r"not a label"),
    ("label with a newline inside", "ext4", "plain", "lab\nel", r"not a label"),
    ("label with a double quote", "ext4", "plain", 'lab"el', r"not a label"),
    ("label with a single quote", "btrfs", "plain", "lab'el", r"not a label btrfs"),
    ("label with a blank", "xfs", "plain", "my label", r"not a label xfs"),
    ("non-ASCII label", "ext4", "live-boot", "persist\u00e4nce", r"use ASCII letters"),
    ("non-ASCII label of 8 characters, 16 bytes", "ext4", "plain", "\u00c4" * 8, r"use ASCII letters"),
    ("ext4 label of 17 bytes", "ext4", "plain", "a" * 17, r"longer than the 16 bytes ext4 holds"),
    ("ext2 label of 17 bytes", "ext2", "plain", "b" * 17, r"longer than the 16 bytes ext2 holds"),
    ("xfs label of 13 bytes", "xfs", "plain", "x" * 13, r"longer than the 12 bytes xfs holds"),
    ("btrfs label of 255 bytes (mkfs.btrfs keeps 254)", "btrfs", "plain", "b" * 255,
     r"longer than the 254 bytes btrfs holds"),
    ("empty label", "ext4", "plain", "", r"not a label"),
]


@pytest.mark.parametrize(("fstype", "layout", "label", "pattern"), [row[1:] for row in BAD_LABELS],
                         ids=[row[0] for row in BAD_LABELS])
def test_bad_label_is_refused(sandbox, canary, lab, work, fstype, layout, label, pattern):
    inner = os.path.join(work, "a", "b")
    os.makedirs(inner)
    params = {"path": inner, "layout": layout, "label": label, "fstype": fstype, "size": "300M"}
    with hostile_case(canary, lab["victim_dir"]):
        # The whole case directory: an escaping name would land two levels up.
        refused_in_check_mode_and_for_real(sandbox, params, r"\blabel\b.*" + pattern, work)


@pytest.mark.parametrize(("fstype", "label", "size"), [
    ("ext4", "a" * 16, 16), ("xfs", "x" * 12, "300M"), ("btrfs", "B" * 254, "256M")])
def test_longest_label_is_kept_and_converges(sandbox, canary, work, fstype, label, size):
    params = {"path": work, "fstype": fstype, "label": label, "size": size}
    with hostile_case(canary):
        made = assert_done(run_module(sandbox, "backstore", params))
        assert made["label"] == label, made
        assert not assert_done(run_module(sandbox, "backstore", params))["changed"]
        assert_done(run_module(sandbox, "backstore", dict(params, state="absent")))


# --- persistence.conf: one line per item, in the form live-boot reads ---------

BAD_CONF = [
    ("a newline adds a line", ["/home union\n/etc bind"], r"control character"),
    ("a trailing newline", ["/ union\n"], r"control character"),
    ("a tab", ["/home\tunion"], r"control character"),
    ("a relative directory", ["home union"], r"is relative; live-boot needs an absolute path such as /home"),
    ("an unknown option", ["/home unionfs"], r"knows only union, bind, link and source=PATH"),
    ("a .. component", ["/ union", "/home/../etc"], r"'\.\.' component.*write it as /etc"),
    ("live-boot's own /live", ["/live/image union"], r"keeps for itself; choose another directory"),
    ("an absolute source", ["/home source=/etc"], r"is absolute; give it relative"),
    ("options that exclude each other", ["/home bind,union"], r"exclude each other.*keep one"),
    ("shell syntax in the directory", ["/home$(reboot) union"], r"may hold only"),
]


@pytest.mark.parametrize(("conf", "pattern"), [row[1:] for row in BAD_CONF], ids=[row[0] for row in BAD_CONF])
def test_bad_persistence_conf_is_refused(sandbox, canary, work, conf, pattern):
    params = {"path": work, "layout": "live-boot", "size": 16, "persistence_conf": conf}
    with hostile_case(canary):
        refused_in_check_mode_and_for_real(sandbox, params, r"persistence_conf item .*" + pattern, work)


CONF = ["/home union", "/var/log link,source=logs", "# made by liveclone", "/ union"]


def read_conf_with_debugfs(image):
    return run(["debugfs", "-R", "cat /persistence.conf", image]).stdout


def read_conf_mounted(image, mount_point):
    os.makedirs(mount_point)
    run(["mount", "-o", "loop,ro", image, mount_point])
    try:
        with open(os.path.join(mount_point, "persistence.conf")) as handle:
            return handle.read()
    finally:
        run(["umount", mount_point])
        os.rmdir(mount_point)


@pytest.mark.parametrize(("fstype", "size"), [("ext4", 16), ("xfs", "300M"), ("btrfs", "256M")])
def test_persistence_conf_reads_back_as_exactly_the_items(sandbox, canary, work, fstype, size):
    params = {"path": work, "layout": "live-boot", "fstype": fstype, "size": size, "persistence_conf": CONF}
    with hostile_case(canary):
        made = assert_done(run_module(sandbox, "backstore", params))
        if fstype == "ext4":
            text = read_conf_with_debugfs(made["path"])
        else:
            text = read_conf_mounted(made["path"], os.path.join(work, "mnt"))
        assert text.split("\n") == CONF + [""], text
        assert_done(run_module(sandbox, "backstore", dict(params, state="absent")))


# --- sizes that are not sizes -------------------------------------------------

BAD_SIZES = [
    ("infinity", float("inf"), r"not a finite number"),
    ("minus infinity", float("-inf"), r"not a finite number"),
    ("nan", float("nan"), r"not a finite number"),
    ("the string nan", "nan", r"not understood; give a number of MiB"),
    ("the string .inf", ".inf", r"not understood; give a number of MiB"),
    ("the string 1e400", "1e400", r"not understood; give a number of MiB"),
    ("400 nines of GiB", "9" * 400 + "G", r"not understood; give a number of MiB"),
    ("a negative number", -1, r"greater than zero"),
    ("a boolean", True, r"boolean, not a size"),
    ("more than any file", "9" * 30, r"larger than any file can be.*choose a smaller size"),
]


@pytest.mark.parametrize(("size", "pattern"), [row[1:] for row in BAD_SIZES], ids=[row[0] for row in BAD_SIZES])
def test_bad_size_is_refused(sandbox, canary, work, size, pattern):
    with hostile_case(canary):
        refused_in_check_mode_and_for_real(sandbox, {"path": work, "size": size}, r"\bsize\b.*" + pattern, work)


# --- filesystems that refuse: read-only, immutable, full, out of inodes -------

@contextlib.contextmanager
def small_ext4(work, name, size, *mkfs_options):
    image = os.path.join(work, name + ".fs")
    mount_point = os.path.join(work, name)
    with open(image, "wb") as handle:
        handle.truncate(size)
    run(["mkfs.ext4", "-q", "-F", *mkfs_options, image])
    os.makedirs(mount_point)
    run(["mount", "-o", "loop", image, mount_point])
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", mount_point], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(mount_point)
            os.unlink(image)


@pytest.fixture(scope="module")
def read_only_fs(sandbox, lab):
    with small_ext4(lab["root"], "read-only", 128 * MIB) as mount_point:
        store = os.path.join(mount_point, "store.img")
        assert_done(run_module(sandbox, "backstore", {"path": store, "size": 16, "label": "ro"}))
        os.makedirs(os.path.join(mount_point, "empty"))
        run(["mount", "-o", "remount,ro", mount_point])
        yield {"mount": mount_point, "store": store}


READ_ONLY = [
    ("create", {"path": "{m}/empty", "size": 16}),
    ("grow", {"path": "{s}", "size": 32}),
    ("relabel", {"path": "{s}", "label": "rw"}),
    ("remove", {"path": "{s}", "state": "absent"}),
]


@pytest.mark.parametrize("params", [row[1] for row in READ_ONLY], ids=[row[0] for row in READ_ONLY])
def test_read_only_filesystem_is_refused_before_anything(sandbox, canary, read_only_fs, params):
    params = expand(params, m=read_only_fs["mount"], s=read_only_fs["store"])
    with hostile_case(canary):
        refused_in_check_mode_and_for_real(
            sandbox, params, r"read-only filesystem \(mounted on %s\); remount it read-write" % re.escape(
                read_only_fs["mount"]), read_only_fs["mount"])


def test_read_only_filesystem_with_nothing_to_do(sandbox, canary, read_only_fs):
    with hostile_case(canary):
        before = state_of(read_only_fs["mount"])
        result = assert_done(run_module(sandbox, "backstore", {"path": read_only_fs["store"], "size": 16,
                                                               "label": "ro"}))
        assert not result["changed"] and result["label"] == "ro"
        assert state_of(read_only_fs["mount"]) == before


@pytest.fixture(scope="module")
def attribute_fs(sandbox, lab):
    with small_ext4(lab["root"], "attributes", 128 * MIB) as mount_point:
        store = os.path.join(mount_point, "store.img")
        assert_done(run_module(sandbox, "backstore", {"path": store, "size": 16}))
        os.makedirs(os.path.join(mount_point, "dir"))
        yield {"mount": mount_point, "store": store, "dir": os.path.join(mount_point, "dir")}


# (case, what gets the attribute, chattr flag, parameters, what the message must say)
ATTRIBUTES = [
    ("grow an immutable store", "{s}", "+i", {"path": "{s}", "size": 32},
     r"immutable attribute \(lsattr\), so it cannot be grown or relabelled; clear it with chattr -i"),
    ("relabel an immutable store", "{s}", "+i", {"path": "{s}", "label": "new"}, r"immutable attribute"),
    ("remove an immutable store", "{s}", "+i", {"path": "{s}", "state": "absent"},
     r"immutable attribute \(lsattr\), so it cannot be removed"),
    ("grow an append-only store", "{s}", "+a", {"path": "{s}", "size": 32}, r"append-only attribute"),
    ("create in an immutable directory", "{d}", "+i", {"path": "{d}", "size": 16},
     r"directory .* has the immutable attribute \(lsattr -d\).*chattr -i -a"),
    ("create in an append-only directory", "{d}", "+a", {"path": "{d}", "size": 16}, r"append-only attribute"),
    ("remove from an immutable directory", "{m}", "+i", {"path": "{s}", "state": "absent"},
     r"directory .* has the immutable attribute"),
]


@pytest.mark.parametrize(("target", "flag", "params", "pattern"), [row[1:] for row in ATTRIBUTES],
                         ids=[row[0] for row in ATTRIBUTES])
def test_chattr_attributes_are_refused_before_anything(sandbox, canary, attribute_fs, target, flag, params,
                                                       pattern):
    places = {"m": attribute_fs["mount"], "s": attribute_fs["store"], "d": attribute_fs["dir"]}
    target = expand(target, **places)
    run(["chattr", flag, target])
    try:
        with hostile_case(canary):
            refused_in_check_mode_and_for_real(sandbox, expand(params, **places), pattern, attribute_fs["mount"])
    finally:
        run(["chattr", "-i", "-a", target])


@pytest.fixture(scope="module")
def full_fs(sandbox, lab):
    """A filesystem with a store on it, then filled to the last block."""
    with small_ext4(lab["root"], "full", 64 * MIB, "-m", "0") as mount_point:
        store = os.path.join(mount_point, "store.img")
        assert_done(run_module(sandbox, "backstore", {"path": store, "size": 16, "allocation": "full"}))
        with open(os.path.join(mount_point, "filler"), "wb", buffering=0) as handle:
            block = bytes(MIB)
            with contextlib.suppress(OSError):
                while True:
                    handle.write(block)
        yield {"mount": mount_point, "store": store}


@pytest.fixture(scope="module")
def inode_fs(sandbox, lab):
    """A filesystem with few inodes, all used by empty files."""
    with small_ext4(lab["root"], "inodes", 64 * MIB, "-N", "16") as mount_point:
        index = 0
        while True:
            try:
                with open(os.path.join(mount_point, "f%05d" % index), "w"):
                    pass
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                break
            index += 1
        assert os.statvfs(mount_point).f_favail == 0
        yield {"mount": mount_point}


def test_full_filesystem_create_is_refused(sandbox, canary, full_fs):
    with hostile_case(canary):
        refused_in_check_mode_and_for_real(
            sandbox, {"path": os.path.join(full_fs["mount"], "new.img"), "size": 8},
            r"not enough free space.*free some space or choose a smaller size", full_fs["mount"])


def test_full_filesystem_grow_is_refused(sandbox, canary, full_fs):
    with hostile_case(canary):
        refused_in_check_mode_and_for_real(sandbox, {"path": full_fs["store"], "size": 32},
                                           r"not enough free space", full_fs["mount"])


def test_filesystem_out_of_inodes_is_refused(sandbox, canary, inode_fs):
    with hostile_case(canary):
        refused_in_check_mode_and_for_real(
            sandbox, {"path": inode_fs["mount"], "size": 8, "layout": "casper"},
            r"no free inodes \(df -i\).*choose a path on another filesystem", inode_fs["mount"])


@pytest.mark.parametrize("relative", ["file.txt/store.img", "file.txt/sub/store.img"])
def test_a_file_where_the_directory_should_be(sandbox, canary, work, relative):
    with open(os.path.join(work, "file.txt"), "w") as handle:
        handle.write("a file, not a directory\n")
    with hostile_case(canary):
        refused_in_check_mode_and_for_real(sandbox, {"path": os.path.join(work, relative), "size": 16},
                                           r"is not a directory.*give path as an image file", work)


# --- " (deleted)" in a store's own name ---------------------------------------

@contextlib.contextmanager
def attached(image):
    device = run(["losetup", "--find", "--show", image]).stdout.strip()
    try:
        yield device
    finally:
        run(["losetup", "--detach", device])


@pytest.mark.parametrize("name", ["store (deleted).img", "store.img (deleted)", "a (deleted) (deleted)"])
def test_an_attached_store_named_deleted_is_not_removed(sandbox, canary, work, name):
    store = os.path.join(work, name)
    assert_done(run_module(sandbox, "backstore", {"path": store, "size": 16}))
    with attached(store) as device, hostile_case(canary):
        refused_in_check_mode_and_for_real(
            sandbox, {"path": store, "state": "absent"},
            r"in use \(attached to %s\); unmount it and detach" % re.escape(device), work)
        planned = assert_done(run_module(sandbox, "backstore", {"path": store, "size": 32}, check=True))
        assert planned["loop_device"] == device
        assert "refresh the capacity of %s" % device in planned["operations"]
    assert os.path.isfile(store)


# --- the mount points the module makes ----------------------------------------

def test_private_mount_point_of_an_offline_grow(sandbox, canary, work, monkeypatch):
    """xfs grows only mounted: the module mounts on a new directory of its own
    in TMPDIR, never on a planted entry there, and leaves nothing behind."""
    tmp = os.path.join(work, "tmp")
    os.makedirs(tmp)
    planted = {"liveclone-backstore-planted": "{c}/data/empty", "liveclone-backstore-": "{c}/data/home"}
    plant(tmp, planted, {"c": canary.path()})
    monkeypatch.setenv("TMPDIR", tmp)
    store = os.path.join(work, "store.img")
    with hostile_case(canary):
        assert_done(run_module(sandbox, "backstore", {"path": store, "size": "300M", "fstype": "xfs"}))
        grown = assert_done(run_module(sandbox, "backstore", {"path": store, "size": "400M", "fstype": "xfs"}))
        assert grown["changed"] and grown["fs_size"] > 390 * MIB, grown
        assert sorted(os.listdir(tmp)) == sorted(planted), os.listdir(tmp)
        links_as_planted(tmp, planted, {"c": canary.path()})
        assert not state_of(work)["mounts"]


@pytest.mark.parametrize("occupied", [False, True], ids=["empty", "with a file under the mount"])
def test_stale_private_mount_is_undone(sandbox, canary, work, occupied):
    """A mount left by an interrupted run is unmounted; its directory is
    removed only when it is empty (something under it is not ours)."""
    store = os.path.join(work, "store.img")
    assert_done(run_module(sandbox, "backstore", {"path": store, "size": 16}))
    stale = os.path.join(work, "tmp", "liveclone-backstore-stale")
    os.makedirs(stale)
    if occupied:
        with open(os.path.join(stale, "keep.txt"), "w") as handle:
            handle.write("under the mount\n")
    run(["mount", "-o", "loop", store, stale])
    try:
        with hostile_case(canary):
            result = assert_done(run_module(sandbox, "backstore", {"path": store, "size": 16}))
            assert result["operations"] == ["unmount %s left by an interrupted run" % stale]
            assert not state_of(work)["mounts"]
            assert os.path.isdir(stale) is occupied
            if occupied:
                assert os.listdir(stale) == ["keep.txt"]
    finally:
        if state_of(work)["mounts"]:
            subprocess.run(["umount", stale], check=False)
