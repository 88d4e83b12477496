"""Hostile cases for snapper_cache and snapper_cache_info, on real btrfs
(and ext4) loop volumes: links planted where the modules read, write and
delete, `//`-style paths (in a throwaway root), control characters and
trailing newlines in every string parameter, hostile os-release values,
read-only, immutable, full and inode-exhausted volumes. Each case runs in
hostile_case(): the canary outside the target (and any victim subvolume
watched) must be unchanged, and a refused run leaves its target as it was."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import hostile_case, loop_filesystem, run, state_of, tree_digest
from module_run import make_throwaway_root, run_module

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1 << 20
# A snapshot shows the cache's nested .snapshots subvolume as an empty
# directory whose times btrfs reports as "now": left out of comparisons.
_NESTED_SNAPSHOTS = re.compile(r".+/\.snapshots$")


def settled_state(root):
    """state_of(root) without the nested .snapshots directories of snapshots."""
    state = state_of(root)
    state["entries"] = {path: entry for path, entry in state["entries"].items()
                        if not (_NESTED_SNAPSHOTS.match(path) and path != ".rootfs_cache/.snapshots")}
    return state


def config_name(request):
    return "hostile-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:10]


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def change(source, tag):
    """A change rsync sees: the file grows (its quick check compares size and whole-second times)."""
    with open(os.path.join(source, "etc/motd"), "a") as handle:
        handle.write("change: %s\n" % tag)


def refused(work, module, params, pattern, *unchanged, root=None, modes=(True, False)):
    """The module refuses params (in check mode first, then for real) with a
    message matching pattern, no traceback, and every unchanged tree as it was."""
    before = [settled_state(path) for path in unchanged]
    outcome = None
    for check in modes:
        outcome = run_module(work, module, params, check=check, root=root)
        assert outcome.result is not None, "no result: %s" % outcome.output[-3000:]
        assert outcome.failed, "accepted (check mode %s): %s" % (check, outcome.result.get("operations"))
        assert re.search(pattern, outcome.msg), "check mode %s: %s" % (check, outcome.msg)
        assert "Traceback" not in outcome.output, outcome.output[-3000:]
        for path, state in zip(unchanged, before):
            assert settled_state(path) == state, "%s changed although the run was refused" % path
    return outcome


def warnings_of(result):
    """The warning texts of a result (plain strings, or ansible-core's warning summaries)."""
    return [item if isinstance(item, str) else item.get("event", {}).get("msg", str(item))
            for item in result.get("warnings", [])]


def succeeded(work, module, params, check=False, root=None):
    outcome = run_module(work, module, params, check=check, root=root)
    assert outcome.result is not None, "no result: %s" % outcome.output[-3000:]
    assert not outcome.failed, outcome.msg
    assert "Traceback" not in outcome.output
    return outcome.result


class Lab:
    """One btrfs volume: a source tree, a victim subvolume and trees that
    planted links point at, and caches made on request (each its own base
    directory and snapper config)."""

    def __init__(self, work, volume, canary):
        self.work, self.volume, self.canary = work, volume, canary
        self.source = os.path.join(work, "source")
        for relative, text in (("etc/os-release", 'NAME="Hostile Linux"\nID=hostile\n'),
                               ("etc/hostname", "hostile\n"), ("usr/bin/tool", "#!/bin/sh\n"),
                               ("home/bob/notes", "bob's\n"), ("srv/data/a.txt", "a\n")):
            write(os.path.join(self.source, relative), text)
        os.makedirs(os.path.join(self.source, "lib/modules/6.1.0-hostile"))
        self.victim = os.path.join(volume, "victim")
        run(["btrfs", "subvolume", "create", self.victim])
        for relative in ("keep/one.txt", "keep/deep/two.txt", "etc/hostname"):
            write(os.path.join(self.victim, relative), "the victim's %s\n" % relative)
        # A directory holding a subvolume called `snapshot`, as snapper's N/ does.
        self.victim_holder = os.path.join(volume, "victim-holder")
        os.makedirs(self.victim_holder)
        run(["btrfs", "subvolume", "create", os.path.join(self.victim_holder, "snapshot")])
        write(os.path.join(self.victim_holder, "snapshot/precious.txt"), "not a snapshot\n")
        self.caches = []

    def base(self, name):
        path = os.path.join(self.volume, name)
        os.makedirs(path)
        return path

    def cache(self, name, config, versioning="snapper", backups=1, **params):
        """A base with a cache of the source, backed up `backups` times (a change each time)."""
        base = self.base(name)
        values = dict({"base_dir": base, "source": self.source, "snapper_config": config,
                       "versioning": versioning, "keep": 5}, **params)
        self.caches.append(values)
        for index in range(backups):
            change(self.source, "backup %s %d" % (name, index))
            succeeded(self.work, "snapper_cache", values)
        return values

    def cleanup(self):
        for values in reversed(self.caches):
            run_module(self.work, "snapper_cache", dict(values, state="absent"))


@pytest.fixture(scope="module")
def lab(sandbox, canary):
    work = os.path.join(sandbox, "hostile-cache")
    os.makedirs(work)
    with loop_filesystem(work, "volume", 1 << 30, "btrfs") as volume:
        lab = Lab(work, volume, canary)
        lab.ready = lab.cache("ready", "hostile-ready", backups=2)
        try:
            yield lab
        finally:
            lab.cleanup()


@pytest.fixture
def watched(lab, canary):
    """hostile_case() watching the canary and the victim subvolume and holder."""
    return lambda *more: hostile_case(canary, lab.victim, lab.victim_holder, *more)


# --- parameters: control characters, quotes, rule text, booleans ---------------

TEXT_CASES = [
    ("base_dir-newline", "snapper_cache", {"base_dir": "{ready}\n"}, r"base_dir .* control character"),
    ("base_dir-tab", "snapper_cache", {"base_dir": "{ready}\tx"}, r"base_dir .* control character"),
    ("source-newline", "snapper_cache", {"source": "{source}\n"}, r"source .* control character"),
    ("source-nul", "snapper_cache", {"source": "{source}\x00/etc"}, r"source .* control character"),
    ("restore_dest-newline", "snapper_cache", {"state": "restored", "restore_dest": "{work}/restore-x\n"},
     r"restore_dest .* control character"),
    ("restore_path-newline", "snapper_cache", {"state": "restored", "restore_dest": "{work}/restore-x",
                                               "restore_path": "/etc\n/"}, r"restore_path .* control character"),
    ("snapper_config-newline", "snapper_cache", {"snapper_config": "hostile-ready\n"},
     r"snapper_config .* not a snapper config name"),
    ("snapper_config-slash", "snapper_cache", {"snapper_config": "a/b"}, r"snapper_config .* letters, digits"),
    ("snapper_config-space", "snapper_cache", {"snapper_config": "a b"}, r"snapper_config .* letters, digits"),
    ("exclude-newline", "snapper_cache", {"exclude": ["/srv/*\n/etc"]}, r"exclude item .* control character"),
    ("exclude-carriage-return", "snapper_cache", {"exclude": ["/srv/*\r"]}, r"exclude item .* control character"),
    ("exclude-clear-rule", "snapper_cache", {"exclude": ["!"]}, r"exclude item '!' is read by rsync as a filter rule"),
    ("exclude-include-rule", "snapper_cache", {"exclude": ["+ /proc/***"]}, r"filter rule.*give a path pattern"),
    ("restore_snapshot-newline", "snapper_cache", {"state": "restored", "restore_dest": "{work}/restore-x",
                                                   "restore_snapshot": "latest\n"},
     r"restore_snapshot .* not a snapshot name"),
    ("restore_snapshot-number-newline", "snapper_cache", {"state": "restored", "restore_dest": "{work}/restore-x",
                                                          "restore_snapshot": "1\n"}, r"give latest, a snapper number"),
    ("restore_snapshot-dotdot", "snapper_cache", {"state": "restored", "restore_dest": "{work}/restore-x",
                                                  "restore_snapshot": "../1"}, r"restore_snapshot '\.\./1'"),
    ("keep-true", "snapper_cache", {"keep": True}, r"keep is true, a boolean; set keep to a number"),
    ("keep-true-absent", "snapper_cache", {"keep": True, "state": "absent"}, r"keep is true, a boolean"),
    ("lock_timeout-true", "snapper_cache", {"lock_timeout": True}, r"lock_timeout is true, a boolean"),
    ("info-base_dir-newline", "snapper_cache_info", {"base_dir": "{ready}\n"}, r"base_dir .* control character"),
    ("info-snapper_config-newline", "snapper_cache_info", {"snapper_config": "hostile-ready\n"},
     r"snapper_config .* not a snapper config name"),
]


@pytest.mark.parametrize(("module", "overrides", "pattern"), [case[1:] for case in TEXT_CASES],
                         ids=[case[0] for case in TEXT_CASES])
def test_hostile_text_is_refused(lab, watched, module, overrides, pattern):
    values = dict(lab.ready) if module == "snapper_cache" else {
        "base_dir": lab.ready["base_dir"], "snapper_config": lab.ready["snapper_config"]}
    for key, value in overrides.items():
        values[key] = value.format(ready=lab.ready["base_dir"], source=lab.source, work=lab.work) if isinstance(
            value, str) else value
    with watched(lab.ready["base_dir"]):
        refused(lab.work, module, values, pattern, lab.ready["base_dir"], lab.source)
        assert not os.path.exists(os.path.join(lab.work, "restore-x"))


@pytest.mark.parametrize("character", ['"', "$", "`", "\\"])
def test_base_dir_with_a_character_snapper_cannot_quote(lab, watched, request, character):
    base = lab.base("quote%s%s" % (character, hashlib.sha256(character.encode()).hexdigest()[:4]))
    params = {"base_dir": base, "source": lab.source, "snapper_config": config_name(request),
              "versioning": "snapper"}
    with watched(base):
        refused(lab.work, "snapper_cache", params, r"base_dir .* snapper's config \(SUBVOLUME=.*\) cannot hold", base)
    assert config_name(request) not in os.listdir("/etc/snapper/configs")


def test_trailing_slashes_and_dots_are_the_same_base(lab, watched):
    for form in (lab.ready["base_dir"] + "/", lab.ready["base_dir"] + "//.", lab.ready["base_dir"] + "/./"):
        with watched():
            result = succeeded(lab.work, "snapper_cache", dict(lab.ready, base_dir=form))
        assert result["base_dir"] == lab.ready["base_dir"]
        assert not result["changed"], result["operations"]


# --- `//` and friends, in a throwaway root -------------------------------------

@pytest.mark.parametrize("form", ["//", "/./", "/../", "///", "/.//."])
def test_base_dir_root_forms_are_refused(lab, canary, throwaway_root, form):
    with hostile_case(canary, throwaway_root):
        refused(lab.work, "snapper_cache", {"base_dir": form, "source": "/tmp", "versioning": "none"},
                r"base_dir / would put the cache over the root filesystem", throwaway_root, root=throwaway_root)


def test_info_base_dir_root_form_is_refused(lab, canary, throwaway_root):
    with hostile_case(canary, throwaway_root):
        refused(lab.work, "snapper_cache_info", {"base_dir": "//"}, r"base_dir / holds no cache", throwaway_root,
                root=throwaway_root, modes=(False,))


@pytest.fixture(scope="module")
def chroot_with_cache(lab):
    """A throwaway root on the btrfs volume holding a cache at /backup (raw
    btrfs snapshots), so that a restore to `//` there would have something to copy."""
    root = make_throwaway_root(os.path.join(lab.volume, "throwaway-root"))
    write(os.path.join(root, "keep.txt"), "the throwaway root's own file\n")
    base = os.path.join(root, "backup")
    os.makedirs(base)
    succeeded(lab.work, "snapper_cache", {"base_dir": base, "source": lab.source, "versioning": "btrfs"})
    yield root
    run_module(lab.work, "snapper_cache", {"base_dir": base, "state": "absent", "versioning": "btrfs"})


@pytest.mark.parametrize("form", ["//", "/./", "/../"])
def test_restore_to_a_root_form_needs_allow_restore_to_root(lab, canary, chroot_with_cache, form):
    params = {"base_dir": "/backup", "state": "restored", "restore_dest": form}
    with hostile_case(canary, chroot_with_cache):
        refused(lab.work, "snapper_cache", params, r"restoring over / replaces the running system; set "
                r"allow_restore_to_root", chroot_with_cache, root=chroot_with_cache)


def test_restore_to_root_allowed_still_needs_restore_delete_extra(lab, canary, chroot_with_cache):
    params = {"base_dir": "/backup", "state": "restored", "restore_dest": "//", "allow_restore_to_root": True}
    with hostile_case(canary, chroot_with_cache):
        refused(lab.work, "snapper_cache", params, r"restore_dest / is not empty: restoring snapshot \S+ there "
                r"would delete \d+ files .*Set restore_delete_extra: true", chroot_with_cache, root=chroot_with_cache)


# --- links planted in the cache -----------------------------------------------

def plant(path, target):
    os.symlink(target, path)
    return path


@pytest.mark.parametrize("state", ["absent", "present", "restored"])
def test_rootfs_cache_link_to_a_victim_subvolume(lab, watched, request, state):
    base = lab.base("cache-link-" + state)
    link = plant(os.path.join(base, ".rootfs_cache"), lab.victim)
    params = {"base_dir": base, "source": lab.source, "state": state, "snapper_config": config_name(request),
              "versioning": "btrfs", "restore_dest": os.path.join(lab.work, "restore-" + state)}
    with watched(base):
        refused(lab.work, "snapper_cache", params, r"\.rootfs_cache is a symlink \(to %s\).*never followed"
                % re.escape(lab.victim), base)
    assert os.path.islink(link) and not os.path.exists(params["restore_dest"])


def test_rootfs_cache_link_into_the_canary(lab, watched, request):
    base = lab.base("cache-link-canary")
    plant(os.path.join(base, ".rootfs_cache"), lab.canary.path("data/home"))
    params = {"base_dir": base, "source": lab.source, "versioning": "none", "snapper_config": config_name(request)}
    with watched(base):
        refused(lab.work, "snapper_cache", params, r"is a symlink .* never followed", base)


def test_rootfs_cache_link_is_refused_by_info(lab, watched):
    base = lab.base("cache-link-info")
    plant(os.path.join(base, ".rootfs_cache"), lab.victim)
    with watched(base):
        refused(lab.work, "snapper_cache_info", {"base_dir": base}, r"is a symlink .* never followed", base,
                modes=(False,))


@pytest.mark.parametrize("kind", ["file", "mount"])
def test_rootfs_cache_that_is_no_directory_of_the_base(lab, watched, request, kind):
    base = lab.base("cache-" + kind)
    cache = os.path.join(base, ".rootfs_cache")
    if kind == "file":
        write(cache, "not a cache\n")
    else:
        os.makedirs(cache)
        run(["mount", "--bind", lab.victim, cache])
    try:
        for state, pattern in (("absent", r"is (not a directory|a mount point)"),
                               ("present", r"is (not a directory|a mount point)")):
            params = {"base_dir": base, "source": lab.source, "state": state, "versioning": "btrfs",
                      "snapper_config": config_name(request)}
            with watched(base):
                refused(lab.work, "snapper_cache", params, pattern, base)
    finally:
        if kind == "mount":
            run(["umount", cache])


@pytest.mark.parametrize("state", ["present", "absent"])
def test_snapshots_dir_link(lab, watched, request, state):
    values = lab.cache("snapshots-link-" + state, config_name(request), versioning="btrfs")
    base = values["base_dir"]
    snapshots = os.path.join(base, ".rootfs_cache/.snapshots")
    for name in os.listdir(snapshots):
        if name.endswith(".meta"):
            os.unlink(os.path.join(snapshots, name))
        else:
            run(["btrfs", "subvolume", "delete", os.path.join(snapshots, name)])
    run(["btrfs", "subvolume", "delete", snapshots])
    plant(snapshots, lab.victim)
    change(lab.source, "a change for " + state)
    with watched(base):
        refused(lab.work, "snapper_cache", dict(values, state=state), r"\.snapshots is a symlink .*never followed",
                base)
    os.unlink(snapshots)


def test_legacy_snapshot_link_is_never_pruned(lab, watched, request):
    values = lab.cache("legacy-link", config_name(request), versioning="btrfs", backups=2)
    snapshots = os.path.join(values["base_dir"], ".rootfs_cache/.snapshots")
    link = plant(os.path.join(snapshots, "@2001-01-01_00:00"), lab.victim)
    meta_link = plant(os.path.join(snapshots, "@2001-01-01_00:00.meta"), lab.canary.path("data/file.txt"))
    change(lab.source, "a change for keep 1")
    with watched():
        result = succeeded(lab.work, "snapper_cache", dict(values, keep=1))
    assert [snap["name"] for snap in result["snapshots"]] == [result["snapshot_created"]["name"]]
    assert len(result["snapshots_pruned"]) == 2
    assert "@2001-01-01_00:00" not in [snap["name"] for snap in result["snapshots_pruned"]]
    assert os.path.islink(link) and os.path.islink(meta_link)
    assert any("@2001-01-01_00:00 is a symlink, so it is not a snapshot" in text for text in warnings_of(result))
    info = succeeded(lab.work, "snapper_cache_info", {"base_dir": values["base_dir"]})
    assert "@2001-01-01_00:00" not in [snap["name"] for snap in info["snapshots"]]


def test_legacy_sidecar_link_is_removed_as_a_link(lab, watched, request):
    values = lab.cache("legacy-sidecar", config_name(request), versioning="btrfs", backups=2)
    snapshots = os.path.join(values["base_dir"], ".rootfs_cache/.snapshots")
    oldest = sorted(name for name in os.listdir(snapshots) if not name.endswith(".meta"))[0]
    os.unlink(os.path.join(snapshots, oldest + ".meta"))
    plant(os.path.join(snapshots, oldest + ".meta"), lab.canary.path("data/etc/passwd"))
    change(lab.source, "a change for the sidecar")
    with watched():
        result = succeeded(lab.work, "snapper_cache", dict(values, keep=1))
    assert oldest in [snap["name"] for snap in result["snapshots_pruned"]]
    assert not os.path.lexists(os.path.join(snapshots, oldest + ".meta"))


def info_xml(snapshots, number):
    with open(os.path.join(snapshots, "1/info.xml")) as handle:
        return re.sub(r"<num>\d+</num>", "<num>%d</num>" % number, handle.read())


@pytest.mark.parametrize("planted", ["snapshot-link", "number-link", "incomplete-link"])
def test_snapper_entry_link_is_never_a_snapshot(lab, watched, request, planted):
    values = lab.cache("snapper-" + planted, config_name(request), backups=2)
    snapshots = os.path.join(values["base_dir"], ".rootfs_cache/.snapshots")
    if planted == "snapshot-link":
        os.makedirs(os.path.join(snapshots, "90"))
        write(os.path.join(snapshots, "90/info.xml"), info_xml(snapshots, 90))
        plant(os.path.join(snapshots, "90/snapshot"), lab.victim)
        name = "90"
    elif planted == "number-link":
        write(os.path.join(lab.victim_holder, "info.xml"), info_xml(snapshots, 91))
        plant(os.path.join(snapshots, "91"), lab.victim_holder)
        name = "91"
    else:
        plant(os.path.join(snapshots, "77"), lab.victim_holder)
        name = "77"
    change(lab.source, "a change for " + planted)
    try:
        with watched():
            result = succeeded(lab.work, "snapper_cache", dict(values, keep=1))
            assert name not in [snap["name"] for snap in result["snapshots"] + result["snapshots_pruned"]]
            assert len(result["snapshots"]) == 1
            if planted != "snapshot-link":  # snapper itself does not list N/ whose snapshot is a link
                assert any("%s is a symlink, so it is not a snapshot" % name in text
                           for text in warnings_of(result)), warnings_of(result)
            removed = succeeded(lab.work, "snapper_cache", dict(values, state="absent"))
            assert removed["changed"]
        assert not os.path.lexists(os.path.join(values["base_dir"], ".rootfs_cache"))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(lab.victim_holder, "info.xml"))


