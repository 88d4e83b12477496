# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Backing stores, what is asked for: the layouts, sizes, labels and
persistence.conf grammar, and `Desired`, the request checked once.

A backing store is a regular file holding a filesystem that a live system
loop-mounts to keep its changes. The resource is read (`_store_reader`),
planned (`_store_plan`), applied (`_store_apply`) and run (`_store`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from fractions import Fraction

from ansible.module_utils.common.text.formatters import human_to_bytes

from .._common.errors import LivecloneError
from .._common.fs import canonical_path, check_path_text, check_real_path
from .._common.text import check_label

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


class BackstoreError(LivecloneError):
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


@dataclass(frozen=True)
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
