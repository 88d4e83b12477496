# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Rootfs backup caches in DistroClone Backup's layout.

    BASE/.backup_meta                     KEY="value" metadata DistroClone reads
    BASE/.rootfs_cache/                   btrfs subvolume, the rsync target
    BASE/.rootfs_cache/.snapshots/N/      snapper snapshots (N/snapshot, N/info.xml)
    BASE/.rootfs_cache/.snapshots/@DATE   legacy raw snapshots (+ @DATE.meta)

CacheReader reads that state; backup(), remove() and restore() plan from it
and apply. Unlike the reference tool, the snapshot follows a successful copy,
retention deletes exactly what exceeds `keep`, and metadata is never run as
shell code.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import platform
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field

from ._backup_meta import format_meta, human_size, parse_meta
from ._command import CommandError
from ._fs import MOUNTINFO, check_real_path, create_file, is_within, read_file, read_mounts, write_atomically
from ._rsync import RSYNC_VANISHED, copy_argv, parse_output

CACHE_NAME = ".rootfs_cache"
SNAPSHOTS_NAME = ".snapshots"
META_NAME = ".backup_meta"
# Who holds the lock; and a marker that a copy started and was not yet versioned.
HOLDER_NAME = ".liveclone.lock"
PENDING_NAME = ".liveclone-pending"
# snapper keeps each config in /etc/snapper/configs/NAME: no path separators.
SNAPPER_CONFIG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

STANDARD_EXCLUDES = [
    "/dev/*", "/proc/*", "/sys/*", "/run/*", "/tmp/*", "/mnt/*", "/media/*", "/lost+found",
    "/swapfile", "/boot/efi/*", "/var/cache/apt/archives/*", "/var/lib/apt/lists/*",
    "/var/log/*", "/var/tmp/*", "/etc/NetworkManager/system-connections/*", "/snap",
    "/var/snap", "/var/lib/snapd", "/.snapshots", "/var/lib/snapper",
    # live_iso's default output, directory and all: an ISO inside the backup would grow
    # every later backup and ISO, and the directory appears only after a backup.
    "/var/lib/liveclone",
]
HOME_EXCLUDES = ["/home/*", "/root/*"]
HOME_DIRS = ("/home", "/root")

LEGACY_NAME = re.compile(r"^@(\d{4}-\d{2}-\d{2})_(\d{2}:\d{2})(?:_(\d+))?$")
BTRFS_SUBVOLUME_INODE = 256
SNAPSHOT_DESCRIPTION = "liveclone.core backup"


class CacheError(Exception):
    """A request that cannot be carried out; the message says what to do."""


def read_os_release(path):
    values = {}
    # A damaged file must not stop a backup: undecodable bytes become U+FFFD.
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            key, sep, value = line.strip().partition("=")
            if sep:
                values[key] = value.strip().strip('"').strip("'")
    return values


def default_base_dir(os_release="/etc/os-release"):
    return "/mnt/%s_backup" % (read_os_release(os_release).get("ID") or "linux")


@dataclass
class Snapshot:
    name: str
    number: int | None
    kind: str  # "snapper" or "btrfs" (legacy @DATE snapshots)
    date: str
    description: str
    userdata: dict
    path: str
    read_only: bool

    def view(self):
        return asdict(self)

    @property
    def order(self):
        """Oldest first: by date, then snapper number, then legacy same-minute counter."""
        match = LEGACY_NAME.match(self.name)
        counter = int(match.group(3) or 1) if match else 0
        return (self.date, self.number or 0, counter)


