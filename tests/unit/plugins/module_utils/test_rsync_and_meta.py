# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import subprocess

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._common.backup_meta import (
    format_meta,
    human_size,
    parse_meta,
)
from ansible_collections.liveclone.core.plugins.module_utils._common.roottree import STANDARD_EXCLUDES
from ansible_collections.liveclone.core.plugins.module_utils._common.rsync import (
    copy_argv,
    is_excluded,
    itemized_path,
    literal_pattern,
    parse_output,
)

RSYNC_OUTPUT = """\
*deleting   stale
>f+++++++++ a-link
.f...p..... mode-changed
cd+++++++++ nested/
hf+++++++++ a => a-link
.d..t...... ./
sending incremental file list

Number of files: 9 (reg: 4, dir: 5)
Number of created files: 8 (reg: 4, dir: 4)
Number of deleted files: 1 (reg: 1)
Number of regular files transferred: 3
Total file size: 104,857,618 bytes
Total transferred file size: 104,857,612 bytes
"""


def test_parse_output_counts_changes_and_stats():
    stats = parse_output(RSYNC_OUTPUT)
    assert stats.view() == {"changes": 5, "files_total": 9, "files_transferred": 3, "files_deleted": 1,
                            "total_size": 104857618, "bytes_transferred": 104857612,
                            "changed_paths": RSYNC_OUTPUT.splitlines()[:5], "deleted_paths": ["stale"]}


def test_deletions_are_counted_even_without_the_stats_line():
    out = "*deleting   a/b\n*deleting   a/\n*deleting   c d.txt\n>f+++++++++ new\n"
    stats = parse_output(out)
    assert (stats.files_deleted, stats.deleted_paths, stats.changes) == (3, ["a/b", "a/", "c d.txt"], 4)
    assert "itemized" not in stats.view()


@pytest.mark.parametrize("line, path", [
    (">f+++++++++ etc/hostname", "etc/hostname"),
    ("cL+++++++++ home -> /data/home", "home"),
    ("hf+++++++++ a => b", "a"),
    ("cd+++++++++ dir with space/", "dir with space/"),
    ("*deleting   old -> x", "old -> x"),
])
def test_itemized_path(line, path):
    assert itemized_path(line) == path


def test_parse_output_shows_only_the_first_changed_paths():
    out = "".join(">f+++++++++ file%d\n" % number for number in range(50))
    stats = parse_output(out)
    assert stats.changes == 50
    assert stats.changed_paths == [">f+++++++++ file%d" % number for number in range(20)]


def test_parse_output_does_not_count_a_directory_whose_only_change_is_its_time():
    stats = parse_output(".d..t...... tmp/\n.d..t...... run/\n.d..t...... ./\n")
    assert (stats.changes, stats.changed_paths) == (0, [])


def test_parse_output_of_a_run_that_changed_nothing():
    stats = parse_output("Number of files: 9 (reg: 4, dir: 5)\nNumber of regular files transferred: 0\n")
    assert (stats.changes, stats.files_total, stats.files_transferred, stats.changed_paths) == (0, 9, 0, [])


def test_copy_argv_puts_protect_rules_first():
    argv = copy_argv("/src", "/dst/", excludes=["/tmp/*"], protect=["/.snapshots"], checksum=True,
                     dry_run=True, delete_excluded=True)
    assert argv == ["rsync", "-aAXHS", "--numeric-ids", "--delete", "--itemize-changes", "--stats",
                    "--checksum", "--dry-run", "--delete-excluded", "--filter=protect /.snapshots",
                    "--exclude=/tmp/*", "/src/", "/dst/"]
    assert "--one-file-system" not in argv and "--update" not in argv


def test_meta_round_trip_never_runs_shell():
    values = {"META_DATE": "2026-06-17 14:30", "META_DISTRO": 'Evil "$(rm -rf /)" `x` \\ OS',
              "META_SIZE": "8.2G", "META_KERNEL": "6.1.0-28-amd64", "META_SNAPSHOT": "4"}
    text = format_meta(values)
    assert text.splitlines()[0] == 'META_DATE="2026-06-17 14:30"'
    assert 'META_DISTRO="Evil \\"\\$(rm -rf /)\\" \\`x\\` \\\\ OS"' in text
    assert parse_meta(text) == values


HOSTILE = 'Evil" $(id) `id` \\ a,b=c\rline\x0bfeed\x1b[2J\u2028sep\x85nel\x00\nnext=1'


