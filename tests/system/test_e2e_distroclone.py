"""End to end, the workflow of distroclone-build-from-cache.txt on a lab VM:
a full backup onto a blank disk, a change, incremental backups (retention
keeps the newest two; an unchanged backup is the backup_then_build
scenario's idempotence), the ISO built from the newest snapshot and booted,
DistroClone's cache detection, and the cache deleted with `state: absent`
where a plain `rm -rf` fails on read-only snapshots.

What must not reach the live system: a user's home, and an SSH host key
planted on the VM."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO, run
from live_console import LiveMachine

from lab import ssh_argv

LAB = [sys.executable, os.path.join(REPO, "lab/lab.py")]
BASE = "/mnt/debian_backup"
ROOT_PASSWORD = "e2e-root"
# DistroClone's own detection and label (it sources the file, as the seed shows).
DETECT = ('[ -d %s/.rootfs_cache ] && [ -r %s/.backup_meta ] && . %s/.backup_meta '
          '&& echo "$META_DATE | $META_DISTRO | $META_SIZE"' % (BASE, BASE, BASE))
timings = {}


def timed(label):
    class Timer:
        def __enter__(self):
            self.started = time.monotonic()

        def __exit__(self, *exc):
            timings[label] = round(time.monotonic() - self.started, 1)
            print("%-52s %6.1f s" % (label, timings[label]))
    return Timer()


@pytest.fixture(scope="module")
def vm(sandbox):
    """A lab VM (Debian 12, a blank 12 GiB disk as /dev/vdb), stopped and removed at the end."""
    state = os.path.join(sandbox, "distroclone-lab")
    os.makedirs(state)
    try:
        with timed("boot the lab VM"):
            facts = json.loads(run(LAB + ["up", "e2e", state]).stdout)
        inventory = os.path.join(state, "inventory.json")
        with open(inventory, "w") as handle:
            handle.write(run(LAB + ["inventory", state]).stdout)
        facts["inventory"] = inventory
        facts["state"] = state
        yield facts
    finally:
        subprocess.run(LAB + ["down", "e2e", state], check=False)


def ssh(vm, command, check=True):
    return subprocess.run(ssh_argv(vm, command), text=True, capture_output=True, check=check)


def playbook(vm, text, result_var, **extravars):
    """Runs a playbook against the VM; returns the variable result_var the roles registered."""
    path = os.path.join(vm["state"], "play.yml")
    with open(path, "w") as handle:
        handle.write(text + RESULT_TASK % result_var)
    env = dict(os.environ, ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
               ANSIBLE_PIPELINING="1")
    out = subprocess.run(["ansible-playbook", "-i", vm["inventory"], path, "-e", json.dumps(extravars)],
                         text=True, capture_output=True, env=env, check=False)
    try:
        tasks = [task for play in json.loads(out.stdout)["plays"] for task in play["tasks"]]
    except ValueError:
        pytest.fail("ansible-playbook gave no JSON (exit %d):\n%s\n%s" % (out.returncode, out.stdout, out.stderr))
    if out.returncode != 0:
        failed = [task["hosts"]["e2e"].get("msg") for task in tasks if task["hosts"].get("e2e", {}).get("failed")]
        pytest.fail("ansible-playbook failed: %s" % failed)
    return tasks[-1]["hosts"]["e2e"][result_var]


RESULT_TASK = """
  post_tasks:
    - name: Show the result
      ansible.builtin.debug:
        var: %s
