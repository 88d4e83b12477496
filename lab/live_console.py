"""A live ISO booted in QEMU (TCG) and driven over its serial console: choose
a GRUB entry, log in, run commands, power off. Used by the end-to-end tests
and the main command.

usage: live_console.py ISO USER PASSWORD [FIRMWARE]
  boots the ISO's first entry (FIRMWARE bios, the default, uefi, or secboot:
  UEFI with Secure Boot enforcing), logs in, and prints JSON: the GRUB menu,
  the login prompt and when it came, and the user's groups.

    with LiveMachine(iso, work_dir, disks=[stick], ssh_port=port) as machine:
        machine.boot(entry=1)              # the second menu entry
        machine.login("root", "secret")
        rc, out = machine.run("df -h /")
        machine.poweroff()

QEMU is stopped by its own PID when the block ends, whatever happened.
Everything the console printed is kept in work_dir/console-N.log.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from lab import CPU_MODEL, CPUS

GRUB_MARKER = b"Live system ("
# What a boot that cannot reach a login prints: waiting out the limit after
# one of these only delays the failure.
BOOT_FAILURES = re.compile(rb"Kernel panic - not syncing|\(initramfs\) $|You are in emergency mode"
                           rb"|Give root password for maintenance|Press Enter for maintenance")
DOWN_ARROW = b"\x1b[B"
SECBOOT_CODE = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
SECBOOT_VARS = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b.|\r")
_runs = itertools.count(1)


class ConsoleError(Exception):
    """The machine did not show what was expected; the message quotes the console's tail."""


