"""Fixtures of the system tests: the collection as users install it, run the
way AWX runs it (ansible-runner), on localhost in a sandbox. scripts/test.sh
runs this tier inside a private mount namespace, so every mount made here,
including the copies covering /etc/snapper and /etc/fstab, vanishes with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTION_DIR = REPO
# The lab (lab.py, live_console.py): VMs and serial consoles for the e2e tests;
# tests/lib: the sandbox shared with the reliability tier.
sys.path.insert(0, os.path.join(REPO, "lab"))
sys.path.insert(0, os.path.join(REPO, "tests/lib"))
from sandbox import mounted_under, require_root_namespace  # noqa: E402  (after the path insert)
from sandbox import sandbox as liveclone_sandbox  # noqa: E402

BUILD_TREE = os.path.join(REPO, "tests/integration/targets/setup_debian_tree/files/build_tree.sh")


def run(argv, **kwargs):
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)


def ansible_module(module, host=None, port=None, key=None, **arguments):
    """The result of one module run (ad hoc), on this machine or over SSH on host:port as root.
    Fails the test with the module's message when the module fails."""
    if host:
        inventory = ["-i", "%s," % host, "-e", json.dumps({
            "ansible_port": port, "ansible_user": "root", "ansible_ssh_private_key_file": key,
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"})]
        pattern = host
    else:
        inventory = ["-i", "localhost,", "-c", "local", "-e", "ansible_python_interpreter=%s" % sys.executable]
        pattern = "localhost"
    argv = ["ansible", pattern, *inventory, "-m", module, "-a", json.dumps(arguments)]
    env = dict(os.environ, ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
               ANSIBLE_PIPELINING="1")
    out = subprocess.run(argv, text=True, capture_output=True, env=env, check=False)
    try:
        result = json.loads(out.stdout)["plays"][0]["tasks"][0]["hosts"][pattern]
    except (ValueError, KeyError, IndexError):
        pytest.fail("%s gave no result (exit %d):\n%s\n%s" % (module, out.returncode, out.stdout, out.stderr))
    if result.get("failed") or result.get("unreachable"):
        pytest.fail("%s failed: %s" % (module, result.get("msg")))
    return result


@pytest.fixture(scope="session")
def sandbox():
    """A work directory, with /etc/snapper, /etc/default/snapper and /etc/fstab covered by copies."""
    problem = require_root_namespace("system")
    if problem:
        pytest.fail(problem)
    with liveclone_sandbox("liveclone-system-") as work:
        yield work


@pytest.fixture(scope="session")
def debian_tree():
    """The cached debootstrap'd Debian 12 tree with a kernel and live-boot."""
    return run(["bash", BUILD_TREE]).stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def lab_image():
    """The lab's cached Debian 12 image directory (built the first time, about 3 minutes)."""
    return run([sys.executable, os.path.join(REPO, "lab/lab.py"), "image"]).stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def collection_tarball(tmp_path_factory):
    """The collection built with ansible-galaxy, as it would be published."""
    out = tmp_path_factory.mktemp("build")
    run(["ansible-galaxy", "collection", "build", "--output-path", str(out), COLLECTION_DIR])
    (tarball,) = out.glob("liveclone-core-*.tar.gz")
    return tarball


@pytest.fixture(scope="session")
def installed_collections(tmp_path_factory, collection_tarball):
    """A collections path holding the installed tarball. Its dependencies come
    from the ansible package in the virtual environment (Galaxy is not
    reachable), hence --no-deps."""
    path = tmp_path_factory.mktemp("collections")
    # Only the new path: the staged copy must not count as "already installed".
    run(["ansible-galaxy", "collection", "install", "--no-deps", "-p", str(path), str(collection_tarball)],
        env=dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(path)))
    return path


def tarball_members(tarball):
    with tarfile.open(tarball) as archive:
        return archive.getnames()


def release_backup_disks(work, devices):
    """Unmount each host's backup volume (work/HOST_backup) and detach its loop device, whatever happened."""
    for host, device in devices.items():
        base = os.path.join(work, "%s_backup" % host)
        if mounted_under(base):
            subprocess.run(["umount", base], check=False)
        subprocess.run(["losetup", "--detach", device], check=False)
