# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Filesystem helpers shared by the modules: mounts, paths, inode flags,
free space, atomic writes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import stat
import struct
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
# Kernel filesystems: nothing the modules make may be put on them.
PSEUDO_FSTYPES = frozenset((
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
    "pstore", "bpf", "configfs", "fusectl", "efivarfs", "mqueue", "hugetlbfs", "autofs", "binfmt_misc"))


@dataclass(frozen=True)
class Mount:
    point: str
    device: str  # major:minor of the filesystem
    fstype: str
    source: str


def _unescape(text):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def read_mounts(mountinfo=MOUNTINFO):
    """The mounts this process sees, in mountinfo order."""
    with open(mountinfo) as handle:
        return parse_mounts(handle.read())


def parse_mounts(text):
    """The mounts of a mountinfo text (this host's, or a client's as the controller gathered it)."""
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        pre, _sep, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(fields) < 5 or not fields[4].startswith("/"):
            raise ValueError("a mountinfo line without a mount point: %r" % line[:120])
        mounts.append(Mount(_unescape(fields[4]), fields[2],
                            post_fields[0] if post_fields else "",
                            _unescape(post_fields[1]) if len(post_fields) > 1 else ""))
    return mounts


def mount_of(path, mounts=None):
    """The mount that holds path (the nearest existing ancestor of it)."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    path = os.path.realpath(path)
    return max((m for m in mounts or read_mounts() if is_within(path, m.point)), key=lambda m: len(m.point))


def symlink_on(path, include_last=True):
    """The first component of the absolute path that is a symlink, or None.
    A path through a link lands somewhere other than it says."""
    parts = os.path.normpath(path).split("/")[1:]
    current = "/"
    for part in parts if include_last else parts[:-1]:
        current = os.path.join(current, part)
        if os.path.islink(current):
            return current
    return None


def check_real_path(name, path, include_last=True):
    """None, or the message refusing parameter `name` = path because it runs
    through a symlink or lies on a kernel filesystem."""
    link = symlink_on(path, include_last)
    if link:
        return ("%s %s runs through the symlink %s (to %s); give the real path, %s" % (
            name, path, link, os.readlink(link), os.path.realpath(path)))
    fstype = mount_of(path).fstype
    if fstype in PSEUDO_FSTYPES:
        return "%s %s is on the kernel's %s filesystem; choose a path on a disk" % (name, path, fstype)
    return None


def canonical_path(path):
    """path with '//', '/./', '..' and trailing slashes resolved as text (the
    kernel reads '//' as '/', os.path.normpath keeps it). Every rule on a path
    parameter is checked on this form, and check_real_path then refuses the
    path when a link on the way would make the kernel resolve it elsewhere."""
    if not path:
        return path
    canonical = os.path.normpath(path)
    if canonical.startswith("//"):
        canonical = "/" + canonical.lstrip("/")
    return canonical


# What an errno means to the person running the module, and what to do.
_OS_ERROR_ADVICE = {
    errno.EROFS: "the filesystem is mounted read-only; remount it read-write or choose a path on another one",
    errno.ENOSPC: "the filesystem is full (of data or of inodes: see df -h and df -i); free space or grow it",
    errno.EDQUOT: "a disk quota is exhausted; raise it or free space",
    errno.EPERM: "the kernel refused; if the file is immutable or append-only (lsattr), clear it with chattr -i -a",
    errno.EACCES: "permission denied; run as root, and check the mount options (noexec, nosuid) and any LSM",
    errno.ENOTDIR: "a component of the path is not a directory; fix the path",
    errno.EISDIR: "a directory stands where a file is expected; move it away",
    errno.ELOOP: "a symlink stands where a real file or directory is expected; it is never followed, remove it",
    errno.ENAMETOOLONG: "the name is too long for the filesystem; choose a shorter one",
    errno.EBUSY: "the path is in use (a mount point, or held open); unmount or stop what uses it",
}


def describe_os_error(error, doing=None):
    """One message for an OSError: what failed on which path, why, what to do."""
    path = error.filename or ""
    if error.filename2:
        path = "%s -> %s" % (error.filename, error.filename2)
    cause = error.strerror or str(error)
    advice = _OS_ERROR_ADVICE.get(error.errno, "fix the cause and run again")
    return "%s%s: %s; %s. Nothing more was changed." % (
        doing + " " if doing else "", path or "(no path)", cause, advice)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_path_text(name, path):
    """None, or the message refusing path parameter `name` for a control
    character (a newline would split the config lines a path goes into)."""
    if path and _CONTROL.search(path):
        return "%s %r holds a control character (a newline, tab or the like); rename the path" % (name, path)
    return None


def is_within(path, parent):
    """Whether path is parent or lies below it."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def write_at(dir_fd, name, text, mode=0o644, sync=False):
    """Put text at name in dir_fd as a new regular file, atomically: a
    temporary file beside it (never through a link), then rename over it;
    with sync, the file and then the directory are flushed to disk."""
    temp = ".%s.%s" % (name, os.urandom(4).hex())
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if sync:
                os.fsync(handle.fileno())
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    if sync:
        os.fsync(dir_fd)


