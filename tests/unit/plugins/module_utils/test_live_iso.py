# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from ansible_collections.liveclone.core.plugins.module_utils import _live_iso as li


def params(**overrides):
    values = dict(dest="/srv/iso/live.iso", source="cache", cache_dir="/mnt/b", snapper_config="distroclone-backup",
                  snapshot="latest", source_path=None, label="LIVECLONE", hostname="liveclone", live_user="live",
                  live_password=None, root_password=None, boot_params=[], persistence=True, installer="none",
                  install_missing=False, compression="zstd", compression_level=None, block_size=1048576,
                  exclude=[], keep_home=False, keep_users=[], work_dir=None, checksums=["sha256"], force=False)
    values.update(overrides)
    return values


class Recorder:
    def __init__(self, out=""):
        self.calls, self.out = [], out

    def run(self, argv, ok_rcs=(0,), data=None):
        self.calls.append(argv)
        return 0, self.out


def test_grub_config_serial_and_entries():
    config = li.IsoBuilder(None, params(boot_params=["ipv6.disable=1"])).grub_config()
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
    config = li.IsoBuilder(None, params(persistence=False)).grub_config()
    assert " persistence " not in config


def test_squashfs_options_come_before_the_excludes(tmp_path):
    output = tmp_path / "fs.squashfs"
    output.write_bytes(b"x" * 100)
    runner = Recorder("Filesystem size 1.00 Kbytes\n\t25.00% of uncompressed filesystem size (400.00 Kbytes)\n")
    builder = li.IsoBuilder(runner, params(compression_level=19, exclude=["/var/cache/*", "srv/big"]))
    result = builder._squashfs("/root", str(output), 1700000000)
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


def test_clean_and_configure(tmp_path):
    make_tree(tmp_path)
    runner = Recorder("$6$salted$hash\n")
    builder = li.IsoBuilder(runner, params(keep_users=["bob"], live_password="pw", hostname="rescue"))
    builder._clean(str(tmp_path), 1700000000)
    builder._configure(str(tmp_path), 1700000000)
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
    builder = li.IsoBuilder(None, params())
    with li.Tree(str(tmp_path)) as tree:
        if supported:
            builder._check_family(tree)
        else:
            with pytest.raises(li.IsoError, match="not yet supported"):
                builder._check_family(tree)


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
    assert li.initramfs_boots_live(entries) is boots_live


