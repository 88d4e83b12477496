# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._common.beneath import Tree
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import apply as build
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import boot
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import desired as desired_
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import image as image_
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import plan as plan_
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import read as state
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import run as run_
from ansible_collections.liveclone.core.plugins.module_utils._live_iso import source as source_
from ansible_collections.liveclone.core.plugins.module_utils._live_iso.desired import Desired, IsoError
from ansible_collections.liveclone.core.plugins.module_utils._live_iso.source import Source


def params(**overrides):
    values = dict(dest="/srv/iso/live.iso", source="cache", cache_dir="/mnt/b", snapper_config="distroclone-backup",
                  snapshot="latest", source_path=None, label="LIVECLONE", hostname="liveclone", live_user="live",
                  live_password=None, root_password=None, boot_params=[], persistence=True, installer="none",
                  install_missing=False, compression="zstd", compression_level=None, block_size=1048576,
                  exclude=[], keep_home=False, keep_users=[], work_dir=None, checksums=["sha256"], force=False,
                  secure_boot="auto")
    values.update(overrides)
    return values


def desired(**overrides):
    """A Desired as from_params makes it, without the checks that read the filesystem."""
    values = desired_.canonical_params(params(**overrides))
    for name in ("boot_params", "exclude", "keep_users", "checksums"):
        values[name] = tuple(values[name])
    return Desired(**values)


class Recorder:
    def __init__(self, out=""):
        self.calls, self.out = [], out

    def run(self, argv, ok_rcs=(0,), data=None):
        self.calls.append(argv)
        return 0, self.out


def test_grub_config_serial_and_entries():
    config = boot.grub_config(desired(boot_params=["ipv6.disable=1"]))
    assert config.splitlines()[:3] == ["serial --unit=0 --speed=115200", "terminal_input console serial",
                                       "terminal_output console serial"]
    titles = [line for line in config.splitlines() if line.startswith("menuentry")]
    assert titles == ['menuentry "Live system (LIVECLONE)" {', 'menuentry "Live system with persistence (LIVECLONE)" {',
                      'menuentry "Live system (safe graphics) (LIVECLONE)" {',
                      'menuentry "Live system (text mode) (LIVECLONE)" {']
    default = [line for line in config.splitlines() if line.strip().startswith("linux")][0]
    assert "boot=live components" in default and "username=live" in default
    assert default.index("console=tty0") < default.index("console=ttyS0,115200n8")
    assert "live-config.nocomponents=user-setup" in default and default.endswith("ipv6.disable=1")


def test_no_persistence_entry_when_not_asked():
    config = boot.grub_config(desired(persistence=False))
    assert " persistence " not in config


def test_squashfs_options_come_before_the_excludes(tmp_path):
    output = tmp_path / "fs.squashfs"
    output.write_bytes(b"x" * 100)
    runner = Recorder("Filesystem size 1.00 Kbytes\n\t25.00% of uncompressed filesystem size (400.00 Kbytes)\n")
    maker = boot.BootMaker(runner, desired(compression_level=19, exclude=["/var/cache/*", "srv/big"]),
                           image_.ImageEditor(runner, desired()))
    result = maker.squashfs("/root", str(output), 1700000000)
    assert runner.calls[0] == ["env", "SOURCE_DATE_EPOCH=1700000000", "mksquashfs", "/root", str(output), "-noappend",
                               "-no-progress", "-comp", "zstd", "-b", "1048576", "-Xcompression-level", "19",
                               "-wildcards", "-e", "var/cache/*", "srv/big"]
    assert result == {"size": 100, "uncompressed_size": 409600, "compression_ratio": 4096.0}