# --- .backup_meta and the module's own files -----------------------------------

@pytest.mark.parametrize("state", ["present", "absent"])
def test_backup_meta_directory_is_refused(lab, watched, request, state):
    values = lab.cache("meta-dir-" + state, config_name(request), versioning="btrfs")
    meta = os.path.join(values["base_dir"], ".backup_meta")
    os.unlink(meta)
    write(os.path.join(meta, "inside.txt"), "a directory where the metadata file goes\n")
    change(lab.source, "a change for the meta dir " + state)
    with watched(values["base_dir"]):
        refused(lab.work, "snapper_cache", dict(values, state=state),
                r"\.backup_meta is a directory, where the cache keeps its metadata file; move it away",
                values["base_dir"])
        refused(lab.work, "snapper_cache_info", {"base_dir": values["base_dir"]}, r"\.backup_meta is a directory",
                values["base_dir"], modes=(False,))
    shutil.rmtree(meta)


@pytest.mark.parametrize("name", [".backup_meta", ".liveclone-pending", ".liveclone.lock"])
def test_own_file_link_is_replaced_then_removed_as_a_link(lab, watched, request, name):
    values = lab.cache("own-link" + name, config_name(request), versioning="btrfs")
    path = os.path.join(values["base_dir"], name)

    def plant_own():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        plant(path, lab.canary.path("data/etc/hostname"))

    plant_own()
    change(lab.source, "a change for " + name)
    with watched():
        result = succeeded(lab.work, "snapper_cache", values)
        assert result["changed"]
        assert not os.path.islink(path), "%s is still the planted link" % name
        if name == ".backup_meta":
            assert result["metadata"]["META_SNAPSHOT"] == result["snapshot_created"]["name"]
        plant_own()
        removed = succeeded(lab.work, "snapper_cache", dict(values, state="absent"))
        assert removed["changed"] and "delete %s" % path in removed["operations"]
    assert not os.path.lexists(path)


