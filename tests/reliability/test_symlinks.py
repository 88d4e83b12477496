"""Files the modules write, replaced by symlinks to a file elsewhere: the
link is replaced or refused, never followed into overwriting its target."""

from __future__ import annotations

import fcntl
import os
import random

import pytest
from conftest import file_sha256, loop_filesystem, make_small_tree
from module_run import run_module

PRECIOUS = "a file elsewhere that must not change\n"


def plant_link(path, victim):
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(victim, path)


def victim_file(work, name):
    path = os.path.join(work, name)
    with open(path, "w") as handle:
        handle.write(PRECIOUS)
    return path


def untouched(path):
    with open(path) as handle:
        return handle.read() == PRECIOUS


@pytest.fixture(scope="module")
def cache_lab(sandbox, rng_module):
    source = os.path.join(sandbox, "symlink-source")
    os.makedirs(os.path.join(source, "etc"))
    with open(os.path.join(source, "etc/os-release"), "w") as handle:
        handle.write("ID=debian\n")
    make_small_tree(source, 200, rng_module)
    with loop_filesystem(sandbox, "symlink-volume", 1 << 30, "btrfs") as base:
        params = {"base_dir": base, "source": source, "keep": 3, "snapper_config": "reliability-links",
                  "versioning": "snapper"}
        first = run_module(sandbox, "snapper_cache", params)
        assert not first.failed, first.msg
        yield {"base": base, "source": source, "params": params}
        run_module(sandbox, "snapper_cache", dict(params, state="absent"))


@pytest.fixture(scope="module")
def rng_module():
    return random.Random("symlinks")


@pytest.mark.parametrize("name", [".backup_meta", ".liveclone.lock", ".liveclone-pending"])
def test_backup_never_writes_through_a_planted_link(sandbox, cache_lab, name):
    victim = victim_file(sandbox, "victim-" + name.strip("."))
    link = os.path.join(cache_lab["base"], name)
    plant_link(link, victim)
    with open(os.path.join(cache_lab["source"], "etc/changed"), "w") as handle:
        handle.write(name)  # a change, so that the backup writes everything it writes
    outcome = run_module(sandbox, "snapper_cache", cache_lab["params"])
    assert not outcome.failed, outcome.msg
    assert outcome.result["changed"]
    assert untouched(victim), "%s was followed: %s changed" % (name, victim)
    assert not os.path.islink(link), "%s is still a link after the backup" % name
    if name == ".backup_meta":
        with open(link) as handle:
            assert "META_SNAPSHOT=" in handle.read()


def test_backup_refused_while_locked_shows_no_linked_content(sandbox, cache_lab):
    """A waiting run reports the lock holder; a link there must not leak a file's content."""
    victim = victim_file(sandbox, "victim-holder")
    plant_link(os.path.join(cache_lab["base"], ".liveclone.lock"), victim)
    holder = os.open(cache_lab["base"], os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        outcome = run_module(sandbox, "snapper_cache", dict(cache_lab["params"], lock_timeout=0))
    finally:
        os.close(holder)
    assert outcome.failed and "locked by another run" in outcome.msg
    assert "must not change" not in outcome.msg
    assert untouched(victim)
    os.unlink(os.path.join(cache_lab["base"], ".liveclone.lock"))


@pytest.fixture(scope="module")
def iso_lab(sandbox, debian_tree):
    iso_dir = os.path.join(sandbox, "symlink-iso")
    os.makedirs(iso_dir)
    return {"dest": os.path.join(iso_dir, "live.iso"), "source": "path", "source_path": debian_tree,
            "compression": "lz4", "hostname": "links"}


@pytest.mark.parametrize("suffix", ["", ".sha256", ".manifest.json"])
def test_iso_build_never_writes_through_a_planted_link(sandbox, iso_lab, suffix):
    victim = victim_file(sandbox, "victim-iso" + suffix)
    link = iso_lab["dest"] + suffix
    plant_link(link, victim)
    # A new hostname each time: a rebuild, which writes the ISO, its checksum and manifest.
    outcome = run_module(sandbox, "live_iso", dict(iso_lab, hostname="links" + suffix.replace(".", "-")))
    assert not outcome.failed, outcome.msg
    assert untouched(victim), "dest%s was followed: %s changed" % (suffix, victim)
    assert not os.path.islink(link)
    assert file_sha256(iso_lab["dest"]) == outcome.result["sha256"]
