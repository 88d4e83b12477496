"""A backup server against a compromised client, for real: pulls over SSH
from sshds on 127.0.0.1 (tests/lib/sshd.py, as in test_pull_faults), each
client's `/` a tree in the sandbox behind `rrsync -ro`. What the client
sends must never act on the server: its setuid-root binary and a device node
of the server's own disk are pulled, then an unprivileged user of the server
tries them; a client that stalls mid-transfer ends its pull within the limit,
the lock released, and the next pull converges; a restore leaves out what
the backup left out (the record in the snapshot), with or without the
client's mount table; a mount point whose name rsync would read as a
wildcard is left out, and only it. The canary outside every target is
unchanged after each case."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import stat
import subprocess
import threading
import time

import pytest
from conftest import loop_filesystem, run, tree_digest, write_random
from module_run import run_module
from sshd import make_key
from test_pull_faults import MIB, RsyncServerWatch, converges, pull_lab, pull_processes, wait_gone

# An unprivileged user of the server: nobody.
NOBODY = 65534
# The client's mount table as the controller read it: / and a /data filesystem the pull leaves out.
MOUNTINFO_WITH_DATA = ("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
                       "23 22 8:17 / /data rw,relatime shared:2 - ext4 /dev/vdb1 rw\n")


def as_nobody(*argv):
    """argv run as an unprivileged user of the server, no groups, through a shell: setpriv's own
    exec still passes a root-only directory (measured), a process of the user's does not.
    Returns the completed process."""
    return subprocess.run(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups", "--",
                           "sh", "-c", 'exec "$0" "$@"'] + list(argv),
                          capture_output=True, text=True, check=False, timeout=60)


@contextlib.contextmanager
def traversable(path):
    """Every directory from / down to path made traversable by others (0711) for the test, as
    a server's /srv is: the cache's own modes, not the sandbox's, must keep the user out."""
    changed = []
    current = path
    while current != "/":
        mode = stat.S_IMODE(os.stat(current).st_mode)
        if mode & 0o011 != 0o011:
            changed.append((current, mode))
            os.chmod(current, mode | 0o011)
        current = os.path.dirname(current)
    try:
        yield
    finally:
        for directory, mode in changed:
            os.chmod(directory, mode)


def warnings_of(result):
    return " ".join(str(warning) for warning in result.get("warnings", []))


# --- 1. setuid binaries and device nodes ---------------------------------------------


def test_a_clients_setuid_binary_and_device_node_do_nothing_on_the_server(work, canary, tally):
    with pull_lab(work, canary, "setuid", 1 << 30, ["evil"]) as (volume, caches):
        cache = caches["evil"]
        client = cache.client
        # The client plants a setuid-root copy of id, and a 0666 node of the server's backup disk.
        planted = os.path.join(client.root, "srv/bin/rootid")
        os.makedirs(os.path.dirname(planted))
        shutil.copy("/usr/bin/id", planted)
        os.chown(planted, 0, 0)
        os.chmod(planted, 0o4755)
        disk = run(["findmnt", "-n", "-o", "SOURCE", volume]).stdout.strip()
        node = os.path.join(client.root, "srv/dev/backup-disk")
        os.makedirs(os.path.dirname(node))
        os.mknod(node, 0o666 | stat.S_IFBLK, os.stat(disk).st_rdev)
        os.chmod(node, 0o666)
        # As the role leaves it before the module's first run on an older release: open to all.
        os.chmod(cache.base_dir, 0o755)

        pulled = cache.pull()
        assert not pulled.failed, pulled.msg
        assert pulled.result["snapshot_created"]["name"] == "2"
        assert "made %s root's, mode 0700 (it was uid 0's, mode 0755)" % cache.base_dir in pulled.result["operations"]
        assert "mounted without nosuid,nodev" in warnings_of(pulled.result), pulled.result.get("warnings")
        # The copies are faithful (a restore must give the client its own files back) ...
        copies = [os.path.join(cache.base_dir, ".rootfs_cache/srv"), os.path.join(cache.snapshot(2), "srv")]
        for copy in copies:
            assert stat.S_IMODE(os.lstat(os.path.join(copy, "bin/rootid")).st_mode) == 0o4755
            assert stat.S_ISBLK(os.lstat(os.path.join(copy, "dev/backup-disk")).st_mode)
        assert stat.S_IMODE(os.stat(cache.base_dir).st_mode) == 0o700 and os.stat(cache.base_dir).st_uid == 0

        # ... and do nothing for a user of the server: no root from the binary, no read of the disk.
        with traversable(volume):
            assert as_nobody("id", "-u").stdout.strip() == str(NOBODY), "setpriv did not drop to nobody"
            assert as_nobody("ls", volume).returncode == 0, "the test's own path is not traversable"
            for copy in copies:
                ran = as_nobody(os.path.join(copy, "bin/rootid"), "-u")
                assert ran.returncode != 0 and ran.stdout.strip() != "0", (
                    "an unprivileged user ran the client's setuid copy: %s %s" % (ran.stdout, ran.stderr))
                assert "Permission denied" in ran.stderr, ran.stderr
                read = as_nobody("dd", "if=" + os.path.join(copy, "dev/backup-disk"), "of=/dev/null", "count=1")
                assert read.returncode != 0 and "Permission denied" in read.stderr, (
                    "an unprivileged user opened the client's device node: %s" % read.stderr)
        # The next pull changes nothing: the mode stays as the module made it.
        again = cache.pull()
        assert not again.failed and not again.result["changed"], again.result
    tally["faults survived"] += 1


