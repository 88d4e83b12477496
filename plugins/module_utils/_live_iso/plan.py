# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""live_iso's pure planner over what the reader read, and what the manifest
and the diff record of it."""

from __future__ import annotations

import os

from .._common.plan import Operation
from .desired import MANIFEST_SUFFIX
from .read import MANIFEST_VERSION, RECORDED_KEYS


def plan(desired, current):
    """The operations that make the ISO desired asks for, from the state read. Pure."""
    if current.up_to_date:
        return []
    source = current.source
    operations = []
    for path, kind in current.stale_work:
        if kind == "work":
            operations.append(Operation("remove_work", "removed %s left by an interrupted build" % path,
                                        {"path": path}))
        else:
            operations.append(Operation("remove_entry", "removed %s (a %s, not a work tree) from %s" % (
                os.path.basename(path), kind, current.work_parent), {"path": path}))
    operations += [Operation("remove_file", "removed %s left by an interrupted build" % path, {"path": path})
                   for path in current.stale_files]
    if current.by_snapshot:
        operations.append(Operation("snapshot", "took a writable btrfs snapshot of %s" % source.root))
    else:
        operations.append(Operation("rsync", "copied %s with rsync" % source.root))
    operations.append(Operation("leave_out", "removed from the copy what the image leaves out (%s)"
                                % ", ".join(current.excludes), {"patterns": list(current.excludes)}))
    if current.missing:
        operations.append(Operation("install", "installed %s into the image" % ", ".join(current.missing),
                                    {"packages": list(current.missing)}))
    operations.append(Operation("clean", "removed the source's users, secrets, histories, logs and caches"))
    operations.append(Operation("build", "built %s from %s %s" % (desired.dest, source.kind,
                                                                  source.snapshot or source.root)))
    return operations


def recorded(current):
    """What the manifest records of the source and options (RECORDED_KEYS)."""
    return {"version": MANIFEST_VERSION, "source_identity": current.source.identity,
            "options_digest": current.options_digest, "source": current.source.view(),
            "uefi_chain": uefi_chain(current.secure_boot)}


def uefi_chain(secure_boot):
    """How the ISO boots UEFI, as the manifest and the diff show it."""
    return "signed (Secure Boot)" if secure_boot else "unsigned GRUB (Secure Boot off)"


def diff_view(desired, current, operations):
    """Before: what the manifest beside the ISO records ({} without an ISO);
    after: what this run's build records (before, when nothing is to be built)."""
    before = {key: current.manifest[key] for key in RECORDED_KEYS if key in current.manifest} \
        if current.manifest else {}
    header = desired.dest + MANIFEST_SUFFIX
    return {"before": before, "after": recorded(current) if operations else dict(before),
            "before_header": header, "after_header": header}
