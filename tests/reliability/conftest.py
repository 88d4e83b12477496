"""Fixtures of the reliability tier: the modules run on this machine as
their own processes (python -m, an args file, as AnsibleModule allows), on
loop filesystems in a sandbox, inside the private mount namespace that
scripts/test.sh opens. A run may carry a fault (inject/sitecustomize.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import stat
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests/lib"))
from module_run import make_throwaway_root  # noqa: E402
from sandbox import loop_devices_on, mounted_under, require_root_namespace  # noqa: E402  (after the path insert)
from sandbox import sandbox as liveclone_sandbox  # noqa: E402

BUILD_TREE = os.path.join(REPO, "tests/integration/targets/setup_debian_tree/files/build_tree.sh")
TALLY = {"faults injected": 0, "faults survived": 0, "bad inputs tried": 0, "bad inputs rejected cleanly": 0,
         "hostile cases tried": 0, "hostile cases held": 0}


def run(argv, **kwargs):
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)


def tree_digest(root, skip=()):
    """{relative path: (kind, mode, content digest or link target)} of a tree."""
    found = {}
    for directory, dirs, files in os.walk(root):
        relative_dir = os.path.relpath(directory, root)
        dirs[:] = [name for name in dirs if os.path.normpath(os.path.join(relative_dir, name)) not in skip]
        for name in dirs + files:
            path = os.path.join(directory, name)
            relative = os.path.normpath(os.path.join(relative_dir, name))
            if relative in skip:
                continue
            info = os.lstat(path)
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                found[relative] = ("link", mode, os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[relative] = ("dir", mode, None)
            else:
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                        digest.update(block)
                found[relative] = ("file", mode, digest.hexdigest())
    return found


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_of(root):
    """What a refused run must leave unchanged: the tree under root (names,
    kinds, sizes, modes, mtimes), its mounts and its loop devices."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            entries[os.path.relpath(path, root)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return {"entries": entries, "mounts": mounted_under(root), "loops": loop_devices_on(root)}


def write_random(path, size, rng):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(rng.randbytes(size))


def make_small_tree(root, files, rng):
    """A synthetic tree of many small files (1-8 KiB) in 50 directories."""
    names = []
    for index in range(files):
        path = os.path.join(root, "small/d%02d/f%05d" % (index % 50, index))
        write_random(path, rng.randint(1024, 8192), rng)
        names.append(path)
    return names


@contextlib.contextmanager
def loop_filesystem(work, name, size, fstype):
    """A fresh filesystem of fstype in a sparse file of size bytes, mounted
    at work/NAME (a loop device with autoclear); unmounted on the way out."""
    image = os.path.join(work, name + ".img")
    mount_point = os.path.join(work, name)
    with open(image, "wb") as handle:
        handle.truncate(size)
    mkfs = {"btrfs": ["mkfs.btrfs", "-q", "-f"], "ext4": ["mkfs.ext4", "-q", "-F"]}[fstype]
    run(mkfs + [image])
    os.makedirs(mount_point)
    run(["mount", "-o", "loop", image, mount_point])
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", mount_point], check=False)
        if not mounted_under(mount_point):
            os.rmdir(mount_point)
            os.unlink(image)


@pytest.fixture(scope="session")
def sandbox():
    problem = require_root_namespace("reliability")
    if problem:
        pytest.fail(problem)
    with liveclone_sandbox("liveclone-reliability-") as work:
        yield work


class Canary:
    """A tree outside every target, shaped like what hosts hold (a home with
    files, logs, SSH keys, a config), that hostile cases point their planted
    links at. Its digest must be the same after every case."""

    def __init__(self, root):
        self.root = root
        for relative, text in (("data/home/alice/notes.txt", "alice's notes\n"),
                               ("data/home/alice/.bashrc", "# alice\n"),
                               ("data/log/syslog", "a log line\n"),
                               ("data/ssh/ssh_host_ed25519_key", "not a real key\n"),
                               ("data/etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
                               ("data/etc/hostname", "canary\n"),
                               ("data/file.txt", "a file elsewhere\n")):
            path = os.path.join(root, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                handle.write(text)
        os.makedirs(os.path.join(root, "data/empty"))
        self.expected = self.digest()

    def path(self, relative=""):
        """An absolute path in the canary, to plant links to."""
        return os.path.join(self.root, relative)

    def digest(self):
        found = tree_digest(self.root)
        for relative, (kind, _mode, _content) in list(found.items()):
            if kind == "dir":  # times and modes too: a chmod or chown through a link is harm
                info = os.lstat(os.path.join(self.root, relative))
                found[relative] += (info.st_mode, info.st_uid, info.st_gid)
        return found

    def changes(self):
        now = self.digest()
        return sorted(set(now.items()) ^ set(self.expected.items()))


@pytest.fixture(scope="session")
def canary(sandbox):
    return Canary(os.path.join(sandbox, "canary"))


@contextlib.contextmanager
def hostile_case(canary, *watched):
    """One hostile case: counted, and held only when the canary and every
    watched tree (a victim subvolume, a throwaway root) are unchanged."""
    before = [tree_digest(path) for path in watched]
    TALLY["hostile cases tried"] += 1
    yield
    changes = canary.changes()
    assert not changes, "the canary outside the target changed: %s" % changes[:10]
    for path, digest in zip(watched, before):
        assert tree_digest(path) == digest, "%s changed" % path
    TALLY["hostile cases held"] += 1


@pytest.fixture
def throwaway_root(sandbox, request):
    """A scratch directory to run a module chrooted in, where `/` and `//` are
    it (module_run.run_module(..., root=...)); its digest must not change."""
    root = make_throwaway_root(
        os.path.join(sandbox, "root-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]))
    with open(os.path.join(root, "keep.txt"), "w") as handle:
        handle.write("the throwaway root's own file\n")
    yield root
    for target in sorted(mounted_under(root), reverse=True):
        subprocess.run(["umount", "-l", target], check=False)


@pytest.fixture(scope="session")
def debian_tree():
    """The cached debootstrap'd Debian 12 tree with a kernel and live-boot."""
    return run(["bash", BUILD_TREE]).stdout.strip().splitlines()[-1]


@pytest.fixture
def rng(request):
    return random.Random(request.node.nodeid)


@pytest.fixture(scope="session")
def tally():
    return TALLY


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        "reliability: faults injected %(faults injected)d, survived %(faults survived)d; "
        "bad inputs tried %(bad inputs tried)d, rejected cleanly %(bad inputs rejected cleanly)d; "
        "hostile cases tried %(hostile cases tried)d, held %(hostile cases held)d" % TALLY)


@pytest.fixture
def work(sandbox, canary, monkeypatch, request):
    """The test's directory; the module's own temporary files (TMPDIR) go there too, not
    into the host's /tmp. The canary outside every target must be unchanged after the test."""
    path = os.path.join(sandbox, "work-" + request.node.name)
    os.makedirs(os.path.join(path, "tmp"))
    monkeypatch.setenv("TMPDIR", os.path.join(path, "tmp"))
    yield path
    changes = canary.changes()
    assert not changes, "the canary outside every target changed: %s" % changes[:10]
