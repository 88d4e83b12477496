# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""The one lock the modules take: flock on a directory or a lock file, with
a timeout, and optionally a holder file naming who holds it.

The kernel drops an flock when its holder dies, so a killed run never leaves
a lock behind. A lock on a directory is taken on a descriptor opened without
following a link; its holder file is written and removed beneath that
descriptor (a link there is replaced, never followed)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

from .errors import LivecloneError
from .fs import read_at, write_at

# For a caller whose module has no timeout parameter: longer than any run
# the collection makes (a live ISO of a large host included), short of forever.
DEFAULT_TIMEOUT = 3 * 3600
_POLL = 0.2


class LockError(LivecloneError):
    """The lock stayed held by another run for the whole timeout."""


class Lock:
    """flock held for a `with` block (or between acquire() and release()).

    path is a directory, or with create a lock file made if missing (mode
    0600). fd, when given, is an open descriptor of path to lock instead (the
    caller keeps and closes it). busy is the message of a timeout, formatted
    with path, holder and timeout. holder_name is a file in the locked
    directory that claim() writes and release() removes; it is read for the
    message of a run that times out.
    """

    def __init__(self, path, timeout, busy, create=False, fd=None, holder_name=None):
        self.path = path
        self.timeout = timeout
        self.busy = busy
        self.create = create
        self.holder_name = holder_name
        self.fd = fd
        self._owns_fd = fd is None
        self.claimed = False

    def acquire(self):
        if self._owns_fd:
            if self.create:
                flags, mode = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            else:
                flags, mode = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, 0
            self.fd = os.open(self.path, flags, mode)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self.holder()
                    self._close()
                    raise LockError(self.busy % {"path": self.path, "holder": holder,
                                                 "timeout": self.timeout}) from None
                time.sleep(_POLL)

    def holder(self):
        """What the holder file says about who holds the lock."""
        text = read_at(self.fd, self.holder_name, 200) if self.holder_name else None
        return (text or "holder unknown").strip()

    def claim(self):
        """Record this process as the holder (only once its run has passed its checks)."""
        write_at(self.fd, self.holder_name, "pid %d on %s since %s\n" % (
            os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S")))
        self.claimed = True

    def release(self):
        if self.claimed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.holder_name, dir_fd=self.fd)
            self.claimed = False
        if not self._owns_fd:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._close()

    def _close(self):
        if self._owns_fd and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
