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

from ._beneath import Tree, relative_parts
from ._btrfs import Btrfs, filesystem_type, filesystem_uuid, is_subvolume
from ._cache import SNAPSHOTS_NAME, CacheReader
from ._command import CommandError
from ._fs import (
    FS_APPEND_FL,
    FS_IMMUTABLE_FL,
    canonical_path,
    check_path_text,
    check_real_path,
    flags_at,
    free_space,
    is_within,
    read_file,
    read_mounts,
    symlink_on,
    write_atomically,
)
from ._lock import DEFAULT_TIMEOUT, Lock
from ._roottree import HOME_EXCLUDES, STANDARD_EXCLUDES, mount_excludes, tree_os_release
from ._rsync import RSYNC_VANISHED, copy_argv, is_excluded
from ._snapper import Snapper
from ._text import (
    check_boot_param,
    check_host_name,
    check_label,
    check_plain_text,
    check_snapper_name,
    check_user_name,
)

WORK_PREFIX = ".liveclone-iso-work-"
MANIFEST_SUFFIX = ".manifest.json"
MIB = 1024 * 1024
# What grub-mkrescue adds to the files of the ISO tree: its BIOS and EFI images.
ISO_OVERHEAD = 32 * MIB
# An ISO 9660 volume id holds 32 bytes.
ISO_LABEL_BYTES = 32
# `latest`, a snapper number, or a legacy btrfs snapshot's @YYYY-MM-DD_HH:MM[_N].
SNAPSHOT_NAME = re.compile(r"latest|[0-9]+|@[0-9]{4}-[0-9]{2}-[0-9]{2}_[0-9]{2}:[0-9]{2}(?:_[0-9]+)?")
COMPRESSION_LEVELS = {"zstd": (1, 22), "gzip": (1, 9)}
PATH_PARAMS = ("dest", "cache_dir", "source_path", "work_dir")
# What the room check before the copy assumes at least of the compression: a
# lower bound (lz4 gives about 2, zstd about 3.3, xz about 4), so that it
# refuses only a build that cannot fit; the exact check follows the squashfs.
ASSUMED_RATIO = 4
# Inodes the build needs beside the copy: the ISO, its checksums, the manifest, temporary names.
SPARE_INODES = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The parameters' defaults, as the module's argument spec has them (for check_params on a partial dict).
DEFAULTS = dict(
    dest=None, source="cache", cache_dir=None, snapper_config="distroclone-backup", snapshot="latest",
    source_path=None, label="LIVECLONE", hostname="liveclone", live_user="live", live_password=None,
    root_password=None, boot_params=[], persistence=True, installer="none", install_missing=False,
    compression="zstd", compression_level=None, block_size=1048576, exclude=[], keep_home=False,
    keep_users=[], work_dir=None, checksums=["sha256"], force=False)
MANIFEST_VERSION = 1
DEST_BUSY = ("%(path)s is locked by another build of an ISO there; waited %(timeout)d s. Try again when it has "
             "finished")
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
# Emptied in the image, with the mode each gets when the module has to make it.
EMPTIED_DIRS = (("tmp", 0o1777), ("var/tmp", 0o1777), ("var/cache/apt/archives", 0o755),
                ("var/lib/apt/lists", 0o755))
# Where the chroot of the image gets its kernel filesystems, in mount order.
CHROOT_MOUNTS = ((["mount", "-t", "proc", "proc"], "proc", 0o555), (["mount", "-t", "sysfs", "sysfs"], "sys", 0o555),
                 (["mount", "--bind", "/dev"], "dev", 0o755), (["mount", "-t", "devpts", "devpts"], "dev/pts", 0o755),
                 (["mount", "-t", "tmpfs", "tmpfs"], "run", 0o755), (["mount", "-t", "tmpfs", "tmpfs"], "tmp", 0o1777))
LIVE_PACKAGES = ("live-boot", "live-config", "live-config-systemd")
CALAMARES_PACKAGES = ("calamares", "calamares-settings-debian")
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
        self.size = None  # bytes of regular files, and entries, that the image would hold
        self.entries = None

    def view(self):
        return {"kind": self.kind, "path": self.root, "snapshot": self.snapshot,
                "identity": self.identity, "source_date_epoch": self.epoch}


