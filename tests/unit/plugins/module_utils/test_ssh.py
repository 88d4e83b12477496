# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The SSH side of a pull, with plain data: keys, pins, argv, what ssh's failures mean."""

from __future__ import annotations

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._cache.layout import CacheError
from ansible_collections.liveclone.core.plugins.module_utils._common import ssh as _ssh
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache import desired as desired_
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache.read import restore_excludes

# A real key and the fingerprint ssh-keygen -lf gives for it.
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL/rTe/xjg1JaAvFiWhVHFYURFwQkzkSdlUmhrGIz7ze test"
ED25519_FINGERPRINT = "SHA256:QEZddJlJ5KASBF63vWabHE4uF06PS89XYawyDjuAdlc"
RSA = ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDo67Jl/Lqss4+r86XGa4YK4Smgx8WlMH3D4MmFiLM8uFSBI6g2LukfnjUnmSQb"
       "phrWDMzt/Ll4gUzf5bzENjwtR6s3wLnbzIneh7eHWAaUZzixfu3/wt2xfjopyy5FGSCZ01CNyVWrnqaV1R7irJInmXZD97iY1TKs"
       "qrxZ9ma8ZQ== root@vm")
RSA_FINGERPRINT = "SHA256:X4OCdW/z2wdUY+7wteL7q8WMVQm2aBDdInEbyoRFGrU"
MOUNTINFO = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n" \
            "30 22 8:2 / /boot/efi rw - vfat /dev/sda2 rw\n" \
            "31 22 0:5 / /proc rw - proc proc rw\n"


def remote(**overrides):
    values = dict(host="192.0.2.10", port=22, user="root", identity_file="/etc/liveclone/id",
                  host_keys=[ED25519 + "\n"], accept_new_host_keys=False, mountinfo=MOUNTINFO, connect_timeout=10)
    values.update(overrides)
    return values


def desired(**overrides):
    values = dict(base_dir="/srv/liveclone/web1", source="/", state="present", snapper_config="cfg",
                  versioning="auto", keep=2, exclude=[], include_home=False, snapshot="on_change", checksum=False,
                  restore_snapshot="latest", restore_dest=None, restore_delete_extra=False,
                  allow_restore_to_root=False, lock_timeout=1, remote=remote())
    values.update(overrides)
    return desired_.Desired.from_params(values)


def test_fingerprints_are_the_ones_ssh_keygen_prints():
    assert _ssh.parse_host_key(ED25519).fingerprint == ED25519_FINGERPRINT
    assert _ssh.parse_host_key(RSA).fingerprint == RSA_FINGERPRINT


@pytest.mark.parametrize("text, says", [
    ("ssh-ed25519", "not a public host key"),
    ("ssh-dss AAAA", "not a public host key"),
    ("ssh-rsa " + ED25519.split()[1], "does not hold a ssh-rsa key"),
    ("ssh-ed25519 !!!notbase64", "damaged"),
])
def test_host_keys_that_are_not_keys_are_refused(text, says):
    with pytest.raises(_ssh.RemoteError, match=says):
        _ssh.parse_host_key(text)


def test_a_pin_round_trips_through_its_file():
    key = _ssh.parse_host_key(ED25519)
    assert _ssh.parse_known_hosts(key.known_hosts_line()) == [key]
    assert key.known_hosts_line().startswith(_ssh.HOST_KEY_ALIAS + " ssh-ed25519 ")


@pytest.mark.parametrize("overrides, says", [
    (dict(host="a b"), "neither a host name nor an IP"),
    (dict(host="-oProxyCommand=x"), "neither a host name nor an IP"),
    (dict(user="Root;"), "not a user name"),
    (dict(identity_file="/etc/my key"), "without blanks"),
    (dict(identity_file="relative/key"), "absolute path"),
    (dict(port=0), "not a TCP port"),
    (dict(host_keys=[]), "host_keys is empty"),
    (dict(host_keys=[ED25519 + "\nssh-ed25519 AAAA"]), "control character"),
    (dict(connect_timeout=0), "1 or more seconds"),
])
def test_a_remote_that_cannot_be_reached_safely_is_refused(overrides, says):
    with pytest.raises(CacheError, match=says):
        desired(remote=remote(**overrides))


def test_a_pull_needs_the_clients_mount_table():
    with pytest.raises(CacheError, match="needs remote.mountinfo"):
        desired(remote=remote(mountinfo=None))
    with pytest.raises(CacheError, match="not a mount table"):
        desired(remote=remote(mountinfo="garbage\n"))
    # A restore does not read it.
    assert desired(state="restored", restore_dest="/srv/r", remote=remote(mountinfo=None)).remote


def test_ipv6_addresses_are_bracketed_for_rsync():
    d = desired(remote=remote(host="2001:db8::1"))
    assert d.source_location == "root@[2001:db8::1]:/"
    assert desired().source_location == "root@192.0.2.10:/"