def make_tree(root):
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\n"
                                     "bob:x:1001:1001::/home/bob:/bin/bash\nnobody:x:65534:65534::/:/bin/false\n")
    (root / "etc/shadow").write_text("root:$6$x$y:19000:0:99999:7:::\nalice:!:1:0:99999:7:::\nbob:!:1:0:99999:7:::\n"
                                     "nobody:*:1:0:99999:7:::\n")
    (root / "etc/group").write_text("root:x:0:\nsudo:x:27:alice\nalice:x:1000:\nbob:x:1001:\n")
    (root / "etc/gshadow").write_text("root:*::\nsudo:*::alice\nalice:!::\nbob:!::\n")
    for path in ("home/alice/.bash_history", "root/.ssh/id_rsa", "etc/ssh/ssh_host_rsa_key",
                 "etc/NetworkManager/system-connections/wifi.nmconnection", "var/log/syslog", "tmp/junk"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("secret\n")
    (root / "etc/machine-id").write_text("0123456789abcdef\n")


def clean_and_configure(runner, wanted, root):
    """The clean step, then the configuration of the build step, as the applier runs them."""
    editor = image_.ImageEditor(runner, wanted)
    with Tree(str(root)) as tree:
        editor.clean(tree)
    with Tree(str(root)) as tree:
        editor.configure(tree, 1700000000)
    return editor


def test_clean_and_configure(tmp_path):
    make_tree(tmp_path)
    runner = Recorder("$6$salted$hash\n")
    clean_and_configure(runner, desired(keep_users=["bob"], live_password="pw", hostname="rescue"), tmp_path)
    assert (tmp_path / "etc/machine-id").read_text() == ""
    assert not (tmp_path / "etc/ssh/ssh_host_rsa_key").exists()
    assert not list((tmp_path / "etc/NetworkManager/system-connections").iterdir())
    assert os.listdir(tmp_path / "home") == ["live"] and os.listdir(tmp_path / "root") == []
    assert not (tmp_path / "var/log/syslog").exists() and not (tmp_path / "tmp/junk").exists()
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    assert [line.split(":")[0] for line in passwd] == ["root", "bob", "nobody", "live"]
    assert passwd[-1] == "live:x:1000:1000:live:/home/live:/bin/bash"
    shadow = (tmp_path / "etc/shadow").read_text().splitlines()
    assert shadow[0] == "root:!*:19675:0:99999:7:::"  # locked, last change = SOURCE_DATE_EPOCH's day
    assert shadow[-1] == "live:$6$salted$hash:19675:0:99999:7:::"
    assert "sudo:x:27:live" in (tmp_path / "etc/group").read_text()
    assert (tmp_path / "etc/hostname").read_text() == "rescue\n"
    # The password reaches openssl on stdin only, with a salt derived from the label.
    openssl = [call for call in runner.calls if call[0] == "openssl"]
    assert openssl and all("pw" not in arg for call in openssl for arg in call)


@pytest.mark.parametrize("release, supported", [
    ("ID=debian\n", True), ("ID=ubuntu\nID_LIKE=debian\n", True), ("ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n", True),
    ("ID=fedora\nNAME=Fedora\n", False), ("ID=arch\n", False),
])
def test_family_check(tmp_path, release, supported):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text(release)
    with Tree(str(tmp_path)) as tree:
        if supported:
            source_.check_family(tree)
        else:
            with pytest.raises(IsoError, match="not yet supported"):
                source_.check_family(tree)


@pytest.mark.parametrize(("entries", "boots_live"), [
    (["scripts", "scripts/live", "lib/live/boot/9990-main.sh", "conf/initramfs.conf"], True),
    ([".", "./scripts/live", "./conf/arch.conf"], True),
    (["scripts", "scripts/local", "conf/initramfs.conf"], False),
    (["scripts/live", "conf/conf.d/resume"], False),
    (["scripts/live", "conf/conf.d/zz-resume-auto"], False),
    (["scripts/live", "cryptroot/crypttab"], False),
    ([], False),
])
def test_initramfs_kept_only_when_it_boots_live_without_source_settings(entries, boots_live):
    assert boot.initramfs_boots_live(entries) is boots_live


def test_a_directory_time_alone_does_not_change_a_tree_fingerprint(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hostname").write_text("lab\n")
    (tmp_path / "tmp").mkdir()
    first = list(source_.walk(str(tmp_path), ["/tmp/*"]))
    (tmp_path / "tmp" / "scratch").write_text("x")
    os.utime(tmp_path / "tmp", (1, 1))
    os.utime(tmp_path / "etc", (1, 1))
    assert list(source_.walk(str(tmp_path), ["/tmp/*"])) == first
    os.utime(tmp_path / "etc" / "hostname", (1, 1))
    assert list(source_.walk(str(tmp_path), ["/tmp/*"])) != first


def _built_iso(tmp_path):
    iso = tmp_path / "live.iso"
    iso.write_bytes(b"iso" * 1000)
    wanted = desired(dest=str(iso))
    source = Source("cache", "/mnt/b/.rootfs_cache/.snapshots/1/snapshot", "1")
    source.identity = "btrfs:uuid"
    manifest = {"version": state.MANIFEST_VERSION, "source_identity": "btrfs:uuid", "options_digest": "d",
                "sha256": state.sha256_of(str(iso)), "size": iso.stat().st_size,
                "iso_mtime_ns": iso.stat().st_mtime_ns}
    (tmp_path / ("live.iso" + desired_.MANIFEST_SUFFIX)).write_text(json.dumps(manifest))
    return iso, wanted, source


def up_to_date(wanted, source, digest):
    return state.is_up_to_date(wanted, state.read_manifest(wanted), source, digest)


def test_an_iso_as_built_is_up_to_date_without_reading_it(tmp_path, monkeypatch):
    iso, wanted, source = _built_iso(tmp_path)
    monkeypatch.setattr(state, "sha256_of", lambda path: pytest.fail("hashed an untouched ISO"))
    assert state.read_manifest(wanted)["sha256"]
    assert up_to_date(wanted, source, "d")
    assert not up_to_date(wanted, source, "other options")


def test_an_iso_touched_but_unchanged_is_up_to_date(tmp_path):
    iso, wanted, source = _built_iso(tmp_path)
    os.utime(iso, (1, 1))
    assert up_to_date(wanted, source, "d")


def test_an_iso_changed_in_place_or_resized_is_rebuilt(tmp_path):
    iso, wanted, source = _built_iso(tmp_path)
    with open(iso, "r+b") as handle:
        handle.write(b"X")
    os.utime(iso, (1, 1))
    assert not up_to_date(wanted, source, "d")
    iso.write_bytes(b"short")
    assert not up_to_date(wanted, source, "d")


def test_force_rebuilds_and_a_manifest_link_is_not_trusted(tmp_path):
    iso, wanted, source = _built_iso(tmp_path)
    assert not up_to_date(desired(dest=str(iso), force=True), source, "d")
    manifest = tmp_path / ("live.iso" + desired_.MANIFEST_SUFFIX)
    manifest.rename(tmp_path / "elsewhere.json")
    manifest.symlink_to(tmp_path / "elsewhere.json")
    assert state.read_manifest(wanted) is None


# --- parameters: every value is checked before anything is read ----------------

GRUB_ENTRY = 'x"\nmenuentry "evil" {'


@pytest.mark.parametrize(("overrides", "words"), [
    ({"label": "LIVE\n"}, "label 'LIVE\\\\n' is not a label an ISO volume id can hold"),
    ({"label": GRUB_ENTRY}, "is not a label an ISO volume id can hold"),
    ({"label": "LIVÉ"}, "use ASCII letters"),
    ({"label": "L" * 33}, "longer than the 32 bytes an ISO volume id holds"),
    ({"label": "x/../../esc"}, "is not a label"),
    ({"hostname": "lc\n"}, "hostname 'lc\\\\n' is not a host name"),
    ({"hostname": "a" * 64}, "is not a host name"),
    ({"live_user": "toor::0:0::/root:/bin/sh\nlive"}, "live_user .* is not a user name"),
    ({"live_user": "../../victim"}, "live_user '../../victim' is not a user name"),
    ({"keep_users": ["bob", "bob\n"]}, "keep_users 'bob\\\\n' is not a user name"),
    ({"live_password": "pw\n"}, "live_password holds a control character"),
    ({"root_password": "p\tw"}, "root_password holds a control character"),
    ({"boot_params": ["quiet", "x}\nmenuentry"]}, "boot_params item .* is not one kernel parameter"),
    ({"boot_params": ["a b"]}, "is not one kernel parameter"),
    ({"snapper_config": "cfg\n"}, "snapper_config 'cfg\\\\n' is not a snapper config name"),
    ({"snapshot": "latest\n"}, "snapshot 'latest\\\\n' is not a snapshot name"),
    ({"snapshot": "@2024-01-01_10:00/../x"}, "is not a snapshot name"),
    ({"exclude": ["/srv\n"]}, "exclude item '/srv\\\\n' holds a control character"),
    ({"dest": "/srv/iso/live.iso\n"}, "dest .* holds a control character"),
    ({"work_dir": "/var/tmp/w\n"}, "work_dir .* holds a control character"),
    ({"source_path": "/srv/.liveclone-iso-work-1/rootfs"}, "lies in a work tree of an earlier build"),
    ({"compression_level": 99}, "compression_level 99 is out of range for zstd; choose a level from 1 to 22"),
    ({"compression_level": 0}, "from 1 to 22"),
    ({"compression": "gzip", "compression_level": 10}, "out of range for gzip; choose a level from 1 to 9"),
    ({"compression": "gzip", "compression_level": 0}, "from 1 to 9"),
    ({"compression": "xz", "compression_level": 3}, "compression xz takes no compression_level"),
    ({"block_size": 1000}, "block_size 1000 is not a power of two"),
])
def test_parameter_problems(overrides, words):
    problems = desired_.parameter_problems(desired_.canonical_params(params(**overrides)))
    assert problems and re.search(words, problems[0]), problems


@pytest.mark.parametrize("overrides", [
    {}, {"label": "A" * 32}, {"hostname": "a" * 63}, {"live_user": ""}, {"live_user": "_live-1"},
    {"boot_params": ["ipv6.disable=1", "console=ttyS0,115200n8", "rd.break=pre-mount"]},
    {"snapshot": "12"}, {"snapshot": "@2024-01-01_10:00"}, {"snapshot": "@2024-01-01_10:00_2"},
    {"compression_level": 22}, {"compression": "gzip", "compression_level": 9},
    {"live_password": "p:w\"x'$(id)}{;|&<>#` "},
])
def test_valid_values_pass(overrides):
    assert desired_.parameter_problems(desired_.canonical_params(params(**overrides))) == []


@pytest.mark.parametrize(("overrides", "words"), [
    ({"dest": "/"}, "dest / is a directory"),
    ({"dest": "//"}, "dest / is a directory"),
    ({"dest": "//live.iso"}, "dest /live.iso lies directly in /"),
    ({"dest": "/srv/../live.iso"}, "dest /live.iso lies directly in /"),
    ({"dest": "live.iso"}, "is relative; give an absolute path"),
    ({"source": "path", "source_path": "//"}, "source_path / is the running system; use source: live"),
    ({"source": "path", "source_path": "/usr/.."}, "use source: live"),
    ({"work_dir": "/."}, "work_dir / is the root directory"),
    ({"cache_dir": "//"}, "cache_dir / is not a cache"),
])
def test_path_rules_hold_on_the_canonical_form(tmp_path, overrides, words):
    values = params(**dict({"dest": str(tmp_path / "live.iso")}, **overrides))
    with pytest.raises(IsoError, match=words):
        desired_.check_params(values)
    with pytest.raises(IsoError, match=words):
        Desired.from_params(values)


def test_canonical_params_resolve_slashes_and_dots():
    values = desired_.canonical_params(params(dest="//srv//iso/./x/../live.iso", work_dir="/var/tmp/", cache_dir=None))
    assert values["dest"] == "/srv/iso/live.iso" and values["work_dir"] == "/var/tmp" and values["cache_dir"] is None


# --- the image's clean-up never follows a link out of the image ---------------

@pytest.fixture
def victim(tmp_path):
    """A tree outside the image, and its content, to compare after."""
    root = tmp_path / "victim"
    for relative in ("home/alice/notes.txt", "home/alice/.bash_history", "log/syslog", "ssh/ssh_host_rsa_key",
                     "hostname", "skel/.bashrc"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text("victim %s\n" % relative)

    def snapshot():
        return {str(path.relative_to(root)): (path.read_text() if path.is_file() else None, path.stat().st_mode)
                for path in sorted(root.rglob("*"))}
    before = snapshot()
    yield root
    assert snapshot() == before, "the clean-up changed a tree outside the image"


def plant(root, relative, target):
    path = root / relative
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


@pytest.mark.parametrize(("relative", "target", "keep_home"), [
    ("home", "home", False), ("root", "home/alice", False), ("var/log", "log", False), ("tmp", "", False),
    ("var/tmp", "home", False), ("etc/ssh", "ssh", False), ("etc/NetworkManager/system-connections", "ssh", False),
    ("etc/NetworkManager", "ssh", False), ("var/cache/apt/archives", "home/alice", False),
    ("etc/hostname", "hostname", False), ("etc/hosts", "hostname", False), ("etc/machine-id", "hostname", False),
    ("etc/skel", "home/alice", False), ("home/live", "home/alice", True), ("home/alice", "home/alice", True),
    ("root", "home/alice", True), ("home", "home", True),
])
def test_clean_and_configure_replace_a_planted_link(tmp_path, victim, relative, target, keep_home):
    image = tmp_path / "image"
    image.mkdir()
    make_tree(image)
    (image / "etc/skel").mkdir()
    (image / "etc/skel/.profile").write_text("# skel\n")
    plant(image, relative, victim / target)
    clean_and_configure(Recorder("$6$salted$hash\n"), desired(keep_home=keep_home), image)
    assert not (image / "home").is_symlink() and (image / "home/live").is_dir()
    assert not (image / "home/live").is_symlink() and (image / "home/live").stat().st_uid == 1000
    assert relative == "etc/skel" or not (image / relative).is_symlink() or keep_home
    assert (image / "etc/hostname").read_text() == "liveclone\n"
    assert not (image / "etc/hostname").is_symlink() and not (image / "etc/hosts").is_symlink()
    for directory in ("tmp", "var/tmp", "var/log", "etc/ssh"):
        path = image / directory
        assert not path.is_symlink() and (not path.exists() or path.is_dir()), directory
    if relative in ("tmp", "var/tmp"):  # made anew, with the mode of a temporary directory
        assert (image / relative).stat().st_mode & 0o7777 == 0o1777


def test_a_link_on_the_way_to_a_database_is_refused_not_followed(tmp_path, victim):
    image = tmp_path / "image"
    image.mkdir()
    make_tree(image)
    plant(image, "etc/passwd", victim / "hostname")
    with pytest.raises(IsoError, match="etc/passwd in the image is a symlink to .*put the file itself there"), \
            Tree(str(image)) as tree:
        image_.ImageEditor(Recorder(), desired()).clean(tree)


def test_a_database_link_inside_the_tree_is_read_there_and_replaced(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "etc/real-group").write_text((tmp_path / "etc/group").read_text())
    (tmp_path / "etc/group").unlink()
    (tmp_path / "etc/group").symlink_to("/etc/real-group")  # absolute: resolved inside the tree
    with Tree(str(tmp_path)) as tree:
        image_.ImageEditor(Recorder(), desired(live_user="")).clean(tree)
    assert not (tmp_path / "etc/group").is_symlink()
    assert "alice" not in (tmp_path / "etc/group").read_text()
    assert "alice" in (tmp_path / "etc/real-group").read_text()


def test_a_kernel_that_is_a_link_out_of_the_tree_is_refused(tmp_path, victim):
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/vmlinuz-6.1.0-1-amd64").write_text("kernel\n")
    (tmp_path / "boot/initrd.img-6.1.0-1-amd64").symlink_to("../boot/real-initrd")
    (tmp_path / "boot/real-initrd").write_text("initrd\n")
    with Tree(str(tmp_path)) as tree:
        assert source_.kernels(tree, "the source") == [
            ("6.1.0-1-amd64", "boot/vmlinuz-6.1.0-1-amd64", "boot/real-initrd")]
    (tmp_path / "boot/vmlinuz-6.9.0-1-amd64").symlink_to(victim / "hostname")
    refusal = "vmlinuz-6.9.0-1-amd64 in the source is a symlink to"
    with Tree(str(tmp_path)) as tree, pytest.raises(IsoError, match=refusal):
        source_.kernels(tree, "the source")


# --- one image-content policy, after either copy -------------------------------

LEFT_OUT = ("swapfile", "mnt/x", "media/y", "var/lib/liveclone/old.iso", "snap/core/1/file", "proc/1/status",
            "var/log/syslog", "lost+found/f")


def test_a_path_source_leaves_out_the_standard_exclusions(monkeypatch):
    monkeypatch.setattr(source_, "mount_excludes", lambda root, keep_home: ["/data/*"])
    source = Source("path", "/srv/rootfs")
    excludes = source_.image_excludes(desired(source="path", source_path="/srv/rootfs", exclude=["srv/big"]), source)
    for pattern in ("/swapfile", "/mnt/*", "/media/*", "/var/lib/liveclone", "/snap", "/home/*", "/data/*",
                    "/srv/big"):
        assert pattern in excludes
    assert source_.image_excludes(desired(keep_home=True, source="path"), source).count("/home/*") == 0
    cache = Source("cache", "/mnt/b/.rootfs_cache/.snapshots/1/snapshot", "1")
    assert source_.image_excludes(desired(), cache) == ["/.snapshots"]


def test_remove_excluded_takes_what_the_policy_leaves_out_of_a_snapshot(tmp_path, victim):
    image = tmp_path / "image"
    for relative in LEFT_OUT + ("etc/hostname", "var/lib/dpkg/status", "mnt", "media", "srv/keep",
                                "var/lib/liveclonex/kept"):
        path = image / relative
        if relative in ("mnt", "media"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("planted\n")
    (image / "boot").mkdir()
    (image / "boot/efi").symlink_to(victim)  # a link at a pattern's directory: never entered
    (image / "lost+found").chmod(0o700)
    patterns = list(source_.STANDARD_EXCLUDES) + ["/srv/*.log"]
    (image / "srv/a.log").write_text("log\n")
    with Tree(str(image)) as tree:
        removed = image_.remove_excluded(tree, patterns)
    for relative in LEFT_OUT + ("srv/a.log",):
        assert not (image / relative).exists(), relative
    assert "swapfile" in removed and "mnt/x" in removed and "var/lib/liveclone" in removed
    for relative in ("etc/hostname", "var/lib/dpkg/status", "mnt", "media", "srv/keep", "var/lib/liveclonex/kept",
                     "var/log", "proc"):
        assert (image / relative).exists(), relative
    assert (image / "boot/efi").is_symlink()


def test_remove_excluded_removes_a_link_and_never_goes_through_one(tmp_path, victim):
    image = tmp_path / "image"
    (image / "var").mkdir(parents=True)
    (image / "swapfile").symlink_to(victim / "hostname")
    (image / "var/lib").symlink_to(victim)  # var/lib/liveclone lies beyond a link: not the image's own
    (image / "media").symlink_to(victim / "home")
    with Tree(str(image)) as tree:
        assert image_.remove_excluded(tree, ["/swapfile", "/var/lib/liveclone", "/media/*", "/var/lib/*",
                                             "/../var", "/"]) == ["swapfile"]
    assert not os.path.lexists(image / "swapfile") and (image / "media").is_symlink()


# --- the planner, on plain data -------------------------------------------------

def current(**overrides):
    source = Source("path", "/srv/rootfs")
    source.identity, source.epoch = "tree:abc", 1700000000
    values = dict(source=source, options_digest="d", manifest=None, up_to_date=False, work_parent="/srv/iso",
                  excludes=["/swapfile", "/mnt/*"], by_snapshot=True)
    values.update(overrides)
    return state.Current(**values)


def actions(operations):
    return [operation.action for operation in operations]


def test_nothing_is_planned_for_an_iso_that_is_up_to_date():
    assert plan_.plan(desired(), current(up_to_date=True, manifest={"size": 1})) == []


@pytest.mark.parametrize("by_snapshot", [True, False])
def test_either_copy_is_followed_by_the_one_image_content_policy(by_snapshot):
    operations = plan_.plan(desired(dest="/srv/iso/live.iso"), current(by_snapshot=by_snapshot))
    copy = "snapshot" if by_snapshot else "rsync"
    assert actions(operations) == [copy, "leave_out", "clean", "build"]
    assert operations[0].text == ("took a writable btrfs snapshot of /srv/rootfs" if by_snapshot
                                  else "copied /srv/rootfs with rsync")
    assert operations[1].args == {"patterns": ["/swapfile", "/mnt/*"]}
    assert operations[1].text == "removed from the copy what the image leaves out (/swapfile, /mnt/*)"
    assert operations[-1].text == "built /srv/iso/live.iso from path /srv/rootfs"


def test_the_plan_removes_leftovers_first_and_installs_what_the_source_lacks():
    work = [("/srv/iso/.liveclone-iso-work-a", "work"), ("/srv/iso/.liveclone-iso-work-b", "symlink")]
    operations = plan_.plan(desired(dest="/srv/iso/live.iso", source="path"), current(
        stale_work=work, stale_files=["/srv/iso/.live.iso.tmp-x"], missing=["live-boot"]))
    assert actions(operations) == ["remove_work", "remove_entry", "remove_file", "snapshot", "leave_out",
                                   "install", "clean", "build"]
    assert [operation.text for operation in operations[:3]] == [
        "removed /srv/iso/.liveclone-iso-work-a left by an interrupted build",
        "removed .liveclone-iso-work-b (a symlink, not a work tree) from /srv/iso",
        "removed /srv/iso/.live.iso.tmp-x left by an interrupted build"]
    assert operations[5].text == "installed live-boot into the image"
    assert operations[5].args == {"packages": ["live-boot"]}


def test_a_cache_build_names_the_snapshot():
    source = Source("cache", "/mnt/b/.rootfs_cache/.snapshots/3/snapshot", "3")
    operations = plan_.plan(desired(dest="/srv/iso/live.iso"), current(source=source, excludes=["/.snapshots"]))
    assert operations[-1].text == "built /srv/iso/live.iso from cache 3"


# --- the diff: what the manifest records, before and after --------------------

def test_the_diff_without_an_iso_is_empty_before_and_the_record_after():
    wanted = desired(dest="/srv/iso/live.iso")
    now = current()
    diff = plan_.diff_view(wanted, now, plan_.plan(wanted, now))
    assert diff["before"] == {}
    assert diff["after"] == {"version": 1, "source_identity": "tree:abc", "options_digest": "d",
                             "source": now.source.view(), "uefi_chain": "unsigned GRUB (Secure Boot off)"}
    assert diff["before_header"] == diff["after_header"] == "/srv/iso/live.iso.manifest.json"


def test_the_diff_shows_the_manifest_before_and_nothing_new_when_up_to_date():
    wanted = desired(dest="/srv/iso/live.iso")
    manifest = {"version": 1, "source_identity": "tree:old", "options_digest": "o", "sha256": "s", "size": 3,
                "source": {"kind": "path"}, "squashfs": {}}
    changed = current(manifest=manifest)
    diff = plan_.diff_view(wanted, changed, plan_.plan(wanted, changed))
    assert diff["before"] == {"version": 1, "source_identity": "tree:old", "options_digest": "o",
                              "source": {"kind": "path"}}
    assert diff["after"]["source_identity"] == "tree:abc" and diff["after"]["options_digest"] == "d"
    same = current(manifest=manifest, up_to_date=True)
    diff = plan_.diff_view(wanted, same, plan_.plan(wanted, same))
    assert diff["after"] == diff["before"]


# --- check mode returns the plan the real run carries out ----------------------

class FakeReader:
    def __init__(self, first, after):
        self.states = [first, after]
        self.warnings = ["a warning of the read"]

    def read(self):
        return self.states.pop(0)


def test_check_mode_and_a_real_run_carry_the_same_plan(tmp_path, monkeypatch):
    (tmp_path / "iso").mkdir()
    wanted = desired(dest=str(tmp_path / "iso/live.iso"), source="path", source_path="/srv/rootfs")
    first = current(work_parent=str(tmp_path / "iso"), missing=["live-boot"])
    manifest = {"version": 1, "source_identity": "tree:abc", "options_digest": "d", "sha256": "s", "size": 7,
                "source": first.source.view(), "squashfs": {"size": 5}}
    after = current(work_parent=first.work_parent, manifest=manifest, up_to_date=True)
    carried_out = []

    def step(name):
        def run_step(self, now, operation, work):
            carried_out.append(operation.action)
            if name == "clean":
                self.editor.found.append("removed user alice")
        return run_step

    for name in ("snapshot", "leave_out", "install", "clean", "build"):
        monkeypatch.setattr(build.IsoApplier, "_" + name, step(name))
    monkeypatch.setattr(build, "enter_private_mount_namespace", lambda runner: None)
    monkeypatch.setattr(run_, "Lock", lambda *args: contextlib.nullcontext())
    results = {}
    for check_mode in (True, False):
        monkeypatch.setattr(run_, "IsoReader", lambda runner, wanted_: FakeReader(first, after))
        results[check_mode] = run_.run(Recorder(), wanted, check_mode)
    planned = [operation.text for operation in plan_.plan(wanted, first)]
    assert results[True].operations == planned
    assert [text for text in results[False].operations if text != "removed user alice"] == planned
    # What a step found is listed before the step's own text.
    real = results[False].operations
    assert real.index("removed user alice") == real.index(
        "removed the source's users, secrets, histories, logs and caches") - 1
    assert carried_out == ["snapshot", "leave_out", "install", "clean", "build"]
    assert results[True].changed and results[False].changed
    assert results[True].diff == results[False].diff
    assert "size" not in results[True].values and results[False].values["size"] == 7
    assert results[False].warnings == ["a warning of the read"]
    assert not os.listdir(tmp_path / "iso")  # the work tree and the temporary ISO are gone


class ToolRunner:
    """Runs the real tool: the one test here about the bytes a tool writes."""

    def run(self, argv, ok_rcs=(0,), data=None):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert done.returncode in ok_rcs, done.stderr
        return done.returncode, done.stdout


def test_iso_bytes_do_not_depend_on_the_builders_time_zone(tmp_path, monkeypatch):
    """grub-mkrescue's efi.img is a FAT image whose file dates mtools writes in
    local time: the same source built on hosts in other time zones gave other
    bytes until make_iso ran it in UTC."""
    epoch = 1700000000
    root = tmp_path / "iso-root"
    (root / "boot/grub").mkdir(parents=True)
    (root / "boot/grub/grub.cfg").write_text("set timeout=1\n")
    for path in (root / "boot/grub/grub.cfg", root / "boot/grub", root / "boot", root):
        os.utime(path, (epoch, epoch))
    digests = {}
    for zone in ("UTC", "America/New_York", "Asia/Tokyo"):
        monkeypatch.setenv("TZ", zone)
        output = tmp_path / ("%s.iso" % zone.replace("/", "_"))
        runner = ToolRunner()
        maker = boot.BootMaker(runner, desired(), image_.ImageEditor(runner, desired()))
        maker.make_iso(str(root), str(output), epoch, signed=False)
        digests[zone] = hashlib.sha256(output.read_bytes()).hexdigest()
    assert len(set(digests.values())) == 1, digests
