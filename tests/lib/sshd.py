"""A test sshd on 127.0.0.1 for the tests of a pull over SSH: OpenSSH's server
taken out of Debian's package (LIVECLONE_SSHD; scripts/lib.sh
provide_test_sshd unpacks it, it is not installed), with a configuration,
host key, authorized_keys and PID file of its own in a directory of the
test's sandbox, run in the foreground as a child (-D -e) and stopped by its
PID. Nothing is written to ~/.ssh or /etc/ssh, and nothing listens beyond
127.0.0.1.

sshd runs in a mount namespace of its own (unshare, as root) with an /etc of
its own: a copy of the test's /etc on a tmpfs, bound over /etc there, whose
passwd and group add the user `sshd` that its privilege separation needs when
the machine has none (no openssh-server is installed), and the users and
groups the test gives the client, so that the client can name an id
differently from the server, as another machine would. The copy covers the
directory /etc, which nothing replaces, not the files in it: a package
install that renames a new /etc/passwd into place while a test runs (as
useradd does) leaves sshd's accounts alone, where a bind mount over
/etc/passwd went with the file it covered. The host's files never change,
and the mounts go with sshd. sshd
also needs the directory /run/sshd, created when missing, as Debian's
package does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

PRIVSEP_DIR = "/run/sshd"
PRIVSEP_USER = "sshd"
NOGROUP = 65534
START_TIMEOUT = 15


def run(argv):
    return subprocess.run(argv, check=True, text=True, capture_output=True).stdout


@dataclass(frozen=True)
class Key:
    """A key pair in the sandbox: the private key's path and the public key's line."""

    path: str
    public: str

    @property
    def fingerprint(self):
        return fingerprint_of(self.path + ".pub")


def make_key(directory, name):
    """A new ed25519 key pair directory/NAME (no passphrase)."""
    path = os.path.join(directory, name)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "liveclone-test-" + name, "-f", path])
    with open(path + ".pub") as handle:
        return Key(path, handle.read().strip())


def fingerprint_of(public_path):
    """SHA256:... of a public key file, as ssh-keygen -lf prints it."""
    return run(["ssh-keygen", "-l", "-E", "sha256", "-f", public_path]).split()[1]


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sshd_binary():
    path = os.environ.get("LIVECLONE_SSHD", "")
    if not path:
        raise RuntimeError("LIVECLONE_SSHD is not set: run the tests through scripts/test.sh (provide_test_sshd "
                           "unpacks OpenSSH's server and exports it)")
    if not os.path.isabs(path) or not os.access(path, os.X_OK):
        raise RuntimeError("LIVECLONE_SSHD=%s is not an absolute path to an executable sshd (sshd re-executes "
                           "itself for each connection, by that path)" % path)
    return path


def user_database(directory, users=(), groups=()):
    """sshd's /etc/passwd and /etc/group, written in directory: the test's,
    with users and groups (passwd and group lines) added, and a user `sshd`
    for privilege separation when there is none. Returns their paths."""
    with open("/etc/passwd") as handle:
        passwd = handle.read().rstrip("\n").split("\n") + list(users)
    with open("/etc/group") as handle:
        group = handle.read().rstrip("\n").split("\n") + list(groups)
    if not any(line.startswith(PRIVSEP_USER + ":") for line in passwd):
        used = {int(fields[2]) for fields in (line.split(":") for line in passwd)
                if len(fields) > 2 and fields[2].isdigit()}
        uid = next(number for number in range(999, 99, -1) if number not in used)
        passwd.append("%s:x:%d:%d:test sshd privilege separation:%s:/usr/sbin/nologin"
                      % (PRIVSEP_USER, uid, NOGROUP, PRIVSEP_DIR))
    paths = []
    for name, lines in (("passwd", passwd), ("group", group)):
        path = os.path.join(directory, name)
        with open(path, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        os.chmod(path, 0o644)
        paths.append(path)
    return paths


# Run in sshd's own mount namespace: /etc copied onto a tmpfs with sshd's
# user database, that copy bound over /etc, a check of the configuration,
# then sshd in place of the shell (same PID).
_LAUNCH = ('mount -t tmpfs -o mode=0755,size=64m liveclone-sshd-etc "$1" && cp -a /etc/. "$1"/ '
           '&& cp "$2" "$1"/passwd && cp "$3" "$1"/group && mount --bind "$1" /etc '
           '&& "$4" -t -f "$5" && exec "$4" -D -e -f "$5"')


def config_text(directory, port, host_key, forwarding=False):
    return "\n".join([
        "ListenAddress 127.0.0.1",
        "Port %d" % port,
        "HostKey %s" % host_key,
        "PidFile %s" % os.path.join(directory, "sshd.pid"),
        "AuthorizedKeysFile %s" % os.path.join(directory, "authorized_keys"),
        "AuthorizedKeysCommand none",
        "AuthorizedPrincipalsFile none",
        # The sandbox lies under /var/tmp, which everyone may write: sshd's
        # check of the path to authorized_keys would refuse every key.
        "StrictModes no",
        "UsePAM no",
        "AllowUsers root",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "PermitUserEnvironment no",
        "AllowAgentForwarding no",
        # Off unless asked for: OpenSSH's default (yes), to see what a key's options allow.
        "AllowTcpForwarding %s" % ("yes" if forwarding else "no"),
        "X11Forwarding no",
        "PermitTunnel no",
        "UseDNS no",
        "PrintMotd no",
        "MaxStartups 100",
        "LogLevel VERBOSE",
        "",
    ])


class Sshd:
    """A running test sshd: its port, host key and authorized_keys."""

    def __init__(self, directory, port, host_key, process, log):
        self.directory = directory
        self.port = port
        self.host_key = host_key
        self.process = process
        self.log = log
        self.authorized_keys = os.path.join(directory, "authorized_keys")
        self.known_hosts = os.path.join(directory, "known_hosts")
        with open(self.known_hosts, "w") as handle:
            handle.write("[127.0.0.1]:%d %s\n" % (port, host_key.public))

    @property
    def pid(self):
        return self.process.pid

    @property
    def host_key_line(self):
        """The host key as the controller gathers it: TYPE BASE64 comment."""
        return self.host_key.public

    @property
    def fingerprint(self):
        return self.host_key.fingerprint

    def authorize(self, key, options=None):
        """Let key in as root, with authorized_keys options (such as restrict,command="...")."""
        with open(self.authorized_keys, "a") as handle:
            handle.write("%s%s\n" % (options + " " if options else "", key.public))

    def ssh_argv(self, key, *command):
        """ssh to this sshd as root with key only, its host key checked, no user configuration."""
        return ["ssh", "-F", "/dev/null", "-i", key.path, "-p", str(self.port), "-l", "root",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=" + self.known_hosts,
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no", "-o", "ConnectTimeout=5",
                "--", "127.0.0.1"] + list(command)

    def rsync_shell(self, key):
        """rsync's -e command for ssh_argv (the sandbox's paths hold no blanks)."""
        return " ".join(self.ssh_argv(key)[:-2])

    def children(self):
        """PIDs of the connections sshd still serves (its child processes)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == self.pid:
                found.append(int(entry))
        return found


