#!/usr/bin/env bash
# Builds (once per machine) the lab VM image: Debian 12 with a kernel,
# systemd, openssh-server, python3 and the tools the roles use, so that a
# converge installs nothing. Cached under $LIVECLONE_CACHE/lab (default
# /var/cache/liveclone/lab), keyed by the package list and a layout version; built
# under a temporary name and renamed, so a killed build is redone; callers at
# the same time wait for one build. Prints the
# image directory: rootfs.raw (ext4, no partition table), vmlinuz, initrd.img
# and the lab's SSH key (id_ed25519), whose public half root accepts.
set -euo pipefail
packages=(
    linux-image-amd64 systemd-sysv udev openssh-server python3 python3-apt iproute2 procps less
    # backstore, rootfs_backup, live_iso roles
    e2fsprogs xfsprogs btrfs-progs dosfstools rsync snapper squashfs-tools xorriso grub-common grub-pc-bin
    grub-efi-amd64-bin mtools openssl zstd
    # an ISO built from this machine boots with Secure Boot on (its own signed shim, GRUB and kernel)
    shim-signed grub-efi-amd64-signed shim-helpers-amd64-signed
    # an ISO built from this machine boots with live-boot
    live-boot live-config live-config-systemd sudo
)
# Installed with apt in the tree afterwards: python3-cryptography's
# maintainer script fails inside debootstrap's second stage.
# The rootfs_backup timer runs the backup through the host's ansible-core.
later_packages=(ansible-core)
cache=${LIVECLONE_CACHE:-/var/cache/liveclone}/lab
# Raise when the way the image is made changes, so that machines rebuild it.
layout_version=1
key=$(printf '%s\n' "$layout_version" "${packages[@]}" "${later_packages[@]}" | sha256sum | cut -c1-12)
image=$cache/bookworm-$key
mkdir -p "$cache"
# One build at a time: a second caller waits, then finds the image made.
exec {build_lock}>"$cache/.build.lock"
flock "$build_lock"
if [ ! -f "$image/rootfs.raw" ]; then
    partial=$(mktemp -d "$cache/.partial-XXXXXX")
    trap 'rm -rf --one-file-system "$partial"' EXIT
    tree=$partial/tree
    mkdir "$tree"
    # Leave documentation out of the image: it is what the ISOs are built from.
    mkdir -p "$tree/etc/dpkg/dpkg.cfg.d"
    printf 'path-exclude=/usr/share/doc/*\npath-exclude=/usr/share/man/*\npath-exclude=/usr/share/locale/*\npath-include=/usr/share/locale/locale.alias\n' \
        >"$tree/etc/dpkg/dpkg.cfg.d/01-lab-nodoc"
    debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" bookworm "$tree" \
        http://deb.debian.org/debian >"$partial/debootstrap.log" 2>&1 || { tail -20 "$partial/debootstrap.log" >&2; exit 1; }
    # apt needs /proc and /dev in the tree: mount them in a private namespace,
    # where they vanish with the command even if it is killed.
    # shellcheck disable=SC2016  # expanded by the inner shell
    unshare --mount --propagation private -- sh -c '
        tree=$1; shift
        mount -t proc proc "$tree/proc" && mount --rbind /dev "$tree/dev" &&
        DEBIAN_FRONTEND=noninteractive chroot "$tree" apt-get install -y -qq --no-install-recommends "$@"' \
        sh "$tree" "${later_packages[@]}" >>"$partial/debootstrap.log" 2>&1 || { tail -20 "$partial/debootstrap.log" >&2; exit 1; }
    ssh-keygen -q -t ed25519 -N '' -C liveclone-lab -f "$partial/id_ed25519"
    install -d -m 0700 "$tree/root/.ssh"
    install -m 0600 "$partial/id_ed25519.pub" "$tree/root/.ssh/authorized_keys"
    echo lab >"$tree/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 lab\n' >"$tree/etc/hosts"
    printf '/dev/vda / ext4 defaults,noatime 0 1\n' >"$tree/etc/fstab"
    # QEMU's user-mode network: DHCP on the first NIC, its DNS relay.
    printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n' >"$tree/etc/systemd/network/10-eth0.network"
    ln -sf /lib/systemd/system/systemd-networkd.service \
        "$tree/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
    printf 'nameserver 10.0.2.3\n' >"$tree/etc/resolv.conf"
    # Each VM makes its own machine-id at first boot.
    : >"$tree/etc/machine-id"
    cp -L "$tree/vmlinuz" "$partial/vmlinuz"
    cp -L "$tree/initrd.img" "$partial/initrd.img"
    chroot "$tree" apt-get clean
    mkfs.ext4 -q -L lab-root -d "$tree" "$partial/rootfs.raw" 8G
    rm -rf --one-file-system "$tree" "$partial/debootstrap.log"
    mv "$partial" "$image"
    trap - EXIT
fi
echo "$image"