"""

BACKUP = """
- name: Back the VM up onto its blank disk
  hosts: all
  gather_facts: false
  roles:
    - role: liveclone.core.rootfs_backup
      rootfs_backup_device: /dev/vdb
      rootfs_backup_format_device: true
      rootfs_backup_keep: 2
      rootfs_backup_state: "{{ state | default('present') }}"
      # Under QEMU's emulation the VM backs up at 2-3 MB/s: the kernel's
      # modules (390 of 850 MB) stay out, as in the Molecule scenario. The live
      # system boots to its login without them (its initramfs has what the
      # boot needs); an ISO with every module is booted in the backing-store
      # e2e test, and by the main command.
      rootfs_backup_exclude: [/usr/lib/modules/*]
"""

BUILD = """
- name: Build the live ISO from the newest snapshot and fetch it
  hosts: all
  gather_facts: false
  roles:
    - role: liveclone.core.live_iso
      live_iso_cache_dir: /mnt/debian_backup
      live_iso_hostname: e2e-live
      live_iso_root_password: "{{ root_password }}"
      live_iso_compression: lz4
      live_iso_fetch_dest: "{{ fetch_dest }}"
"""


def backup(vm, state="present"):
    return playbook(vm, BACKUP, "rootfs_backup_result", state=state)


def snapshot_numbers(vm):
    out = ssh(vm, "snapper --no-dbus --jsonout -c distroclone-backup list").stdout
    return [item["number"] for item in json.loads(out)["distroclone-backup"] if item["number"] != 0]


def test_backup_then_build_from_cache(vm, sandbox):
    # What must stay out of the live system, planted before the first backup.
    ssh(vm, "useradd --create-home --uid 1000 alice && echo private > /home/alice/secret.txt")
    ssh(vm, "echo planted > /etc/ssh/ssh_host_e2e_planted_key && chmod 600 /etc/ssh/ssh_host_e2e_planted_key")
    vm_host_key = ssh(vm, "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[1]

    with timed("full backup (blank disk formatted, 460 MB root)"):
        full = backup(vm)
    assert full["changed"] and full["snapshot_created"]["name"] == "1"
    assert snapshot_numbers(vm) == [1]

    ssh(vm, "echo 'made before the incremental backup' > /etc/e2e-incremental.conf")
    with timed("incremental backup"):
        incremental = backup(vm)
    assert incremental["snapshot_created"]["name"] == "2"
    assert 0 < incremental["transfer"]["changes"] < 50, incremental["transfer"]["changed_paths"]
    assert "etc/e2e-incremental.conf" in " ".join(incremental["transfer"]["changed_paths"])
    # That an unchanged backup takes no snapshot is the backup_then_build
    # scenario's idempotence step (one snapshot after converge and idempotence).

    ssh(vm, "echo 'made before the third backup' > /etc/e2e-third.conf")
    with timed("third backup (retention: keep 2)"):
        third = backup(vm)
    assert third["snapshot_created"]["name"] == "3"
    assert [snap["name"] for snap in third["snapshots_pruned"]] == ["1"]
    assert snapshot_numbers(vm) == [2, 3]
    # Not in the cache at all: /home is excluded by default.
    assert ssh(vm, "test -e %s/.rootfs_cache/home/alice" % BASE, check=False).returncode != 0

    # DistroClone's detection finds the cache and builds its label from .backup_meta.
    label = ssh(vm, DETECT).stdout.strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d \| Debian GNU/Linux \| [\d.]+[KMGT]", label), label

    fetch_dest = os.path.join(vm["state"], "artifacts")
    with timed("build the ISO from snapshot 3 on the VM, and fetch it"):
        built = playbook(vm, BUILD, "live_iso_result", root_password=ROOT_PASSWORD, fetch_dest=fetch_dest)
    assert built["changed"] and built["source"]["snapshot"] == "3"
    iso = os.path.join(fetch_dest, "e2e", "live.iso")

    with LiveMachine(iso, vm["state"]) as machine, timed("boot the ISO and check the live system"):
        machine.boot(entry=0)
        machine.login("root", ROOT_PASSWORD)
        print("login prompt after %s s" % machine.timings["login_prompt"])
        assert machine.check("cat /etc/e2e-incremental.conf") == "made before the incremental backup"
        assert machine.check("cat /etc/e2e-third.conf") == "made before the third backup"
        assert machine.run("test -e /home/alice")[0] != 0
        assert machine.run("getent passwd alice")[0] != 0
        assert machine.run("test -e /etc/ssh/ssh_host_e2e_planted_key")[0] != 0
        live_key = machine.check("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").split()[1]
        assert live_key != vm_host_key
        assert machine.check("hostname") == "e2e-live"

    # A plain rm -rf cannot delete read-only snapshots; state: absent can.
    failed = ssh(vm, "rm -rf %s/.rootfs_cache/.snapshots/2/snapshot/etc" % BASE, check=False)
    assert failed.returncode != 0 and "Read-only file system" in failed.stderr
    with timed("delete the cache (state: absent)"):
        removed = backup(vm, state="absent")
    assert removed["changed"]
    assert ssh(vm, "ls -A %s" % BASE).stdout.split() == []
    assert "distroclone-backup" not in ssh(vm, "snapper --no-dbus list-configs").stdout
    assert ssh(vm, DETECT, check=False).returncode != 0
    again = backup(vm, state="absent")
    assert not again["changed"]
    print("timings: %s" % json.dumps(timings))
