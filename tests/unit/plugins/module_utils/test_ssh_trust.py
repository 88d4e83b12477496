# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""What ssh is given and what its answers mean, where ssh reads more than a
name: `%` tokens in file names, an IPv6 address's scope, and a key whose
forced command is rrsync but which may still forward ports."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from test_ssh import desired, remote

from ansible_collections.liveclone.core.plugins.module_utils._cache.layout import CacheError
from ansible_collections.liveclone.core.plugins.module_utils._common import ssh as _ssh


def options(argv):
    return [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]


def test_file_names_reach_ssh_with_percent_doubled_and_never_through_i():
    wanted = _ssh.Remote.from_params(remote(identity_file="/etc/liveclone/100%d/id_%h"))
    argv = wanted.ssh_argv("/tmp/liveclone-ssh.%u/known_hosts")
    # -i looks the name up before ssh expands it: with `%%` there, it finds no file.
    assert "-i" not in argv
    assert "IdentityFile=/etc/liveclone/100%%d/id_%%h" in options(argv)
    assert "UserKnownHostsFile=/tmp/liveclone-ssh.%%u/known_hosts" in options(argv)
    assert "'IdentityFile=/etc/liveclone/100%%d/id_%%h'" in wanted.rsync_shell("/usr/bin/ssh", "/tmp/kh")
    # Without `%` nothing changes.
    assert "IdentityFile=/etc/liveclone/id" in options(_ssh.Remote.from_params(remote()).ssh_argv("/tmp/kh"))


@pytest.mark.skipif(not shutil.which("ssh"), reason="needs OpenSSH's client")
def test_ssh_and_rsync_read_back_the_names_as_given():
    """ssh -G prints the configuration as ssh expands it, with no connection."""
    wanted = _ssh.Remote.from_params(remote(host="fe80::1%eth0"))
    argv = wanted.ssh_argv("/tmp/liveclone-ssh.%x/known_hosts") + ["-G", "--", wanted.host]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "userknownhostsfile /tmp/liveclone-ssh.%x/known_hosts\n" in done.stdout
    # The scope is the host's, for ssh (no token there) and for rsync, in its brackets.
    assert "hostname fe80::1%eth0\n" in done.stdout
    assert desired(remote=remote(host="fe80::1%eth0")).source_location == "root@[fe80::1%eth0]:/"


@pytest.mark.parametrize("identity", ["/etc/liveclone/${HOME}/id", "/etc/liveclone/id ${X}"])
def test_an_identity_file_ssh_would_read_as_a_variable_is_refused(identity):
    with pytest.raises(CacheError, match="environment variable"):
        desired(remote=remote(identity_file=identity))


@pytest.mark.parametrize("host", [
    "fe80::1%eth0", "fe80::1%2", "fe80::1%enp0s31f6", "fe80::1%br-0123456789a", "fe80::1%eth0.100", "fe80::1%wg_0",
    "2001:db8::1", "192.0.2.10", "client1.example.org",
])
def test_hosts_ssh_and_rsync_reach(host):
    assert _ssh.check_host(host) is None
    assert desired(remote=remote(host=host)).remote.host == host


@pytest.mark.parametrize("host, says", [
    ("fe80::1%", "not the name or index of a network interface"),
    ("fe80::1%eth 0", "not the name or index of a network interface"),
    ("fe80::1%eth0\n", "not the name or index of a network interface"),
    ("fe80::1%a/b", "not the name or index of a network interface"),
    ("fe80::1%eth0:1", "not the name or index of a network interface"),
    ("fe80::1%.", "not the name or index of a network interface"),
    ("fe80::1%..", "not the name or index of a network interface"),
    ("fe80::1%abcdefghijklmnop", "not the name or index of a network interface"),  # 16: the kernel's limit is 15
    ("fe80::1%eth0]x", "not the name or index of a network interface"),  # would end rsync's [host]
    ("fe80::1%a@b", "not the name or index of a network interface"),  # ssh reads USER@HOST
    ("fe80::1%eth0%1", "not the name or index of a network interface"),
    ("192.0.2.10%eth0", "only an IPv6 address takes"),
    ("client1%eth0", "only an IPv6 address takes"),
    ("", "remote.host is empty"),
])
def test_a_scope_that_names_no_interface_is_refused(host, says):
    assert says in _ssh.check_host(host)
    with pytest.raises(CacheError, match="remote.host"):
        desired(remote=remote(host=host))


PROHIBITED = "channel 0: open failed: administratively prohibited: open failed\nstdio forwarding failed\n"
CONNECT_FAILED = "channel 0: open failed: connect failed: Connection refused\nstdio forwarding failed\n"


@pytest.mark.parametrize("rc, err, says", [
    (255, PROHIBITED, None),  # restrict, no-port-forwarding, or AllowTcpForwarding no
    (255, CONNECT_FAILED, "add restrict"),  # the client's sshd tried the connection for the key
    (0, "", "add restrict"),  # it made it, and it ended
    (255, "ssh: connect to host 192.0.2.10 port 22: Connection refused\n", "cannot reach"),
    (255, "Permission denied (publickey).\n", "refused the server's key"),
])
def test_the_forward_probe_tells_a_key_that_may_forward(rc, err, says):
    verdict = _ssh.forward_verdict(_ssh.Remote.from_params(remote()), rc, "", err)
    assert verdict is None if says is None else says in verdict


class Client:
    """A client's answers to the probes, by what each asks; records each argv."""

    def __init__(self, forward):
        self.forward, self.argvs, self.timeouts = forward, [], []

    def run_capture(self, argv, timeout=None):
        self.argvs.append(argv)
        self.timeouts.append(timeout)
        if argv[0] == "rsync":
            return 12, "", "rsync: read-only\n"
        if "-W" in argv:
            return self.forward
        return 1, "", "/usr/bin/rrsync error: SSH_ORIGINAL_COMMAND does not run rsync\n"


def probe(forward):
    client = Client(forward)
    with _ssh.Link(_ssh.Remote.from_params(remote(connect_timeout=7)), "/usr/bin/ssh") as link:
        try:
            link.check_restricted(client)
        except _ssh.RemoteError as error:
            return str(error), client.argvs, link.known_hosts
    assert client.timeouts == [27] * len(client.argvs), "a probe without its time limit"
    return None, client.argvs, link.known_hosts


def test_a_client_that_stalls_a_probe_fails_it_within_its_limit():
    refused, argvs, _known_hosts = probe((124, "", ""))
    assert "(whether it may forward ports) did not end within 27 s" in refused, refused


def test_a_forced_rrsync_without_restrict_is_refused_for_its_forwarding():
    refused, argvs, _known_hosts = probe((255, "", CONNECT_FAILED))
    assert "may forward ports" in refused and "add restrict" in refused and "/etc/liveclone/id" in refused
    assert [argv[0] for argv in argvs] == ["/usr/bin/ssh", "/usr/bin/ssh"]  # no push tried after it


def test_a_restricted_key_passes_the_three_probes_and_the_forward_one_is_bounded():
    refused, argvs, known_hosts = probe((255, "", PROHIBITED))
    assert refused is None
    assert [argv[0] for argv in argvs] == ["/usr/bin/ssh", "/usr/bin/ssh", "rsync"]
    forward = argvs[1]
    assert forward[-4:] == ["-W", _ssh.FORWARD_PROBE_TARGET, "--", "192.0.2.10"]
    assert "UserKnownHostsFile=" + known_hosts in options(forward)
    assert "StrictHostKeyChecking=yes" in options(forward) and "BatchMode=yes" in options(forward)