# --- sources that hold links ---------------------------------------------------

def test_source_links_are_copied_as_links(lab, watched, request):
    source = os.path.join(lab.work, "linked-source")
    write(os.path.join(source, "etc/os-release"), "ID=linked\n")
    os.makedirs(os.path.join(source, "var"))
    links = {"home": lab.canary.path("data/home"), "var/log": lab.canary.path("data/log"),
             "etc/ssh": lab.canary.path("data/ssh"), "etc/hostname": lab.canary.path("data/etc/hostname")}
    for relative, target in links.items():
        plant(os.path.join(source, relative), target)
    base = lab.base("linked-source")
    params = {"base_dir": base, "source": source, "snapper_config": config_name(request), "include_home": True}
    lab.caches.append(params)
    dest = os.path.join(lab.work, "linked-restore")
    with watched():
        result = succeeded(lab.work, "snapper_cache", params)
        snapshot = result["snapshot_created"]["path"]
        for relative, target in links.items():
            assert os.readlink(os.path.join(base, ".rootfs_cache", relative)) == target
            assert os.readlink(os.path.join(snapshot, relative)) == target
        succeeded(lab.work, "snapper_cache", dict(params, state="restored", restore_dest=dest))
        for relative, target in links.items():
            assert os.readlink(os.path.join(dest, relative)) == target
        succeeded(lab.work, "snapper_cache", dict(params, state="absent"))
    assert not os.path.lexists(os.path.join(base, ".rootfs_cache"))


