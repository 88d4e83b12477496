#!/usr/bin/env bash
# Runs every test tier in order: ruff, ansible-lint, ansible-test sanity,
# unit tests, integration tests, system tests, the reliability suite (faults,
# full disks, bad input, planted symlinks), end-to-end workflows on booted
# machines and the Molecule scenarios on lab VMs (these two side by side).
# Installs what it needs; safe to run again.
# Usage: scripts/test.sh [TIER...]
#   (tiers: ruff lint sanity units integration system reliability e2e molecule)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

tiers=("$@")
[ ${#tiers[@]} -gt 0 ] || tiers=(ruff lint sanity units integration system reliability e2e molecule)

bootstrap test
stage_collection
PY=$VENV/bin/python

# vm_job KIND NAME: one workload on booted VMs (an e2e test module or a
# Molecule scenario), its output in a log; prints one block when it ends:
# the time, and e2e's stage timings, or on failure the end of the log.
vm_job() {
    local kind=$1 name=$2 log=$STAGE_ROOT/$1-$2.log started=$SECONDS status=0 report
    case $kind in
    e2e)
        (cd "$COLLECTION_DIR" && unshare --mount --propagation private -- \
            "$PY" -m pytest -q -s -p no:cacheprovider "tests/system/test_e2e_$name.py") >"$log" 2>&1 || status=$? ;;
    molecule)
        # Each scenario destroys its VMs, even when it fails.
        (cd "$COLLECTION_DIR" && molecule test --scenario-name "$name") >"$log" 2>&1 || status=$? ;;
    esac
    if [ "$status" = 0 ]; then
        report="$kind $name: passed in $((SECONDS - started)) s"
        [ "$kind" != e2e ] || report+=$'\n'$(sed 's/^/    /' "$log")
    else
        report="$kind $name: FAILED after $((SECONDS - started)) s; the end of $log:"$'\n'$(tail -n 80 "$log" | sed 's/^/    /')
    fi
    # One write, so that the other lane's report does not cut into it.
    printf '%s\n' "$report"
    return "$status"
}

# vm_lane KIND:NAME...: the jobs one after another; a failure does not stop the rest.
vm_lane() {
    local job failed=0
    for job in "$@"; do
        vm_job "${job%%:*}" "${job#*:}" || failed=1
    done
    return "$failed"
}

# run_vm_tiers: the e2e tests and the Molecule scenarios that were asked for.
# A VM under emulation keeps one core busy: at most two VMs run at once, in
# two lanes of one VM each, balanced by measured time (e2e backing_store 16,
# distroclone 22, live_iso 12, rootfs_backup 15, backstore 5 min), then the
# two-VM backup_then_build scenario (14 min) alone.
run_vm_tiers() {
    local lane_one=() lane_two=() after=() failed=0 pid_one pid_two=
    if [[ " ${tiers[*]} " == *" e2e "* ]]; then
        lane_one+=(e2e:backing_store)
        lane_two+=(e2e:distroclone)
    fi
    if [[ " ${tiers[*]} " == *" molecule "* ]]; then
        lane_one+=(molecule:live_iso molecule:backstore)
        lane_two+=(molecule:rootfs_backup)
        after+=(molecule:backup_then_build)
    fi
    step "on lab VMs (QEMU, TCG), two lanes side by side: ${lane_one[*]} | ${lane_two[*]}${after:+; then ${after[*]}}"
    # Built once here (about 3 minutes the first time), not by both lanes at once.
    "$PY" "$REPO/lab/lab.py" image >/dev/null
    vm_lane "${lane_one[@]}" &
    pid_one=$!
    vm_lane "${lane_two[@]}" &
    pid_two=$!
    wait "$pid_one" || failed=1
    wait "$pid_two" || failed=1
    if [ ${#after[@]} -gt 0 ]; then
        vm_lane "${after[@]}" || failed=1
    fi
    [ "$failed" = 0 ] || die "a test on lab VMs failed (see FAILED above)"
}

vm_tiers_done=false
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
    e2e | molecule)
        [ "$vm_tiers_done" = false ] || continue
        run_vm_tiers
        vm_tiers_done=true ;;
    *) die "unknown tier $tier" ;;
    esac
done
step "all tiers passed: ${tiers[*]}"
