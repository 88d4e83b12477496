"""Run a liveclone.core module as its own process, the way AnsibleModule
allows (python -m ... ARGS_FILE), optionally under the fault injector or the
tracer (tests/reliability/inject). Shared by the reliability tier and bench/."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

INJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reliability/inject")
MODULE_TIMEOUT = 1800


class ModuleRun:
    """One module run's outcome: result, exit status, fault marker, time and peak memory."""

    def __init__(self, result, returncode, marker, output, seconds, max_rss_kib):
        self.result = result
        self.returncode = returncode
        self.marker = marker
        self.output = output
        self.seconds = seconds
        self.max_rss_kib = max_rss_kib

    @property
    def killed(self):
        return self.returncode == -signal.SIGKILL

    @property
    def failed(self):
        return self.result is None or bool(self.result.get("failed"))

    @property
    def msg(self):
        return (self.result or {}).get("msg", self.output)


def collections_root():
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("ANSIBLE_COLLECTIONS_PATH", "").split(os.pathsep)[0] or os.path.normpath(
        os.path.join(here, "../../../../.."))


def timed(argv, env=None, timeout=MODULE_TIMEOUT, new_session=False):
    """Run argv; return (returncode, output, seconds, peak RSS in KiB of the
    largest process of its tree, CPU seconds (user + system) of the tree),
    from wait4."""
    with tempfile.TemporaryFile() as out:
        started = time.monotonic()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=new_session)
        timer = threading.Timer(timeout, lambda: os.kill(process.pid, signal.SIGKILL))
        timer.start()
        try:
            _pid, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        seconds = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return (process.returncode, out.read().decode("utf-8", "replace"), seconds, usage.ru_maxrss,
                usage.ru_utime + usage.ru_stime)


def run_module(work, module, params, fault=None, trace=None, check=False, diff=False):
    """Run liveclone.core.MODULE with params; with fault, under the injector;
    with trace (a file path), recording the argv of every tool it starts."""
    handle, args_path = tempfile.mkstemp(prefix=".module-args-", suffix=".json", dir=work)
    marker = os.path.join(work, ".fault-marker.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker)
    arguments = dict(params, _ansible_check_mode=check, _ansible_diff=diff)
    with os.fdopen(handle, "w") as args_file:
        json.dump({"ANSIBLE_MODULE_ARGS": arguments}, args_file)
    paths = ([INJECT] if fault or trace else []) + [collections_root()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    env.pop("LIVECLONE_FAULT", None)
    env.pop("LIVECLONE_TRACE", None)
    if fault:
        env["LIVECLONE_FAULT"] = json.dumps(dict(fault, marker=marker))
    if trace:
        env["LIVECLONE_TRACE"] = trace
    returncode, out, seconds, max_rss, _cpu = timed(
        [sys.executable, "-m", "ansible_collections.liveclone.core.plugins.modules." + module, args_path],
        env=env, new_session=True)
    os.unlink(args_path)
    result = None
    if "{" in out:
        with contextlib.suppress(ValueError):
            result = json.loads(out[out.index("{"):])
    fired = None
    if os.path.exists(marker):
        with open(marker) as marker_file:
            fired = json.load(marker_file)
        os.unlink(marker)
    return ModuleRun(result, returncode, fired, out, seconds, max_rss)
