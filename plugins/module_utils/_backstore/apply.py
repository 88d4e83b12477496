# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Backing stores, the applier: carries out planned operations (create
with mkfs and the layout's files, an xfs protofile, extend, loop refresh,
grow, relabel, remove, and the leftovers of an interrupted run).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile

from .._common.beneath import BeneathError, Tree
from .._common.command import CommandError
from .desired import ARCHISO_ARCH, EXT_FSTYPES, MIB, MOUNT_PREFIX, TEMP_INFIX, BackstoreError, name_inside
from .plan import CHANGES_DIRECTORY
from .read import image_directory

ZERO_CHUNK = 4 * MIB


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
            steps = {"unmount_stale": self._unmount_stale, "remove_stale": self._remove_stale, "remove": self._remove,
                     "create": self._create, "extend_file": self._extend_file, "refresh_loop": self._refresh_loop,
                     "grow_filesystem": self._grow_filesystem, "relabel": self._relabel}
            try:
                for operation in operations:
                    steps[operation.action](desired, current, operation)
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
