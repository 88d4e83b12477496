#!/usr/bin/env bash
# The main job: back up a disposable lab VM and build its live ISO with
# playbooks/backup_then_build.yml, then boot the fetched ISO in QEMU and show
# the proof. Builds the lab image the first time (about 3 minutes, cached).
# Installs what it needs; safe to run again. Extra arguments go to
# ansible-playbook. Keeps its output in $LIVECLONE_DEMO_DIR
# (default /var/tmp/liveclone-demo); the VM is stopped at the end, always.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEMO_DIR=${LIVECLONE_DEMO_DIR:-/var/tmp/liveclone-demo}
LAB_STATE=$DEMO_DIR/lab
ARTIFACTS=$DEMO_DIR/artifacts
declare -a stage_times=()
ticker_pid=

# timed LABEL OUT COMMAND...: runs COMMAND with its output into the file OUT
# (- for the terminal), printing a progress line every 20 s, and records how
# long it took.
timed() {
    local label=$1 out=$2 started=$SECONDS ticker rc=0
    shift 2
    step "$label"
    ( while sleep 20; do echo "    ... $label: $((SECONDS - started)) s"; done ) &
    ticker=$!
    ticker_pid=$ticker
    if [ "$out" = - ]; then "$@" || rc=$?; else "$@" >"$out" || rc=$?; fi
    kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null || true
    stage_times+=("$(printf '%-44s %5d s' "$label" $((SECONDS - started)))")
    return "$rc"
}

bootstrap test
# One ssh round trip per task: each costs seconds on an emulated VM.
export ANSIBLE_PIPELINING=True
stage_collection
mkdir -p "$DEMO_DIR"
rm -rf "$ARTIFACTS"
lab=("$VENV/bin/python" "$REPO/lab/lab.py")
# Always: stop the progress ticker and the VM (by its PID; lab.py checks it).
# Each step may fail (the ticker is usually gone already); errexit must not
# skip the next one.
stop_all() {
    if [ -n "$ticker_pid" ]; then kill "$ticker_pid" 2>/dev/null || true; fi
    "${lab[@]}" down demo "$LAB_STATE" || echo "warning: could not stop the lab VM in $LAB_STATE" >&2
}
trap stop_all EXIT

timed "lab image (built once per machine)" /dev/null "${lab[@]}" image
timed "boot the lab VM" "$DEMO_DIR/vm.json" "${lab[@]}" up demo "$LAB_STATE"
"${lab[@]}" inventory "$LAB_STATE" >"$DEMO_DIR/inventory.json"
timed "backup_then_build.yml against the VM" - \
    ansible-playbook -i "$DEMO_DIR/inventory.json" "$REPO/playbooks/backup_then_build.yml" \
    -e rootfs_backup_device=/dev/vdb -e rootfs_backup_format_device=true \
    -e live_iso_live_password=live -e "liveclone_artifact_dir=$ARTIFACTS" "$@"
iso=$ARTIFACTS/demo/live.iso
timed "boot the fetched ISO in QEMU (BIOS, TCG)" "$DEMO_DIR/boot.json" \
    "$VENV/bin/python" "$REPO/lab/live_console.py" "$iso" live live

step "proof"
"$VENV/bin/python" - "$DEMO_DIR/boot.json" "$iso" <<'PY'
import json, os, sys
boot = json.load(open(sys.argv[1]))
iso = sys.argv[2]
print("boot menu (serial console):")
for line in boot["menu"]:
    print("    " + line)
print("login prompt after %s s: %s" % (boot["seconds_to_login_prompt"], " ".join(boot["prompt"])))
print("logged in as live, groups: %s" % " ".join(boot["groups"] or []))
print("ISO %s: %d bytes (%.0f MiB)" % (iso, os.path.getsize(iso), os.path.getsize(iso) / 2**20))
print("sha256 %s" % open(iso + ".sha256").read().split()[0])
PY
echo
cat "$ARTIFACTS/fleet-report.md"
step "time per stage"
printf '%s\n' "${stage_times[@]}"
