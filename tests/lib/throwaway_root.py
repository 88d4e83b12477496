"""Run a command chrooted into a throwaway root: a scratch directory in which
the host's /usr, /etc, the venv and the staged collection are bound
read-only, with a fresh /tmp. A module given `//` or `/` there acts on the
scratch root, never on the host's own. Must be started in a private mount
namespace (`unshare --mount --propagation private`), so the binds vanish
with the process.

Usage: python throwaway_root.py ROOT READONLY_DIR... -- ARGV...
"""

from __future__ import annotations

import os
import subprocess
import sys

from sandbox import in_private_mount_namespace

# Debian 12 merges /usr: these are links into it.
MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def mount(*args):
    subprocess.run(["mount", *args], check=True)


def bind_read_only(source, root):
    target = os.path.join(root, source.lstrip("/"))
    mount("--rbind", source, target)
    mount("-o", "remount,bind,ro", target)


def skeleton(root, read_only):
    """The links and mount points of a throwaway root (made before its first
    use, so that a run leaves the directory as it found it)."""
    for name, target in MERGED.items():
        if not os.path.lexists(os.path.join(root, name)):
            os.symlink(target, os.path.join(root, name))
    for source in ["/usr", "/etc", *read_only]:
        os.makedirs(os.path.join(root, source.lstrip("/")), exist_ok=True)
    for name in ("proc", "dev", "sys", "tmp", "run"):
        os.makedirs(os.path.join(root, name), exist_ok=True)


def prepare(root, read_only):
    skeleton(root, read_only)
    # A root is a mount point: the modules find the filesystem of `/` in mountinfo.
    mount("--bind", root, root)
    # The fresh /tmp and /run first: a read-only bind below them stays visible.
    mount("-t", "tmpfs", "tmpfs", os.path.join(root, "tmp"))
    mount("-t", "tmpfs", "tmpfs", os.path.join(root, "run"))
    mount("-t", "proc", "proc", os.path.join(root, "proc"))
    mount("--rbind", "/dev", os.path.join(root, "dev"))
    mount("--rbind", "/sys", os.path.join(root, "sys"))
    for source in ["/usr", "/etc", *read_only]:
        os.makedirs(os.path.join(root, source.lstrip("/")), exist_ok=True)
        bind_read_only(source, root)


def main(argv):
    split = argv.index("--")
    root, read_only, command = argv[0], argv[1:split], argv[split + 1:]
    if not in_private_mount_namespace():
        sys.exit("throwaway_root.py must run in a private mount namespace")
    prepare(root, read_only)
    os.chroot(root)
    os.chdir("/")
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