class IsoBuilder:
    def __init__(self, runner, params):
        self.runner = runner
        self.btrfs = Btrfs(runner)
        self.params = params
        self.dest = canonical_path(params["dest"])
        self.operations = []
        self.warnings = []
        self.stages = {}
        self._snapshot_copy = None

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
            cache = reader.read(base_dir)
            # What the reader refused to take for the cache or a snapshot (a link, a mount point).
            problems = list(getattr(cache, "problems", []))
            if problems and not cache.snapshots:
                raise IsoError("cache_dir %s holds no snapshot to build from: %s" % (base_dir, "; ".join(problems)))
            self.warnings += problems + list(getattr(cache, "ignored", []))
            if not cache.snapshots:
                raise IsoError("cache_dir %s holds no snapshot; back it up with liveclone.core.snapper_cache "
                               "first, or use source: path" % base_dir)
            wanted = str(self.params["snapshot"])
            snapshot = cache.newest() if wanted == "latest" else next(
                (snap for snap in cache.snapshots if snap.name == wanted), None)
            if snapshot is None:
                raise IsoError("snapshot %s is not in %s (snapshots: %s)" % (
                    wanted, base_dir, ", ".join(s.name for s in sorted(cache.snapshots, key=lambda s: s.order))))
            self._check_snapshot_path(snapshot.path, base_dir)
            if not snapshot.read_only:
                raise IsoError("snapshot %s is not read-only; refusing to build from a tree that "
                               "may change" % snapshot.path)
            source = Source("cache", snapshot.path, snapshot.name)
            source.base_dir = cache.base_dir
        elif kind == "path":
            if not self.params["source_path"]:
                raise IsoError("source path needs source_path, the root of the tree to build from")
            source = Source("path", self.params["source_path"])
        else:
            source = Source("live", "/")
        what = {"cache": "snapshot", "path": "source_path", "live": "source live"}[kind]
        if not os.path.isdir(source.root) or os.path.islink(source.root):
            raise IsoError("%s %s does not exist; give the root of a system tree (a directory with "
                           "etc/ and boot/)" % (what, source.root))
        with Tree(source.root) as tree:
            etc = tree.lstat("etc")
            if etc is not None and stat.S_ISLNK(etc.st_mode):
                raise IsoError("%s %s has a symlink for etc (to %s); the image's etc must be a real directory "
                               "of the tree: make it one in the source"
                               % (what, source.root, tree.readlink("etc")))
            if etc is None or not stat.S_ISDIR(etc.st_mode):
                raise IsoError("%s %s does not look like a root tree (no etc/); give the root of a system "
                               "tree (a directory with etc/ and boot/)" % (what, source.root))
            if kind == "path":
                self._check_outside_source(source.root)
            self._check_family(tree)
        self._identify(source)
        return source

    @staticmethod
    def _check_snapshot_path(path, base_dir):
        """A cache's entries are never followed: a snapshot reached through a
        link (.rootfs_cache or a legacy @DATE entry planted as one) is not the cache's."""
        if not is_within(path, base_dir):
            raise IsoError("the snapshot %s is not inside cache_dir %s; give the base_dir of the cache that holds "
                           "it" % (path, base_dir))
        link = symlink_on(path)
        if link:
            raise IsoError("the snapshot %s of cache_dir %s runs through the symlink %s (to %s); the entries of a "
                           "cache are never followed: remove the link, then back up again with "
                           "liveclone.core.snapper_cache" % (path, base_dir, link, os.readlink(link)))

    def _check_outside_source(self, root):
        """dest and work_dir inside a source tree would be copied into the next build (and
        the copy into itself)."""
        root = os.path.realpath(root)
        for name in ("dest", "work_dir"):
            path = self.dest if name == "dest" else self.params["work_dir"]
            if path and is_within(os.path.realpath(path), root):
                raise IsoError("%s %s is inside the source tree %s, so the build would copy its own output; "
                               "choose a %s outside the source" % (name, path, root, name))

    def _check_family(self, tree):
        release = tree_os_release(tree)
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
            shown = self.btrfs.show(source.root)
            uuid = shown["UUID"]
            created = shown["Creation time"]
            readonly = "readonly" in shown["Flags"]
            if readonly:
                # A read-only snapshot never changes: its UUID names its content.
                # (Its generation does change, when it is snapshotted.)
                source.identity = "btrfs:%s" % uuid
                source.epoch = int(datetime.datetime.strptime(created, "%Y-%m-%d %H:%M:%S %z").timestamp())
                return
        # A tree that can change: fingerprint what the image would contain.
        digest, newest, size, entries = hashlib.sha256(), 0, 0, 0
        for entry in self._walk(source.root, self._copy_excludes(source)):
            digest.update(entry[0].encode("utf-8", "surrogateescape"))
            digest.update(repr(entry[1:]).encode())
            newest = max(newest, entry[3])
            size += entry[2]
            entries += 1
        source.identity = "tree:" + digest.hexdigest()
        source.epoch = newest or 0
        source.size, source.entries = size, entries

    def _is_subvolume(self, path):
        return is_subvolume(os.lstat(path)) and filesystem_type(self.runner, path) == "btrfs"

    def _walk(self, root, excludes):
        """(relative path, mode, size, mtime or 0 for a directory) of each entry, in a
        stable order, minus excludes."""
        for directory, dirs, files in os.walk(root):
            relative_dir = "/" + os.path.relpath(directory, root).lstrip(".")
            dirs.sort()
            kept = []
            for name in dirs:
                rel = os.path.join(relative_dir, name)
                if not is_excluded(rel, excludes):
                    kept.append(name)
            dirs[:] = kept
            for name in sorted(files) + kept:
                rel = os.path.join(relative_dir, name)
                if is_excluded(rel, excludes):
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
            # A manifest that is a link is never followed (nor trusted).
            manifest = json.loads(read_file(self.manifest_path()) or "null")
        except ValueError:
            return None
        if not isinstance(manifest, dict):
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

    # --- can it finish? ----------------------------------------------------

    def preflight(self, source):
        """Refuse, before anything is copied or removed, what would stop the
        build later: a kernel that is a link out of the tree, missing live
        packages, a live_user that the source keeps, a read-only, immutable or
        full destination."""
        with Tree(source.root) as tree:
            found = kernels(tree, "the source")
            if not found:
                raise IsoError("the source has no kernel in /boot; install linux-image-amd64 in it")
            missing = missing_packages(tree, self.params["installer"])
            if missing and not self.params["install_missing"]:
                raise IsoError(
                    "the source lacks %s; install them in the source (apt-get install %s), or set "
                    "install_missing: true to install them into the image from its own repositories"
                    % (", ".join(missing), " ".join(missing)))
            user = self.params["live_user"]
            if user:
                for fields in _read_db(tree, "etc/passwd", "the source") or []:
                    if fields[0] == user and not self._removed(fields):
                        raise IsoError("live_user %s already exists in the source as a system user (or one of "
                                       "keep_users); choose another name" % user)
        self.check_can_finish(source)

    def _removed(self, fields):
        """Whether the image drops the account of this passwd line."""
        uid = _uid(fields)
        return uid is not None and FIRST_USER_UID <= uid < NOBODY_UID and fields[0] not in self.params["keep_users"]

    def check_can_finish(self, source):
        """Refuse a destination or work directory that cannot take the build:
        read-only, immutable or append-only, or without room for the copy and
        at least a lower bound of the ISO. Reads only."""
        dest_dir = os.path.dirname(self.dest)
        parent = self._work_parent(source)
        for name, directory in (("the directory of dest", dest_dir), ("the work directory", parent)):
            problem = _unwritable(directory)
            if problem:
                raise IsoError("%s, %s, %s. Nothing was changed." % (name, directory, problem))
        for path in [self.dest, self.manifest_path()] + ["%s.%s" % (self.dest, name) for name in ("sha256", "md5")]:
            problem = _unchangeable(path)
            if problem:
                raise IsoError("%s %s; the build would fail only at its end. Nothing was changed." % (path, problem))
        size, entries = self._source_size(source)
        iso = size // ASSUMED_RATIO + ISO_OVERHEAD
        copy = 0 if self._copies_by_snapshot(source, parent) else size
        needs = {}
        for directory, needed, inodes in ((dest_dir, iso, SPARE_INODES), (parent, copy + iso, entries if copy else 0)):
            device = os.stat(directory).st_dev
            known = needs.setdefault(device, [directory, 0, 0])
            known[1] += needed
            known[2] += inodes
        for directory, needed, inodes in needs.values():
            space = free_space(directory)
            free = space.free_bytes
            if free < needed:
                raise IsoError(
                    "not enough free space for the ISO in %s: about %d MiB needed at least (%s%s MiB for the ISO, a "
                    "quarter of the source's %d MiB and %d MiB for the boot images), %d MiB free; free space there "
                    "or choose a dest on a larger filesystem (or a work_dir elsewhere). Nothing was changed." % (
                        directory, needed // MIB, "%d MiB for the copy, " % (copy // MIB)
                        if directory == parent and copy else "", iso // MIB, size // MIB, ISO_OVERHEAD // MIB,
                        free // MIB))
            if space.free_inodes is not None and space.free_inodes < inodes + SPARE_INODES:
                raise IsoError("the filesystem of %s is out of inodes (%d free, about %d needed for the copy); "
                               "free some (df -i) or choose a work_dir elsewhere. Nothing was changed." % (
                                   directory, space.free_inodes, inodes + SPARE_INODES))

    def _source_size(self, source):
        if source.size is None:
            size = entries = 0
            for entry in self._walk(source.root, self._copy_excludes(source)):
                size += entry[2]
                entries += 1
            source.size, source.entries = size, entries
        return source.size, source.entries

    def _copies_by_snapshot(self, source, parent):
        """Whether the copy is a btrfs snapshot (instant, no room needed) rather than rsync."""
        if self._snapshot_copy is None:
            self._snapshot_copy = bool(source.subvolume and filesystem_uuid(self.runner, source.root)
                                       == filesystem_uuid(self.runner, parent))
        return self._snapshot_copy

    # --- build ------------------------------------------------------------

    def _work_parent(self, source):
        if self.params["work_dir"]:
            return canonical_path(self.params["work_dir"])
        if source.kind == "cache":
            return source.base_dir  # same btrfs filesystem: the snapshot is instant
        return os.path.dirname(self.dest)

    def remove_stale_work(self, parent):
        for path in sorted(glob.glob(os.path.join(glob.escape(parent), WORK_PREFIX + "*"))):
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode):
                # Not a work tree of ours (we make directories): a link is removed, never followed.
                os.unlink(path)
                self.operations.append("removed %s (a %s, not a work tree) from %s" % (
                    os.path.basename(path), "symlink" if stat.S_ISLNK(info.st_mode) else "file", parent))
                continue
            self._remove_work(path)
            self.operations.append("removed %s left by an interrupted build" % path)

    def temp_iso_prefix(self):
        return "." + os.path.basename(self.dest) + ".tmp-"

    def remove_stale_isos(self):
        """Remove temporary copies of the ISO, its manifest and checksums (.NAME.*)
        that a killed build left. The caller holds the lock on dest's directory,
        so no build of ours is writing them. A directory there is not ours and stays."""
        pattern = os.path.join(glob.escape(os.path.dirname(self.dest)),
                               "." + glob.escape(os.path.basename(self.dest)) + ".*")
        for path in sorted(glob.glob(pattern)):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                self.warnings.append("%s is a directory, not a file left by a build; it was left alone" % path)
                continue
            os.unlink(path)
            self.operations.append("removed %s left by an interrupted build" % path)

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
        # The ISO's temporary file first: a destination that takes no file fails here, before the copy.
        fd, temp_iso = tempfile.mkstemp(prefix=self.temp_iso_prefix(), dir=os.path.dirname(self.dest))
        os.close(fd)
        work = None
        try:
            work = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent)
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
                write_atomically(self.manifest_path(), json.dumps(manifest, indent=2) + "\n")
            self.operations.append("built %s from %s %s" % (self.dest, source.kind, source.snapshot or source.root))
            return manifest
        finally:
            if temp_iso:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp_iso)
            if work:
                self._remove_work(work)

    def _copy_source(self, source, rootfs):
        if self._copies_by_snapshot(source, os.path.dirname(rootfs)):
            self.btrfs.snapshot(source.root, rootfs)
            # A snapshot shows nested subvolumes as empty directories.
            with Tree(rootfs) as tree:
                info = tree.lstat(SNAPSHOTS_NAME)
                if source.kind == "cache" and info is not None and stat.S_ISDIR(info.st_mode):
                    with tree.directory("") as fd:
                        os.rmdir(SNAPSHOTS_NAME, dir_fd=fd)
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
        with Tree(rootfs) as tree:
            missing = missing_packages(tree, self.params["installer"])
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

    # --- the image's clean-up: every path beneath rootfs, through Tree ---------

    def _real_dir(self, tree, relative, mode=0o755, create=True):
        """Make relative a real directory of the image: a symlink (or a file)
        at it or on the way to it is removed, never followed, and replaced by
        an empty directory. False when it is missing and create is not set."""
        parts = relative_parts(relative)
        for index in range(1, len(parts) + 1):
            prefix = "/".join(parts[:index])
            info = tree.lstat(prefix)
            if info is not None and stat.S_ISDIR(info.st_mode):
                continue
            if info is None and not create:
                return False
            wanted = mode if index == len(parts) else 0o755
            if info is not None:
                what = ("symlink %s (to %s)" % (prefix, tree.readlink(prefix)) if stat.S_ISLNK(info.st_mode)
                        else "file %s" % prefix)
                tree.remove(prefix)
                self.operations.append("replaced the %s in the image by an empty directory; what it pointed "
                                       "to was not touched" % what)
            tree.makedirs(prefix, wanted)
            tree.chmod(prefix, wanted)  # mkdir's mode is cut by the umask
        return True

    def _emptied(self, tree, relative, mode):
        self._real_dir(tree, relative, mode)
        tree.empty(relative)

    def _clean(self, rootfs, epoch):
        with Tree(rootfs) as tree:
            for pattern in SECRET_GLOBS:
                directory, wanted = pattern.rsplit("/", 1)
                if not self._real_dir(tree, directory, create=False):
                    continue
                for name in tree.listdir(directory):
                    if fnmatch.fnmatchcase(name, wanted):
                        tree.remove(directory + "/" + name)
            # Empty: systemd makes a new one at boot. A link there is replaced.
            tree.write_text("etc/machine-id", "", 0o644)
            if not self.params["keep_home"]:
                self._emptied(tree, "home", 0o755)
                self._emptied(tree, "root", 0o700)
            homes = ["root"] + ["home/" + name for name in tree.listdir("home")]
            for home in homes:
                # A home that is a link (kept with keep_home) is resolved as the image
                # sees it, never out of the image; its histories go in any case.
                inside = tree.resolve(home)
                if inside is None or not tree.is_dir(inside):
                    continue
                for name in HISTORY_NAMES:
                    tree.remove(inside + "/" + name if inside else name)
            for directory, mode in EMPTIED_DIRS:
                self._emptied(tree, directory, mode)
            if self._real_dir(tree, "var/log", create=False):
                for directory, _dirs, files in list(tree.walk("var/log")):
                    for name in files:
                        tree.remove(directory + "/" + name)
            self._remove_users(tree)
        self.operations.append("removed the source's users, secrets, histories, logs and caches")

    def _remove_users(self, tree):
        removed = set()

        def drop_users(fields):
            if self._removed(fields):
                removed.add(fields[0])
                return None
            return fields

        _edit_db(tree, "etc/passwd", drop_users)
        _edit_db(tree, "etc/shadow", lambda f: None if f[0] in removed else f)

        def drop_groups(fields):
            if fields[0] in removed:
                return None
            members = [m for m in fields[-1].split(",") if m and m not in removed]
            return fields[:-1] + [",".join(members)]

        _edit_db(tree, "etc/group", drop_groups)
        _edit_db(tree, "etc/gshadow", drop_groups)
        for name in sorted(removed):
            self.operations.append("removed user %s" % name)

    def _configure(self, rootfs, epoch):
        hostname = self.params["hostname"]
        with Tree(rootfs) as tree:
            # A link at any of these (etc/hosts -> /etc/hosts) is replaced, never written through.
            tree.write_text("etc/hostname", hostname + "\n")
            tree.write_text("etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost "
                            "ip6-localhost ip6-loopback\n" % hostname)
            # The source's fstab names its own disks; live-boot mounts the root.
            tree.write_text("etc/fstab", "# live system: live-boot mounts the root filesystem\n")
            days = epoch // 86400
            root_hash = self._password_hash("root", self.params["root_password"])
            _edit_db(tree, "etc/shadow", lambda f: [f[0], root_hash or "!*", str(days)] + f[3:]
                     if f[0] == "root" else f)
            user = self.params["live_user"]
            if user:
                self._add_user(tree, user, self._password_hash("live", self.params["live_password"]), days)
                if not self.params["live_password"]:
                    self.warnings.append("live_user %s has no password, so it cannot log in on a console; "
                                         "set live_password" % user)

    def _add_user(self, tree, user, password_hash, days):
        passwd = _read_db(tree, "etc/passwd") or []
        if any(fields[0] == user for fields in passwd):
            raise IsoError("live_user %s already exists in the source as a system user; choose another name"
                           % user)
        groups = _read_db(tree, "etc/group") or []
        used = {_uid(fields) for fields in passwd} | {_uid(fields) for fields in groups}
        uid = next(number for number in range(FIRST_USER_UID, NOBODY_UID) if number not in used)
        home = "home/" + user
        _append_db(tree, "etc/passwd", [user, "x", str(uid), str(uid), user, "/" + home, "/bin/bash"])
        _append_db(tree, "etc/shadow", [user, password_hash or "!", str(days), "0", "99999", "7", "", "", ""])
        _append_db(tree, "etc/group", [user, "x", str(uid), ""])
        _append_db(tree, "etc/gshadow", [user, "!", "", ""])

        def add_member(fields):
            if fields[0] in LIVE_GROUPS:
                members = [m for m in fields[-1].split(",") if m]
                return fields[:-1] + [",".join(members + [user])]
            return fields

        _edit_db(tree, "etc/group", add_member)
        _edit_db(tree, "etc/gshadow", add_member)
        # home/USER must be a real directory of the image: a link there (or at
        # home) is replaced, and etc/skel is copied only when it is a real directory.
        self._real_dir(tree, home, 0o700)
        skel = tree.lstat("etc/skel")
        if skel is not None and stat.S_ISDIR(skel.st_mode):
            tree.copy_within("etc/skel", home)
        elif skel is not None:
            self.operations.append("left etc/skel out of %s's home: it is a symlink, never followed" % user)
        tree.chown_tree(home, uid, uid)
        tree.chmod(home, 0o700)
        self.operations.append("added live user %s (uid %d, groups %s)" % (user, uid, ",".join(LIVE_GROUPS)))

    @contextlib.contextmanager
    def _chroot(self, rootfs):
        # Every mount point is made a real directory beneath rootfs first (a link
        # there is replaced): a mount never goes through a link out of the image.
        with Tree(rootfs) as tree:
            for _argv, point, mode in CHROOT_MOUNTS:
                self._real_dir(tree, point, mode)
        done = []
        try:
            for argv, point, _mode in CHROOT_MOUNTS:
                target = os.path.join(rootfs, point)
                if symlink_on(target) or not os.path.isdir(target):
                    raise IsoError("%s is not a real directory of the image; not mounting there" % target)
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
        """Each kernel version of the image and its initramfs, as the chroot sees
        it (None where it has none)."""
        with Tree(rootfs) as tree:
            found = kernels(tree, "the image")
        return {version: "/" + initrd if initrd else None for version, _kernel, initrd in found}

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
        with Tree(rootfs) as tree:
            found = kernels(tree, "the image")
            if not found:
                raise IsoError("the source has no kernel in /boot; install linux-image-amd64 in it")
            version, kernel, initrd = found[-1]
            if initrd is None:
                raise IsoError("the source has no initrd.img-%s in /boot" % version)
            _copy_out(tree, kernel, os.path.join(iso_root, "live/vmlinuz"))
            _copy_out(tree, initrd, os.path.join(iso_root, "live/initrd.img"))
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
        free = free_space(directory).free_bytes
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
                write_atomically(path, "%s  %s\n" % (wanted[algorithm], name))
            elif os.path.exists(path):
                os.unlink(path)


