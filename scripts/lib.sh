# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/main.sh: installs what the project
# needs (Debian packages from bindep.txt, a pinned virtual environment) and
# stages the collection where Ansible and ansible-test expect it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LIVECLONE_VENV:-$REPO/.venv}
# Outside the checkout: ansible-test reads git, which ignores build output.
STAGE_ROOT=${LIVECLONE_STAGE:-/var/tmp/liveclone-stage-$(printf %s "$REPO" | sha256sum | cut -c1-12)}
COLLECTION_DIR=$STAGE_ROOT/ansible_collections/liveclone/core
export PATH=$VENV/bin:$PATH

die() { echo "error: $*" >&2; exit 1; }
step() { printf '\n=== %s\n' "$*"; }

apt_updated=false
apt_install() {
    if [ "$apt_updated" = false ]; then
        apt-get update -qq
        apt_updated=true
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# make_venv DIR REQUIREMENTS: (re)create DIR when the pinned file changed.
make_venv() {
    local venv=$1 requirements=$2 want stamp=$1/.requirements.sha256
    want=$(sha256sum "$requirements" | cut -d' ' -f1)
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        step "creating the virtual environment $venv from $requirements"
        /usr/bin/python3 -m venv --clear "$venv"
        # Exactly the pinned set: --no-deps installs nothing requirements.txt does not name (a
        # dependency it misses fails pip check instead of floating), wheels only (no sdist's
        # build requirements resolved on the day).
        "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --only-binary :all: \
            -r "$requirements" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
        "$venv/bin/pip" check --disable-pip-version-check >/dev/null \
            || die "$requirements does not pin every dependency: $("$venv/bin/pip" check 2>&1 | head -5)"
        echo "$want" >"$stamp"
    fi
}

# ansible-test bootstraps pip in each sanity venv with a script it downloads
# from a host outside the package registries; give it ours in its cache.
install_get_pip_stand_in() {
    local version
    version=$(sed -n "s/^ *pip='\\([0-9.]*\\)',\$/\\1/p" \
        "$VENV"/lib/python3*/site-packages/ansible_test/_internal/python_requirements.py)
    [ -n "$version" ] || die "cannot read the pip version ansible-test bootstraps"
    mkdir -p "$HOME/.ansible/test/cache"
    install -m 0644 scripts/ansible_test_get_pip.py "$HOME/.ansible/test/cache/get_pip_${version//./_}.py"
}

# bootstrap PROFILE...: install bindep.txt's packages for the profiles and the venv.
bootstrap() {
    [ "$(id -u)" = 0 ] || die "run as root (the modules manage loop devices and mounts)"
    cd "$REPO"
    # The venv, and so bindep itself, needs python3-venv first.
    /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
    make_venv "$VENV" requirements.txt
    install_get_pip_stand_in
    local missing
    missing=$(bindep --brief --file bindep.txt "$@" || true)
    if [ -n "$missing" ]; then
        step "installing Debian packages: $missing"
        # shellcheck disable=SC2086  # one word per package
        apt_install $missing
    fi
}

# The test sshd: OpenSSH's server taken out of Debian's package into a cache,
# not installed, so that no sshd service, host keys or port 22 appear on the
# machine that runs the tests; the tests start it on 127.0.0.1 with a
# configuration of their own (tests/lib/sshd.py). Exports LIVECLONE_SSHD.
SSHD_TREE=${LIVECLONE_SSHD_TREE:-${LIVECLONE_CACHE:-/var/cache/liveclone}/sshd}
provide_test_sshd() {
    local version
    version=$(apt-cache policy openssh-server | sed -n 's/^ *Candidate: //p')
    if [ ! -x "$SSHD_TREE/usr/sbin/sshd" ] || [ "$(cat "$SSHD_TREE/.version" 2>/dev/null)" != "$version" ]; then
        step "unpacking openssh-server $version into $SSHD_TREE (for the test sshd; not installed)"
        local download
        download=$(mktemp -d)
        # apt-get download runs as _apt, who cannot write a root-only temporary directory.
        chmod 0755 "$download"
        (cd "$download" && apt-get download -qq openssh-server 2>/dev/null) \
            || { apt-get update -qq && (cd "$download" && apt-get download -qq openssh-server); }
        rm -rf "$SSHD_TREE.new"
        mkdir -p "$(dirname "$SSHD_TREE")"
        dpkg-deb -x "$download"/openssh-server_*.deb "$SSHD_TREE.new"
        rm -rf "$download" "$SSHD_TREE"
        mv "$SSHD_TREE.new" "$SSHD_TREE"
        echo "$version" >"$SSHD_TREE/.version"
    fi
    export LIVECLONE_SSHD=$SSHD_TREE/usr/sbin/sshd
}

# Copy the working tree (tracked and new files, not ignored ones) to
# $STAGE_ROOT/ansible_collections/liveclone/core, the path Ansible imports from.
stage_collection() {
    cd "$REPO"
    mkdir -p "$STAGE_ROOT"
    # One run at a time per staging tree: another run's tests execute from it.
    exec {stage_lock}>"$STAGE_ROOT/.lock"
    flock --nonblock "$stage_lock" || die "another run is using $STAGE_ROOT; wait for it to finish"
    if findmnt -rn -o TARGET | grep -q "^$STAGE_ROOT"; then
        die "something is mounted under $STAGE_ROOT; unmount it first"
    fi
    rm -rf "$COLLECTION_DIR"
    mkdir -p "$COLLECTION_DIR"
    git ls-files -z --cached --others --exclude-standard \
        | rsync -a --from0 --files-from=- ./ "$COLLECTION_DIR/"
    export ANSIBLE_COLLECTIONS_PATH=$STAGE_ROOT
}
