"""Run a liveclone.core module with the ansible CLI, and interfere with it.

  run_module.py kill MODULE ARGS [--watch GLOB --min-bytes N] [--after NAME] [--only NAME]
      Start the module; once a file matching GLOB is larger than N bytes, or a
      process named NAME (--after) runs under it, SIGKILL the whole process
      tree, or only its processes named NAME (--only).
  run_module.py concurrent MODULE HOLDER_ARGS --busy NAME ARGS [ARGS ...]
      Start the module with HOLDER_ARGS; once a process named NAME runs under
      it, start one run per ARGS at the same time; wait for all. These runs
      execute the module file directly with an args file, as AnsibleModule
      allows: it starts in a fraction of the CLI's second, so the others reach
      the lock while the holder still has it. ARGS are JSON objects here.

Prints JSON: what was killed, and each run's module result. Ansible's workers
call setsid, so a process group kill would miss the module: the tree is read
from /proc. Exits 1 when there was nothing to kill (the test proves nothing).
"""

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

TIMEOUT = 300


def start(module, module_args):
    ansible = os.path.join(os.path.dirname(sys.executable), "ansible")
    command = [ansible, "localhost", "-c", "local", "-i", "localhost,",
               "-e", "ansible_python_interpreter=" + sys.executable,
               "-m", "liveclone.core." + module, "-a", module_args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_direct(module, module_args):
    """Run the module's file with {"ANSIBLE_MODULE_ARGS": ...} in a file, as AnsibleModule reads it."""
    collections = os.environ["ANSIBLE_COLLECTIONS_PATH"].split(os.pathsep)[0]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({"ANSIBLE_MODULE_ARGS": json.loads(module_args)}, handle)
    environment = dict(os.environ, PYTHONPATH=collections)
    process = subprocess.Popen(
        [sys.executable, "-m", "ansible_collections.liveclone.core.plugins.modules." + module, handle.name],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    process.args_file = handle.name
    return process


def direct_result_of(process):
    out = process.communicate()[0]
    os.unlink(process.args_file)
    try:
        return json.loads(out[out.index("{"):])
    except ValueError:
        return {"unparsed": out}


def result_of(process):
    """The module's result from the ansible CLI's 'host | STATUS => {json}' output."""
    out = process.communicate()[0]
    head, sep, body = out.partition(" => ")
    if not sep:
        return {"unparsed": out}
    try:
        result = json.loads(body)
    except ValueError:
        return {"unparsed": out}
    result.setdefault("failed", "FAILED" in head)
    return result


def tree(root):
    """(pid, name) of every process below root, read from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                stat = handle.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append((int(entry), name))
    found, todo = [], [root]
    while todo:
        for pid, name in children.get(todo.pop(), []):
            found.append((pid, name))
            todo.append(pid)
    return found


def wait_for(condition, process):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.002)
    return False


def payload_dirs(module):
    """AnsiballZ's extraction directories of this module; a killed run leaves its own behind."""
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ansible_liveclone.core.%s_payload_*" % module)))


def kill(options):
    payloads_before = payload_dirs(options.module)
    process = start(options.module, options.args)

    def ready():
        if options.watch and not any(os.stat(path).st_size > options.min_bytes
                                     for path in glob.glob(options.watch)):
            return False
        waited_for = options.only or options.after
        return not waited_for or any(name == waited_for for _pid, name in tree(process.pid))

    killed = []
    if wait_for(ready, process):
        victims = [(pid, name) for pid, name in tree(process.pid)
                   if not options.only or name == options.only]
        if not options.only:
            victims.insert(0, (process.pid, "ansible"))
        for pid, name in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(name)
    result = result_of(process)
    if killed and not options.only:
        for path in payload_dirs(options.module) - payloads_before:
            shutil.rmtree(path, ignore_errors=True)
    print(json.dumps({"killed": killed, "result": result}))
    return 0 if killed else 1


def concurrent(options):
    holder = start_direct(options.module, options.holder)
    busy = wait_for(lambda: any(name == options.busy for _pid, name in tree(holder.pid)), holder)
    others = [start_direct(options.module, args) for args in options.others] if busy else []
    results = [direct_result_of(process) for process in others]
    print(json.dumps({"busy": busy, "holder": direct_result_of(holder), "others": results}))
    return 0 if busy else 1


def main():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    killer = commands.add_parser("kill")
    killer.add_argument("module")
    killer.add_argument("args")
    killer.add_argument("--watch")
    killer.add_argument("--min-bytes", type=int, default=0)
    killer.add_argument("--only")
    killer.add_argument("--after")
    racer = commands.add_parser("concurrent")
    racer.add_argument("module")
    racer.add_argument("holder")
    racer.add_argument("--busy", required=True)
    racer.add_argument("others", nargs="+")
    options = parser.parse_args()
    return kill(options) if options.command == "kill" else concurrent(options)


if __name__ == "__main__":
    sys.exit(main())
