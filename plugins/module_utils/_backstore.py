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
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field

from ansible.module_utils.common.text.formatters import human_to_bytes

from ._command import CommandError
from ._fs import MOUNTINFO, check_real_path, read_mounts

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
LABEL_MAX = {"ext2": 16, "ext3": 16, "ext4": 16, "xfs": 12, "btrfs": 255}

# FAT cannot hold a file of 4 GiB or more; exFAT can.
FAT_FSTYPES = ("vfat", "msdos", "fat", "fuse.fusefat")
FAT_MAX_FILE_SIZE = 4 * 1024 ** 3 - 1

# Names of the files and mount points this code makes for itself.
TEMP_INFIX = ".liveclone-tmp-"
MOUNT_PREFIX = "liveclone-backstore-"

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


def parse_size(value):
    """Bytes from a number of MiB or a string with units, rounded up to MiB."""
    if isinstance(value, bool):
        raise BackstoreError("size must be a number of MiB or a string such as 512M")
    if isinstance(value, (int, float)):
        size = value * MIB
    else:
        text = str(value).strip()
        if re.match(r"^\d+(\.\d+)?$", text):
            size = float(text) * MIB
        else:
            # human_to_bytes reads "G" and "GB" as binary units; accept the
            # explicit IEC spelling "GiB" for the same thing.
            if text.endswith("iB"):
                text = text[:-2] + "B"
            try:
                size = human_to_bytes(text)
            except ValueError:
                raise BackstoreError(
                    "size %r is not understood; give a number of MiB (256) or "
                    "a size with a unit (512M, 2G, 1.5GiB)" % value
                ) from None
    size = int(-(-int(size) // MIB) * MIB) if size > 0 else 0
    if size <= 0:
        raise BackstoreError("size must be greater than zero, got %r" % value)
    return size


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

    @classmethod
    def from_params(cls, params):
        layout = LAYOUTS[params["layout"]]
        fstype = params["fstype"] or layout.fstype
        label = params["label"] if params["label"] is not None else layout.label
        path = params["path"]
        if not os.path.isabs(path):
            raise BackstoreError(
                "path %r is relative; give an absolute path to the image file "
                "or to the directory that holds it" % path
            )
        path = os.path.normpath(path)
        if path == "/":
            raise BackstoreError(
                "path / would put the store in the root directory of this host; give the path of an "
                "image file on the stick or data partition, such as /mnt/usb/persistence")
        problem = check_real_path("path", path)
        if problem:
            raise BackstoreError(problem)
        if os.path.isdir(path):
            path = os.path.join(path, layout.file_name.format(label=label))
        size = parse_size(params["size"]) if params["size"] is not None else None
        conf = params.get("persistence_conf")
        return cls(
            path=path,
            state=params["state"],
            layout=params["layout"],
            fstype=fstype,
            label=label,
            size=size,
            allocation=params["allocation"],
            persistence_conf=list(conf) if conf else list(DEFAULT_PERSISTENCE_CONF),
        )


@dataclass
class Current:
    """What is on disk now for one image path."""

    path: str
    exists: bool = False
    is_regular: bool = True
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


@dataclass
class Operation:
    action: str
    text: str
    args: dict = field(default_factory=dict)

    def __str__(self):
        return self.text


def read_mount_points(source, mountinfo=MOUNTINFO):
    """Mount points whose source device is `source`."""
    return [mount.point for mount in read_mounts(mountinfo) if mount.source == source]


def has_capability(number, status_path="/proc/self/status"):
    with open(status_path) as handle:
        for line in handle:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> number & 1)
    return False


class BackstoreReader:
    """Reads the current state of an image path; changes nothing."""

    def __init__(self, runner):
        self.runner = runner

    def read(self, path):
        current = Current(path=path)
        directory = os.path.dirname(path)
        current.dir_exists = os.path.isdir(directory)
        current.can_resize_ext_online = has_capability(CAP_SYS_RESOURCE)
        if not current.dir_exists:
            return current
        current.dir_fstype = self._dir_fstype(directory)
        vfs = os.statvfs(directory)
        current.dir_free = vfs.f_bavail * vfs.f_frsize
        current.stale_temp_files = self._stale_temp_files(path)
        if not os.path.lexists(path):
            return current
        current.exists = True
        st = os.stat(path)
        current.is_regular = stat.S_ISREG(st.st_mode)
        if not current.is_regular:
            return current
        current.file_size = st.st_size
        current.loop_devices = self.loop_devices(path)
        for loop in current.loop_devices:
            current.mount_points.extend(read_mount_points(loop["name"]))
        self._read_filesystem(current)
        return current

    def _dir_fstype(self, directory):
        _rc, out = self.runner.run(["findmnt", "-n", "-o", "FSTYPE", "--target", directory])
        return out.strip() or None

    @staticmethod
    def _stale_temp_files(path):
        directory, name = os.path.split(path)
        prefix = "." + name + TEMP_INFIX
        return sorted(os.path.join(directory, entry) for entry in os.listdir(directory)
                      if entry.startswith(prefix))

    def loop_devices(self, path):
        """Loop devices whose backing file is this image."""
        _rc, out = self.runner.run(
            ["losetup", "--list", "--json", "--output",
             "NAME,BACK-FILE,BACK-INO,OFFSET,SIZELIMIT"])
        st = os.stat(path)
        real = os.path.realpath(path)
        found = []
        for loop in json.loads(out or '{"loopdevices": []}').get("loopdevices", []):
            back_file = (loop.get("back-file") or "").replace(" (deleted)", "")
            if str(loop.get("back-ino")) == str(st.st_ino) and os.path.realpath(back_file) == real:
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
                os.path.dirname(desired.path)))


