# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""btrfs as the collection uses it: a wrapper of the btrfs command line,
then read-only facts of open descriptors and stat results (the model is
community.general's _btrfs.py). A subvolume is deleted one way only: by name
from its parent's descriptor, so a link in its place is refused, never
followed."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

# The inode number of every subvolume's root directory.
SUBVOLUME_INODE = 256

# Linux ioctls: a subvolume deleted by name from its parent's descriptor (the
# same call `btrfs subvolume delete` makes), and the filesystem's id.
BTRFS_IOC_SNAP_DESTROY = 0x5000940F
BTRFS_IOC_FS_INFO = 0x8400941F
BTRFS_PATH_NAME_MAX = 4087


def is_subvolume(info):
    """Whether a stat result (of a path on btrfs) is the root directory of a subvolume."""
    return stat.S_ISDIR(info.st_mode) and info.st_ino == SUBVOLUME_INODE


def fsid(fd):
    """The btrfs filesystem id of an open file, or None off btrfs."""
    try:
        return fcntl.ioctl(fd, BTRFS_IOC_FS_INFO, bytes(1024))[16:32]
    except OSError:
        return None


def same_filesystem(fd_a, fd_b):
    """Whether two open directories are on one filesystem: by device number,
    or for btrfs (each subvolume its own device number) by filesystem id."""
    if os.fstat(fd_a).st_dev == os.fstat(fd_b).st_dev:
        return True
    found = fsid(fd_a)
    return found is not None and found == fsid(fd_b)


def destroy_subvolume(dir_fd, name):
    """Delete the btrfs subvolume `name` in the directory dir_fd. The kernel
    looks the name up in that directory: a link there is refused (ENOTDIR),
    never followed."""
    encoded = os.fsencode(name)
    if len(encoded) > BTRFS_PATH_NAME_MAX or b"/" in encoded:
        raise OSError(errno.ENAMETOOLONG, "not one name of a subvolume", name)
    fcntl.ioctl(dir_fd, BTRFS_IOC_SNAP_DESTROY, bytearray(struct.pack("q4088s", 0, encoded)))


def filesystem_type(runner, path):
    """The type of the filesystem that holds path (findmnt), or None."""
    return runner.run(["findmnt", "-n", "-o", "FSTYPE", "--target", path])[1].strip() or None


def filesystem_uuid(runner, path):
    """The UUID of the filesystem that holds path (findmnt), or None."""
    return runner.run(["findmnt", "-n", "-o", "UUID", "--target", path])[1].strip() or None


def parse_show(out):
    """The `Key: value` lines of `btrfs subvolume show`, the first of each key."""
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key not in fields:
            fields[key] = value.strip()
    return fields


class Btrfs:
    """Thin wrapper of the btrfs command line (a _command.CommandRunner)."""

    def __init__(self, runner):
        self.runner = runner

    def create_subvolume(self, path):
        self.runner.run(["btrfs", "subvolume", "create", path])

    def snapshot(self, source, dest, read_only=False):
        self.runner.run(["btrfs", "subvolume", "snapshot"] + (["-r"] if read_only else []) + [source, dest])

    @staticmethod
    def delete(path):
        """Delete the subvolume at path, by name from its parent's descriptor."""
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            destroy_subvolume(fd, os.path.basename(path))
        finally:
            os.close(fd)

    def read_only(self, path):
        out = self.runner.run(["btrfs", "property", "get", "-ts", path, "ro"], ok_rcs=(0, 1))[1]
        return out.strip() == "ro=true"

    def set_read_only(self, path, read_only=True):
        self.runner.run(["btrfs", "property", "set", "-ts", path, "ro", "true" if read_only else "false"])

    def show(self, path):
        """The fields of `btrfs subvolume show` (UUID, Creation time, Flags, ...)."""
        return parse_show(self.runner.run(["btrfs", "subvolume", "show", path])[1])
