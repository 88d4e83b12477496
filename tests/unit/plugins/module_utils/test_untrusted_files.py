# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Files live_iso parses from a source tree or its image, damaged or planted:
PE images truncated at any byte, SBAT and passwd numbers no int() takes, a 2
GiB sparse kernel, dpkg status or passwd, an os-release that is a FIFO. Each
ends as "not signed", a sensible default or an IsoError naming the file
(and the limit), never another exception and never a read of the whole file."""

from __future__ import annotations

import os
import signal
import struct
import tracemalloc

import pytest
from test_live_iso import Recorder, desired
from test_secure_boot import SHIM_SBAT, make_pe, make_tree

from ansible_collections.liveclone.core.plugins.module_utils._common import pe
from ansible_collections.liveclone.core.plugins.module_utils._common import roottree as rt
from ansible_collections.liveclone.core.plugins.module_utils._common.beneath import Tree
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import image as image_
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import secure_boot as secure
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import source as source_
from ansible_collections.liveclone.core.plugins.module_utils._live_iso.desired import IsoError

# 68 bytes: an MZ header pointing at a PE signature, and nothing after it.
TRUNCATED_PE = b"MZ" + b"\0" * 0x3A + struct.pack("<I", 0x40) + b"PE\0\0"
KERNEL = "boot/vmlinuz-6.1.0-9-amd64"
SHIM = "usr/lib/shim/shimx64.efi.signed"
HUGE = 2 << 30  # a sparse file of 2 GiB


@pytest.fixture
def bounded_reads(monkeypatch):
    """Every read of a tree's file asks for a bounded number of bytes; the
    peak of memory the test allocates is returned (in bytes) by the fixture's call."""
    read_bytes = Tree.read_bytes

    def bounded(tree, relative, limit=-1):
        assert 0 <= limit <= 128 << 20, "%s read without a bound (limit %d)" % (relative, limit)
        return read_bytes(tree, relative, limit)

    monkeypatch.setattr(Tree, "read_bytes", bounded)
    tracemalloc.start()
    yield lambda: tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()


def sparse(path, size=HUGE):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)


def chain_decide(root, **overrides):
    warnings = []
    with Tree(str(root)) as tree:
        return secure.decide(desired(**overrides), tree, warnings), warnings


# --- the PE reader ---------------------------------------------------------------

def test_a_pe_image_cut_at_any_byte_is_unsigned_or_a_pe_error():
    image = make_pe({".text": b"code", ".sbat": SHIM_SBAT, ".a-long-section-name": b"x"})
    assert pe.is_signed(image)
    for length in range(len(image)):
        cut = image[:length]
        assert not pe.is_signed(cut), length  # the certificate table is at the end
        try:
            pe.sbat_entries(cut)
            pe.sbat_levels(cut)
        except pe.PeError:
            pass
    assert not pe.is_signed(TRUNCATED_PE)
    with pytest.raises(pe.PeError, match="truncated"):
        pe.sections(TRUNCATED_PE)


@pytest.mark.parametrize("patch, words", [
    ((0x40 + 24 + 112 + 16 * 8 + 20, struct.pack("<I", 0x7FFFFFFF)), "section .text"),  # raw offset
    ((0x40 + 12, struct.pack("<I", 0x7FFFFFFF)), "name of section 2"),  # the string table past the end
    ((0x40 + 6, struct.pack("<H", 0xFFFF)), "section table"),  # 65535 sections
])
def test_offsets_past_the_end_are_pe_errors(patch, words):
    image = bytearray(make_pe({".text": b"code", ".sbat": SHIM_SBAT, ".a-long-section-name": b"x"}))
    offset, value = patch
    image[offset:offset + len(value)] = value
    with pytest.raises(pe.PeError, match=words):
        pe.sections(bytes(image))
    assert pe.is_signed(bytes(image)) is (words != "section table")


def test_sbat_numbers_that_int_refuses_are_ignored():
    text = ("shim,\u00b2,UEFI shim,shim,1,u\ngrub,%s,FSF,grub,2.06,u\nshim.debian,1,Debian,shim,\u00b2.1,u\n"
            % ("9" * 5000))
    entries = pe.parse_sbat(text)
    assert list(entries) == ["shim.debian"]
    assert secure._version_tuple(entries["shim.debian"].version) == ()
    assert secure._version_tuple("16." + "1" * 5000) == (16,)


# --- the signed chain from a damaged tree -----------------------------------------

def test_a_truncated_kernel_is_not_signed(tmp_path):
    root = make_tree(tmp_path)
    (root / KERNEL).write_bytes(TRUNCATED_PE)
    (chosen, warnings) = chain_decide(root)
    assert chosen == (False, []) and "/%s carries no signature" % KERNEL in warnings[0]
    with pytest.raises(IsoError, match="secure_boot is required, but the source's kernel /%s carries no "
                                       "signature" % KERNEL):
        chain_decide(root, secure_boot="required")


def test_a_truncated_shim_is_refused_by_name(tmp_path):
    root = make_tree(tmp_path)
    (root / SHIM).write_bytes(TRUNCATED_PE)
    with pytest.raises(IsoError, match=r"the source: /%s, a piece of the signed chain, is not a PE image "
                                       r"\(truncated: .*\); reinstall shim-signed.*secure_boot: off" % SHIM):
        chain_decide(root)


