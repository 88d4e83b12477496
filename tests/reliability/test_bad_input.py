"""Invalid parameters across the three modules: each run fails with a
message that names the parameter and says what to do, and changes nothing
(files, mounts and loop devices compared before and after)."""

from __future__ import annotations

import os
import re

import pytest
from conftest import run, state_of
from module_run import run_module

# (module, parameters, the parameter the message must name, what it must say
# to do). "{w}" is the case's work directory, prepared by the fixture below:
# src/ (a small tree with etc/os-release, backup/ and work/ in it), store.img
# (a 64 MiB ext4 store), file.txt, dir/, link-to-elsewhere -> elsewhere/,
# link-to-file -> victim.txt. Paths outside the sandbox (/, /proc) are only
# tried for real once a check-mode run has refused them.
CASES = [
    # backstore
    ("backstore", {"path": "store.img", "size": "64M"}, "path", r"give an absolute path"),
    ("backstore", {"path": "{w}/new.img", "size": "banana"}, "size", r"give a number of MiB"),
    ("backstore", {"path": "{w}/new.img", "size": "-5G"}, "size", r"give a number of MiB|greater than zero"),
    ("backstore", {"path": "{w}/new.img", "size": 0}, "size", r"greater than zero"),
    ("backstore", {"path": "{w}/new.img", "size": "900T"}, "size", r"choose a smaller size"),
    ("backstore", {"path": "{w}/new.img", "size": "16M", "fstype": "xfs"}, "size", r"choose at least"),
    ("backstore", {"path": "{w}/new.img", "size": "64M", "fstype": "ntfs"}, "fstype", r"must be one of"),
    ("backstore", {"path": "{w}/new.img", "size": "64M", "layout": "windows"}, "layout", r"must be one of"),
    ("backstore", {"path": "{w}/new.img", "size": "64M", "layout": "archiso"}, "label", r"missing"),
    ("backstore", {"path": "{w}/new.img", "size": "64M", "label": "a-label-far-too-long"}, "label",
     r"longer than the 16 bytes ext4 holds; shorten it"),
    ("backstore", {"path": "{w}/new.img", "size": "64M", "allocation": "dense"}, "allocation", r"must be one of"),
    ("backstore", {"path": "/", "size": "64M"}, "path", r"give the path of an image file"),
    ("backstore", {"path": "/proc/liveclone.img", "size": "64M"}, "path", r"choose a path on a disk"),
    ("backstore", {"path": "{w}/store.img", "size": "32M"}, "size", r"never shrunk"),
    ("backstore", {"path": "{w}/file.txt", "size": "64M"}, "path", r"move it away or choose another path"),
    ("backstore", {"path": "{w}/link-to-file", "size": "64M"}, "path", r"symlink.*give the real path"),
    ("backstore", {"path": "{w}/link-to-elsewhere/liveclone.img", "size": "64M"}, "path",
     r"symlink.*give the real path"),
    # snapper_cache
    ("snapper_cache", {"base_dir": "/", "source": "{w}/src"}, "base_dir", r"give a directory such as"),
    ("snapper_cache", {"base_dir": "backup", "source": "{w}/src"}, "base_dir", r"give an absolute path"),
    ("snapper_cache", {"base_dir": "/proc", "source": "{w}/src"}, "base_dir", r"choose a path on a disk"),
    ("snapper_cache", {"base_dir": "{w}/missing", "source": "{w}/src"}, "base_dir", r"mount the backup volume"),
    ("snapper_cache", {"base_dir": "{w}/src/backup", "source": "{w}/src"}, "base_dir",
     r"add /backup to exclude, or move base_dir"),
    ("snapper_cache", {"base_dir": "{w}/dir", "source": "{w}/file.txt"}, "source", r"give a directory"),
    ("snapper_cache", {"base_dir": "{w}/dir", "source": "{w}/src", "keep": 0}, "keep", r"set keep: 1 or more"),
    ("snapper_cache", {"base_dir": "{w}/dir", "source": "{w}/src", "keep": "many"}, "keep", r"convert to int"),
    ("snapper_cache", {"base_dir": "{w}/dir", "source": "{w}/src", "lock_timeout": -1}, "lock_timeout",
     r"0 or more"),
    ("snapper_cache", {"base_dir": "{w}/dir", "source": "{w}/src", "state": "restored"}, "restore_dest",
     r"missing"),
    ("snapper_cache", {"base_dir": "{w}/dir", "source": "{w}/src", "versioning": "snapper"}, "versioning",
     r"btrfs"),
    ("snapper_cache", {"base_dir": "{w}/dir", "source": "{w}/src", "snapper_config": "../etc"},
     "snapper_config", r"letters, digits"),
    ("snapper_cache", {"base_dir": "{w}/link-to-elsewhere", "source": "{w}/src"}, "base_dir",
     r"symlink.*give the real path"),
    ("snapper_cache", {"base_dir": "{w}/dir", "source": "{w}/src", "include_home": "maybe"}, "include_home",
     r"convert to bool"),
    # live_iso
    ("live_iso", {"dest": "live.iso", "source": "path", "source_path": "{w}/src"}, "dest",
     r"give an absolute path"),
    ("live_iso", {"dest": "{w}/missing/live.iso", "source": "path", "source_path": "{w}/src"}, "dest",
     r"create it first"),
    ("live_iso", {"dest": "{w}/src/live.iso", "source": "path", "source_path": "{w}/src"}, "dest",
     r"outside the source"),
    ("live_iso", {"dest": "{w}/dir", "source": "path", "source_path": "{w}/src"}, "dest", r"file name"),
    ("live_iso", {"dest": "{w}/live.iso", "source": "path"}, "source_path", r"missing"),
    ("live_iso", {"dest": "{w}/live.iso", "source": "path", "source_path": "/proc"}, "source_path",
     r"choose a path on a disk"),
    ("live_iso", {"dest": "{w}/live.iso", "source": "path", "source_path": "{w}/nowhere"}, "source_path",
     r"does not exist"),
    ("live_iso", {"dest": "{w}/live.iso", "source": "path", "source_path": "{w}/src", "compression": "rar"},
     "compression", r"must be one of"),
    ("live_iso", {"dest": "{w}/live.iso", "source": "path", "source_path": "{w}/src", "compression": "lz4",
                  "compression_level": 5}, "compression_level", r"leave it unset"),
    ("live_iso", {"dest": "{w}/live.iso", "source": "path", "source_path": "{w}/src", "label": "L" * 40},
     "label", r"longer than the 32 bytes an ISO volume id holds; shorten it"),
    ("live_iso", {"dest": "{w}/live.iso", "source": "path", "source_path": "{w}/src", "block_size": 1000},
     "block_size", r"power of two"),
    ("live_iso", {"dest": "{w}/live.iso", "source": "path", "source_path": "{w}/src", "checksums": ["crc32"]},
     "checksums", r"must be one or more of"),
    ("live_iso", {"dest": "{w}/live.iso", "source": "path", "source_path": "{w}/src", "hostname": "bad host!"},
     "hostname", r"letters, digits"),
    ("live_iso", {"dest": "{w}/live.iso", "source": "path", "source_path": "{w}/src",
                  "work_dir": "{w}/src/work"}, "work_dir", r"outside the source"),
    ("live_iso", {"dest": "{w}/live.iso", "source": "cache", "cache_dir": "{w}/missing"}, "cache_dir",
     r"does not exist"),
    ("live_iso", {"dest": "{w}/link-to-elsewhere/live.iso", "source": "path", "source_path": "{w}/src"}, "dest",
     r"symlink.*give the real path"),
]