def run(runner, params, check_mode):
    params = canonical_params(params)
    # Every value is checked before anything is read or written, in check mode too.
    check_params(params)
    builder = IsoBuilder(runner, params)
    # One build at a time per directory of ISOs.
    with Lock(os.path.dirname(builder.dest), DEFAULT_TIMEOUT, DEST_BUSY):
        source = builder.resolve_source()
        digest = builder.options_digest()
        manifest = builder.up_to_date(source, digest)
        changed = manifest is None
        if changed:
            builder.preflight(source)
        if changed and check_mode:
            builder.operations.append("build %s from %s %s" % (builder.dest, source.kind,
                                                               source.snapshot or source.root))
        elif changed:
            enter_private_mount_namespace(runner)
            manifest = builder.build(source, digest)
    result = {"changed": changed, "path": builder.dest, "label": params["label"], "source": source.view(),
              "operations": builder.operations, "stages": builder.stages}
    if manifest:
        result.update(size=manifest["size"], sha256=manifest["sha256"], squashfs=manifest["squashfs"])
    return result, builder.warnings


def canonical_params(params):
    """params with every path in its canonical form ('//' is '/', no '.', '..'
    or trailing slash): the rules are checked on it, and it is used everywhere after."""
    params = dict(params)
    for name in PATH_PARAMS:
        if params.get(name):
            params[name] = canonical_path(params[name])
    return params