@dataclass
class Cache:
    """What is on disk now under one base directory."""

    base_dir: str
    base_exists: bool = False
    base_fstype: str | None = None
    cache_exists: bool = False
    cache_is_subvolume: bool = False
    snapshots_dir_exists: bool = False
    snapper_installed: bool = False
    snapper_subvolume: str | None = None  # of the named config, when registered
    snapshots: list = field(default_factory=list)
    meta: dict | None = None
    pending: bool = False
    # .snapshots/N directories snapper does not list (no info.xml): a create that was killed.
    incomplete: list = field(default_factory=list)

    @property
    def cache_dir(self):
        return os.path.join(self.base_dir, CACHE_NAME)

    @property
    def snapshots_dir(self):
        return os.path.join(self.cache_dir, SNAPSHOTS_NAME)

    @property
    def meta_path(self):
        return os.path.join(self.base_dir, META_NAME)

    @property
    def snapper_registered(self):
        return self.snapper_subvolume is not None

    @property
    def snapper_manages_cache(self):
        return self.snapper_registered and (
            os.path.realpath(self.snapper_subvolume) == os.path.realpath(self.cache_dir))

    def versioning_found(self):
        if self.snapper_manages_cache:
            return "snapper"
        if self.cache_is_subvolume:
            return "btrfs"
        return "none" if self.cache_exists else None

    def newest(self):
        return max(self.snapshots, key=lambda snap: snap.order) if self.snapshots else None

    def view(self):
        return {
            "base_dir": self.base_dir,
            "exists": self.cache_exists,
            "versioning": self.versioning_found(),
            "snapshots": [snap.view() for snap in sorted(self.snapshots, key=lambda s: s.order)],
            "metadata": self.meta,
        }


class Snapper:
    """Thin wrapper of the snapper command line (no D-Bus, as root)."""

    def __init__(self, runner, config):
        self.runner = runner
        self.config = config

    def run(self, *args, **kwargs):
        return self.runner.run(["snapper", "--no-dbus"] + list(args), **kwargs)[1]

    def configs(self):
        out = self.run("--jsonout", "list-configs")
        return {item["config"]: item["subvolume"] for item in json.loads(out).get("configs", [])}

    def snapshots(self):
        out = self.run("--jsonout", "-c", self.config, "list")
        return [item for item in json.loads(out).get(self.config, []) if item["number"] != 0]

    def get_config(self):
        return json.loads(self.run("--jsonout", "-c", self.config, "get-config"))

    def settings(self, keep):
        # Our own retention deletes what exceeds `keep`; these keep snapper's
        # timers in step with it instead of fighting it.
        return {"TIMELINE_CREATE": "no", "NUMBER_CLEANUP": "yes", "NUMBER_LIMIT": str(keep),
                "NUMBER_LIMIT_IMPORTANT": str(keep), "NUMBER_MIN_AGE": "0"}

    def create_config(self, subvolume):
        self.run("-c", self.config, "create-config", "--fstype", "btrfs", subvolume)

    def set_config(self, settings):
        self.run("-c", self.config, "set-config", *["%s=%s" % item for item in sorted(settings.items())])

    def create(self, userdata):
        out = self.run("-c", self.config, "create", "--type", "single", "--cleanup-algorithm", "number",
                       "--description", SNAPSHOT_DESCRIPTION, "--print-number",
                       "--userdata", ",".join("%s=%s" % item for item in userdata.items()))
        return int(out.strip())

    def delete(self, numbers):
        self.run("-c", self.config, "delete", *[str(number) for number in numbers])

    def delete_config(self):
        self.run("-c", self.config, "delete-config")


def _last_lines(text, count):
    return "\n".join(text.strip().splitlines()[-count:])


def _userdata_value(text):
    # snapper's userdata is "k=v,k=v": keep commas and equals signs out.
    return re.sub(r"[,=]", " ", str(text)).strip()