def test_a_directory_time_alone_does_not_change_a_tree_fingerprint(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hostname").write_text("lab\n")
    (tmp_path / "tmp").mkdir()
    builder = li.IsoBuilder(None, params())
    first = list(builder._walk(str(tmp_path), ["/tmp/*"]))
    (tmp_path / "tmp" / "scratch").write_text("x")
    os.utime(tmp_path / "tmp", (1, 1))
    os.utime(tmp_path / "etc", (1, 1))
    assert list(builder._walk(str(tmp_path), ["/tmp/*"])) == first
    os.utime(tmp_path / "etc" / "hostname", (1, 1))
    assert list(builder._walk(str(tmp_path), ["/tmp/*"])) != first


def _built_iso(tmp_path):
    iso = tmp_path / "live.iso"
    iso.write_bytes(b"iso" * 1000)
    builder = li.IsoBuilder(None, params(dest=str(iso)))
    source = li.Source("cache", "/mnt/b/.rootfs_cache/.snapshots/1/snapshot", "1")
    source.identity = "btrfs:uuid"
    manifest = {"version": li.MANIFEST_VERSION, "source_identity": "btrfs:uuid", "options_digest": "d",
                "sha256": li._sha256(str(iso)), "size": iso.stat().st_size, "iso_mtime_ns": iso.stat().st_mtime_ns}
    (tmp_path / ("live.iso" + li.MANIFEST_SUFFIX)).write_text(json.dumps(manifest))
    return iso, builder, source


def test_an_iso_as_built_is_up_to_date_without_reading_it(tmp_path, monkeypatch):
    iso, builder, source = _built_iso(tmp_path)
    monkeypatch.setattr(li, "_sha256", lambda path: pytest.fail("hashed an untouched ISO"))
    assert builder.up_to_date(source, "d")["sha256"]
    assert builder.up_to_date(source, "other options") is None


def test_an_iso_touched_but_unchanged_is_up_to_date(tmp_path):
    iso, builder, source = _built_iso(tmp_path)
    os.utime(iso, (1, 1))
    assert builder.up_to_date(source, "d") is not None


def test_an_iso_changed_in_place_or_resized_is_rebuilt(tmp_path):
    iso, builder, source = _built_iso(tmp_path)
    with open(iso, "r+b") as handle:
        handle.write(b"X")
    os.utime(iso, (1, 1))
    assert builder.up_to_date(source, "d") is None
    iso.write_bytes(b"short")
    assert builder.up_to_date(source, "d") is None


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
    problems = li.parameter_problems(li.canonical_params(params(**overrides)))
    assert problems and re.search(words, problems[0]), problems


@pytest.mark.parametrize("overrides", [
    {}, {"label": "A" * 32}, {"hostname": "a" * 63}, {"live_user": ""}, {"live_user": "_live-1"},
    {"boot_params": ["ipv6.disable=1", "console=ttyS0,115200n8", "rd.break=pre-mount"]},
    {"snapshot": "12"}, {"snapshot": "@2024-01-01_10:00"}, {"snapshot": "@2024-01-01_10:00_2"},
    {"compression_level": 22}, {"compression": "gzip", "compression_level": 9},
    {"live_password": "p:w\"x'$(id)}{;|&<>#` "},
])
def test_valid_values_pass(overrides):
    assert li.parameter_problems(li.canonical_params(params(**overrides))) == []


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
    with pytest.raises(li.IsoError, match=words):
        li.check_params(values)


def test_canonical_params_resolve_slashes_and_dots():
    values = li.canonical_params(params(dest="//srv//iso/./x/../live.iso", work_dir="/var/tmp/", cache_dir=None))
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
    builder = li.IsoBuilder(Recorder("$6$salted$hash\n"), params(keep_home=keep_home))
    builder._clean(str(image), 1700000000)
    builder._configure(str(image), 1700000000)
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
    builder = li.IsoBuilder(Recorder(), params())
    with pytest.raises(li.IsoError, match="etc/passwd in the image is a symlink to .*put the file itself there"):
        builder._clean(str(image), 1700000000)


def test_a_database_link_inside_the_tree_is_read_there_and_replaced(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "etc/real-group").write_text((tmp_path / "etc/group").read_text())
    (tmp_path / "etc/group").unlink()
    (tmp_path / "etc/group").symlink_to("/etc/real-group")  # absolute: resolved inside the tree
    builder = li.IsoBuilder(Recorder(), params(live_user=""))
    builder._clean(str(tmp_path), 1700000000)
    assert not (tmp_path / "etc/group").is_symlink()
    assert "alice" not in (tmp_path / "etc/group").read_text()
    assert "alice" in (tmp_path / "etc/real-group").read_text()


def test_a_kernel_that_is_a_link_out_of_the_tree_is_refused(tmp_path, victim):
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/vmlinuz-6.1.0-1-amd64").write_text("kernel\n")
    (tmp_path / "boot/initrd.img-6.1.0-1-amd64").symlink_to("../boot/real-initrd")
    (tmp_path / "boot/real-initrd").write_text("initrd\n")
    with li.Tree(str(tmp_path)) as tree:
        assert li.kernels(tree, "the source") == [("6.1.0-1-amd64", "boot/vmlinuz-6.1.0-1-amd64", "boot/real-initrd")]
    (tmp_path / "boot/vmlinuz-6.9.0-1-amd64").symlink_to(victim / "hostname")
    refusal = "vmlinuz-6.9.0-1-amd64 in the source is a symlink to"
    with li.Tree(str(tmp_path)) as tree, pytest.raises(li.IsoError, match=refusal):
        li.kernels(tree, "the source")
