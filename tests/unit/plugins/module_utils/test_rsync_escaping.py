# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Paths that reach rsync as patterns or as a remote rsync's arguments name
those paths and nothing else: checked against the real rsync and rrsync."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._common import rsync as _rsync
from ansible_collections.liveclone.core.plugins.module_utils._common import ssh as _ssh
from ansible_collections.liveclone.core.plugins.module_utils._common.roottree import mount_excludes
from ansible_collections.liveclone.core.plugins.module_utils._common.rsync import is_excluded, literal_pattern
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache import desired as desired_
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache.read import restore_excludes

RRSYNC = shutil.which("rrsync") or "/usr/bin/rrsync"
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL/rTe/xjg1JaAvFiWhVHFYURFwQkzkSdlUmhrGIz7ze test"

# Each awkward name with its look-alikes: the names a pattern made of it
# without escaping would match instead, or as well.
AWKWARD = [
    ("disk[1]", ["disk1"]),
    ("a*b", ["axb", "ab"]),
    ("q?", ["qx"]),
    ("back\\slash", ["backslash"]),
    ("x[!a]", ["xb"]),
    ("with space", ["with", "with  space"]),
    ("b\\[1]", ["b[1]", "b1"]),
    ("c\\*", ["c*", "cx"]),
    ("[ab]", ["a", "b"]),
    ("br]", ["br"]),
    ("{a,b}", ["a", "b"]),
]
# Names a filter rule takes but a remote path cannot (rrsync would split it).
FILTER_ONLY = [("new\nline", ["new", "line", "newline"])]


def make_tree(root, names):
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "file").write_text(name)


def copied(dest, names):
    return {name for name in names if (dest / name / "file").exists()}


def test_an_escaped_path_excludes_that_path_and_none_of_its_look_alikes(tmp_path):
    """Through the real rsync: the mount form (path/*), the whole path, and
    protect; is_excluded agrees with what rsync left out."""
    names = sorted({name for name, alikes in AWKWARD + FILTER_ONLY for name in [name] + alikes})
    source = tmp_path / "src"
    make_tree(source, names)
    for number, name in enumerate(entry[0] for entry in AWKWARD + FILTER_ONLY):
        others = set(names) - {name}
        for pattern in ("/" + literal_pattern(name) + "/*", "/" + literal_pattern(name)):
            dest = tmp_path / ("dst%d-%d" % (number, len(pattern)))
            subprocess.run(["rsync", "-a", "--exclude=" + pattern, "%s/" % source, "%s/" % dest], check=True)
            assert copied(dest, names) == others, (name, pattern)
            for path in names:
                left_out = not (dest / path / "file").exists()
                assert is_excluded("/%s/file" % path, [pattern]) is left_out, (name, pattern, path)
        # A protect rule keeps that directory, and only that one, from --delete.
        dest, empty = tmp_path / ("protected%d" % number), tmp_path / "empty"
        make_tree(dest, names)
        empty.mkdir(exist_ok=True)
        subprocess.run(["rsync", "-a", "--delete", "--filter=protect /" + literal_pattern(name), "%s/" % empty,
                        "%s/" % dest], check=True)
        assert copied(dest, names) == {name}, name


# Patterns as a user writes them: the matcher reads them as rsync does.
USER_PATTERNS = [
    ("/back\\slash", ["back\\slash"], ["backslash"]),       # no wildcard: a backslash is itself
    ("/back\\slash*", ["backslash"], ["back\\slash"]),      # a wildcard: a backslash escapes
    ("/x[\\]]", ["x]"], ["x\\"]),                           # an escape inside a class
    ("/x[]]", ["x]"], ["x"]),                               # a first ] is a member
    ("/a[!x]b", ["a[b"], ["axb", "a/b"]),                   # no class matches a /
    ("/a[b", [], ["a[b", "ab"]),                            # an unclosed class matches nothing
    ("/[[:digit:]]z", ["1z"], ["az"]),
    ("/r[c-a]", ["rc"], ["ra", "rb"]),                      # a reversed range: its first character
]


