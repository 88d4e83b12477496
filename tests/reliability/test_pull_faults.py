"""Faults of a pull over SSH (snapper_cache with `remote`), against real
sshds on 127.0.0.1 (tests/lib/sshd.py), each client's `/` being a tree in
the sandbox through `restrict,command="rrsync -ro TREE"`, as in
tests/system/test_pull.py: the pull SIGKILLed while rsync copies, the
server's volume (two clients' caches on one small btrfs) filling up, and one
client of several that cannot be reached. After each: no snapshot of the
failed run, every snapshot taken before intact (contents compared), nothing
of the pull left running on either side, the next run converges and the
one after changes nothing; the canary outside every target is unchanged."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import threading
import time

from conftest import loop_filesystem, make_small_tree, run, tree_digest, write_random
from module_run import run_module
from sshd import make_key, running_sshd

MIB = 1 << 20
# The client's mount table as the controller reads it: one filesystem, its root.
MOUNTINFO = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
# How long a killed pull's processes may take to go, on either side.
GONE_TIMEOUT = 15


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def snapshot_digest(path):
    # A snapshot of the cache holds .snapshots as an empty directory: snapper's own subvolume.
    return tree_digest(path, skip={".snapshots"})


# --- processes ------------------------------------------------------------------


def argv_of(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return [os.fsdecode(word) for word in handle.read().split(b"\0") if word]
    except OSError:
        return None


def running(pid):
    """pid is a process that has not exited (a zombie has)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid):
    """PIDs of the processes below pid (from /proc/PID/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir("/proc/%d/task" % parent)
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError), open("/proc/%d/task/%s/children" % (parent, task)) as handle:
                children = [int(word) for word in handle.read().split()]
                found += children
                todo += children
    return found


def rsync_servers(sshd):
    """{pid: argv} of the rsync servers (rrsync's `rsync --server`) the client's sshd runs now."""
    found = {}
    for pid in descendants(sshd.pid):
        argv = argv_of(pid)
        if argv and os.path.basename(argv[0]) == "rsync" and "--server" in argv:
            found[pid] = argv
    return found


def pull_processes(client, cache, seen=None):
    """What of a pull still runs: below the client's sshd (its sessions), on the client
    rrsync and rsync --server (their argv or working directory name the client's tree; they
    may outlive their session, away from sshd), on the server ssh and rsync (their argv name
    the client's key or the cache), and any of the processes seen ({pid: argv}) not yet exited."""
    left = {pid: argv_of(pid) for pid in descendants(client.sshd.pid)}
    named = (client.root, client.key.path, cache.base_dir)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            pid = int(entry)
            argv = argv_of(pid) or []
            with contextlib.suppress(OSError):
                argv += ["cwd=" + os.readlink("/proc/%d/cwd" % pid)]
            if any(name in word for word in argv for name in named):
                left[pid] = argv
    left.update({pid: argv for pid, argv in (seen or {}).items() if running(pid)})
    return {pid: argv for pid, argv in left.items() if argv is not None}


def wait_gone(find):
    """Waits up to GONE_TIMEOUT for find() to come back empty; returns what it last found."""
    deadline = time.monotonic() + GONE_TIMEOUT
    left = find()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = find()
    return left


class RsyncServerWatch(threading.Thread):
    """Records the rsync servers a client's sshd runs while a module run goes on."""

    def __init__(self, sshd):
        super().__init__(daemon=True)
        self.sshd = sshd
        self.seen = {}
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.seen.update(rsync_servers(self.sshd))
            time.sleep(0.002)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


# --- clients, caches and the server's volume ---------------------------------------


class Client:
    """A client: its tree in the sandbox, the server's key for it, and an sshd of
    its own that lets that key run `rrsync -ro TREE` only."""

    def __init__(self, work, name, canary, rng):
        self.work = work
        self.name = name
        self.root = os.path.join(work, "client-" + name)
        self.key = None
        self.sshd = None
        self.host_key = None
        self.port = None
        self.starts = 0
        self.stack = contextlib.ExitStack()
        write(os.path.join(self.root, "etc/os-release"), 'NAME="Pull Fault Client %s"\nID=pullfault\n' % name)
        write(os.path.join(self.root, "etc/hostname"), "client-%s\n" % name)
        write(os.path.join(self.root, "lib/modules/6.1.0-pullfault/modules.dep"), "")
        make_small_tree(os.path.join(self.root, "srv"), 40, rng)
        write_random(os.path.join(self.root, "srv/data/blob"), 256 << 10, rng)
        # Copied as a link, never followed: the canary must neither change nor be copied.
        os.symlink(canary.path("data/home/alice"), os.path.join(self.root, "srv/data/canary-link"))

    def start(self, key):
        """Starts the client's sshd (again on the same port, with the same host key)."""
        self.key = key
        self.starts += 1
        sshd = self.stack.enter_context(running_sshd(
            os.path.join(self.work, "sshd-%s-%d" % (self.name, self.starts)), host_key=self.host_key,
            port=self.port))
        sshd.authorize(key, 'restrict,command="/usr/bin/rrsync -ro %s"' % self.root)
        self.sshd, self.host_key, self.port = sshd, sshd.host_key, sshd.port

    def stop(self):
        """Stops the client's sshd, by its PID, and every connection it serves."""
        self.stack.close()
        self.sshd = None

    def digest(self):
        return tree_digest(self.root)


class Cache:
    """One client's cache on the server's volume, with its own snapper config."""

    def __init__(self, work, volume, client, config):
        self.work = work
        self.client = client
        self.base_dir = os.path.join(volume, client.name)
        self.config = config
        os.makedirs(self.base_dir)

    def params(self):
        client = self.client
        remote = {"host": "127.0.0.1", "port": client.port, "user": "root", "identity_file": client.key.path,
                  "host_keys": [client.host_key.public], "mountinfo": MOUNTINFO, "connect_timeout": 5}
        return {"base_dir": self.base_dir, "snapper_config": self.config, "keep": 5, "lock_timeout": 10,
                "remote": remote}

    def pull(self, fault=None):
        return run_module(self.work, "snapper_cache", self.params(), fault=fault)

    @property
    def snapshots_dir(self):
        return os.path.join(self.base_dir, ".rootfs_cache/.snapshots")

    def numbers(self):
        """The snapshot directories on disk; anything else in .snapshots (a half-made one) is named too."""
        return sorted(int(name) if name.isdigit() else name for name in os.listdir(self.snapshots_dir))

    def snapshot(self, number):
        return os.path.join(self.snapshots_dir, str(number), "snapshot")

    def kept(self):
        """{number: digest} of every snapshot."""
        return {number: snapshot_digest(self.snapshot(number)) for number in self.numbers()}

    def meta(self):
        with open(os.path.join(self.base_dir, ".backup_meta")) as handle:
            return handle.read()

    def pending(self):
        return os.path.lexists(os.path.join(self.base_dir, ".liveclone-pending"))


def converges(cache, number):
    """The next pull succeeds, changed, taking snapshot `number`, equal to the client's tree; the
    one after changes nothing. Returns the first's result."""
    first = cache.pull()
    assert not first.failed, "the pull after the fault failed: %s" % first.msg
    assert first.result["changed"] and first.result["snapshot_created"]["name"] == str(number), first.result
    assert snapshot_digest(cache.snapshot(number)) == cache.client.digest(), "the new snapshot is not the client"
    assert not cache.pending(), "the marker of an interrupted copy is still there"
    second = cache.pull()
    assert not second.failed and not second.result["changed"], (
        "not converged: a further pull changed %s" % (second.result or {}).get("operations", second.msg))
    assert second.result["snapshot_created"] is None
    return first.result


def subvolumes(volume):
    """The paths of the btrfs subvolumes on the volume."""
    listing = run(["btrfs", "subvolume", "list", volume]).stdout
    return sorted(line.split(" path ", 1)[1] for line in listing.splitlines())


def no_traceback(outcome):
    assert "Traceback" not in outcome.output, outcome.output[-3000:]


@contextlib.contextmanager
def pull_lab(work, canary, tag, size, names):
    """A btrfs backup volume of size bytes in work and, for each of names, a
    client (a tree, a key, an sshd) and its cache on the volume, pulled once
    (snapshot 1). Yields the volume's mount point and {name: Cache}. After the
    test, nothing of a pull may still run; then the caches are removed (their
    snapper configs with them), the sshds stopped, the volume unmounted."""
    rng = random.Random(tag)
    with loop_filesystem(work, "server-" + tag, size, "btrfs") as volume, contextlib.ExitStack() as stack:
        caches = {}
        for name in names:
            client = Client(work, name, canary, rng)
            stack.callback(client.stop)
            client.start(make_key(work, "pull-" + name))
            caches[name] = Cache(work, volume, client, "lc-pullfault-%s-%s" % (tag, name))
            stack.callback(run_module, work, "snapper_cache", {"base_dir": caches[name].base_dir,
                                                               "snapper_config": caches[name].config,
                                                               "state": "absent"})
        for cache in caches.values():
            first = cache.pull()
            assert not first.failed, first.msg
            assert cache.numbers() == [1]
            assert snapshot_digest(cache.snapshot(1)) == cache.client.digest()
        yield volume, caches
        for cache in caches.values():
            if cache.client.sshd:
                left = wait_gone(lambda cache=cache: pull_processes(cache.client, cache))
                assert not left, "still running after the test: %s" % left


# --- 1. SIGKILL while rsync copies -----------------------------------------------

BIG_FILES, BIG_SIZE = 4, 16 * MIB
# 8 MiB into the first of 64 MiB of new files: the remote rsync has most of its sending ahead of it
# (far more than the socket and SSH channel buffers hold).
KILLED_AT = 8 * MIB


def test_a_pull_killed_while_rsync_copies_converges(work, canary, tally):
    with pull_lab(work, canary, "kill", 1 << 30, ["a"]) as (volume, caches):
        cache = caches["a"]
        client = cache.client
        rng = random.Random("pull killed")
        for index in range(BIG_FILES):
            write_random(os.path.join(client.root, "srv/big/part%d" % index), BIG_SIZE, rng)
        kept, meta = cache.kept(), cache.meta()
        # rsync's temporary copy of the first large file, in the cache: the pull's receiver writing it.
        fault = {"on": "spawn", "tool": "rsync", "moment": "during", "without": ["--dry-run"],
                 "when_larger": [os.path.join(cache.base_dir, ".rootfs_cache/srv/big/.part*"), KILLED_AT]}

        with RsyncServerWatch(client.sshd) as watch:
            outcome = cache.pull(fault=fault)
        assert outcome.killed, "the run was not killed (exit %s): %s" % (outcome.returncode, outcome.output[-2000:])
        assert outcome.marker and outcome.marker["fired"], "the fault never fired"
        assert outcome.marker["tool_running"], "rsync had already exited: the fault missed its moment"
        senders = {pid: argv for pid, argv in watch.seen.items() if "--sender" in argv}
        assert senders, "no rsync --server --sender ran on the client during the killed pull: %s" % watch.seen
        tally["faults injected"] += 1

        # The kill came mid-copy: the first large file half there (rsync's temporary copy), none
        # of the later ones, so the client's rsync had not sent them yet and was still running.
        copy = os.path.join(cache.base_dir, ".rootfs_cache/srv/big")
        partial = os.listdir(copy)
        assert len(partial) == 1 and partial[0].startswith(".part0."), partial
        assert KILLED_AT < os.path.getsize(os.path.join(copy, partial[0])) < BIG_SIZE
        # Nothing of the pull runs any more: not the sessions, rrsync or rsync on the client, nor ssh or
        # rsync on the server.
        left = wait_gone(lambda: pull_processes(client, cache, senders))
        assert not left, "still running %d s after the kill: %s" % (GONE_TIMEOUT, left)
        assert not client.sshd.children()
        # What the killed run left in TMPDIR: its ssh directory, the client's public host key only.
        tmp_left = sorted(os.listdir(os.path.join(work, "tmp")))
        for name in tmp_left:
            assert name.startswith("liveclone-ssh."), tmp_left
            assert tree_digest(os.path.join(work, "tmp", name)).keys() == {"known_hosts", "empty"}
            with open(os.path.join(work, "tmp", name, "known_hosts")) as handle:
                assert handle.read().split() == ["liveclone-client"] + client.host_key.public.split()[:2]

        # No snapshot of the killed run; the earlier one and .backup_meta as they were; the
        # marker of the interrupted copy is there for the next run.
        assert cache.numbers() == [1]
        assert cache.kept() == kept, "snapshot 1 changed by the killed pull"
        assert cache.meta() == meta, ".backup_meta changed although no pull completed"
        assert cache.pending(), "the killed pull left no marker of its interrupted copy"

        result = converges(cache, 2)
        assert result["snapshots"][-1]["name"] == "2"
        assert cache.numbers() == [1, 2] and snapshot_digest(cache.snapshot(1)) == kept[1]
        assert 'META_SNAPSHOT="2"' in cache.meta()
        assert not wait_gone(lambda: pull_processes(client, cache))
        assert sorted(os.listdir(os.path.join(work, "tmp"))) == tmp_left, "a run that ended left temporary files"
    tally["faults survived"] += 1


# --- 2. The server's volume fills up ------------------------------------------------


def test_a_full_server_volume_fails_clearly_and_keeps_every_clients_snapshots(work, canary):
    with pull_lab(work, canary, "full", 160 * MIB, ["a", "b"]) as (volume, caches):
        full, other = caches["a"], caches["b"]
        kept = {name: cache.kept() for name, cache in caches.items()}
        other_before = tree_digest(other.base_dir)
        meta = full.meta()
        layout = subvolumes(volume)
        old_files = {path: found for path, found in full.client.digest().items() if found[0] == "file"}
        # Three files of 40% of the free space each: two fit, the third does not.
        info = os.statvfs(volume)
        part = info.f_bavail * info.f_frsize * 2 // 5
        rng = random.Random("server full")
        for index in range(3):
            write_random(os.path.join(full.client.root, "srv/grown/part%d" % index), part, rng)

        outcome = full.pull()
        assert outcome.failed, "a pull larger than the server's volume succeeded"
        no_traceback(outcome)
        assert "No space left on device" in outcome.msg and full.base_dir in outcome.msg, outcome.msg
        assert "free space on it" in outcome.msg and "grow the volume" in outcome.msg, outcome.msg
        assert "no snapshot was taken" in outcome.msg.lower(), outcome.msg

        # Both clients' snapshots intact, no partial snapshot, the other client's cache untouched.
        for name, cache in caches.items():
            assert cache.numbers() == [1], (name, cache.numbers())
            assert cache.kept() == kept[name], "client %s's snapshot 1 changed" % name
        assert subvolumes(volume) == layout, "a subvolume (a partial snapshot) was left"
        assert tree_digest(other.base_dir) == other_before, "the other client's cache changed"
        assert full.meta() == meta, ".backup_meta changed by a failed pull"
        # What the copy left in the cache is whole files, the old ones or the new ones.
        new_files = {path: found for path, found in full.client.digest().items() if found[0] == "file"}
        for path, found in tree_digest(os.path.join(full.base_dir, ".rootfs_cache"), skip={".snapshots"}).items():
            if found[0] == "file":
                assert found in (new_files.get(path), old_files.get(path)), (
                    "%s in the cache is neither the old nor the new file: a partial file" % path)

        # Room again: the client shrinks back, the next pull finishes the copy.
        shutil.rmtree(os.path.join(full.client.root, "srv/grown"))
        converges(full, 2)
        assert snapshot_digest(full.snapshot(1)) == kept["a"][1]
        assert other.kept() == kept["b"] and tree_digest(other.base_dir) == other_before


# --- 3. One client of several cannot be reached -------------------------------------


def test_an_unreachable_client_fails_alone_and_keeps_its_snapshot(work, canary):
    with pull_lab(work, canary, "down", 256 * MIB, ["a", "b"]) as (volume, caches):
        up, down = caches["a"], caches["b"]
        for cache in caches.values():
            write(os.path.join(cache.client.root, "srv/data/since.txt"), "changed since the first pull\n")
        kept = {name: cache.kept() for name, cache in caches.items()}
        down_before = tree_digest(down.base_dir)
        port = down.client.port
        down.client.stop()

        outcome = down.pull()
        assert outcome.failed, outcome.result
        no_traceback(outcome)
        assert "cannot reach root@127.0.0.1:%d" % port in outcome.msg, outcome.msg
        assert "Connection refused" in outcome.msg, outcome.msg
        assert "nothing was copied and no snapshot was taken" in outcome.msg, outcome.msg
        assert down.numbers() == [1] and down.kept() == kept["b"]
        assert tree_digest(down.base_dir) == down_before, "the unreachable client's cache changed"

        pulled = up.pull()
        assert not pulled.failed, pulled.msg
        assert pulled.result["changed"] and pulled.result["snapshot_created"]["name"] == "2"
        assert snapshot_digest(up.snapshot(2)) == up.client.digest()
        assert up.kept()[1] == kept["a"][1]
        assert down.kept() == kept["b"] and tree_digest(down.base_dir) == down_before

        # Back again (the same address and host key): its next pull takes its change.
        down.client.start(down.client.key)
        assert down.client.port == port
        again = down.pull()
        assert not again.failed, again.msg
        assert again.result["changed"] and again.result["snapshot_created"]["name"] == "2"
        assert snapshot_digest(down.snapshot(2)) == down.client.digest()
        assert snapshot_digest(down.snapshot(1)) == kept["b"][1]
