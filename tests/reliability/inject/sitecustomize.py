"""Fault injection for the reliability tier, and tracing for bench/, loaded
by Python at start-up (this directory is put first on PYTHONPATH of one
module run only).

LIVECLONE_TRACE names a file that gets one JSON line per tool the module
starts: its argv and how long it ran (bench/ runs the same argv bare).

LIVECLONE_FAULT holds a JSON spec; when its moment comes, the module's whole
process group (the module was started as a session leader, so this is the
module and every tool it runs) gets SIGKILL, after the spec's marker file
records that the fault fired and whether the tool was still running. The
modules carry no test hook: the moments are taken from outside, at the
calls the modules make.

  {"on": "spawn", "tool": T, "args": [...], "moment": "before"}
      just before the module starts tool T with all of args in its argv
  {"on": "spawn", ..., "moment": "during", "delay": S | "when_changes": GLOB
   | "when_modified": PATH | "when_larger": [GLOB, BYTES]}
      once T has run S seconds; once the paths matching GLOB differ from
      those at T's start (a snapshot appears, a deleted one goes); once T
      has written to PATH; once a file matching GLOB holds more than BYTES;
      with "slow_syscalls": [CALL...], "slow_seconds": S, T runs under
      strace, which delays each such call of T's by S seconds
  {"on": "fsync", "name": N}
      when the module syncs its temporary copy of N, before moving it over N
"""

import contextlib
import glob
import json
import os
import signal
import subprocess
import threading
import time

SPEC = json.loads(os.environ.get("LIVECLONE_FAULT") or "null")


def _fire(tool_running):
    with open(SPEC["marker"], "w") as handle:
        json.dump({"fired": True, "tool_running": tool_running}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _running(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _matches(argv):
    if isinstance(argv, (str, bytes)):
        return False
    # AnsibleModule.run_command hands Popen bytes.
    argv = [os.fsdecode(word) if isinstance(word, bytes) else str(word) for word in argv]
    words = [os.path.basename(word) for word in argv]
    if SPEC["tool"] not in words:
        return False
    rest = argv[words.index(SPEC["tool"]) + 1:]
    return all(arg in rest for arg in SPEC.get("args", [])) and not any(
        arg in rest for arg in SPEC.get("without", []))


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _largest(pattern):
    sizes = [0]
    for path in glob.glob(pattern):
        with contextlib.suppress(OSError):
            sizes.append(os.stat(path).st_size)
    return max(sizes)


def _moment_came():
    """A test of whether the moment has come, given the state at the tool's start."""
    if "when_changes" in SPEC:
        first = set(glob.glob(SPEC["when_changes"]))
        return lambda: set(glob.glob(SPEC["when_changes"])) != first
    if "when_modified" in SPEC:
        first = _mtime(SPEC["when_modified"])
        return lambda: _mtime(SPEC["when_modified"]) != first
    if "when_larger" in SPEC:
        pattern, size = SPEC["when_larger"]
        return lambda: _largest(pattern) > size
    deadline = time.monotonic() + SPEC.get("delay", 0)
    return lambda: time.monotonic() >= deadline


def _watch(pid, came):
    while _running(pid) and not came():
        time.sleep(0.0002)
    _fire(_running(pid))


def _slowed(argv):
    """argv run under strace, which delays each of the slowed system calls
    (their entry) by slow_seconds: a window in which the tool is certainly
    running after the moment. strace and the tool share the process group
    the fault kills."""
    calls = ",".join(SPEC["slow_syscalls"])
    prefix = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=" + calls,
              "-e", "inject=%s:delay_enter=%d" % (calls, SPEC["slow_seconds"] * 1000000)]
    if isinstance(argv[0], bytes):
        prefix = [os.fsencode(word) for word in prefix]
    return prefix + list(argv)


class _FaultPopen(subprocess.Popen):
    def __init__(self, args, *rest, **kwargs):
        hit = _matches(args)
        if hit and SPEC["moment"] == "before":
            _fire(False)
        came = _moment_came() if hit else None
        if hit and SPEC.get("slow_syscalls"):
            args = _slowed(args)
        super().__init__(args, *rest, **kwargs)
        if hit:
            threading.Thread(target=_watch, args=(self.pid, came), daemon=True).start()


def _fault_fsync(fd, _fsync=os.fsync):
    try:
        name = os.path.basename(os.readlink("/proc/self/fd/%d" % fd))
    except OSError:
        name = ""
    if name.startswith("." + SPEC["name"] + "."):
        _fire(False)
    _fsync(fd)


TRACE = os.environ.get("LIVECLONE_TRACE")


class _TracePopen(subprocess.Popen):
    def __init__(self, args, *rest, **kwargs):
        self._trace_argv = [os.fsdecode(word) if isinstance(word, bytes) else str(word) for word in args]
        self._trace_start = time.monotonic()
        super().__init__(args, *rest, **kwargs)

    def _record(self):
        if self.returncode is not None and not getattr(self, "_trace_done", False):
            self._trace_done = True
            with open(TRACE, "a") as handle:
                handle.write(json.dumps({"argv": self._trace_argv, "returncode": self.returncode,
                                         "seconds": round(time.monotonic() - self._trace_start, 3)}) + "\n")

    def wait(self, *args, **kwargs):
        code = super().wait(*args, **kwargs)
        self._record()
        return code

    def poll(self):
        code = super().poll()
        self._record()
        return code


if TRACE:
    subprocess.Popen = _TracePopen
elif SPEC and SPEC["on"] == "spawn":
    subprocess.Popen = _FaultPopen
elif SPEC and SPEC["on"] == "fsync":
    os.fsync = _fault_fsync