def parameter_problems(params):
    """The messages refusing values that no build could use, or that would
    land unquoted in grub.cfg, passwd, shadow or hostname. Reads nothing."""
    problems = []
    for name in PATH_PARAMS:
        value = params[name]
        if value:
            problems.append(check_path_text(name, value))
            if any(part.startswith(WORK_PREFIX) for part in value.split("/")):
                problems.append("%s %s lies in a work tree of an earlier build (%s*), which the next build "
                                "removes; choose a path elsewhere" % (name, value, WORK_PREFIX))
    problems.append(check_label("label", params["label"], ISO_LABEL_BYTES, "an ISO volume id"))
    problems.append(check_host_name("hostname", params["hostname"]))
    if params["live_user"]:
        problems.append(check_user_name("live_user", params["live_user"]))
    problems += [check_user_name("keep_users", user) for user in params["keep_users"]]
    for name in ("live_password", "root_password"):
        if params[name]:
            problems.append(check_plain_text(name, params[name]))
    problems += [check_boot_param("boot_params", item) for item in params["boot_params"]]
    problems.append(check_snapper_name("snapper_config", params["snapper_config"]))
    if not SNAPSHOT_NAME.fullmatch(str(params["snapshot"])):
        problems.append("snapshot %r is not a snapshot name; give latest, a snapshot number, or a legacy "
                        "@YYYY-MM-DD_HH:MM[_N] name as liveclone.core.snapper_cache_info lists them"
                        % params["snapshot"])
    problems += ["exclude item %r holds a control character (a newline, tab or the like); remove it" % item
                 for item in params["exclude"] if _CONTROL.search(item)]
    compression, level = params["compression"], params["compression_level"]
    if level is not None and compression not in COMPRESSION_LEVELS:
        problems.append("compression %s takes no compression_level; leave it unset" % compression)
    elif level is not None:
        low, high = COMPRESSION_LEVELS[compression]
        if not low <= level <= high:
            problems.append("compression_level %d is out of range for %s; choose a level from %d to %d, or leave "
                            "it unset" % (level, compression, low, high))
    size = params["block_size"]
    if size < 4096 or size > 1048576 or size & (size - 1):
        problems.append("block_size %d is not a power of two from 4096 to 1048576 (what mksquashfs takes); "
                        "use 131072, or 1048576 (the default)" % size)
    return [problem for problem in problems if problem]


