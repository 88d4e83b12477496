"""snapper_cache pulling a client over SSH, with nothing mocked: a backup
volume (btrfs on a loop device) and snapper on the server side, a real sshd
on 127.0.0.1 (tests/lib/sshd.py), rrsync and rsync on the client side. The
client is this machine, confined by its authorized_keys to a tree in the
sandbox: the pull key runs `rrsync -ro CLIENT_ROOT`, so `/` on the client is
that tree, and no pull reads, nor any restore writes, the host's own files.
The client's user database differs from the server's (copies of /etc/passwd
and /etc/group, bind-mounted in the private mount namespaces only), so that
ids kept as numbers can be told from ids mapped by name.

The tests run in file order on one client and one cache: a full pull, an
unchanged one, a changed one (in check mode first), a restore into the
client, then the refusals, each of which must leave the cache, its snapshots
and the client as they were. A canary tree outside every target must be the
same after each test."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import stat
import subprocess

import pytest
from conftest import run
from module_run import run_module
from sandbox import mounted_under
from sshd import free_port, make_key, running_sshd

CONFIG = "liveclone-pulltest"
# The client's mount table as the controller reads it: its root, and a tmpfs
# inside the tree that the pull must leave out.
MOUNTINFO = ("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
             "40 22 0:48 / /srv/scratch rw,nosuid,nodev - tmpfs tmpfs rw\n")
# What of the client a pull leaves out: the standard exclusions (/home/*,
# /tmp/*) and the filesystem mounted at /srv/scratch.
LEFT_OUT = ("home/", "tmp/", "srv/scratch/")
# A file's owner on the client, by id and by name. The server knows the same
# names with other ids: a pull that mapped ids by name (no --numeric-ids)
# would give the copy the server's ids.
OWNER = (12345, 23456)
CLIENT_USERS = ("lcpull:x:12345:23456:pull test owner:/nonexistent:/usr/sbin/nologin",)
CLIENT_GROUPS = ("lcpullgrp:x:23456:",)
SERVER_USERS = ("lcpull:x:12346:23457:pull test owner:/nonexistent:/usr/sbin/nologin",)
SERVER_GROUPS = ("lcpullgrp:x:23457:",)
XATTR = ("user.liveclone", b"pulled")
SPARSE_SIZE = 16 << 20
SPARSE_DATA = b"the middle of a sparse file"
# Host files the tests must never write.
HOST_PATHS = (os.path.join(pwd.getpwuid(0).pw_dir, ".ssh"), "/etc/ssh", "/var/spool/cron/crontabs", "/etc/crontab")


def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)


def read_text(path):
    with open(path, errors="replace") as handle:
        return handle.read()


def digest(root, skip=()):
    """{relative path: (kind, mode, uid, gid, content sha256 or link target, xattrs)} of a tree,
    leaving out what starts with one of skip (relative, ending with /)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root)
            if any((relative + "/").startswith(prefix) and relative + "/" != prefix for prefix in skip):
                continue
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    content = hashlib.file_digest(handle, "sha256").hexdigest()
            else:
                content = None
            xattrs = () if stat.S_ISLNK(info.st_mode) else tuple(sorted(
                (key, os.getxattr(path, key, follow_symlinks=False)) for key in os.listxattr(path)))
            found[relative] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid,
                               content, xattrs)
    return found


