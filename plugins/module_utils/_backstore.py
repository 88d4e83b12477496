# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Backing-store images: read the current state, plan, apply.

A backing store is a regular file holding a filesystem that a live system
loop-mounts to keep its changes.  BackstoreReader reads what is on disk,
plan() turns (desired, current) into a list of Operations without touching
anything, and BackstoreApplier carries the operations out.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction

from ansible.module_utils.common.text.formatters import human_to_bytes

from ._beneath import BeneathError, Tree
from ._btrfs import filesystem_type
from ._command import CommandError
from ._fs import (
    MOUNTINFO,
    canonical_path,
    check_path_text,
    check_real_path,
    flag_names,
    free_space,
    inode_flags,
    mount_of,
    read_mounts,
)
from ._lock import DEFAULT_TIMEOUT, Lock
from ._plan import Operation, Result, execute
from ._text import check_label

MIB = 1024 * 1024

# A filesystem this much smaller than its file is still "the full size":
# covers block and allocation-group rounding of mkfs and the grow tools.
SIZE_TOLERANCE = MIB

FSTYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs")
EXT_FSTYPES = ("ext2", "ext3", "ext4")

# mkfs.xfs refuses less than 300 MB; the kernel refuses to resize btrfs
# below 256 MiB, so a smaller btrfs store could never be grown.
MIN_SIZE = {"ext2": 8 * MIB, "ext3": 8 * MIB, "ext4": 8 * MIB,
            "xfs": 300 * MIB, "btrfs": 256 * MIB}
# Label bytes each filesystem keeps unchanged. btrfs has a 256-byte field with
# its NUL, and btrfs-progs (mkfs.btrfs -L, btrfs filesystem label) accept 255
# bytes but keep 254: a 255-byte label would never converge.
LABEL_MAX = {"ext2": 16, "ext3": 16, "ext4": 16, "xfs": 12, "btrfs": 254}

# FAT cannot hold a file of 4 GiB or more; exFAT can.
FAT_FSTYPES = ("vfat", "msdos", "fat", "fuse.fusefat")
FAT_MAX_FILE_SIZE = 4 * 1024 ** 3 - 1

# Names of the files and mount points this code makes for itself.
TEMP_INFIX = ".liveclone-tmp-"
MOUNT_PREFIX = "liveclone-backstore-"

DIRECTORY_BUSY = ("%(path)s is locked by another run of backstore on an image there; waited %(timeout)d s. "
                  "Try again when it has finished")
# Operations that clean up after an interrupted earlier run.
LEFTOVER_ACTIONS = ("unmount_stale", "remove_stale")

CAP_SYS_RESOURCE = 24  # needed by the kernel for online ext resize
ZERO_CHUNK = 4 * MIB


class BackstoreError(Exception):
    """A request that cannot be carried out; the message says what to do."""


@dataclass(frozen=True)
class Layout:
    file_name: str
    fstype: str
    label: str | None


LAYOUTS = {
    "sysrescue": Layout("sysrcd.bs", "ext3", None),
    "live-boot": Layout("persistence", "ext4", "persistence"),
    "casper": Layout("casper-rw", "ext4", "casper-rw"),
    # archiso finds its cow filesystem by label; the file name follows it.
    "archiso": Layout("persistent_{label}.img", "ext4", None),
    "plain": Layout("backstore.img", "ext4", None),
}

DEFAULT_PERSISTENCE_CONF = ["/ union"]
ARCHISO_ARCH = "x86_64"

# No file can be larger than off_t holds.
MAX_SIZE = 2 ** 63 - 1
SIZE_USAGE = "give a number of MiB (256) or a size with a unit (512M, 2G, 1.5GiB)"
_DECIMAL = re.compile(r"\d+(\.\d+)?")


