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
THROWAWAY_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "throwaway_root.py")
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


def throwaway_read_only():
    """What a throwaway root binds read-only beyond /usr and /etc: the venv and the collection."""
    return [os.path.dirname(os.path.dirname(sys.executable)), collections_root()]


def make_throwaway_root(path):
    """A scratch directory ready to be a throwaway root for run_module(root=path)."""
    sys.path.insert(0, os.path.dirname(THROWAWAY_ROOT))
    from throwaway_root import skeleton
    os.makedirs(path)
    skeleton(path, throwaway_read_only())
    return path


def run_module(work, module, params, fault=None, trace=None, check=False, diff=False, root=None):
    """Run liveclone.core.MODULE with params; with fault, under the injector;
    with trace (a file path), recording the argv of every tool it starts;
    with root (a scratch directory), chrooted into it as a throwaway root
    (tests/lib/throwaway_root.py), where `/` is that directory."""
    handle, args_path = tempfile.mkstemp(prefix=".module-args-", suffix=".json", dir=root or work)
    marker = os.path.join(work, ".fault-marker.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker)
    arguments = dict(params, _ansible_check_mode=check, _ansible_diff=diff)
    if root:
        arguments["_ansible_remote_tmp"] = "/tmp"  # the throwaway root's own tmpfs
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
    argv = [sys.executable, "-m", "ansible_collections.liveclone.core.plugins.modules." + module, args_path]
    if root:
        argv = (["unshare", "--mount", "--propagation", "private", "--", sys.executable, THROWAWAY_ROOT,
                 root] + throwaway_read_only() + ["--"] + argv[:-1] + ["/" + os.path.relpath(args_path, root)])
    returncode, out, seconds, max_rss, _cpu = timed(argv, env=env, new_session=True)
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
