"""Start the backstore module with ansible, SIGKILL it and every process under
it as soon as a file matching WATCH grows past MIN_BYTES, and print what was
seen. (Ansible's workers call setsid, so a process group kill is not enough.)

usage: kill_during.py WATCH MIN_BYTES MODULE_ARGS
Exits 1 when the run ended before it could be killed (the test then proves nothing).
"""

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time


def descendants(root):
    """PIDs of every process below root, read from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(root):
    for pid in [root] + descendants(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


watch, min_bytes, module_args = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ansible = os.path.join(os.path.dirname(sys.executable), "ansible")
command = [ansible, "localhost", "-c", "local", "-i", "localhost,",
           "-e", "ansible_python_interpreter=" + sys.executable,
           "-m", "liveclone.core.backstore", "-a", module_args]
process = subprocess.Popen(command, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
deadline = time.monotonic() + 300
try:
    while time.monotonic() < deadline and process.poll() is None:
        sizes = [os.stat(path).st_size for path in glob.glob(watch)]
        if any(size > min_bytes for size in sizes):
            kill_tree(process.pid)
            process.wait()
            print(json.dumps({"killed": True, "sizes_at_kill": sizes}))
            sys.exit(0)
        time.sleep(0.002)
finally:
    if process.poll() is None:
        kill_tree(process.pid)
        process.wait()
print(json.dumps({"killed": False, "returncode": process.returncode}))
sys.exit(1)
