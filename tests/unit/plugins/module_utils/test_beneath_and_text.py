# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The shared layer: _beneath.Tree never follows a link out of its tree nor
climbs out with '..'; _text and _fs accept and refuse what they say."""

from __future__ import annotations

import os
import stat

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._common import beneath as _beneath
from ansible_collections.liveclone.core.plugins.module_utils._common import fs as _fs
from ansible_collections.liveclone.core.plugins.module_utils._common import text as _text
from ansible_collections.liveclone.core.plugins.module_utils._common.beneath import BeneathError, Tree


@pytest.fixture
def planted(tmp_path):
    """A tree with links planted into an outside directory, and that outside
    directory's digest to compare against."""
    outside = tmp_path / "outside"
    (outside / "home" / "alice").mkdir(parents=True)
    (outside / "home" / "alice" / "notes.txt").write_text("alice\n")
    (outside / "file.txt").write_text("outside\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "var" / "log").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("tree\n")
    (root / "var" / "log" / "syslog").write_text("log\n")
    (root / "home").symlink_to(outside / "home")  # an absolute link to a directory
    (root / "etc" / "hosts").symlink_to(outside / "file.txt")  # an absolute link to a file
    (root / "var" / "tmp").symlink_to("../../outside/home")  # a relative link climbing out
    (root / "etc" / "dangling").symlink_to(outside / "new.txt")
    return {"root": root, "outside": outside, "before": digest(outside)}


def digest(top):
    found = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            content = None
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    content = handle.read()
            found[os.path.relpath(path, top)] = (info.st_mode, info.st_uid, info.st_gid, content)
    return found


def untouched(planted):
    return digest(planted["outside"]) == planted["before"]


# --- Tree: links are data, never a way out ------------------------------------

# (case, path in the tree, operation on it, what is left there afterwards)
LINKS_REPLACED = [
    ("empty a link to a directory", "home", lambda tree, path: tree.empty(path), "dir"),
    ("empty a relative link climbing out", "var/tmp", lambda tree, path: tree.empty(path), "dir"),
    ("remove a link to a directory", "home", lambda tree, path: tree.remove(path), None),
    ("remove a link to a file", "etc/hosts", lambda tree, path: tree.remove(path), None),
    ("remove a directory holding a link", "var", lambda tree, path: tree.remove(path), None),
    ("write over a link to a file", "etc/hosts", lambda tree, path: tree.write_text(path, "127.0.0.1 x\n"), "file"),
    ("write over a dangling link", "etc/dangling", lambda tree, path: tree.write_text(path, "new\n"), "file"),
    ("symlink over a link", "etc/hosts", lambda tree, path: tree.symlink("/elsewhere", path), "link"),
]


@pytest.mark.parametrize(("relative", "operation", "left"), [row[1:] for row in LINKS_REPLACED],
                         ids=[row[0] for row in LINKS_REPLACED])
def test_a_link_is_replaced_or_removed_never_followed(planted, relative, operation, left):
    with Tree(str(planted["root"])) as tree:
        operation(tree, relative)
        info = tree.lstat(relative)
        if left == "dir":
            assert tree.listdir(relative) == []
    kind = None if info is None else ("dir" if stat.S_ISDIR(info.st_mode) else
                                      "link" if stat.S_ISLNK(info.st_mode) else "file")
    assert kind == left
    assert untouched(planted)
    assert not (planted["outside"] / "new.txt").exists()


def test_empty_removes_links_inside_and_leaves_their_targets(planted):
    root = planted["root"]
    (root / "var" / "log" / "home-link").symlink_to(planted["outside"] / "home")
    (root / "var" / "log" / "sub").mkdir()
    (root / "var" / "log" / "sub" / "file-link").symlink_to(planted["outside"] / "file.txt")
    with Tree(str(root)) as tree:
        tree.empty("var/log")
        assert tree.listdir("var/log") == []
    assert untouched(planted)


# (operation that would have to go through a link on the way)
THROUGH_A_LINK = [
    ("write under a linked directory", lambda tree: tree.write_text("home/alice/.bashrc", "x\n")),
    ("makedirs under a linked directory", lambda tree: tree.makedirs("home/bob/.ssh")),
    ("empty under a linked directory", lambda tree: tree.empty("home/alice")),
    ("remove under a linked directory", lambda tree: tree.remove("home/alice/notes.txt")),
    ("chmod under a linked directory", lambda tree: tree.chmod("home/alice", 0o777)),
    ("lchown under a linked directory", lambda tree: tree.lchown("home/alice", 1234, 1234)),
    ("symlink under a relative link", lambda tree: tree.symlink("x", "var/tmp/planted")),
    ("copy into a linked directory", lambda tree: tree.copy_within("etc", "home/copy")),
]


@pytest.mark.parametrize("operation", [row[1] for row in THROUGH_A_LINK], ids=[row[0] for row in THROUGH_A_LINK])
def test_a_link_on_the_way_is_refused(planted, operation):
    with Tree(str(planted["root"])) as tree, pytest.raises(BeneathError, match="symlink"):
        operation(tree)
    assert untouched(planted)


DOT_DOT = [
    lambda tree: tree.write_text("../escaped", "x\n"),
    lambda tree: tree.write_text("etc/../../escaped", "x\n"),
    lambda tree: tree.makedirs("a/../../b"),
    lambda tree: tree.remove("../outside"),
    lambda tree: tree.empty("../outside/home"),
    lambda tree: tree.lstat(".."),
    lambda tree: list(tree.walk("..")),
    lambda tree: list(tree.walk("var/../..")),
    lambda tree: tree.chown_tree("..", 1234, 1234),
    lambda tree: tree.copy_within("etc", "../copy"),
    lambda tree: tree.copy_within("..", "copy"),
    lambda tree: tree.symlink("/x", "../link"),
    lambda tree: tree.path("a/../.."),
]


@pytest.mark.parametrize("operation", DOT_DOT)
def test_dot_dot_is_refused(planted, operation):
    with Tree(str(planted["root"])) as tree, pytest.raises(BeneathError, match=r"climbs out of its tree with '\.\.'"):
        operation(tree)
    assert untouched(planted)
    assert sorted(os.listdir(planted["root"].parent)) == ["outside", "root"]


def test_reading_never_follows_a_link(planted):
    with Tree(str(planted["root"])) as tree:
        assert tree.read_bytes("../outside/file.txt") is None  # refused as unreadable
        assert tree.read_bytes("etc/hosts") is None
        assert tree.read_text("etc/hostname") == "tree\n"
        assert tree.read_bytes("etc/missing") is None
        assert tree.read_bytes("home/alice/notes.txt") is None  # through a link on the way
        assert tree.listdir("home") == []
        assert tree.listdir("var/tmp") == []
        assert not tree.is_dir("home") and not tree.is_file("etc/hosts")
        assert tree.is_dir("") and tree.is_dir("etc") and tree.is_file("etc/hostname")
        assert stat.S_ISLNK(tree.lstat("home").st_mode)
        assert tree.lstat("missing/deeper") is None


def test_walk_lists_links_and_never_enters_them(planted):
    with Tree(str(planted["root"])) as tree:
        walked = {directory: (sorted(dirs), sorted(files)) for directory, dirs, files in tree.walk()}
        assert walked == {
            "": (["etc", "var"], ["home"]),
            "etc": ([], ["dangling", "hostname", "hosts"]),
            "var": (["log"], ["tmp"]),
            "var/log": ([], ["syslog"]),
        }
        assert [directory for directory, _dirs, _files in tree.walk("var")] == ["var", "var/log"]
        assert list(tree.walk("home")) == []


def test_copy_within_copies_links_as_links(planted):
    root = planted["root"]
    with Tree(str(root)) as tree:
        tree.copy_within("etc", "copy/etc")
        tree.copy_within("var", "copy/var")
    assert os.readlink(root / "copy/etc/hosts") == str(planted["outside"] / "file.txt")
    assert os.readlink(root / "copy/var/tmp") == "../../outside/home"
    assert (root / "copy/etc/hostname").read_text() == "tree\n"
    assert (root / "copy/var/log/syslog").read_text() == "log\n"
    assert untouched(planted)


@pytest.mark.parametrize("source", ["home", "var/tmp", "home/alice", "etc/hosts"])
def test_copy_within_refuses_a_source_that_is_a_link(planted, source):
    with Tree(str(planted["root"])) as tree, pytest.raises(BeneathError):
        tree.copy_within(source, "copy")
    assert not (planted["root"] / "copy").exists()
    assert untouched(planted)


def test_copy_within_refuses_a_planted_link_in_the_destination(planted):
    root = planted["root"]
    (root / "copy").mkdir()
    (root / "copy" / "var").symlink_to(planted["outside"] / "home")
    with Tree(str(root)) as tree, pytest.raises(BeneathError, match="symlink"):
        tree.copy_within("var", "copy/var")
    assert untouched(planted)


def test_chown_tree_changes_links_not_their_targets(planted):
    root = planted["root"]
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    with Tree(str(root)) as tree:
        tree.chown_tree("", 1234, 2345)
    for relative in ("home", "etc/hosts", "var/tmp", "etc/hostname", "var/log/syslog", "var"):
        info = os.lstat(root / relative)
        assert (info.st_uid, info.st_gid) == (1234, 2345), relative
    assert untouched(planted)


def test_chmod_leaves_a_link_alone(planted):
    with Tree(str(planted["root"])) as tree:
        tree.chmod("home", 0o777)
        tree.chmod("etc/hosts", 0o777)
        tree.chmod("etc/hostname", 0o600)
    assert stat.S_IMODE(os.lstat(planted["root"] / "etc/hostname").st_mode) == 0o600
    assert untouched(planted)


def test_write_is_atomic_and_keeps_the_mode(planted):
    root = planted["root"]
    with Tree(str(root)) as tree:
        tree.write_bytes("etc/shadow", b"root:*:1::::::\n", 0o640)
    assert stat.S_IMODE(os.stat(root / "etc/shadow").st_mode) == 0o640
    assert not [name for name in os.listdir(root / "etc") if "liveclone-tmp" in name]
    with Tree(str(root)) as tree, pytest.raises(BeneathError, match="is a directory"):
        tree.write_text("var/log", "x\n")
    with Tree(str(root)) as tree, pytest.raises(FileNotFoundError):
        tree.write_text("missing/file", "x\n")


def test_a_root_that_is_a_link_is_refused(planted, tmp_path):
    (tmp_path / "root-link").symlink_to(planted["root"])
    with pytest.raises(BeneathError, match="is a symlink"):
        Tree(str(tmp_path / "root-link"))
    with pytest.raises(NotADirectoryError):
        Tree(str(planted["root"] / "etc/hostname"))


def test_a_file_on_the_way_is_refused(planted):
    with Tree(str(planted["root"])) as tree, pytest.raises(BeneathError, match="is not a directory"):
        tree.makedirs("etc/hostname/sub")


@pytest.mark.parametrize("spelling", ["{root}", "{root}/", "{parent}//root", "{link}/root", "{root}/../root"])
def test_remove_refuses_a_mount_point_however_the_root_is_spelled(planted, tmp_path, monkeypatch, spelling):
    """mountinfo spells mount points by the kernel's path; a root given through
    a link or with '//' or '..' is the same directory (mounts are faked here)."""
    root = planted["root"]
    (root / "mnt" / "inner").mkdir(parents=True)
    (root / "mnt" / "inner" / "keep.txt").write_text("on another filesystem\n")
    (tmp_path / "parent-link").symlink_to(tmp_path)
    fake = [_fs.Mount(str(root / "mnt" / "inner"), "0:99", "ext4", "/dev/loop9")]
    monkeypatch.setattr(_beneath, "read_mounts", lambda *args: fake)
    spelled = spelling.format(root=root, parent=tmp_path, link=tmp_path / "parent-link")
    with Tree(spelled) as tree:
        with pytest.raises(BeneathError, match="is a mount point; unmount it first"):
            tree.remove("mnt")
        with pytest.raises(BeneathError, match="mount point"):
            tree.empty("mnt")
    assert (root / "mnt" / "inner" / "keep.txt").read_text() == "on another filesystem\n"


# --- _text: values that land in config files ----------------------------------

TEXT_CHECKS = [
    # (check, arguments after name and value, value, accepted)
    (_text.check_user_name, (), "live", True),
    (_text.check_user_name, (), "_apt", True),
    (_text.check_user_name, (), "a" * 32, True),
    (_text.check_user_name, (), "a" * 33, False),
    (_text.check_user_name, (), "live\n", False),
    (_text.check_user_name, (), "toor::0:0::/root:/bin/sh\nlive", False),
    (_text.check_user_name, (), "../../../../victim", False),
    (_text.check_user_name, (), "Live", False),
    (_text.check_user_name, (), "1live", False),
    (_text.check_user_name, (), "", False),
    (_text.check_host_name, (), "lc", True),
    (_text.check_host_name, (), "live-1", True),
    (_text.check_host_name, (), "a" * 63, True),
    (_text.check_host_name, (), "a" * 64, False),
    (_text.check_host_name, (), "lc\n", False),
    (_text.check_host_name, (), "-lc", False),
    (_text.check_host_name, (), "lc-", False),
    (_text.check_host_name, (), "lc.example", False),
    (_text.check_host_name, (), "", False),
    (_text.check_snapper_name, (), "distroclone-backup", True),
    (_text.check_snapper_name, (), "a.b_c", True),
    (_text.check_snapper_name, (), "cfg\n", False),
    (_text.check_snapper_name, (), "../etc", False),
    (_text.check_snapper_name, (), ".hidden", False),
    (_text.check_snapper_name, (), "a/b", False),
    (_text.check_snapper_name, (), "a" * 65, False),
    (_text.check_label, (16, "ext4"), "persistence", True),
    (_text.check_label, (16, "ext4"), "a" * 16, True),
    (_text.check_label, (16, "ext4"), "a" * 17, False),
    (_text.check_label, (32, "an ISO volume id"), "LIVECLONE_2024.1", True),
    (_text.check_label, (32, "an ISO volume id"), "L" * 33, False),
    (_text.check_label, (16, "ext4"), "lab\n", False),
    (_text.check_label, (16, "ext4"), 'a"b', False),
    (_text.check_label, (16, "ext4"), "a b", False),
    (_text.check_label, (16, "ext4"), "\u00e4bc", False),
    (_text.check_label, (16, "ext4"), "..", False),
    (_text.check_label, (16, "ext4"), "x/../../esc", False),
    (_text.check_label, (16, "ext4"), "", False),
    (_text.check_boot_param, (), "quiet", True),
    (_text.check_boot_param, (), "console=ttyS0,115200n8", True),
    (_text.check_boot_param, (), "live-config.nocomponents=user-setup", True),
    (_text.check_boot_param, (), "quiet\n", False),
    (_text.check_boot_param, (), "quiet }\nmenuentry x {", False),
    (_text.check_boot_param, (), "a b", False),
    (_text.check_boot_param, (), "x=$(id)", False),
    (_text.check_boot_param, (), "x;y", False),
    (_text.check_boot_param, (), 'x="y"', False),
    (_text.check_boot_param, (), "x#y", False),
    (_text.check_boot_param, (), "x\\y", False),
    (_text.check_boot_param, (), "", False),
    (_text.check_plain_text, (), "a pass phrase, with \u00e9 and $ signs", True),
    (_text.check_plain_text, (), "secret\n", False),
    (_text.check_plain_text, (), "sec\tret", False),
    (_text.check_plain_text, (), "sec\x7fret", False),
    (_text.check_plain_text, (), "sec\x00ret", False),
]


@pytest.mark.parametrize(("check", "extra", "value", "accepted"), TEXT_CHECKS,
                         ids=["%s-%r" % (row[0].__name__, row[2][:20]) for row in TEXT_CHECKS])
def test_text_checks(check, extra, value, accepted):
    problem = check("param", value, *extra)
    if accepted:
        assert problem is None
    else:
        assert problem and problem.startswith("param"), problem
        assert ";" in problem, "the message does not say what to do: %s" % problem


def test_label_bytes_are_counted_not_characters():
    assert "16 bytes" in _text.check_label("label", "a" * 17, 16, "ext4")


# --- _fs: canonical paths and path text ----------------------------------------

CANONICAL = [
    ("/", "/"), ("//", "/"), ("///", "/"), ("/./", "/"), ("//.", "/"), ("/..", "/"), ("//tmp/..", "/"),
    ("//x.img", "/x.img"), ("//.//x.img/", "/x.img"), ("/a//b/", "/a/b"), ("/a/./b", "/a/b"),
    ("/a/b/../c", "/a/c"), ("/a/b/", "/a/b"), ("////a", "/a"), ("a//b/", "a/b"), ("", ""),
]


@pytest.mark.parametrize(("path", "canonical"), CANONICAL)
def test_canonical_path(path, canonical):
    assert _fs.canonical_path(path) == canonical


@pytest.mark.parametrize(("path", "accepted"), [
    ("/mnt/usb/persistence", True), ("/mnt/with space/x", True), ("/srv/\u00e9t\u00e9", True), ("", True),
    ("/mnt/x\n", False), ("/mnt/x\ny", False), ("/mnt/\tx", False), ("/mnt/x\r", False), ("/mnt/\x00", False),
    ("/mnt/\x1b[31m", False), ("/mnt/x\x7f", False),
])
def test_check_path_text(path, accepted):
    problem = _fs.check_path_text("dest", path)
    if accepted:
        assert problem is None
    else:
        assert problem.startswith("dest ") and "control character" in problem and "rename the path" in problem


@pytest.mark.parametrize(("relative", "link", "resolved"), [
    ("etc/os-release", "../usr/lib/os-release", "usr/lib/os-release"),
    ("etc/os-release", "/usr/lib/os-release", "usr/lib/os-release"),
    ("etc/os-release", "../../../../usr/lib/os-release", "usr/lib/os-release"),
    ("etc/os-release", "/nowhere/os-release", None),
    ("etc/os-release", "os-release", None),  # a loop
])
def test_resolve_never_leaves_the_tree(tmp_path, relative, link, resolved):
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text("ID=debian\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / relative).symlink_to(link)
    with Tree(str(tmp_path)) as tree:
        assert tree.resolve(relative) == resolved