# --- 2. a client that stalls ---------------------------------------------------------


def senders(watch):
    return {pid: argv for pid, argv in list(watch.seen.items()) if "--sender" in argv}


def stall_mid_transfer(cache, limits, stall_after=8 * MIB):
    """Pull cache with the limits while the client's rsync is stopped (SIGSTOP) once the
    pull's copy of the first large file passes stall_after. Returns (outcome, seconds from
    the stall to the end of the run, the stopped processes)."""
    client = cache.client
    outcome, stopped = {}, {}
    params = dict(cache.params(), **limits)
    partial_dir = os.path.join(cache.base_dir, ".rootfs_cache/srv/big")
    with RsyncServerWatch(client.sshd) as watch:
        runner = threading.Thread(target=lambda: outcome.update(done=run_module(cache.work, "snapper_cache", params)))
        runner.start()
        deadline = time.monotonic() + 120
        stalled_at = None
        while runner.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                sizes = [os.path.getsize(os.path.join(partial_dir, name)) for name in os.listdir(partial_dir)]
                if stalled_at is None and sizes and max(sizes) > stall_after and senders(watch):
                    for pid in senders(watch):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGSTOP)
                            stopped[pid] = watch.seen[pid]
                    stalled_at = time.monotonic()
            time.sleep(0.01)
        runner.join(timeout=300)
    assert stalled_at is not None, "the client's rsync was never seen sending the large file"
    return outcome["done"], time.monotonic() - stalled_at, stopped


@pytest.mark.parametrize(("limits", "message"), [
    ({"io_timeout": 4, "copy_timeout": 0}, "stalled: rsync read nothing for io_timeout (4 s)"),
    ({"io_timeout": 0, "copy_timeout": 12}, "did not finish within copy_timeout (12 s)"),
], ids=["io_timeout", "copy_timeout"])
def test_a_stalled_client_fails_its_pull_within_the_limit_and_the_next_converges(
        work, canary, tally, limits, message):
    with pull_lab(work, canary, "stall", 1 << 30, ["slow"]) as (volume, caches):
        cache = caches["slow"]
        client = cache.client
        rng = random.Random("stall")
        for index in range(2):
            write_random(os.path.join(client.root, "srv/big/part%d" % index), 32 * MIB, rng)
        kept, meta = cache.kept(), cache.meta()
        stopped = {}
        try:
            outcome, waited, stopped = stall_mid_transfer(cache, limits)
            assert outcome.failed and message in outcome.msg, outcome.msg
            assert "no snapshot was taken" in outcome.msg and "Traceback" not in outcome.output
            # Ended by the limit, not by the test's own timeout: the limit plus coreutils timeout's
            # KILL grace at most.
            limit = limits["io_timeout"] or limits["copy_timeout"]
            assert waited < limit + 40, "the stalled pull took %.0f s after the stall" % waited
            print("stalled client (%s): the pull ended %.1f s after the stall" % (sorted(limits.items()), waited))
        finally:
            # The client's stopped rsync is the test's to end (it runs under the test's sshd).
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert cache.numbers() == [1] and cache.kept() == kept and cache.meta() == meta
        assert not wait_gone(lambda: pull_processes(client, cache, stopped))
        # The lock was released (the next run waits lock_timeout, 10 s, at most) and the copy finishes.
        converges(cache, 2)
    tally["faults survived"] += 1


