# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Bootable live ISOs (Debian live-boot) from a cache snapshot, a tree or the host.

The pipeline: resolve the source and its identity; skip the build when the
manifest beside the ISO says the same source and options made it; otherwise,
in a private mount namespace, take a writable btrfs snapshot of the source
(or rsync it), clean and configure the copy, regenerate its initramfs,
squash it, lay out GRUB for BIOS and UEFI, write the hybrid image under a
temporary name and rename it. Timestamps come from SOURCE_DATE_EPOCH, taken
from the source, so the same input gives the same bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time

from ._command import CommandError
from ._fs import check_real_path, create_file, is_within, read_mounts, write_atomically
from ._rsync import RSYNC_VANISHED, copy_argv
from ._snapper_cache import (
    BTRFS_SUBVOLUME_INODE,
    HOME_EXCLUDES,
    SNAPSHOTS_NAME,
    STANDARD_EXCLUDES,
    CacheReader,
    Snapper,
    mount_excludes,
    read_os_release,
)

WORK_PREFIX = ".liveclone-iso-work-"
MANIFEST_SUFFIX = ".manifest.json"
MIB = 1024 * 1024
# What grub-mkrescue adds to the files of the ISO tree: its BIOS and EFI images.
ISO_OVERHEAD = 32 * MIB
HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
MANIFEST_VERSION = 1
CLONE_NEWNS = 0x00020000

LIVE_GROUPS = ("sudo", "audio", "video", "cdrom", "plugdev", "netdev")
FIRST_USER_UID = 1000
NOBODY_UID = 65534
SERIAL_CONSOLE = "console=tty0 console=ttyS0,115200n8"
# Removed from the image: machine identity and secrets of the source.
SECRET_GLOBS = (
    "etc/ssh/ssh_host_*", "etc/NetworkManager/system-connections/*", "var/lib/dbus/machine-id",
    "etc/crypttab", "etc/initramfs-tools/conf.d/resume",
)
HISTORY_NAMES = (".bash_history", ".zsh_history", ".python_history", ".lesshst", ".viminfo",
                 ".mysql_history", ".psql_history")
EMPTIED_DIRS = ("tmp", "var/tmp", "var/cache/apt/archives", "var/lib/apt/lists")
COMPRESSORS = {"zstd": "-Xcompression-level", "gzip": "-Xcompression-level", "xz": None, "lz4": None}


class IsoError(Exception):
    """A request that cannot be carried out; the message says what to do."""


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


class Source:
    """Where the image comes from, what identifies it, and its time."""

    def __init__(self, kind, root, snapshot=None):
        self.kind = kind
        self.root = root
        self.snapshot = snapshot
        self.identity = None
        self.epoch = None
        self.subvolume = False
        self.base_dir = None

    def view(self):
        return {"kind": self.kind, "path": self.root, "snapshot": self.snapshot,
                "identity": self.identity, "source_date_epoch": self.epoch}