def check_params(params, dest=None):
    """Refuse what no build could use, before anything is read or written:
    the values first, then the paths (on their canonical form)."""
    params = dict(DEFAULTS, **params)
    if dest:
        params["dest"] = dest
    params = canonical_params(params)
    problems = parameter_problems(params)
    if problems:
        raise IsoError(problems[0])
    dest = params["dest"]
    if not os.path.isabs(dest):
        raise IsoError("dest %r is relative; give an absolute path" % dest)
    if dest == "/":
        raise IsoError("dest / is a directory; give the ISO's file name, such as /var/lib/liveclone/live.iso")
    dest_dir = os.path.dirname(dest)
    if dest_dir == "/":
        raise IsoError("dest %s lies directly in /, beside the system's own directories (the build puts its "
                       "work tree and temporary files beside dest); choose a directory for ISOs, such as "
                       "/var/lib/liveclone/%s" % (dest, os.path.basename(dest)))
    problem = check_real_path("dest", dest, include_last=False)
    if problem:
        raise IsoError(problem)
    if not os.path.isdir(dest_dir):
        raise IsoError("the directory of dest, %s, does not exist; create it first" % dest_dir)
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise IsoError("dest %s is a directory; give the ISO's file name, such as %s" % (
            dest, os.path.join(dest, "live.iso")))
    wanted = {"cache": "cache_dir", "path": "source_path"}.get(params["source"])
    for name in ("cache_dir", "source_path", "work_dir"):
        path = params[name]
        if not path or name not in (wanted, "work_dir"):
            continue
        if not os.path.isabs(path):
            raise IsoError("%s %r is relative; give an absolute path" % (name, path))
        if path == "/":
            raise IsoError({
                "cache_dir": "cache_dir / is not a cache; give the base_dir of a liveclone.core.snapper_cache "
                             "backup, such as /mnt/debian_backup",
                "source_path": "source_path / is the running system; use source: live to build from it",
                "work_dir": "work_dir / is the root directory; give a directory for the work tree, such as "
                            "/var/tmp"}[name])
        problem = check_real_path(name, path)
        if problem:
            raise IsoError(problem)
    work_dir = params["work_dir"]
    if work_dir and not os.path.isdir(work_dir):
        raise IsoError("work_dir %s does not exist; create it first, or leave work_dir unset" % work_dir)


