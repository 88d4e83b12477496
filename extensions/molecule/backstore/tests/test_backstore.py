"""What the backstore role left on the lab VM."""

MIB = 1 << 20


def test_live_boot_store_on_the_fat_stick(host):
    assert host.mount_point("/media/stick").filesystem == "vfat"
    store = host.file("/media/stick/persistence")
    assert store.is_file and store.size == 256 * MIB
    probe = host.run("blkid -p -o export /media/stick/persistence")
    assert "TYPE=ext4" in probe.stdout and "LABEL=persistence" in probe.stdout
    conf = host.run("debugfs -R 'cat /persistence.conf' /media/stick/persistence")
    assert conf.stdout.strip() == "/ union"


def test_sysrescue_store(host):
    store = host.file("/srv/sysrcd.bs")
    assert store.is_file and store.size == 128 * MIB
    assert "TYPE=ext3" in host.run("blkid -p -o export /srv/sysrcd.bs").stdout
    assert host.run("e2fsck -fn /srv/sysrcd.bs").rc == 0


def test_nothing_left_attached(host):
    assert host.run("losetup --noheadings --list").stdout.strip() == ""