class IsoBuilder:
    def __init__(self, module, runner, params):
        self.module = module
        self.runner = runner
        self.params = params
        self.dest = os.path.normpath(params["dest"])
        self.operations = []
        self.warnings = []
        self.stages = {}

    # --- source -----------------------------------------------------------

    def resolve_source(self):
        kind = self.params["source"]
        if kind == "cache":
            base_dir = self.params["cache_dir"]
            if not base_dir:
                raise IsoError("source cache needs cache_dir, the base_dir of a snapper_cache")
            reader = CacheReader(self.runner, Snapper(self.runner, self.params["snapper_config"]))
            if not os.path.isdir(base_dir):
                raise IsoError("cache_dir %s does not exist; give the base_dir of a snapper_cache backup "
                               "(mount its volume first), or use source: path" % base_dir)
            cache = reader.read(os.path.normpath(base_dir))
            if not cache.snapshots:
                raise IsoError("cache_dir %s holds no snapshot; back it up with liveclone.core.snapper_cache "
                               "first, or use source: path" % base_dir)
            wanted = str(self.params["snapshot"])
            snapshot = cache.newest() if wanted == "latest" else next(
                (snap for snap in cache.snapshots if snap.name == wanted), None)
            if snapshot is None:
                raise IsoError("snapshot %s is not in %s (snapshots: %s)" % (
                    wanted, base_dir, ", ".join(s.name for s in sorted(cache.snapshots, key=lambda s: s.order))))
            if not snapshot.read_only:
                raise IsoError("snapshot %s is not read-only; refusing to build from a tree that "
                               "may change" % snapshot.path)
            source = Source("cache", snapshot.path, snapshot.name)
            source.base_dir = cache.base_dir
        elif kind == "path":
            if not self.params["source_path"]:
                raise IsoError("source path needs source_path, the root of the tree to build from")
            source = Source("path", os.path.normpath(self.params["source_path"]))
        else:
            source = Source("live", "/")
        if not os.path.isdir(os.path.join(source.root, "etc")):
            what = {"cache": "snapshot", "path": "source_path", "live": "source live"}[kind]
            if not os.path.isdir(source.root):
                raise IsoError("%s %s does not exist; give the root of a system tree (a directory with "
                               "etc/ and boot/)" % (what, source.root))
            raise IsoError("%s %s does not look like a root tree (no etc/); give the root of a system "
                           "tree (a directory with etc/ and boot/)" % (what, source.root))
        if kind == "path":
            self._check_outside_source(source.root)
        self._check_family(source.root)
        self._identify(source)
        return source

    def _check_outside_source(self, root):
        """dest and work_dir inside a source tree would be copied into the next build (and
        the copy into itself)."""
        root = os.path.realpath(root)
        for name in ("dest", "work_dir"):
            path = self.dest if name == "dest" else self.params["work_dir"]
            if path and is_within(os.path.realpath(path), root):
                raise IsoError("%s %s is inside the source tree %s, so the build would copy its own output; "
                               "choose a %s outside the source" % (name, path, root, name))

    def _check_family(self, root):
        release = read_os_release(os.path.join(root, "etc/os-release"))
        family = {release.get("ID", "")} | set(release.get("ID_LIKE", "").split())
        if not family & {"debian", "ubuntu"}:
            raise IsoError(
                "live ISOs of %s (ID=%s) are not yet supported: only the Debian family (live-boot) is; "
                "dracut dmsquash-live and archiso images are planned" % (
                    release.get("PRETTY_NAME") or release.get("NAME") or "this distribution",
                    release.get("ID", "unknown")))

    def _identify(self, source):
        if self._is_subvolume(source.root):
            source.subvolume = True
            _rc, out = self.runner.run(["btrfs", "subvolume", "show", source.root])
            uuid = re.search(r"^\s*UUID:\s+(\S+)", out, re.M).group(1)
            created = re.search(r"^\s*Creation time:\s+(.+)$", out, re.M).group(1).strip()
            readonly = "readonly" in re.search(r"^\s*Flags:\s+(.*)$", out, re.M).group(1)
            if readonly:
                # A read-only snapshot never changes: its UUID names its content.
                # (Its generation does change, when it is snapshotted.)
                source.identity = "btrfs:%s" % uuid
                source.epoch = int(datetime.datetime.strptime(created, "%Y-%m-%d %H:%M:%S %z").timestamp())
                return
        # A tree that can change: fingerprint what the image would contain.
        digest, newest = hashlib.sha256(), 0
        for entry in self._walk(source.root, self._copy_excludes(source)):
            digest.update(entry[0].encode("utf-8", "surrogateescape"))
            digest.update(repr(entry[1:]).encode())
            newest = max(newest, entry[3])
        source.identity = "tree:" + digest.hexdigest()
        source.epoch = newest or 0

    def _is_subvolume(self, path):
        st = os.stat(path)
        return st.st_ino == BTRFS_SUBVOLUME_INODE and self._fstype(path) == "btrfs"

    def _fstype(self, path):
        return self.runner.run(["findmnt", "-n", "-o", "FSTYPE", "--target", path])[1].strip()

    def _fs_uuid(self, path):
        return self.runner.run(["findmnt", "-n", "-o", "UUID", "--target", path])[1].strip()

    def _walk(self, root, excludes):
        """(relative path, mode, size, mtime or 0 for a directory) of each entry, in a
        stable order, minus excludes."""
        patterns = [pattern.rstrip("/") for pattern in excludes]
        for directory, dirs, files in os.walk(root):
            relative_dir = "/" + os.path.relpath(directory, root).lstrip(".")
            dirs.sort()
            kept = []
            for name in dirs:
                rel = os.path.join(relative_dir, name)
                if not _excluded(rel, patterns):
                    kept.append(name)
            dirs[:] = kept
            for name in sorted(files) + kept:
                rel = os.path.join(relative_dir, name)
                if _excluded(rel, patterns):
                    continue
                st = os.lstat(os.path.join(directory, name))
                size = st.st_size if stat.S_ISREG(st.st_mode) else 0
                # A directory's mtime changes when an entry is created and removed
                # again (/tmp on a running host); its entries carry the content.
                mtime = 0 if stat.S_ISDIR(st.st_mode) else int(st.st_mtime)
                yield rel, st.st_mode, size, mtime

    def _copy_excludes(self, source):
        if source.kind == "cache":
            return ["/" + SNAPSHOTS_NAME]
        excludes = list(STANDARD_EXCLUDES)
        if not self.params["keep_home"]:
            excludes += HOME_EXCLUDES
        excludes += mount_excludes(source.root, self.params["keep_home"])
        for path in (os.path.dirname(self.dest), self._work_parent(source)):
            if is_within(path, source.root) and path != source.root:
                excludes.append("/" + os.path.relpath(path, source.root) + "/*")
        return excludes + ["/" + pattern.lstrip("/") for pattern in self.params["exclude"]]

    # --- idempotency ------------------------------------------------------

    def options_digest(self):
        keys = ("label", "hostname", "live_user", "boot_params", "persistence", "installer",
                "compression", "compression_level", "block_size", "exclude", "keep_home", "keep_users",
                "checksums")
        options = {key: self.params[key] for key in keys}
        # The password enters as its salted hash, which the ISO holds anyway.
        options["live_password"] = self._password_hash("live", self.params["live_password"])
        options["root_password"] = self._password_hash("root", self.params["root_password"])
        return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()

    def _password_hash(self, user, password):
        if not password:
            return None
        # A salt derived from the user and the label keeps the build reproducible.
        salt = hashlib.sha256(("%s:%s" % (user, self.params["label"])).encode()).hexdigest()[:16]
        return self.runner.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
                               data=password)[1].strip()

    def manifest_path(self):
        return self.dest + MANIFEST_SUFFIX

    def up_to_date(self, source, digest):
        if self.params["force"] or os.path.islink(self.dest) or not os.path.isfile(self.dest):
            return None
        try:
            with open(self.manifest_path()) as handle:
                manifest = json.load(handle)
        except (OSError, ValueError):
            return None
        if (manifest.get("version") != MANIFEST_VERSION or manifest.get("source_identity") != source.identity
                or manifest.get("options_digest") != digest):
            return None
        st = os.stat(self.dest)
        if st.st_size != manifest.get("size"):
            return None
        # The ISO as the build left it: no need to read it all again. A file
        # changed since (same size, new mtime) is hashed.
        if st.st_mtime_ns != manifest.get("iso_mtime_ns") and _sha256(self.dest) != manifest.get("sha256"):
            return None
        return manifest

    # --- build ------------------------------------------------------------

    def _work_parent(self, source):
        if self.params["work_dir"]:
            return os.path.normpath(self.params["work_dir"])
        if source.kind == "cache":
            return source.base_dir  # same btrfs filesystem: the snapshot is instant
        return os.path.dirname(self.dest)

    def remove_stale_work(self, parent):
        for path in sorted(glob.glob(os.path.join(parent, WORK_PREFIX + "*"))):
            self._remove_work(path)
            self.operations.append("removed %s left by an interrupted build" % path)

    def temp_iso_prefix(self):
        return "." + os.path.basename(self.dest) + ".tmp-"

    def remove_stale_isos(self):
        """Remove temporary copies of the ISO, its manifest and checksums (.NAME.*)
        that a killed build left. The caller holds the lock on dest's directory,
        so no build of ours is writing them."""
        pattern = os.path.join(os.path.dirname(self.dest), "." + glob.escape(os.path.basename(self.dest)) + ".*")
        for path in sorted(glob.glob(pattern)):
            os.unlink(path)
            self.operations.append("removed %s left by an interrupted build" % path)

    def _remove_work(self, path):
        for point in mounts_under(path):
            self.runner.run(["umount", point])
        if mounts_under(path):
            raise IsoError("%s still has mounts; not removing it" % path)
        rootfs = os.path.join(path, "rootfs")
        if os.path.isdir(rootfs) and os.stat(rootfs).st_ino == BTRFS_SUBVOLUME_INODE:
            self.runner.run(["btrfs", "subvolume", "delete", rootfs])
        shutil.rmtree(path)

    @contextlib.contextmanager
    def _stage(self, name):
        started = time.monotonic()
        yield
        self.stages[name] = round(time.monotonic() - started, 2)

    def build(self, source, digest):
        parent = self._work_parent(source)
        if not os.path.isdir(parent):
            raise IsoError("work_dir %s does not exist" % parent)
        self.remove_stale_work(parent)
        self.remove_stale_isos()
        work = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent)
        temp_iso = None
        try:
            rootfs = os.path.join(work, "rootfs")
            with self._stage("copy"):
                self._copy_source(source, rootfs)
            with self._stage("configure"):
                self._require_live_boot(rootfs)
                self._clean(rootfs, source.epoch)
                self._configure(rootfs, source.epoch)
            with self._stage("initramfs"):
                self._initramfs(rootfs, work, source.epoch)
            iso_root = os.path.join(work, "iso")
            os.makedirs(os.path.join(iso_root, "live"))
            os.makedirs(os.path.join(iso_root, "boot/grub"))
            with self._stage("squashfs"):
                squash = self._squashfs(rootfs, os.path.join(iso_root, "live/filesystem.squashfs"), source.epoch)
            with self._stage("bootloader"):
                self._boot_files(rootfs, iso_root)
            with self._stage("iso"):
                fd, temp_iso = tempfile.mkstemp(prefix=self.temp_iso_prefix(),
                                                dir=os.path.dirname(self.dest))
                os.close(fd)
                self._check_room(iso_root)
                self._make_iso(iso_root, temp_iso, source.epoch, work)
                os.chmod(temp_iso, 0o644)
                checksum = _sha256(temp_iso)
                os.rename(temp_iso, self.dest)
                temp_iso = None
                self._write_checksums(checksum)
                manifest = {"version": MANIFEST_VERSION, "source_identity": source.identity,
                            "options_digest": digest, "sha256": checksum, "source": source.view(),
                            "size": os.path.getsize(self.dest), "iso_mtime_ns": os.stat(self.dest).st_mtime_ns,
                            "squashfs": squash}
                write_atomically(self.module, self.manifest_path(), json.dumps(manifest, indent=2) + "\n")
            self.operations.append("built %s from %s %s" % (self.dest, source.kind, source.snapshot or source.root))
            return manifest
        finally:
            if temp_iso:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp_iso)
            self._remove_work(work)

    def _copy_source(self, source, rootfs):
        if source.subvolume and self._fs_uuid(source.root) == self._fs_uuid(os.path.dirname(rootfs)):
            self.runner.run(["btrfs", "subvolume", "snapshot", source.root, rootfs])
            # A snapshot shows nested subvolumes as empty directories.
            placeholder = os.path.join(rootfs, SNAPSHOTS_NAME)
            if source.kind == "cache" and os.path.isdir(placeholder):
                os.rmdir(placeholder)
            self.operations.append("took a writable btrfs snapshot of %s" % source.root)
            return
        os.mkdir(rootfs, 0o755)
        argv = copy_argv(source.root, rootfs, excludes=self._copy_excludes(source))
        try:
            rc, _out = self.runner.run(argv, ok_rcs=(0, RSYNC_VANISHED))
        except CommandError as error:
            raise IsoError("copying %s failed: %s" % (source.root, error)) from None
        if rc == RSYNC_VANISHED:
            self.warnings.append("some files vanished from %s while it was copied" % source.root)
        self.operations.append("copied %s with rsync" % source.root)

    def _require_live_boot(self, rootfs):
        status = os.path.join(rootfs, "var/lib/dpkg/status")
        text = ""
        if os.path.isfile(status):
            with open(status) as handle:
                text = handle.read()
        installed = {block.split("\n", 1)[0][9:] for block in text.split("\n\n")
                     if "Status: install ok installed" in block and block.startswith("Package: ")}
        wanted = ["live-boot", "live-config", "live-config-systemd"]
        if self.params["installer"] == "calamares":
            wanted += ["calamares", "calamares-settings-debian"]
        missing = [name for name in wanted if name not in installed]
        if not missing:
            return
        if not self.params["install_missing"]:
            raise IsoError(
                "the source lacks %s; install them in the source (apt-get install %s), or set "
                "install_missing: true to install them into the image from its own repositories"
                % (", ".join(missing), " ".join(missing)))
        with self._chroot(rootfs):
            try:
                self.runner.run(["chroot", rootfs, "apt-get", "update"])
                self.runner.run(["chroot", rootfs, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get",
                                 "install", "-y", "--no-install-recommends"] + missing)
            except CommandError as error:
                raise IsoError("installing %s into the image from its repositories failed: %s"
                               % (", ".join(missing), error)) from None
        self.operations.append("installed %s into the image" % ", ".join(missing))

    def _clean(self, rootfs, epoch):
        for pattern in SECRET_GLOBS:
            for path in glob.glob(os.path.join(rootfs, pattern)):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        machine_id = os.path.join(rootfs, "etc/machine-id")
        if os.path.lexists(machine_id):
            os.unlink(machine_id)
        open(machine_id, "w").close()  # empty: systemd makes a new one at boot
        if not self.params["keep_home"]:
            _empty_dir(os.path.join(rootfs, "home"))
            _empty_dir(os.path.join(rootfs, "root"))
        homes = ["root"] + [os.path.join("home", name) for name in _listdir(os.path.join(rootfs, "home"))]
        for home in homes:
            for name in HISTORY_NAMES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(rootfs, home, name))
        for directory in EMPTIED_DIRS:
            _empty_dir(os.path.join(rootfs, directory))
        for directory, _dirs, files in os.walk(os.path.join(rootfs, "var/log")):
            for name in files:
                os.unlink(os.path.join(directory, name))
        self._remove_users(rootfs)
        self.operations.append("removed the source's users, secrets, histories, logs and caches")

    def _remove_users(self, rootfs):
        keep = set(self.params["keep_users"])
        removed = set()

        def drop_users(fields):
            uid = int(fields[2])
            if FIRST_USER_UID <= uid < NOBODY_UID and fields[0] not in keep:
                removed.add(fields[0])
                return None
            return fields

        _edit_db(rootfs, "etc/passwd", drop_users)
        _edit_db(rootfs, "etc/shadow", lambda f: None if f[0] in removed else f)

        def drop_groups(fields):
            if fields[0] in removed:
                return None
            members = [m for m in fields[-1].split(",") if m and m not in removed]
            return fields[:-1] + [",".join(members)]

        _edit_db(rootfs, "etc/group", drop_groups)
        _edit_db(rootfs, "etc/gshadow", drop_groups)
        for name in removed:
            self.operations.append("removed user %s" % name)

    def _configure(self, rootfs, epoch):
        hostname = self.params["hostname"]
        _write(os.path.join(rootfs, "etc/hostname"), hostname + "\n")
        _write(os.path.join(rootfs, "etc/hosts"), "127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost "
               "ip6-localhost ip6-loopback\n" % hostname)
        # The source's fstab names its own disks; live-boot mounts the root.
        _write(os.path.join(rootfs, "etc/fstab"), "# live system: live-boot mounts the root filesystem\n")
        days = epoch // 86400
        root_hash = self._password_hash("root", self.params["root_password"])
        _edit_db(rootfs, "etc/shadow", lambda f: [f[0], root_hash or "!*", str(days)] + f[3:]
                 if f[0] == "root" else f)
        user = self.params["live_user"]
        if user:
            self._add_user(rootfs, user, self._password_hash("live", self.params["live_password"]), days)
            if not self.params["live_password"]:
                self.warnings.append("live_user %s has no password, so it cannot log in on a console; "
                                     "set live_password" % user)

    def _add_user(self, rootfs, user, password_hash, days):
        passwd = _read_db(rootfs, "etc/passwd")
        if any(fields[0] == user for fields in passwd):
            raise IsoError("live_user %s already exists in the source as a system user; choose another name"
                           % user)
        used = {int(fields[2]) for fields in passwd} | {int(f[2]) for f in _read_db(rootfs, "etc/group")}
        uid = next(number for number in range(FIRST_USER_UID, NOBODY_UID) if number not in used)
        home = "/home/" + user
        _append_db(rootfs, "etc/passwd", [user, "x", str(uid), str(uid), user, home, "/bin/bash"])
        _append_db(rootfs, "etc/shadow", [user, password_hash or "!", str(days), "0", "99999", "7", "", "", ""])
        _append_db(rootfs, "etc/group", [user, "x", str(uid), ""])
        _append_db(rootfs, "etc/gshadow", [user, "!", "", ""])

        def add_member(fields):
            if fields[0] in LIVE_GROUPS:
                members = [m for m in fields[-1].split(",") if m]
                return fields[:-1] + [",".join(members + [user])]
            return fields

        _edit_db(rootfs, "etc/group", add_member)
        _edit_db(rootfs, "etc/gshadow", add_member)
        target = os.path.join(rootfs, home.lstrip("/"))
        skel = os.path.join(rootfs, "etc/skel")
        if os.path.isdir(skel):
            shutil.copytree(skel, target, symlinks=True, dirs_exist_ok=True)
        else:
            os.makedirs(target, exist_ok=True)
        for directory, dirs, files in os.walk(target):
            for name in [directory] + [os.path.join(directory, n) for n in dirs + files]:
                os.lchown(name, uid, uid)
        os.chmod(target, 0o700)
        self.operations.append("added live user %s (uid %d, groups %s)" % (user, uid, ",".join(LIVE_GROUPS)))

    @contextlib.contextmanager
    def _chroot(self, rootfs):
        mounts = [(["mount", "-t", "proc", "proc"], "proc"), (["mount", "-t", "sysfs", "sysfs"], "sys"),
                  (["mount", "--bind", "/dev"], "dev"), (["mount", "-t", "devpts", "devpts"], "dev/pts"),
                  (["mount", "-t", "tmpfs", "tmpfs"], "run"), (["mount", "-t", "tmpfs", "tmpfs"], "tmp")]
        done = []
        try:
            for argv, point in mounts:
                target = os.path.join(rootfs, point)
                os.makedirs(target, exist_ok=True)
                self.runner.run(argv + [target])
                done.append(target)
            yield
        finally:
            for target in reversed(done):
                self.runner.run(["umount", target])

    def _initramfs(self, rootfs, work, epoch):
        with self._chroot(rootfs):
            initrds = self._initrds(rootfs)
            if initrds and all(self._initramfs_boots_live(rootfs, initrd) for initrd in initrds.values()):
                # Regenerating takes minutes on slow machines and changes nothing that matters.
                self.operations.append("kept the source's initramfs: it has live-boot and none of the "
                                       "source's resume or crypttab settings")
                return
            try:
                for version, initrd in initrds.items():
                    # -u updates an initramfs; -c creates one a kernel lacks.
                    self.runner.run(["chroot", rootfs, "env", "SOURCE_DATE_EPOCH=%d" % epoch, "update-initramfs",
                                     "-u" if initrd else "-c", "-k", version])
            except CommandError as error:
                raise IsoError("regenerating the image's initramfs failed: %s" % error) from None
        self.operations.append("regenerated the initramfs with live-boot")

    @staticmethod
    def _initrds(rootfs):
        """Each kernel version of the image and its initramfs (None where it has none)."""
        initrds = {}
        for kernel in sorted(glob.glob(os.path.join(rootfs, "boot/vmlinuz-*"))):
            version = os.path.basename(kernel)[len("vmlinuz-"):]
            initrd = "/boot/initrd.img-%s" % version
            initrds[version] = initrd if os.path.isfile(rootfs + initrd) else None
        return initrds

    def _initramfs_boots_live(self, rootfs, initrd):
        if initrd is None:
            return False
        try:
            _rc, out = self.runner.run(["chroot", rootfs, "lsinitramfs", initrd])
        except CommandError:
            return False
        return initramfs_boots_live(out.splitlines())

    def _squashfs(self, rootfs, output, epoch):
        compression = self.params["compression"]
        argv = ["mksquashfs", rootfs, output, "-noappend", "-no-progress", "-comp", compression,
                "-b", str(self.params["block_size"])]
        if self.params["compression_level"] is not None:
            argv += [COMPRESSORS[compression], str(self.params["compression_level"])]
        if compression == "xz":
            argv += ["-Xbcj", "x86"]
        # Every argument after -e is a name to exclude: options come first.
        excludes = [pattern.lstrip("/") for pattern in self.params["exclude"]]
        if excludes:
            argv += ["-wildcards", "-e"] + excludes
        _rc, out = self.runner.run(["env", "SOURCE_DATE_EPOCH=%d" % epoch] + argv)
        size = os.path.getsize(output)
        match = re.search(r"of uncompressed filesystem size \(([\d.]+) Kbytes\)", out)
        uncompressed = int(float(match.group(1)) * 1024) if match else None
        self.operations.append("squashed the image with %s (%d bytes)" % (compression, size))
        return {"size": size, "uncompressed_size": uncompressed,
                "compression_ratio": round(uncompressed / size, 2) if uncompressed else None}

    def _boot_files(self, rootfs, iso_root):
        kernels = sorted(glob.glob(os.path.join(rootfs, "boot/vmlinuz-*")), key=_version_key)
        if not kernels:
            raise IsoError("the source has no kernel in /boot; install linux-image-amd64 in it")
        version = os.path.basename(kernels[-1])[len("vmlinuz-"):]
        initrd = os.path.join(rootfs, "boot/initrd.img-" + version)
        if not os.path.isfile(initrd):
            raise IsoError("the source has no initrd.img-%s in /boot" % version)
        shutil.copyfile(kernels[-1], os.path.join(iso_root, "live/vmlinuz"))
        shutil.copyfile(initrd, os.path.join(iso_root, "live/initrd.img"))
        _write(os.path.join(iso_root, "boot/grub/grub.cfg"), self.grub_config())

    def grub_config(self):
        base = "boot=live components hostname=%s" % self.params["hostname"]
        if self.params["live_user"]:
            base += " username=%s" % self.params["live_user"]
        # live-config would otherwise create its default user with a known password.
        base += " live-config.nocomponents=user-setup"
        extra = " ".join(self.params["boot_params"])
        entries = [("Live system", "%s %s quiet" % (base, SERIAL_CONSOLE))]
        if self.params["persistence"]:
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
            lines += ['menuentry "%s (%s)" {' % (title, self.params["label"]),
                      "    linux /live/vmlinuz %s%s" % (options, " " + extra if extra else ""),
                      "    initrd /live/initrd.img",
                      "}", ""]
        return "\n".join(lines)

    def _check_room(self, iso_root):
        """Refuse before writing when the ISO cannot fit beside dest."""
        needed = sum(os.path.getsize(os.path.join(directory, name))
                     for directory, _dirs, files in os.walk(iso_root) for name in files) + ISO_OVERHEAD
        self._refuse_if_full(needed)

    def _refuse_if_full(self, needed=None, detail=""):
        directory = os.path.dirname(self.dest)
        info = os.statvfs(directory)
        free = info.f_bavail * info.f_frsize
        if needed is not None and free >= needed:
            return
        raise IsoError("not enough free space for the ISO in %s: %s%d MiB free; free space there or choose a "
                       "dest on a larger filesystem. The earlier ISO, if any, was left as it was.%s" % (
                           directory, "about %d MiB needed, " % (needed // MIB) if needed else "",
                           free // MIB, detail))

    def _make_iso(self, iso_root, output, epoch, work):
        stamp = time.strftime("%Y%m%d%H%M%S00", time.gmtime(epoch))
        argv = ["env", "SOURCE_DATE_EPOCH=%d" % epoch, "grub-mkrescue", "--output", output, iso_root, "--",
                "-volid", self.params["label"],
                "-volume_date", "uuid", stamp,
                "-volume_date", "all_file_dates", "=%d" % epoch]
        try:
            self.runner.run(argv)
        except CommandError as error:
            if "No space left on device" in str(error) or "exceeds free space on media" in str(error):
                self._refuse_if_full(detail=" (No space left on device)")
            raise IsoError("making the ISO failed: %s" % error) from None
        if not os.path.getsize(output):
            raise IsoError("grub-mkrescue made an empty ISO")
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
        serial = hashlib.sha256(b"efi.img %d" % epoch).digest()[:4]
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

    def _write_checksums(self, sha256):
        name = os.path.basename(self.dest)
        wanted = {"sha256": sha256}
        if "md5" in self.params["checksums"]:
            wanted["md5"] = _hash_file(self.dest, hashlib.md5())
        for algorithm in ("sha256", "md5"):
            path = "%s.%s" % (self.dest, algorithm)
            if algorithm in self.params["checksums"]:
                write_atomically(self.module, path, "%s  %s\n" % (wanted[algorithm], name))
            elif os.path.exists(path):
                os.unlink(path)


def run(module, runner, params, check_mode):
    builder = IsoBuilder(module, runner, params)
    dest_dir = os.path.dirname(builder.dest)
    if not os.path.isabs(builder.dest):
        raise IsoError("dest %r is relative; give an absolute path" % params["dest"])
    if not os.path.isdir(dest_dir):
        raise IsoError("the directory of dest, %s, does not exist; create it first" % dest_dir)
    if params["compression_level"] is not None and COMPRESSORS[params["compression"]] is None:
        raise IsoError("compression %s takes no compression_level; leave it unset" % params["compression"])
    if len(params["label"]) > 32:
        raise IsoError("label %r is longer than the 32 characters an ISO volume id holds" % params["label"])
    check_params(params, builder.dest)
    fd = os.open(dest_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        source = builder.resolve_source()
        digest = builder.options_digest()
        manifest = builder.up_to_date(source, digest)
        changed = manifest is None
        if changed and check_mode:
            builder.operations.append("build %s from %s %s" % (builder.dest, source.kind,
                                                               source.snapshot or source.root))
        elif changed:
            enter_private_mount_namespace(runner)
            manifest = builder.build(source, digest)
    finally:
        os.close(fd)
    result = {"changed": changed, "path": builder.dest, "label": params["label"], "source": source.view(),
              "operations": builder.operations, "stages": builder.stages}
    if manifest:
        result.update(size=manifest["size"], sha256=manifest["sha256"], squashfs=manifest["squashfs"])
    return result, builder.warnings


def check_params(params, dest):
    """Refuse what no build could use, before anything is read or written."""
    problem = check_real_path("dest", dest, include_last=False)
    if problem:
        raise IsoError(problem)
    if os.path.isdir(dest):
        raise IsoError("dest %s is a directory; give the ISO's file name, such as %s" % (
            dest, os.path.join(dest, "live.iso")))
    size = params["block_size"]
    if size < 4096 or size > 1048576 or size & (size - 1):
        raise IsoError("block_size %d is not a power of two from 4096 to 1048576 (what mksquashfs takes); "
                       "use 131072, or 1048576 (the default)" % size)
    if not HOSTNAME.match(params["hostname"]):
        raise IsoError("hostname %r is not a host name; use letters, digits and '-' (at most 63, not "
                       "starting or ending with '-')" % params["hostname"])
    work_dir = params["work_dir"]
    if work_dir:
        problem = check_real_path("work_dir", work_dir)
        if problem:
            raise IsoError(problem)
        if not os.path.isdir(work_dir):
            raise IsoError("work_dir %s does not exist; create it first, or leave work_dir unset" % work_dir)


def initramfs_boots_live(entries):
    """Whether an initramfs, by its file list, boots a live system and carries
    none of the source's resume or crypttab settings (which the image drops)."""
    names = {entry.strip().lstrip("./") for entry in entries}
    has_live_boot = "scripts/live" in names
    source_settings = any(name.startswith("cryptroot/") or
                          (name.startswith("conf/conf.d/") and "resume" in name) for name in names)
    return has_live_boot and not source_settings


def _excluded(relative, patterns):
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in patterns)


def _listdir(path):
    return os.listdir(path) if os.path.isdir(path) else []


def _empty_dir(path):
    for name in _listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)


def _read_db(rootfs, name):
    path = os.path.join(rootfs, name)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [line.rstrip("\n").split(":") for line in handle if line.strip()]


def _edit_db(rootfs, name, change):
    path = os.path.join(rootfs, name)
    if not os.path.exists(path):
        return
    mode = stat.S_IMODE(os.stat(path).st_mode)
    rows = [row for row in (change(fields) for fields in _read_db(rootfs, name)) if row is not None]
    _write(path, "".join(":".join(row) + "\n" for row in rows), mode)


def _append_db(rootfs, name, fields):
    path = os.path.join(rootfs, name)
    if os.path.exists(path):
        _edit_db(rootfs, name, lambda f: f)
        with open(path, "a") as handle:
            handle.write(":".join(fields) + "\n")


def _write(path, text, mode=0o644):
    # A copied tree may hold absolute symlinks (etc/hosts -> /etc/...): replace, never follow.
    create_file(path, text, mode)
    os.chmod(path, mode)


def _hash_file(path, digest):
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256(path):
    return _hash_file(path, hashlib.sha256())


def _version_key(path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]
