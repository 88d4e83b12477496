# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._common import roottree as rt
from ansible_collections.liveclone.core.plugins.module_utils._common.beneath import Tree

MOUNTINFO = """\
22 1 254:1 / / rw - ext4 /dev/vda rw
30 22 0:40 /@ /src rw - btrfs /dev/loop0 rw
31 30 0:40 /@home /src/home rw - btrfs /dev/loop0 rw
32 30 0:41 / /src/tmp rw - tmpfs t rw
33 30 8:17 / /src/boot/efi rw - vfat /dev/sdb1 rw
34 30 8:18 / /src/root rw - ext4 /dev/sdb2 rw
35 22 0:42 / /elsewhere rw - tmpfs t rw
36 30 0:43 / /src/with\\040space rw - tmpfs t rw
"""


@pytest.mark.parametrize("include_home, expected", [
    (False, ["/boot/efi/*", "/root/*", "/tmp/*", "/with space/*"]),
    (True, ["/boot/efi/*", "/tmp/*", "/with space/*"]),
])
def test_mount_excludes(tmp_path, include_home, expected):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    # /src/home is the same btrfs filesystem (0:40): a subvolume, so it is copied.
    assert rt.mount_excludes("/src", include_home, str(mountinfo)) == expected


def test_parse_os_release_undoes_quoting():
    text = 'NAME="Evil \\"quoted\\" \\$(id) \\\\ x"\nID=evil\nPRETTY_NAME=\'single $(x)\'\nBROKEN="unterminated\n'
    values = rt.parse_os_release(text)
    assert values["NAME"] == 'Evil "quoted" $(id) \\ x'
    assert (values["ID"], values["PRETTY_NAME"], values["BROKEN"]) == ("evil", "single $(x)", "unterminated")


@pytest.mark.parametrize("release, expected", [
    ("ID=debian\n", "/mnt/debian_backup"), ("ID=../../etc\n", "/mnt/linux_backup"),
    ('ID="de bian"\n', "/mnt/linux_backup"), ("ID=a\nb\n", "/mnt/a_backup"), ("", "/mnt/linux_backup")])
def test_default_base_dir_takes_only_a_plain_id(tmp_path, release, expected):
    path = tmp_path / "os-release"
    path.write_text(release)
    assert rt.default_base_dir(str(path)) == expected


def test_source_files_are_resolved_beneath_the_source(tmp_path):
    root = tmp_path / "root"
    (root / "usr/lib/modules/6.1.0-9").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr/lib/os-release").write_text('NAME="Inside"\n')
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "lib").symlink_to("/usr/lib")  # absolute: resolved inside the root, as the tree's own system does
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "os-release").write_text('NAME="Outside"\n')
    assert Tree(str(root)).resolve("etc/os-release") == "usr/lib/os-release"
    assert Tree(str(root)).resolve("../../../etc/os-release") == "usr/lib/os-release"
    assert rt.source_os_release(str(root)) == {"NAME": "Inside"}
    assert rt.source_kernels(str(root)) == ["6.1.0-9"]
    (root / "etc/os-release").unlink()
    (root / "etc/os-release").symlink_to("/../../../../%s/os-release" % outside)
    assert Tree(str(root)).resolve("etc/os-release") is None, "a link climbed out of the source"
    assert rt.source_os_release(str(root)) == {"NAME": "Inside"}  # usr/lib/os-release, never the outside one
    (root / "etc/loop").symlink_to("loop")
    assert Tree(str(root)).resolve("etc/loop") is None


def test_default_base_dir(tmp_path):
    release = tmp_path / "os-release"
    release.write_text('PRETTY_NAME="Debian GNU/Linux 12"\nID=debian\n')
    assert rt.default_base_dir(str(release)) == "/mnt/debian_backup"
