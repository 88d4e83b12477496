# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""live_iso's Secure Boot: the PE reader, SBAT, and the choice of the chain
from what a tree holds (auto, required, off; install_missing)."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess

import pytest
from test_live_iso import ToolRunner, desired

from ansible_collections.liveclone.core.plugins.module_utils._common import pe
from ansible_collections.liveclone.core.plugins.module_utils._common.beneath import Tree
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import boot
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import image as image_
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import secure_boot as secure
from ansible_collections.liveclone.core.plugins.module_utils._live_iso.desired import IsoError

SHIM_SBAT = (b"sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md\n"
             b"shim,4,UEFI shim,shim,1,https://github.com/rhboot/shim\n"
             b"shim.debian,1,Debian,shim,16.1,https://tracker.debian.org/pkg/shim\n")
GRUB_SBAT = (b"sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md\n"
             b"grub,5,Free Software Foundation,grub,2.06,https://www.gnu.org/software/grub/\n"
             b"grub.debian,5,Debian,grub2,2.06-13+deb12u2,https://tracker.debian.org/pkg/grub2\n")


def sbat_level(previous, latest):
    """A .sbatlevel section as shim carries it: a version, two offsets counted after it, two texts."""
    first = previous.encode() + b"\0"
    return struct.pack("<III", 0, 8, 8 + len(first)) + first + latest.encode() + b"\0"


def make_pe(sections, signed=True):
    """A PE32+ image with these sections (a name over 8 bytes goes through the
    string table, as in shim) and, if signed, a certificate table."""
    optional_size = 112 + 16 * 8
    table = 0x40 + 24 + optional_size
    data_start = table + 40 * len(sections)
    strings = b""
    headers, body = b"", b""
    for name, content in sections.items():
        raw = name.encode()
        if len(raw) > 8:
            raw = b"/%d" % (4 + len(strings))
            strings += name.encode() + b"\0"
        headers += struct.pack("<8sIIII16x", raw, len(content), 0x1000, len(content) + 3, data_start + len(body))
        body += content + b"\0\0\0"  # raw size padded beyond the virtual size
    symbols = data_start + len(body)
    string_table = struct.pack("<I", 4 + len(strings)) + strings
    certificate = b"\x30\x82" + b"signature" * 4
    certificate_at = symbols + len(string_table)
    directories = [(0, 0)] * 16
    if signed:
        directories[4] = (certificate_at, len(certificate))
    optional = struct.pack("<H106xI", 0x20B, 16) + b"".join(struct.pack("<II", *entry) for entry in directories)
    dos = b"MZ" + b"\0" * 0x3A + struct.pack("<I", 0x40)
    coff = b"PE\0\0" + struct.pack("<HHIIIHH", 0x8664, len(sections), 0, symbols, 0, optional_size, 0x22)
    image = dos + coff + optional + headers + body + string_table
    return image + (certificate if signed else b"")


def test_sections_signature_and_sbat():
    level = sbat_level("sbat,1,2025021800\nshim,4\ngrub,5\n", "sbat,1,2025051000\nshim,4\ngrub,5\ngrub.x,2\n")
    image = make_pe({".text": b"code", ".sbatlevel": level, ".sbat": SHIM_SBAT})
    found = pe.sections(image)
    assert list(found) == [".text", ".sbatlevel", ".sbat"]
    assert found[".text"] == b"code"  # cut at the virtual size
    assert pe.is_signed(image) and not pe.is_signed(make_pe({".text": b"code"}, signed=False))
    assert not pe.is_signed(b"not a PE image")
    entries = pe.sbat_entries(image)
    assert entries["shim"].generation == 4 and entries["shim.debian"].version == "16.1"
    assert pe.sbat_levels(image) == {"previous": {"sbat": "2025021800", "shim": 4, "grub": 5},
                                     "latest": {"sbat": "2025051000", "shim": 4, "grub": 5, "grub.x": 2}}
    assert pe.sbat_violations(pe.parse_sbat("grub,4,FSF,grub,2.06,u\ngrub.debian,5,D,g,v,u\n"),
                              {"sbat": "x", "grub": 5, "shim": 4}) == [("grub", 4, 5)]
    with pytest.raises(pe.PeError):
        pe.sections(b"MZ" + b"\0" * 100)


def test_zeroing_the_certificate_entry_unsigns():
    image = bytearray(make_pe({".text": b"code"}))
    offset = pe.signature_entry_offset(bytes(image))
    image[offset:offset + 8] = b"\0" * 8
    assert not pe.is_signed(bytes(image))


