# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""DistroClone's KEY="value" metadata files (.backup_meta), read as data.

DistroClone sources these files as shell, so values are written with the
characters that are special inside double quotes escaped, and with every
control character and line separator made a space: one line per key,
whatever a source's os-release holds. This module only ever parses them.
"""

from __future__ import annotations

import math
import re

META_KEYS = ("META_DATE", "META_DISTRO", "META_SIZE", "META_KERNEL", "META_SNAPSHOT")
_LINE = re.compile(r'([A-Z][A-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_SPECIAL = re.compile(r'([\\"$`])')
# What would end a line for the shell or for str.splitlines(): a value must stay on its key's line.
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def format_meta(values):
    """The file's text for a dict of values, in DistroClone's key order first."""
    keys = [key for key in META_KEYS if key in values]
    keys += sorted(key for key in values if key not in META_KEYS)
    lines = []
    for key in keys:
        value = _LINE_BREAKING.sub(" ", str(values[key]))
        lines.append('%s="%s"' % (key, _SPECIAL.sub(r"\\\1", value)))
    return "\n".join(lines) + "\n"


def parse_meta(text):
    """The KEY="value" pairs of a metadata file; other lines are ignored."""
    values = {}
    for line in text.split("\n"):
        match = _LINE.fullmatch(line.strip())
        if match:
            values[match.group(1)] = re.sub(r"\\(.)", r"\1", match.group(2))
    return values


def human_size(size):
    """A size as `du -h` prints it: 8.2G, 512M, 20K."""
    value = float(size)
    for unit in ("B", "K", "M", "G", "T", "P"):
        if value < 1024 or unit == "P":
            break
        value /= 1024
    if unit == "B":
        return "%d" % size
    tenths = math.ceil(value * 10) / 10
    if tenths < 10:
        return "%.1f%s" % (tenths, unit)
    return "%d%s" % (math.ceil(value), unit)
