"""snapper_cache's checks of a pull's key, with nothing mocked, against a
real sshd on 127.0.0.1 (tests/lib/sshd.py) that lets keys forward TCP ports
unless their options forbid it, as OpenSSH does by default (test_pull.py's
sshd forbids it for every key).

- A key whose forced command is a read-only rrsync but which lacks
  `restrict` runs no shell and cannot push, yet anyone holding it could
  reach the client's network through it: the pull is refused, saying to add
  `restrict`, before anything is copied.
- A key whose file name holds `%` (a legal name, which ssh reads as tokens)
  is used as named: the pull copies the client."""

from __future__ import annotations

import os

import pytest
from module_run import run_module
from sshd import make_key, running_sshd

MOUNTINFO = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def tree(root):
    """{relative path: content} of the regular files under root."""
    found = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, errors="replace") as handle:
                found[os.path.relpath(path, root)] = handle.read()
    return found


class Client:
    """The client's tree, its sshd and the server's keys for it."""

    def __init__(self, work, root, sshd, keys):
        self.work, self.root, self.sshd, self.keys = work, root, sshd, keys

    def pull(self, key, name, check=False):
        base_dir = os.path.join(self.work, "server", name)
        os.makedirs(base_dir)
        remote = {"host": "127.0.0.1", "port": self.sshd.port, "user": "root",
                  "identity_file": self.keys[key].path, "host_keys": [self.sshd.host_key_line],
                  "mountinfo": MOUNTINFO, "connect_timeout": 5}
        params = {"base_dir": base_dir, "snapper_config": "liveclone-probetest", "versioning": "none",
                  "lock_timeout": 10, "remote": remote}
        return run_module(self.work, "snapper_cache", params, check=check), base_dir


@pytest.fixture(scope="module")
def client(sandbox):
    work = os.path.join(sandbox, "ssh-probe")
    root = os.path.join(work, "client-root")
    write(os.path.join(root, "etc/os-release"), 'NAME="Liveclone Probe Client"\nID=probeclient\n')
    write(os.path.join(root, "etc/hostname"), "probe1\n")
    write(os.path.join(root, "srv/data/file.txt"), "pulled through a key named with %\n")
    keys = {"unrestricted": make_key(work, "unrestricted")}
    # ssh would read %d as the home directory and %h as the host.
    os.makedirs(os.path.join(work, "keys%d"))
    keys["percent"] = make_key(os.path.join(work, "keys%d"), "pull%h")
    with running_sshd(os.path.join(work, "sshd"), forwarding=True) as sshd:
        sshd.authorize(keys["unrestricted"], 'command="/usr/bin/rrsync -ro %s"' % root)
        sshd.authorize(keys["percent"], 'restrict,command="/usr/bin/rrsync -ro %s"' % root)
        yield Client(work, root, sshd, keys)
        assert not sshd.children(), "sshd still serves a connection"


def test_a_forced_rrsync_without_restrict_is_refused_for_its_port_forwarding(client):
    refused, base_dir = client.pull("unrestricted", "unrestricted")
    assert refused.failed, refused.result
    assert "may forward ports" in refused.msg and "add restrict" in refused.msg, refused.msg
    assert "nothing was copied and no snapshot was taken" in refused.msg, refused.msg
    assert tree(base_dir) == {}
    # The client's sshd was asked for the forward, and tried it: the key allows it.
    with open(client.sshd.log) as handle:
        assert "connect_to 127.0.0.1 port 1: failed" in handle.read()
    # Check mode runs the same checks.
    again, _base_dir = client.pull("unrestricted", "unrestricted-check", check=True)
    assert again.failed and "add restrict" in again.msg, again.msg


def test_a_key_whose_name_holds_percent_pulls_the_client(client):
    pulled, base_dir = client.pull("percent", "percent")
    assert not pulled.failed, pulled.msg
    assert pulled.result["changed"]
    copied = {path.split(os.sep, 1)[1]: text for path, text in tree(base_dir).items()
              if path.startswith(".rootfs_cache" + os.sep)}
    # Every file of the client, beside the module's own record of the copy.
    assert tree(client.root).items() <= copied.items(), copied
