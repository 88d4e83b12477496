"""What the backup_server role and the pull_then_build and
restore_from_server playbooks left: the client's tree in its cache on the
server (one snapshot after converge and idempotence), the client holding only
the server's read-only key and no way into the server, the restored file on
the client, and the client's ISO, built on the server, booting to a login."""

import json
import os
import sys

import pytest
import testinfra

ARTIFACTS = os.path.join(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", ""), "artifacts")
BASE = "/srv/liveclone/lab-client"
CONFIG = "liveclone-lab-client"
MARKER = "/etc/liveclone-client-marker"
MARKER_TEXT = "written on the client before the pull"
KEYS = "/etc/liveclone/backup_server"
ROOT_PASSWORD = "molecule-root"


def report():
    with open(os.path.join(ARTIFACTS, "fleet-report.json")) as handle:
        return {entry["host"]: entry for entry in json.load(handle)["hosts"]}


def lab_host(name):
    return testinfra.get_host("ansible://%s?ansible_inventory=%s" % (name, os.environ["MOLECULE_INVENTORY_FILE"]))


@pytest.fixture(scope="module")
def server():
    return lab_host("lab-server")


@pytest.fixture(scope="module")
def client():
    return lab_host("lab-client")


def snapshots(server):
    out = server.check_output("snapper --no-dbus --jsonout -c %s list" % CONFIG)
    return [item["number"] for item in json.loads(out)[CONFIG] if item["number"] != 0]


def test_report_names_the_server_and_the_snapshot():
    entry = report()["lab-client"]
    assert entry["status"] == "ok" and entry["stage"] == "iso", entry
    assert entry["server"] == "lab-server" and entry["snapshot"] == "1"
    # The report is the last run's, idempotence's: an unchanged pull sends
    # nothing and takes no snapshot (the converge's full pull sent the tree).
    assert entry["bytes_sent"] == 0 and entry["snapshot_created"] is False, entry
    assert entry["backup_seconds"] > 0
    assert report()["lab-server"]["stage"] == "server"


def test_one_snapshot_holding_the_client(server, client):
    assert snapshots(server) == [1]
    copy = BASE + "/.rootfs_cache/.snapshots/1/snapshot"
    assert server.file(copy + MARKER).content_string.strip() == MARKER_TEXT
    # Every lab VM is called "lab": the marker, written on the client alone, says whose tree this is.
    assert server.file(copy + "/etc/hostname").content_string == client.file("/etc/hostname").content_string
    # /home is left out by default; the mounts of the client's own table too.
    assert not server.file(copy + "/home/alice/secret.txt").exists
    assert server.run("ls -A %s/proc %s/sys" % (copy, copy)).stdout.split() == ["%s/proc:" % copy, "%s/sys:" % copy]
    assert server.file(BASE + "/.backup_meta").exists


def test_client_host_keys_pinned(server, client):
    pinned = server.file(BASE + "/.liveclone-known_hosts").content_string
    for key in client.check_output("cat /etc/ssh/ssh_host_*_key.pub").splitlines():
        assert " ".join(key.split()[:2]) in pinned


def test_server_volume_is_btrfs(server):
    assert server.mount_point("/srv/liveclone").filesystem == "btrfs"
    assert server.file(KEYS).mode == 0o700
    assert server.file(KEYS + "/id_ed25519").mode == 0o600


def test_client_has_no_btrfs_tools(client):
    assert client.mount_point("/").filesystem == "ext4"
    assert not client.exists("btrfs") and not client.exists("snapper")


def test_client_holds_only_the_restricted_key(client, server):
    pull_key = server.file(KEYS + "/id_ed25519.pub").content_string.split()[1]
    restore_key = server.file(KEYS + "/restore_ed25519.pub").content_string.split()[1]
    lines = [line for line in client.file("/root/.ssh/authorized_keys").content_string.splitlines()
             if pull_key in line or restore_key in line]
    assert len(lines) == 1 and pull_key in lines[0]
    assert lines[0].startswith('restrict,command="/usr/bin/rrsync -ro /" ')


def test_client_has_no_way_into_the_server(client, server):
    # The client holds no key of the server's and none that the server accepts.
    private = server.file(KEYS + "/id_ed25519").content_string.strip()
    assert private not in client.run("cat /root/.ssh/* /etc/ssh/*key 2>/dev/null").stdout
    port = server.ansible.get_variables()["ansible_port"]
    # ssh's own 255 would read as a broken connection to testinfra: the status is echoed instead.
    attempt = client.run("ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                         "-o ConnectTimeout=20 -p %s root@10.0.2.2 ls %s; echo status=$?" % (port, BASE))
    assert "status=255" in attempt.stdout and "Permission denied" in attempt.stderr, attempt.stderr


def test_restored_file_on_the_client(client):
    restored = client.file("/tmp/liveclone-restore/liveclone-client-marker")
    assert restored.content_string.strip() == MARKER_TEXT
    assert restored.mode == 0o644


def test_restore_of_srv_left_the_other_filesystem_alone(client):
    """restore.yml gives the module no mount table: the record of the pull, beside the
    snapshot, says /srv/data was left out, and the restore with restore_delete_extra
    leaves it out (it used to read the server's mount table and delete the file)."""
    assert client.file("/srv/data/orders.db").content_string == "on another filesystem, never backed up\n"


def test_the_clients_files_are_root_s_alone_on_the_server(server):
    for path in ("/srv/liveclone", BASE):
        directory = server.file(path)
        assert (directory.user, directory.mode) == ("root", 0o700), path
    options = server.check_output("findmnt -n -o OPTIONS /srv/liveclone").split(",")
    assert "nosuid" in options and "nodev" in options, options
    record = json.loads(server.file(BASE + "/.liveclone-records/1.json").content_string)
    assert "/srv/data/*" in record["excludes"] and record["snapshot"] == "1", record


def test_client_iso_built_on_the_server_boots(tmp_path, client, server):
    client_key = client.check_output("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").split()[1]
    entry = report()["lab-client"]
    iso = os.path.join(ARTIFACTS, "lab-client", "live.iso")
    assert entry["iso"] == BASE + "/live.iso" and os.path.getsize(iso) == entry["size"]
    sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "lab"))
    from live_console import LiveMachine

    # The client has no signed chain, so the ISO has the unsigned GRUB
    # (secure_boot auto's fallback): booted under UEFI, without Secure Boot.
    manifest = json.loads(server.file(entry["iso"] + ".manifest.json").content_string)
    assert manifest["secure_boot"] == {"enabled": False}
    assert manifest["uefi_chain"] == "unsigned GRUB (Secure Boot off)"
    with LiveMachine(iso, str(tmp_path), firmware="uefi") as machine:
        machine.boot(entry=0)
        machine.login("root", ROOT_PASSWORD)
        print("login prompt after %s s (UEFI)" % machine.timings["login_prompt"])
        assert machine.run("test -d /sys/firmware/efi")[0] == 0
        assert machine.check("cat %s" % MARKER) == MARKER_TEXT
        assert machine.check("hostname") == "client-live"
        # What the live system must not carry: a user's home, the user, the
        # client's host keys (regenerated) and a key planted beside them.
        assert machine.run("test -e /home/alice")[0] != 0
        assert machine.run("getent passwd alice")[0] != 0
        assert machine.run("test -e /etc/ssh/ssh_host_planted_key")[0] != 0
        assert machine.check("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").split()[1] != client_key
