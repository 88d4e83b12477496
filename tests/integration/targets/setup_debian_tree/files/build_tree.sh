#!/usr/bin/env bash
# Builds (once per machine) a Debian 12 root tree with a kernel and live-boot,
# for the live_iso tests, and prints its path. Cached outside the repository
# under $LIVECLONE_CACHE (default /var/cache/liveclone), keyed by the package
# list; built under a temporary name and renamed, so a killed build is redone.
set -euo pipefail
packages=linux-image-amd64,systemd-sysv,live-boot,live-config,live-config-systemd,openssh-server,sudo,zstd,shim-signed,grub-efi-amd64-signed,shim-helpers-amd64-signed
cache=${LIVECLONE_CACHE:-/var/cache/liveclone}
key=$(printf 'bookworm %s' "$packages" | sha256sum | cut -c1-12)
tree=$cache/trees/bookworm-live-$key
mkdir -p "$cache/trees"
# Two callers at once (parallel test runs) wait for one build: a second mv
# would nest its tree inside the first.
exec {lock}>"$cache/trees/.lock"
flock "$lock"
if [ ! -d "$tree" ]; then
    partial=$(mktemp -d "$cache/trees/.partial-XXXXXX")
    trap 'rm -rf --one-file-system "$partial"' EXIT
    debootstrap --variant=minbase --include="$packages" bookworm "$partial" \
        http://deb.debian.org/debian >"$partial.log" 2>&1 || { tail -20 "$partial.log" >&2; exit 1; }
    rm -f "$partial.log"
    mv "$partial" "$tree"
    trap - EXIT
fi
echo "$tree"