def _wait_listening(process, log, port):
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with open(log) as handle:
            if "Server listening on 127.0.0.1 port %d" % port in handle.read():
                return
        time.sleep(0.05)
    with open(log) as handle:
        text = handle.read()
    raise RuntimeError("the test sshd did not start (exit %s):\n%s" % (process.poll(), text[-3000:]))


def _stop(process, children):
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_sshd(directory, host_key=None, port=None, users=(), groups=(), forwarding=False):
    """Start sshd on 127.0.0.1 with everything in directory (created): its
    config, a new ed25519 host key (or host_key, a Key), its log and PID file
    and the authorized_keys that Sshd.authorize fills; users and groups are
    passwd and group lines of the client's own; forwarding lets keys forward
    TCP ports unless their options forbid it. Yields the Sshd; stops it, and
    any connection it still serves, by PID on the way out."""
    if os.geteuid() != 0:
        raise RuntimeError("the test sshd needs root (it logs in as root, in a mount namespace of its own)")
    os.makedirs(directory, exist_ok=True)
    binary = sshd_binary()
    host_key = host_key or make_key(directory, "ssh_host_ed25519_key")
    port = port or free_port()
    config = os.path.join(directory, "sshd_config")
    with open(config, "w") as handle:
        handle.write(config_text(directory, port, host_key.path, forwarding))
    open(os.path.join(directory, "authorized_keys"), "a").close()
    passwd, group = user_database(directory, users, groups)
    etc = os.path.join(directory, "etc")
    os.makedirs(etc, exist_ok=True)
    if not os.path.isdir(PRIVSEP_DIR):
        os.makedirs(PRIVSEP_DIR, mode=0o755)
    log = os.path.join(directory, "sshd.log")
    with open(log, "w") as handle:
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                                    _LAUNCH, "sh", etc, passwd, group, binary, config],
                                   stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
    sshd = None
    try:
        _wait_listening(process, log, port)
        sshd = Sshd(directory, port, host_key, process, log)
        yield sshd
    finally:
        _stop(process, sshd.children() if sshd else [])