class CacheReader:
    """Reads a cache and its source; changes nothing."""

    def __init__(self, runner, snapper):
        self.runner = runner
        self.snapper = snapper

    def read(self, base_dir):
        cache = Cache(base_dir=base_dir)
        cache.base_exists = os.path.isdir(base_dir)
        cache.snapper_installed = self._has("snapper")
        if cache.snapper_installed:
            cache.snapper_subvolume = self.snapper.configs().get(self.snapper.config)
        if not cache.base_exists:
            return cache
        cache.base_fstype = self.fstype(base_dir)
        cache.cache_exists = os.path.isdir(cache.cache_dir)
        if cache.cache_exists and cache.base_fstype == "btrfs":
            cache.cache_is_subvolume = os.stat(cache.cache_dir).st_ino == BTRFS_SUBVOLUME_INODE
        cache.snapshots_dir_exists = os.path.isdir(cache.snapshots_dir)
        if cache.snapper_manages_cache:
            cache.snapshots += self._snapper_snapshots(cache)
        if cache.snapshots_dir_exists:
            cache.snapshots += self._legacy_snapshots(cache)
        if cache.snapper_manages_cache and cache.snapshots_dir_exists:
            listed = {snap.name for snap in cache.snapshots if snap.kind == "snapper"}
            cache.incomplete = [
                os.path.join(cache.snapshots_dir, name) for name in sorted(os.listdir(cache.snapshots_dir))
                if name.isdigit() and name not in listed
                and not os.path.exists(os.path.join(cache.snapshots_dir, name, "info.xml"))]
        meta_text = read_file(cache.meta_path)
        if meta_text is not None:
            cache.meta = parse_meta(meta_text)
        cache.pending = os.path.exists(os.path.join(base_dir, PENDING_NAME))
        return cache

    def _has(self, name):
        try:
            self.runner.binary(name)
        except CommandError:
            return False
        return True

    def fstype(self, path):
        return self.runner.run(["findmnt", "-n", "-o", "FSTYPE", "--target", path])[1].strip() or None

    def read_only(self, path):
        out = self.runner.run(["btrfs", "property", "get", "-ts", path, "ro"], ok_rcs=(0, 1))[1]
        return out.strip() == "ro=true"

    def _snapper_snapshots(self, cache):
        found = []
        for item in self.snapper.snapshots():
            path = os.path.join(cache.snapshots_dir, str(item["number"]), "snapshot")
            found.append(Snapshot(
                name=str(item["number"]), number=item["number"], kind="snapper",
                date=item.get("date") or "", description=item.get("description") or "",
                userdata=item.get("userdata") or {}, path=path,
                read_only=os.path.isdir(path) and self.read_only(path)))
        return found

    def _legacy_snapshots(self, cache):
        found = []
        for name in sorted(os.listdir(cache.snapshots_dir)):
            match = LEGACY_NAME.match(name)
            path = os.path.join(cache.snapshots_dir, name)
            if not match or not os.path.isdir(path):
                continue
            meta = {}
            with contextlib.suppress(OSError), open(path + ".meta") as handle:
                meta = parse_meta(handle.read())
            userdata = {key[5:].lower(): value for key, value in meta.items()
                        if key not in ("META_DATE", "META_DESCRIPTION")}
            found.append(Snapshot(
                name=name, number=None, kind="btrfs",
                date="%s %s" % (match.group(1), match.group(2)),
                description=meta.get("META_DESCRIPTION", ""), userdata=userdata, path=path,
                read_only=self.read_only(path)))
        return found


def mount_excludes(source, include_home, mountinfo=MOUNTINFO):
    """Exclude patterns for the filesystems mounted inside source.

    Nested btrfs subvolumes of source's own filesystem are crossed into (the
    reference's --one-file-system skipped them); other filesystems are not,
    except /home and /root when include_home asks for them.
    """
    mounts = read_mounts(mountinfo)
    source = os.path.realpath(source)
    owner = max((m for m in mounts if is_within(source, m.point)), key=lambda m: len(m.point))
    excludes = []
    for mount in mounts:
        if mount.point == owner.point or not is_within(mount.point, source) or mount.device == owner.device:
            continue
        relative = "/" + os.path.relpath(mount.point, source)
        if include_home and relative in HOME_DIRS:
            continue
        excludes.append(relative + "/*")
    return sorted(set(excludes))


def is_excluded(relative, patterns):
    """Whether rsync would leave `relative` (a /-anchored path) out of the copy."""
    parts = relative.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        candidate = "/" + "/".join(parts[:depth])
        for pattern in patterns:
            if pattern.startswith("/"):
                if fnmatch.fnmatchcase(candidate, pattern.rstrip("/")):
                    return True
            elif fnmatch.fnmatchcase(parts[depth - 1], pattern.rstrip("/")):
                return True
    return False


