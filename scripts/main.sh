#!/usr/bin/env bash
# The main job. Until the lab VM exists, it runs the backstore example
# playbook against a sandbox on localhost, in a private mount namespace.
# Installs what it needs; safe to run again. Extra arguments go to
# ansible-playbook (for example -e backstore_sandbox_keep=true).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bootstrap main
stage_collection
step "backstore workflow in a sandbox on localhost"
cd "$REPO" || exit
exec unshare --mount --propagation private -- \
    ansible-playbook -i localhost, -e "ansible_python_interpreter=$VENV/bin/python" \
    playbooks/backstore_sandbox.yml "$@"