def parse_size(value):
    """Bytes from a number of MiB or a string with units, rounded up to MiB."""
    if isinstance(value, bool):
        raise BackstoreError("size %r is a boolean, not a size; %s" % (value, SIZE_USAGE))
    if isinstance(value, float) and not math.isfinite(value):
        raise BackstoreError("size %r is not a finite number; %s" % (value, SIZE_USAGE))
    if isinstance(value, (int, float)):
        size = Fraction(value) * MIB
    else:
        text = str(value).strip()
        if _DECIMAL.fullmatch(text):
            size = Fraction(text) * MIB
        else:
            # human_to_bytes reads "G" and "GB" as binary units; accept the
            # explicit IEC spelling "GiB" for the same thing.
            if text.endswith("iB"):
                text = text[:-2] + "B"
            try:
                size = Fraction(human_to_bytes(text))
            except (ValueError, OverflowError):
                raise BackstoreError("size %r is not understood; %s" % (value, SIZE_USAGE)) from None
    if size <= 0:
        raise BackstoreError("size must be greater than zero, got %r; %s" % (value, SIZE_USAGE))
    size = math.ceil(size / MIB) * MIB
    if size > MAX_SIZE:
        raise BackstoreError(
            "size %r is larger than any file can be (8 EiB); choose a smaller size" % (value,))
    return size


PERSISTENCE_KINDS = ("union", "bind", "link")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What no shell in the initramfs reads as syntax: live-boot's scripts read these lines.
_CONF_PATH = re.compile(r"[A-Za-z0-9/._+@%~-]+")


def check_persistence_line(line):
    """None, or the message refusing one item of persistence_conf: live-boot
    reads each line as `DIR [OPTION[,OPTION]...]` (persistence.conf(5)), or a
    comment starting with '#'."""
    where = "persistence_conf item %r" % line
    if _CONTROL.search(line):
        return ("%s holds a control character (a newline, tab or the like); give each line of "
                "persistence.conf as its own item" % where)
    if line.lstrip().startswith("#"):
        return None
    fields = line.split()
    if not fields:
        return "%s is empty; remove it, or give a line such as '/home union'" % where
    if len(fields) > 2:
        return ("%s has more than a directory and one list of options; write it as "
                "'DIR OPTION,OPTION', such as '/home/user link,source=config'" % where)
    directory, options = fields[0], fields[1].split(",") if len(fields) == 2 else []
    problem = _check_conf_path(where, "the directory", directory, absolute=True)
    if problem:
        return problem
    if directory == "/live" or directory.startswith("/live/"):
        return "%s names /live, which live-boot keeps for itself; choose another directory" % where
    kinds = []
    for option in options:
        if option in PERSISTENCE_KINDS:
            kinds.append(option)
        elif option.startswith("source="):
            problem = _check_conf_path(where, "source", option[len("source="):], absolute=False)
            if problem:
                return problem
        else:
            return ("%s has the option %r; live-boot knows only union, bind, link and source=PATH, "
                    "separated by commas" % (where, option))
    if len(kinds) > 1:
        return ("%s gives %s; bind, link and union exclude each other (live-boot uses only the last), "
                "keep one" % (where, " and ".join(kinds)))
    if len([option for option in options if option.startswith("source=")]) > 1:
        return "%s gives source= more than once; keep one" % where
    return None


def _check_conf_path(where, what, value, absolute):
    if not _CONF_PATH.fullmatch(value):
        return ("%s: %s %r may hold only ASCII letters, digits and / . _ + @ %% ~ -" % (where, what, value))
    parts = value.split("/")
    if absolute:
        if not value.startswith("/"):
            return "%s: %s %r is relative; live-boot needs an absolute path such as /%s" % (
                where, what, value, value)
        parts = parts[1:]
        if value != "/" and ("" in parts or "." in parts or ".." in parts):
            return ("%s: %s %r has an empty, '.' or '..' component, which live-boot refuses; write it "
                    "as %s" % (where, what, value, canonical_path(value)))
    else:
        if value.startswith("/"):
            return ("%s: %s %r is absolute; give it relative to the root of the store, such as %s" % (
                where, what, value, value.lstrip("/") or "."))
        if value != "." and ("" in parts or "." in parts or ".." in parts):
            return ("%s: %s %r has an empty, '.' or '..' component, which live-boot refuses; give a "
                    "plain relative path, or . for the root of the store" % (where, what, value))
    return None