def make_tree(root, shim=True, grub=True, mok=True, kernel_signed=True, grub_generation=5, shim_generation=4):
    shim_sbat = SHIM_SBAT.replace(b"shim,4,", b"shim,%d," % shim_generation)
    if shim_generation < 4:
        shim_sbat = shim_sbat.replace(b"shim,16.1", b"shim,15.7")
    files = {"etc/os-release": b"ID=debian\n",
             "boot/vmlinuz-6.1.0-9-amd64": make_pe({".text": b"kernel"}, signed=kernel_signed),
             "boot/initrd.img-6.1.0-9-amd64": b"initrd"}
    packages = {"linux-image-6.1.0-9-amd64": "6.1.1-1"}
    if shim:
        level = sbat_level("sbat,1,2025021800\nshim,4\ngrub,5\n", "sbat,1,2025051000\nshim,4\ngrub,5\n")
        files["usr/lib/shim/shimx64.efi.signed"] = make_pe({".text": b"shim", ".sbat": shim_sbat, ".sbatlevel": level})
        packages["shim-signed"] = "1.51~1+deb12u1+16.1-2~deb12u1"
    if grub:
        files["usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed"] = make_pe(
            {".text": b"grub", ".sbat": GRUB_SBAT.replace(b"grub,5,", b"grub,%d," % grub_generation)})
        packages["grub-efi-amd64-signed"] = "1+2.06+13+deb12u2"
    if mok:
        files["usr/lib/shim/mmx64.efi.signed"] = make_pe({".text": b"mok", ".sbat": SHIM_SBAT})
        packages["shim-helpers-amd64-signed"] = "1+16.1+2~deb12u1"
    files["var/lib/dpkg/status"] = "".join(
        "Package: %s\nStatus: install ok installed\nVersion: %s\n\n" % item for item in packages.items()).encode()
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def decide(root, **overrides):
    warnings = []
    with Tree(str(root)) as tree:
        return secure.decide(desired(**overrides), tree, warnings), warnings


def test_a_complete_chain_is_taken_and_reported(tmp_path):
    root = make_tree(tmp_path)
    for mode in ("auto", "required"):
        assert decide(root, secure_boot=mode) == ((True, []), [])
    assert decide(root, secure_boot="off") == ((False, []), [])
    with Tree(str(root)) as tree:
        report, warnings = secure.inspect(tree, secure.find_chain(tree, "the image"), "the image")
    assert warnings == []
    assert report["shim"] == {"package": "shim-signed", "version": "1.51~1+deb12u1+16.1-2~deb12u1",
                              "shim_version": "16.1", "sbat": {"shim": 4, "shim.debian": 1},
                              "sbat_level": {"latest": "2025051000", "previous": "2025021800"}}
    assert report["grub"]["sbat"] == {"grub": 5, "grub.debian": 5}
    assert report["kernel"] == {"package": "linux-image-6.1.0-9-amd64", "version": "6.1.1-1",
                                "release": "6.1.0-9-amd64", "sbat": {}}
    assert report["enabled"] and report["mok_manager"]


@pytest.mark.parametrize("lacks, packages", [
    (dict(shim=False), ["shim-signed"]),
    (dict(grub=False), ["grub-efi-amd64-signed"]),
    (dict(shim=False, grub=False, mok=False), ["shim-signed", "grub-efi-amd64-signed", "shim-helpers-amd64-signed"]),
])
def test_a_missing_piece(tmp_path, lacks, packages):
    root = make_tree(tmp_path, **lacks)
    # auto: today's unsigned chain, with a warning naming the packages.
    (chosen, warnings) = decide(root)
    assert chosen == (False, []) and len(warnings) == 1 and all(name in warnings[0] for name in packages)
    assert "boots on UEFI only with Secure Boot off" in warnings[0]
    # install_missing: they are installed into the image, and the chain is signed.
    assert decide(root, install_missing=True) == ((True, packages), [])
    assert decide(root, secure_boot="required", install_missing=True) == ((True, packages), [])
    # required: refused, naming what to install and the ways out.
    with pytest.raises(IsoError, match="secure_boot is required, but the source lacks .*apt-get install %s.*"
                       "install_missing: true.*secure_boot: off" % " ".join(packages)):
        decide(root, secure_boot="required")


def test_mok_manager_alone_missing_is_no_reason_to_install(tmp_path):
    root = make_tree(tmp_path, mok=False)
    assert decide(root) == ((True, []), [])
    with Tree(str(root)) as tree:
        report, _warnings = secure.inspect(tree, secure.find_chain(tree, "the image"), "the image")
    assert not report["mok_manager"]


