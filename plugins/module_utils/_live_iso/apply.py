# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Bootable live ISOs (Debian live-boot) from a cache snapshot, a tree or the host.

The pipeline: resolve the source and its identity; skip the build when the
manifest beside the ISO says the same source and options made it; otherwise,
in a private mount namespace, take a writable btrfs snapshot of the source
(or rsync it), remove from the copy what the image leaves out, clean and
configure it, regenerate its initramfs, squash it, lay out GRUB for BIOS and
UEFI, write the hybrid image under a temporary name and rename it.
Timestamps come from SOURCE_DATE_EPOCH, taken from the source, so the same
input gives the same bytes.

This file holds the applier and `run`; _iso_state the reader and planner,
_iso_source, _iso_image and _iso_boot the steps' own work.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
import time

from .._common.beneath import Tree
from .._common.btrfs import Btrfs, is_subvolume
from .._common.command import CommandError
from .._common.fs import is_within, read_mounts, write_atomically
from .._common.plan import Operation
from .._common.rsync import RSYNC_VANISHED, copy_argv
from .boot import BootMaker
from .desired import WORK_PREFIX, IsoError
from .image import ImageEditor, remove_excluded
from .plan import uefi_chain
from .read import MANIFEST_VERSION, STALE_ACTIONS, hash_file, sha256_of

CLONE_NEWNS = 0x00020000


