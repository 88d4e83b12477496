#!/usr/bin/env bash
# Regenerates docs/modules/*.md from the modules' documentation (the system
# tests fail when they are stale). Installs what it needs; safe to run again.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bootstrap main
stage_collection
"$VENV/bin/python" "$REPO/scripts/module_docs.py" --out "$REPO/docs/modules"
step "docs/modules updated"