# --- restore destinations ------------------------------------------------------

def restore_params(lab, dest, **more):
    return dict(lab.ready, state="restored", restore_dest=dest, **more)


def test_restore_dest_link_is_refused(lab, watched):
    dest = plant(os.path.join(lab.work, "dest-link"), lab.canary.path("data/home"))
    with watched():
        refused(lab.work, "snapper_cache", restore_params(lab, dest, restore_delete_extra=True),
                r"restore_dest .* runs through the symlink .*give the real path", lab.work)


def test_restore_dest_through_a_link_is_refused(lab, watched):
    link = plant(os.path.join(lab.work, "dest-through"), lab.canary.path("data"))
    with watched():
        refused(lab.work, "snapper_cache", restore_params(lab, os.path.join(link, "home"), restore_delete_extra=True),
                r"restore_dest .* runs through the symlink .*dest-through", lab.work)


def test_restore_dest_that_is_a_file_is_refused(lab, watched):
    dest = os.path.join(lab.work, "dest-file")
    write(dest, "a file, not a directory\n")
    with watched():
        refused(lab.work, "snapper_cache", restore_params(lab, dest),
                r"restore_dest .*dest-file exists and is a file; move it away or give a directory", lab.work)


def test_restore_dest_that_holds_the_base_is_refused(lab, watched):
    with watched():
        refused(lab.work, "snapper_cache", restore_params(lab, lab.volume, restore_delete_extra=True),
                r"restore_dest .* holds base_dir .*the cache with it", lab.volume)


