# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""live_iso's entry point: read, plan and (unless in check mode) apply,
one build at a time per directory of ISOs."""

from __future__ import annotations

from .._common.lock import DEFAULT_TIMEOUT, Lock
from .._common.plan import Result, execute
from .apply import IsoApplier
from .plan import diff_view, plan
from .read import IsoReader

DEST_BUSY = ("%(path)s is locked by another build of an ISO there; waited %(timeout)d s. Try again when it has "
             "finished")


def describe(desired, current, stages):
    """The values returned to the user."""
    values = {"path": desired.dest, "label": desired.label, "source": current.source.view(), "stages": stages}
    manifest = current.manifest if current.up_to_date else None
    if manifest:
        values.update(size=manifest["size"], sha256=manifest["sha256"], squashfs=manifest["squashfs"],
                      secure_boot=manifest.get("secure_boot", {"enabled": False}))
    return values


def run(runner, desired, check_mode):
    """Read, plan and (unless check_mode) apply; returns a _plan.Result."""
    reader = IsoReader(runner, desired)
    applier = IsoApplier(runner, desired)
    # One build at a time per directory of ISOs.
    with Lock(desired.dest_dir, DEFAULT_TIMEOUT, DEST_BUSY):
        outcome = execute(reader.read, lambda current: plan(desired, current), applier.apply, check_mode)
    return Result.of(outcome, diff=diff_view(desired, outcome.before, outcome.operations),
                     values=describe(desired, outcome.after, applier.stages),
                     warnings=reader.warnings + applier.warnings)