def initramfs_boots_live(entries):
    """Whether an initramfs, by its file list, boots a live system and carries
    none of the source's resume or crypttab settings (which the image drops)."""
    names = {entry.strip().lstrip("./") for entry in entries}
    has_live_boot = "scripts/live" in names
    source_settings = any(name.startswith("cryptroot/") or
                          (name.startswith("conf/conf.d/") and "resume" in name) for name in names)
    return has_live_boot and not source_settings


# --- reading a tree as its own system does, never out of it -------------------

def _file_in_tree(tree, relative, where):
    """The link-free path of the regular file at relative (a link there is
    followed only while it stays inside the tree); IsoError when it leads out."""
    info = tree.lstat(relative)
    if info is None:
        return None
    if stat.S_ISREG(info.st_mode):
        return relative
    if stat.S_ISLNK(info.st_mode):
        inside = tree.resolve(relative)
        if inside is not None and tree.is_file(inside):
            return inside
        raise IsoError("%s in %s is a symlink to %s, which is no file inside the tree (a link there is followed "
                       "only inside the tree, as the live system would see it); put the file itself there in "
                       "the source" % (relative, where, tree.readlink(relative)))
    raise IsoError("%s in %s is not a regular file; put the file itself there in the source" % (relative, where))


def read_in_tree(tree, relative):
    """The bytes of the file at relative as the tree's own system reads it
    (etc/os-release -> ../usr/lib/os-release), or None."""
    inside = tree.resolve(relative)
    return None if inside is None else tree.read_bytes(inside)


