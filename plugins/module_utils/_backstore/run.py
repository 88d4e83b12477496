# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Backing stores, the entry point: read, plan and (unless check mode)
apply through `_plan.execute`, and the values returned to the user.
"""

from __future__ import annotations

import os

from .._common.command import CommandError
from .._common.plan import Result, execute
from .apply import BackstoreApplier
from .desired import BackstoreError
from .plan import LEFTOVER_ACTIONS, diff_view, plan
from .read import BackstoreReader, Current, image_directory


def describe(desired, current):
    """The values returned to the user for this image."""
    return {
        "path": desired.path,
        "layout": desired.layout,
        "exists": current.exists,
        "size": current.file_size if current.exists else None,
        "fs_size": current.fs_size,
        "fstype": current.fstype,
        "label": current.label,
        "uuid": current.uuid,
        "loop_device": current.loop_device,
        "mount_point": current.mount_point,
    }


def run(runner, desired, check_mode, tmpdir):
    """Read, plan, and (unless check_mode) apply `desired`; returns a Result."""
    reader = BackstoreReader(runner)
    applier = BackstoreApplier(runner, tmpdir)
    with image_directory(desired.directory) as tree:

        def read():
            return reader.read(desired.path, tree) if tree else Current(path=desired.path, dir_exists=False)

        def apply(current, operations):
            leftovers = [op for op in operations if op.action in LEFTOVER_ACTIONS]
            try:
                if leftovers:
                    # Undoing a leftover mount may detach a loop device: plan the
                    # rest on the state as it is afterwards.
                    applier.apply(desired, current, leftovers, tree)
                    current = read()
                    operations = leftovers + plan(desired, current)
                applier.apply(desired, current, operations[len(leftovers):], tree)
            except CommandError as error:
                raise BackstoreError(
                    "%s; %s was left consistent, and running again resumes from "
                    "where this run stopped" % (error, desired.path)) from None
            except OSError as error:
                # Entries of the directory are reached through its descriptor:
                # name them in full for the message.
                for attribute in ("filename", "filename2"):
                    name = getattr(error, attribute)
                    if isinstance(name, str) and name and not os.path.isabs(name):
                        setattr(error, attribute, os.path.join(desired.directory, name))
                raise
            return current, operations

        outcome = execute(read, lambda current: plan(desired, current), apply, check_mode)
    return Result.of(outcome, diff=diff_view(desired, outcome.before, outcome.operations),
                     values=describe(desired, outcome.after))
