# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Backing stores, what is there: the image, its filesystem, loop devices
and mounts, and facts about the directory that holds it, read into a
`Current`; nothing is changed. `image_directory` opens and locks that
directory for a whole run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from dataclasses import dataclass, field

from .._common.beneath import Tree
from .._common.btrfs import filesystem_type
from .._common.fs import MOUNTINFO, flag_names, free_space, inode_flags, mount_of, read_mounts
from .._common.lock import DEFAULT_TIMEOUT, Lock
from .desired import EXT_FSTYPES, FSTYPES, MOUNT_PREFIX, TEMP_INFIX, BackstoreError

DIRECTORY_BUSY = ("%(path)s is locked by another run of backstore on an image there; waited %(timeout)d s. "
                  "Try again when it has finished")

CAP_SYS_RESOURCE = 24  # needed by the kernel for online ext resize


@dataclass
class Current:
    """What is on disk now for one image path."""

    path: str
    exists: bool = False
    is_regular: bool = True
    link_target: str | None = None  # the image path is a symlink (never followed)
    identity: tuple | None = None  # (st_dev, st_ino) of the image
    attributes: frozenset = frozenset()  # "immutable", "append-only" of the image
    file_size: int = 0
    fstype: str | None = None
    label: str | None = None
    uuid: str | None = None
    fs_size: int | None = None
    loop_devices: list = field(default_factory=list)
    mount_points: list = field(default_factory=list)
    stale_temp_files: list = field(default_factory=list)
    # Facts about the directory that holds (or will hold) the image.
    dir_exists: bool = True
    dir_fstype: str | None = None
    dir_free: int = 0
    dir_free_inodes: int | None = None  # None: the filesystem does not count inodes (btrfs)
    dir_read_only: bool = False
    dir_mount_point: str | None = None  # where a read-only directory is mounted, for the message
    dir_attributes: frozenset = frozenset()
    can_resize_ext_online: bool = True

    @property
    def loop_device(self):
        return self.loop_devices[0]["name"] if self.loop_devices else None

    @property
    def stale_mount_points(self):
        """Our own temporary mounts left by an interrupted earlier run."""
        return [mp for mp in self.mount_points if os.path.basename(mp).startswith(MOUNT_PREFIX)]

    @property
    def live_mount_points(self):
        return [mp for mp in self.mount_points if mp not in self.stale_mount_points]

    @property
    def mount_point(self):
        """Where the store is in use, leaving out our own leftover mounts. With
        one loop device, several mount points are one filesystem seen in
        several places (live-boot bind-mounts /run/live under /usr/lib/live/mount):
        the first, in mount order, is the original."""
        live = self.live_mount_points
        return live[0] if live else None


def read_mount_points(source, mountinfo=MOUNTINFO):
    """Mount points whose source device is `source`."""
    return [mount.point for mount in read_mounts(mountinfo) if mount.source == source]


def has_capability(number, status_path="/proc/self/status"):
    with open(status_path) as handle:
        for line in handle:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> number & 1)
    return False


DELETED_SUFFIX = " (deleted)"


def back_file_name(back_file):
    """The backing file's name as losetup shows it, without the " (deleted)"
    the kernel appends at the end once that name is gone (only there: a name
    may hold the text itself)."""
    back_file = back_file or ""
    return back_file[:-len(DELETED_SUFFIX)] if back_file.endswith(DELETED_SUFFIX) else back_file


def _mount_point_of(directory):
    """Where directory is mounted, for a message; the directory itself when that cannot be read."""
    with contextlib.suppress(Exception):
        return mount_of(directory).point
    return directory


@contextlib.contextmanager
def image_directory(directory):
    """The Tree of the image's directory, locked against other runs of this
    module (the kernel drops the lock if we die); None when it is missing."""
    try:
        tree = Tree(directory)
    except FileNotFoundError:
        tree = None
    except NotADirectoryError:
        raise BackstoreError(
            "%s is not a directory (it, or a component of it, is a file); give path as an image file "
            "in an existing directory, or as that directory" % directory) from None
    if tree is None:
        yield None
        return
    with tree, Lock(directory, DEFAULT_TIMEOUT, DIRECTORY_BUSY, fd=tree.fd):
        yield tree


