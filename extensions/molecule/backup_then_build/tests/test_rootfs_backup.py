"""What the rootfs_backup role left on each lab VM: the volume, the cache in
DistroClone's layout, a snapper snapshot, and on lab-alpha (given the options
an operator changes) a nightly timer whose job works; lab-bravo has the
role's defaults, so no timer at all."""

import json

BASE = "/mnt/debian_backup"
TIMER = "/etc/systemd/system/liveclone-rootfs-backup.timer"
SERVICE = "/etc/systemd/system/liveclone-rootfs-backup.service"
# Each host's mount options, as molecule.yml gives them (bravo: the role's default).
MOUNT_OPTIONS = {"lab-alpha": "noatime,compress=zstd:1", "lab-bravo": "noatime"}


def snapshots(host):
    out = host.check_output("snapper --no-dbus --jsonout -c distroclone-backup list")
    return [item for item in json.loads(out)["distroclone-backup"] if item["number"] != 0]


def name(host):
    return host.backend.get_hostname()


def test_volume_formatted_and_mounted_by_uuid(host):
    mount = host.mount_point(BASE)
    assert mount.exists and mount.filesystem == "btrfs"
    options = MOUNT_OPTIONS[name(host)]
    assert set(options.split(",")) <= set(mount.options)
    uuid = host.check_output("blkid -p -o value -s UUID /dev/vdb")
    assert host.check_output("blkid -p -o value -s LABEL /dev/vdb") == "liveclone-backup"
    assert "UUID=%s %s btrfs %s" % (uuid, BASE, options) in host.file("/etc/fstab").content_string


def test_cache_layout(host):
    assert host.file(BASE + "/.rootfs_cache").is_directory
    assert host.file(BASE + "/.rootfs_cache/etc/os-release").is_file
    # Excluded: the volume itself, /proc, the lab's root key.
    assert host.run("ls -A %s/.rootfs_cache/mnt" % BASE).stdout.strip() == ""
    assert not host.file(BASE + "/.rootfs_cache/root/.ssh/authorized_keys").exists
    meta = host.file(BASE + "/.backup_meta")
    assert meta.mode == 0o644
    keys = {line.split("=", 1)[0] for line in meta.content_string.splitlines() if "=" in line}
    assert {"META_DATE", "META_DISTRO", "META_SIZE"} <= keys


def test_one_snapshot_after_converge_and_idempotence(host):
    taken = snapshots(host)
    assert len(taken) == 1
    assert host.file(BASE + "/.rootfs_cache/.snapshots/%d/snapshot/etc/os-release" % taken[0]["number"]).is_file


def test_retention_in_the_snapper_config(host):
    limit = {"lab-alpha": "3", "lab-bravo": "10"}[name(host)]
    config = host.check_output("snapper --no-dbus --jsonout -c distroclone-backup get-config")
    assert json.loads(config)["NUMBER_LIMIT"] == limit


def test_timer_as_asked(host):
    if name(host) == "lab-bravo":
        # rootfs_backup_timer defaults to false: nothing installed, nothing scheduled.
        assert not host.file(TIMER).exists and not host.file(SERVICE).exists
        # testinfra cannot ask about a unit systemd does not know; systemctl
        # show can, and exits 0 with LoadState=not-found.
        for unit in ("liveclone-rootfs-backup.timer", "liveclone-rootfs-backup.service"):
            assert host.check_output("systemctl show --property=LoadState --value %s" % unit) == "not-found"
        return
    timer = host.service("liveclone-rootfs-backup.timer")
    assert timer.is_enabled and timer.is_running
    unit = host.file(TIMER).content_string
    assert "OnCalendar=*-*-* 02:30:00" in unit and "Persistent=true" in unit and "RandomizedDelaySec=1h" in unit
    assert host.run("systemd-analyze verify %s" % SERVICE).rc == 0


def test_timer_job_backs_up(host):
    """The job the timer starts runs the same backup: after a change, it takes
    a snapshot. Last in the scenario: it adds a snapshot the other tests do not expect."""
    if name(host) == "lab-bravo":
        assert host.run("systemctl start liveclone-rootfs-backup.service").rc != 0
        assert len(snapshots(host)) == 1
        return
    before = len(snapshots(host))
    host.check_output("date > /etc/liveclone-timer-proof")
    try:
        result = host.run("systemctl start liveclone-rootfs-backup.service")
        assert result.rc == 0, host.run("journalctl -u liveclone-rootfs-backup.service --no-pager -n 40").stdout
        assert len(snapshots(host)) == before + 1
        assert host.file(BASE + "/.rootfs_cache/etc/liveclone-timer-proof").is_file
    finally:
        host.run("rm -f /etc/liveclone-timer-proof")
