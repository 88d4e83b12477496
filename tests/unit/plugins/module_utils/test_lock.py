# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import fcntl
import os

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._common.lock import Lock, LockError

BUSY = "%(path)s is locked (%(holder)s); waited %(timeout)d s"


def test_a_held_directory_lock_times_out_naming_the_holder(tmp_path):
    with Lock(str(tmp_path), 1, BUSY, holder_name=".holder") as first:
        first.claim()
        assert "pid %d on " % os.getpid() in (tmp_path / ".holder").read_text()
        with pytest.raises(LockError, match=r"is locked \(pid %d on .*\); waited 0 s" % os.getpid()):
            Lock(str(tmp_path), 0, BUSY, holder_name=".holder").acquire()
    assert not (tmp_path / ".holder").exists(), "the holder file goes with the lock"
    with Lock(str(tmp_path), 0, BUSY):
        pass


def test_an_unclaimed_lock_writes_nothing_and_says_holder_unknown(tmp_path):
    with Lock(str(tmp_path), 0, BUSY, holder_name=".holder"):
        assert os.listdir(tmp_path) == []
        with pytest.raises(LockError, match="holder unknown"):
            Lock(str(tmp_path), 0, BUSY, holder_name=".holder").acquire()


def test_a_lock_file_is_made_and_waits_for_another_process(tmp_path):
    path = tmp_path / "configs.lock"
    other = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        with pytest.raises(LockError, match="waited 0 s"):
            Lock(str(path), 0.3, BUSY, create=True).acquire()
    finally:
        os.close(other)
    with Lock(str(path), 0, BUSY, create=True):
        assert path.stat().st_mode & 0o777 == 0o600


def test_a_given_descriptor_is_locked_and_left_open(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with Lock(str(tmp_path), 0, BUSY, fd=fd), pytest.raises(LockError):
            Lock(str(tmp_path), 0, BUSY).acquire()
        os.fstat(fd)  # still open
        with Lock(str(tmp_path), 0, BUSY):
            pass
    finally:
        os.close(fd)


def test_a_link_is_never_locked_through(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError):
        Lock(str(tmp_path / "link"), 0, BUSY).acquire()
