"""The ISO the live_iso role built on each lab VM, and its fetched copy."""

import hashlib
import os

ISO = "/var/lib/liveclone/live.iso"


def local_sha256(path):
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def test_iso_and_checksum_file(host):
    assert host.file(ISO).size > 100 << 20
    remote = host.check_output("sha256sum %s" % ISO).split()[0]
    assert host.file(ISO + ".sha256").content_string.split() == [remote, "live.iso"]
    assert host.run("cd /var/lib/liveclone && sha256sum --check --status live.iso.sha256").rc == 0


def test_iso_boots_bios_and_uefi(host):
    report = host.check_output("xorriso -indev %s -report_el_torito plain 2>/dev/null" % ISO)
    assert "BIOS" in report and "UEFI" in report


def test_fetched_copy_matches(host):
    name = host.backend.get_hostname()
    fetched = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "artifacts", name, "live.iso")
    remote = host.check_output("sha256sum %s" % ISO).split()[0]
    assert local_sha256(fetched) == remote
    with open(fetched + ".sha256") as handle:
        assert handle.read().split() == [remote, "live.iso"]
