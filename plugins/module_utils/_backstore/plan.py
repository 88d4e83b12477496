# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Backing stores, the planner: (Desired, Current) -> [Operation], pure
(no I/O); it raises BackstoreError for what cannot be done, before anything
is done. `diff_view` shows a plan as before/after.
"""

from __future__ import annotations

from .._common.plan import Operation
from .desired import (
    EXT_FSTYPES,
    FAT_FSTYPES,
    FAT_MAX_FILE_SIZE,
    FSTYPES,
    MIB,
    MIN_SIZE,
    SIZE_TOLERANCE,
    BackstoreError,
    format_size,
)

# Operations that clean up after an interrupted earlier run.
LEFTOVER_ACTIONS = ("unmount_stale", "remove_stale")


def _check_new_size(desired, current, needed):
    """Refuse a size the target directory cannot hold."""
    if current.dir_fstype in FAT_FSTYPES and desired.size > FAT_MAX_FILE_SIZE:
        raise BackstoreError(
            "%s is on a FAT filesystem (%s), which cannot hold a file of 4 GiB or "
            "more; choose a size below 4096M, or put the store on an ext4 or exFAT "
            "partition" % (desired.path, current.dir_fstype))
    if needed > current.dir_free:
        raise BackstoreError(
            "not enough free space for %s: %s needed, %s free in %s; free some "
            "space or choose a smaller size" % (
                desired.path, format_size(needed), format_size(current.dir_free),
                desired.directory))


def _check_existing(desired, current):
    if current.link_target is not None:
        raise BackstoreError(
            "path %s is a symlink (to %s); it is never followed: give the path of the real image, "
            "or remove the link" % (desired.path, current.link_target))
    if not current.is_regular:
        raise BackstoreError(
            "%s exists and is not a regular file; it was left untouched: move it away "
            "or choose another path" % desired.path)
    if current.fstype is None:
        raise BackstoreError(
            "%s holds no filesystem signature, so it is not a backing store; it was "
            "left untouched: move it away or choose another path" % desired.path)
    if current.fstype != desired.fstype:
        if current.fstype in FSTYPES:
            advice = "set fstype: %s to manage it, or remove it first with state: absent" % current.fstype
        else:
            advice = ("this module manages only %s stores, so it was left untouched: move it away "
                      "or choose another path" % ", ".join(FSTYPES))
        raise BackstoreError("%s holds a %s filesystem, not %s; %s" % (
            desired.path, current.fstype, desired.fstype, advice))
    if len(current.loop_devices) > 1:
        raise BackstoreError(
            "%s is attached to several loop devices (%s); detach all but one with "
            "losetup -d" % (desired.path, ", ".join(loop["name"] for loop in current.loop_devices)))
    for loop in current.loop_devices:
        if loop["offset"] or loop["sizelimit"]:
            raise BackstoreError(
                "%s is attached to %s with an offset or size limit; this module only "
                "manages whole-file loop devices: detach it (losetup -d %s) and run again" % (
                    desired.path, loop["name"], loop["name"]))


# What each operation changes: entries of the image's directory, or the image.
CHANGES_DIRECTORY = ("create", "remove", "remove_stale")
CHANGES_IMAGE = ("remove", "extend_file", "grow_filesystem", "relabel")


def _check_writable(desired, current, operations):
    """Refuse, before anything is done, what the filesystem or the file's
    attributes would refuse half-way."""
    actions = {operation.action for operation in operations}
    if current.dir_read_only and actions & set(CHANGES_DIRECTORY + CHANGES_IMAGE):
        raise BackstoreError(
            "%s is on a read-only filesystem (mounted on %s); remount it read-write "
            "(mount -o remount,rw %s) or choose a path on another filesystem" % (
                desired.directory, current.dir_mount_point or desired.directory,
                current.dir_mount_point or desired.directory))
    if current.dir_attributes and actions & set(CHANGES_DIRECTORY):
        raise BackstoreError(
            "directory %s has the %s attribute (lsattr -d), so no file can be made or removed in it; "
            "clear it with chattr -i -a %s, or choose another directory" % (
                desired.directory, " and ".join(sorted(current.dir_attributes)), desired.directory))
    if current.attributes and actions & set(CHANGES_IMAGE):
        raise BackstoreError(
            "%s has the %s attribute (lsattr), so it cannot be %s; clear it with chattr -i -a %s if it "
            "may be, or leave size, label and state as the store is" % (
                desired.path, " and ".join(sorted(current.attributes)),
                "removed" if desired.state == "absent" else "grown or relabelled", desired.path))
    if "create" in actions and current.dir_free_inodes is not None and current.dir_free_inodes < 1:
        raise BackstoreError(
            "the filesystem of %s has no free inodes (df -i), so no file can be made there; remove "
            "files there or choose a path on another filesystem" % desired.directory)


def _plan_absent(desired, current):
    if not current.exists:
        return []
    _check_existing(desired, current)
    if current.loop_devices:
        where = current.loop_device
        if current.mount_point:
            where += " mounted on " + current.mount_point
        raise BackstoreError(
            "%s is in use (attached to %s); unmount it and detach the loop device "
            "(umount, losetup -d) before removing it" % (desired.path, where))
    return [Operation("remove", "remove %s" % desired.path)]


def _plan_grow(desired, current):
    operations = []
    mounted = current.mount_point is not None
    target = max(desired.size or 0, current.file_size)
    if desired.size is not None and desired.size > current.file_size + SIZE_TOLERANCE - 1:
        _check_new_size(desired, current, desired.size - current.file_size)
        operations.append(Operation(
            "extend_file", "extend %s from %s to %s (%s)" % (
                desired.path, format_size(current.file_size), format_size(desired.size),
                desired.allocation),
            {"size": desired.size}))
        target = desired.size
    if current.fs_size is None or target - current.fs_size < SIZE_TOLERANCE:
        return operations
    if mounted and desired.fstype == "ext2":
        raise BackstoreError(
            "%s is ext2 and mounted on %s; ext2 cannot be grown while mounted: unmount "
            "it (boot the live system with persistence off) and run again" % (
                desired.path, current.mount_point))
    if mounted and desired.fstype in EXT_FSTYPES and not current.can_resize_ext_online:
        raise BackstoreError(
            "%s is mounted on %s and growing ext3/ext4 online needs the "
            "CAP_SYS_RESOURCE capability, which this process lacks; run as real root "
            "outside a restricted container, or unmount it and run again" % (
                desired.path, current.mount_point))
    if current.loop_devices:
        operations.append(Operation(
            "refresh_loop", "refresh the capacity of %s" % current.loop_device))
    operations.append(Operation(
        "grow_filesystem", "grow the %s filesystem from %s to %s %s" % (
            desired.fstype, format_size(current.fs_size), format_size(target),
            "online on " + current.mount_point if mounted else "offline")))
    return operations


def _plan_relabel(desired, current):
    if desired.label is None or desired.label == (current.label or None):
        return []
    if desired.fstype == "xfs" and current.mount_point:
        raise BackstoreError(
            "%s is xfs and mounted on %s; xfs can only be relabelled unmounted: unmount "
            "it and run again" % (desired.path, current.mount_point))
    return [Operation("relabel", "relabel %s from %r to %r" % (
        desired.path, current.label, desired.label))]


def plan(desired, current):
    """The operations that bring `current` to `desired`; raises BackstoreError."""
    operations = _plan(desired, current)
    _check_writable(desired, current, operations)
    return operations


def _plan(desired, current):
    if not current.dir_exists:
        raise BackstoreError(
            "directory %s does not exist; create it (or mount the target partition) "
            "first" % desired.directory)
    operations = [Operation("unmount_stale", "unmount %s left by an interrupted run" % mp,
                            {"mount_point": mp}) for mp in current.stale_mount_points]
    operations += [Operation("remove_stale", "remove %s left by an interrupted create" % tmp,
                             {"path": tmp}) for tmp in current.stale_temp_files]
    if desired.state == "absent":
        return operations + _plan_absent(desired, current)
    if not current.exists:
        if desired.size is None:
            raise BackstoreError(
                "%s does not exist and no size was given; set size (for example 512M) "
                "to create it" % desired.path)
        if desired.size < MIN_SIZE[desired.fstype]:
            raise BackstoreError(
                "size %s is below the %s minimum of %s; choose at least %dM" % (
                    format_size(desired.size), desired.fstype,
                    format_size(MIN_SIZE[desired.fstype]), MIN_SIZE[desired.fstype] // MIB))
        _check_new_size(desired, current, desired.size)
        return operations + [Operation("create", "create %s: %s %s, label %r, %s, layout %s" % (
            desired.path, format_size(desired.size), desired.fstype, desired.label,
            desired.allocation, desired.layout))]
    _check_existing(desired, current)
    if desired.size is not None and desired.size < current.file_size - SIZE_TOLERANCE + 1:
        raise BackstoreError(
            "%s is %s and size asks for %s; backing stores are never shrunk. Keep "
            "size at %dM or more, or remove the store and create a smaller one" % (
                desired.path, format_size(current.file_size), format_size(desired.size),
                -(-current.file_size // MIB)))
    return operations + _plan_grow(desired, current) + _plan_relabel(desired, current)


def diff_view(desired, current, operations):
    before = {"state": "present" if current.exists else "absent"}
    if current.exists:
        before.update(size=current.file_size, fstype=current.fstype, label=current.label)
    after = dict(before)
    if desired.state == "absent":
        after = {"state": "absent"}
    else:
        after["state"] = "present"
        for operation in operations:
            if operation.action in ("create", "extend_file"):
                after["size"] = desired.size
            if operation.action in ("create", "relabel"):
                after["label"] = desired.label
            if operation.action == "create":
                after["fstype"] = desired.fstype
    return {"before": before, "after": after,
            "before_header": desired.path, "after_header": desired.path}
