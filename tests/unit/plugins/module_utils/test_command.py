# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""CommandRunner.run_watched with real processes: a command that reads
nothing is stopped after its stall limit, one that keeps reading after its
overall limit, and every process it started goes with it."""

from __future__ import annotations

import shutil
import time

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._common import command as _command
from ansible_collections.liveclone.core.plugins.module_utils._common.command import (
    CommandError,
    CommandRunner,
    CommandStalled,
    CommandTimeout,
)


class Module:
    """What CommandRunner uses of AnsibleModule."""

    @staticmethod
    def get_bin_path(name, opt_dirs=()):
        return shutil.which(name)


def gone(pid, seconds=5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % pid) as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_a_command_that_finishes_gives_its_output_and_status():
    runner = CommandRunner(Module())
    assert runner.run_watched(["sh", "-c", "echo copied; exit 24"], ok_rcs=(0, 24), stall_timeout=5,
                              timeout=30, watched=("sh",)) == (24, "copied\n")
    with pytest.raises(CommandError, match="exited with status 3: broken"):
        runner.run_watched(["sh", "-c", "echo broken >&2; exit 3"], stall_timeout=5, watched=("sh",))


def test_a_command_whose_watched_processes_read_nothing_is_stopped_with_its_children(tmp_path, monkeypatch):
    """sh starts a child sleep that ignores TERM and reads nothing: both go, sleep by KILL."""
    monkeypatch.setattr(_command, "KILL_AFTER", 2)
    pid_file = tmp_path / "child"
    script = "sh -c 'trap \"\" TERM; echo $$ > %s; exec sleep 600' & wait" % pid_file
    runner = CommandRunner(Module())
    started = time.monotonic()
    with pytest.raises(CommandStalled, match="read nothing for 2 seconds and was stopped"):
        runner.run_watched(["sh", "-c", script], stall_timeout=2, watched=("sleep",))
    # 2 s of nothing read, then TERM, then KILL when the sleep ignored it (the KILL grace, 2 s here).
    assert time.monotonic() - started < 10
    assert gone(int(pid_file.read_text())), "the command's child is still running"


def test_a_command_that_keeps_reading_is_stopped_by_the_overall_limit():
    runner = CommandRunner(Module())
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="did not finish within 3 seconds"):
        runner.run_watched(["dd", "if=/dev/zero", "of=/dev/null", "bs=1"], stall_timeout=2, timeout=3,
                           watched=("dd",))
    assert 3 <= time.monotonic() - started < 10


def test_reading_counts_as_progress(tmp_path):
    """dd reads a little every half second for 4 s: never 2 s without reading, so it finishes."""
    script = "for i in 1 2 3 4 5 6 7 8; do head -c 1 /dev/zero; sleep 0.5; done"
    runner = CommandRunner(Module())
    rc, _out = runner.run_watched(["sh", "-c", script], stall_timeout=2, watched=("sh", "head"))
    assert rc == 0