def expand(value, work):
    if isinstance(value, str):
        return value.replace("{w}", work)
    if isinstance(value, list):
        return [expand(item, work) for item in value]
    return value


@pytest.fixture(scope="module")
def bad_input_dir(sandbox):
    work = os.path.join(sandbox, "bad-input")
    for name in ("src/etc", "src/backup", "src/work", "dir", "elsewhere"):
        os.makedirs(os.path.join(work, name))
    with open(os.path.join(work, "src/etc/os-release"), "w") as handle:
        handle.write("ID=debian\n")
    for name in ("file.txt", "victim.txt"):
        with open(os.path.join(work, name), "w") as handle:
            handle.write("not to be touched\n")
    os.symlink(os.path.join(work, "elsewhere"), os.path.join(work, "link-to-elsewhere"))
    os.symlink(os.path.join(work, "victim.txt"), os.path.join(work, "link-to-file"))
    made = run_module(sandbox, "backstore", {"path": os.path.join(work, "store.img"), "size": "64M"})
    assert not made.failed, made.msg
    return work


def test_the_table_is_large_enough():
    assert len(CASES) >= 30
    assert {case[0] for case in CASES} == {"backstore", "snapper_cache", "live_iso"}


@pytest.mark.parametrize(("module", "params", "parameter", "fix"), CASES,
                         ids=["%s-%s-%d" % (case[0], case[2], index) for index, case in enumerate(CASES)])
def test_bad_input_is_refused_cleanly(sandbox, bad_input_dir, tally, module, params, parameter, fix):
    tally["bad inputs tried"] += 1
    params = {key: expand(value, bad_input_dir) for key, value in params.items()}
    before = state_of(bad_input_dir)
    loops_before = run(["losetup", "--list", "--noheadings"]).stdout
    etc_before = os.stat("/etc").st_mtime_ns

    guard = run_module(sandbox, module, params, check=True)
    assert guard.failed, "accepted in check mode, so not run for real: %s" % (guard.result or {}).get("operations")
    outcome = run_module(sandbox, module, params)

    assert outcome.result is not None, "no result: %s" % outcome.output[-2000:]
    assert outcome.failed, "accepted: %s" % outcome.result.get("operations")
    message = outcome.msg
    assert re.search(r"\b%s\b" % re.escape(parameter), message), "the message does not name %s: %s" % (
        parameter, message)
    assert re.search(fix, message), "the message does not say what to do (%s): %s" % (fix, message)
    assert "Traceback" not in outcome.output
    assert state_of(bad_input_dir) == before, "the refused run changed files"
    assert run(["losetup", "--list", "--noheadings"]).stdout == loops_before
    assert os.stat("/etc").st_mtime_ns == etc_before
    tally["bad inputs rejected cleanly"] += 1