def name_inside(directory, name, what):
    """os.path.join(directory, name) for a name that must stay directly inside directory."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise BackstoreError("the %s %r would not be a file directly inside %s; choose another "
                             "label" % (what, name, directory))
    return os.path.join(directory, name)


def format_size(size):
    if size is None:
        return None
    if size % (1024 * MIB) == 0:
        return "%d GiB" % (size // (1024 * MIB))
    if size % MIB == 0:
        return "%d MiB" % (size // MIB)
    return "%d bytes" % size


@dataclass
class Desired:
    path: str
    state: str
    layout: str
    fstype: str
    label: str | None
    size: int | None
    allocation: str
    persistence_conf: list = field(default_factory=lambda: list(DEFAULT_PERSISTENCE_CONF))

    @property
    def directory(self):
        return os.path.dirname(self.path)

    @property
    def name(self):
        return os.path.basename(self.path)

    @classmethod
    def from_params(cls, params):
        """The request, checked: every rule runs on the canonical path, and
        again on the image path when path names a directory."""
        layout = LAYOUTS[params["layout"]]
        fstype = params["fstype"] or layout.fstype
        label = params["label"] if params["label"] is not None else layout.label
        path = check_path(params["path"])
        if label is not None:
            problem = check_label("label", label, LABEL_MAX[fstype], fstype)
            if problem:
                raise BackstoreError(problem)
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                path = name_inside(path, layout.file_name.format(label=label), "image file name")
                problem = check_real_path("path", path)
                if problem:
                    raise BackstoreError(problem)
        size = parse_size(params["size"]) if params["size"] is not None else None
        conf = params.get("persistence_conf")
        conf = list(conf) if conf else list(DEFAULT_PERSISTENCE_CONF)
        for line in conf:
            problem = check_persistence_line(line)
            if problem:
                raise BackstoreError(problem)
        return cls(
            path=path,
            state=params["state"],
            layout=params["layout"],
            fstype=fstype,
            label=label,
            size=size,
            allocation=params["allocation"],
            persistence_conf=conf,
        )


def check_path(raw):
    """The canonical form of the path parameter, or BackstoreError."""
    problem = check_path_text("path", raw)
    if problem:
        raise BackstoreError(problem)
    if not os.path.isabs(raw):
        raise BackstoreError(
            "path %r is relative; give an absolute path to the image file "
            "or to the directory that holds it" % raw)
    path = canonical_path(raw)
    if path == "/":
        raise BackstoreError(
            "path %s is the root directory of this host; give the path of an image file on the stick "
            "or data partition, such as /mnt/usb/persistence" % raw)
    problem = check_real_path("path", path)
    if problem:
        raise BackstoreError(problem)
    return path


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


def _check_new_size(desired, current, needed):
    """Refuse a size the target directory cannot hold."""
    if current.dir_fstype in FAT_FSTYPES and desired.size > FAT_MAX_FILE_SIZE:
        raise BackstoreError(
            "%s is on a FAT filesystem (%s), which cannot hold a file of 4 GiB or "
            "more; choose a size below 4096M, or put the store on an ext4 or exFAT "
            "partition" % (desired.path, current.dir_fstype))
    if needed > current.dir_free:
        raise BackstoreError(
            "not enough free space for %s: %s needed, %s free in %s; free some "
            "space or choose a smaller size" % (
                desired.path, format_size(needed), format_size(current.dir_free),
                desired.directory))


def _check_existing(desired, current):
    if current.link_target is not None:
        raise BackstoreError(
            "path %s is a symlink (to %s); it is never followed: give the path of the real image, "
            "or remove the link" % (desired.path, current.link_target))
    if not current.is_regular:
        raise BackstoreError(
            "%s exists and is not a regular file; it was left untouched: move it away "
            "or choose another path" % desired.path)
    if current.fstype is None:
        raise BackstoreError(
            "%s holds no filesystem signature, so it is not a backing store; it was "
            "left untouched: move it away or choose another path" % desired.path)
    if current.fstype != desired.fstype:
        if current.fstype in FSTYPES:
            advice = "set fstype: %s to manage it, or remove it first with state: absent" % current.fstype
        else:
            advice = ("this module manages only %s stores, so it was left untouched: move it away "
                      "or choose another path" % ", ".join(FSTYPES))
        raise BackstoreError("%s holds a %s filesystem, not %s; %s" % (
            desired.path, current.fstype, desired.fstype, advice))
    if len(current.loop_devices) > 1:
        raise BackstoreError(
            "%s is attached to several loop devices (%s); detach all but one with "
            "losetup -d" % (desired.path, ", ".join(loop["name"] for loop in current.loop_devices)))
    for loop in current.loop_devices:
        if loop["offset"] or loop["sizelimit"]:
            raise BackstoreError(
                "%s is attached to %s with an offset or size limit; this module only "
                "manages whole-file loop devices: detach it (losetup -d %s) and run again" % (
                    desired.path, loop["name"], loop["name"]))


# What each operation changes: entries of the image's directory, or the image.
CHANGES_DIRECTORY = ("create", "remove", "remove_stale")
CHANGES_IMAGE = ("remove", "extend_file", "grow_filesystem", "relabel")


def _check_writable(desired, current, operations):
    """Refuse, before anything is done, what the filesystem or the file's
    attributes would refuse half-way."""
    actions = {operation.action for operation in operations}
    if current.dir_read_only and actions & set(CHANGES_DIRECTORY + CHANGES_IMAGE):
        raise BackstoreError(
            "%s is on a read-only filesystem (mounted on %s); remount it read-write "
            "(mount -o remount,rw %s) or choose a path on another filesystem" % (
                desired.directory, _mount_point_of(desired.directory), _mount_point_of(desired.directory)))
    if current.dir_attributes and actions & set(CHANGES_DIRECTORY):
        raise BackstoreError(
            "directory %s has the %s attribute (lsattr -d), so no file can be made or removed in it; "
            "clear it with chattr -i -a %s, or choose another directory" % (
                desired.directory, " and ".join(sorted(current.dir_attributes)), desired.directory))
    if current.attributes and actions & set(CHANGES_IMAGE):
        raise BackstoreError(
            "%s has the %s attribute (lsattr), so it cannot be %s; clear it with chattr -i -a %s if it "
            "may be, or leave size, label and state as the store is" % (
                desired.path, " and ".join(sorted(current.attributes)),
                "removed" if desired.state == "absent" else "grown or relabelled", desired.path))
    if "create" in actions and current.dir_free_inodes is not None and current.dir_free_inodes < 1:
        raise BackstoreError(
            "the filesystem of %s has no free inodes (df -i), so no file can be made there; remove "
            "files there or choose a path on another filesystem" % desired.directory)


def _mount_point_of(directory):
    with contextlib.suppress(Exception):
        return mount_of(directory).point
    return directory


def _plan_absent(desired, current):
    if not current.exists:
        return []
    _check_existing(desired, current)
    if current.loop_devices:
        where = current.loop_device
        if current.mount_point:
            where += " mounted on " + current.mount_point
        raise BackstoreError(
            "%s is in use (attached to %s); unmount it and detach the loop device "
            "(umount, losetup -d) before removing it" % (desired.path, where))
    return [Operation("remove", "remove %s" % desired.path)]


def _plan_grow(desired, current):
    operations = []
    mounted = current.mount_point is not None
    target = max(desired.size or 0, current.file_size)
    if desired.size is not None and desired.size > current.file_size + SIZE_TOLERANCE - 1:
        _check_new_size(desired, current, desired.size - current.file_size)
        operations.append(Operation(
            "extend_file", "extend %s from %s to %s (%s)" % (
                desired.path, format_size(current.file_size), format_size(desired.size),
                desired.allocation),
            {"size": desired.size}))
        target = desired.size
    if current.fs_size is None or target - current.fs_size < SIZE_TOLERANCE:
        return operations
    if mounted and desired.fstype == "ext2":
        raise BackstoreError(
            "%s is ext2 and mounted on %s; ext2 cannot be grown while mounted: unmount "
            "it (boot the live system with persistence off) and run again" % (
                desired.path, current.mount_point))
    if mounted and desired.fstype in EXT_FSTYPES and not current.can_resize_ext_online:
        raise BackstoreError(
            "%s is mounted on %s and growing ext3/ext4 online needs the "
            "CAP_SYS_RESOURCE capability, which this process lacks; run as real root "
            "outside a restricted container, or unmount it and run again" % (
                desired.path, current.mount_point))
    if current.loop_devices:
        operations.append(Operation(
            "refresh_loop", "refresh the capacity of %s" % current.loop_device))
    operations.append(Operation(
        "grow_filesystem", "grow the %s filesystem from %s to %s %s" % (
            desired.fstype, format_size(current.fs_size), format_size(target),
            "online on " + current.mount_point if mounted else "offline")))
    return operations


def _plan_relabel(desired, current):
    if desired.label is None or desired.label == (current.label or None):
        return []
    if desired.fstype == "xfs" and current.mount_point:
        raise BackstoreError(
            "%s is xfs and mounted on %s; xfs can only be relabelled unmounted: unmount "
            "it and run again" % (desired.path, current.mount_point))
    return [Operation("relabel", "relabel %s from %r to %r" % (
        desired.path, current.label, desired.label))]


def plan(desired, current):
    """The operations that bring `current` to `desired`; raises BackstoreError."""
    operations = _plan(desired, current)
    _check_writable(desired, current, operations)
    return operations


def _plan(desired, current):
    if not current.dir_exists:
        raise BackstoreError(
            "directory %s does not exist; create it (or mount the target partition) "
            "first" % desired.directory)
    operations = [Operation("unmount_stale", "unmount %s left by an interrupted run" % mp,
                            {"mount_point": mp}) for mp in current.stale_mount_points]
    operations += [Operation("remove_stale", "remove %s left by an interrupted create" % tmp,
                             {"path": tmp}) for tmp in current.stale_temp_files]
    if desired.state == "absent":
        return operations + _plan_absent(desired, current)
    if not current.exists:
        if desired.size is None:
            raise BackstoreError(
                "%s does not exist and no size was given; set size (for example 512M) "
                "to create it" % desired.path)
        if desired.size < MIN_SIZE[desired.fstype]:
            raise BackstoreError(
                "size %s is below the %s minimum of %s; choose at least %dM" % (
                    format_size(desired.size), desired.fstype,
                    format_size(MIN_SIZE[desired.fstype]), MIN_SIZE[desired.fstype] // MIB))
        _check_new_size(desired, current, desired.size)
        return operations + [Operation("create", "create %s: %s %s, label %r, %s, layout %s" % (
            desired.path, format_size(desired.size), desired.fstype, desired.label,
            desired.allocation, desired.layout))]
    _check_existing(desired, current)
    if desired.size is not None and desired.size < current.file_size - SIZE_TOLERANCE + 1:
        raise BackstoreError(
            "%s is %s and size asks for %s; backing stores are never shrunk. Keep "
            "size at %dM or more, or remove the store and create a smaller one" % (
                desired.path, format_size(current.file_size), format_size(desired.size),
                -(-current.file_size // MIB)))
    return operations + _plan_grow(desired, current) + _plan_relabel(desired, current)


def layout_tree(desired, root):
    """Write the layout's files into `root`, which mkfs copies into the image;
    beneath root, never through a link."""
    with Tree(root) as tree:
        if desired.layout == "live-boot":
            tree.write_text("persistence.conf", "".join(line + "\n" for line in desired.persistence_conf))
        elif desired.layout == "archiso":
            cow = os.path.basename(name_inside(root, "persistent_%s" % desired.label, "cow directory"))
            for name in ("upperdir", "workdir"):
                tree.makedirs("/".join((cow, ARCHISO_ARCH, name)))


# What an mkfs.xfs protofile cannot carry in a name: it is split on blanks.
_PROTO_UNSAFE = re.compile(r"[\s$]")


def xfs_protofile(root):
    """An mkfs.xfs protofile (the -p format) describing the tree at `root`,
    which holds only directories and regular files (a link is refused)."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]
    with Tree(root) as tree:

        def walk(relative, depth):
            for name in tree.listdir(relative):
                child = relative + "/" + name if relative else name
                if _PROTO_UNSAFE.search(name):
                    raise BeneathError("%s has a blank or '$' in its name, which a protofile cannot "
                                       "hold" % tree.path(child))
                info = tree.lstat(child)
                indent = " " * depth
                if stat.S_ISDIR(info.st_mode):
                    lines.append("%s%s d--755 0 0" % (indent, name))
                    walk(child, depth + 1)
                    lines.append("%s$" % indent)
                elif stat.S_ISREG(info.st_mode):
                    lines.append("%s%s ---644 0 0 %s" % (indent, name, tree.path(child)))
                else:
                    raise BeneathError("%s in the layout tree is neither a directory nor a regular "
                                       "file; it is never followed" % tree.path(child))

        walk("", 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def _write_zeros(handle, start, end):
    zeros = bytes(ZERO_CHUNK)
    handle.seek(start)
    position = start
    while position < end:
        position += handle.write(zeros[:min(ZERO_CHUNK, end - position)])


class BackstoreApplier:
    """Carries out planned operations. Entries of the image's directory are
    made, changed and removed through its descriptor, never through a link,
    and what is removed or changed is first checked to be the file that was
    read (same device and inode)."""

    def __init__(self, runner, tmpdir):
        self.runner = runner
        self.tmpdir = tmpdir
        self.tree = None

    def apply(self, desired, current, operations, tree=None):
        with contextlib.ExitStack() as stack:
            if tree is None and any(op.action in CHANGES_DIRECTORY + ("extend_file",) for op in operations):
                tree = stack.enter_context(image_directory(desired.directory))
            self.tree = tree
            try:
                for operation in operations:
                    getattr(self, "_" + operation.action)(desired, current, operation)
            finally:
                self.tree = None

    def _verify_image(self, desired, current, info=None):
        """Refuse to act on the image unless it is still the file that was read."""
        if current.identity is None:
            return
        if info is None:
            info = os.lstat(desired.path)
        if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != current.identity:
            raise BackstoreError(
                "%s changed while this run worked on it (it is no longer the file that was read); "
                "nothing more was done: run again" % desired.path)

    def _unmount_stale(self, desired, current, operation):
        mount_point = operation.args["mount_point"]
        self.runner.run(["umount", mount_point])
        try:
            os.rmdir(mount_point)
        except OSError as error:
            # Not ours after all (something in it), or already gone: leave it.
            if error.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY, errno.ENOTDIR):
                raise

    def _remove_stale(self, desired, current, operation):
        name = os.path.basename(operation.args["path"])
        if self.tree.is_file(name):
            os.unlink(name, dir_fd=self.tree.fd)

    def _remove(self, desired, current, operation):
        self._verify_image(desired, current, self.tree.lstat(desired.name))
        os.unlink(desired.name, dir_fd=self.tree.fd)
        os.fsync(self.tree.fd)

    def _create(self, desired, current, operation):
        tree = self.tree
        temp, fd = None, None
        for _attempt in range(100):
            temp = "." + desired.name + TEMP_INFIX + os.urandom(6).hex()
            try:
                fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=tree.fd)
                break
            except FileExistsError:
                continue
        else:
            raise BackstoreError("could not find a free temporary name in %s; run again" % desired.directory)
        try:
            with os.fdopen(fd, "r+b") as handle:
                if desired.allocation == "full":
                    _write_zeros(handle, 0, desired.size)
                else:
                    handle.truncate(desired.size)
                handle.flush()
                os.fchmod(handle.fileno(), 0o600)
                os.fsync(handle.fileno())
            self._make_filesystem(desired, tree.path(temp))
            # Under the directory lock nothing else of ours makes desired.path;
            # a plain rename works on FAT too (renameat2 NOREPLACE does not).
            if tree.lstat(desired.name) is not None:
                raise BackstoreError("%s appeared while this run created it; it was left as it is: "
                                     "run again" % desired.path)
            os.rename(temp, desired.name, src_dir_fd=tree.fd, dst_dir_fd=tree.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=tree.fd)
            raise
        os.fsync(tree.fd)

    def _make_filesystem(self, desired, image):
        root = tempfile.mkdtemp(prefix="layout-", dir=self.tmpdir)
        try:
            layout_tree(desired, root)
            with Tree(root) as tree:
                has_files = bool(tree.listdir())
            label = ["-L", desired.label] if desired.label else []
            if desired.fstype in EXT_FSTYPES:
                argv = ["mkfs." + desired.fstype, "-q", "-F"] + label
                argv += ["-d", root] if has_files else []
            elif desired.fstype == "xfs":
                argv = ["mkfs.xfs", "-q", "-f"] + label
                if has_files:
                    with Tree(self.tmpdir) as tmp:
                        tmp.write_text("xfs.proto", xfs_protofile(root), 0o600)
                        argv += ["-p", tmp.path("xfs.proto")]
            else:
                argv = ["mkfs.btrfs", "-q", "-f"] + label
                argv += ["--rootdir", root] if has_files else []
            self.runner.run(argv + [image])
        finally:
            with Tree(self.tmpdir) as tmp:
                tmp.remove(os.path.basename(root))

    def _extend_file(self, desired, current, operation):
        fd = os.open(desired.name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.tree.fd)
        with os.fdopen(fd, "r+b") as handle:
            self._verify_image(desired, current, os.fstat(handle.fileno()))
            handle.seek(0, os.SEEK_END)
            start = handle.tell()
            if desired.allocation == "full":
                _write_zeros(handle, start, operation.args["size"])
            else:
                handle.truncate(operation.args["size"])
            handle.flush()
            os.fsync(handle.fileno())

    def _refresh_loop(self, desired, current, operation):
        self.runner.run(["losetup", "--set-capacity", current.loop_device])

    def _grow_filesystem(self, desired, current, operation):
        self._verify_image(desired, current)
        device = current.loop_device or desired.path
        mount_point = current.mount_point
        if desired.fstype in EXT_FSTYPES:
            if mount_point is None:
                # e2fsck exits 1 when it corrected something: that is success.
                self.runner.run(["e2fsck", "-f", "-y", device], ok_rcs=(0, 1))
            self.runner.run(["resize2fs", device])
            return
        if mount_point is not None:
            self._grow_mounted(desired.fstype, mount_point)
            return
        # xfs and btrfs grow only while mounted: mount privately, then undo.
        # mkdtemp makes a new directory of a random name (never an existing
        # entry, never through a link at that name).
        mount_point = tempfile.mkdtemp(prefix=MOUNT_PREFIX)
        try:
            options = ["-o", "loop"] if current.loop_device is None else []
            self.runner.run(["mount", "-t", desired.fstype] + options + [device, mount_point])
            try:
                self._grow_mounted(desired.fstype, mount_point)
            finally:
                self._unmount(mount_point)
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(mount_point)

    def _unmount(self, mount_point):
        """umount; if something holds the filesystem, detach it lazily, so
        that no mount stays behind under a temporary directory."""
        try:
            self.runner.run(["umount", mount_point])
        except CommandError:
            self.runner.run(["umount", "--lazy", mount_point])

    def _grow_mounted(self, fstype, mount_point):
        if fstype == "xfs":
            self.runner.run(["xfs_growfs", mount_point])
        else:
            self.runner.run(["btrfs", "filesystem", "resize", "max", mount_point])

    def _relabel(self, desired, current, operation):
        self._verify_image(desired, current)
        device = current.loop_device or desired.path
        if desired.fstype in EXT_FSTYPES:
            self.runner.run(["e2label", device, desired.label])
        elif desired.fstype == "xfs":
            self.runner.run(["xfs_admin", "-L", desired.label, device])
        else:
            self.runner.run(["btrfs", "filesystem", "label", current.mount_point or device, desired.label])


