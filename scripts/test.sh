#!/usr/bin/env bash
# Runs every test tier: first the quick checks (ruff, ansible-lint, unit
# tests), then side by side the host tiers (ansible-test sanity, integration
# tests, system tests, the reliability suite) and the end-to-end workflows
# and Molecule scenarios on lab VMs.
# Installs what it needs; safe to run again.
# Usage: scripts/test.sh [TIER...]
#   (tiers: ruff lint sanity units integration system reliability e2e molecule)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

tiers=("$@")
[ ${#tiers[@]} -gt 0 ] || tiers=(ruff lint sanity units integration system reliability e2e molecule)

bootstrap test
provide_test_sshd
stage_collection
PY=$VENV/bin/python

# One vCPU per VM (lab.py and the ISO boots): with VMs and tiers side by
# side, a second vCPU per VM costs more than it gives (docs/lab.md).
export LIVECLONE_LAB_CPUS=1

# job KIND NAME: one job of the parallel phase, its output in a log; prints
# one block when it ends: the time, and e2e's stage timings, or on failure
# the end of the log. KIND is tier (a host tier below), e2e (an e2e test
# module on booted VMs) or molecule (a scenario on lab VMs).
job() {
    local kind=$1 name=$2 log=$STAGE_ROOT/$1-$2.log started=$SECONDS status=0 report
    case $kind in
    tier)
        host_tier "$name" >"$log" 2>&1 || status=$? ;;
    e2e)
        (cd "$COLLECTION_DIR" && unshare --mount --propagation private -- \
            "$PY" -m pytest -q -s -p no:cacheprovider "tests/system/test_e2e_$name.py") >"$log" 2>&1 || status=$? ;;
    molecule)
        # Each scenario destroys its VMs, even when it fails.
        (cd "$COLLECTION_DIR" && molecule test --scenario-name "$name") >"$log" 2>&1 \
            || status=$? ;;
    esac
    if [ "$status" = 0 ]; then
        report="$kind $name: passed in $((SECONDS - started)) s"
        [ "$kind" != e2e ] || report+=$'\n'$(sed 's/^/    /' "$log")
        [ "$kind" != tier ] || report+=$'\n'$(grep -E '^[0-9]+ passed|^reliability:' "$log" | sed 's/^/    /' || true)
    else
        report="$kind $name: FAILED after $((SECONDS - started)) s; the end of $log:"$'\n'$(tail -n 80 "$log" | sed 's/^/    /')
    fi
    # One write, so that another lane's report does not cut into it.
    printf '%s\n' "$report"
    printf '%-28s %5d s\n' "$kind $name" $((SECONDS - started)) >>"$STAGE_ROOT/timings"
    return "$status"
}

# lane KIND:NAME...: the jobs one after another. After a failed host tier
# the lane's other tiers are skipped (each builds on the one before), its VM
# jobs still run; a failed VM job does not stop the next one.
lane() {
    local item failed=0 tier_failed=false
    for item in "$@"; do
        if [ "${item%%:*}" = tier ] && [ "$tier_failed" = true ]; then
            echo "tier ${item#*:}: skipped after a failed tier"
            continue
        fi
        if ! job "${item%%:*}" "${item#*:}"; then
            failed=1
            [ "${item%%:*}" != tier ] || tier_failed=true
        fi
    done
    return "$failed"
}

# host_tier TIER: one tier that runs on this machine.
host_tier() {
    case $1 in
    ruff)
        (cd "$REPO" && ruff check .) ;;
    lint)
        (cd "$REPO" && ansible-lint --offline) ;;
    sanity)
        (cd "$COLLECTION_DIR" && ansible-test sanity --local --python 3.11 --color no) ;;
    units)
        (cd "$COLLECTION_DIR" && PYTHONPATH=$STAGE_ROOT "$PY" -m pytest -q tests/unit) ;;
    integration)
        # Mounts made inside vanish with the namespace; the targets detach
        # their own loop devices in always blocks.
        (cd "$COLLECTION_DIR" && unshare --mount --propagation private -- \
            ansible-test integration --local --allow-destructive --python 3.11 --color no) ;;
    system)
        # The built collection, run through ansible-runner.
        (cd "$COLLECTION_DIR" && unshare --mount --propagation private -- \
            "$PY" -m pytest -q -p no:cacheprovider --ignore-glob='*/test_e2e_*' tests/system) ;;
    reliability)
        # SIGKILL faults, full disks, bad input, planted symlinks.
        (cd "$COLLECTION_DIR" && unshare --mount --propagation private -- \
            "$PY" -m pytest -q -p no:cacheprovider tests/reliability) ;;
    *) die "unknown tier $1" ;;
    esac
}

wanted() { [[ " ${tiers[*]} " == *" $1 "* ]]; }

# The quick checks first, one after another, streamed: a lint error stops
# the run in a minute or two.
: >"$STAGE_ROOT/timings"
for tier in ruff lint units; do
    wanted "$tier" || continue
    step "$tier"
    started=$SECONDS
    host_tier "$tier"
    printf '%-28s %5d s\n' "tier $tier" $((SECONDS - started)) >>"$STAGE_ROOT/timings"
done
for tier in "${tiers[@]}"; do
    case $tier in
    ruff | lint | units | sanity | integration | system | reliability | e2e | molecule) ;;
    *) die "unknown tier $tier" ;;
    esac
done

# Then three lanes side by side. A VM under emulation keeps about one core
# busy, and the host tiers leave about half of this 2-core machine idle
# (both measured): the host tiers in one lane, the VM jobs in two, balanced
# by measured time (see docs/lab.md). All at one priority: a VM has
# deadlines, a host tier has none.
host_lane=() lane_one=() lane_two=()
for tier in sanity integration system reliability; do
    wanted "$tier" && host_lane+=("tier:$tier")
done
wanted e2e && lane_one+=(e2e:distroclone) && lane_two+=(e2e:backing_store)
wanted molecule && lane_one+=(molecule:backstore molecule:backup_server) && lane_two+=(molecule:backup_then_build)
if wanted e2e || wanted molecule; then
    # Built once here (about 3 minutes the first time), not by two lanes at once.
    step "the lab image"
    "$PY" "$REPO/lab/lab.py" image
fi
step "side by side: ${host_lane[*]:-nothing} | ${lane_one[*]:-nothing} | ${lane_two[*]:-nothing}"
failed=0 pids=()
for jobs in host_lane lane_one lane_two; do
    declare -n list=$jobs
    if [ ${#list[@]} -gt 0 ]; then
        lane "${list[@]}" &
        pids+=($!)
    fi
    unset -n list
done
for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
done
step "time per tier and job"
sed 's/^/    /' "$STAGE_ROOT/timings"
printf '    %-28s %5d s\n' total "$SECONDS"
[ "$failed" = 0 ] || die "a tier or a job failed (see FAILED above)"
step "all tiers passed: ${tiers[*]}"