def test_the_matcher_reads_backslashes_and_classes_as_rsync_does(tmp_path):
    for number, (pattern, left_out, kept) in enumerate(USER_PATTERNS):
        source, dest = tmp_path / ("src%d" % number), tmp_path / ("dst%d" % number)
        for path in left_out + kept:
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            (source / path).write_text("x")
        subprocess.run(["rsync", "-a", "--exclude=" + pattern, "%s/" % source, "%s/" % dest], check=True)
        for path in left_out + kept:
            assert (dest / path).exists() is (path in kept), ("rsync", pattern, path)
            assert is_excluded("/" + path, [pattern]) is (path in left_out), ("is_excluded", pattern, path)


MOUNTINFO = """\
22 1 254:1 / / rw - ext4 /dev/vda rw
30 22 0:40 /@ /src rw - btrfs /dev/loop0 rw
31 30 8:17 / /src/srv/disk[1] rw - ext4 /dev/sdb1 rw
32 30 8:18 / /src/srv/back\\134slash rw - ext4 /dev/sdb2 rw
33 30 8:19 / /src/srv/with\\040space rw - ext4 /dev/sdb3 rw
"""


def test_a_mount_point_named_like_a_pattern_leaves_out_that_mount_only(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    excludes = mount_excludes("/src", False, str(mountinfo))
    assert excludes == ["/srv/back[\\\\]slash/*", "/srv/disk[[]1]/*", "/srv/with space/*"]
    names = ["srv/disk[1]", "srv/disk1", "srv/back\\slash", "srv/backslash", "srv/with space"]
    source, dest = tmp_path / "src", tmp_path / "dst"
    make_tree(source, names)
    subprocess.run(["rsync", "-a"] + ["--exclude=" + pattern for pattern in excludes]
                   + ["%s/" % source, "%s/" % dest], check=True)
    assert copied(dest, names) == {"srv/disk1", "srv/backslash"}
    assert not is_excluded("/srv/disk1/file", excludes) and is_excluded("/srv/disk[1]/file", excludes)


@pytest.mark.parametrize("pattern, path, beneath", [
    ("/srv/disk[[]1]/inner/*", "/srv/disk[1]", "/inner/*"),
    ("/srv/disk\\[1\\]/inner/*", "/srv/disk[1]", "/inner/*"),  # as older versions recorded it
    ("/srv/disk[1]/inner/*", "/srv/disk[1]", None),  # matched /srv/disk1/inner
    ("/home/*/.cache", "/home/alice", "/.cache"),
    ("/srv/a*/back\\slash", "/srv/ab", "/backslash"),  # its backslash was an escape
    ("/var/log/", "/var", "/log/"),
    ("/srv/x", "/srv/x", None),
    ("/srv/**/cache", "/srv/x", None),
])
def test_a_pattern_is_re_anchored_as_rsync_reads_it(pattern, path, beneath):
    assert _rsync.pattern_beneath(pattern, path) == beneath


def remote_desired(**overrides):
    mountinfo = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n30 22 8:2 / /srv/disk[1]/inner rw - ext4 /dev/sdb1 rw\n"
    remote = dict(host="192.0.2.10", port=22, user="root", identity_file="/etc/liveclone/id",
                  host_keys=[ED25519], accept_new_host_keys=False, mountinfo=mountinfo, connect_timeout=10)
    values = dict(base_dir="/srv/liveclone/web1", source="/", state="restored", snapper_config="cfg",
                  versioning="auto", keep=2, exclude=[], include_home=True, snapshot="on_change", checksum=False,
                  restore_snapshot="latest", restore_dest="/r", restore_delete_extra=False,
                  allow_restore_to_root=False, lock_timeout=1, remote=remote)
    values.update(overrides)
    return desired_.Desired.from_params(values)


def test_a_restore_re_anchors_escaped_and_wildcard_exclusions_at_its_path():
    """What the backup left out beneath restore_path stays out of the restore
    (else --delete takes it from the destination)."""
    escaped = restore_excludes(remote_desired(restore_path="/srv/disk[1]"), None)
    assert "/inner/*" in escaped
    user = restore_excludes(remote_desired(restore_path="/home/alice", exclude=["/home/*/.cache", "/srv/x"]), None)
    assert "/.cache" in user and not any("srv" in pattern for pattern in user)
    # /srv/disk[1] as a user's pattern matches /srv/disk1, nothing beneath the directory disk[1].
    literal = restore_excludes(remote_desired(restore_path="/srv/disk[1]", exclude=["/srv/disk[1]/data"]), None)
    assert "/data" not in literal


FAKE_SSH = """\
import os, sys
args = sys.argv[1:]
while args[0].startswith("-"):
    if args.pop(0) in ("-l", "-p", "-o", "-i", "-F"):
        args.pop(0)
os.environ["SSH_ORIGINAL_COMMAND"] = " ".join(args[1:])  # as ssh sends it, and sshd hands it to the forced command
os.execv(%r, [%r, os.environ["RRSYNC_MODE"], "-no-lock", "/"])
"""


@pytest.fixture
def client(tmp_path):
    """A Remote reached through a stand-in for ssh that runs the command it is given as sshd
    runs a forced command: through rrsync, which expands its arguments as globs."""
    if not os.path.exists(RRSYNC):
        pytest.skip("rrsync is not installed")
    ssh = tmp_path / "ssh"
    ssh.write_text("#!%s\n%s" % (sys.executable, FAKE_SSH % (RRSYNC, RRSYNC)))
    ssh.chmod(0o755)
    remote = _ssh.Remote.from_params(dict(host="192.0.2.10", port=22, user="root", identity_file="/etc/id",
                                          host_keys=[ED25519], accept_new_host_keys=False, mountinfo=None,
                                          connect_timeout=10))
    return remote, str(ssh)


def test_a_remote_path_names_that_path_and_not_what_rrsync_would_glob(tmp_path, client):
    remote, ssh = client
    names = sorted({name for name, alikes in AWKWARD for name in [name] + alikes})
    make_tree(tmp_path / "client", names)
    for number, name in enumerate(entry[0] for entry in AWKWARD):
        dest = tmp_path / ("pulled%d" % number)
        source = remote.location(str(tmp_path / "client" / name))
        subprocess.run(["rsync", "-a", "-e", ssh, source + "/", "%s/" % dest], check=True,
                       env=dict(os.environ, RRSYNC_MODE="-ro"))
        assert os.listdir(dest) == ["file"] and (dest / "file").read_text() == name, (name, source)


def test_a_remote_restore_lands_in_the_named_directory_not_a_look_alike(tmp_path, client):
    remote, ssh = client
    snapshot, clients = tmp_path / "snapshot", tmp_path / "client"
    make_tree(snapshot, ["restored"])
    make_tree(clients, ["e[1]", "e1"])
    subprocess.run(["rsync", "-a", "--delete", "-e", ssh, "%s/" % snapshot,
                    remote.location(str(clients / "e[1]")) + "/"], check=True,
                   env=dict(os.environ, RRSYNC_MODE="-wo"))
    assert sorted(os.listdir(clients / "e[1]")) == ["restored"]
    assert sorted(os.listdir(clients / "e1")) == ["file"]


@pytest.mark.parametrize("path", ["/srv/a\nb", "/srv/a\rb", "/srv/no\xa0break", "/srv/line\u2028sep"])
def test_a_remote_path_that_rrsync_would_split_is_refused(path):
    remote = _ssh.Remote.from_params(dict(host="h", port=22, user="root", identity_file="/etc/id",
                                          host_keys=[ED25519], accept_new_host_keys=False, mountinfo=None,
                                          connect_timeout=10))
    with pytest.raises(_ssh.RemoteError, match="rrsync on the client would take as the end"):
        remote.location(path)