def test_format_meta_keeps_one_line_per_key_whatever_the_values_hold():
    values = {"META_DATE": "2026-06-17 14:30", "META_DISTRO": HOSTILE, "META_KERNEL": "6.1\n" + HOSTILE}
    text = format_meta(values)
    assert text.count("\n") == 3 and text.endswith("\n")
    assert text.splitlines() == text.split("\n")[:-1], "a line separator other than \\n is left in the text"
    parsed = parse_meta(text)
    assert sorted(parsed) == ["META_DATE", "META_DISTRO", "META_KERNEL"]
    assert parsed["META_DISTRO"] == 'Evil" $(id) `id` \\ a,b=c line feed [2J sep nel  next=1'


def test_parse_meta_ignores_code_and_junk():
    text = 'META_DATE="2026-06-17 14:30"\nrm -rf /\nMETA_SIZE=$(id)\n# comment\nMETA_DISTRO="SysLinuxOS"\n'
    assert parse_meta(text) == {"META_DATE": "2026-06-17 14:30", "META_DISTRO": "SysLinuxOS"}


@pytest.mark.parametrize("size, text", [
    (34, "34"), (4096, "4.0K"), (8804682956, "8.2G"), (512 * 1024 * 1024, "512M"),
    (int(9.99 * 1024 ** 3), "10G"), (10 * 1024 ** 3 + 1, "11G"),
])
def test_human_size_like_du(size, text):
    assert human_size(size) == text


@pytest.mark.parametrize("relative, patterns, expected", [
    ("/mnt/debian_backup", STANDARD_EXCLUDES, True),
    ("/srv/backup", STANDARD_EXCLUDES, False),
    ("/srv/backup", ["/srv/backup"], True),
    ("/srv/backup/inner", ["/srv/*"], True),
    ("/srv/backup", ["backup"], True),
    ("/srv/backupx", ["/srv/backup"], False),
    ("/var/tmp/x", STANDARD_EXCLUDES, True),
])
def test_is_excluded(relative, patterns, expected):
    assert is_excluded(relative, patterns) is expected


@pytest.mark.parametrize(("path", "pattern"), [
    ("/srv/a*b", "/srv/a[*]b"), ("/srv/[x]?", "/srv/[[]x][?]"), ("/srv/back\\slash", "/srv/back[\\\\]slash"),
    ("/srv/plain", "/srv/plain")])
def test_literal_pattern_escapes_what_rsync_reads_as_wildcards(path, pattern):
    assert literal_pattern(path) == pattern


# Each pattern against paths rsync leaves out or keeps: the same table is
# checked against rsync itself below.
RSYNC_PATTERN_CASES = [
    ("/srv/*/cache", ["srv/a/cache"], ["srv/a/b/cache"]),
    ("/srv/**/cache", ["srv/a/cache", "srv/a/b/cache"], ["srv/cache2"]),
    ("cache", ["cache", "srv/cache", "srv/a/cache/x"], ["srv/cachex"]),
    ("a/cache", ["a/cache", "srv/a/cache"], ["srv/xa/cache", "cache"]),
    ("/srv/a\\*b", ["srv/a*b"], ["srv/axb"]),
    ("/srv/f[0-9]", ["srv/f1"], ["srv/fx", "srv/f12"]),
    ("/srv/g[!0-9]", ["srv/gx"], ["srv/g1"]),
    ("/srv/h?", ["srv/h1"], ["srv/h12"]),
    ("*.iso", ["x.iso", "srv/y.iso"], ["srv/y.isox"]),
]


@pytest.mark.parametrize("pattern, left_out, kept", RSYNC_PATTERN_CASES)
def test_is_excluded_follows_rsyncs_wildcards(pattern, left_out, kept):
    for path in left_out:
        assert is_excluded("/" + path, [pattern]), path
    for path in kept:
        assert not is_excluded("/" + path, [pattern]), path


def test_the_table_is_what_rsync_itself_leaves_out(tmp_path):
    """The matcher's table, run through the real rsync: is_excluded agrees
    with what a copy with --exclude leaves out."""
    for number, (pattern, left_out, kept) in enumerate(RSYNC_PATTERN_CASES):
        source, dest = tmp_path / ("src%d" % number), tmp_path / ("dst%d" % number)
        for path in left_out + kept:
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            if not (source / path).exists():
                (source / path).write_text("x")
        subprocess.run(["rsync", "-a", "--exclude=" + pattern, "%s/" % source, "%s/" % dest], check=True)
        for path in left_out + kept:
            copied = (dest / path).exists()
            assert copied is not is_excluded("/" + path, [pattern]), (pattern, path, copied)
