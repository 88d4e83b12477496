#!/usr/bin/python
# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: backstore
short_description: Create, grow and remove backing stores for live systems
version_added: 0.1.0
description:
  - Manages a backing store, the loopback filesystem image in which a live
    system keeps its changes across reboots, in the formats live systems look
    for (SystemRescueCd C(sysrcd.bs), Debian live-boot C(persistence), casper
    C(casper-rw), archiso cow filesystems).
  - Creation is atomic. The image is built under a temporary name in the same
    directory, formatted and filled with the layout's files, then renamed, so
    an interrupted run never leaves a half-made store under the final name.
  - Growing never loses data. An image that is not in use is checked and grown
    offline; an image attached to a loop device and mounted is grown online,
    with no reboot.
  - Stores are never shrunk, never overwritten and never removed while in use.
author:
  - liveclone.core maintainers (@liveclone)
extends_documentation_fragment:
  - liveclone.core._attributes
  - liveclone.core._attributes.ALL_SUPPORTED
requirements:
  - util-linux (C(losetup), C(findmnt), C(blkid), C(mount))
  - e2fsprogs for ext2/ext3/ext4, xfsprogs for xfs, btrfs-progs for btrfs
notes:
  - Runs as root on the target.
  - Growing ext3 or ext4 while mounted needs the E(CAP_SYS_RESOURCE) capability;
    ext2 cannot be grown while mounted.
  - The free space check asks for the full O(size) even with O(allocation=sparse),
    because the live system will fill a sparse store up to that size.
  - O(persistence_conf) and the archiso cow tree are written when the store is
    created; an existing store's files are left as they are.
  - Nothing is followed through a symlink. The image's directory is opened once
    and every entry in it (the image, its temporary names) is made, changed and
    removed through that descriptor; a link there is refused or left alone, never
    followed. Links, temporary files and lock files of other names beside the
    store are never touched. Before a store is removed or changed it is checked to
    be the file that was read (same device and inode).
  - A store is in use when a loop device's backing file is the same inode on the
    same device; a store whose own name contains the text " (deleted)" is seen as
    in use like any other.
  - What the filesystem would refuse half-way is refused before anything is
    changed, in check mode too - a read-only filesystem, a file or directory with
    the immutable or append-only attribute (C(chattr +i), C(+a)), too little free
    space, no free inode for a new store.