def test_ssh_trusts_only_the_pinned_keys_and_this_key():
    argv = _ssh.Remote.from_params(remote()).ssh_argv("/tmp/kh")
    options = [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]
    for wanted in ("StrictHostKeyChecking=yes", "UserKnownHostsFile=/tmp/kh", "GlobalKnownHostsFile=/dev/null",
                   "BatchMode=yes", "IdentitiesOnly=yes", "IdentityAgent=none", "Compression=no"):
        assert wanted in options
    assert argv[:3] == ["ssh", "-F", "/dev/null"]
    assert "StrictHostKeyChecking=no" not in options and "StrictHostKeyChecking=accept-new" not in options


def test_rsyncs_remote_shell_quotes_what_holds_blanks():
    shell = _ssh.Remote.from_params(remote()).rsync_shell("/usr/bin/ssh", "/srv/my base/kh")
    assert "'UserKnownHostsFile=/srv/my base/kh'" in shell
    assert shell.startswith("/usr/bin/ssh -F /dev/null -o 'IdentityFile=/etc/liveclone/id' ")


def test_a_pin_that_differs_is_refused_naming_both_fingerprints():
    wanted = _ssh.Remote.from_params(remote())
    other = (_ssh.parse_host_key(RSA),)
    problem = _ssh.check_pinned(wanted, other)
    assert RSA_FINGERPRINT in problem and ED25519_FINGERPRINT in problem
    assert _ssh.check_pinned(wanted, ()) is None
    assert _ssh.check_pinned(wanted, wanted.host_keys) is None
    assert _ssh.check_pinned(_ssh.Remote.from_params(remote(accept_new_host_keys=True)), other) is None


def test_ssh_failures_say_what_happened():
    wanted = _ssh.Remote.from_params(remote())
    changed = ("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nThe fingerprint for the ED25519 key "
               "sent by the remote host is\nSHA256:abcDEF123.\nHost key verification failed.")
    text = _ssh.ssh_failure(wanted, changed, wanted.host_keys, "the copy")
    assert "SHA256:abcDEF123" in text and ED25519_FINGERPRINT in text
    assert "cannot reach" in _ssh.ssh_failure(
        wanted, "ssh: connect to host 192.0.2.10 port 22: Connection refused", (), "the copy")
    assert "refused the server's key" in _ssh.ssh_failure(wanted, "Permission denied (publickey).", (), "x")


@pytest.mark.parametrize("rc, err, restricted", [
    (1, "/usr/bin/rrsync error: SSH_ORIGINAL_COMMAND does not run rsync", True),
    (127, "bash: line 1: liveclone-probe: command not found", False),
    (0, "", False),
    (1, "", False),
])
def test_the_probe_tells_rrsync_from_a_shell(rc, err, restricted):
    verdict = _ssh.probe_verdict(_ssh.Remote.from_params(remote()), rc, "", err)
    assert (verdict is None) == restricted


def test_a_key_that_may_push_is_refused():
    wanted = _ssh.Remote.from_params(remote())
    assert "can write" in _ssh.push_verdict(wanted, 0)
    assert _ssh.push_verdict(wanted, 12) is None


def test_a_pull_leaves_out_the_clients_other_filesystems():
    from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache.read import backup_excludes
    excludes = backup_excludes(desired())
    assert "/boot/efi/*" in excludes and "/proc/*" in excludes


def test_a_restore_leaves_out_what_the_backup_left_out_anchored_at_its_path():
    whole = restore_excludes(desired(state="restored", restore_dest="/", allow_restore_to_root=True), None)
    assert "/home/*" in whole and "/boot/efi/*" in whole and "/.snapshots" in whole
    var = restore_excludes(desired(state="restored", restore_dest="/var", restore_path="/var"), None)
    assert "/log/*" in var and "/tmp/*" in var and "/cache/apt/archives/*" in var
    assert not any(pattern.startswith("/var/") for pattern in var)
    assert "/.snapshots" not in var


def test_a_restore_leaves_out_what_the_snapshots_record_lists_not_this_hosts_mounts():
    """The record of the pull says /data was another filesystem of the client's; the restore
    leaves it out whatever this host's (or the restore's) mount table says."""
    recorded = ["/proc/*", "/data/*", "/srv/disk\\[1]/*", "/.liveclone-backup.json"]
    whole = restore_excludes(desired(state="restored", restore_dest="/", allow_restore_to_root=True), recorded)
    assert whole[:4] == recorded and "/.snapshots" in whole
    assert "/home/*" not in whole, "a recorded backup's exclusions are the record's, not today's"
    data = restore_excludes(desired(state="restored", restore_dest="/data", restore_path="/data"), recorded)
    assert data == ["/*"]


def test_a_file_is_restored_into_its_directory_and_a_pull_names_its_remote_shell():
    from ansible_collections.liveclone.core.plugins.module_utils._common.rsync import copy_argv
    argv = copy_argv("/snap/etc/fstab", "root@h:/etc", source_is_file=True, rsh="ssh -p 2")
    assert argv[-2:] == ["/snap/etc/fstab", "root@h:/etc/"]
    assert argv[argv.index("-e") + 1] == "ssh -p 2"
    assert "--no-old-args" in argv and "--no-protect-args" in argv, "the environment could change the escaping"
    assert copy_argv("root@h:/", "/c")[-2:] == ["root@h:/", "/c/"]
