"""The test sshd (tests/lib/sshd.py) keeps its own accounts while the
machine's change: a package that adds a system user (exim4, pulled in by
btrbk) writes a new /etc/passwd and renames it over the old one while tests
run. A bind mount over /etc/passwd goes with the file it covers; sshd then
lost its privilege-separation user and every new connection failed.

The rename is made here on a copy of /etc bound over /etc in this test's
private mount namespace (scripts/test.sh runs the tier under unshare), never
on the host's files, which are compared before and after."""

from __future__ import annotations

import contextlib
import os
import subprocess

from conftest import run
from sshd import PRIVSEP_USER, make_key, running_sshd

USER = "lcsshdtest:x:23571:23572:test sshd's own user:/nonexistent:/usr/sbin/nologin"
GROUP = "lcsshdtestgrp:x:23572:"
# What a package install leaves: the machine's users, none of sshd's own.
NEW_PASSWD = "root:x:0:0:root:/root:/bin/bash\nexim:x:101:101::/var/spool/exim4:/usr/sbin/nologin\n"
NEW_GROUP = "root:x:0:\nexim:x:101:\n"
# Through sshd: a new connection (a new privilege-separated child), and what its session reads.
ACCOUNTS = "id -u lcsshdtest; getent group lcsshdtestgrp | cut -d: -f3; getent passwd %s | cut -d: -f1" % PRIVSEP_USER


@contextlib.contextmanager
def etc_copy(work):
    """/etc in this mount namespace: a copy in work, bound over it while the block runs."""
    copy = os.path.join(work, "etc")
    os.makedirs(copy)
    run(["cp", "-a", "/etc/.", copy + "/"])
    run(["mount", "--bind", copy, "/etc"])
    try:
        yield copy
    finally:
        subprocess.run(["umount", "/etc"], check=False)


def replace_by_rename(path, text):
    """As useradd does: the new file beside the old one, then renamed over it."""
    with open(path + "+", "w") as handle:
        handle.write(text)
    os.chmod(path + "+", 0o644)
    os.rename(path + "+", path)


def identity(path):
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size


def test_sshd_keeps_its_accounts_when_passwd_and_group_are_replaced_by_rename(sandbox):
    host = {path: identity(path) for path in ("/etc/passwd", "/etc/group")}
    work = os.path.join(sandbox, "sshd-accounts")
    os.makedirs(work)
    key = make_key(work, "client")
    with etc_copy(work), running_sshd(os.path.join(work, "sshd"), users=(USER,), groups=(GROUP,)) as sshd:
        sshd.authorize(key)
        before = run(sshd.ssh_argv(key, ACCOUNTS)).stdout
        assert before == "23571\n23572\n%s\n" % PRIVSEP_USER
        replace_by_rename("/etc/passwd", NEW_PASSWD)
        replace_by_rename("/etc/group", NEW_GROUP)
        with open("/etc/passwd") as handle:
            assert handle.read() == NEW_PASSWD
        after = subprocess.run(sshd.ssh_argv(key, ACCOUNTS), capture_output=True, text=True, check=False)
        with open(sshd.log) as handle:
            log = handle.read()
        assert after.returncode == 0, (after.stderr, log[-2000:])
        assert after.stdout == before
        # What sshd's own mount namespace holds at /etc/passwd.
        with open("/proc/%d/root/etc/passwd" % sshd.pid) as handle:
            assert USER in handle.read().splitlines()
    assert {path: identity(path) for path in host} == host, "the host's /etc/passwd or /etc/group changed"