# --- 3. restores leave out what the backup left out -------------------------------------


def test_a_restore_keeps_what_the_pull_left_out_with_or_without_the_clients_mount_table(work, canary, tally):
    with pull_lab(work, canary, "restore", 1 << 30, ["data"]) as (volume, caches):
        cache = caches["data"]
        client = cache.client
        # /data is another filesystem of the client's (its mount table says so): the pull leaves it out.
        data_file = os.path.join(client.root, "data/db/orders.sqlite")
        os.makedirs(os.path.dirname(data_file))
        with open(data_file, "w") as handle:
            handle.write("the orders, never backed up here\n")
        params = cache.params()
        params["remote"] = dict(params["remote"], mountinfo=MOUNTINFO_WITH_DATA)
        pulled = run_module(work, "snapper_cache", params)
        assert not pulled.failed, pulled.msg
        snapshot = pulled.result["snapshot_created"]["name"]
        assert os.listdir(os.path.join(cache.snapshot(int(snapshot)), "data")) == []
        # The record of what the pull left out, beside the cache: root's alone, named by the snapshot.
        record = os.path.join(cache.base_dir, ".liveclone-records", snapshot + ".json")
        assert stat.S_IMODE(os.stat(record).st_mode) == 0o600
        with open(record) as handle:
            assert '"/data/*"' in handle.read()

        # A restore key confined to the client's root, as the backup_server role adds one.
        restore_key = make_key(work, "restore-data")
        client.sshd.authorize(restore_key, 'restrict,command="/usr/bin/rrsync -wo %s"' % client.root)
        stray = os.path.join(client.root, "srv/stray.txt")
        for mountinfo in (None, MOUNTINFO_WITH_DATA):
            with open(stray, "w") as handle:
                handle.write("made after the backup: a restore with restore_delete_extra deletes it\n")
            remote = dict(params["remote"], identity_file=restore_key.path)
            remote.pop("mountinfo")
            if mountinfo:
                remote["mountinfo"] = mountinfo
            restored = run_module(work, "snapper_cache", dict(
                params, remote=remote, state="restored", restore_snapshot=snapshot, restore_dest="/",
                allow_restore_to_root=True, restore_delete_extra=True))
            assert not restored.failed, restored.msg
            assert not os.path.exists(stray), "restore_delete_extra did not delete what the snapshot lacks"
            with open(data_file) as handle:
                assert handle.read() == "the orders, never backed up here\n", (
                    "the restore (mountinfo %s) deleted what the pull had left out" % bool(mountinfo))
    tally["faults survived"] += 1


# --- 4. a mount point whose name rsync reads as a wildcard ---------------------------------


def test_a_mount_point_named_like_a_pattern_is_left_out_and_only_it(work, canary, tally):
    with loop_filesystem(work, "backup", 1 << 30, "btrfs") as volume:
        source = os.path.join(work, "source")
        for relative in ("etc/os-release", "srv/disk1/kept.txt", "srv/disk[1]/under-the-mount.txt"):
            path = os.path.join(source, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                handle.write(relative + "\n")
        mounted = os.path.join(source, "srv/disk[1]")
        run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mounted])
        base_dir = os.path.join(volume, "cache")
        os.makedirs(base_dir)
        params = {"base_dir": base_dir, "source": source, "snapper_config": "lc-pattern-mount", "keep": 2}
        try:
            with open(os.path.join(mounted, "on-the-tmpfs.txt"), "w") as handle:
                handle.write("another filesystem\n")
            done = run_module(work, "snapper_cache", params)
            assert not done.failed, done.msg
            copy = os.path.join(base_dir, ".rootfs_cache/srv")
            assert tree_digest(os.path.join(copy, "disk1")).keys() == {"kept.txt"}, "disk1 was taken for disk[1]"
            assert os.listdir(os.path.join(copy, "disk[1]")) == [], "the mounted filesystem was copied"
        finally:
            run(["umount", mounted])
            run_module(work, "snapper_cache", dict(params, state="absent"))
    tally["faults survived"] += 1