def enter_private_mount_namespace(runner):
    """Move this process into a mount namespace of its own.

    Every mount the build makes (proc, sys, dev in the chroot) then vanishes
    with the process, even if it is killed: the host never keeps one.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise IsoError("cannot make a private mount namespace (unshare: %s); run as root"
                       % os.strerror(ctypes.get_errno()))
    runner.run(["mount", "--make-rprivate", "/"])


def mounts_under(path):
    """Mount points at or below path, deepest first."""
    return sorted((mount.point for mount in read_mounts() if is_within(mount.point, path)), reverse=True)


class IsoApplier:
    """Carries out a plan. Each step's text is reported after what the step
    found to do on the way (users removed, links replaced, the squashfs size)."""

    def __init__(self, runner, desired):
        self.runner = runner
        self.desired = desired
        self.btrfs = Btrfs(runner)
        self.editor = ImageEditor(runner, desired)
        self.boot = BootMaker(runner, desired, self.editor)
        self.stages = {}
        self.warnings = []
        self.manifest = None
        self._temp_iso = None

    def apply(self, current, operations):
        parent = current.work_parent
        if not os.path.isdir(parent):
            raise IsoError("work_dir %s does not exist" % parent)
        enter_private_mount_namespace(self.runner)
        done = []
        stale = [operation for operation in operations if operation.action in STALE_ACTIONS]
        for operation in stale:
            self._remove_stale(operation)
            done.append(operation)
        # The ISO's temporary file first: a destination that takes no file fails here, before the copy.
        fd, self._temp_iso = tempfile.mkstemp(prefix="." + os.path.basename(self.desired.dest) + ".tmp-",
                                              dir=self.desired.dest_dir)
        os.close(fd)
        work = None
        try:
            work = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent)
            steps = {"snapshot": self._snapshot, "rsync": self._rsync, "leave_out": self._leave_out,
                     "install": self._install, "clean": self._clean, "build": self._build}
            for operation in operations[len(stale):]:
                steps[operation.action](current, operation, work)
                done += [Operation("found", text) for text in self.editor.found] + [operation]
                del self.editor.found[:]
        finally:
            if self._temp_iso:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._temp_iso)
            if work:
                self._remove_work(work)
            self.warnings += self.editor.warnings
        return current, done

    @contextlib.contextmanager
    def _stage(self, name):
        started = time.monotonic()
        yield
        self.stages[name] = round(self.stages.get(name, 0) + time.monotonic() - started, 2)

    def _remove_stale(self, operation):
        path = operation.args["path"]
        if operation.action == "remove_work":
            self._remove_work(path)
        else:
            # Not a work tree of ours (we make directories): a link is removed, never followed.
            os.unlink(path)

    def _remove_work(self, path):
        for point in mounts_under(path):
            self.runner.run(["umount", point])
        if mounts_under(path):
            raise IsoError("%s still has mounts; not removing it" % path)
        with Tree(path) as tree:
            rootfs = tree.lstat("rootfs")
        if rootfs is not None and is_subvolume(rootfs) and rootfs.st_dev != os.lstat(path).st_dev:
            self.btrfs.delete(os.path.join(path, "rootfs"))
        shutil.rmtree(path)

    # --- the steps: (current, operation, work directory) --------------------

    def _snapshot(self, current, _operation, work):
        with self._stage("copy"):
            self.btrfs.snapshot(current.source.root, os.path.join(work, "rootfs"))

    def _rsync(self, current, _operation, work):
        root = current.source.root
        with self._stage("copy"):
            rootfs = os.path.join(work, "rootfs")
            os.mkdir(rootfs, 0o755)
            try:
                rc, _out = self.runner.run(copy_argv(root, rootfs, excludes=current.excludes),
                                           ok_rcs=(0, RSYNC_VANISHED))
            except CommandError as error:
                raise IsoError("copying %s failed: %s" % (root, error)) from None
        if rc == RSYNC_VANISHED:
            self.warnings.append("some files vanished from %s while it was copied" % root)

    def _leave_out(self, _current, operation, work):
        # rsync left these out already; a snapshot holds them all (a nested
        # subvolume as an empty directory), and a mount point of the source
        # only as the directory beneath the mount.
        with self._stage("copy"), Tree(os.path.join(work, "rootfs")) as tree:
            remove_excluded(tree, operation.args["patterns"])

    def _install(self, _current, operation, work):
        with self._stage("configure"):
            self.boot.install(os.path.join(work, "rootfs"), operation.args["packages"])

    def _clean(self, _current, _operation, work):
        with self._stage("configure"), Tree(os.path.join(work, "rootfs")) as tree:
            self.editor.clean(tree)

    def _build(self, current, _operation, work):
        source, boot = current.source, self.boot
        rootfs = os.path.join(work, "rootfs")
        with self._stage("configure"), Tree(rootfs) as tree:
            self.editor.configure(tree, source.epoch)
        with self._stage("initramfs"):
            boot.initramfs(rootfs, source.epoch)
        iso_root = os.path.join(work, "iso")
        os.makedirs(os.path.join(iso_root, "live"))
        os.makedirs(os.path.join(iso_root, "boot/grub"))
        with self._stage("squashfs"):
            squash = boot.squashfs(rootfs, os.path.join(iso_root, "live/filesystem.squashfs"), source.epoch)
        with self._stage("bootloader"):
            boot.boot_files(rootfs, iso_root, current.secure_boot)
            chain = boot.signed_efi_image(rootfs, work, iso_root, source.epoch) if current.secure_boot \
                else {"enabled": False}
        with self._stage("iso"):
            dest, temp_iso = self.desired.dest, self._temp_iso
            boot.check_room(iso_root)
            boot.make_iso(iso_root, temp_iso, source.epoch, current.secure_boot)
            os.chmod(temp_iso, 0o644)
            checksum = sha256_of(temp_iso)
            os.rename(temp_iso, dest)
            self._temp_iso = None
            self._write_checksums(checksum)
            manifest = {"version": MANIFEST_VERSION, "source_identity": source.identity,
                        "options_digest": current.options_digest, "sha256": checksum, "source": source.view(),
                        "size": os.path.getsize(dest), "iso_mtime_ns": os.stat(dest).st_mtime_ns,
                        "squashfs": squash, "uefi_chain": uefi_chain(current.secure_boot), "secure_boot": chain}
            write_atomically(self.desired.manifest_path, json.dumps(manifest, indent=2) + "\n")

    def _write_checksums(self, sha256):
        dest, checksums = self.desired.dest, self.desired.checksums
        wanted = {"sha256": sha256}
        if "md5" in checksums:
            wanted["md5"] = hash_file(dest, hashlib.md5())
        for algorithm in ("sha256", "md5"):
            path = "%s.%s" % (dest, algorithm)
            if algorithm in checksums:
                write_atomically(path, "%s  %s\n" % (wanted[algorithm], os.path.basename(dest)))
            elif os.path.exists(path):
                os.unlink(path)