def extra_files(dest):
    write(os.path.join(dest, "extra/one.txt"), "extra 1\n")
    write(os.path.join(dest, "extra-two.txt"), "extra 2\n")
    write(os.path.join(dest, "srv/data/stray.txt"), "extra 3\n")


def test_restore_into_a_non_empty_directory_needs_restore_delete_extra(lab, watched):
    dest = os.path.join(lab.work, "dest-occupied")
    extra_files(dest)
    with watched():
        outcome = refused(lab.work, "snapper_cache", restore_params(lab, dest),
                          r"restore_dest .* is not empty: restoring snapshot \d+ there would delete 4 files that the "
                          r"snapshot lacks \(.*extra.*\)\. Set restore_delete_extra: true", dest)
        assert "extra-two.txt" in outcome.msg


def test_restore_delete_extra_lists_then_deletes(lab, watched):
    dest = os.path.join(lab.work, "dest-delete-extra")
    extra_files(dest)
    params = restore_params(lab, dest, restore_delete_extra=True)
    before = settled_state(dest)
    with watched():
        check = succeeded(lab.work, "snapper_cache", params, check=True)
        assert settled_state(dest) == before, "check mode changed restore_dest"
        assert check["transfer"]["files_deleted"] == 4
        assert sorted(check["transfer"]["deleted_paths"]) == sorted(
            ["extra-two.txt", "extra/", "extra/one.txt", "srv/data/stray.txt"])
        assert any(re.match(r"delete 4 files in .* that snapshot \d+ lacks", text) for text in check["operations"])
        done = succeeded(lab.work, "snapper_cache", params)
        assert done["transfer"]["files_deleted"] == 4
        assert any(re.match(r"deleted 4 files in .* that snapshot \d+ lacks", text) for text in done["operations"])
        assert tree_digest(dest) == tree_digest(done["restored"]["path"], skip={".snapshots"})
        again = succeeded(lab.work, "snapper_cache", restore_params(lab, dest))
        assert not again["changed"], again["operations"]


