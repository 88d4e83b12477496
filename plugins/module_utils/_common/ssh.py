# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""The SSH side of a backup server's pull: the client it reaches, the host
keys pinned for it, ssh's argv, and what ssh's failures mean.

The server reaches a client with a key of its own that the client restricts
to a read-only rsync (`restrict,command="rrsync -ro /"`). Nothing here trusts
the network: the client's host keys are the ones the controller gathered,
pinned in a known_hosts file of the client's cache and checked strictly.

ssh reads `%` in the file names of its options as the start of a token and
`${` as an environment variable: file names go to it as options
(`-o IdentityFile=`, never `-i`, which looks the name up before expanding
it) with `%` doubled, and `${` is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import re
import struct
import tempfile
from dataclasses import dataclass

from .errors import LivecloneError
from .rsync import literal_pattern, remote_path_problem
from .text import check_plain_text, check_user_name

# The name every pinned key is filed under (ssh's HostKeyAlias): the pin
# belongs to the client's cache, not to an address that may move.
HOST_KEY_ALIAS = "liveclone-client"
KNOWN_HOSTS_NAME = ".liveclone-known_hosts"
KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
# A DNS name: dot-separated RFC 1123 labels.
DNS_NAME = re.compile(r"(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                      r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# A network interface's name as the kernel takes it (dev_valid_name: 1 to 15
# bytes, without '/', ':' or blanks, not . or ..), of the characters that ssh
# and rsync carry as they are (not '@', ']', quotes or shell syntax).
INTERFACE_NAME = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9_.+-]{1,15}")
# What a file name given to ssh may not hold: blanks split an option's value,
# quotes and backslashes quote it, `${` names an environment variable (ssh
# has no escape for it), and rsync's -e command is split at blanks too.
_SSH_UNSAFE_PATH = re.compile(r"[\x00-\x20'\"\\\x7f]|\$\{")
# Where the probe asks the client's sshd to connect (-W): a port nothing
# serves, so that a key allowed to forward gets "connect failed" at once.
FORWARD_PROBE_TARGET = "127.0.0.1:1"
# The time limit of that probe, beyond ssh's connect timeout.
FORWARD_PROBE_SECONDS = 20
# timeout(1)'s exit statuses (_command.CommandRunner's time limits): the limit hit, then the kill after it.
_TIMED_OUT = (124, 137)
# What ssh prints about the key a host sent when it is not the pinned one.
_SENT_FINGERPRINT = re.compile(r"key sent by the remote host is\s+(SHA256:[A-Za-z0-9+/=]+)")
SSH_FAILED = 255
_UNREACHABLE = ("Connection refused", "Connection timed out", "No route to host", "Could not resolve",
                "Network is unreachable", "Connection closed", "Connection reset", "timed out")


class RemoteError(LivecloneError):
    """A client that cannot be pulled as asked; the message says what to do."""


@dataclass(frozen=True)
class HostKey:
    type: str
    blob: bytes

    @property
    def fingerprint(self):
        digest = base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip("=")
        return "SHA256:" + digest

    def known_hosts_line(self):
        return "%s %s %s\n" % (HOST_KEY_ALIAS, self.type, base64.b64encode(self.blob).decode())


