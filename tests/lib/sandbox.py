"""A sandbox for tests that run the modules on this machine as root: a work
directory under /var/tmp, with the host files the modules and roles write
(/etc/snapper, /etc/default/snapper, /etc/fstab) covered by copies. It must be
used inside a private mount namespace (scripts/test.sh runs the tiers under
`unshare --mount`), so every mount made, the covering ones included, vanishes
with the namespace even if the tests are killed."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile

COVERED = ("/etc/snapper", "/etc/default/snapper", "/etc/fstab")


def in_private_mount_namespace():
    own = os.readlink("/proc/self/ns/mnt")
    pid = os.getppid()
    while pid > 1:
        try:
            if os.readlink("/proc/%d/ns/mnt" % pid) != own:
                return True
            with open("/proc/%d/stat" % pid) as handle:
                pid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def mounted_under(path):
    with open("/proc/self/mountinfo") as handle:
        targets = [line.split()[4] for line in handle]
    return [target for target in targets if target == path or target.startswith(path + "/")]


def loop_devices_on(path):
    """Loop devices whose backing file lies under path."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         check=True, text=True, capture_output=True).stdout
    found = []
    for line in out.splitlines():
        name, _sep, back = line.strip().partition(" ")
        back = back.strip()
        if back == path or back.startswith(path + "/"):
            found.append(name)
    return found


def require_root_namespace(tier):
    """The reason the tier cannot run here, or None."""
    if os.geteuid() != 0:
        return "the %s tests need root: run them through scripts/test.sh" % tier
    if not in_private_mount_namespace():
        return "not in a private mount namespace: run the %s tests through scripts/test.sh" % tier
    return None


@contextlib.contextmanager
def sandbox(prefix):
    """Yield a work directory with the host files covered; on the way out
    unmount what is left under it, detach its loop devices, and remove it
    only when nothing is mounted there any more."""
    work = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    covered = []
    try:
        for path in COVERED:
            copy = os.path.join(work, "etc", path.strip("/").replace("/", "_"))
            if os.path.isdir(path):
                shutil.copytree(path, copy)
            else:
                os.makedirs(os.path.dirname(copy), exist_ok=True)
                shutil.copy2(path, copy)
            subprocess.run(["mount", "--bind", copy, path], check=True)
            covered.append(path)
        yield work
    finally:
        for path in reversed(covered):
            subprocess.run(["umount", path], check=False)
        for target in sorted(mounted_under(work), reverse=True):
            subprocess.run(["umount", target], check=False)
        for device in loop_devices_on(work):
            subprocess.run(["losetup", "--detach", device], check=False)
        if mounted_under(work):
            raise RuntimeError("%s still has mounts; not removing it" % work)
        shutil.rmtree(work)
