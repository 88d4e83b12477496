"""End to end, the workflow of sysresccd-backing-store.txt with Debian
live-boot: a live ISO, a USB stick holding a backing store made by
`backstore`, changes made in a live session, the store grown by `backstore`
while the live system runs on it, a boot without the store (live-boot's
equivalent of `backstore=off`) that does not see the changes, and the next
persistent boot that has them all back, in the grown store. Three boots: the
grow shares the first with the changes (the earlier fourth boot only
repeated "changes survive a reboot").

The ISO is built with `live_iso` from the lab image's tree (it has sshd and
python3, so Ansible can reach the live system to grow its store), with the
module's default compression: the suite's one ISO of the default preset, and
it is booted. Each boot is a QEMU run of the ISO with the stick attached over
USB; a "reboot" is a clean power-off and a new run with the same stick. The
first boot uses BIOS firmware; the boot without the store and the last
persistent boot use UEFI with Secure Boot enforcing (OVMF's secure build with
Microsoft's keys), through the chain live_iso took from the image: shim, the
signed GRUB and the signed kernel. There the live user logs in first and must
be in sudo's group, and the kernel and the firmware say Secure Boot is on.
A negative control boots a copy of the ISO whose kernel lost its signature:
the signed GRUB refuses it."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
import time

import pytest
from conftest import REPO, ansible_module, run
from live_console import LiveMachine

from lab import free_port

ROOT_PASSWORD = "e2e-root"
LIVE_PASSWORD = "live"
# GRUB entries, in the order live_iso writes them.
PLAIN, PERSISTENT = 0, 1
MENU = ["Live system (E2E)", "Live system with persistence (E2E)", "Live system (safe graphics) (E2E)",
        "Live system (text mode) (E2E)"]
CHANGES = {
    "etc": "cat /etc/liveclone-e2e.conf",
    "user": "id -u e2e-user",
    "root": "cat /root/e2e-notes.txt",
}


@pytest.fixture(scope="module")
def live_iso(sandbox, lab_image):
    """A live ISO of the lab image's tree, with root's password set and sshd running."""
    work = os.path.join(sandbox, "backing-store")
    tree = os.path.join(work, "lab-tree")
    os.makedirs(tree)
    run(["mount", "-o", "ro,noload", os.path.join(lab_image, "rootfs.raw"), tree])
    try:
        started = time.monotonic()
        result = ansible_module("liveclone.core.live_iso", dest=os.path.join(work, "live.iso"), source="path",
                                source_path=tree, label="E2E", root_password=ROOT_PASSWORD,
                                # The module's default compression (zstd at
                                # mksquashfs's level): the preset users get, booted.
                                live_password=LIVE_PASSWORD,
                                # The lab's network unit names eth0.
                                boot_params=["net.ifnames=0"])
        squashed = [operation for operation in result["operations"] if operation.startswith("squashed")]
        assert squashed and "with zstd" in squashed[0], squashed
        # The lab image has shim-signed and grub-efi-amd64-signed: secure_boot's default (auto) takes them.
        chain = result["secure_boot"]
        assert chain["enabled"] and chain["shim"]["package"] == "shim-signed", chain
        assert chain["shim"]["sbat"]["shim"] >= 4 and chain["grub"]["sbat"]["grub"] >= 5, chain
        print("ISO built in %.0f s (%d bytes; %s)" % (time.monotonic() - started, result["size"], squashed[0]))
    finally:
        run(["umount", tree])
    return os.path.join(work, "live.iso")


@pytest.fixture(scope="module")
def stick(sandbox):
    """A 1 GiB USB stick image: one ext4 partition holding a live-boot store made by backstore."""
    image = os.path.join(sandbox, "backing-store", "stick.raw")
    run(["truncate", "--size", "1G", image])
    run(["sfdisk", "--quiet", image], input="label: dos\n,,L\n")
    # The partition through a loop device of its own: without udev, no
    # /dev/loopNp1 node appears for a partitioned loop device here.
    (partition,) = json.loads(run(["sfdisk", "--json", image]).stdout)["partitiontable"]["partitions"]
    device = run(["losetup", "--find", "--show", "--offset", str(partition["start"] * 512),
                  "--sizelimit", str(partition["size"] * 512), image]).stdout.strip()
    mount_point = os.path.join(sandbox, "backing-store", "stick")
    os.makedirs(mount_point)
    try:
        run(["mkfs.ext4", "-q", "-L", "LIVESTICK", device])
        run(["mount", device, mount_point])
        try:
            created = ansible_module("liveclone.core.backstore", path=mount_point, layout="live-boot", size="256M")
            assert created["changed"] and created["size"] == 256 * 2**20
        finally:
            run(["umount", mount_point])
    finally:
        run(["losetup", "--detach", device])
    return image


@pytest.fixture(scope="module")
def ssh_key(sandbox):
    """A key for Ansible to reach the live system; its public half goes in over the console."""
    key = os.path.join(sandbox, "backing-store", "e2e_key")
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "liveclone-e2e", "-f", key])
    return key


def start(machine, entry):
    """Boot GRUB entry `entry` and log in as root on the serial console."""
    machine.boot(entry=entry)
    print("boot %d (entry %d, %s): login prompt after %s s"
          % (machine.run_number, entry, machine.firmware, machine.timings["login_prompt"]))
    if machine.firmware == "secboot":
        # Under UEFI too: the whole menu on the serial line, and the live
        # user's login with sudo.
        shown = machine.text()
        assert all(title in shown for title in MENU), machine.menu()
        machine.login("live", LIVE_PASSWORD)
        assert "sudo" in machine.check("id -nG").split()
        machine.logout()
    machine.login("root", ROOT_PASSWORD)
    if machine.firmware == "secboot":
        # The kernel saw Secure Boot on (the Live entry boots quiet), the
        # firmware's variable says so, and the kernel locked itself down.
        assert "secureboot: Secure boot enabled" in machine.check("dmesg | grep -i 'secure boot'")
        assert machine.check("mokutil --sb-state") == "SecureBoot enabled"
        assert "[integrity]" in machine.check("cat /sys/kernel/security/lockdown")


def persistence_mount(machine):
    """Where live-boot mounted the stick's partition, and the store's filesystem."""
    flat = json.loads(machine.check("findmnt --list -J -o TARGET,SOURCE"))["filesystems"]
    partition = next(entry for entry in flat if entry["source"] == "/dev/sda1")
    store = next(entry for entry in flat if entry["target"].startswith("/run/live/persistence/")
                 and entry["source"].startswith("/dev/loop"))
    return partition["target"], store["target"]


def changes_present(machine):
    return {name: machine.run(command)[0] == 0 for name, command in CHANGES.items()}


def test_backing_store_grow_reboots_and_off(live_iso, stick, ssh_key):
    port = free_port()
    # First persistent boot: change the system, then grow the store with
    # backstore over SSH while the live system runs on it.
    with LiveMachine(live_iso, os.path.dirname(stick), disks=[stick], ssh_port=port) as machine:
        start(machine, PERSISTENT)
        assert changes_present(machine) == dict.fromkeys(CHANGES, False)
        machine.check("echo 'managed by the e2e test' > /etc/liveclone-e2e.conf")
        machine.check("useradd --create-home e2e-user")
        machine.check("echo 'written before the reboot' > /root/e2e-notes.txt")
        # Data to compare after the grow and the reboots: 20 MiB that do not compress.
        machine.check("head -c 20M /dev/urandom > /root/e2e-random.bin")
        before_sum = machine.check("sha256sum /root/e2e-random.bin").split()[0]
        partition, store = persistence_mount(machine)
        size_before = int(machine.check("findmnt -n -b -o SIZE %s" % store))
        with open(ssh_key + ".pub") as handle:
            public_key = handle.read().strip()
        machine.check("install -d -m 0700 /root/.ssh && echo '%s' > /root/.ssh/authorized_keys" % public_key)
        machine.check("systemctl is-active ssh")
        started = time.monotonic()
        grown = ansible_module("liveclone.core.backstore", host="127.0.0.1", port=port,
                               key=ssh_key,
                               path=partition, layout="live-boot", size="512M")
        print("online grow from 256 MiB to 512 MiB: %.1f s over SSH" % (time.monotonic() - started))
        assert grown["changed"]
        assert any("online" in operation for operation in grown["operations"]), grown["operations"]
        size_after = int(machine.check("findmnt -n -b -o SIZE %s" % store))
        assert size_after > size_before + 200 * 2**20, (size_before, size_after)
        assert machine.check("sha256sum /root/e2e-random.bin").split()[0] == before_sum
        again = ansible_module("liveclone.core.backstore", host="127.0.0.1", port=port,
                               key=ssh_key,
                               path=partition, layout="live-boot", size="512M")
        assert not again["changed"]
        machine.poweroff()

    # A boot without the store, under Secure Boot: none of the changes, the stick not mounted.
    with LiveMachine(live_iso, os.path.dirname(stick), disks=[stick], firmware="secboot") as machine:
        start(machine, PLAIN)
        assert changes_present(machine) == dict.fromkeys(CHANGES, False)
        assert machine.run("findmnt -n /dev/sda1")[0] != 0
        machine.poweroff()

    # The next persistent boot, under Secure Boot: every change is back after
    # two reboots, in the grown store, the data intact.
    with LiveMachine(live_iso, os.path.dirname(stick), disks=[stick], firmware="secboot") as machine:
        start(machine, PERSISTENT)
        assert changes_present(machine) == dict.fromkeys(CHANGES, True)
        assert machine.check("sha256sum /root/e2e-random.bin").split()[0] == before_sum
        _partition, store = persistence_mount(machine)
        assert int(machine.check("findmnt -n -b -o SIZE %s" % store)) == size_after
        machine.poweroff()


def test_unsigned_kernel_refused_under_secure_boot(live_iso, sandbox):
    """The negative control: the same ISO, its kernel's signature taken away
    (the PE certificate table's entry zeroed, in place), under enforcing
    firmware. shim and the signed GRUB load (the menu shows); the kernel is refused."""
    # The collection's own PE reader, imported from the staged collection as its package (it imports
    # its package's error base): REPO is <root>/ansible_collections/liveclone/core.
    collections_root = os.path.dirname(os.path.dirname(os.path.dirname(REPO)))
    if collections_root not in sys.path:
        sys.path.insert(0, collections_root)
    pe = importlib.import_module("ansible_collections.liveclone.core.plugins.module_utils._common.pe")
    work = os.path.join(sandbox, "unsigned-kernel")
    os.makedirs(work)
    iso = os.path.join(work, "unsigned.iso")
    shutil.copyfile(live_iso, iso)
    report = run(["xorriso", "-indev", iso, "-find", "/live/vmlinuz", "-exec", "report_lba", "--"]).stdout
    # "File data lba: extent, start block, blocks, bytes, path"
    start_block, size = re.search(r"File data lba:\s+\d+\s*,\s*(\d+)\s*,\s*\d+\s*,\s*(\d+)", report).groups()
    start_byte = int(start_block) * 2048
    with open(iso, "r+b") as handle:
        handle.seek(start_byte)
        kernel = handle.read(int(size))
        assert pe.is_signed(kernel), "the ISO's kernel carries no signature to take away"
        handle.seek(start_byte + pe.signature_entry_offset(kernel))
        handle.write(b"\0" * 8)
    with LiveMachine(iso, work, firmware="secboot") as machine:
        machine.choose(PLAIN)
        machine.expect(rb"bad shim signature", 300)
        refused_after = time.monotonic() - machine.started - machine.timings["menu"]
        print("unsigned kernel: refused %.1f s after the menu" % refused_after)
        assert b"EFI stub" not in machine.console[machine.mark:]