class LiveMachine:
    def __init__(self, iso, work_dir, disks=(), ssh_port=None, firmware="bios", memory_mib=2048):
        self.iso = iso
        self.work_dir = work_dir
        self.disks = list(disks)
        self.ssh_port = ssh_port
        self.firmware = firmware
        self.memory_mib = memory_mib
        self.run_number = next(_runs)
        self.log_path = os.path.join(work_dir, "console-%d.log" % self.run_number)
        self.process = None
        self.serial = None
        self.console = b""
        # Where expect() starts looking: the console since the last command.
        self.mark = 0
        self.started = None
        self.timings = {}
        self._commands = itertools.count(1)

    # --- the QEMU process --------------------------------------------------

    def _argv(self, sock_path):
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", CPU_MODEL, "-m", str(self.memory_mib), "-smp", str(CPUS),
                "-cdrom", self.iso, "-boot", "d", "-display", "none", "-monitor", "none",
                "-serial", "unix:%s,server=on,wait=on" % sock_path]
        if self.firmware == "uefi":
            # OVMF writes its variables into the firmware file: give it a copy.
            ovmf = os.path.join(self.work_dir, "OVMF-%d.fd" % self.run_number)
            shutil.copyfile("/usr/share/ovmf/OVMF.fd", ovmf)
            argv += ["-bios", ovmf]
        elif self.firmware == "secboot":
            # Secure Boot enforcing: OVMF's secure build (SMM on q35) and a
            # fresh copy of the variables with Microsoft's keys enrolled.
            variables = os.path.join(self.work_dir, "OVMF-%d.vars.fd" % self.run_number)
            shutil.copyfile(SECBOOT_VARS, variables)
            argv += ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on",
                     "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=%s" % SECBOOT_CODE,
                     "-drive", "if=pflash,format=raw,unit=1,file=%s" % variables]
        if self.disks:
            argv += ["-device", "qemu-xhci"]
            for number, disk in enumerate(self.disks):
                argv += ["-drive", "file=%s,if=none,id=usb%d,format=raw" % (disk, number),
                         "-device", "usb-storage,drive=usb%d,removable=on" % number]
        if self.ssh_port:
            argv += ["-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:%d-:22" % self.ssh_port,
                     "-device", "virtio-net-pci,netdev=net0"]
        else:
            argv += ["-nic", "none"]
        return argv

    def __enter__(self):
        sock_path = os.path.join(self.work_dir, "serial-%d.sock" % self.run_number)
        self.process = subprocess.Popen(self._argv(sock_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.started = time.monotonic()
        while self.serial is None and time.monotonic() - self.started < 30:
            try:
                serial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                serial.connect(sock_path)
                self.serial = serial
            except OSError:
                time.sleep(0.2)
        if self.serial is None:
            self.stop()
            raise ConsoleError("QEMU did not open its serial console: %s" % self.process.stderr.read().decode())
        self.serial.settimeout(1)
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.kill()
        if self.process:
            self.process.wait()
        if self.serial:
            self.serial.close()
            self.serial = None
        with open(self.log_path, "ab") as handle:
            handle.write(self.console)
        for name in os.listdir(self.work_dir):
            if name.startswith(("serial-%d." % self.run_number, "OVMF-%d." % self.run_number)):
                os.unlink(os.path.join(self.work_dir, name))

    # --- the console -------------------------------------------------------

    def text(self, data=None):
        """Console bytes as readable text, without terminal escapes."""
        return _ANSI.sub("\n", (self.console if data is None else data).decode(errors="replace"))

    def expect(self, pattern, timeout):
        """Read until the regular expression (bytes) matches what was read since `self.mark`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.console, self.mark)
            if match:
                return match
            failure = BOOT_FAILURES.search(self.console, self.mark)
            if failure:
                raise ConsoleError("the boot failed (%r) while waiting for %r; the console's last lines:\n%s" % (
                    failure.group().decode(errors="replace"), pattern, self.text(self.console[-3000:])))
            if time.monotonic() >= deadline:
                raise ConsoleError("waited %d s for %r; the console's last lines:\n%s" % (
                    timeout, pattern, self.text(self.console[-1500:])))
            try:
                chunk = self.serial.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise ConsoleError("the machine stopped while waiting for %r:\n%s" % (
                    pattern, self.text(self.console[-1500:])))
            self.console += chunk

    def send(self, data):
        self.serial.sendall(data)

    # --- steps -------------------------------------------------------------

    def choose(self, entry=0, timeout=900):
        """Wait for GRUB's menu and choose entry (0 = first)."""
        self.expect(re.escape(GRUB_MARKER), timeout)
        # GRUB prints its countdown once the whole menu is drawn; the first
        # key stops it.
        self.expect(rb"executed automatically", 60)
        self.send(DOWN_ARROW * entry + b"\r")
        self.timings["menu"] = round(time.monotonic() - self.started, 1)
        self.mark = len(self.console)

    def boot(self, entry=0, timeout=900):
        """Choose entry and wait for the login prompt. The limit is over three
        times the slowest boot measured under load: a boot that fails
        (BOOT_FAILURES) ends at once, not at the limit."""
        self.choose(entry, timeout)
        self.expect(rb"login: *$", timeout - self.timings["menu"])
        self.timings["login_prompt"] = round(time.monotonic() - self.started, 1)

    def menu(self):
        """The GRUB menu entries the console showed."""
        return sorted({line.strip(" *|") for line in self.text().splitlines()
                       if "Live system" in line and not line.strip().startswith("Booting")})

    def login(self, user, password):
        time.sleep(3)  # getty settles after printing the prompt
        self.mark = len(self.console)
        self.send(user.encode() + b"\n")
        self.expect(rb"Password:", 60)
        self.mark = len(self.console)
        self.send(password.encode() + b"\n")
        self.expect(rb"[$#] $", 90)
        # No echo, no prompt and wide lines: the output of a command is only
        # its output. Kernel messages stay off the console.
        self.run("stty -echo cols 1000; PS1=''; PS2=''; dmesg -n 1 2>/dev/null || true")

    def logout(self, timeout=60):
        """End the shell; wait for getty's next login prompt."""
        self.mark = len(self.console)
        self.send(b"exit\n")
        self.expect(rb"login: *$", timeout)

    def run(self, command, timeout=120):
        """(exit status, output) of a shell command line."""
        number = next(self._commands)
        self.mark = len(self.console)
        # E""ND: the marker's text appears only in what echo prints, not in the
        # command line the terminal may echo.
        self.send(b"%s; echo \"__LC%d=$?=E\"\"ND\"\n" % (command.encode(), number))
        match = self.expect(rb"__LC%d=(\d+)=END" % number, timeout)
        output = self.text(self.console[self.mark:match.start()])
        return int(match.group(1)), output.strip()

    def check(self, command, timeout=120):
        rc, output = self.run(command, timeout)
        if rc != 0:
            raise ConsoleError("%r exited %d:\n%s" % (command, rc, output))
        return output

    def poweroff(self, timeout=180):
        """Shut the system down cleanly and wait for QEMU to exit."""
        self.send(b"systemctl poweroff\n")
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ConsoleError("the machine did not power off within %d s:\n%s" % (
                timeout, self.text(self.console[-1500:]))) from None
        self._drain()

    def _drain(self):
        """Keep what the console printed last, up to QEMU's exit."""
        with contextlib.suppress(OSError):
            while True:
                chunk = self.serial.recv(65536)
                if not chunk:
                    return
                self.console += chunk


def main(argv):
    if len(argv) not in (3, 4):
        raise SystemExit(__doc__)
    iso, user, password = argv[:3]
    work = tempfile.mkdtemp(prefix="live-console-")
    try:
        with LiveMachine(iso, work, firmware=argv[3] if len(argv) == 4 else "bios") as machine:
            machine.boot(entry=0)
            prompt = [line.strip() for line in machine.text().splitlines() if line.rstrip().endswith("login:")]
            machine.login(user, password)
            seen = {"menu": machine.menu(), "prompt": prompt[-1:],
                    "seconds_to_login_prompt": machine.timings["login_prompt"],
                    "groups": machine.check("id -nG").split()}
    finally:
        shutil.rmtree(work)
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1:])