def _check_desired(desired):
    if desired.label is not None and len(desired.label) > LABEL_MAX[desired.fstype]:
        raise BackstoreError(
            "label %r is %d characters long; %s allows at most %d" % (
                desired.label, len(desired.label), desired.fstype, LABEL_MAX[desired.fstype]))


def _check_existing(desired, current):
    if not current.is_regular:
        raise BackstoreError(
            "%s exists and is not a regular file; give the path of an image file "
            "or of a directory" % desired.path)
    if current.fstype is None:
        raise BackstoreError(
            "%s holds no filesystem signature, so it is not a backing store; it was "
            "left untouched: move it away or choose another path" % desired.path)
    if current.fstype != desired.fstype:
        raise BackstoreError(
            "%s holds a %s filesystem, not %s; set fstype: %s to manage it, or remove "
            "it first with state: absent" % (
                desired.path, current.fstype, desired.fstype, current.fstype))
    if len(current.loop_devices) > 1:
        raise BackstoreError(
            "%s is attached to several loop devices (%s); detach all but one with "
            "losetup -d" % (desired.path, ", ".join(loop["name"] for loop in current.loop_devices)))
    for loop in current.loop_devices:
        if loop["offset"] or loop["sizelimit"]:
            raise BackstoreError(
                "%s is attached to %s with an offset or size limit; this module only "
                "manages whole-file loop devices" % (desired.path, loop["name"]))


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
    if not current.dir_exists:
        raise BackstoreError(
            "directory %s does not exist; create it (or mount the target partition) "
            "first" % os.path.dirname(desired.path))
    _check_desired(desired)
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
    """Write the layout's files into `root`, which mkfs copies into the image."""
    if desired.layout == "live-boot":
        with open(os.path.join(root, "persistence.conf"), "w") as handle:
            handle.write("\n".join(desired.persistence_conf) + "\n")
    elif desired.layout == "archiso":
        cow = os.path.join(root, "persistent_%s" % desired.label, ARCHISO_ARCH)
        for name in ("upperdir", "workdir"):
            os.makedirs(os.path.join(cow, name))


