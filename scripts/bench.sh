#!/usr/bin/env bash
# Benchmarks (bench/run.py): the modules against the bare tools on the same
# data in the same run; writes bench/results.json and docs/performance.md.
# Installs what it needs; safe to run again. Takes about an hour with every
# section (the playbook section boots a lab VM and runs backup_then_build.yml
# twice under emulation).
# Usage: scripts/bench.sh [--rounds N] [SECTION...]
#   (sections: backup pull iso compression grow playbook; default all;
#    "report" alone rewrites docs/performance.md from bench/results.json)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The peers measured beside the modules are the bench profile's (rsnapshot).
bootstrap test bench
provide_test_sshd
stage_collection
# Loop filesystems and the covered /etc/snapper vanish with the namespace.
unshare --mount --propagation private -- "$VENV/bin/python" "$REPO/bench/run.py" "$@"
