"""Both VMs backed up and their ISOs built, fetched and reported."""

import json
import os

ARTIFACTS = os.path.join(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", ""), "artifacts")


def report():
    with open(os.path.join(ARTIFACTS, "fleet-report.json")) as handle:
        return json.load(handle)


def test_report_lists_both_hosts_ok():
    entries = {entry["host"]: entry for entry in report()["hosts"]}
    assert sorted(entries) == ["lab-alpha", "lab-bravo"]
    for entry in entries.values():
        assert entry["status"] == "ok" and entry["stage"] == "iso"
        assert entry["snapshot"] == "1"


def test_host_iso_matches_report(host):
    name = host.backend.get_hostname()
    entry = {item["host"]: item for item in report()["hosts"]}[name]
    remote = host.check_output("sha256sum /var/lib/liveclone/live.iso").split()[0]
    assert entry["sha256"] == remote
    assert os.path.getsize(os.path.join(ARTIFACTS, name, "live.iso")) == entry["size"]


def test_iso_built_from_the_snapshot_just_taken(host):
    manifest = json.loads(host.check_output("cat /var/lib/liveclone/live.iso.manifest.json"))
    assert manifest["source"]["snapshot"] == "1"
    assert manifest["source"]["path"].startswith("/mnt/debian_backup/.rootfs_cache/.snapshots/1/snapshot")
