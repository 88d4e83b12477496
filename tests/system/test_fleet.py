"""backup_then_build.yml from the installed collection, run the way AWX runs a
job (ansible-runner, survey answers as extra vars), on three inventory hosts
that are all this machine, each with its own backup device, cache, snapper
config and ISO. alpha's device is blank and the role formats it; bravo's
holds btrfs already and is mounted for now only; charlie's source does not
exist, so charlie fails while the others go on."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib

import ansible_runner
import pytest
import yaml
from conftest import release_backup_disks, run
from sandbox import mounted_under

HOSTS = ("alpha", "bravo", "charlie")


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@pytest.fixture(scope="module")
def fleet(sandbox, debian_tree):
    """Loop devices standing for each host's backup disk, and the inventory."""
    work = os.path.join(sandbox, "fleet")
    os.makedirs(work)
    devices = {}
    try:
        hostvars = {}
        for host in HOSTS:
            image = os.path.join(work, "%s-disk.img" % host)
            run(["truncate", "--size", "3G", image])
            devices[host] = run(["losetup", "--find", "--show", image]).stdout.strip()
            hostvars[host] = {
                "ansible_connection": "local",
                "ansible_python_interpreter": "/usr/bin/python3",
                # Root already; there is no sudo to become through.
                "ansible_become": False,
                "rootfs_backup_source": debian_tree if host != "charlie" else os.path.join(work, "no-such-tree"),
                "rootfs_backup_base_dir": os.path.join(work, "%s_backup" % host),
                "rootfs_backup_snapper_config": "liveclone-%s" % host,
                "rootfs_backup_device": devices[host],
                "rootfs_backup_format_device": host != "bravo",
                "rootfs_backup_mount_persistent": host == "alpha",
                "live_iso_dest": os.path.join(work, host, "live.iso"),
                "live_iso_hostname": host,
                # A password that is part of the ISO's path: Ansible masks it in module results.
                "live_iso_live_password": "live",
                # A cheap level: these builds test the fleet job, not the preset.
                "live_iso_compression_level": 3,
            }
        run(["mkfs.btrfs", "--quiet", "--label", "bravo-backup", devices["bravo"]])
        inventory = os.path.join(work, "inventory.yml")
        with open(inventory, "w") as handle:
            yaml.safe_dump({"all": {"hosts": hostvars}}, handle)
        yield {"work": work, "inventory": inventory, "devices": devices, "hostvars": hostvars}
    finally:
        release_backup_disks(work, devices)


