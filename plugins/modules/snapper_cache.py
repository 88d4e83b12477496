#!/usr/bin/python
# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: snapper_cache
short_description: Versioned rsync backups of a running host into a btrfs cache
version_added: 0.1.0
description:
  - Keeps an rsync clone of O(source) in C(BASE/.rootfs_cache), a btrfs subvolume,
    versioned by read-only snapshots, in the layout of DistroClone Backup, so
    that DistroClone builds live ISOs from it.
  - The snapshot is taken after a successful copy, so the newest backup is always
    versioned. With O(snapshot=on_change), a run that copied nothing takes no
    snapshot and reports C(changed=false).
  - Retention deletes every snapshot beyond O(keep), snapper-numbered and legacy
    C(@YYYY-MM-DD_HH:MM) snapshots alike, oldest first.
  - Nested btrfs subvolumes of the source are copied; other mounted filesystems
    are not.
author:
  - liveclone.core maintainers (@liveclone)
extends_documentation_fragment:
  - liveclone.core._attributes
  - liveclone.core._attributes.ALL_SUPPORTED
  - liveclone.core._cache
  - liveclone.core._cache.BASE_DIR
requirements:
  - rsync, btrfs-progs, util-linux (C(findmnt)); snapper for O(versioning=snapper)
notes:
  - Runs as root on the target, with snapper driven without D-Bus (C(snapper --no-dbus)).
  - A lock in O(base_dir) serialises runs on one cache.
  - Check mode runs C(rsync --dry-run) to report what would be copied, and lists
    the snapshots retention would delete. It refuses what a real run refuses, and
    lists the steps a real run carries out (leftovers of an interrupted run removed,
    C(.backup_meta) written, O(restore_dest) created).
  - Every path parameter is made canonical before any rule is checked (V(//),
    V(/./) and V(/../) are V(/); trailing slashes go), and the result reports the
    canonical form.
  - Nothing in O(base_dir) is followed through a symlink. A C(.rootfs_cache) or
    C(.snapshots) that is a link, not a directory, a mount point or on another
    filesystem refuses every state (nothing is deleted, copied into or snapshotted
    through it; remove or unmount it yourself). An entry of C(.snapshots) that is a
    link or no subvolume is never a snapshot (never listed, pruned or deleted; a
    warning names it). C(.backup_meta) and the module's own files, when links, are
    replaced (backup) or removed as links (O(state=absent)); a C(.backup_meta) that
    is a directory refuses the run. Each subvolume is checked again (a real
    directory beneath O(base_dir), not a mount point, on its filesystem) right
    before it is deleted or copied into.
  - Before anything is changed the run refuses, with a message, a read-only
    O(base_dir), one that is full or out of inodes, an immutable or append-only
    entry it would change, and filesystems mounted inside the cache. A file in the
    cache that is immutable is found by check mode; a real run stops at it (no
    snapshot taken, C(.backup_meta) and every snapshot unchanged).
  - C(.backup_meta) and snapper's userdata come from the source's C(os-release) and
    C(lib/modules) (read beneath O(source), its links resolved inside it); control
    characters and line separators become spaces, commas and C(=) are kept out of
    userdata, and C(.backup_meta) escapes C(\) C(") C($) C(`), so a hostile value adds no
    line, key or shell code.
options:
  source:
    description:
      - Root of the tree to back up; no control characters. Symlinks in it are copied as symlinks.
    type: path
    default: /
  state:
    description:
      - V(present) runs a backup.
      - V(absent) deletes the whole cache (snapshots first, as C(rm -rf) cannot
        delete read-only snapshots), then the snapper config.
      - V(restored) copies the snapshot O(restore_snapshot) into O(restore_dest).
    type: str
    choices: [present, absent, restored]
    default: present
  versioning:
    description:
      - V(auto) uses snapper when O(base_dir) is on btrfs and snapper is installed,
        raw read-only btrfs snapshots when only btrfs, and none (with a warning)
        on other filesystems.
      - V(snapper), V(btrfs) and V(none) force one; forcing a btrfs kind on
        another filesystem is refused.
    type: str
    choices: [auto, snapper, btrfs, none]
    default: auto
  keep:
    description: How many snapshots retention keeps; an integer, 1 or more (a boolean is refused).
    type: int
    default: 10
  exclude:
    description:
      - rsync exclude patterns added to the standard list (C(/dev/*), C(/proc/*),
        C(/sys/*), C(/run/*), C(/tmp/*), C(/mnt/*), C(/media/*), caches, logs,
        snapshot directories and live_iso's default output C(/var/lib/liveclone);
        see docs/snapper_cache.md).
      - A pattern starting with C(/) is anchored at O(source).
      - No control characters; V(!) and patterns starting with C(+ ) or C(- ) are
        refused, as rsync reads them as filter rules (V(!) clears every exclusion).
    type: list
    elements: str
    default: []
  include_home:
    description: Back up the contents of C(/home) and C(/root) too.
    type: bool
    default: false
  snapshot:
    description:
      - V(on_change) snapshots only when the copy changed something.
      - V(always) snapshots after every successful copy; V(never) does not snapshot.
    type: str
    choices: [on_change, always, never]
    default: on_change
  checksum:
    description: Compare file contents, not size and time (slow, thorough).
    type: bool
    default: false
  restore_snapshot:
    description:
      - Snapshot to restore with O(state=restored), by name as returned in
        RV(snapshots), that is V(latest), a snapper number such as V(3), or a legacy
        V(@2026-06-17_14:30) (with an optional V(_N)). Nothing else is accepted.
    type: str
    default: latest
  restore_dest:
    description:
      - Directory to restore into; created when missing. Required with O(state=restored).
      - Absolute, no control characters, not running through a symlink nor being
        one, not an existing file, not inside O(base_dir), and not holding
        O(base_dir) (except V(/), where O(base_dir) is left out of the restore).
      - V(/) in any spelling needs O(allow_restore_to_root).
      - A directory that holds files the snapshot lacks needs O(restore_delete_extra).
    type: path
  restore_delete_extra:
    description:
      - Allow a restore into a non-empty O(restore_dest) to delete the files there
        that the snapshot lacks (the copy is C(rsync --delete)).
      - Without it such a restore is refused, naming how many files would be
        deleted (found with C(rsync --dry-run)). A destination that is empty, or
        holds nothing the snapshot lacks, needs nothing. Check mode lists what
        would be deleted in RV(transfer.deleted_paths).
    type: bool
    default: false
  allow_restore_to_root:
    description: Allow O(restore_dest=/) (or V(//), V(/./)...), which overwrites the running system.
    type: bool
    default: false
  lock_timeout:
    description: Seconds to wait for another run on the same cache before failing; an integer, 0 or more.
    type: int
    default: 300
  io_timeout:
    description:
      - Seconds a copy (a backup, a pull, a restore) may go with C(rsync) reading nothing (its processes'
        reads, from the source, the client's connection and the files it compares) before it is stopped
        (C(TERM), C(KILL) 30 s later), so that a stalled client, a hung filesystem or a dead link fails
        the run instead of holding the cache's lock for ever; V(0) for no limit.
      - C(rsync --timeout) is not used for this; it misses a sender that stops, because the keep-alives
        the receiving side writes count as activity.
      - The run then fails saying so, the lock is released, no snapshot is taken, and the next run
        finishes the copy.
    type: int
    default: 300
  copy_timeout:
    description:
      - Seconds a copy may take in all, however slowly its data moves; past it C(rsync) is stopped
        (C(TERM) to it and the processes it started, C(KILL) 30 s later) and the run fails as with
        O(io_timeout). V(0) for no limit.
    type: int
    default: 86400
  restore_path:
    description:
      - What of the snapshot O(state=restored) copies, as a path in the backed-up tree (V(/etc),
        V(/etc/fstab)); V(/) for all of it. O(restore_dest) is always a directory; a directory's
        contents are copied into it (with C(rsync --delete) there), a file or link into it under
        its own name (V(/etc/fstab) with O(restore_dest=/etc) restores C(/etc/fstab)).
      - A restore leaves out what the backup left out (the standard exclusions, C(/home) unless
        O(include_home), other filesystems, O(exclude)), anchored at O(restore_path), so that its
        C(--delete) never removes what the backup did not hold.
    type: path
    default: /
  remote:
    description:
      - A client that this host, a backup server, pulls from (O(state=present), O(source) being
        a path on the client) or restores into (O(state=restored), O(restore_dest) being a path
        on the client), with rsync over SSH. The client needs rsync and an SSH server, nothing else.
      - The key must be restricted on the client to a read-only rsync for a pull, in its
        C(authorized_keys) as C(restrict,command="/usr/bin/rrsync -ro /") (the C(backup_server)
        role installs it). Before any copy, in check mode too, the pull checks that the key runs
        no command that is not rsync and that a dry-run push with it is refused.
      - The client's host keys are pinned in C(BASE_DIR/.liveclone-known_hosts) on the first pull;
        keys that differ later are refused, naming both fingerprints. ssh runs with only this key,
        only the pinned host keys (C(StrictHostKeyChecking=yes)), no agent, no prompt, no
        compression and no user configuration (C(-F /dev/null)).
      - A restore needs a key that may write there (the role installs one with
        C(rrsync -wo /) for the restore only); the destination is checked on the client by the
        role, and O(restore_delete_extra) and O(allow_restore_to_root) apply as for a local restore.
    type: dict
    suboptions:
      host:
        description: The client's address (host name or IP address) as this server reaches it.
        type: str
        required: true
      port:
        description: The client's SSH port.
        type: int
        default: 22
      user:
        description: The user the key logs in as on the client (C(root) reads every file).
        type: str
        default: root
      identity_file:
        description:
          - The private key on this server that the client authorized; never the controller's key.
          - An absolute path without blanks, quotes or backslashes.
        type: path
        required: true
      host_keys:
        description:
          - The client's public host keys, C(TYPE BASE64 [comment]) lines, as the controller
            gathered them (the client's C(/etc/ssh/ssh_host_*_key.pub)); the only keys ssh accepts.
        type: list
        elements: str
        required: true
      accept_new_host_keys:
        description: Replace pinned host keys that differ from O(remote.host_keys) (a reinstalled client).
        type: bool
        default: false
      mountinfo:
        description:
          - The text of the client's C(/proc/self/mountinfo), as the controller read it; required
            for a pull. The filesystems mounted inside O(source) on the client are left out, but
            for nested btrfs subvolumes of its own filesystem (as for a local backup).
        type: str
      connect_timeout:
        description: Seconds ssh waits for the client to answer.
        type: int
        default: 10
seealso:
  - module: liveclone.core.snapper_cache_info
"""

EXAMPLES = r"""
- name: Back up this host into /mnt/debian_backup, keeping 10 versions
  liveclone.core.snapper_cache:
    base_dir: /mnt/debian_backup

- name: Back up with /home, keep 3 versions, skip a scratch directory
  liveclone.core.snapper_cache:
    base_dir: /mnt/debian_backup
    include_home: true
    keep: 3
    exclude:
      - /srv/scratch/*

- name: Restore snapshot 3 into /srv/restore
  liveclone.core.snapper_cache:
    base_dir: /mnt/debian_backup
    state: restored
    restore_snapshot: "3"
    restore_dest: /srv/restore

- name: Restore the newest snapshot over an existing copy, deleting what the snapshot lacks
  liveclone.core.snapper_cache:
    base_dir: /mnt/debian_backup
    state: restored
    restore_dest: /srv/restore
    restore_delete_extra: true

- name: On a backup server, pull the client web1 into its own cache
  liveclone.core.snapper_cache:
    base_dir: /srv/liveclone/web1
    remote:
      host: 192.0.2.10
      identity_file: /etc/liveclone/backup_server/id_ed25519
      host_keys: "{{ web1_host_keys }}"  # the client's /etc/ssh/ssh_host_*_key.pub, gathered by the controller
      mountinfo: "{{ web1_mountinfo }}"  # the client's /proc/self/mountinfo

- name: Delete the whole cache and its snapper config
  liveclone.core.snapper_cache:
    base_dir: /mnt/debian_backup
    state: absent
"""

RETURN = r"""
base_dir:
  description: The cache's base directory.
  returned: always
  type: str
  sample: /mnt/debian_backup
exists:
  description: Whether C(.rootfs_cache) exists.
  returned: always
  type: bool
versioning:
  description: The versioning used (V(snapper), V(btrfs) or V(none)); null after O(state=absent).
  returned: always
  type: str
  sample: snapper
snapshots:
  description: The cache's snapshots, oldest first.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Snapper number as a string, or the legacy C(@DATE) name.
      type: str
    number:
      description: Snapper number; null for legacy snapshots.
      type: int
    kind:
      description: V(snapper) or V(btrfs) (legacy).
      type: str
    date:
      description: When it was taken.
      type: str
    description:
      description: Its description.
      type: str
    userdata:
      description: C(distro), C(kernel) and C(size_kb) of the backup.
      type: dict
    path:
      description: The read-only snapshot's directory.
      type: str
    read_only:
      description: Whether the snapshot is read-only.
      type: bool
snapshot_created:
  description: The snapshot this run took, in the form of an item of RV(snapshots).
  returned: always
  type: dict
snapshots_pruned:
  description: The snapshots retention deleted (or would delete, in check mode).
  returned: always
  type: list
  elements: dict
transfer:
  description: What rsync copied (or would copy, in check mode).
  returned: when O(state) is V(present) or V(restored)
  type: dict
  contains:
    changes:
      description:
        - Itemized changes (files and directories created, changed or deleted).
        - A directory whose only change is its modification time is not counted.
      type: int
    files_total:
      description: Files in the copy.
      type: int
    files_transferred:
      description: Regular files whose data was sent.
      type: int
    files_deleted:
      description: Entries (files, links and directories) deleted from the destination, or that would be in check mode.
      type: int
    total_size:
      description: Bytes in the copy.
      type: int
    bytes_transferred:
      description: Bytes of the files sent.
      type: int
    changed_paths:
      description:
        - The first 20 of rsync's itemized changes (C(--itemize-changes) format), to tell why a run
          reported a change.
      type: list
      elements: str
      sample: [">f.st...... etc/hostname", "*deleting   etc/old.conf"]
    deleted_paths:
      description:
        - The first 20 paths deleted from the destination (or that would be, in check mode),
          relative to it; a directory ends with C(/).
      type: list
      elements: str
      sample: ["etc/old.conf", "srv/stale/"]
metadata:
  description: The C(.backup_meta) values, read as data.
  returned: always
  type: dict
  sample: {META_DATE: "2026-06-17 14:30", META_DISTRO: Debian GNU/Linux, META_SIZE: 8.2G,
           META_KERNEL: 6.1.0-28-amd64, META_SNAPSHOT: "4"}
restored:
  description: The snapshot restored.
  returned: when O(state=restored)
  type: dict
remote:
  description: The client of a pull or a remote restore; null for a local run.
  returned: always
  type: dict
  contains:
    host:
      description: Its address.
      type: str
    port:
      description: Its SSH port.
      type: int
    user:
      description: The user the key logs in as.
      type: str
    host_key_fingerprints:
      description: SHA256 fingerprints of the host keys accepted for it.
      type: list
      elements: str
    pinned:
      description: Whether this run pinned the keys (first pull, or O(remote.accept_new_host_keys)).
      type: bool
operations:
  description: What was done, or would be done in check mode.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.liveclone.core.plugins.module_utils._cache.options import cache_argument_spec
from ansible_collections.liveclone.core.plugins.module_utils._common.command import (
    CommandRunner,
)
from ansible_collections.liveclone.core.plugins.module_utils._common.errors import LivecloneError
from ansible_collections.liveclone.core.plugins.module_utils._common.fs import describe_os_error
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache.desired import Desired
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache.run import run


def main():
    module = AnsibleModule(
        argument_spec=dict(
            **cache_argument_spec(),
            source=dict(type="path", default="/"),
            state=dict(type="str", choices=["present", "absent", "restored"], default="present"),
            versioning=dict(type="str", choices=["auto", "snapper", "btrfs", "none"], default="auto"),
            keep=dict(type="int", default=10),
            exclude=dict(type="list", elements="str", default=[]),
            include_home=dict(type="bool", default=False),
            snapshot=dict(type="str", choices=["on_change", "always", "never"], default="on_change"),
            checksum=dict(type="bool", default=False),
            restore_snapshot=dict(type="str", default="latest"),
            restore_dest=dict(type="path"),
            restore_delete_extra=dict(type="bool", default=False),
            allow_restore_to_root=dict(type="bool", default=False),
            lock_timeout=dict(type="int", default=300),
            io_timeout=dict(type="int", default=300),
            copy_timeout=dict(type="int", default=86400),
            restore_path=dict(type="path", default="/"),
            remote=dict(type="dict", options=dict(
                host=dict(type="str", required=True),
                port=dict(type="int", default=22),
                user=dict(type="str", default="root"),
                identity_file=dict(type="path", required=True),
                host_keys=dict(type="list", elements="str", required=True, no_log=False),
                accept_new_host_keys=dict(type="bool", default=False),
                mountinfo=dict(type="str"),
                connect_timeout=dict(type="int", default=10),
            )),
        ),
        required_if=[("state", "restored", ["restore_dest"])],
        supports_check_mode=True,
    )
    carried_out = []
    try:
        result = run(CommandRunner(module), Desired.from_params(module.params), module.check_mode, carried_out)
    except LivecloneError as error:
        module.fail_json(msg=str(error), operations=[str(operation) for operation in carried_out])
    except OSError as error:
        module.fail_json(msg=describe_os_error(error), operations=[str(operation) for operation in carried_out])
    for warning in result.warnings:
        module.warn(warning)
    values = result.module_result()
    if not module._diff:
        values.pop("diff")
    module.exit_json(**values)


if __name__ == "__main__":
    main()