def xfs_protofile(root):
    """An mkfs.xfs protofile (the -p format) describing the tree at `root`."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(directory, depth):
        for name in sorted(os.listdir(directory)):
            full = os.path.join(directory, name)
            indent = " " * depth
            if os.path.isdir(full):
                lines.append("%s%s d--755 0 0" % (indent, name))
                walk(full, depth + 1)
                lines.append("%s$" % indent)
            else:
                lines.append("%s%s ---644 0 0 %s" % (indent, name, full))

    walk(root, 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def _write_zeros(handle, start, end):
    zeros = bytes(ZERO_CHUNK)
    handle.seek(start)
    position = start
    while position < end:
        position += handle.write(zeros[:min(ZERO_CHUNK, end - position)])


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def directory_lock(directory):
    """Serialise runs on one directory; the kernel drops the lock if we die."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class BackstoreApplier:
    """Carries out planned operations."""

    def __init__(self, runner, tmpdir):
        self.runner = runner
        self.tmpdir = tmpdir

    def apply(self, desired, current, operations):
        for operation in operations:
            getattr(self, "_" + operation.action)(desired, current, operation)

    def _unmount_stale(self, desired, current, operation):
        mount_point = operation.args["mount_point"]
        self.runner.run(["umount", mount_point])
        os.rmdir(mount_point)

    def _remove_stale(self, desired, current, operation):
        os.unlink(operation.args["path"])

    def _remove(self, desired, current, operation):
        os.unlink(desired.path)
        _fsync_dir(os.path.dirname(desired.path))

    def _create(self, desired, current, operation):
        directory, name = os.path.split(desired.path)
        fd, temp_path = tempfile.mkstemp(prefix="." + name + TEMP_INFIX, dir=directory)
        try:
            with os.fdopen(fd, "r+b") as handle:
                if desired.allocation == "full":
                    _write_zeros(handle, 0, desired.size)
                else:
                    handle.truncate(desired.size)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temp_path, 0o600)
            self._make_filesystem(desired, temp_path)
            # Under the directory lock nothing else creates desired.path, so a
            # plain rename cannot clobber; it is atomic and works on FAT too.
            os.rename(temp_path, desired.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_path)
            raise
        _fsync_dir(directory)

    def _make_filesystem(self, desired, image):
        root = tempfile.mkdtemp(prefix="layout-", dir=self.tmpdir)
        try:
            layout_tree(desired, root)
            has_files = bool(os.listdir(root))
            label = ["-L", desired.label] if desired.label else []
            if desired.fstype in EXT_FSTYPES:
                argv = ["mkfs." + desired.fstype, "-q", "-F"] + label
                argv += ["-d", root] if has_files else []
            elif desired.fstype == "xfs":
                argv = ["mkfs.xfs", "-q", "-f"] + label
                if has_files:
                    protofile = os.path.join(self.tmpdir, "xfs.proto")
                    with open(protofile, "w") as handle:
                        handle.write(xfs_protofile(root))
                    argv += ["-p", protofile]
            else:
                argv = ["mkfs.btrfs", "-q", "-f"] + label
                argv += ["--rootdir", root] if has_files else []
            self.runner.run(argv + [image])
        finally:
            shutil.rmtree(root)

    def _extend_file(self, desired, current, operation):
        with open(desired.path, "r+b") as handle:
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
        mount_point = tempfile.mkdtemp(prefix=MOUNT_PREFIX)
        try:
            options = ["-o", "loop"] if current.loop_device is None else []
            self.runner.run(["mount", "-t", desired.fstype] + options + [device, mount_point])
            try:
                self._grow_mounted(desired.fstype, mount_point)
            finally:
                self.runner.run(["umount", mount_point])
        finally:
            os.rmdir(mount_point)

    def _grow_mounted(self, fstype, mount_point):
        if fstype == "xfs":
            self.runner.run(["xfs_growfs", mount_point])
        else:
            self.runner.run(["btrfs", "filesystem", "resize", "max", mount_point])

    def _relabel(self, desired, current, operation):
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
    directory = os.path.dirname(desired.path)
    lock = directory_lock(directory) if os.path.isdir(directory) else contextlib.nullcontext()
    with lock:
        current = reader.read(desired.path)
        operations = plan(desired, current)
        leftovers = [op for op in operations if op.action in LEFTOVER_ACTIONS]
        try:
            if leftovers and not check_mode:
                # Undoing a leftover mount may detach a loop device: plan the
                # rest on the state as it is afterwards.
                applier.apply(desired, current, leftovers)
                current = reader.read(desired.path)
                operations = leftovers + plan(desired, current)
            result = {"changed": bool(operations),
                      "operations": [str(operation) for operation in operations],
                      "diff": diff_view(desired, current, operations)}
            if not check_mode:
                applier.apply(desired, current, operations[len(leftovers):])
        except CommandError as error:
            raise BackstoreError(
                "%s; %s was left consistent, and running again resumes from "
                "where this run stopped" % (error, desired.path)) from None
        if operations and not check_mode:
            current = reader.read(desired.path)
    result.update(describe(desired, current))
    return result
