# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""rsync as the collection uses it: a faithful copy, and what it changed."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

# ACLs, xattrs, hard links, sparse files, numeric ids; no --one-file-system
# (it drops nested btrfs subvolumes) and no --update (it keeps a newer copy
# of a file that was downgraded on the source).
COPY_OPTIONS = ["-aAXHS", "--numeric-ids", "--delete", "--itemize-changes", "--stats"]

# rsync's "some files vanished before they could be transferred".
RSYNC_VANISHED = 24

# How many itemized lines a result shows: enough to tell why a backup changed.
CHANGED_PATHS_SHOWN = 20

# An itemized change: YXcstpoguax NAME, or a deletion.
_ITEMIZED = re.compile(r"^(?:[<>ch.][fdLDS][.+?a-zA-Z ]{9,10} |\*deleting )")
_DELETING = re.compile(r"^\*deleting +")
# A directory whose only change is its mtime: an entry in it was created and
# removed again (/tmp, /run on a running host). rsync still copies the time,
# but it is no reason for a new snapshot.
_DIRECTORY_TIME_ONLY = re.compile(r"^\.d\.\.t\.{6} ")
_STAT = {
    "files_total": r"^Number of files: ([\d,]+)",
    "files_transferred": r"^Number of regular files transferred: ([\d,]+)",
    "files_deleted": r"^Number of deleted files: ([\d,]+)",
    "total_size": r"^Total file size: ([\d,]+) bytes",
    "bytes_transferred": r"^Total transferred file size: ([\d,]+) bytes",
}


@dataclass
class TransferStats:
    changes: int = 0
    files_total: int = 0
    files_transferred: int = 0
    # Entries (files, links, directories) deleted from the destination, or that would be.
    files_deleted: int = 0
    total_size: int = 0
    bytes_transferred: int = 0
    changed_paths: list = field(default_factory=list)
    deleted_paths: list = field(default_factory=list)
    # Every itemized line, for the module's own checks; not part of the result.
    itemized: list = field(default_factory=list, repr=False)

    def view(self):
        return {name: value for name, value in self.__dict__.items() if name != "itemized"}


def itemized_path(line):
    """The destination-relative path of an itemized line (a link's or hard link's target left off)."""
    if _DELETING.match(line):
        return _DELETING.sub("", line)
    path = line[12:]
    if line[1] == "L" and " -> " in path:
        path = path.split(" -> ", 1)[0]
    elif line[0] == "h" and " => " in path:
        path = path.split(" => ", 1)[0]
    return path


def parse_output(out):
    """TransferStats from the output of rsync --itemize-changes --stats."""
    itemized = [line for line in out.splitlines()
                if _ITEMIZED.match(line) and not _DIRECTORY_TIME_ONLY.match(line)]
    deleted = [itemized_path(line) for line in itemized if _DELETING.match(line)]
    stats = TransferStats(changes=len(itemized), changed_paths=itemized[:CHANGED_PATHS_SHOWN],
                          deleted_paths=deleted[:CHANGED_PATHS_SHOWN], itemized=itemized)
    for name, pattern in _STAT.items():
        match = re.search(pattern, out, re.M)
        if match:
            setattr(stats, name, int(match.group(1).replace(",", "")))
    # An rsync that prints no deletion count still itemizes each deletion.
    stats.files_deleted = max(stats.files_deleted, len(deleted))
    return stats


def copy_argv(source, dest, excludes=(), protect=(), checksum=False, dry_run=False,
              delete_excluded=False, rsh=None, source_is_file=False):
    """argv copying the tree at source into dest (both directories; either
    may be USER@HOST:PATH, reached with the remote shell command rsh)."""
    argv = ["rsync"] + COPY_OPTIONS
    if rsh:
        argv += ["-e", rsh]
    if checksum:
        argv.append("--checksum")
    if dry_run:
        argv.append("--dry-run")
    if delete_excluded:
        argv.append("--delete-excluded")
    # Protect rules come first: they keep receiver paths from --delete.
    argv += ["--filter=protect %s" % path for path in protect]
    argv += ["--exclude=%s" % pattern for pattern in excludes]
    if source_is_file:
        # Into the directory dest, keeping its name: no rsync names a single file's destination the
        # same way (rrsync 3.5 pins the argument, and rsync then cannot replace the file).
        return argv + [source, dest.rstrip("/") + "/"]
    return argv + [source.rstrip("/") + "/", dest.rstrip("/") + "/"]


def _wildcard_regex(pattern):
    """The regex of one rsync pattern: * and ? stay within a component, **
    crosses them, [...] is a class, and a backslash makes the next character
    literal (as literal_pattern writes it)."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[" and _class_end(pattern, i) > 0:
            end = _class_end(pattern, i)
            body = pattern[i + 1:end]
            negated = body[:1] in ("!", "^")
            members = "".join(c if c == "-" else re.escape(c) for c in body[negated:])
            out.append("[%s%s]" % ("^" if negated else "", members))
            i = end + 1
        else:
            out.append(re.escape(char))
            i += 1
    return "".join(out)


def _class_end(pattern, start):
    """The index of the ] closing the class opened at start, or -1."""
    i = start + 1
    if pattern[i:i + 1] in ("!", "^"):
        i += 1
    if pattern[i:i + 1] == "]":
        i += 1
    return pattern.find("]", i)


@functools.lru_cache(maxsize=16)
def _exclusion_regexes(patterns):
    """(anchored, full, component) regexes of --exclude patterns, None for an
    empty group. rsync matches a pattern starting with / against the whole
    path; one with another / or ** against the path's end, at a component
    boundary; any other against the last component."""
    groups = ([], [], [])
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if pattern.startswith("/"):
            groups[0].append(_wildcard_regex(pattern))
        elif "/" in pattern or "**" in pattern:
            groups[1].append("(?:.*/)?" + _wildcard_regex(pattern))
        else:
            groups[2].append(_wildcard_regex(pattern))
    return tuple(re.compile("|".join("(?:%s)" % regex for regex in group)) if group else None
                 for group in groups)


def is_excluded(relative, patterns):
    """Whether rsync would leave `relative` (a /-anchored path) out of a copy
    with these --exclude patterns: the path, or a directory on its way (rsync
    does not descend into an excluded directory), matches one of them."""
    anchored, full, component = _exclusion_regexes(tuple(patterns))
    parts = relative.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        path = "/".join(parts[:depth])
        if anchored and anchored.fullmatch("/" + path):
            return True
        if full and full.fullmatch(path):
            return True
        if component and component.fullmatch(parts[depth - 1]):
            return True
    return False


def literal_pattern(path):
    """An rsync pattern that matches path and nothing else."""
    return re.sub(r"([*?\[])", r"\\\1", path)
