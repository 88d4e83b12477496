# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""What a root tree (a host's /, a snapshot of it) holds that a copy of it
leaves out, and what it says about itself: os-release and kernels, read
beneath the tree as its own system would resolve them."""

from __future__ import annotations

import contextlib
import os
import re
import stat

from .beneath import BeneathError, Tree
from .fs import MOUNTINFO, is_within, read_mounts
from .rsync import literal_pattern

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

# os-release's ID names the default base_dir.
OS_RELEASE_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
OS_RELEASE_PATHS = ("etc/os-release", "usr/lib/os-release")
# More than any os-release holds: a larger file is read only this far.
OS_RELEASE_LIMIT = 1 << 20


def mount_excludes(source, include_home, mountinfo=MOUNTINFO, mounts=None):
    """Exclude patterns for the filesystems mounted inside source.

    Nested btrfs subvolumes of source's own filesystem are crossed into (the
    reference's --one-file-system skipped them); other filesystems are not,
    except /home and /root when include_home asks for them. mounts, when
    given, is another host's mount table (source is a path there, canonical).
    """
    if mounts is None:
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
        # A path, not a pattern: /srv/disk[1]/* left out /srv/disk1 and copied the mount.
        excludes.append(literal_pattern(relative) + "/*")
    return sorted(set(excludes))


def parse_os_release(text):
    """os-release's KEY=value lines, as data: quotes taken off, and in double
    quotes the backslash escapes of " \\ $ ` undone (as os-release(5) writes them)."""
    values = {}
    for line in text.split("\n"):
        key, sep, value = line.strip().partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r'\\(["\\$`])', r"\1", value[1:-1])
        elif len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        else:
            value = value.strip('"').strip("'")
        values[key] = value
    return values


def read_os_release(path):
    """The KEY=value pairs of the os-release file at path (the host's own);
    {} when it is missing or no regular file (a FIFO would block the read)."""
    # A damaged file must not stop a backup: undecodable bytes become U+FFFD.
    with contextlib.suppress(OSError), open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as handle:
        if stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return parse_os_release(handle.read(OS_RELEASE_LIMIT).decode("utf-8", "replace"))
    return {}


def tree_os_release(tree):
    """The os-release of an open Tree, as its own system reads it
    (etc/os-release, else usr/lib/os-release; links resolved inside the tree)."""
    for relative in OS_RELEASE_PATHS:
        resolved = tree.resolve(relative)
        if resolved:
            text = tree.read_text(resolved, limit=OS_RELEASE_LIMIT)
            if text is not None:
                return parse_os_release(text)
    return {}


def source_os_release(source):
    """The os-release of the tree at source, read beneath it; {} if it has none."""
    with contextlib.suppress(OSError, BeneathError), Tree(source) as tree:
        return tree_os_release(tree)
    return {}


def source_kernels(source):
    """The kernel versions in the tree's lib/modules (resolved beneath it)."""
    with contextlib.suppress(OSError, BeneathError), Tree(source) as tree:
        resolved = tree.resolve("lib/modules")
        return [] if resolved is None else tree.listdir(resolved)
    return []


def default_base_dir(os_release="/etc/os-release"):
    """Where a host's backup cache lives unless told: /mnt/<os-release ID>_backup."""
    distro = read_os_release(os_release).get("ID") or ""
    return "/mnt/%s_backup" % (distro if OS_RELEASE_ID.fullmatch(distro) else "linux")
