"""Exit 0 only when some ancestor of this process is in another mount
namespace, that is, when this process runs in a private one (as
scripts/test.sh arranges with unshare). Tests that cover host files such as
/etc/snapper with bind mounts run this first."""

import os
import sys


def parent(pid):
    with open("/proc/%d/stat" % pid) as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


own = os.readlink("/proc/self/ns/mnt")
pid = os.getpid()
while pid > 1:
    pid = parent(pid)
    try:
        if os.readlink("/proc/%d/ns/mnt" % pid) != own:
            sys.exit(0)
    except OSError:
        break
sys.exit("not in a private mount namespace: run the integration tests through scripts/test.sh")
