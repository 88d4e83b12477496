#!/usr/bin/env bash
# Runs every test tier in order: ruff, ansible-lint, ansible-test sanity,
# unit tests, integration tests, system tests, the reliability suite (faults,
# full disks, bad input, planted symlinks), end-to-end workflows on booted
# machines, and, on request, the Molecule scenarios on lab VMs (beside e2e when
# both are named). Installs what it needs; safe to run again.
# Usage: scripts/test.sh [TIER...]
#   (tiers: ruff lint sanity units integration system reliability e2e molecule)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

tiers=("$@")
# Not molecule: with it, .ci/run would need about 90 minutes on 2 cores (README).
[ ${#tiers[@]} -gt 0 ] || tiers=(ruff lint sanity units integration system reliability e2e)

bootstrap test
stage_collection
PY=$VENV/bin/python

# molecule_lane SCENARIO...: runs the scenarios one after another; stops at
# the first that fails, after printing the end of its log.
molecule_lane() {
    local scenario log started
    for scenario in "$@"; do
        log=$STAGE_ROOT/molecule-$scenario.log
        started=$SECONDS
        if (cd "$COLLECTION_DIR" && molecule test --scenario-name "$scenario") >"$log" 2>&1; then
            echo "molecule $scenario: passed in $((SECONDS - started)) s"
        else
            echo "molecule $scenario: FAILED after $((SECONDS - started)) s; the end of $log:"
            tail -n 80 "$log"
            return 1
        fi
    done
}

run_e2e() {
    (cd "$COLLECTION_DIR" && unshare --mount --propagation private -- \
        "$PY" -m pytest -q -s -p no:cacheprovider tests/system/test_e2e_*.py)
}

# A VM under emulation keeps about one core busy. Alone, the Molecule
# scenarios run in two lanes; beside the e2e tier, in one lane.
both_vm_tiers=false
if [[ " ${tiers[*]} " == *" e2e "* && " ${tiers[*]} " == *" molecule "* ]]; then
    both_vm_tiers=true
fi

for tier in "${tiers[@]}"; do
    case $tier in
    ruff)
        step "ruff"
        (cd "$REPO" && ruff check .) ;;
    lint)
        step "ansible-lint (profile production)"
        (cd "$REPO" && ansible-lint --offline) ;;
    sanity)
        step "ansible-test sanity"
        (cd "$COLLECTION_DIR" && ansible-test sanity --local --python 3.11 --color no) ;;
    units)
        step "unit tests"
        (cd "$COLLECTION_DIR" && PYTHONPATH=$STAGE_ROOT "$PY" -m pytest -q tests/unit) ;;
    integration)
        step "integration tests (real loop devices, private mount namespace)"
        # Mounts made inside vanish with the namespace; the targets detach
        # their own loop devices in always blocks.
        (cd "$COLLECTION_DIR" && unshare --mount --propagation private -- \
            ansible-test integration --local --allow-destructive --python 3.11 --color no) ;;
    system)
        step "system tests (the built collection, run through ansible-runner, private mount namespace)"
        (cd "$COLLECTION_DIR" && unshare --mount --propagation private -- \
            "$PY" -m pytest -q -p no:cacheprovider --ignore-glob='*/test_e2e_*' tests/system) ;;
    reliability)
        step "reliability suite (SIGKILL faults, full disks, bad input, symlinks; private mount namespace)"
        (cd "$COLLECTION_DIR" && unshare --mount --propagation private -- \
            "$PY" -m pytest -q -p no:cacheprovider tests/reliability) ;;
    e2e)
        if [ "$both_vm_tiers" = true ]; then
            step "end-to-end workflows (QEMU, TCG; private mount namespace) and, beside them, the Molecule scenarios in one lane"
            molecule_lane backup_then_build rootfs_backup live_iso backstore &
            lane=$!
            failed=0
            run_e2e || failed=1
            wait "$lane" || failed=1
            [ "$failed" = 0 ] || die "an end-to-end test or a Molecule scenario failed"
        else
            step "end-to-end workflows on booted machines (QEMU, TCG; private mount namespace)"
            run_e2e
        fi ;;
    molecule)
        [ "$both_vm_tiers" = false ] || continue  # ran beside e2e
        step "Molecule scenarios on lab VMs (QEMU, TCG), two lanes side by side"
        # Each scenario boots its own VMs and destroys them, even when it
        # fails; its output goes to a log, shown when it fails.
        molecule_lane backup_then_build backstore &
        lane_one=$!
        molecule_lane rootfs_backup live_iso &
        lane_two=$!
        failed=0
        wait "$lane_one" || failed=1
        wait "$lane_two" || failed=1
        [ "$failed" = 0 ] || die "a Molecule scenario failed" ;;
    *) die "unknown tier $tier" ;;
    esac
done
step "all tiers passed: ${tiers[*]}"
