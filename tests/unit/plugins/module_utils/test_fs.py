# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import os

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._cache import snapper as sn
from ansible_collections.liveclone.core.plugins.module_utils._common import fs as _fs
from ansible_collections.liveclone.core.plugins.module_utils._live_iso.desired import IsoError, check_params


def test_create_file_replaces_a_symlink_and_leaves_its_target(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep\n")
    link = tmp_path / "marker"
    link.symlink_to(target)
    _fs.create_file(str(link), "new\n")
    assert target.read_text() == "keep\n"
    assert not link.is_symlink() and link.read_text() == "new\n"


def test_read_file_never_follows_a_symlink(tmp_path):
    target = tmp_path / "secret"
    target.write_text("secret\n")
    (tmp_path / "meta").symlink_to(target)
    assert _fs.read_file(str(tmp_path / "meta")) is None
    assert _fs.read_file(str(target), limit=3) == "sec"
    assert _fs.read_file(str(tmp_path / "missing")) is None


def test_check_real_path_names_the_link_and_the_real_path(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    message = _fs.check_real_path("base_dir", str(tmp_path / "link" / "x"))
    assert message.startswith("base_dir %s runs through the symlink %s" % (tmp_path / "link" / "x", tmp_path / "link"))
    assert "give the real path, %s" % (real / "x") in message
    assert _fs.check_real_path("dest", str(tmp_path / "link"), include_last=False) is None
    assert _fs.check_real_path("base_dir", str(real)) is None


def test_check_real_path_refuses_kernel_filesystems():
    assert "kernel's proc filesystem" in _fs.check_real_path("path", "/proc/liveclone.img")


@pytest.mark.parametrize(("overrides", "words"), [
    ({"block_size": 1000}, "block_size 1000 is not a power of two"),
    ({"block_size": 2 * 1048576}, "block_size 2097152 is not a power of two"),
    ({"hostname": "bad host"}, "hostname 'bad host' is not a host name"),
    ({"hostname": "-x"}, "hostname '-x' is not a host name"),
])
def test_live_iso_parameter_checks(tmp_path, overrides, words):
    values = dict(block_size=1048576, hostname="liveclone", work_dir=None)
    values.update(overrides)
    with pytest.raises(IsoError, match=words):
        check_params(values, str(tmp_path / "live.iso"))


def test_live_iso_dest_that_is_a_directory(tmp_path):
    with pytest.raises(IsoError, match="give the ISO's file name, such as %s" % os.path.join(tmp_path, "live.iso")):
        check_params(dict(block_size=131072, hostname="a", work_dir=None), str(tmp_path))


@pytest.mark.parametrize(("name", "usable"), [
    ("distroclone-backup", True), ("root", True), ("a.b_c", True), ("../etc", False), ("a/b", False),
    (".hidden", False), ("", False)])
def test_snapper_config_names(name, usable):
    assert bool(sn.SNAPPER_CONFIG_NAME.match(name)) == usable


def test_write_atomically_replaces_a_link_and_sets_the_mode(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep\n")
    (tmp_path / "live.iso.sha256").symlink_to(target)
    _fs.write_atomically(str(tmp_path / "live.iso.sha256"), "abc  live.iso\n", 0o600)
    assert target.read_text() == "keep\n"
    written = tmp_path / "live.iso.sha256"
    assert not written.is_symlink() and written.read_text() == "abc  live.iso\n"
    assert written.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["live.iso.sha256", "target"], "no temporary file is left"


def test_read_at_never_follows_a_link(tmp_path):
    (tmp_path / "real").write_text("text")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _fs.read_at(fd, "real", 2) == "te"
        assert _fs.read_at(fd, "link") is None
        assert _fs.read_at(fd, "missing") is None
    finally:
        os.close(fd)


@pytest.mark.parametrize(("flags", "names"), [
    (0, frozenset()), (_fs.FS_IMMUTABLE_FL, {"immutable"}), (_fs.FS_APPEND_FL | 0x80000, {"append-only"}),
    (_fs.UNCHANGEABLE_FLAGS, {"immutable", "append-only"})])
def test_flag_names(flags, names):
    assert _fs.flag_names(flags) == names


def test_flags_at_is_zero_for_links_and_missing(tmp_path):
    (tmp_path / "link").symlink_to("/etc/hostname")
    assert _fs.flags_at(None, str(tmp_path / "link")) == 0
    assert _fs.flags_at(None, str(tmp_path / "missing")) == 0
    assert _fs.flags_at(None, str(tmp_path)) & _fs.UNCHANGEABLE_FLAGS == 0


def test_free_space(tmp_path):
    space = _fs.free_space(str(tmp_path))
    assert space.free_bytes > 0 and not space.read_only
    assert space.free_inodes is None or space.free_inodes >= 0