def test_restore_replaces_a_planted_link_in_the_destination(lab, watched):
    dest = os.path.join(lab.work, "dest-planted")
    os.makedirs(dest)
    plant(os.path.join(dest, "home"), lab.canary.path("data/home"))
    plant(os.path.join(dest, "srv"), lab.canary.path("data"))
    with watched():
        result = succeeded(lab.work, "snapper_cache", restore_params(lab, dest, restore_delete_extra=True))
    assert not os.path.islink(os.path.join(dest, "srv")) and os.path.isfile(os.path.join(dest, "srv/data/a.txt"))
    assert tree_digest(dest) == tree_digest(result["restored"]["path"], skip={".snapshots"})


# --- parse back what the modules write -----------------------------------------

HOSTILE_NAME = 'Evil" $(touch {pwned}) `touch {pwned}` a,b=c\rline\x0bfeed\x1b[2J\u2028sep\\'


def test_hostile_os_release_cannot_break_backup_meta_or_userdata(lab, watched, request):
    source = os.path.join(lab.work, "hostile-release")
    pwned = os.path.join(lab.work, "pwned")
    write(os.path.join(source, "etc/os-release"), 'NAME="%s"\nID=evil\nMETA_SIZE="0"\n'
          % HOSTILE_NAME.format(pwned=pwned).replace("\\", "\\\\").replace('"', '\\"'))
    os.makedirs(os.path.join(source, "lib/modules/6.1,extra=1 $(touch %s)\x1b" % pwned))
    base = lab.base("hostile-release")
    params = {"base_dir": base, "source": source, "snapper_config": config_name(request)}
    lab.caches.append(params)
    with watched():
        result = succeeded(lab.work, "snapper_cache", params)
    with open(os.path.join(base, ".backup_meta")) as handle:
        lines = handle.read().split("\n")
    assert lines[-1] == "" and len(lines) == 6, lines
    keys = [re.fullmatch(r'(META_[A-Z]+)="((?:[^"\\]|\\.)*)"', line).group(1) for line in lines[:-1]]
    assert keys == ["META_DATE", "META_DISTRO", "META_SIZE", "META_KERNEL", "META_SNAPSHOT"]
    sourced = subprocess.run(["bash", "-c", '. "$1" && printf "%s|%s|%s" "$META_DISTRO" "$META_KERNEL" "$META_SIZE"',
                              "-", os.path.join(base, ".backup_meta")], check=True, capture_output=True, text=True)
    distro, kernel, size = sourced.stdout.split("|")
    assert not os.path.exists(pwned), "a value of .backup_meta ran as shell code"
    assert distro.startswith('Evil" $(touch') and "\r" not in distro and "\x1b" not in distro
    assert kernel.startswith("6.1 extra 1 $(touch") and size == result["metadata"]["META_SIZE"]
    assert result["metadata"]["META_DISTRO"] == distro
    userdata = result["snapshot_created"]["userdata"]
    assert sorted(userdata) == ["distro", "kernel", "size_kb"], userdata
    assert "," not in userdata["distro"] and "=" not in userdata["distro"]
    assert userdata["kernel"] == kernel


def snapper_config_lines(name):
    with open(os.path.join("/etc/snapper/configs", name)) as handle:
        lines = [line for line in handle.read().split("\n") if line.strip() and not line.startswith("#")]
    return [re.fullmatch(r'([A-Z_]+)="([^"\\]*)"', line).groups() for line in lines]


