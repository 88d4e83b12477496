# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Where a live ISO comes from: the source (a cache snapshot, a tree or the
host) resolved and identified, what the image leaves out of it, whether it is
copied as a btrfs snapshot or with rsync, and what the tree says about
itself (os-release, kernels, installed packages), read beneath it."""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import stat

from ansible.module_utils.common.text.formatters import bytes_to_human

from .._cache.layout import SNAPSHOTS_NAME, CacheReader
from .._cache.snapper import Snapper
from .._common.beneath import Tree
from .._common.btrfs import Btrfs, filesystem_type, filesystem_uuid, is_subvolume
from .._common.fs import canonical_path, is_within, symlink_on
from .._common.roottree import HOME_EXCLUDES, STANDARD_EXCLUDES, mount_excludes, tree_os_release
from .._common.rsync import is_excluded, literal_pattern
from .desired import IsoError

LIVE_PACKAGES = ("live-boot", "live-config", "live-config-systemd")
CALAMARES_PACKAGES = ("calamares", "calamares-settings-debian")
# dpkg's status is a few MiB with thousands of packages: a larger one is refused, not read.
DPKG_STATUS_LIMIT = 64 << 20
# What a message shows of a name the tree gives itself (os-release's PRETTY_NAME).
SHOWN_NAME = 80


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


def resolve_source(runner, desired, warnings):
    """The Source of desired, checked and identified; what the cache reader
    refused to take is added to warnings."""
    kind = desired.source
    if kind == "cache":
        source = _cache_snapshot(runner, desired, warnings)
    elif kind == "path":
        if not desired.source_path:
            raise IsoError("source path needs source_path, the root of the tree to build from")
        source = Source("path", desired.source_path)
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
            _check_outside_source(desired, source.root)
        check_family(tree)
    _identify(runner, desired, source)
    return source


def _cache_snapshot(runner, desired, warnings):
    base_dir = desired.cache_dir
    if not base_dir:
        raise IsoError("source cache needs cache_dir, the base_dir of a snapper_cache")
    reader = CacheReader(runner, Snapper(runner, desired.snapper_config))
    if not os.path.isdir(base_dir):
        raise IsoError("cache_dir %s does not exist; give the base_dir of a snapper_cache backup "
                       "(mount its volume first), or use source: path" % base_dir)
    cache = reader.read(base_dir)
    # What the reader refused to take for the cache or a snapshot (a link, a mount point).
    problems = list(cache.problems)
    if problems and not cache.snapshots:
        raise IsoError("cache_dir %s holds no snapshot to build from: %s" % (base_dir, "; ".join(problems)))
    warnings += problems + list(cache.ignored)
    if not cache.snapshots:
        raise IsoError("cache_dir %s holds no snapshot; back it up with liveclone.core.snapper_cache "
                       "first, or use source: path" % base_dir)
    snapshot = cache.snapshot_named(desired.snapshot)
    if snapshot is None:
        raise IsoError("snapshot %s is not in %s (snapshots: %s)" % (
            desired.snapshot, base_dir, ", ".join(s.name for s in sorted(cache.snapshots, key=lambda s: s.order))))
    _check_snapshot_path(snapshot.path, base_dir)
    if not snapshot.read_only:
        raise IsoError("snapshot %s is not read-only; refusing to build from a tree that "
                       "may change" % snapshot.path)
    source = Source("cache", snapshot.path, snapshot.name)
    source.base_dir = cache.base_dir
    return source


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


def _check_outside_source(desired, root):
    """dest and work_dir inside a source tree would be copied into the next build (and
    the copy into itself)."""
    root = os.path.realpath(root)
    for name, path in (("dest", desired.dest), ("work_dir", desired.work_dir)):
        if path and is_within(os.path.realpath(path), root):
            raise IsoError("%s %s is inside the source tree %s, so the build would copy its own output; "
                           "choose a %s outside the source" % (name, path, root, name))


def check_family(tree):
    release = tree_os_release(tree)
    family = {release.get("ID", "")} | set(release.get("ID_LIKE", "").split())
    if not family & {"debian", "ubuntu"}:
        raise IsoError(
            "live ISOs of %s (ID=%s) are not yet supported: only the Debian family (live-boot) is; "
            "dracut dmsquash-live and archiso images are planned" % (
                (release.get("PRETTY_NAME") or release.get("NAME") or "this distribution")[:SHOWN_NAME],
                release.get("ID", "unknown")[:SHOWN_NAME]))


def _identify(runner, desired, source):
    if is_subvolume(os.lstat(source.root)) and filesystem_type(runner, source.root) == "btrfs":
        source.subvolume = True
        shown = Btrfs(runner).show(source.root)
        if "readonly" in shown["Flags"]:
            # A read-only snapshot never changes: its UUID names its content.
            # (Its generation does change, when it is snapshotted.)
            source.identity = "btrfs:%s" % shown["UUID"]
            source.epoch = int(datetime.datetime.strptime(shown["Creation time"], "%Y-%m-%d %H:%M:%S %z")
                               .timestamp())
            return
    # A tree that can change: fingerprint what the image would contain.
    digest, newest, size, entries = hashlib.sha256(), 0, 0, 0
    for entry in walk(source.root, image_excludes(desired, source)):
        digest.update(entry[0].encode("utf-8", "surrogateescape"))
        digest.update(repr(entry[1:]).encode())
        newest = max(newest, entry[3])
        size += entry[2]
        entries += 1
    source.identity = "tree:" + digest.hexdigest()
    source.epoch = newest or 0
    source.size, source.entries = size, entries


def walk(root, excludes):
    """(relative path, mode, size, mtime or 0 for a directory) of each entry, in a
    stable order, minus excludes."""
    for directory, dirs, files in os.walk(root):
        relative_dir = "/" + os.path.relpath(directory, root).lstrip(".")
        dirs.sort()
        dirs[:] = [name for name in dirs if not is_excluded(os.path.join(relative_dir, name), excludes)]
        for name in sorted(files) + dirs:
            rel = os.path.join(relative_dir, name)
            if is_excluded(rel, excludes):
                continue
            st = os.lstat(os.path.join(directory, name))
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            # A directory's mtime changes when an entry is created and removed
            # again (/tmp on a running host); its entries carry the content.
            mtime = 0 if stat.S_ISDIR(st.st_mode) else int(st.st_mtime)
            yield rel, st.st_mode, size, mtime


def source_size(desired, source):
    """(bytes of regular files, entries) that the image would hold."""
    if source.size is None:
        size = entries = 0
        for entry in walk(source.root, image_excludes(desired, source)):
            size += entry[2]
            entries += 1
        source.size, source.entries = size, entries
    return source.size, source.entries


def image_excludes(desired, source):
    """The image-content policy: the /-anchored patterns of what the image
    leaves out of the source, whichever way it is copied (rsync leaves them
    out; a snapshot has them removed after). A cache snapshot was cut by the
    backup already: only its nested snapshots go."""
    if source.kind == "cache":
        return ["/" + SNAPSHOTS_NAME]
    excludes = list(STANDARD_EXCLUDES)
    if not desired.keep_home:
        excludes += HOME_EXCLUDES
    excludes += mount_excludes(source.root, desired.keep_home)
    for path in (desired.dest_dir, work_parent(desired, source)):
        if is_within(path, source.root) and path != source.root:
            excludes.append("/" + literal_pattern(os.path.relpath(path, source.root)) + "/*")
    return excludes + ["/" + pattern.lstrip("/") for pattern in desired.exclude]


def work_parent(desired, source):
    """The directory the work tree is made in."""
    if desired.work_dir:
        return canonical_path(desired.work_dir)
    if source.kind == "cache":
        return source.base_dir  # same btrfs filesystem: the snapshot is instant
    return desired.dest_dir


def copies_by_snapshot(runner, source, parent):
    """Whether the copy is a btrfs snapshot (instant, no room needed) rather than rsync."""
    return bool(source.subvolume and filesystem_uuid(runner, source.root) == filesystem_uuid(runner, parent))


# --- reading a tree as its own system does, never out of it -------------------

def file_in_tree(tree, relative, where):
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


def read_bounded(tree, relative, limit, what, where):
    """The bytes of the regular file at the link-free path relative, or None
    when it is missing or no regular file. The tree is not trusted: a file
    larger than limit (what names its kind) is refused before it is read,
    with an IsoError naming it and the limit, and never more than limit + 1
    bytes are read (it may grow meanwhile)."""
    info = tree.lstat(relative)
    size = info.st_size if info is not None and stat.S_ISREG(info.st_mode) else 0
    data = None
    if size <= limit:
        # One byte more than its size, not limit + 1: read() allocates what it is asked for.
        data = tree.read_bytes(relative, size + 1)
        if data is not None and len(data) > size:  # it grew since: again, to the limit
            data = tree.read_bytes(relative, limit + 1)
            size = len(data or b"")
    if size > limit:
        raise IsoError("/%s in %s is %s, more than the %s this module reads of %s: none is that large, so it is "
                       "damaged or planted; put a sound one in its place in the source" % (
                           relative, where, bytes_to_human(size), bytes_to_human(limit), what))
    return data


def read_in_tree(tree, relative, limit, what, where):
    """The bytes of the file at relative as the tree's own system reads it
    (etc/os-release -> ../usr/lib/os-release), at most limit (read_bounded), or None."""
    inside = tree.resolve(relative)
    return None if inside is None else read_bounded(tree, inside, limit, what, where)


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
        kernel = file_in_tree(tree, "%s/%s" % (boot, name), where)
        initrd = file_in_tree(tree, "%s/initrd.img-%s" % (boot, version), where)
        found.append((version, kernel, initrd))
    return sorted(found, key=lambda entry: _version_key(entry[0]))


def installed_packages(tree, where="the source"):
    """{package: version} of what the tree's dpkg status has installed."""
    status = read_in_tree(tree, "var/lib/dpkg/status", DPKG_STATUS_LIMIT, "a dpkg status", where)
    text = (status or b"").decode("utf-8", "replace")
    installed = {}
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and line[:1] != " ")
        if fields.get("Status") == "install ok installed" and "Package" in fields:
            installed[fields["Package"]] = fields.get("Version", "")
    return installed


def missing_packages(tree, installer):
    """The live packages (and the installer's) that the tree's dpkg status lacks."""
    installed = installed_packages(tree)
    wanted = list(LIVE_PACKAGES) + (list(CALAMARES_PACKAGES) if installer == "calamares" else [])
    return [name for name in wanted if name not in installed]


def _version_key(text):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