def describe(desired, current):
    """The values returned to the user for this image."""
    return {
        "path": desired.path,
        "layout": desired.layout,
        "exists": current.exists,
        "size": current.file_size if current.exists else None,
        "fs_size": current.fs_size,
        "fstype": current.fstype,
        "label": current.label,
        "uuid": current.uuid,
        "loop_device": current.loop_device,
        "mount_point": current.mount_point,
    }


def diff_view(desired, current, operations):
    before = {"state": "present" if current.exists else "absent"}
    if current.exists:
        before.update(size=current.file_size, fstype=current.fstype, label=current.label)
    after = dict(before)
    if desired.state == "absent":
        after = {"state": "absent"}
    else:
        after["state"] = "present"
        for operation in operations:
            if operation.action in ("create", "extend_file"):
                after["size"] = desired.size
            if operation.action in ("create", "relabel"):
                after["label"] = desired.label
            if operation.action == "create":
                after["fstype"] = desired.fstype
    return {"before": before, "after": after,
            "before_header": desired.path, "after_header": desired.path}


def run(runner, params, check_mode, tmpdir):
    """Read, plan, and (unless check_mode) apply; returns the module's result."""
    desired = Desired.from_params(params)
    reader = BackstoreReader(runner)
    applier = BackstoreApplier(runner, tmpdir)
    with image_directory(desired.directory) as tree:

        def read():
            return reader.read(desired.path, tree) if tree else Current(path=desired.path, dir_exists=False)

        def apply(current, operations):
            leftovers = [op for op in operations if op.action in LEFTOVER_ACTIONS]
            try:
                if leftovers:
                    # Undoing a leftover mount may detach a loop device: plan the
                    # rest on the state as it is afterwards.
                    applier.apply(desired, current, leftovers, tree)
                    current = read()
                    operations = leftovers + plan(desired, current)
                applier.apply(desired, current, operations[len(leftovers):], tree)
            except CommandError as error:
                raise BackstoreError(
                    "%s; %s was left consistent, and running again resumes from "
                    "where this run stopped" % (error, desired.path)) from None
            except OSError as error:
                # Entries of the directory are reached through its descriptor:
                # name them in full for the message.
                for attribute in ("filename", "filename2"):
                    name = getattr(error, attribute)
                    if isinstance(name, str) and name and not os.path.isabs(name):
                        setattr(error, attribute, os.path.join(desired.directory, name))
                raise
            return current, operations

        outcome = execute(read, lambda current: plan(desired, current), apply, check_mode)
    return Result.of(outcome, diff=diff_view(desired, outcome.before, outcome.operations),
                     values=describe(desired, outcome.after)).module_result()