def run_job(fleet, installed_collections, name, extravars):
    """One AWX-style job: a fresh private data dir, the playbook by its FQCN
    from the installed collection, extra vars as a survey passes them."""
    private = os.path.join(fleet["work"], "runner-%s" % name)
    os.makedirs(private)
    env = {
        "ANSIBLE_COLLECTIONS_PATH": str(installed_collections),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    result = ansible_runner.run(private_data_dir=private, playbook="liveclone.core.backup_then_build",
                                inventory=fleet["inventory"], extravars=extravars, envvars=env, quiet=True,
                                timeout=1800)
    with open(os.path.join(private, "artifacts", result.config.ident, "stdout")) as handle:
        stdout = handle.read()
    return result, stdout


def survey(fleet, hosts, **extra):
    answers = {"liveclone_hosts": hosts, "live_iso_concurrency": 1,
               "liveclone_artifact_dir": os.path.join(fleet["work"], "artifacts"), "rootfs_backup_keep": 3}
    answers.update(extra)
    return answers


def task_spans(result, action):
    """(host, start, end) of each run of a module, from the job's events."""
    starts, spans = {}, []
    for event in result.events:
        data = event.get("event_data", {})
        if data.get("task_action") != action:
            continue
        if event["event"] == "runner_on_start":
            starts[data["host"]] = datetime.datetime.fromisoformat(event["created"])
        elif event["event"] in ("runner_on_ok", "runner_on_failed"):
            spans.append((data["host"], starts[data["host"]], datetime.datetime.fromisoformat(event["created"])))
    return sorted(spans, key=lambda span: span[1])


def changed_tasks(result):
    return [(event["event_data"]["host"], event["event_data"]["task"]) for event in result.events
            if event["event"] == "runner_on_ok" and event["event_data"]["res"].get("changed")]


@pytest.fixture(scope="module")
def first_job(fleet, installed_collections):
    return run_job(fleet, installed_collections, "first", survey(fleet, "alpha:bravo:charlie"))


def read_report(fleet):
    with open(os.path.join(fleet["work"], "artifacts", "fleet-report.json")) as handle:
        return json.load(handle)


def test_one_failing_host_does_not_stop_the_others(first_job):
    result, stdout = first_job
    assert result.status == "failed", stdout[-3000:]
    assert result.stats["failures"] == {"charlie": 1}, stdout[-3000:]
    assert set(result.stats["ok"]) >= {"alpha", "bravo", "charlie", "localhost"}


def test_fleet_report(fleet, first_job):
    result, stdout = first_job
    report = read_report(fleet)
    entries = {entry["host"]: entry for entry in report["hosts"]}
    assert sorted(entries) == sorted(HOSTS)
    for host in ("alpha", "bravo"):
        entry = entries[host]
        fetched = os.path.join(fleet["work"], "artifacts", host, "live.iso")
        assert entry["status"] == "ok" and entry["stage"] == "iso", entry
        assert entry["snapshot"] == "1" and entry["snapshot_created"] is True
        assert entry["iso"] == fleet["hostvars"][host]["live_iso_dest"]
        assert entry["sha256"] == sha256(fetched) == sha256(entry["iso"])
        assert entry["size"] == os.path.getsize(fetched)
        assert entry["fetched"] == fetched
        with open(fetched + ".sha256") as handle:
            assert handle.read().split() == [entry["sha256"], "live.iso"]
        assert entry["backup_seconds"] > 0 and entry["iso_seconds"] > 0
        assert entry["duration"] == pytest.approx(entry["backup_seconds"] + entry["iso_seconds"], abs=0.11)
    charlie = entries["charlie"]
    assert charlie["status"] == "failed" and charlie["stage"] == "backup"
    assert "no-such-tree" in charlie["error"]
    summary = report["summary"]
    assert summary["hosts"] == 3 and sorted(summary["ok"]) == ["alpha", "bravo"]
    assert [item["host"] for item in summary["failed"]] == ["charlie"]
    assert summary["iso_bytes"] == entries["alpha"]["size"] + entries["bravo"]["size"]
    markdown = pathlib.Path(fleet["work"], "artifacts", "fleet-report.md").read_text()
    assert "2 of 3 hosts ok; not ok: charlie." in markdown
    assert "| alpha | ok |" in markdown and "| charlie | failed (backup) |" in markdown


def test_iso_builds_were_throttled(first_job):
    """live_iso_concurrency=1: the second build started when the first ended.
    Unthrottled, both would start within a second of each other; a build takes
    over a minute. Event times come from two processes, hence the margin."""
    result = first_job[0]
    spans = task_spans(result, "liveclone.core.live_iso")
    assert len(spans) == 2
    first_end, second_start = spans[0][2], spans[1][1]
    assert second_start >= first_end - datetime.timedelta(seconds=1), spans


def test_backup_volumes(fleet, first_job):
    """alpha's blank device was formatted and recorded in (the covering copy of)
    /etc/fstab; bravo's existing btrfs was mounted for now only; charlie's device
    was formatted and mounted before its backup failed."""
    with open("/etc/fstab") as handle:
        fstab = handle.read()
    alpha_uuid = run(["blkid", "-p", "-o", "value", "-s", "UUID", fleet["devices"]["alpha"]]).stdout.strip()
    assert "UUID=%s %s btrfs noatime" % (alpha_uuid, fleet["hostvars"]["alpha"]["rootfs_backup_base_dir"]) in fstab
    assert fleet["hostvars"]["bravo"]["rootfs_backup_base_dir"] not in fstab
    bravo_label = run(["blkid", "-p", "-o", "value", "-s", "LABEL", fleet["devices"]["bravo"]]).stdout.strip()
    assert bravo_label == "bravo-backup"
    for host in ("alpha", "bravo"):
        base = fleet["hostvars"][host]["rootfs_backup_base_dir"]
        assert mounted_under(base) == [base]
        assert os.path.isdir(os.path.join(base, ".rootfs_cache", "etc"))
        assert os.path.isdir(os.path.join(base, ".rootfs_cache", ".snapshots", "1", "snapshot", "etc"))


def test_rerun_changes_nothing(fleet, installed_collections, first_job):
    """The same job again on the healthy hosts: nothing changed, same ISOs."""
    before = {entry["host"]: entry for entry in read_report(fleet)["hosts"]}
    result, stdout = run_job(fleet, installed_collections, "again", survey(fleet, "alpha:bravo"))
    assert result.status == "successful", stdout[-3000:]
    assert result.stats["changed"] == {}, changed_tasks(result)
    after = {entry["host"]: entry for entry in read_report(fleet)["hosts"]}
    assert sorted(after) == ["alpha", "bravo"]
    for host in after:
        assert after[host]["sha256"] == before[host]["sha256"]
        assert after[host]["snapshot"] == "1" and after[host]["snapshot_created"] is False