def test_an_unsigned_kernel(tmp_path):
    root = make_tree(tmp_path, kernel_signed=False)
    (chosen, warnings) = decide(root, install_missing=True)
    assert chosen == (False, []) and "carries no signature" in warnings[0]
    with pytest.raises(IsoError, match="secure_boot is required, but the source's kernel "
                                       "/boot/vmlinuz-6.1.0-9-amd64 carries no signature"):
        decide(root, secure_boot="required")


def test_a_grub_older_than_shims_sbat_level_is_refused(tmp_path):
    root = make_tree(tmp_path, grub_generation=4)
    with pytest.raises(IsoError, match=r"refuses GRUB .*gcdx64.efi.signed by its SBAT level 2025021800 "
                                       r"\(grub generation 4, 5 required\).*upgrade shim-signed and "
                                       r"grub-efi-amd64-signed"):
        decide(root)
    assert decide(root, secure_boot="off") == ((False, []), [])


def test_a_shim_before_the_2024_revocations_is_warned_about(tmp_path):
    root = make_tree(tmp_path, shim_generation=3)
    with Tree(str(root)) as tree:
        report, warnings = secure.inspect(tree, secure.find_chain(tree, "the image"), "the image")
    assert report["shim"]["shim_version"] == "15.7"
    assert len(warnings) == 1 and "shim 15.7 in the image predates shim 15.8" in warnings[0]


def test_a_shim_link_out_of_the_tree_is_refused_not_followed(tmp_path):
    root = make_tree(tmp_path / "root", shim=False)
    outside = tmp_path / "outside.efi"
    outside.write_bytes(b"MZ host's own")
    (root / "usr/lib/shim/shimx64.efi.signed").symlink_to(outside)
    with pytest.raises(IsoError, match="is a symlink to .*outside.efi, which is no file inside the tree"):
        decide(root)


def test_the_signed_efi_image_and_iso_with_the_real_tools(tmp_path, monkeypatch):
    """efi.img from the image's chain (mtools) and the ISO (grub-mkrescue for
    BIOS, xorriso adding efi.img): the chain's own bytes inside, a grub.cfg that
    finds the ISO by its uuid, the same bytes in any time zone."""
    epoch = 1700000000
    rootfs = make_tree(tmp_path / "rootfs")
    digests = {}
    for zone in ("UTC", "Asia/Tokyo"):
        monkeypatch.setenv("TZ", zone)
        work = tmp_path / zone.replace("/", "_")
        iso_root = work / "iso"
        (iso_root / "boot/grub").mkdir(parents=True)
        (iso_root / "boot/grub/grub.cfg").write_text("set timeout=1\n")
        for path in (iso_root / "boot/grub/grub.cfg", iso_root / "boot/grub", iso_root / "boot", iso_root):
            os.utime(path, (epoch, epoch))
        runner = ToolRunner()
        maker = boot.BootMaker(runner, desired(), image_.ImageEditor(runner, desired()))
        report = maker.signed_efi_image(str(rootfs), str(work), str(iso_root), epoch)
        assert report["enabled"]
        assert maker.editor.found[-1].startswith(
            "made the UEFI boot image with the image's signed chain for Secure Boot: shim 16.1")
        os.utime(iso_root, (epoch, epoch))
        output = work / "live.iso"
        maker.make_iso(str(iso_root), str(output), epoch, signed=True)
        digests[zone] = hashlib.sha256(output.read_bytes()).hexdigest()
    assert len(set(digests.values())) == 1, digests
    image = str(tmp_path / "UTC/iso/efi.img")
    for name, source in (("EFI/boot/bootx64.efi", "usr/lib/shim/shimx64.efi.signed"),
                         ("EFI/boot/grubx64.efi", "usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed"),
                         ("EFI/boot/mmx64.efi", "usr/lib/shim/mmx64.efi.signed")):
        copied = subprocess.run(["mtype", "-i", image, "::/" + name], capture_output=True, check=True).stdout
        assert copied == (rootfs / source).read_bytes(), name
    stub = subprocess.run(["mtype", "-i", image, "::/boot/grub/grub.cfg"], capture_output=True, text=True,
                          check=True).stdout
    assert stub.splitlines()[0] == "search --no-floppy --fs-uuid --set=root 2023-11-14-22-13-20-00"
    blkid = subprocess.run(["blkid", "-o", "value", "-s", "UUID", str(tmp_path / "UTC/live.iso")],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert blkid == "2023-11-14-22-13-20-00"
    catalog = subprocess.run(["xorriso", "-indev", str(tmp_path / "UTC/live.iso"), "-report_el_torito", "plain"],
                             capture_output=True, text=True, check=True).stdout
    assert re.search(r"El Torito img path :\s+1\s+/boot/grub/i386-pc/eltorito.img", catalog), catalog
    assert re.search(r"El Torito img path :\s+2\s+/efi.img", catalog), catalog