@pytest.mark.parametrize("relative", [KERNEL, SHIM])
def test_a_huge_sparse_piece_is_refused_without_reading_it(tmp_path, bounded_reads, relative):
    root = make_tree(tmp_path)
    sparse(root / relative)
    with pytest.raises(IsoError, match=r"/%s in the source is 2.00 GB, more than the 64.00 MB this module reads "
                                       r"of a kernel or EFI binary: .*, or set secure_boot: off" % relative):
        chain_decide(root)
    assert bounded_reads() < 8 << 20


def test_a_piece_at_the_limit_is_read_one_byte_more_is_refused(tmp_path, monkeypatch):
    root = make_tree(tmp_path)
    size = len((root / KERNEL).read_bytes())
    monkeypatch.setattr(secure, "PE_LIMIT", size)
    with Tree(str(root)) as tree:
        assert secure.find_chain(tree, "the source").kernel_signed
    with open(root / KERNEL, "ab") as handle:
        handle.write(b"\0")
    with Tree(str(root)) as tree, pytest.raises(IsoError, match="is %d.00 Bytes, more than the %d.00 Bytes" % (
            size + 1, size)):
        secure.find_chain(tree, "the source")


# --- text files: dpkg status, user databases, os-release -----------------------------

def test_a_huge_dpkg_status_is_refused_by_name(tmp_path, bounded_reads):
    sparse(tmp_path / "var/lib/dpkg/status")
    with Tree(str(tmp_path)) as tree, pytest.raises(
            IsoError, match=r"/var/lib/dpkg/status in the source is 2.00 GB, more than the 64.00 MB this module "
                            r"reads of a dpkg status"):
        source_.missing_packages(tree, "none")
    assert bounded_reads() < 8 << 20


@pytest.mark.parametrize("name", ["etc/passwd", "etc/group"])
def test_a_huge_user_database_is_refused_by_name(tmp_path, bounded_reads, name):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    sparse(tmp_path / name)
    with Tree(str(tmp_path)) as tree, pytest.raises(
            IsoError, match=r"/%s in the image is 2.00 GB, more than the 16.00 MB this module reads of a user "
                            r"database" % name):
        image_.ImageEditor(Recorder(), desired()).configure(tree, 1700000000)
    assert bounded_reads() < 8 << 20


def test_uids_that_int_refuses_are_no_uids(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nodd:x:\u00b2:1::/:/bin/sh\n"
                                         "long:x:%s:1::/:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"
                                         % ("9" * 5000))
    with Tree(str(tmp_path)) as tree:
        image_.ImageEditor(Recorder(), desired(live_user="")).clean(tree)
    assert [line.split(":")[0] for line in (tmp_path / "etc/passwd").read_text().splitlines()] == [
        "root", "odd", "long"]


def test_no_free_uid_for_the_live_user_is_an_iso_error(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("".join("u%d:x:%d:%d::/:/bin/sh\n" % (uid, uid, uid)
                                                 for uid in range(image_.FIRST_USER_UID, image_.NOBODY_UID)))
    with Tree(str(tmp_path)) as tree, pytest.raises(IsoError, match="no free uid from 1000 to 65533 for live_user"):
        image_.ImageEditor(Recorder(), desired()).configure(tree, 1700000000)


def test_an_os_release_that_is_a_fifo_or_a_directory_is_unknown(tmp_path):
    os.mkfifo(tmp_path / "os-release")
    (tmp_path / "dir").mkdir()

    class Blocked(Exception):
        """Not an OSError, which read_os_release would take for a missing file."""

    def blocked(_signal, _frame):
        raise Blocked("read_os_release blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(5)
    try:
        assert rt.read_os_release(str(tmp_path / "os-release")) == {}
        assert rt.read_os_release(str(tmp_path / "dir")) == {}
        assert rt.default_base_dir(str(tmp_path / "os-release")) == "/mnt/linux_backup"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_huge_os_release_is_read_only_so_far_and_named_shortly(tmp_path, bounded_reads):
    (tmp_path / "etc").mkdir()
    with open(tmp_path / "etc/os-release", "w") as handle:
        handle.write("ID=evil\nPRETTY_NAME=%s\n" % ("x" * (2 << 20)))
    sparse(tmp_path / "usr/lib/os-release")
    with Tree(str(tmp_path)) as tree, pytest.raises(IsoError, match="not yet supported") as refused:
        source_.check_family(tree)
    assert len(str(refused.value)) < 400
    (tmp_path / "etc/os-release").unlink()
    (tmp_path / "etc/os-release").symlink_to("../usr/lib/os-release")
    assert rt.source_os_release(str(tmp_path)) == {}
    assert bounded_reads() < 16 << 20


@pytest.mark.parametrize("grown, refused", [(100, False), (200, True)])
def test_a_file_that_grows_after_its_size_was_read_is_read_to_the_limit(tmp_path, monkeypatch, grown, refused):
    (tmp_path / "status").write_bytes(b"x" * grown)
    lstat = Tree.lstat

    def shrunk(tree, relative):
        return os.stat_result((*lstat(tree, relative)[:6], 1, *lstat(tree, relative)[7:]))  # st_size: 1

    monkeypatch.setattr(Tree, "lstat", shrunk)
    with Tree(str(tmp_path)) as tree:
        if refused:
            with pytest.raises(IsoError, match=r"/status in the source is \S+ Bytes, more than the 150.00 Bytes"):
                source_.read_bounded(tree, "status", 150, "a test file", "the source")
        else:
            assert source_.read_bounded(tree, "status", 150, "a test file", "the source") == b"x" * grown