class BackstoreReader:
    """Reads the current state of an image path; changes nothing. Entries of
    the image's directory are looked at through its descriptor, never
    following a link."""

    def __init__(self, runner):
        self.runner = runner

    def read(self, path, tree=None):
        if tree is None:
            with image_directory(os.path.dirname(path)) as tree:
                return self.read(path, tree) if tree else Current(path=path, dir_exists=False)
        current = Current(path=path)
        name = os.path.basename(path)
        current.can_resize_ext_online = has_capability(CAP_SYS_RESOURCE)
        current.dir_fstype = filesystem_type(self.runner, tree.root)
        space = free_space(tree.fd)
        current.dir_free = space.free_bytes
        current.dir_free_inodes = space.free_inodes
        current.dir_read_only = space.read_only
        if space.read_only:
            current.dir_mount_point = _mount_point_of(os.path.dirname(path))
        current.dir_attributes = flag_names(inode_flags(tree.fd))
        current.stale_temp_files = self._stale_temp_files(tree, name)
        info = tree.lstat(name)
        if info is None:
            return current
        current.exists = True
        if stat.S_ISLNK(info.st_mode):
            current.is_regular = False
            current.link_target = os.readlink(name, dir_fd=tree.fd)
            return current
        current.is_regular = stat.S_ISREG(info.st_mode)
        if not current.is_regular:
            return current
        current.identity = (info.st_dev, info.st_ino)
        current.file_size = info.st_size
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=tree.fd)
        try:
            current.attributes = flag_names(inode_flags(fd))
        finally:
            os.close(fd)
        current.loop_devices = self.loop_devices(path, info)
        for loop in current.loop_devices:
            current.mount_points.extend(read_mount_points(loop["name"]))
        self._read_filesystem(current)
        return current

    @staticmethod
    def _stale_temp_files(tree, name):
        """Our temporary files left by an interrupted create: regular files
        only; a link or directory of that name is not ours and is left alone."""
        prefix = "." + name + TEMP_INFIX
        return sorted(tree.path(entry) for entry in os.listdir(tree.fd)
                      if entry.startswith(prefix) and tree.is_file(entry))

    def loop_devices(self, path, info=None):
        """Loop devices whose backing file is this image: the same inode on
        the same device (the kernel holds the inode while attached, so its
        number cannot be reused meanwhile); by name only where losetup does
        not give the device."""
        _rc, out = self.runner.run(
            ["losetup", "--list", "--json", "--output",
             "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,OFFSET,SIZELIMIT"])
        info = info or os.stat(path, follow_symlinks=False)
        real = os.path.realpath(path)
        found = []
        for loop in json.loads(out or '{"loopdevices": []}').get("loopdevices", []):
            if str(loop.get("back-ino")) != str(info.st_ino):
                continue
            device = (loop.get("back-maj:min") or "").strip()
            if re.fullmatch(r"\d+:\d+", device):
                major, minor = device.split(":")
                if os.makedev(int(major), int(minor)) != info.st_dev:
                    continue
            elif os.path.realpath(back_file_name(loop.get("back-file"))) != real:
                continue
            found.append({
                "name": loop["name"],
                "offset": int(loop.get("offset") or 0),
                "sizelimit": int(loop.get("sizelimit") or 0),
            })
        return found

    def _read_filesystem(self, current):
        device = current.loop_device or current.path
        rc, out = self.runner.run(
            ["blkid", "-p", "-o", "export", "-s", "TYPE", "-s", "LABEL", "-s", "UUID", device],
            ok_rcs=(0, 2))
        tags = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        current.fstype = tags.get("TYPE")
        current.label = tags.get("LABEL")
        current.uuid = tags.get("UUID")
        if current.fstype in FSTYPES:
            current.fs_size = self.filesystem_size(current.fstype, device, current.mount_point)

    def filesystem_size(self, fstype, device, mount_point=None):
        if fstype in EXT_FSTYPES:
            _rc, out = self.runner.run(["dumpe2fs", "-h", device])
            count = re.search(r"^Block count:\s+(\d+)", out, re.M)
            block = re.search(r"^Block size:\s+(\d+)", out, re.M)
            return int(count.group(1)) * int(block.group(1))
        if fstype == "xfs":
            _rc, out = self.runner.run(["xfs_info", mount_point or device])
            data = re.search(r"^data\s+=\s+bsize=(\d+)\s+blocks=(\d+)", out, re.M)
            return int(data.group(1)) * int(data.group(2))
        _rc, out = self.runner.run(["btrfs", "inspect-internal", "dump-super", device])
        return int(re.search(r"^dev_item\.total_bytes\s+(\d+)", out, re.M).group(1))
