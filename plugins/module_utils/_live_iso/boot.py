# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""What makes the image's copy boot, and the bytes of the ISO: the chroot
(its kernel filesystems), live packages, the initramfs, the squashfs, GRUB's
configuration and boot files, the UEFI boot image (the image's own signed
chain for Secure Boot, or grub-mkrescue's), grub-mkrescue, and the EFI
image's serial."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import time

from .._common.beneath import Tree
from .._common.command import CommandError
from .._common.fs import free_space, symlink_on
from .desired import IsoError
from .secure_boot import describe as describe_chain
from .secure_boot import find_chain, inspect
from .source import kernels

MIB = 1024 * 1024
# What grub-mkrescue adds to the files of the ISO tree: its BIOS and EFI images.
ISO_OVERHEAD = 32 * MIB
SERIAL_CONSOLE = "console=tty0 console=ttyS0,115200n8"
# Where the chroot of the image gets its kernel filesystems, in mount order
# (mode None: the point lies in a filesystem mounted before it). The build
# host's firmware is hidden under an empty read-only tmpfs: on an EFI host,
# the postinst of shim-signed or grub-efi-amd64-signed would otherwise run
# grub-install and write the host's EFI variables and ESP.
CHROOT_MOUNTS = ((["mount", "-t", "proc", "proc"], "proc", 0o555), (["mount", "-t", "sysfs", "sysfs"], "sys", 0o555),
                 (["mount", "-t", "tmpfs", "-o", "ro,size=4k,mode=0555", "tmpfs"], "sys/firmware", None),
                 (["mount", "--bind", "/dev"], "dev", 0o755), (["mount", "-t", "devpts", "devpts"], "dev/pts", 0o755),
                 (["mount", "-t", "tmpfs", "tmpfs"], "run", 0o755), (["mount", "-t", "tmpfs", "tmpfs"], "tmp", 0o1777))
# The UEFI boot image of the signed chain: (the chain's piece, its name in efi.img).
EFI_FILES = (("shim", "EFI/boot/bootx64.efi"), ("grub", "EFI/boot/grubx64.efi"), ("mok_manager", "EFI/boot/mmx64.efi"))
# Room in efi.img beside its files (FAT tables, directories, the stub grub.cfg).
EFI_SLACK = 512 * 1024
COMPRESSORS = {"zstd": "-Xcompression-level", "gzip": "-Xcompression-level", "xz": None, "lz4": None}


def initramfs_boots_live(entries):
    """Whether an initramfs, by its file list, boots a live system and carries
    none of the source's resume or crypttab settings (which the image drops)."""
    names = {entry.strip().lstrip("./") for entry in entries}
    has_live_boot = "scripts/live" in names
    source_settings = any(name.startswith("cryptroot/") or
                          (name.startswith("conf/conf.d/") and "resume" in name) for name in names)
    return has_live_boot and not source_settings


def grub_config(desired):
    """grub.cfg: every entry on the screen and the first serial port."""
    base = "boot=live components hostname=%s" % desired.hostname
    if desired.live_user:
        base += " username=%s" % desired.live_user
    # live-config would otherwise create its default user with a known password.
    base += " live-config.nocomponents=user-setup"
    extra = " ".join(desired.boot_params)
    entries = [("Live system", "%s %s quiet" % (base, SERIAL_CONSOLE))]
    if desired.persistence:
        entries.append(("Live system with persistence", "%s persistence %s quiet" % (base, SERIAL_CONSOLE)))
    entries += [("Live system (safe graphics)", "%s nomodeset %s" % (base, SERIAL_CONSOLE)),
                ("Live system (text mode)", "%s systemd.unit=multi-user.target %s" % (base, SERIAL_CONSOLE))]
    lines = [
        "serial --unit=0 --speed=115200",
        "terminal_input console serial",
        "terminal_output console serial",
        "set default=0",
        "set timeout=5",
        "",
    ]
    for title, options in entries:
        lines += ['menuentry "%s (%s)" {' % (title, desired.label),
                  "    linux /live/vmlinuz %s%s" % (options, " " + extra if extra else ""),
                  "    initrd /live/initrd.img",
                  "}", ""]
    return "\n".join(lines)


def squashfs_argv(desired, rootfs, output, epoch):
    argv = ["mksquashfs", rootfs, output, "-noappend", "-no-progress", "-comp", desired.compression,
            "-b", str(desired.block_size)]
    if desired.compression_level is not None:
        argv += [COMPRESSORS[desired.compression], str(desired.compression_level)]
    if desired.compression == "xz":
        argv += ["-Xbcj", "x86"]
    # Every argument after -e is a name to exclude: options come first.
    excludes = [pattern.lstrip("/") for pattern in desired.exclude]
    if excludes:
        argv += ["-wildcards", "-e"] + excludes
    return ["env", "SOURCE_DATE_EPOCH=%d" % epoch] + argv


class BootMaker:
    """The boot steps on the image at rootfs; `editor` (an ImageEditor) makes
    the chroot's mount points real directories and collects what was found."""

    def __init__(self, runner, desired, editor):
        self.runner = runner
        self.desired = desired
        self.editor = editor

    @contextlib.contextmanager
    def chroot(self, rootfs):
        # Every mount point is made a real directory beneath rootfs first (a link
        # there is replaced): a mount never goes through a link out of the image.
        with Tree(rootfs) as tree:
            for _argv, point, mode in CHROOT_MOUNTS:
                if mode is not None:
                    self.editor.real_dir(tree, point, mode)
        done = []
        try:
            for argv, point, _mode in CHROOT_MOUNTS:
                target = os.path.join(rootfs, point)
                if symlink_on(target) or not os.path.isdir(target):
                    raise IsoError("%s is not a real directory of the image; not mounting there" % target)
                self.runner.run(argv + [target])
                done.append(target)
            if os.listdir(os.path.join(rootfs, "sys/firmware")):
                raise IsoError("the build host's firmware is still visible in the image's chroot; not running "
                               "package scripts there (they could write the host's EFI variables)")
            yield
        finally:
            for target in reversed(done):
                self.runner.run(["umount", target])

    def install(self, rootfs, packages):
        """Install the live packages the source lacks from the image's own repositories."""
        with self.chroot(rootfs):
            try:
                self.runner.run(["chroot", rootfs, "apt-get", "update"])
                self.runner.run(["chroot", rootfs, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get",
                                 "install", "-y", "--no-install-recommends"] + list(packages))
            except CommandError as error:
                raise IsoError("installing %s into the image from its repositories failed: %s"
                               % (", ".join(packages), error)) from None

    def initramfs(self, rootfs, epoch):
        with self.chroot(rootfs):
            initrds = self._initrds(rootfs)
            if initrds and all(self._boots_live(rootfs, initrd) for initrd in initrds.values()):
                # Regenerating takes minutes on slow machines and changes nothing that matters.
                self.editor.found.append("kept the source's initramfs: it has live-boot and none of the "
                                         "source's resume or crypttab settings")
                return
            try:
                for version, initrd in initrds.items():
                    # -u updates an initramfs; -c creates one a kernel lacks.
                    self.runner.run(["chroot", rootfs, "env", "SOURCE_DATE_EPOCH=%d" % epoch, "update-initramfs",
                                     "-u" if initrd else "-c", "-k", version])
            except CommandError as error:
                raise IsoError("regenerating the image's initramfs failed: %s" % error) from None
        self.editor.found.append("regenerated the initramfs with live-boot")

    @staticmethod
    def _initrds(rootfs):
        """Each kernel version of the image and its initramfs, as the chroot sees
        it (None where it has none)."""
        with Tree(rootfs) as tree:
            found = kernels(tree, "the image")
        return {version: "/" + initrd if initrd else None for version, _kernel, initrd in found}

    def _boots_live(self, rootfs, initrd):
        if initrd is None:
            return False
        try:
            _rc, out = self.runner.run(["chroot", rootfs, "lsinitramfs", initrd])
        except CommandError:
            return False
        return initramfs_boots_live(out.splitlines())

    def squashfs(self, rootfs, output, epoch):
        _rc, out = self.runner.run(squashfs_argv(self.desired, rootfs, output, epoch))
        size = os.path.getsize(output)
        match = re.search(r"of uncompressed filesystem size \(([\d.]+) Kbytes\)", out)
        uncompressed = int(float(match.group(1)) * 1024) if match else None
        self.editor.found.append("squashed the image with %s (%d bytes)" % (self.desired.compression, size))
        return {"size": size, "uncompressed_size": uncompressed,
                "compression_ratio": round(uncompressed / size, 2) if uncompressed else None}

    def boot_files(self, rootfs, iso_root, secure_boot):
        """The kernel, initrd and grub.cfg in the ISO tree; with secure_boot,
        .disk/info, by which the signed CD GRUB finds its medium."""
        with Tree(rootfs) as tree:
            found = kernels(tree, "the image")
            if not found:
                raise IsoError("the source has no kernel in /boot; install linux-image-amd64 in it")
            version, kernel, initrd = found[-1]
            if initrd is None:
                raise IsoError("the source has no initrd.img-%s in /boot" % version)
            _copy_out(tree, kernel, os.path.join(iso_root, "live/vmlinuz"))
            _copy_out(tree, initrd, os.path.join(iso_root, "live/initrd.img"))
        _write(os.path.join(iso_root, "boot/grub/grub.cfg"), grub_config(self.desired))
        if secure_boot:
            os.mkdir(os.path.join(iso_root, ".disk"))
            _write(os.path.join(iso_root, ".disk/info"), "%s live system\n" % self.desired.label)

    def signed_efi_image(self, rootfs, work, iso_root, epoch):
        """efi.img in the ISO tree from the image's own shim, signed GRUB and
        MokManager, with a grub.cfg that finds this ISO by its uuid; returns
        the chain's report. IsoError when a piece is missing or SBAT refuses it."""
        pieces = os.path.join(work, "efi")
        os.mkdir(pieces)
        with Tree(rootfs) as tree:
            chain = find_chain(tree, "the image")
            report, warnings = inspect(tree, chain, "the image")
            files = []
            for piece, name in EFI_FILES:
                relative = getattr(chain, piece)
                if relative:
                    copy = os.path.join(pieces, os.path.basename(name))
                    _copy_out(tree, relative, copy)
                    files.append((copy, name))
        self.editor.warnings += warnings
        stub = os.path.join(pieces, "grub.cfg")
        # The signed GRUB sources $prefix/grub.cfg, $prefix being /boot/grub
        # on efi.img: it finds this ISO by its uuid, not the first medium with a .disk/info.
        _write(stub, "search --no-floppy --fs-uuid --set=root %s\nset prefix=($root)/boot/grub\n"
                     "source $prefix/grub.cfg\n" % iso_uuid(epoch))
        files.append((stub, "boot/grub/grub.cfg"))
        image = os.path.join(iso_root, "efi.img")
        sectors = -(-(sum(os.path.getsize(path) for path, _name in files) + EFI_SLACK) // MIB) * (MIB // 512)
        # mtools stamps FAT dates from SOURCE_DATE_EPOCH in local time: UTC, as for grub-mkrescue.
        env = ["env", "TZ=UTC", "SOURCE_DATE_EPOCH=%d" % epoch]
        try:
            self.runner.run(env + ["mformat", "-i", image, "-C", "-T", str(sectors), "-h", "16", "-s", "63",
                                   "-N", "%08x" % efi_serial(epoch), "-v", "EFIBOOT", "::"])
            self.runner.run(env + ["mmd", "-i", image, "::/EFI", "::/EFI/boot", "::/boot", "::/boot/grub"])
            for path, name in files:
                self.runner.run(env + ["mcopy", "-i", image, path, "::/" + name])
        except CommandError as error:
            raise IsoError("making the UEFI boot image (efi.img) failed: %s" % error) from None
        self.editor.found.append(describe_chain(report))
        return report

    def check_room(self, iso_root):
        """Refuse before writing when the ISO cannot fit beside dest."""
        needed = sum(os.path.getsize(os.path.join(directory, name))
                     for directory, _dirs, files in os.walk(iso_root) for name in files) + ISO_OVERHEAD
        self._refuse_if_full(needed)

    def _refuse_if_full(self, needed=None, detail=""):
        directory = self.desired.dest_dir
        free = free_space(directory).free_bytes
        if needed is not None and free >= needed:
            return
        raise IsoError("not enough free space for the ISO in %s: %s%d MiB free; free space there or choose a "
                       "dest on a larger filesystem. The earlier ISO, if any, was left as it was.%s" % (
                           directory, "about %d MiB needed, " % (needed // MIB) if needed else "",
                           free // MIB, detail))

    def make_iso(self, iso_root, output, epoch, signed):
        """The ISO from iso_root. signed: efi.img is in iso_root already (the
        signed chain), and grub-mkrescue makes only the BIOS boot image;
        otherwise it makes both, its efi.img with the host's unsigned GRUB."""
        stamp = time.strftime("%Y%m%d%H%M%S00", time.gmtime(epoch))
        # mtools writes efi.img's FAT dates in local time: in UTC, the same
        # source gives the same bytes on a builder in any time zone.
        argv = ["env", "TZ=UTC", "SOURCE_DATE_EPOCH=%d" % epoch, "grub-mkrescue"]
        if signed:
            argv += ["-d", "/usr/lib/grub/i386-pc"]
        argv += ["--output", output, iso_root, "--",
                 "-volid", self.desired.label,
                 "-volume_date", "uuid", stamp,
                 "-volume_date", "all_file_dates", "=%d" % epoch]
        if signed:
            # The same El Torito entry and GPT partition grub-mkrescue gives its own efi.img.
            argv += ["-as", "mkisofs", "--efi-boot", "efi.img", "-efi-boot-part", "--efi-boot-image", "--"]
        try:
            self.runner.run(argv)
        except CommandError as error:
            if "No space left on device" in str(error) or "exceeds free space on media" in str(error):
                self._refuse_if_full(detail=" (No space left on device)")
            raise IsoError("making the ISO failed: %s" % error) from None
        if not os.path.getsize(output):
            raise IsoError("grub-mkrescue made an empty ISO")
        if not signed:
            self._fix_efi_serial(output, epoch)

    def _fix_efi_serial(self, iso, epoch):
        """Give the EFI system image a volume serial derived from the epoch.

        grub-mkrescue formats efi.img with mformat, which picks a random FAT
        volume serial and offers no option to set it: the only bytes that
        differ between two builds of the same source.
        """
        _rc, out = self.runner.run(["xorriso", "-indev", iso, "-find", "/efi.img", "-exec", "report_lba", "--"])
        match = re.search(r"File data lba:\s+\d+\s*,\s*(\d+)\s*,", out)
        if not match:
            raise IsoError("cannot find efi.img in %s to make it reproducible" % iso)
        sector = int(match.group(1)) * 2048
        serial = efi_serial(epoch).to_bytes(4, "little")
        with open(iso, "r+b") as handle:
            handle.seek(sector)
            boot = handle.read(512)
            if boot[0x52:0x57] == b"FAT32":
                offset = 0x43
            elif boot[0x36:0x39] == b"FAT":
                offset = 0x27
            else:
                raise IsoError("efi.img in %s is not a FAT image" % iso)
            handle.seek(sector + offset)
            handle.write(serial)


def efi_serial(epoch):
    """efi.img's FAT volume serial, derived from the epoch (mformat picks a random one)."""
    return int.from_bytes(hashlib.sha256(b"efi.img %d" % epoch).digest()[:4], "little")


def iso_uuid(epoch):
    """The ISO's uuid as GRUB's search --fs-uuid reads it: the volume date that make_iso sets."""
    return time.strftime("%Y-%m-%d-%H-%M-%S-00", time.gmtime(epoch))


def _copy_out(tree, relative, dest):
    """Copy the regular file at relative (link-free) out of the tree to dest, a file of the build's own."""
    with tree.parent(relative) as (dir_fd, name):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            raise IsoError("%s is not a regular file" % tree.path(relative))
        with open(dest, "wb") as out:
            shutil.copyfileobj(source, out, 1024 * 1024)


def _write(path, text, mode=0o644):
    """A file of the build's own (in its ISO tree), written anew."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
