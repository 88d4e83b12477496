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


def copy_argv(source, dest, *, excludes=(), protect=(), checksum=False, dry_run=False,
              delete_excluded=False, rsh=None, source_is_file=False, one_file_system=False):
    """argv copying the tree at source into dest (both directories; either
    may be USER@HOST:PATH, reached with the remote shell command rsh). With
    one_file_system, its --delete does not go into other filesystems
    mounted in dest."""
    argv = ["rsync"] + COPY_OPTIONS
    if one_file_system:
        argv.append("--one-file-system")
    if rsh:
        # The remote path's escaping (literal_pattern) is for rsync's default argument handling:
        # RSYNC_OLD_ARGS or RSYNC_PROTECT_ARGS in the environment would change it.
        argv += ["-e", rsh, "--no-old-args", "--no-protect-args"]
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


# What makes a pattern a wildcard one: rsync compares a pattern holding none
# of these as plain text, and reads a backslash as an escape only in one that
# holds any (rsync(1), PATTERN MATCHING RULES).
_WILDCARDS = re.compile(r"[*?[]")
# wildmatch's named classes, [[:alpha:]] and the like (ASCII, as in the C locale).
_NAMED_CLASSES = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "blank": " \\t", "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~", "punct": "!-/:-@\\[-`{-~",
    "space": " \\t\\n\\r\\f\\v", "upper": "A-Z", "xdigit": "0-9A-Fa-f",
}


def _wildcard_regex(pattern, wild):
    """The regex of one rsync pattern, or of a part of one whose whole holds
    a wildcard (wild): * and ? stay within a component, ** crosses them,
    [...] is a class, and a backslash makes the next character literal."""
    if not wild:
        return re.escape(pattern)
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 == len(pattern):
                return "(?!)"  # a trailing backslash: wildmatch matches nothing
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
        elif char == "[":
            regex, i = _class_regex(pattern, i)
            if regex is None:
                return "(?!)"  # an unclosed class: wildmatch matches nothing
            out.append(regex)
        else:
            out.append(re.escape(char))
            i += 1
    return "".join(out)


def _class_regex(pattern, start):
    """The regex of the class opened at start and the index after its ], or
    (None, -1) when wildmatch finds it malformed (it then matches nothing):
    ! or ^ negates, a first ] is a member, a backslash escapes inside it too,
    [:name:] is a named class, and no class matches a /."""
    i = start + 1
    negated = pattern[i:i + 1] in ("!", "^")
    i += negated
    members, previous = [], None
    while i < len(pattern):
        char = pattern[i]
        if char == "]" and i > start + 1 + negated:
            return "[%s%s]" % ("^/" if negated else "", "".join(members)), i + 1
        if char == "\\":
            i += 1
            if i == len(pattern):
                break
            char = pattern[i]
        elif char == "-" and previous is not None and pattern[i + 1:i + 2] not in ("", "]"):
            i += 1
            if pattern[i] == "\\":
                i += 1
                if i == len(pattern):
                    break
            if previous <= pattern[i]:  # else only its first character, already a member
                members.append("%s-%s" % (re.escape(previous), re.escape(pattern[i])))
            previous = None
            i += 1
            continue
        elif char == "[" and pattern.startswith(":", i + 1):
            close = pattern.find("]", i + 2)
            if close < 0:
                break
            if close > i + 2 and pattern[close - 1] == ":":  # else [: is a plain [
                if pattern[i + 2:close - 1] not in _NAMED_CLASSES:
                    break
                members.append(_NAMED_CLASSES[pattern[i + 2:close - 1]])
                previous, i = None, close + 1
                continue
        members.append(re.escape(char))
        previous = char
        i += 1
    return None, -1


@functools.lru_cache(maxsize=16)
def _exclusion_regexes(patterns):
    """(anchored, full, component) regexes of --exclude patterns, None for an
    empty group. rsync matches a pattern starting with / against the whole
    path; one with another / or ** against the path's end, at a component
    boundary; any other against the last component."""
    groups = ([], [], [])
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        regex = _wildcard_regex(pattern, bool(_WILDCARDS.search(pattern)))
        if pattern.startswith("/"):
            groups[0].append(regex)
        elif "/" in pattern or "**" in pattern:
            groups[1].append("(?:.*/)?" + regex)
        else:
            groups[2].append(regex)
    return tuple(re.compile("|".join("(?:%s)" % regex for regex in group), re.S) if group else None
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


# How literal_pattern writes each character that a pattern or a glob reads as
# more than itself: as a class of that one character.
_CLASS_OF = {"*": "[*]", "?": "[?]", "[": "[[]", "\\": "[\\\\]"}
# rrsync splits the command it is sent at whitespace as Python's re knows it,
# and rsync escapes only spaces and tabs for it: a path holding other
# whitespace (a newline, a no-break space) reaches the client as two paths.
_SPLIT_BY_RRSYNC = re.compile(r"[^\S \t]|\x00")


def literal_pattern(path):
    """A pattern that matches path and nothing else, for rsync's filter rules
    (--exclude, protect) and for the PATH of a remote USER@HOST:PATH, which
    rrsync on the client expands with Python's glob (/srv/[ab] copied /srv/a
    and /srv/b, never /srv/[ab]).

    Each of * ? [ and the backslash becomes a class of itself: [*] [?] [[]
    [\\\\], which rsync's wildmatch, Python's glob and a shell all read alike.
    A backslash escape would not do: rsync reads a backslash as an escape only
    in a pattern holding a wildcard (so an escaped backslash would turn into
    two in one without), and rrsync takes every backslash off before its glob.
    As each class is a wildcard itself, the pattern reads the same with a
    tail such as /* joined to it or its first components cut off."""
    return "".join(_CLASS_OF.get(char, char) for char in path)


def pattern_beneath(pattern, path):
    """The /-anchored pattern that matches, in a copy of path's tree, what the
    /-anchored pattern matches beneath path in a copy of the whole; None when
    it matches nothing there or a ** among path's components could match it
    at more than one depth."""
    wild = bool(_WILDCARDS.search(pattern))
    parts, names = pattern[1:].split("/"), path.strip("/").split("/")
    if not "".join(parts[len(names):]):
        return None
    for part, name in zip(parts, names):
        if "**" in part or not re.fullmatch(_wildcard_regex(part, wild), name, re.S):
            return None
    rest = "/" + "/".join(parts[len(names):])
    if wild and not _WILDCARDS.search(rest):
        rest = re.sub(r"\\(.)", r"\1", rest, flags=re.S)  # rsync would read its escapes as text
    return rest


def remote_path_problem(path):
    """None, or why path cannot be the PATH of a remote USER@HOST:PATH."""
    if _SPLIT_BY_RRSYNC.search(path):
        return ("the client's path %r holds a NUL or a whitespace character other than a space or a tab (a "
                "newline, a no-break space), which rrsync on the client would take as the end of the path; "
                "rename it" % path)
    return None