def kernels(tree, where):
    """(version, kernel, initrd or None) of each kernel in the tree's boot/,
    oldest first, as link-free paths inside the tree. A kernel or initrd that
    is a link leading out of the tree is refused, never copied."""
    boot = tree.resolve("boot")
    if boot is None or not tree.is_dir(boot):
        return []
    found = []
    for name in tree.listdir(boot):
        if not name.startswith("vmlinuz-"):
            continue
        version = name[len("vmlinuz-"):]
        kernel = _file_in_tree(tree, "%s/%s" % (boot, name), where)
        initrd = _file_in_tree(tree, "%s/initrd.img-%s" % (boot, version), where)
        found.append((version, kernel, initrd))
    return sorted(found, key=lambda entry: _version_key(entry[0]))


def missing_packages(tree, installer):
    """The live packages (and the installer's) that the tree's dpkg status lacks."""
    text = (read_in_tree(tree, "var/lib/dpkg/status") or b"").decode("utf-8", "replace")
    installed = {block.split("\n", 1)[0][9:] for block in text.split("\n\n")
                 if "Status: install ok installed" in block and block.startswith("Package: ")}
    wanted = list(LIVE_PACKAGES) + (list(CALAMARES_PACKAGES) if installer == "calamares" else [])
    return [name for name in wanted if name not in installed]


