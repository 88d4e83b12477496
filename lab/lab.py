"""The lab: disposable Debian 12 VMs under QEMU (TCG; nested KVM hangs on the
development machines), for Molecule scenarios and the main command.

usage:
  lab.py image                       build or reuse the cached image; print its directory
  lab.py up NAME STATE_DIR           boot VM NAME; print its connection facts as JSON
  lab.py down NAME STATE_DIR         stop VM NAME by its PID and remove its files
  lab.py inventory STATE_DIR         print an Ansible inventory (YAML) of the running VMs

Each VM runs from a copy-on-write overlay of the cached image, with SSH
forwarded to a free 127.0.0.1 port, and two blank extra disks: a virtio disk
for the btrfs backup volume (/dev/vdb in the guest) and a USB stick
(/dev/sda). Everything a VM owns lives in STATE_DIR/NAME; down removes it after
stopping QEMU, and stops only a process whose command line names that
directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MEMORY_MIB = int(os.environ.get("LIVECLONE_LAB_MEMORY", "3072"))
# Two vCPUs for a VM alone (the main command). Where VMs run side by side on
# a 2-core machine (the test suite sets 1), one each does more: two VMs with
# 1 vCPU booted in 52 s and ran the same squashfs-and-rsync load in 48 s,
# with 2 vCPUs 76 s and 67 s (under TCG a vCPU whose peer holds a lock spins).
CPUS = int(os.environ.get("LIVECLONE_LAB_CPUS", "2"))
# TCG emulates a plain x86-64 CPU faster than "max" (no AVX paths in glibc and
# Python to emulate): Python starts 1.7x and rsync runs 1.4x faster.
CPU_MODEL = os.environ.get("LIVECLONE_LAB_CPU_MODEL", "qemu64")
BACKUP_DISK = "12G"
STICK_DISK = "2G"
# Over four times the slowest boot measured under load (a failed boot ends at once).
SSH_TIMEOUT = 600
# What a boot that cannot reach sshd prints on the console: stop at once.
BOOT_FAILURES = re.compile(rb"Kernel panic - not syncing|\(initramfs\) |You are in emergency mode"
                           rb"|Give root password for maintenance")
# Ansible's default ssh_args without -C: compressing what does not compress
# (an ISO being fetched) costs an emulated VM 20 s per 100 MB.
SSH_ARGS = "-o ControlMaster=auto -o ControlPersist=60s"


def image_dir():
    out = subprocess.run(["bash", os.path.join(HERE, "build_image.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ssh_argv(facts, *command):
    return ["ssh", "-i", facts["key"], "-p", str(facts["port"]), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
            "-o", "BatchMode=yes", "root@127.0.0.1", *command]


def running(pid, vm_dir):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return vm_dir.encode() in handle.read()
    except OSError:
        return False


def read_facts(vm_dir):
    with open(os.path.join(vm_dir, "facts.json")) as handle:
        return json.load(handle)


def up(name, state_dir):
    vm_dir = os.path.abspath(os.path.join(state_dir, name))
    if os.path.exists(os.path.join(vm_dir, "facts.json")):
        facts = read_facts(vm_dir)
        if running(facts["pid"], vm_dir):
            return facts
        down(name, state_dir)
    image = image_dir()
    os.makedirs(vm_dir)
    overlay = os.path.join(vm_dir, "root.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    os.path.join(image, "rootfs.raw"), overlay], check=True)
    disks = {"backup": os.path.join(vm_dir, "backup.qcow2"), "stick": os.path.join(vm_dir, "stick.raw")}
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disks["backup"], BACKUP_DISK], check=True)
    subprocess.run(["truncate", "--size", STICK_DISK, disks["stick"]], check=True)
    port = free_port()
    pidfile = os.path.join(vm_dir, "qemu.pid")
    argv = [
        "qemu-system-x86_64", "-name", "liveclone-lab-%s" % name, "-accel", "tcg", "-cpu", CPU_MODEL,
        "-m", str(MEMORY_MIB), "-smp", str(CPUS), "-display", "none", "-monitor", "none",
        "-kernel", os.path.join(image, "vmlinuz"), "-initrd", os.path.join(image, "initrd.img"),
        "-append", "root=/dev/vda rw console=ttyS0,115200 net.ifnames=0 systemd.show_status=0",
        "-drive", "file=%s,if=virtio,format=qcow2,cache=unsafe" % overlay,
        "-drive", "file=%s,if=virtio,format=qcow2,cache=unsafe" % disks["backup"],
        "-drive", "file=%s,if=none,id=stick,format=raw,cache=unsafe" % disks["stick"],
        "-device", "qemu-xhci", "-device", "usb-storage,drive=stick,removable=on",
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:%d-:22" % port, "-device", "virtio-net-pci,netdev=net0",
        "-serial", "file:%s" % os.path.join(vm_dir, "console.log"),
        "-daemonize", "-pidfile", pidfile,
    ]
    subprocess.run(argv, check=True)
    with open(pidfile) as handle:
        pid = int(handle.read())
    facts = {"name": name, "pid": pid, "port": port, "host": "127.0.0.1", "user": "root",
             "key": os.path.join(image, "id_ed25519"), "dir": vm_dir, "image": image,
             "backup_device": "/dev/vdb", "stick_device": "/dev/sda", "disks": disks}
    with open(os.path.join(vm_dir, "facts.json"), "w") as handle:
        json.dump(facts, handle)
    started = time.monotonic()
    while time.monotonic() - started < SSH_TIMEOUT:
        if not running(pid, vm_dir):
            raise SystemExit("VM %s stopped while booting; see %s/console.log" % (name, vm_dir))
        failure = boot_failure(os.path.join(vm_dir, "console.log"))
        if failure:
            down(name, state_dir)
            raise SystemExit("VM %s failed to boot (%s); the console's last lines:\n%s" % (name, *failure))
        if subprocess.run(ssh_argv(facts, "true"), capture_output=True, check=False).returncode == 0:
            facts["seconds_to_ssh"] = round(time.monotonic() - started, 1)
            with open(os.path.join(vm_dir, "facts.json"), "w") as handle:
                json.dump(facts, handle)
            return facts
        time.sleep(2)
    down(name, state_dir)
    raise SystemExit("VM %s did not answer ssh within %d s" % (name, SSH_TIMEOUT))


def boot_failure(console_log):
    """(what matched, the console's tail) if the boot failed, else None."""
    try:
        with open(console_log, "rb") as handle:
            console = handle.read()
    except FileNotFoundError:
        return None
    match = BOOT_FAILURES.search(console)
    if match is None:
        return None
    return match.group().decode(errors="replace"), console[-2000:].decode(errors="replace")


def down(name, state_dir):
    vm_dir = os.path.abspath(os.path.join(state_dir, name))
    if not os.path.isdir(vm_dir):
        return
    pidfile = os.path.join(vm_dir, "qemu.pid")
    if os.path.exists(pidfile):
        with open(pidfile) as handle:
            pid = int(handle.read())
        if running(pid, vm_dir):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while running(pid, vm_dir) and time.monotonic() < deadline:
                time.sleep(0.2)
            if running(pid, vm_dir):
                os.kill(pid, signal.SIGKILL)
    # The VM's files are plain files: nothing is mounted under STATE_DIR.
    shutil.rmtree(vm_dir)


def inventory(state_dir):
    hosts = {}
    for name in sorted(os.listdir(state_dir)):
        path = os.path.join(state_dir, name, "facts.json")
        if os.path.exists(path):
            facts = read_facts(os.path.join(state_dir, name))
            hosts[name] = {
                "ansible_host": facts["host"], "ansible_port": facts["port"], "ansible_user": facts["user"],
                "ansible_ssh_private_key_file": facts["key"], "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                "ansible_ssh_args": SSH_ARGS,
                "lab_backup_device": facts["backup_device"], "lab_stick_device": facts["stick_device"],
            }
    return {"all": {"hosts": hosts}}


def main(argv):
    if not argv:
        raise SystemExit(__doc__)
    command, args = argv[0], argv[1:]
    if command == "image" and not args:
        print(image_dir())
    elif command == "up" and len(args) == 2:
        print(json.dumps(up(*args)))
    elif command == "down" and len(args) == 2:
        down(*args)
    elif command == "inventory" and len(args) == 1:
        print(json.dumps(inventory(*args), indent=2))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
