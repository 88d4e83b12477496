"""The roles refuse what they must not do, say what to do instead, and change
nothing: no device is formatted unless allowed and blank, and bad variables
are caught by the roles' argument specs before any task runs."""

from __future__ import annotations

import pathlib
import subprocess

import ansible_runner
import pytest
import yaml
from conftest import run


@pytest.fixture()
def loop_device(sandbox, tmp_path):
    image = tmp_path / "disk.img"
    run(["truncate", "--size", "300M", str(image)])
    device = run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def run_role(tmp_path, installed_collections, role, variables):
    playbook = tmp_path / "play.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Run the role", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": {"ansible_python_interpreter": "/usr/bin/python3"},
        "roles": [dict({"role": role}, **variables)]}]))
    private = tmp_path / "runner"
    private.mkdir()
    result = ansible_runner.run(private_data_dir=str(private), playbook=str(playbook), quiet=True,
                                envvars={"ANSIBLE_COLLECTIONS_PATH": str(installed_collections),
                                         "ANSIBLE_NOCOLOR": "1"})
    failures = [event["event_data"]["res"].get("msg", "") for event in result.events
                if event["event"] == "runner_on_failed"]
    return result, " ".join(str(message) for message in failures)


def signatures(device):
    return subprocess.run(["blkid", "--probe", "--output", "export", device], text=True,
                          capture_output=True, check=False).stdout


def backup_vars(tmp_path, device, **extra):
    variables = {"rootfs_backup_device": device, "rootfs_backup_base_dir": str(tmp_path / "backup"),
                 "rootfs_backup_source": str(tmp_path), "rootfs_backup_snapper_config": "liveclone-refusal",
                 "rootfs_backup_install_packages": False}
    variables.update(extra)
    return variables


def test_blank_device_is_not_formatted_unless_allowed(tmp_path, installed_collections, loop_device):
    fstab = pathlib.Path("/etc/fstab").read_text()
    result, message = run_role(tmp_path, installed_collections, "liveclone.core.rootfs_backup",
                               backup_vars(tmp_path, loop_device))
    assert result.status == "failed"
    assert "holds no filesystem; set rootfs_backup_format_device: true" in message
    assert signatures(loop_device) == ""
    assert pathlib.Path("/etc/fstab").read_text() == fstab
    assert not (tmp_path / "backup").exists()


def test_partitioned_device_is_refused(tmp_path, installed_collections, loop_device):
    subprocess.run(["sfdisk", "--quiet", loop_device], input="label: gpt\n,100M\n", text=True, check=True)
    before = signatures(loop_device)
    assert "PTTYPE=gpt" in before
    result, message = run_role(tmp_path, installed_collections, "liveclone.core.rootfs_backup",
                               backup_vars(tmp_path, loop_device, rootfs_backup_format_device=True))
    assert result.status == "failed"
    assert "gpt partition table; liveclone will not format a partitioned disk" in message
    assert signatures(loop_device) == before


def test_device_that_is_not_a_block_device(tmp_path, installed_collections, sandbox):
    regular = tmp_path / "not-a-disk"
    regular.write_bytes(b"\0" * 4096)
    result, message = run_role(tmp_path, installed_collections, "liveclone.core.rootfs_backup",
                               backup_vars(tmp_path, str(regular), rootfs_backup_format_device=True))
    assert result.status == "failed"
    assert "is not a block device" in message
    assert regular.read_bytes() == b"\0" * 4096


@pytest.mark.parametrize(("role", "variables", "named"), [
    ("liveclone.core.rootfs_backup", {"rootfs_backup_keep": "many"}, "rootfs_backup_keep"),
    ("liveclone.core.rootfs_backup", {"rootfs_backup_versioning": "zfs"}, "rootfs_backup_versioning"),
    ("liveclone.core.backstore", {"backstore_layout": "ventoy", "backstore_path": "/x"}, "backstore_layout"),
    ("liveclone.core.backstore", {"backstore_size": "1G"}, "backstore_path"),
    ("liveclone.core.live_iso", {"live_iso_compression": "bzip2"}, "live_iso_compression"),
    ("liveclone.core.live_iso", {"live_iso_checksums": ["sha1"]}, "live_iso_checksums"),
])
def test_argument_specs_reject_bad_variables(tmp_path, installed_collections, sandbox, role, variables, named):
    result, message = run_role(tmp_path, installed_collections, role, variables)
    assert result.status == "failed"
    assert "Validation of arguments failed" in message and named in message
    # The spec check is the first task: nothing else ran.
    ran = [event["event_data"]["task"] for event in result.events if event["event"] == "runner_on_ok"]
    assert ran == []