def test_snapper_config_parses_back(lab, watched, request):
    base = lab.base("it's a base with spaces")
    name = config_name(request)
    params = {"base_dir": base, "source": lab.source, "snapper_config": name, "versioning": "snapper", "keep": 4}
    lab.caches.append(params)
    with watched():
        succeeded(lab.work, "snapper_cache", params)
    pairs = snapper_config_lines(name)
    keys = [key for key, _value in pairs]
    assert len(keys) == len(set(keys)), keys
    values = dict(pairs)
    assert [key for key in keys if key == "SUBVOLUME"] == ["SUBVOLUME"]
    assert values["SUBVOLUME"] == os.path.join(base, ".rootfs_cache")
    with open("/usr/share/snapper/config-templates/default") as handle:
        template = {line.split("=", 1)[0] for line in handle if re.match(r"[A-Z_]+=", line)}
    assert set(keys) == template, set(keys) ^ template
    assert (values["NUMBER_LIMIT"], values["NUMBER_LIMIT_IMPORTANT"], values["TIMELINE_CREATE"]) == ("4", "4", "no")
    with open("/etc/default/snapper") as handle:
        configs = re.search(r'^SNAPPER_CONFIGS="([^"\n]*)"$', handle.read(), re.M).group(1).split()
    assert configs.count(name) == 1


# --- read-only, immutable, full and inode-exhausted volumes ---------------------

@contextlib.contextmanager
def read_only(mount_point):
    run(["mount", "-o", "remount,ro", mount_point])
    try:
        yield
    finally:
        run(["mount", "-o", "remount,rw", mount_point])


@pytest.fixture(scope="module")
def small_volume(lab):
    """A second btrfs volume with its own cache (raw snapshots), to remount and fill."""
    with loop_filesystem(lab.work, "small", 256 * MIB, "btrfs") as volume:
        base = os.path.join(volume, "base")
        os.makedirs(base)
        params = {"base_dir": base, "source": lab.source, "versioning": "btrfs", "keep": 3}
        succeeded(lab.work, "snapper_cache", params)
        yield {"volume": volume, "base": base, "params": params}
        run_module(lab.work, "snapper_cache", dict(params, state="absent"))


@pytest.mark.parametrize("state", ["present", "absent"])
def test_read_only_base_is_refused_before_anything(lab, watched, small_volume, state):
    change(lab.source, "a change for read-only " + state)
    with watched(small_volume["volume"]), read_only(small_volume["volume"]):
        refused(lab.work, "snapper_cache", dict(small_volume["params"], state=state),
                r"base_dir .* is on a read-only filesystem; remount it read-write", small_volume["volume"])


def test_restore_from_a_read_only_base_works(lab, watched, small_volume):
    dest = os.path.join(lab.work, "restored-from-ro")
    with watched(small_volume["volume"]), read_only(small_volume["volume"]):
        result = succeeded(lab.work, "snapper_cache", dict(small_volume["params"], state="restored",
                                                           restore_dest=dest))
        assert tree_digest(dest) == tree_digest(result["restored"]["path"], skip={".snapshots"})


def test_restore_into_a_read_only_destination_is_refused(lab, watched, small_volume):
    dest = os.path.join(small_volume["volume"], "restore-here")
    os.makedirs(dest)
    params = dict(lab.ready, state="restored", restore_dest=dest)
    with watched(small_volume["volume"]), read_only(small_volume["volume"]):
        refused(lab.work, "snapper_cache", params, r"restore_dest .* is on a read-only filesystem",
                small_volume["volume"])
    os.rmdir(dest)


@contextlib.contextmanager
def immutable(path):
    run(["chattr", "+i", path])
    try:
        yield
    finally:
        run(["chattr", "-i", path])


@pytest.mark.parametrize(("target", "state"), [(".backup_meta", "present"), (".backup_meta", "absent"),
                                               ("", "present"), ("", "absent")])
def test_immutable_entry_of_the_base_is_refused_before_anything(lab, watched, small_volume, target, state):
    change(lab.source, "a change for immutable %s %s" % (target, state))
    path = os.path.join(small_volume["base"], target) if target else small_volume["base"]
    with watched(small_volume["volume"]), immutable(path):
        refused(lab.work, "snapper_cache", dict(small_volume["params"], state=state),
                r"is immutable or append-only .*chattr -i -a", small_volume["volume"])


def test_immutable_file_in_the_cache(lab, watched, small_volume):
    cached = os.path.join(small_volume["base"], ".rootfs_cache/etc/hostname")
    write(os.path.join(lab.source, "etc/hostname"), "changed\n")
    snapshots = os.path.join(small_volume["base"], ".rootfs_cache/.snapshots")
    kept = {name: tree_digest(os.path.join(snapshots, name), skip={".snapshots"})
            for name in os.listdir(snapshots) if not name.endswith(".meta")}
    with open(os.path.join(small_volume["base"], ".backup_meta")) as handle:
        meta = handle.read()
    try:
        with watched(), immutable(cached):
            # Check mode refuses before anything; a real run stops at the file, inside the cache only.
            refused(lab.work, "snapper_cache", small_volume["params"],
                    r"holds immutable or append-only entries that the copy would change .*etc/hostname.*chattr -i -a",
                    small_volume["base"], modes=(True,))
            refused(lab.work, "snapper_cache", small_volume["params"],
                    r"the copy failed, so no snapshot was taken .*immutable or append-only .*chattr -i -a",
                    snapshots, modes=(False,))
            now = {name: tree_digest(os.path.join(snapshots, name), skip={".snapshots"})
                   for name in os.listdir(snapshots) if not name.endswith(".meta")}
            assert now == kept
            with open(os.path.join(small_volume["base"], ".backup_meta")) as handle:
                assert handle.read() == meta
        with watched():
            after = succeeded(lab.work, "snapper_cache", small_volume["params"])
            assert after["changed"]
    finally:
        write(os.path.join(lab.source, "etc/hostname"), "hostile\n")