def read_at(dir_fd, name, limit=-1):
    """The text of the regular file name in dir_fd; None if it is missing,
    not a regular file, or a symlink (which is never followed)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        return handle.read(limit).decode("utf-8", "replace")


def write_atomically(path, text, mode=0o644):
    """Write text to a temporary file beside path, fsync it, rename it over
    path and fsync the directory: path holds the old text or the new, never part."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_at(fd, os.path.basename(path), text, mode, sync=True)
    finally:
        os.close(fd)


def create_file(path, text="", mode=0o644):
    """Write text to path as a new file. Whatever was at path, a symlink
    included, is replaced, never written through: a link planted in a backup
    volume must not turn a marker into a write to the link's target."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def read_file(path, limit=None):
    """The text of the regular file at path; None if it is missing, not a
    regular file, or a symlink (which is never followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        return handle.read(limit if limit is not None else -1).decode("utf-8", "replace")


# FS_IOC_GETFLAGS and the lsattr flags (linux/fs.h) that make a file refuse changes.
FS_IOC_GETFLAGS = 0x80086601
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20
UNCHANGEABLE_FLAGS = FS_IMMUTABLE_FL | FS_APPEND_FL


def inode_flags(fd):
    """The inode flags (lsattr) of an open file; 0 where the filesystem has none (FAT, tmpfs)."""
    try:
        return struct.unpack("i4x", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8)))[0]
    except OSError:
        return 0


def flags_at(dir_fd, name):
    """The inode flags of the regular file or directory name in dir_fd (a
    path when dir_fd is None); 0 for links, devices and what is missing."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        return 0
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return 0
    try:
        return inode_flags(fd)
    finally:
        os.close(fd)


def flag_names(flags):
    """{"immutable", "append-only"}: those of the unchangeable flags that are set."""
    return frozenset(name for bit, name in ((FS_IMMUTABLE_FL, "immutable"), (FS_APPEND_FL, "append-only"))
                     if flags & bit)


@dataclass(frozen=True)
class Space:
    """What a filesystem has left, as statvfs tells it."""

    free_bytes: int
    free_inodes: int | None  # None where the filesystem counts no inodes (btrfs, FAT)
    read_only: bool


def free_space(path):
    """The Space of the filesystem that holds path (or an open descriptor)."""
    vfs = os.statvfs(path)
    return Space(vfs.f_bavail * vfs.f_frsize, vfs.f_favail if vfs.f_files else None,
                 bool(vfs.f_flag & os.ST_RDONLY))


def commit_filesystem(path):
    """syncfs(2) of the filesystem that holds path (best effort). btrfs gives the
    space of deleted files (a failed copy's temporary file) back only when it
    commits its transaction, up to 30 s later: until then statvfs counts it as used."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ctypes.CDLL(None, use_errno=True).syncfs(fd)
        finally:
            os.close(fd)
