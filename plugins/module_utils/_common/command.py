# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Runs the command-line tools the modules drive, as argv lists."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time

from .errors import LivecloneError

# Where Debian keeps the system tools that a non-login PATH may lack.
SYSTEM_BIN_DIRS = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]


# coreutils timeout's exit status when the limit struck (no tool we run exits 124 of itself).
TIMED_OUT = 124
# After its limit a command gets TERM, then KILL this many seconds later if it is still there.
KILL_AFTER = 30


class CommandError(LivecloneError):
    """A tool was missing or exited with a status that means failure."""


class CommandTimeout(CommandError):
    """A tool ran past the time limit it was given and was stopped."""


class CommandStalled(CommandError):
    """A watched tool read nothing for longer than it was allowed and was stopped."""


def _read_bytes(pids, names):
    """The bytes the processes among pids whose command is one of names have read so far."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/comm" % pid) as handle:
                if handle.read().strip() not in names:
                    continue
            with open("/proc/%d/io" % pid) as handle:
                total += int(next(line for line in handle if line.startswith("rchar:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue  # gone meanwhile
    return total


def _running(pid):
    """pid is a process that has not exited (a zombie has)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _process_tree(root):
    """root and the processes below it (from each process's parent in /proc/PID/stat)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    parents.setdefault(int(handle.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += parents.get(pid, [])
    return tree


class CommandRunner:
    """Thin wrapper over AnsibleModule.run_command: argv only, LC_ALL=C."""

    def __init__(self, module):
        self.module = module
        self._paths = {}

    def binary(self, name):
        if name not in self._paths:
            path = self.module.get_bin_path(name, opt_dirs=SYSTEM_BIN_DIRS)
            if path is None:
                raise CommandError(
                    "the command %r is not installed on this host; install the "
                    "packages in the collection's bindep.txt" % name
                )
            self._paths[name] = path
        return self._paths[name]

    def run_watched(self, argv, ok_rcs=(0,), stall_timeout=0, timeout=0, watched=()):
        """Run argv as run() does, watching it: when the processes named in
        watched (rsync's, among those it starts) read nothing for
        stall_timeout seconds, or it runs past timeout seconds, it and every
        process below it are stopped (TERM, then KILL KILL_AFTER seconds
        later) and CommandStalled or CommandTimeout is raised. run_command cannot
        watch a command as it runs, so this runs it with subprocess."""
        command = [self.binary(argv[0])] + [str(arg) for arg in argv[1:]]
        env = dict(os.environ, LC_ALL="C")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            # In this process's group: whatever stops this run (a kill of its group) stops the copy too.
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                       close_fds=True)
            started = last_progress = time.monotonic()
            progress, failure = -1, None
            while process.poll() is None:
                try:
                    process.wait(timeout=1)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                reading = _read_bytes(_process_tree(process.pid), watched) if stall_timeout else 0
                if reading != progress:
                    progress, last_progress = reading, now
                if timeout and now - started > timeout:
                    failure = CommandTimeout("%s did not finish within %d seconds and was stopped" % (argv[0], timeout))
                elif stall_timeout and now - last_progress > stall_timeout:
                    failure = CommandStalled("%s read nothing for %d seconds and was stopped"
                                             % (argv[0], stall_timeout))
                if failure:
                    self._stop_tree(process)
                    raise failure
            out.seek(0)
            err.seek(0)
            stdout, stderr = (data.decode("utf-8", "replace") for data in (out.read(), err.read()))
        if process.returncode not in ok_rcs:
            raise CommandError("%s exited with status %d: %s" % (
                " ".join([argv[0]] + [str(arg) for arg in argv[1:]]), process.returncode,
                (stderr or stdout or "").strip()))
        return process.returncode, stdout

    @staticmethod
    def _stop_tree(process):
        """TERM to the command and every process below it (rsync's receiver, the ssh it
        started), KILL to those still there KILL_AFTER seconds later."""
        tree = _process_tree(process.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + KILL_AFTER
            while True:
                process.poll()  # reaps the command; the others are not this process's children
                tree = [pid for pid in tree if _running(pid)]
                if not tree or sig == signal.SIGKILL or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if not tree:
                return
        process.wait()

    def run_capture(self, argv, timeout=None):
        """Run argv whatever it exits with; return (rc, stdout, stderr), for a caller that reads both.
        With timeout, as run() does; rc is then TIMED_OUT or 137 when the limit struck."""
        return self.module.run_command(self._limited(argv, timeout), environ_update={"LC_ALL": "C"}, check_rc=False)

    def _limited(self, argv, timeout):
        """argv with its binary's path, under coreutils timeout when a limit is given."""
        command = [self.binary(argv[0])] + [str(arg) for arg in argv[1:]]
        if timeout:
            command = [self.binary("timeout"), "--kill-after=%d" % KILL_AFTER, str(timeout)] + command
        return command

    def run(self, argv, ok_rcs=(0,), data=None):
        """Run argv; return (rc, stdout). Raise CommandError unless rc is in ok_rcs."""
        command = self._limited(argv, None)
        rc, out, err = self.module.run_command(
            command, environ_update={"LC_ALL": "C"}, data=data, check_rc=False
        )
        if rc not in ok_rcs:
            detail = (err or out or "").strip()
            raise CommandError(
                "%s exited with status %d: %s" % (" ".join([argv[0]] + [str(arg) for arg in argv[1:]]), rc, detail)
            )
        return rc, out