def fill(path, rng_name="fill"):
    """Fill the filesystem at path with one file, then small ones, until it is full."""
    filler = os.path.join(path, rng_name)
    with contextlib.suppress(OSError):
        subprocess.run(["fallocate", "-l", "%d" % (os.statvfs(path).f_bavail * os.statvfs(path).f_frsize), filler],
                       check=False, capture_output=True)
    with contextlib.suppress(OSError), open(filler + ".tail", "wb") as handle:
        while True:
            handle.write(b"\0" * MIB)
            handle.flush()
    return filler


def test_full_volume_is_refused_before_anything(lab, watched, small_volume):
    change(lab.source, "a change for the full volume")
    filler = fill(small_volume["volume"])
    try:
        with watched(small_volume["base"]):
            refused(lab.work, "snapper_cache", small_volume["params"],
                    r"base_dir .* is full .*free space on it .*Nothing was changed", small_volume["base"])
    finally:
        for path in (filler, filler + ".tail"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        run(["btrfs", "filesystem", "sync", small_volume["volume"]])


def test_inode_exhausted_ext4_is_refused_before_anything(lab, watched):
    with loop_filesystem(lab.work, "few-inodes", 16 * MIB, "ext4") as volume:
        base = os.path.join(volume, "base")
        os.makedirs(base)
        params = {"base_dir": base, "source": lab.source, "versioning": "none"}
        succeeded(lab.work, "snapper_cache", params)
        filler = os.path.join(volume, "inodes")
        os.makedirs(filler)
        with contextlib.suppress(OSError):
            for index in range(1 << 20):
                os.close(os.open(os.path.join(filler, str(index)), os.O_CREAT | os.O_WRONLY, 0o644))
        assert os.statvfs(volume).f_favail == 0
        change(lab.source, "a change for the inodes")
        with watched(base):
            refused(lab.work, "snapper_cache", params, r"base_dir .* has no free inodes left .*df -i", base)
        shutil.rmtree(filler)
        succeeded(lab.work, "snapper_cache", dict(params, state="absent"))


def test_mount_inside_a_plain_cache_is_never_deleted_through(lab, watched):
    with loop_filesystem(lab.work, "plain", 32 * MIB, "ext4") as volume:
        base = os.path.join(volume, "base")
        os.makedirs(base)
        params = {"base_dir": base, "source": lab.source, "versioning": "none"}
        succeeded(lab.work, "snapper_cache", params)
        inner = os.path.join(base, ".rootfs_cache/srv")
        run(["mount", "--bind", lab.canary.path("data"), inner])
        try:
            for state in ("absent", "present"):
                with watched(base):
                    refused(lab.work, "snapper_cache", dict(params, state=state),
                            r"has filesystems mounted inside .*unmount them", base)
        finally:
            run(["umount", inner])
        succeeded(lab.work, "snapper_cache", dict(params, state="absent"))


def module_options(module):
    """The options of a module: its DOCUMENTATION's and those of the
    collection's doc fragments it extends (liveclone.core._cache)."""
    plugins = os.path.join(os.path.dirname(os.path.dirname(HERE)), "plugins")
    with open(os.path.join(plugins, "modules/%s.py" % module)) as handle:
        documentation = yaml.safe_load(re.search(r'DOCUMENTATION = r"""(.*?)"""', handle.read(), re.S).group(1))
    options = dict(documentation.get("options") or {})
    for fragment in documentation.get("extends_documentation_fragment", []):
        name, _dot, section = fragment.removeprefix("liveclone.core.").partition(".")
        with open(os.path.join(plugins, "doc_fragments/%s.py" % name)) as handle:
            text = handle.read()
        found = re.search(r'%s = r"""(.*?)"""' % (section or "DOCUMENTATION"), text, re.S)
        options.update(yaml.safe_load(found.group(1)).get("options") or {})
    return options


@pytest.mark.parametrize("module", ["snapper_cache", "snapper_cache_info"])
def test_every_free_text_parameter_has_a_control_character_case(module):
    """Control characters in every string parameter: the table covers each one without choices."""
    free = {name for name, option in module_options(module).items()
            if option.get("type") in ("str", "path", "list") and "choices" not in option}
    covered = {name for _id, case_module, overrides, _pattern in TEXT_CASES if case_module == module
               for name, value in overrides.items()
               if re.search(r"[\x00-\x1f]", " ".join(value) if isinstance(value, list) else str(value))}
    assert free <= covered, "no control-character case for %s" % sorted(free - covered)
