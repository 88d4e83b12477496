# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""PE images (shim, GRUB, an EFI-stub kernel) read as bytes: their sections,
whether they carry an Authenticode signature, their SBAT data, and the SBAT
levels a shim applies. Nothing here runs them or checks a signature's trust.
The bytes come from a tree the module does not trust: every offset is
checked against them, and whatever they hold ends in PeError, never another
exception."""

from __future__ import annotations

import re
import struct
from collections import namedtuple

from .errors import LivecloneError

# The optional header's magic, and where its data directories start.
_DIRECTORIES = {0x10B: 96, 0x20B: 112}
_SECURITY_DIRECTORY = 4
# A generation in SBAT data: ASCII digits only (str.isdigit takes "²", which int() refuses).
_GENERATION = re.compile(r"[0-9]{1,9}")


# One line of an SBAT section: component,generation,vendor,package,version,url.
SbatEntry = namedtuple("SbatEntry", "generation vendor package version")


class PeError(LivecloneError):
    """Bytes that are not a PE image this module can read."""


def _within(data, offset, size, what):
    """PeError unless size bytes at offset lie inside data."""
    if offset < 0 or offset + size > len(data):
        raise PeError("truncated: the %s at offset %d runs past the end of the %d bytes" % (what, offset, len(data)))


def _unpack(layout, data, offset, what):
    """struct.unpack_from of layout at offset, or PeError when data ends before it."""
    _within(data, offset, struct.calcsize(layout), what)
    return struct.unpack_from(layout, data, offset)


def _headers(data):
    """(offset of the section table, number of sections, offset of the data directories, their count)."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise PeError("no MZ header")
    pe = _unpack("<I", data, 0x3C, "PE header offset")[0]
    if data[pe:pe + 4] != b"PE\0\0":
        raise PeError("no PE signature")
    sections, symbols, symbol_count, optional_size = _unpack("<H4xIIH", data, pe + 6, "COFF header")
    optional = pe + 24
    magic = _unpack("<H", data, optional, "optional header")[0]
    if magic not in _DIRECTORIES:
        raise PeError("unknown optional header magic 0x%x" % magic)
    directories = optional + _DIRECTORIES[magic]
    count = _unpack("<I", data, directories - 4, "data directory count")[0]
    # Names longer than 8 bytes are "/N": offset N in the string table after the symbols.
    strings = symbols + 18 * symbol_count if symbols else None
    table = optional + optional_size
    _within(data, table, 40 * sections, "section table")
    return table, sections, directories, count, strings


def sections(data):
    """{name: bytes} of each section, its padding cut at the section's virtual size."""
    table, count, _directories, _dir_count, strings = _headers(data)
    found = {}
    for index in range(count):
        name, virtual_size, _address, raw_size, raw_offset = struct.unpack_from("<8sIIII", data, table + 40 * index)
        name = name.rstrip(b"\0")
        if name[:1] == b"/" and name[1:].isdigit() and strings is not None:
            start = strings + int(name[1:])
            end = data.find(b"\0", start)
            if end < 0:
                raise PeError("truncated: the name of section %d runs past the end of the %d bytes" % (
                    index, len(data)))
            name = data[start:end]
        size = min(virtual_size, raw_size)
        if size:
            _within(data, raw_offset, size, "section %s" % name.decode("ascii", "replace"))
        found[name.decode("ascii", "replace")] = data[raw_offset:raw_offset + size]
    return found


def signature_entry_offset(data):
    """File offset of the certificate table's (offset, size) entry."""
    _table, _count, directories, dir_count, _strings = _headers(data)
    if dir_count <= _SECURITY_DIRECTORY:
        raise PeError("no certificate table entry")
    return directories + 8 * _SECURITY_DIRECTORY


def is_signed(data):
    """Whether the image carries an Authenticode signature (a certificate
    table); False for bytes that are no PE image this module can read."""
    try:
        offset, size = _unpack("<II", data, signature_entry_offset(data), "certificate table entry")
    except PeError:
        return False
    return size > 0 and offset + size <= len(data)


def sbat_entries(data):
    """The SBAT section as {component: SbatEntry}."""
    text = sections(data).get(".sbat", b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    return parse_sbat(text)


def parse_sbat(text):
    entries = {}
    for line in text.splitlines():
        fields = line.strip().split(",")
        if len(fields) >= 2 and _GENERATION.fullmatch(fields[1]):
            vendor, package, version = (fields[2:5] + ["", "", ""])[:3]
            entries[fields[0]] = SbatEntry(int(fields[1]), vendor, package, version)
    return entries


def sbat_levels(data):
    """shim's .sbatlevel: {"previous": {component: generation}, "latest": {...}},
    each with its date under "sbat" as a string (empty without the section)."""
    raw = sections(data).get(".sbatlevel")
    if not raw or len(raw) < 12:
        return {}
    # A version word, then the two policies' offsets counted from after it.
    _version, previous, latest = struct.unpack_from("<III", raw)
    levels = {}
    for name, offset in (("previous", previous), ("latest", latest)):
        text = raw[4 + offset:].split(b"\0", 1)[0].decode("ascii", "replace")
        level = {}
        for line in text.splitlines():
            fields = line.strip().split(",")
            if fields[0] == "sbat" and len(fields) >= 3:
                level["sbat"] = fields[2]
            elif len(fields) >= 2 and _GENERATION.fullmatch(fields[1]):
                level[fields[0]] = int(fields[1])
        levels[name] = level
    return levels


def sbat_violations(entries, level):
    """The components of an image's SBAT (sbat_entries) older than a level requires:
    [(component, generation, required)]."""
    return [(component, entries[component].generation, required) for component, required in sorted(level.items())
            if component != "sbat" and component in entries and entries[component].generation < required]
