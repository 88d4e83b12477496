#!/usr/bin/python
# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: live_iso
short_description: Build a bootable BIOS and UEFI live ISO from a cache snapshot, a tree or the host
version_added: 0.1.0
description:
  - Builds one hybrid ISO that boots from CD and USB, on BIOS and UEFI x86_64, with
    Debian's live-boot. It is built from a read-only snapshot of a
    M(liveclone.core.snapper_cache) cache (best), any root tree, or the running host.
  - The source is never modified and the host is never changed. All mounts live in
    a private mount namespace of the module's own process and vanish with it.
    A btrfs snapshot source is cloned as a writable snapshot, not copied file by file.
  - The image leaves out the same paths however the source is copied (the standard exclusions such as
    C(/swapfile), C(/mnt/*), C(/media/*) and C(/var/lib/liveclone), the source's mounts, the homes unless
    O(keep_home), and O(exclude)); rsync leaves them out, and a writable snapshot has them removed after.
  - In diff mode the result's diff shows what the manifest beside the ISO records of the source and the
    options (their digest) before the run, and what this run's build records after.
  - The image is cleaned of the source's users (UID 1000 and up), homes, SSH host
    keys, machine-id, NetworkManager connections, histories, logs and caches.
  - The clean-up acts only beneath the image's root and never follows a symlink. A
    link where it empties or writes (C(home), C(root), C(tmp), C(var/log), C(etc/ssh),
    C(etc/hostname), C(home/USER) ...) is removed and replaced by a real directory or
    file; what it pointed to is never touched. A link in C(boot/) or at a user database
    is followed only while it stays inside the tree; one that leads out is refused.
  - Every parameter is checked before anything is read or written, in check mode too;
    then, before the copy, that the destination is writable (not read-only, immutable
    or append-only), has free inodes, and room for the copy and at least a quarter of
    the source's size.
  - The build is reproducible. SOURCE_DATE_EPOCH comes from the source, so the same
    snapshot and options give the same ISO, byte for byte. A manifest beside the
    ISO makes an unchanged source with unchanged options a no-op.
  - GRUB's menu and the default entry's console go to the screen and the first
    serial port, so a headless server shows a login prompt on its serial line.
  - With O(secure_boot) (V(auto) by default) the ISO boots on UEFI with Secure Boot on, through the
    image's own shim, signed GRUB and signed kernel, never the build host's.
author:
  - liveclone.core maintainers (@liveclone)
extends_documentation_fragment:
  - liveclone.core._attributes
  - liveclone.core._attributes.ALL_SUPPORTED
  - liveclone.core._cache
requirements:
  - squashfs-tools, xorriso, grub-common, grub-pc-bin, grub-efi-amd64-bin, mtools,
    openssl, rsync, btrfs-progs on the host that builds (never in the image source)
  - live-boot, live-config and live-config-systemd in the source (see O(install_missing))
notes:
  - Runs as root. Diff mode shows nothing more than the operations.
  - Only the Debian family is supported; other distributions are refused with a clear message.
options:
  dest:
    description:
      - Path of the ISO. C(DEST.sha256), C(DEST.md5) and C(DEST.manifest.json) are written beside it.
      - A file name, not a directory; its directory must not run through a symlink, nor lie inside
        O(source_path). A symlink at O(dest) itself is replaced by the ISO, never followed.
      - Made canonical first (V(//) is V(/), V(.), V(..) and trailing slashes resolved as text), and every
        rule is checked on that form. Refused when it is V(/), lies directly in V(/), holds a control
        character, or lies in a work tree of an earlier build (C(.liveclone-iso-work-*)).
    type: path
    required: true
  source:
    description:
      - V(cache) builds from a read-only snapshot of the cache in O(cache_dir).
      - V(path) builds from the root tree O(source_path).
      - V(live) builds from the running system.
    type: str
    choices: [cache, path, live]
    default: cache
  cache_dir:
    description:
      - The O(liveclone.core.snapper_cache#module:base_dir) of the cache, with O(source=cache). Omitted or
        empty, the same default as that option, C(/mnt/<ID>_backup) with ID from the target's C(/etc/os-release).
      - Made canonical first; not V(/), not through a symlink, no control character. A C(.rootfs_cache) or a
        snapshot in it that is a symlink is never followed; the build is refused.
    type: path
  snapshot:
    description:
      - The snapshot to build from, V(latest) or its name as M(liveclone.core.snapper_cache) returns it
        (a number, or a legacy C(@YYYY-MM-DD_HH:MM[_N]) name). Anything else is refused.
    type: str
    default: latest
  source_path:
    description:
      - Root of the tree, with O(source=path).
      - Made canonical first; not V(/) (use O(source=live)), not through a symlink, not on a kernel filesystem,
        no control character. Its C(etc) must be a real directory.
    type: path
  label:
    description:
      - ISO volume id, also in the GRUB menu titles. At most 32 bytes of ASCII letters, digits, C(_), C(.)
        and C(-), starting with a letter or digit (no blank, quote or newline).
    type: str
    default: LIVECLONE
  hostname:
    description:
      - Host name of the live system (in C(etc/hostname), C(etc/hosts) and the kernel line); one RFC 1123
        label of letters, digits and C(-), at most 63, not starting or ending with C(-). Matched whole, so a
        trailing newline is refused.
    type: str
    default: liveclone
  live_user:
    description:
      - The live system's user, in the groups sudo, audio, video, cdrom, plugdev and netdev. Empty for none.
      - A POSIX user name, at most 32 of lower-case letters, digits, C(_) and C(-), starting with a letter or
        C(_). Refused before the copy when the source keeps an account of that name (a system user, or one
        of O(keep_users)).
    type: str
    default: live
  live_password:
    description:
      - Password of O(live_user). Without it the user cannot log in on a console.
      - Any text without control characters (a newline is refused); it reaches C(openssl passwd) on stdin only.
    type: str
  root_password:
    description:
      - Password for root. Without it root is locked; there is no default password.
      - Any text without control characters (a newline is refused).
    type: str
  boot_params:
    description:
      - Extra kernel parameters for every boot entry, one parameter an item, in printable ASCII without
        blanks, quotes, backslashes, braces, or any of C(;), C($), C(|), C(&), C(<), C(>), the hash sign and
        the backquote, so that no item can end a GRUB line or entry.
    type: list
    elements: str
    default: []
  persistence:
    description: Add a boot entry that uses a backing store made by M(liveclone.core.backstore) (live-boot layout).
    type: bool
    default: true
  installer:
    description: V(calamares) also requires (or installs, see O(install_missing)) the Calamares installer in the image.
    type: str
    choices: [none, calamares]
    default: none
  install_missing:
    description:
      - Install live-boot (and Calamares) into the image from the image's own APT
        repositories when the source lacks them. Off by default, because it needs
        network access and changes what the image holds.
    type: bool
    default: false
  compression:
    description: squashfs compression.
    type: str
    choices: [zstd, xz, lz4, gzip]
    default: zstd
  compression_level:
    description:
      - Level for V(zstd) (1-22) or V(gzip) (1-9); refused before the copy when out of range, or with V(xz) or
        V(lz4).
    type: int
  block_size:
    description: squashfs block size in bytes, a power of two from 4096 to 1048576.
    type: int
    default: 1048576
  exclude:
    description: Extra paths to leave out of the image (shell wildcards, relative to the root); no control characters.
    type: list
    elements: str
    default: []
  keep_home:
    description:
      - Keep the contents of C(/home) and C(/root) (histories are removed anyway).
      - A home that is a symlink is kept as a link and never entered; its histories are removed only where it
        leads inside the image. C(home) itself and the home of O(live_user) are made real directories (a link
        there is replaced).
    type: bool
    default: false
  keep_users:
    description: Users with UID 1000 or more to keep in the image; each a POSIX user name, as for O(live_user).
    type: list
    elements: str
    default: []
  work_dir:
    description:
      - Directory for the temporary work tree; it is removed after the build. Defaults to
        the cache's base_dir for O(source=cache), so that the writable snapshot is instant,
        and to the directory of O(dest) otherwise.
      - If set, it must exist, not run through a symlink, and not lie inside O(source_path). Made canonical
        first; V(/) is refused. A C(.liveclone-iso-work-*) entry there that is not a directory (a symlink
        planted there) is removed, never followed.
    type: path
  checksums:
    description: Checksum files to write beside the ISO.
    type: list
    elements: str
    choices: [sha256, md5]
    default: [sha256]
  force:
    description: Build even when the manifest says the ISO is up to date.
    type: bool
    default: false
  secure_boot:
    description:
      - How the ISO boots on UEFI. The signed chain is taken from the image, never from the build host. It is
        shim (C(shim-signed)), the signed CD GRUB (C(grub-efi-amd64-signed)), MokManager
        (C(shim-helpers-amd64-signed) on Debian) and the image's signed kernel.
      - V(auto) uses the signed chain whenever the source has it (or O(install_missing) installs the missing
        packages into the image); otherwise it builds the unsigned chain of V(off) and warns that the ISO
        boots on UEFI only with Secure Boot off.
      - V(required) fails before anything is copied, naming what the source lacks, when it cannot have the
        signed chain.
      - V(off) uses grub-mkrescue's unsigned GRUB from the build host. Quote it in YAML, since a bare C(off) is the
        boolean false.
      - The signed chain is refused when shim's SBAT level would refuse the image's GRUB or kernel (they come
        from different updates); a shim older than 15.8 gives a warning. The BIOS path is the same either way.
    type: str
    choices: [auto, required, "off"]
    default: auto
seealso:
  - module: liveclone.core.snapper_cache
  - module: liveclone.core.backstore
"""

EXAMPLES = r"""
- name: Build a live ISO from the newest backup snapshot
  liveclone.core.live_iso:
    dest: /srv/iso/debian-live.iso
    cache_dir: /mnt/debian_backup
    label: DEBIAN_LIVE
    live_password: "{{ vault_live_password }}"

- name: Build from a tree, with xz for the smallest image
  liveclone.core.live_iso:
    dest: /srv/iso/rescue.iso
    source: path
    source_path: /srv/rootfs
    compression: xz
    boot_params: [nomodeset]
"""

RETURN = r"""
path:
  description: The ISO.
  returned: always
  type: str
size:
  description: Size of the ISO in bytes.
  returned: when the ISO exists
  type: int
sha256:
  description: SHA-256 of the ISO.
  returned: when the ISO exists
  type: str
label:
  description: ISO volume id.
  returned: always
  type: str
source:
  description: The source used, with its kind, path, snapshot, identity and SOURCE_DATE_EPOCH.
  returned: always
  type: dict
squashfs:
  description: Size of the squashfs, the uncompressed size, and their ratio.
  returned: when the ISO exists
  type: dict
secure_boot:
  description:
    - The UEFI chain of the ISO. V(enabled) is true for the signed chain; then V(shim) has the package's
      version, shim's own version (V(shim_version)), its SBAT generations and the dates of its SBAT levels;
      V(grub) the package's version and SBAT generations; V(kernel) its package, version and release; and
      V(mok_manager) whether MokManager is on the ISO.
  returned: when the ISO exists
  type: dict
  sample:
    enabled: true
    shim: {package: shim-signed, version: 1.51~1+deb12u1+16.1-2~deb12u1, shim_version: "16.1",
           sbat: {shim: 4, shim.debian: 1}, sbat_level: {previous: "2025021800", latest: "2025051000"}}
    grub: {package: grub-efi-amd64-signed, version: 1+2.06+13+deb12u2, sbat: {grub: 5, grub.debian: 5}}
    kernel: {package: linux-image-6.1.0-28-amd64, version: 6.1.119-1, release: 6.1.0-28-amd64, sbat: {}}
    mok_manager: true
stages:
  description: Seconds spent in each stage of the build (copy, configure, initramfs, squashfs, bootloader, iso).
  returned: always
  type: dict
operations:
  description:
    - The build's steps, in order; check mode returns the same steps a real run carries out.
    - A real run also lists, before a step, what the step found to do on the way (users removed, links
      replaced, the initramfs kept or regenerated, the squashfs's size).
    - Empty when the ISO is up to date.
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
from ansible_collections.liveclone.core.plugins.module_utils._live_iso.desired import Desired
from ansible_collections.liveclone.core.plugins.module_utils._live_iso.run import run


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            source=dict(type="str", choices=["cache", "path", "live"], default="cache"),
            **cache_argument_spec("cache_dir"),
            snapshot=dict(type="str", default="latest"),
            source_path=dict(type="path"),
            label=dict(type="str", default="LIVECLONE"),
            hostname=dict(type="str", default="liveclone"),
            live_user=dict(type="str", default="live"),
            live_password=dict(type="str", no_log=True),
            root_password=dict(type="str", no_log=True),
            boot_params=dict(type="list", elements="str", default=[]),
            persistence=dict(type="bool", default=True),
            installer=dict(type="str", choices=["none", "calamares"], default="none"),
            install_missing=dict(type="bool", default=False),
            compression=dict(type="str", choices=["zstd", "xz", "lz4", "gzip"], default="zstd"),
            compression_level=dict(type="int"),
            block_size=dict(type="int", default=1048576),
            exclude=dict(type="list", elements="str", default=[]),
            keep_home=dict(type="bool", default=False),
            keep_users=dict(type="list", elements="str", default=[]),
            work_dir=dict(type="path"),
            checksums=dict(type="list", elements="str", choices=["sha256", "md5"], default=["sha256"]),
            force=dict(type="bool", default=False),
            secure_boot=dict(type="str", choices=["auto", "required", "off"], default="auto"),
        ),
        required_if=[("source", "path", ["source_path"])],
        supports_check_mode=True,
    )
    try:
        # Every value is checked before anything is read or written, in check mode too.
        result = run(CommandRunner(module), Desired.from_params(module.params), module.check_mode)
    except LivecloneError as error:
        module.fail_json(msg=str(error))
    except OSError as error:
        module.fail_json(msg=describe_os_error(error, "live_iso:"))
    for warning in result.warnings:
        module.warn(warning)
    values = result.module_result()
    if not module._diff:
        values.pop("diff")
    module.exit_json(**values)


if __name__ == "__main__":
    main()
