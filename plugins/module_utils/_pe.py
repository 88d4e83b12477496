# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""PE images (shim, GRUB, an EFI-stub kernel) read as bytes: their sections,
whether they carry an Authenticode signature, their SBAT data, and the SBAT
levels a shim applies. Nothing here runs them or checks a signature's trust."""

from __future__ import annotations

import struct
from collections import namedtuple

# The optional header's magic, and where its data directories start.
_DIRECTORIES = {0x10B: 96, 0x20B: 112}
_SECURITY_DIRECTORY = 4


# One line of an SBAT section: component,generation,vendor,package,version,url.
SbatEntry = namedtuple("SbatEntry", "generation vendor package version")


class PeError(ValueError):
    """Bytes that are not a PE image this module can read."""


def _headers(data):
    """(offset of the section table, number of sections, offset of the data directories, their count)."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise PeError("no MZ header")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if data[pe:pe + 4] != b"PE\0\0":
        raise PeError("no PE signature")
    sections, symbols, symbol_count, optional_size = struct.unpack_from("<H4xIIH", data, pe + 6)
    optional = pe + 24
    magic = struct.unpack_from("<H", data, optional)[0]
    if magic not in _DIRECTORIES:
        raise PeError("unknown optional header magic 0x%x" % magic)
    directories = optional + _DIRECTORIES[magic]
    count = struct.unpack_from("<I", data, directories - 4)[0]
    # Names longer than 8 bytes are "/N": offset N in the string table after the symbols.
    strings = symbols + 18 * symbol_count if symbols else None
    return optional + optional_size, sections, directories, count, strings


def sections(data):
    """{name: bytes} of each section, its padding cut at the section's virtual size."""
    table, count, _directories, _dir_count, strings = _headers(data)
    found = {}
    for index in range(count):
        name, virtual_size, _address, raw_size, raw_offset = struct.unpack_from("<8sIIII", data, table + 40 * index)
        name = name.rstrip(b"\0")
        if name[:1] == b"/" and name[1:].isdigit() and strings is not None:
            start = strings + int(name[1:])
            name = data[start:data.index(b"\0", start)]
        found[name.decode("ascii", "replace")] = data[raw_offset:raw_offset + min(virtual_size, raw_size)]
    return found


def signature_entry_offset(data):
    """File offset of the certificate table's (offset, size) entry."""
    _table, _count, directories, dir_count, _strings = _headers(data)
    if dir_count <= _SECURITY_DIRECTORY:
        raise PeError("no certificate table entry")
    return directories + 8 * _SECURITY_DIRECTORY


def is_signed(data):
    """Whether the image carries an Authenticode signature (a certificate table)."""
    try:
        offset, size = struct.unpack_from("<II", data, signature_entry_offset(data))
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
        if len(fields) >= 2 and fields[1].isdigit():
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
            elif len(fields) >= 2 and fields[1].isdigit():
                level[fields[0]] = int(fields[1])
        levels[name] = level
    return levels


def sbat_violations(entries, level):
    """The components of an image's SBAT (sbat_entries) older than a level requires:
    [(component, generation, required)]."""
    return [(component, entries[component].generation, required) for component, required in sorted(level.items())
            if component != "sbat" and component in entries and entries[component].generation < required]