class CacheLock:
    """Serialises runs on one base directory (flock on the directory itself).

    claim() records who holds it, for the message of a run that times out;
    it is called only once the run has passed its checks, so that a refused
    run writes nothing.
    """

    def __init__(self, base_dir, timeout):
        self.base_dir = base_dir
        self.timeout = timeout
        self.holder_path = os.path.join(base_dir, HOLDER_NAME)
        self.claimed = False
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.base_dir, os.O_RDONLY)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = (read_file(self.holder_path, limit=200) or "holder unknown").strip()
                    os.close(self.fd)
                    raise CacheError(
                        "%s is locked by another run (%s); waited %d s. Try again when it has "
                        "finished, or raise lock_timeout" % (self.base_dir, holder, self.timeout)) from None
                time.sleep(0.2)

    def claim(self):
        create_file(self.holder_path, "pid %d on %s since %s\n" % (
            os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S")))
        self.claimed = True

    def __exit__(self, *exc):
        if self.claimed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.holder_path)
        os.close(self.fd)
        return False


def _diff_view(view):
    return {"exists": view["exists"], "snapshots": [snap["name"] for snap in view["snapshots"]],
            "metadata": view["metadata"]}


class CacheManager:
    """Backs up into, removes and restores from one cache."""

    def __init__(self, module, runner, params):
        self.module = module
        self.runner = runner
        self.params = params
        self.base_dir = os.path.normpath(params["base_dir"] or default_base_dir())
        self.snapper = Snapper(runner, params["snapper_config"])
        self.reader = CacheReader(runner, self.snapper)
        self.warnings = []
        self.operations = []
        self.before = None

    # --- validation --------------------------------------------------------

    def _check_base_path(self, must_exist=True):
        if not os.path.isabs(self.base_dir):
            raise CacheError("base_dir %r is relative; give an absolute path" % self.base_dir)
        if self.base_dir == "/":
            raise CacheError("base_dir / would put the cache over the root filesystem; give a "
                             "directory such as /mnt/debian_backup")
        problem = check_real_path("base_dir", self.base_dir)
        if problem:
            raise CacheError(problem)
        if self.params["lock_timeout"] < 0:
            raise CacheError("lock_timeout is %d; set lock_timeout to 0 or more (the seconds to wait "
                             "for another run on the same base_dir)" % self.params["lock_timeout"])
        if not SNAPPER_CONFIG_NAME.match(self.snapper.config):
            raise CacheError("snapper_config %r is not a usable config name; use letters, digits, "
                             "'-', '_' and '.', starting with a letter or digit" % self.snapper.config)
        if must_exist and not os.path.isdir(self.base_dir):
            raise CacheError("base_dir %s does not exist; mount the backup volume there (or "
                             "create the directory) first" % self.base_dir)

    def _check_snapper_config(self, cache):
        if cache.snapper_registered and not cache.snapper_manages_cache:
            raise CacheError("snapper config %r already manages %s, not %s; choose another "
                             "snapper_config" % (self.snapper.config, cache.snapper_subvolume,
                                                 cache.cache_dir))

    def _versioning(self, cache):
        versioning = self._resolve_versioning(cache)
        if versioning != "none" and cache.cache_exists and not cache.cache_is_subvolume:
            raise CacheError("%s is a plain directory, so it cannot be snapshotted; remove the "
                             "cache (state: absent) and back up again to convert it, or use "
                             "versioning: none" % cache.cache_dir)
        return versioning

    def _resolve_versioning(self, cache):
        wanted = self.params["versioning"]
        btrfs = cache.base_fstype == "btrfs"
        if wanted == "auto":
            if btrfs:
                return "snapper" if cache.snapper_installed else "btrfs"
            self.warnings.append(
                "%s is on %s, not btrfs: the cache is a plain rsync copy with no versions"
                % (self.base_dir, cache.base_fstype))
            return "none"
        if wanted in ("snapper", "btrfs") and not btrfs:
            raise CacheError("versioning %s needs base_dir on btrfs, and %s is on %s; use "
                             "versioning: none, or put base_dir on a btrfs volume"
                             % (wanted, self.base_dir, cache.base_fstype))
        if wanted == "snapper" and not cache.snapper_installed:
            raise CacheError("versioning snapper needs snapper installed on this host; install "
                             "it, or use versioning: btrfs")
        return wanted

    def _excludes(self, source):
        excludes = list(STANDARD_EXCLUDES)
        if not self.params["include_home"]:
            excludes += HOME_EXCLUDES
        excludes += mount_excludes(source, self.params["include_home"])
        excludes += self.params["exclude"] or []
        return excludes

    def _check_source(self, source, excludes):
        if not os.path.isdir(source):
            raise CacheError("source %s does not exist or is not a directory; give a directory: the "
                             "root of the tree to back up (/ for the whole host)" % source)
        base = os.path.realpath(self.base_dir)
        if is_within(base, os.path.realpath(source)):
            relative = "/" + os.path.relpath(base, os.path.realpath(source))
            if relative == "/." or not is_excluded(relative, excludes):
                raise CacheError(
                    "base_dir %s is inside source %s and not excluded, so each backup would copy "
                    "the cache into itself; add %s to exclude, or move base_dir (for example "
                    "under /mnt)" % (self.base_dir, source, relative))

    # --- planning ---------------------------------------------------------

    def _layout_operations(self, cache, versioning):
        operations = []
        if not cache.cache_exists:
            kind = "btrfs subvolume" if versioning != "none" else "directory"
            operations.append(("create_cache", "create the %s %s" % (kind, cache.cache_dir)))
        if versioning == "snapper":
            if not cache.snapper_manages_cache:
                operations.append(("create_config", "create snapper config %s for %s" % (
                    self.snapper.config, cache.cache_dir)))
                operations.append(("set_config", "set snapper config %s: %s" % (
                    self.snapper.config, self._settings_text())))
            else:
                current = self.snapper.get_config()
                if any(current.get(key) != value for key, value in self.snapper.settings(self.params["keep"]).items()):
                    operations.append(("set_config", "set snapper config %s: %s" % (
                        self.snapper.config, self._settings_text())))
        elif versioning == "btrfs" and not cache.snapshots_dir_exists:
            operations.append(("create_snapshots_dir", "create the btrfs subvolume %s" % cache.snapshots_dir))
        return operations

    def _settings_text(self):
        return " ".join("%s=%s" % item for item in sorted(self.snapper.settings(self.params["keep"]).items()))

    def _prune_list(self, snapshots, adding):
        keep = self.params["keep"] - (1 if adding else 0)
        ordered = sorted(snapshots, key=lambda snap: snap.order)
        return ordered[:max(len(ordered) - keep, 0)]

    # --- applying ---------------------------------------------------------

    def _apply_layout(self, operations, cache, versioning):
        for action, text in operations:
            if action == "create_cache":
                if versioning != "none":
                    self.runner.run(["btrfs", "subvolume", "create", cache.cache_dir])
                else:
                    os.mkdir(cache.cache_dir, 0o755)
            elif action == "create_config":
                self.snapper.create_config(cache.cache_dir)
            elif action == "set_config":
                self.snapper.set_config(self.snapper.settings(self.params["keep"]))
            elif action == "create_snapshots_dir":
                self.runner.run(["btrfs", "subvolume", "create", cache.snapshots_dir])
            self.operations.append(text)

    def _rsync(self, source, dest, excludes, dry_run, protect=(), delete_excluded=False):
        argv = copy_argv(source, dest, excludes=excludes, protect=protect,
                         checksum=self.params["checksum"], dry_run=dry_run,
                         delete_excluded=delete_excluded)
        try:
            rc, out = self.runner.run(argv, ok_rcs=(0, RSYNC_VANISHED))
        except CommandError as error:
            if "No space left on device" in str(error):
                raise CacheError(
                    "base_dir %s is full (No space left on device) after part of the copy; free space on "
                    "it (lower keep, or delete old snapshots) or grow the volume, then run again. No "
                    "snapshot was taken; .backup_meta and every snapshot were left as they were, and the "
                    "next run finishes the copy. %s" % (self.base_dir, _last_lines(str(error), 3))) from None
            raise CacheError("the copy failed, so no snapshot was taken and .backup_meta and every "
                             "snapshot were left as they were: %s" % error) from None
        if rc == RSYNC_VANISHED:
            self.warnings.append("some files vanished from %s while they were copied (rsync exit "
                                 "24); the backup is otherwise complete" % source)
        return parse_output(out)

    def _snapshot(self, cache, versioning, userdata):
        if versioning == "snapper":
            number = self.snapper.create(userdata)
            return number, str(number)
        stamp = time.strftime("%Y-%m-%d_%H:%M")
        name, counter = "@" + stamp, 1
        while os.path.lexists(os.path.join(cache.snapshots_dir, name)):
            counter += 1
            name = "@%s_%d" % (stamp, counter)
        path = os.path.join(cache.snapshots_dir, name)
        self.runner.run(["btrfs", "subvolume", "snapshot", "-r", cache.cache_dir, path])
        meta = {"META_DATE": stamp.replace("_", " "), "META_DESCRIPTION": SNAPSHOT_DESCRIPTION}
        meta.update({"META_" + key.upper(): value for key, value in userdata.items()})
        write_atomically(self.module, path + ".meta", format_meta(meta))
        return None, name

    def _delete_snapshot(self, snapshot):
        if snapshot.kind == "snapper":
            self.snapper.delete([snapshot.number])
        else:
            self.runner.run(["btrfs", "subvolume", "delete", snapshot.path])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(snapshot.path + ".meta")

    # --- the three states -------------------------------------------------

    def backup(self, check_mode):
        source = os.path.normpath(self.params["source"])
        if self.params["keep"] < 1:
            raise CacheError("keep is %d; retention keeps at least 1 snapshot, so set keep: 1 or "
                             "more (or versioning: none for no versions)" % self.params["keep"])
        self._check_base_path()
        with CacheLock(self.base_dir, self.params["lock_timeout"]) as lock:
            cache = self.reader.read(self.base_dir)
            self.before = cache.view()
            excludes = self._excludes(source)
            self._check_source(source, excludes)
            versioning = self._versioning(cache)
            if versioning == "snapper":
                self._check_snapper_config(cache)
            layout = self._layout_operations(cache, versioning)
            protect = ["/" + SNAPSHOTS_NAME]
            if check_mode:
                stats = self._rsync(source, cache.cache_dir, excludes, True, protect, True)
                snapshotting = self._wants_snapshot(versioning, stats, cache.pending)
                pruned = self._prune_list(cache.snapshots, snapshotting) if versioning != "none" else []
                self.operations = ["remove the incomplete snapshot %s" % path for path in cache.incomplete]
                self.operations += [text for _action, text in layout]
                self._describe_copy(stats, source, cache, dry_run=True)
                if snapshotting:
                    self.operations.append("take a %s snapshot of %s" % (versioning, cache.cache_dir))
                self.operations += ["delete snapshot %s" % snap.name for snap in pruned]
                predicted = _diff_view(cache.view())
                predicted["exists"] = True
                predicted["snapshots"] = [name for name in predicted["snapshots"]
                                          if name not in {snap.name for snap in pruned}]
                predicted["snapshots"] += ["(new)"] if snapshotting else []
                return self._result(cache, versioning, stats, None, pruned, bool(self.operations), predicted)
            lock.claim()
            self._remove_stale_meta()
            self._remove_incomplete(cache)
            self._apply_layout(layout, cache, versioning)
            pending_path = os.path.join(self.base_dir, PENDING_NAME)
            create_file(pending_path)
            stats = self._rsync(source, cache.cache_dir, excludes, False, protect, True)
            self._describe_copy(stats, source, cache, dry_run=False)
            created = None
            snapshotting = self._wants_snapshot(versioning, stats, cache.pending)
            if stats.changes or cache.pending or snapshotting:
                cache = self.reader.read(self.base_dir)
                userdata = self._userdata(source, stats)
                if snapshotting:
                    _number, created = self._snapshot(cache, versioning, userdata)
                    self.operations.append("took %s snapshot %s" % (versioning, created))
                meta = {"META_DATE": time.strftime("%Y-%m-%d %H:%M"), "META_DISTRO": userdata["distro"],
                        "META_SIZE": human_size(stats.total_size), "META_KERNEL": userdata["kernel"]}
                if created:
                    meta["META_SNAPSHOT"] = created
                write_atomically(self.module, cache.meta_path, format_meta(meta))
                self.operations.append("wrote %s" % cache.meta_path)
            os.unlink(pending_path)
            # Read the cache again only when this run changed it: an unchanged run is common and each
            # read costs several snapper and btrfs calls.
            if self.operations:
                cache = self.reader.read(self.base_dir)
            else:
                cache.pending = False
            pruned = self._prune_list(cache.snapshots, False) if versioning != "none" else []
            for snapshot in pruned:
                self._delete_snapshot(snapshot)
                self.operations.append("deleted snapshot %s" % snapshot.name)
            if pruned:
                cache = self.reader.read(self.base_dir)
            created_view = next((s.view() for s in cache.snapshots if s.name == created), None)
            return self._result(cache, versioning, stats, created_view, pruned, bool(self.operations))

    def _remove_incomplete(self, cache):
        for path in cache.incomplete:
            subvolume = os.path.join(path, "snapshot")
            if os.path.isdir(subvolume):
                self.runner.run(["btrfs", "subvolume", "delete", subvolume])
            os.rmdir(path)
            self.operations.append("removed the incomplete snapshot %s left by an interrupted run" % path)

    def _remove_stale_meta(self):
        """Temporary copies of .backup_meta that a killed run left (we hold the lock)."""
        prefix = "." + META_NAME + "."  # write_atomically's temporary name
        for name in os.listdir(self.base_dir):
            path = os.path.join(self.base_dir, name)
            if name.startswith(prefix) and not os.path.isdir(path):
                os.unlink(path)
                self.operations.append("removed %s left by an interrupted run" % path)

    def _wants_snapshot(self, versioning, stats, pending):
        mode = self.params["snapshot"]
        if versioning == "none" or mode == "never":
            return False
        return mode == "always" or bool(stats.changes) or pending

    def _describe_copy(self, stats, source, cache, dry_run):
        if stats.changes:
            self.operations.append("%s %d changes from %s to %s (%d files, %d bytes)" % (
                "copy" if dry_run else "copied", stats.changes, source, cache.cache_dir,
                stats.files_transferred, stats.bytes_transferred))

    def _userdata(self, source, stats):
        release = read_os_release(os.path.join(source, "etc/os-release"))
        if os.path.realpath(source) == "/":
            kernel = platform.release()
        else:
            modules = os.path.join(source, "lib/modules")
            kernels = sorted(os.listdir(modules)) if os.path.isdir(modules) else []
            kernel = kernels[-1] if kernels else "unknown"
        return {"distro": _userdata_value(release.get("NAME") or release.get("ID") or "unknown"),
                "kernel": _userdata_value(kernel), "size_kb": str(stats.total_size // 1024)}

    def _result(self, cache, versioning, stats, created, pruned, changed, predicted=None):
        """The module's result; `predicted` is the after-state of a check-mode run."""
        result = cache.view()
        result.update(changed=changed, versioning=versioning, operations=self.operations,
                      snapshot_created=created, snapshots_pruned=[snap.view() for snap in pruned],
                      transfer=stats.view() if stats else None)
        result["diff"] = {"before": _diff_view(self.before or cache.view()),
                          "after": predicted or _diff_view(cache.view())}
        return result

    def remove(self, check_mode):
        self._check_base_path(must_exist=False)
        if not os.path.isdir(self.base_dir):
            return self._result(self.reader.read(self.base_dir), None, None, None, [], False)
        with CacheLock(self.base_dir, self.params["lock_timeout"]):
            cache = self.reader.read(self.base_dir)
            self.before = cache.view()
            plan = [("snapshot", snap) for snap in sorted(cache.snapshots, key=lambda s: s.order)]
            if cache.snapper_manages_cache:
                plan.append(("delete_config", None))
            if cache.snapshots_dir_exists:
                plan.append(("snapshots_dir", None))
            if cache.cache_exists:
                plan.append(("cache_dir", None))
            for name in (META_NAME, HOLDER_NAME, PENDING_NAME):
                if os.path.exists(os.path.join(self.base_dir, name)):
                    plan.append(("file", name))
            texts = {
                "delete_config": "delete snapper config %s" % self.snapper.config,
                "snapshots_dir": "delete %s" % cache.snapshots_dir,
                "cache_dir": "delete %s" % cache.cache_dir,
            }
            for kind, item in plan:
                text = ("delete snapshot %s" % item.name if kind == "snapshot" else
                        "delete %s" % os.path.join(self.base_dir, item) if kind == "file" else texts[kind])
                if not check_mode:
                    self._remove_one(kind, item, cache)
                self.operations.append(text)
            if check_mode:
                return self._result(cache, None, None, None, [], bool(plan),
                                    {"exists": False, "snapshots": [], "metadata": None})
            return self._result(self.reader.read(self.base_dir), None, None, None, [], bool(plan))

    def _remove_one(self, kind, item, cache):
        # Read-only snapshots first (rm -rf cannot remove them), then snapper's
        # config while its subvolume still exists, then the subvolumes.
        if kind == "snapshot":
            if os.path.isdir(item.path):
                self.runner.run(["btrfs", "subvolume", "delete", item.path])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item.path + ".meta")
        elif kind == "delete_config":
            self.snapper.delete_config()
        elif kind in ("snapshots_dir", "cache_dir"):
            path = cache.snapshots_dir if kind == "snapshots_dir" else cache.cache_dir
            if not os.path.isdir(path):
                return  # snapper delete-config removed .snapshots already
            if os.stat(path).st_ino == BTRFS_SUBVOLUME_INODE and cache.base_fstype == "btrfs":
                self.runner.run(["btrfs", "subvolume", "delete", path])
            else:
                self._remove_plain_tree(path)
        else:
            os.unlink(os.path.join(self.base_dir, item))

    def _remove_plain_tree(self, path):
        mounted = [mount.point for mount in read_mounts() if is_within(mount.point, path)]
        if mounted:
            raise CacheError("%s has filesystems mounted inside (%s); unmount them, then run again"
                             % (path, ", ".join(mounted)))
        shutil.rmtree(path)

    def restore(self, check_mode):
        dest = self.params["restore_dest"]
        if not dest or not os.path.isabs(dest):
            raise CacheError("state restored needs restore_dest, an absolute path to copy the snapshot into")
        dest = os.path.normpath(dest)
        if dest == "/" and not self.params["allow_restore_to_root"]:
            raise CacheError("restoring over / replaces the running system; set allow_restore_to_root: "
                             "true if that is really meant")
        self._check_base_path()
        with CacheLock(self.base_dir, self.params["lock_timeout"]) as lock:
            cache = self.reader.read(self.base_dir)
            self.before = cache.view()
            wanted = str(self.params["restore_snapshot"] or "latest")
            if wanted == "latest":
                snapshot = cache.newest()
            else:
                snapshot = next((s for s in cache.snapshots if s.name == wanted), None)
            if snapshot is None:
                names = ", ".join(s.name for s in sorted(cache.snapshots, key=lambda s: s.order)) or "none"
                raise CacheError("snapshot %s is not in %s (snapshots: %s)" % (wanted, self.base_dir, names))
            if is_within(os.path.realpath(dest), os.path.realpath(self.base_dir)):
                raise CacheError("restore_dest %s is inside base_dir; restore somewhere else" % dest)
            if not check_mode:
                lock.claim()
            if not check_mode and not os.path.isdir(dest):
                os.makedirs(dest, 0o755)
                self.operations.append("create %s" % dest)
            # A snapshot shows the cache's own .snapshots subvolume as an empty
            # directory: an artifact of the cache, never part of the source.
            excludes = list(STANDARD_EXCLUDES) if dest == "/" else ["/" + SNAPSHOTS_NAME]
            stats = self._rsync(snapshot.path, dest, excludes, check_mode or not os.path.isdir(dest))
            if stats.changes:
                self.operations.append("%s snapshot %s into %s (%d changes, %d bytes)" % (
                    "restore" if check_mode else "restored", snapshot.name, dest, stats.changes,
                    stats.bytes_transferred))
            result = self._result(cache, cache.versioning_found(), stats, None, [], bool(self.operations))
            result["restored"] = snapshot.view()
            return result