def entries(root):
    """What a refused run must leave as it was: every entry under root, with its size and times."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            # btrfs shows a subvolume inside a snapshot as an empty directory, inode 2, timed now.
            placeholder = stat.S_ISDIR(info.st_mode) and info.st_ino == 2
            found[os.path.relpath(path, root)] = (info.st_mode, info.st_size,
                                                  None if placeholder else info.st_mtime_ns, info.st_ino)
    return found


def host_state():
    state = {}
    for path in HOST_PATHS:
        if os.path.isdir(path):
            state[path] = entries(path)
        else:
            state[path] = os.lstat(path).st_mtime_ns if os.path.lexists(path) else None
    return state


@contextlib.contextmanager
def server_user_database(work):
    """The server's /etc/passwd and /etc/group with SERVER_USERS and SERVER_GROUPS,
    bind-mounted in this (private) mount namespace while the tests run."""
    covered = []
    try:
        for name, lines in (("passwd", SERVER_USERS), ("group", SERVER_GROUPS)):
            copy = os.path.join(work, "server-" + name)
            with open("/etc/" + name) as source, open(copy, "w") as handle:
                handle.write(source.read().rstrip("\n") + "\n" + "\n".join(lines) + "\n")
            os.chmod(copy, 0o644)
            run(["mount", "--bind", copy, "/etc/" + name])
            covered.append("/etc/" + name)
        yield
    finally:
        for path in reversed(covered):
            subprocess.run(["umount", path], check=False)


def make_client(root, canary):
    """The client's tree: owners, modes, an xattr, hard links, a sparse file,
    links (one to the canary, outside the tree), and what a pull leaves out."""
    write(os.path.join(root, "etc/os-release"), 'NAME="Liveclone Pull Client"\nID=pullclient\n')
    write(os.path.join(root, "etc/hostname"), "client1\n")
    write(os.path.join(root, "lib/modules/6.1.0-pulltest/modules.dep"), "")
    data = os.path.join(root, "srv/data")
    write(os.path.join(data, "owned.txt"), "owned by ids nobody has\n", 0o640)
    os.chown(os.path.join(data, "owned.txt"), *OWNER)
    write(os.path.join(data, "setuid-tool"), "#!/bin/sh\n", 0o4755)
    write(os.path.join(data, "tagged.txt"), "has an xattr\n")
    os.setxattr(os.path.join(data, "tagged.txt"), *XATTR)
    write(os.path.join(data, "hard-a"), "one inode, two names\n")
    os.link(os.path.join(data, "hard-a"), os.path.join(data, "hard-b"))
    with open(os.path.join(data, "sparse.img"), "wb") as handle:
        handle.truncate(SPARSE_SIZE)
        handle.seek(SPARSE_SIZE // 2)
        handle.write(SPARSE_DATA)
    os.symlink(canary, os.path.join(data, "canary-link"))
    os.symlink("../../etc/hostname", os.path.join(data, "hostname-link"))
    write(os.path.join(data, "to-change.txt"), "version 1\n")
    write(os.path.join(data, "to-delete.txt"), "deleted on the client before the second pull\n")
    write(os.path.join(root, "home/alice/notes.txt"), "left out: /home/*\n")
    write(os.path.join(root, "tmp/junk"), "left out: /tmp/*\n")
    write(os.path.join(root, "srv/scratch/mounted.txt"), "left out: another filesystem on the client\n")


def make_canary(root):
    write(os.path.join(root, "secret.txt"), "the canary's secret, never to be copied\n", 0o600)
    write(os.path.join(root, "etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n")
    os.makedirs(os.path.join(root, "empty"))


class Lab:
    """The server's backup volume, the client's tree, the sshd and the keys."""

    def __init__(self, work):
        self.work = work
        self.client_root = os.path.join(work, "client-root")
        self.restore_root = os.path.join(work, "restore-root")
        self.canary = os.path.join(work, "canary")
        self.volume = os.path.join(work, "server")
        self.base_dir = os.path.join(self.volume, "client1")
        self.sshd = None
        self.keys = {}

    @property
    def snapshots_dir(self):
        return os.path.join(self.base_dir, ".rootfs_cache/.snapshots")

    def snapshot(self, number):
        return os.path.join(self.snapshots_dir, str(number), "snapshot")

    def numbers(self):
        if not os.path.isdir(self.snapshots_dir):
            return []
        return sorted(int(name) for name in os.listdir(self.snapshots_dir) if name.isdigit())

    def read(self, name):
        with open(os.path.join(self.base_dir, name)) as handle:
            return handle.read()

    def meta(self):
        values = {}
        for line in self.read(".backup_meta").splitlines():
            key, _sep, value = line.partition("=")
            values[key] = value.strip('"')
        return values

    def params(self, key="pull", port=None, host_keys=None, **extra):
        remote = {"host": "127.0.0.1", "port": port or self.sshd.port, "user": "root",
                  "identity_file": self.keys[key].path, "host_keys": host_keys or [self.sshd.host_key_line],
                  "mountinfo": MOUNTINFO, "connect_timeout": 5}
        return dict({"base_dir": self.base_dir, "snapper_config": CONFIG, "keep": 5, "lock_timeout": 10,
                     "remote": remote}, **extra)

    def pull(self, check=False, **overrides):
        return run_module(self.work, "snapper_cache", self.params(**overrides), check=check)


@pytest.fixture(scope="module")
def lab(sandbox):
    work = os.path.join(sandbox, "pull")
    os.makedirs(work)
    lab = Lab(work)
    host_before = host_state()
    make_canary(lab.canary)
    make_client(lab.client_root, lab.canary)
    os.makedirs(lab.restore_root)
    image = os.path.join(work, "server.img")
    with open(image, "wb") as handle:
        handle.truncate(256 << 20)
    device = run(["losetup", "--find", "--show", image]).stdout.strip()
    try:
        run(["mkfs.btrfs", "--quiet", device])
        os.makedirs(lab.volume)
        run(["mount", device, lab.volume])
        os.makedirs(lab.base_dir)
        for name in ("pull", "restore", "plain", "writer"):
            lab.keys[name] = make_key(work, name)
        with server_user_database(work), \
                running_sshd(os.path.join(work, "sshd"), users=CLIENT_USERS, groups=CLIENT_GROUPS) as sshd:
            lab.sshd = sshd
            # The backup_server role's options, confined to the sandbox's trees.
            sshd.authorize(lab.keys["pull"], 'restrict,command="/usr/bin/rrsync -ro %s"' % lab.client_root)
            sshd.authorize(lab.keys["restore"], 'restrict,command="/usr/bin/rrsync -wo %s"' % lab.restore_root)
            sshd.authorize(lab.keys["plain"])
            sshd.authorize(lab.keys["writer"], 'restrict,command="/usr/bin/rrsync -wo %s"' % lab.client_root)
            yield lab
            assert not sshd.children(), "sshd still serves a connection"
        with pytest.raises(ProcessLookupError):
            os.kill(sshd.pid, 0)
        assert host_state() == host_before, "a host file (~/.ssh, /etc/ssh, crontab) changed"
    finally:
        if mounted_under(lab.volume):
            subprocess.run(["umount", lab.volume], check=False)
        subprocess.run(["losetup", "--detach", device], check=False)


@pytest.fixture(autouse=True)
def canary_intact(lab):
    before = digest(lab.canary)
    yield
    assert digest(lab.canary) == before, "the canary outside every target changed"


@pytest.fixture(scope="module")
def first_pull(lab):
    return lab.pull()


@pytest.fixture(scope="module")
def changed_client(lab, first_pull):
    """One file changed (in size too) and one deleted on the client, after the first pull."""
    write(os.path.join(lab.client_root, "srv/data/to-change.txt"), "version 2, longer\n")
    os.unlink(os.path.join(lab.client_root, "srv/data/to-delete.txt"))


@pytest.fixture(scope="module")
def second_pull(lab, changed_client):
    return lab.pull()


@pytest.fixture(scope="module")
def pending_change(lab, second_pull):
    """A change a pull would copy and snapshot: the refusals must do neither."""
    write(os.path.join(lab.client_root, "srv/data/pending.txt"), "not pulled by a refused run\n")


def expected_copy(lab):
    return digest(lab.client_root, skip=LEFT_OUT)


def test_a_full_pull_copies_the_client_faithfully(lab, first_pull):
    result = first_pull.result
    assert not first_pull.failed, first_pull.msg
    assert result["changed"] and result["snapshot_created"]["name"] == "1"
    assert lab.numbers() == [1]
    snap = lab.snapshot(1)
    copied = digest(snap, skip=(".snapshots/",))
    copied.pop(".snapshots")
    # Every entry, with its owner, mode, content or link target and xattrs; nothing left out but LEFT_OUT.
    assert copied == expected_copy(lab)
    data = os.path.join(snap, "srv/data")
    owned = os.lstat(os.path.join(data, "owned.txt"))
    # The client's ids, though the server names them otherwise: --numeric-ids.
    assert pwd.getpwnam("lcpull").pw_uid != OWNER[0]
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (*OWNER, 0o640)
    assert stat.S_IMODE(os.lstat(os.path.join(data, "setuid-tool")).st_mode) == 0o4755
    assert os.getxattr(os.path.join(data, "tagged.txt"), XATTR[0]) == XATTR[1]
    first, second = os.lstat(os.path.join(data, "hard-a")), os.lstat(os.path.join(data, "hard-b"))
    assert first.st_ino == second.st_ino and first.st_nlink == 2
    sparse = os.lstat(os.path.join(data, "sparse.img"))
    assert sparse.st_size == SPARSE_SIZE and sparse.st_blocks * 512 < 1 << 20
    with open(os.path.join(data, "sparse.img"), "rb") as handle:
        handle.seek(SPARSE_SIZE // 2)
        assert handle.read(len(SPARSE_DATA)) == SPARSE_DATA
    # Links are copied as links, never followed: the canary is not in the copy.
    assert os.path.islink(os.path.join(data, "canary-link"))
    assert os.readlink(os.path.join(data, "canary-link")) == lab.canary
    assert os.readlink(os.path.join(data, "hostname-link")) == "../../etc/hostname"
    assert sorted(os.listdir(os.path.join(snap, "home"))) == [] and os.listdir(os.path.join(snap, "srv/scratch")) == []
    assert result["snapshots"][0]["read_only"]
    # .backup_meta describes the client's copy, not this host.
    meta = lab.meta()
    assert meta["META_DISTRO"] == "Liveclone Pull Client" and meta["META_KERNEL"] == "6.1.0-pulltest"
    assert meta["META_SNAPSHOT"] == "1"
    # The client's host key is pinned, as the controller gathered it.
    key_type, key_base64 = lab.sshd.host_key_line.split()[:2]
    assert lab.read(".liveclone-known_hosts") == "liveclone-client %s %s\n" % (key_type, key_base64)
    assert result["remote"]["host_key_fingerprints"] == [lab.sshd.fingerprint]
    assert result["remote"]["pinned"]
    assert not os.path.lexists(os.path.join(lab.base_dir, ".liveclone-pending"))


def test_an_unchanged_pull_changes_nothing(lab, first_pull):
    meta = lab.read(".backup_meta")
    again = lab.pull()
    assert not again.failed, again.msg
    assert not again.result["changed"], again.result["operations"]
    assert again.result["snapshot_created"] is None and not again.result["remote"]["pinned"]
    assert lab.numbers() == [1]
    assert lab.read(".backup_meta") == meta


def test_check_mode_of_a_changed_pull_plans_but_takes_nothing(lab, changed_client):
    cache = entries(os.path.join(lab.base_dir, ".rootfs_cache"))
    meta = lab.read(".backup_meta")
    check = lab.pull(check=True)
    assert not check.failed, check.msg
    result = check.result
    assert result["changed"]
    assert any(line.endswith(" srv/data/to-change.txt") for line in result["transfer"]["changed_paths"])
    assert result["transfer"]["deleted_paths"] == ["srv/data/to-delete.txt"]
    assert any(op.startswith("take a snapper snapshot") for op in result["operations"]), result["operations"]
    assert lab.numbers() == [1]
    assert entries(os.path.join(lab.base_dir, ".rootfs_cache")) == cache
    assert lab.read(".backup_meta") == meta


def test_a_changed_pull_takes_a_snapshot_of_the_change(lab, second_pull):
    assert not second_pull.failed, second_pull.msg
    assert second_pull.result["changed"] and second_pull.result["snapshot_created"]["name"] == "2"
    assert lab.numbers() == [1, 2]
    with open(os.path.join(lab.snapshot(2), "srv/data/to-change.txt")) as handle:
        assert handle.read() == "version 2, longer\n"
    assert not os.path.lexists(os.path.join(lab.snapshot(2), "srv/data/to-delete.txt"))
    copied = digest(lab.snapshot(2), skip=(".snapshots/",))
    copied.pop(".snapshots")
    assert copied == expected_copy(lab)
    # The first snapshot is as it was.
    with open(os.path.join(lab.snapshot(1), "srv/data/to-change.txt")) as handle:
        assert handle.read() == "version 1\n"
    assert os.path.isfile(os.path.join(lab.snapshot(1), "srv/data/to-delete.txt"))
    assert lab.meta()["META_SNAPSHOT"] == "2"


def test_a_restore_pushes_a_snapshot_into_the_client(lab, second_pull):
    """Snapshot 1's /srv/data into /restored/data on the client, through a key
    confined to `rrsync -wo RESTORE_ROOT`, as the backup_server role restores."""
    dest = os.path.join(lab.restore_root, "restored/data")
    os.makedirs(dest)  # the role makes the destination on the client
    write(os.path.join(dest, "stray.txt"), "in the destination, not in the snapshot\n")
    client = digest(lab.client_root)
    params = dict(key="restore", state="restored", restore_snapshot="1", restore_path="/srv/data",
                  restore_dest="/restored/data")
    refused = lab.pull(**params)
    assert refused.failed and "stray.txt" in refused.msg and "restore_delete_extra" in refused.msg, refused.msg
    assert os.listdir(dest) == ["stray.txt"]

    restored = lab.pull(restore_delete_extra=True, **params)
    assert not restored.failed, restored.msg
    assert restored.result["changed"] and restored.result["restored"]["name"] == "1"
    assert digest(dest) == digest(os.path.join(lab.snapshot(1), "srv/data"))
    assert os.lstat(os.path.join(dest, "owned.txt")).st_uid == OWNER[0]
    assert os.getxattr(os.path.join(dest, "tagged.txt"), XATTR[0]) == XATTR[1]
    assert os.lstat(os.path.join(dest, "hard-a")).st_ino == os.lstat(os.path.join(dest, "hard-b")).st_ino
    assert os.readlink(os.path.join(dest, "canary-link")) == lab.canary

    again = lab.pull(restore_delete_extra=True, **params)
    assert not again.failed and not again.result["changed"], again.result
    # A single file, into its directory under its own name.
    os.makedirs(os.path.join(lab.restore_root, "restored/etc"))
    one = lab.pull(key="restore", state="restored", restore_snapshot="2", restore_path="/etc/hostname",
                   restore_dest="/restored/etc")
    assert not one.failed, one.msg
    assert os.listdir(os.path.join(lab.restore_root, "restored/etc")) == ["hostname"]
    # The restore wrote only beneath the restore key's root.
    assert digest(lab.client_root) == client


def test_the_pull_key_runs_no_shell_writes_nothing_and_reads_nothing_outside(lab, second_pull):
    sshd, key = lab.sshd, lab.keys["pull"]
    client = digest(lab.client_root)
    shell = subprocess.run(sshd.ssh_argv(key, "id"), capture_output=True, text=True, check=False)
    assert shell.returncode != 0 and "uid=" not in shell.stdout
    assert "does not run rsync" in shell.stderr

    planted = os.path.join(lab.work, "planted")
    write(os.path.join(planted, "srv/data/planted.txt"), "written by the pull key\n")
    push = subprocess.run(["rsync", "-a", "-e", sshd.rsync_shell(key), planted + "/", "root@127.0.0.1:/"],
                          capture_output=True, text=True, check=False)
    assert push.returncode != 0 and "read-only" in push.stderr, push.stderr
    assert digest(lab.client_root) == client

    # / on the client is its tree: /etc there is the tree's etc, not the host's.
    out = os.path.join(lab.work, "pulled-etc")
    run(["rsync", "-a", "-e", sshd.rsync_shell(key), "root@127.0.0.1:/etc/", out + "/"])
    assert sorted(os.listdir(out)) == sorted(os.listdir(os.path.join(lab.client_root, "etc")))
    secret = "the canary's secret"
    for number, source in enumerate(("/../", "../", "/srv/../../", "/srv/data/canary-link/", "/srv/data/canary-link")):
        out = os.path.join(lab.work, "outside-%d" % number)
        os.makedirs(out)
        escape = subprocess.run(["rsync", "-a", "-e", sshd.rsync_shell(key), "root@127.0.0.1:" + source, out + "/"],
                                capture_output=True, text=True, check=False)
        copied = digest(out)
        assert escape.returncode != 0 or copied == {"canary-link": digest(os.path.join(lab.client_root, "srv/data"))[
            "canary-link"]}, (source, escape.stderr, copied)
        assert not any(secret in read_text(os.path.join(out, name))
                       for name, found in copied.items() if found[0] == stat.S_IFREG), source
    # Following links (-L, --copy-unsafe-links) is refused by rrsync confined to a directory.
    out = os.path.join(lab.work, "outside-links")
    os.makedirs(out)
    for option in ("-L", "--copy-unsafe-links"):
        follow = subprocess.run(["rsync", "-a", option, "-e", sshd.rsync_shell(key),
                                 "root@127.0.0.1:/srv/data/", out + "/"], capture_output=True, text=True, check=False)
        assert follow.returncode != 0 and "disabled" in follow.stderr, (option, follow.stderr)
        assert os.listdir(out) == [], option
    shutil.rmtree(planted)


def test_a_changed_host_key_is_refused_naming_both_fingerprints(lab, pending_change):
    before = entries(lab.base_dir)
    pinned = lab.sshd.fingerprint
    # The controller now gathers another key: refused before ssh runs.
    other = make_key(lab.work, "other_host_key")
    gathered = lab.pull(host_keys=[other.public])
    assert gathered.failed and pinned in gathered.msg and other.fingerprint in gathered.msg, gathered.msg
    assert "differ from the ones pinned on this server" in gathered.msg, gathered.msg
    # Another host answers at the client's address with its own key, the controller gathered the old one.
    impostor_key = make_key(lab.work, "impostor_host_key")
    with running_sshd(os.path.join(lab.work, "impostor"), host_key=impostor_key) as impostor:
        impostor.authorize(lab.keys["pull"], 'restrict,command="/usr/bin/rrsync -ro %s"' % lab.client_root)
        answered = lab.pull(port=impostor.port)
    assert answered.failed, answered.result
    assert pinned in answered.msg and impostor_key.fingerprint in answered.msg, answered.msg
    assert "presented a host key that is not the one pinned" in answered.msg, answered.msg
    assert lab.numbers() == [1, 2]
    assert entries(lab.base_dir) == before


@pytest.mark.parametrize("key, says", [
    ("plain", "is not restricted to rrsync"),  # no forced command: a shell
    ("writer", "can write"),  # rrsync -wo: the restore's kind of key
])
def test_a_key_not_restricted_to_a_read_only_rrsync_is_refused(lab, pending_change, key, says):
    before, client = entries(lab.base_dir), digest(lab.client_root)
    # The plain key opens a shell on the host: were it not refused, its pull would be of the client's tree
    # by its real path, not of the host's /.
    source = lab.client_root if key == "plain" else "/"
    refused = lab.pull(key=key, source=source)
    assert refused.failed and says in refused.msg, refused.msg
    assert "nothing was copied and no snapshot was taken" in refused.msg
    assert lab.numbers() == [1, 2]
    assert entries(lab.base_dir) == before
    assert digest(lab.client_root) == client
    # Check mode runs the same checks.
    assert lab.pull(key=key, source=source, check=True).failed


def test_an_unreachable_client_fails_clearly_and_keeps_every_snapshot(lab, pending_change):
    before = entries(lab.base_dir)
    snapshots = {number: digest(lab.snapshot(number)) for number in lab.numbers()}
    port = free_port()
    unreachable = lab.pull(port=port)
    assert unreachable.failed
    assert "cannot reach root@127.0.0.1:%d" % port in unreachable.msg and "Connection refused" in unreachable.msg
    assert "nothing was changed" in unreachable.msg
    assert entries(lab.base_dir) == before
    assert {number: digest(lab.snapshot(number)) for number in lab.numbers()} == snapshots