def _copy_out(tree, relative, dest):
    """Copy the regular file at relative (link-free) out of the tree to dest, a file of the build's own."""
    with tree.parent(relative) as (dir_fd, name):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            raise IsoError("%s is not a regular file" % tree.path(relative))
        with open(dest, "wb") as out:
            shutil.copyfileobj(source, out, 1024 * 1024)


def _uid(fields):
    return int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else None


def _read_db(tree, name, where="the image"):
    """The lines of a user database of the tree split in fields; None when it
    is missing. One that is a link is read only where it leads inside the tree."""
    inside = _file_in_tree(tree, name, where)
    if inside is None:
        return None
    text = tree.read_text(inside)
    return [line.split(":") for line in text.splitlines() if line.strip()]


def _edit_db(tree, name, change, extra=()):
    """Rewrite a user database of the tree line by line (and add extra lines):
    a new file with the old one's mode and owner. A link there is replaced,
    never written through. A database the tree lacks is left missing."""
    inside = _file_in_tree(tree, name, "the image")
    if inside is None:
        return
    info = tree.lstat(inside)
    rows = [row for row in (change(fields) for fields in _read_db(tree, inside)) if row is not None]
    tree.write_text(name, "".join(":".join(row) + "\n" for row in rows + list(extra)), stat.S_IMODE(info.st_mode))
    tree.lchown(name, info.st_uid, info.st_gid)


def _append_db(tree, name, fields):
    _edit_db(tree, name, lambda f: f, [fields])


# --- the destination ---------------------------------------------------------

def _unwritable(directory):
    """None, or why the build cannot create files in directory."""
    if free_space(directory).read_only:
        return "is on a read-only filesystem; remount it read-write or choose a path on another one"
    flags = flags_at(None, directory)
    if flags & FS_IMMUTABLE_FL:
        return "is immutable (lsattr shows i); clear it with chattr -i, or choose another directory"
    if flags & FS_APPEND_FL:
        return "is append-only (lsattr shows a); clear it with chattr -a, or choose another directory"
    if not os.access(directory, os.W_OK):
        return "is not writable; run as root, and check its mount options and any LSM"
    return None


def _unchangeable(path):
    """None, or why the build could not replace the existing file at path."""
    if not os.path.lexists(path) or os.path.islink(path):
        return None
    flags = flags_at(None, path)
    if flags & FS_IMMUTABLE_FL:
        return "is immutable (lsattr shows i), so the build cannot replace it; clear it with chattr -i"
    if flags & FS_APPEND_FL:
        return "is append-only (lsattr shows a), so the build cannot replace it; clear it with chattr -a"
    return None


def _write(path, text, mode=0o644):
    """A file of the build's own (in its ISO tree), written anew."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _hash_file(path, digest):
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256(path):
    return _hash_file(path, hashlib.sha256())


def _version_key(text):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
