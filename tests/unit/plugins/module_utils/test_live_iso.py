# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import json
import os

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
    config = li.IsoBuilder(None, None, params(boot_params=["ipv6.disable=1"])).grub_config()
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
    config = li.IsoBuilder(None, None, params(persistence=False)).grub_config()
    assert " persistence " not in config


def test_squashfs_options_come_before_the_excludes(tmp_path):
    output = tmp_path / "fs.squashfs"
    output.write_bytes(b"x" * 100)
    runner = Recorder("Filesystem size 1.00 Kbytes\n\t25.00% of uncompressed filesystem size (400.00 Kbytes)\n")
    builder = li.IsoBuilder(None, runner, params(compression_level=19, exclude=["/var/cache/*", "srv/big"]))
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
    builder = li.IsoBuilder(None, runner, params(keep_users=["bob"], live_password="pw", hostname="rescue"))
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
    builder = li.IsoBuilder(None, None, params())
    if supported:
        builder._check_family(str(tmp_path))
    else:
        with pytest.raises(li.IsoError, match="not yet supported"):
            builder._check_family(str(tmp_path))


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
    builder = li.IsoBuilder(None, None, params())
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
    builder = li.IsoBuilder(None, None, params(dest=str(iso)))
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