def parse_host_key(text):
    """A HostKey from "TYPE BASE64 [comment]", or the refusal as a RemoteError."""
    fields = text.split()
    if len(fields) < 2 or fields[0] not in KEY_TYPES:
        raise RemoteError("remote.host_keys item %r is not a public host key; give lines as in "
                          "/etc/ssh/ssh_host_ed25519_key.pub: TYPE BASE64 [comment]" % text[:80])
    try:
        blob = base64.b64decode(fields[1], validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        inner = blob[4:4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        inner = None
    if inner != fields[0]:
        raise RemoteError("remote.host_keys item %r does not hold a %s key (its base64 is damaged or of "
                          "another type); gather it again from the client's /etc/ssh" % (text[:80], fields[0]))
    return HostKey(fields[0], blob)


def parse_known_hosts(text):
    """The keys of a pin file this module wrote (lines of HOST_KEY_ALIAS)."""
    keys = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == HOST_KEY_ALIAS:
            keys.append(parse_host_key(" ".join(fields[1:3])))
    return keys


def fingerprints(keys):
    return sorted(key.fingerprint for key in keys)


@dataclass(frozen=True)
class Remote:
    """The client a server pulls from (or restores into), checked."""

    host: str
    port: int
    user: str
    identity_file: str
    host_keys: tuple
    accept_new_host_keys: bool
    mountinfo: str | None
    connect_timeout: int

    @classmethod
    def from_params(cls, params):
        host = params["host"]
        problem = check_host(host) or check_user_name("remote.user", params["user"])
        if problem:
            raise RemoteError(problem)
        identity = params["identity_file"]
        if not identity or not identity.startswith("/") or _SSH_UNSAFE_PATH.search(identity):
            raise RemoteError("remote.identity_file %r must be an absolute path without blanks, quotes, "
                              "backslashes, control characters or '${' (it goes into rsync's -e command, and ssh "
                              "reads '${' as an environment variable)" % (identity,))
        if not 0 < params["port"] < 65536:
            raise RemoteError("remote.port %d is not a TCP port; give 1-65535" % params["port"])
        if params["connect_timeout"] < 1:
            raise RemoteError("remote.connect_timeout is %d; give 1 or more seconds" % params["connect_timeout"])
        texts = params.get("host_keys") or []
        if not texts:
            raise RemoteError("remote.host_keys is empty; give the client's public host keys as the controller "
                              "gathers them (its /etc/ssh/ssh_host_*_key.pub), so the server never trusts "
                              "a key it is only shown")
        # A gathered .pub file ends with a newline: only blanks around a key are taken off.
        texts = [text.strip() for text in texts]
        for text in texts:
            problem = check_plain_text("remote.host_keys item", text)
            if problem:
                raise RemoteError(problem)
        keys = tuple(sorted({parse_host_key(text) for text in texts}, key=lambda key: key.fingerprint))
        mountinfo = params.get("mountinfo")
        if mountinfo is not None and "\x00" in mountinfo:
            raise RemoteError("remote.mountinfo holds a NUL byte; give the text of the client's /proc/self/mountinfo")
        return cls(host=host, port=params["port"], user=params["user"], identity_file=identity,
                   host_keys=keys, accept_new_host_keys=bool(params.get("accept_new_host_keys")),
                   mountinfo=mountinfo, connect_timeout=params["connect_timeout"])

    @property
    def name(self):
        return "%s@%s:%d" % (self.user, self.host, self.port)

    def location(self, path):
        """rsync's USER@HOST:PATH (an IPv6 address in brackets). rrsync on the
        client expands PATH as a glob, so it is escaped to name path alone."""
        problem = remote_path_problem(path)
        if problem:
            raise RemoteError(problem)
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s@%s:%s" % (self.user, host, literal_pattern(path))

    def ssh_argv(self, known_hosts):
        """ssh as the pull runs it: this key only, the pinned keys only, no prompt, no compression."""
        options = {
            "BatchMode": "yes", "IdentitiesOnly": "yes", "IdentityAgent": "none",
            "StrictHostKeyChecking": "yes", "UserKnownHostsFile": ssh_file_option(known_hosts),
            "GlobalKnownHostsFile": "/dev/null", "HostKeyAlias": HOST_KEY_ALIAS,
            "UpdateHostKeys": "no", "ConnectTimeout": str(self.connect_timeout),
            "ServerAliveInterval": "15", "ServerAliveCountMax": "4", "Compression": "no",
            "ControlMaster": "no", "ControlPath": "none", "ForwardAgent": "no", "ClearAllForwardings": "yes",
        }
        argv = ["ssh", "-F", "/dev/null", "-o", "IdentityFile=" + ssh_file_option(self.identity_file),
                "-p", str(self.port), "-l", self.user]
        for name, value in options.items():
            argv += ["-o", "%s=%s" % (name, value)]
        return argv

    def rsync_shell(self, ssh_path, known_hosts):
        """rsync's -e command: rsync splits it at spaces and keeps single-quoted words whole."""
        words = [ssh_path] + self.ssh_argv(known_hosts)[1:]
        return " ".join("'%s'" % word if re.search(r"[ =]", word) else word for word in words)


def check_host(host):
    """None, or the refusal of remote.host: a DNS name, an IP address, or an
    IPv6 address with a scope (fe80::1%eth0: the interface, by name or index,
    that the server reaches a link-local address through)."""
    if not isinstance(host, str) or not host:
        return "remote.host is empty; give the address the server reaches the client at"
    address, percent, scope = host.partition("%")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if not percent:
        if ip or DNS_NAME.fullmatch(host):
            return None
        return ("remote.host %r is neither a host name nor an IP address; give the address the server reaches "
                "the client at" % (host,))
    if not isinstance(ip, ipaddress.IPv6Address):
        return ("remote.host %r holds '%%', which only an IPv6 address takes (fe80::1%%eth0: the server's "
                "interface after the '%%'); give a host name or an IP address" % (host,))
    if not INTERFACE_NAME.fullmatch(scope):
        return ("remote.host %r has the scope %r, which is not the name or index of a network interface: give the "
                "server's interface the link-local address is reached through, such as fe80::1%%eth0 (1 to 15 "
                "letters, digits, '.', '_', '+' or '-', not . or ..)" % (host, scope))
    return None


def ssh_file_option(path):
    """A file name as an ssh option's value: ssh expands `%` tokens there, `%%` is one `%`."""
    return path.replace("%", "%%")


def check_pinned(remote, pinned):
    """The refusal of a pin that differs from the keys the controller gathered, or None."""
    if pinned and set(pinned) != set(remote.host_keys) and not remote.accept_new_host_keys:
        return ("the host keys of %s differ from the ones pinned on this server: pinned %s, the controller now "
                "gathers %s; if the client was reinstalled and its new keys are right, set "
                "remote.accept_new_host_keys: true once, else find out who answers at that address"
                % (remote.host, ", ".join(fingerprints(pinned)), ", ".join(fingerprints(remote.host_keys))))
    return None


def ssh_failure(remote, text, pinned_keys, what):
    """The message for ssh (or rsync over ssh) failing with text: what it means and what to do."""
    tail = " ".join(text.strip().splitlines()[-3:])
    sent = _SENT_FINGERPRINT.search(text)
    if sent or "Host key verification failed" in text:
        return ("%s presented a host key that is not the one pinned for it, so %s was refused: pinned %s, "
                "presented %s; if the client was reinstalled, gather its keys again and set "
                "remote.accept_new_host_keys: true once, else find out who answers at that address"
                % (remote.host, what, ", ".join(fingerprints(pinned_keys)),
                   sent.group(1) if sent else "a key of another type"))
    if "Permission denied" in text:
        return ("%s refused the server's key (%s), so %s did not happen: install the server's public key in "
                "%s's authorized_keys on the client (the backup_server role does), then run again: %s"
                % (remote.name, remote.identity_file, what, remote.user, tail))
    if any(marker in text for marker in _UNREACHABLE):
        return ("cannot reach %s over SSH, so %s did not happen and nothing was changed: %s"
                % (remote.name, what, tail))
    return "%s over SSH to %s failed: %s" % (what, remote.name, tail)


def probe_verdict(remote, rc, out, err):
    """The refusal of a key that is not restricted to rrsync, or None.

    The probe asks the client to run a command that is not rsync: rrsync
    refuses it ("SSH_ORIGINAL_COMMAND does not run rsync"). Anything else
    answering means another forced command, or none: a shell."""
    text = ((err or "") + (out or "")).strip()
    if rc != 0 and "does not run rsync" in text:
        return None
    answered = " ".join(text.splitlines()[-2:]) or "nothing"
    return ("the key %s is not restricted to rrsync on %s (a command that is not rsync %s, answering: %s), "
            "so no backup is pulled with it: restrict it in the client's authorized_keys with "
            "restrict,command=\"/usr/bin/rrsync -ro /\" (the backup_server role does)"
            % (remote.identity_file, remote.name, "ran" if rc in (0, 127) else "exited %d" % rc, answered))


def forward_verdict(remote, rc, out, err, pinned_keys=()):
    """The refusal of a key the client lets forward ports, or None.

    The probe asks the client's sshd to connect to FORWARD_PROBE_TARGET for
    the server (ssh -W, no command). A key with `restrict` (or an sshd with
    AllowTcpForwarding no) has the channel refused, "administratively
    prohibited"; a key that may forward has it opened, or tried ("connect
    failed"), whatever its forced command: rrsync limits the commands, not
    the forwarding, and anyone holding the key could reach the client's
    network through it."""
    text = ((err or "") + (out or "")).strip()
    if "administratively prohibited" in text:
        return None
    if rc == 0 or "open failed: connect failed" in text:
        return ("the key %s may forward ports through %s (the client's sshd opened a connection to %s for it), so "
                "no backup is pulled with it: add restrict to its options in the client's authorized_keys, "
                "restrict,command=\"/usr/bin/rrsync -ro /\" (the backup_server role does); a forced command alone "
                "does not stop forwarding" % (remote.identity_file, remote.name, FORWARD_PROBE_TARGET))
    return ssh_failure(remote, text, pinned_keys or remote.host_keys, "the check of the server's key")


def push_verdict(remote, rc):
    """The refusal of a key that let a dry-run push in, or None."""
    if rc == 0:
        return ("the key %s can write to %s (a dry-run push was accepted), so no backup is pulled with it: "
                "its forced command must be read-only, restrict,command=\"/usr/bin/rrsync -ro /\" in the "
                "client's authorized_keys (the backup_server role does)" % (remote.identity_file, remote.name))
    return None


# What rsync's output holds when ssh, not the copy, failed.
_SSH_MARKERS = ("ssh: ", "Host key verification failed", "REMOTE HOST IDENTIFICATION", "Permission denied (",
                "rrsync", "kex_exchange_identification", "exited with status 255")


class Link:
    """How this run reaches its client: the Remote, ssh's path, and a known_hosts
    file of this run's own (in a private directory) holding the checked keys."""

    def __init__(self, remote, ssh_path, pinned_keys=()):
        self.remote = remote
        self.ssh_path = ssh_path
        self.pinned_keys = tuple(pinned_keys) or remote.host_keys
        self.directory = None
        self.known_hosts = None

    def __enter__(self):
        self.directory = tempfile.mkdtemp(prefix="liveclone-ssh.")
        self.known_hosts = os.path.join(self.directory, "known_hosts")
        # The source of the dry-run push that a read-only key must refuse.
        self.empty_dir = os.path.join(self.directory, "empty")
        os.mkdir(self.empty_dir, 0o700)
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(key.known_hosts_line() for key in self.remote.host_keys))
        return self

    def __exit__(self, *exc):
        os.unlink(self.known_hosts)
        os.rmdir(self.empty_dir)
        os.rmdir(self.directory)

    def ssh_argv(self, *command):
        return [self.ssh_path] + self.remote.ssh_argv(self.known_hosts)[1:] + ["--", self.remote.host] + list(command)

    def forward_probe_argv(self):
        """ssh -W to FORWARD_PROBE_TARGET on the client."""
        return ([self.ssh_path] + self.remote.ssh_argv(self.known_hosts)[1:]
                + ["-W", FORWARD_PROBE_TARGET, "--", self.remote.host])

    def probe(self, runner, argv, what):
        """(rc, out, err) of one of the key's checks, within connect_timeout + FORWARD_PROBE_SECONDS:
        a client that accepts the connection and then stalls fails the check, saying so."""
        seconds = self.remote.connect_timeout + FORWARD_PROBE_SECONDS
        rc, out, err = runner.run_capture(argv, timeout=seconds)
        if rc in _TIMED_OUT:
            raise RemoteError("the check of the server's key on %s (%s) did not end within %d s, so no backup is "
                              "pulled; find out what answers there" % (self.remote.name, what, seconds))
        return rc, out, err

    def rsync_shell(self):
        return self.remote.rsync_shell(self.ssh_path, self.known_hosts)

    def failed_in_ssh(self, text):
        return any(marker in text for marker in _SSH_MARKERS)

    def failure(self, text, what):
        return ssh_failure(self.remote, text, self.pinned_keys, what)

    def check_restricted(self, runner):
        """Refuses a key the client does not restrict to a read-only rrsync:
        it must refuse a command that is not rsync, a port forward, and a
        (dry-run) push."""
        rc, out, err = self.probe(runner, self.ssh_argv("liveclone-probe"), "whether it runs a command")
        if rc == SSH_FAILED or (rc != 0 and self.failed_in_ssh(err) and "rrsync" not in err):
            raise RemoteError(self.failure(err or out, "the check of the server's key"))
        problem = probe_verdict(self.remote, rc, out, err)
        if problem:
            raise RemoteError(problem)
        rc, out, err = self.probe(runner, self.forward_probe_argv(), "whether it may forward ports")
        problem = forward_verdict(self.remote, rc, out, err, self.pinned_keys)
        if problem:
            raise RemoteError(problem)
        rc, out, err = self.probe(runner, ["rsync", "--dry-run", "--recursive", "-e", self.rsync_shell(),
                                           self.empty_dir + "/", self.remote.location("/")], "whether it may write")
        problem = push_verdict(self.remote, rc)
        if problem:
            raise RemoteError(problem)