options:
  path:
    description:
      - Absolute path of the image file, or of an existing directory, in which
        case the file name comes from O(layout).
      - It is made canonical before any rule is checked - C(//) is C(/), C(.) and
        C(..) components and trailing slashes are resolved as text - and the
        result is what the module acts on and returns (V(//x.img) is C(/x.img)).
      - It must not hold a control character (a newline, a tab), must not be
        C(/) in any spelling (V(//), V(/./), V(/tmp/..)), must not run through a
        symlink nor lie on a kernel filesystem (C(/proc), C(/sys), C(/dev)...).
        When it names a directory, the same rules apply again to the image path
        in it, so a symlink at the layout's file name is refused.
      - Its directory must exist and be a directory.
    type: path
    required: true
  state:
    description:
      - V(present) creates the store, or grows it to O(size).
      - V(absent) removes it; an attached or mounted store is refused.
    type: str
    choices: [present, absent]
    default: present
  size:
    description:
      - Size of the store. A bare number is MiB, as in
        C(sysresccd-backstore create DIR 256); a string may carry a unit
        (V(512M), V(2G), V(1.5GiB); all units are binary). Rounded up to whole MiB.
      - It must be greater than zero and at most 8 EiB; booleans, infinities and
        NaN are refused.
      - Required to create a store. A larger size than the current one grows it;
        a smaller one is refused.
    type: raw
  layout:
    description:
      - V(sysrescue) is C(sysrcd.bs), ext3, found by name by SystemRescueCd 5.x.
      - V(live-boot) is C(persistence), label C(persistence), with a
        C(persistence.conf) holding O(persistence_conf).
      - V(casper) is C(casper-rw), label C(casper-rw), for Ubuntu's casper.
      - V(archiso) is C(persistent_<label>.img), label O(label), with the cow
        tree C(persistent_<label>/x86_64/{upperdir,workdir}) for C(cow_label=).
      - V(plain) is C(backstore.img) with no special files.
    type: str
    choices: [sysrescue, live-boot, casper, archiso, plain]
    default: plain
  fstype:
    description:
      - Filesystem of the store. Defaults to ext3 for V(sysrescue) and ext4 for
        the other layouts. An existing store of another type is refused.
      - Smallest sizes are 8 MiB for ext, 256 MiB for btrfs and 300 MiB for xfs.
    type: str
    choices: [ext2, ext3, ext4, xfs, btrfs]
  label:
    description:
      - Filesystem label. Defaults to C(persistence) for V(live-boot) and
        C(casper-rw) for V(casper); required for V(archiso). A different label
        on an existing store is changed in place.
      - ASCII letters, digits, C(_), C(.) and C(-), starting with a letter or a
        digit, and at most as many bytes as the filesystem keeps - 16 for ext2,
        ext3 and ext4, 12 for xfs, 254 for btrfs. Other characters (a blank, a
        quote, C(/), a newline, anything not ASCII) are refused, because tools
        escape or truncate them and the store would never converge.
    type: str
  allocation:
    description:
      - V(sparse) leaves unwritten blocks as holes.
      - V(full) writes every block, as FAT/exFAT sticks and device-mapper setups need.
    type: str
    choices: [sparse, full]
    default: sparse
  persistence_conf:
    description:
      - Lines of C(persistence.conf) for the V(live-boot) layout; each item is
        one line.
      - Each item is C(DIR) or C(DIR OPTIONS), as live-boot reads it
        (the persistence.conf manual page), or a comment starting with C(#). C(DIR) is an
        absolute path without empty, C(.) or C(..) components and outside
        C(/live). C(OPTIONS) is a comma-separated list of at most one of
        C(union), C(bind) and C(link), and C(source=PATH), where C(PATH) is
        relative to the store's root (or C(.)) without C(.) or C(..) components.
        Paths hold only ASCII letters, digits and C(/ . _ + @ % ~ -).
      - Control characters (a newline, a tab) are refused, so no item can add
        a line.
    type: list
    elements: str
    default: ['/ union']
seealso:
  - name: live-boot persistence
    description: Debian live-boot's persistence documentation.
    link: https://manpages.debian.org/bookworm/live-boot-doc/persistence.conf.5.en.html
"""

EXAMPLES = r"""
- name: Create a SystemRescueCd backing store, as "sysresccd-backstore create /mnt/backstore 256"
  liveclone.core.backstore:
    path: /mnt/backstore
    layout: sysrescue
    size: 256

- name: Grow it to 512 MiB with no data loss, as "sysresccd-backstore grow /mnt/backstore 512"
  liveclone.core.backstore:
    path: /mnt/backstore
    layout: sysrescue
    size: 512

- name: A fully allocated live-boot store on a FAT stick, keeping /home only
  liveclone.core.backstore:
    path: /media/stick
    layout: live-boot
    size: 2G
    allocation: full
    persistence_conf:
      - /home union

- name: An archiso cow filesystem for cow_label=MYCOW
  liveclone.core.backstore:
    path: /srv/images
    layout: archiso
    label: MYCOW
    fstype: ext4
    size: 1GiB

- name: Remove a store that is no longer used
  liveclone.core.backstore:
    path: /mnt/backstore/sysrcd.bs
    state: absent
"""

RETURN = r"""
path:
  description: Absolute path of the image file.
  returned: always
  type: str
  sample: /mnt/backstore/sysrcd.bs
layout:
  description: The layout asked for.
  returned: always
  type: str
  sample: sysrescue
exists:
  description: Whether the image exists after the run (before it, in check mode).
  returned: always
  type: bool
size:
  description: Size of the image file in bytes.
  returned: always
  type: int
  sample: 268435456
fs_size:
  description: Size of the filesystem inside the image, in bytes.
  returned: always
  type: int
  sample: 268435456
fstype:
  description: Filesystem type found in the image.
  returned: always
  type: str
  sample: ext3
label:
  description: Filesystem label.
  returned: always
  type: str
  sample: persistence
uuid:
  description: Filesystem UUID.
  returned: always
  type: str
  sample: 4a24fb46-835c-452d-a211-f58559e2033b
loop_device:
  description: Loop device the image is attached to, if any.
  returned: always
  type: str
  sample: /dev/loop0
mount_point:
  description: Where that loop device is mounted, if it is.
  returned: always
  type: str
  sample: /run/live/persistence/sdb1
operations:
  description: The operations done, or planned in check mode.
  returned: always
  type: list
  elements: str
  sample:
    - "extend /mnt/backstore/sysrcd.bs from 256 MiB to 512 MiB (sparse)"
    - "grow the ext3 filesystem from 256 MiB to 512 MiB offline"
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.liveclone.core.plugins.module_utils._backstore.desired import (
    FSTYPES,
    LAYOUTS,
    Desired,
)
from ansible_collections.liveclone.core.plugins.module_utils._backstore.run import run
from ansible_collections.liveclone.core.plugins.module_utils._common.command import (
    CommandRunner,
)
from ansible_collections.liveclone.core.plugins.module_utils._common.errors import LivecloneError
from ansible_collections.liveclone.core.plugins.module_utils._common.fs import describe_os_error


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            size=dict(type="raw"),
            layout=dict(type="str", choices=list(LAYOUTS), default="plain"),
            fstype=dict(type="str", choices=list(FSTYPES)),
            label=dict(type="str"),
            allocation=dict(type="str", choices=["sparse", "full"], default="sparse"),
            persistence_conf=dict(type="list", elements="str", default=["/ union"]),
        ),
        required_if=[("layout", "archiso", ["label"])],
        supports_check_mode=True,
    )
    try:
        desired = Desired.from_params(module.params)
        result = run(CommandRunner(module), desired, module.check_mode, module.tmpdir)
    except LivecloneError as error:
        module.fail_json(msg=str(error))
    except OSError as error:
        module.fail_json(msg=describe_os_error(error, "backstore:"))
    values = result.module_result()
    if not module._diff:
        values.pop("diff")
    module.exit_json(**values)


if __name__ == "__main__":
    main()
