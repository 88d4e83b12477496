"""Boot an ISO in QEMU (TCG), read its serial console, and log in.

usage: boot_iso.py ISO bios|uefi USER PASSWORD [TIMEOUT]

Waits for GRUB's menu and a login prompt on the first serial port, logs in
as USER, runs `id -nG`, and prints JSON with what it saw and how long each
step took. QEMU is always stopped, by its own PID.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

iso, firmware, user, password = sys.argv[1:5]
timeout = int(sys.argv[5]) if len(sys.argv) > 5 else 400
work = tempfile.mkdtemp(prefix="boot-iso-")
sock_path = os.path.join(work, "serial.sock")
command = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2",
           "-cdrom", iso, "-display", "none", "-monitor", "none", "-no-reboot",
           "-serial", "unix:%s,server=on,wait=on" % sock_path]
if firmware == "uefi":
    # OVMF writes its variables into the firmware file: give it a copy.
    ovmf = os.path.join(work, "OVMF.fd")
    with open("/usr/share/ovmf/OVMF.fd", "rb") as src, open(ovmf, "wb") as dst:
        dst.write(src.read())
    command += ["-bios", ovmf]
qemu = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
seen = {"firmware": firmware, "grub_menu": False, "login_prompt": False, "logged_in": False, "groups": None}
started = time.monotonic()
console = b""
try:
    serial = None
    while serial is None and time.monotonic() - started < 30:
        try:
            serial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            serial.connect(sock_path)
        except OSError:
            serial = None
            time.sleep(0.2)
    serial.settimeout(1)

    def expect(marker, limit):
        global console
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if marker in console:
                return True
            try:
                chunk = serial.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                return False
            console += chunk
        return marker in console

    seen["grub_menu"] = expect(b"Live system (", timeout)
    seen["login_prompt"] = expect(b"login:", timeout - (time.monotonic() - started))
    seen["seconds_to_login_prompt"] = round(time.monotonic() - started, 1)
    # What the serial console showed, for people: the menu entries and the prompt.
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b.|\r", "\n", console.decode(errors="replace"))
    seen["menu"] = sorted({line.strip(" *|") for line in text.splitlines() if "Live system" in line})
    seen["prompt"] = [line.strip() for line in text.splitlines() if line.rstrip().endswith("login:")][-1:]
    if seen["login_prompt"]:
        time.sleep(3)  # let getty settle after printing the prompt
        serial.sendall(user.encode() + b"\n")
        if expect(b"Password:", 60):
            serial.sendall(password.encode() + b"\n")
            if expect(b"$ ", 60):
                console = b""
                # The tty echoes the command: its text must not hold the marker.
                serial.sendall(b'echo GROUPS=$(id -nG)=E""ND\n')
            if expect(b"=END", 60):
                seen["logged_in"] = True
                text = console.decode(errors="replace")
                seen["groups"] = text[text.rindex("GROUPS=") + 7:text.rindex("=END")].split()
finally:
    qemu.kill()
    qemu.wait()
    seen["tail"] = console[-400:].decode(errors="replace")
    for name in os.listdir(work):
        os.unlink(os.path.join(work, name))
    os.rmdir(work)
print(json.dumps(seen))
sys.exit(0 if seen["logged_in"] else 1)
