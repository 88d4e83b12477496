"""live_iso tried as a hostile or careless user would: values that would land
unquoted in grub.cfg, passwd, shadow or hostname, `//` and `..` paths, a
destination that cannot take the build, and a source tree with symlinks
planted where the image's clean-up acts (home, root, var/log, etc/ssh ...),
each pointing into the canary. Every case runs in hostile_case: the canary
(and any watched tree) must be unchanged, and each case asserts the refusal
message and that nothing changed where it refused, or the correct result,
parsed back from the built ISO."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import hostile_case, loop_filesystem, run, state_of
from module_run import run_module, timed

LINK_SOURCE_EXCLUDES = ["/usr/lib/modules/*"]  # not needed to build; halves the build time


# --- a small source tree that passes every check before the copy --------------

def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


@pytest.fixture(scope="module")
def lab(sandbox):
    """{w}: src/ (a tiny Debian-like tree that passes the checks made before
    the copy), iso/ (the destination directory), work/, and via -> elsewhere."""
    work = os.path.join(sandbox, "hostile-live-iso")
    status = "".join("Package: %s\nStatus: install ok installed\n\n" % name
                     for name in ("live-boot", "live-config", "live-config-systemd"))
    for relative, text in (("src/etc/os-release", "ID=debian\n"),
                           ("src/etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
                           ("src/boot/vmlinuz-6.1.0-1-amd64", "not a kernel\n"),
                           ("src/boot/initrd.img-6.1.0-1-amd64", "not an initrd\n"),
                           ("src/var/lib/dpkg/status", status)):
        write(os.path.join(work, relative), text)
    for name in ("iso", "work", "elsewhere"):
        os.makedirs(os.path.join(work, name))
    os.symlink(os.path.join(work, "elsewhere"), os.path.join(work, "via"))
    return work


BASE = {"dest": "{w}/iso/live.iso", "source": "path", "source_path": "{w}/src", "compression": "lz4"}
GRUB_ENTRY = 'x"\nmenuentry "evil" {\n  linux /live/vmlinuz init=/bin/sh\n}\n'

# (parameters over BASE, the parameter the message must name, what it must say to do).
PARAM_CASES = [
    # a trailing newline, an embedded one, a quote and a newline, in every string parameter
    ({"label": "LIVE\n"}, "label", r"ASCII letters"),
    ({"label": "LI\nVE"}, "label", r"ASCII letters"),
    ({"label": GRUB_ENTRY}, "label", r"ASCII letters"),
    ({"hostname": "lc\n"}, "hostname", r"letters, digits"),
    ({"hostname": "l\nc"}, "hostname", r"letters, digits"),
    ({"hostname": 'lc"\nboot=local'}, "hostname", r"letters, digits"),
    ({"live_user": "live\n"}, "live_user", r"lower-case letters"),
    ({"live_user": "toor::0:0::/root:/bin/sh\nlive"}, "live_user", r"lower-case letters"),
    ({"live_user": 'live"\nx'}, "live_user", r"lower-case letters"),
    ({"keep_users": ["bob\n"]}, "keep_users", r"lower-case letters"),
    ({"keep_users": ["bob", "a\nroot::0:0::/:/bin/sh"]}, "keep_users", r"lower-case letters"),
    ({"live_password": "hostile-secret\n"}, "live_password", r"control character.*remove it"),
    ({"live_password": "hostile\nroot::0:0::/root:/bin/sh"}, "live_password", r"control character.*remove it"),
    ({"root_password": 'hostile"\nsecret'}, "root_password", r"control character.*remove it"),
    ({"boot_params": ["quiet\n"]}, "boot_params", r"its own item"),
    ({"boot_params": ["ok=1", "a\nb"]}, "boot_params", r"its own item"),
    ({"boot_params": [GRUB_ENTRY]}, "boot_params", r"its own item"),
    ({"boot_params": ['quiet}\nmenuentry "evil" {']}, "boot_params", r"its own item"),
    ({"boot_params": ["a b"]}, "boot_params", r"its own item"),
    ({"boot_params": ["$(reboot)"]}, "boot_params", r"its own item"),
    ({"snapper_config": "cfg\n"}, "snapper_config", r"letters, digits"),
    ({"snapper_config": "c\nfg"}, "snapper_config", r"letters, digits"),
    ({"snapper_config": '"cfg"\nx'}, "snapper_config", r"letters, digits"),
    ({"snapshot": "latest\n"}, "snapshot", r"give latest, a snapshot number"),
    ({"snapshot": "1\n2"}, "snapshot", r"give latest, a snapshot number"),
    ({"snapshot": '@2024-01-01_10:00"\n'}, "snapshot", r"give latest, a snapshot number"),
    ({"exclude": ["/srv/*\n"]}, "exclude", r"control character.*remove it"),
    ({"exclude": ["/srv\n/home"]}, "exclude", r"control character.*remove it"),
    ({"dest": "{w}/iso/live.iso\n"}, "dest", r"control character"),
    ({"dest": "{w}/iso/li\nve.iso"}, "dest", r"control character"),
    ({"source_path": "{w}/src\n"}, "source_path", r"control character"),
    ({"source_path": '{w}/s"\nrc'}, "source_path", r"control character"),
    ({"work_dir": "{w}/work\n"}, "work_dir", r"control character"),
    ({"cache_dir": "{w}/cache\n", "source": "cache"}, "cache_dir", r"control character"),
    ({"compression": "lz4\n"}, "compression", r"must be one of"),
    # labels by bytes and characters
    ({"label": "LIVÉ"}, "label", r"ASCII letters"),
    ({"label": "É" * 16}, "label", r"ASCII letters"),
    ({"label": "L" * 33}, "label", r"32 bytes.*shorten it"),
    ({"label": "LIVE ISO"}, "label", r"ASCII letters"),
    # names with '..'
    ({"label": "x/../../esc"}, "label", r"ASCII letters"),
    ({"live_user": "../../victim"}, "live_user", r"lower-case letters"),
    ({"live_user": "../../../../victim"}, "live_user", r"lower-case letters"),
    ({"keep_users": [".."]}, "keep_users", r"lower-case letters"),
    ({"hostname": ".."}, "hostname", r"letters, digits"),
    ({"snapper_config": "../etc"}, "snapper_config", r"letters, digits"),
    ({"snapshot": "../1"}, "snapshot", r"give latest, a snapshot number"),
    ({"source_path": "{w}/iso/.liveclone-iso-work-x/rootfs"}, "source_path", r"choose a path elsewhere"),
    # compression levels out of range, refused before the copy
    ({"compression": "zstd", "compression_level": 99}, "compression_level", r"from 1 to 22"),
    ({"compression": "zstd", "compression_level": 0}, "compression_level", r"from 1 to 22"),
    ({"compression": "gzip", "compression_level": 0}, "compression_level", r"from 1 to 9"),
    ({"compression": "gzip", "compression_level": 10}, "compression_level", r"from 1 to 9"),
    ({"compression": "xz", "compression_level": 5}, "compression_level", r"leave it unset"),
    # the live user the source keeps
    ({"live_user": "root"}, "live_user", r"choose another name"),
]


def expand(value, work):
    if isinstance(value, str):
        return value.replace("{w}", work)
    if isinstance(value, list):
        return [expand(item, work) for item in value]
    return value


def refused_twice(sandbox, params, parameter, fix, root=None):
    """Run in check mode, then for real: both refuse, naming parameter and saying what to do."""
    for check in (True, False):
        outcome = run_module(sandbox, "live_iso", params, check=check, root=root)
        assert outcome.result is not None, "no result: %s" % outcome.output[-2000:]
        assert outcome.failed, "accepted%s: %s" % (
            " in check mode" if check else "", outcome.result.get("operations"))
        assert re.search(r"\b%s\b" % re.escape(parameter), outcome.msg), (
            "the message does not name %s: %s" % (parameter, outcome.msg))
        assert re.search(fix, outcome.msg, re.S), "the message does not say what to do (%s): %s" % (
            fix, outcome.msg)
        assert "Traceback" not in outcome.output


@pytest.mark.parametrize(("overrides", "parameter", "fix"), PARAM_CASES,
                         ids=["%s-%d" % (case[1], index) for index, case in enumerate(PARAM_CASES)])
def test_a_hostile_value_is_refused_before_anything_is_written(sandbox, canary, lab, overrides, parameter, fix):
    params = {key: expand(value, lab) for key, value in dict(BASE, **overrides).items()}
    before = state_of(lab)
    with hostile_case(canary):
        refused_twice(sandbox, params, parameter, fix)
        assert state_of(lab) == before, "the refused run changed files"


# `/` and `//` forms, run chrooted in a throwaway root where `/` is a scratch directory.
ROOT_CASES = [
    ({"dest": "//"}, "dest", r"give the ISO's file name"),
    ({"dest": "/"}, "dest", r"give the ISO's file name"),
    ({"dest": "//live.iso"}, "dest", r"choose a directory for ISOs"),
    ({"dest": "/./tmp/../live.iso"}, "dest", r"choose a directory for ISOs"),
    ({"source_path": "//"}, "source_path", r"use source: live"),
    ({"source_path": "/"}, "source_path", r"use source: live"),
    ({"source_path": "//usr/.."}, "source_path", r"use source: live"),
    ({"work_dir": "//"}, "work_dir", r"such as /var/tmp"),
    ({"work_dir": "/."}, "work_dir", r"such as /var/tmp"),
    ({"source": "cache", "cache_dir": "//"}, "cache_dir", r"give the base_dir"),
    ({"source": "cache", "cache_dir": "/"}, "cache_dir", r"give the base_dir"),
]


@pytest.mark.parametrize(("overrides", "parameter", "fix"), ROOT_CASES,
                         ids=["%s-%s" % (case[1], case[0][case[1]]) for case in ROOT_CASES])
def test_root_forms_are_refused_in_a_throwaway_root(sandbox, canary, throwaway_root, overrides, parameter, fix):
    params = dict({"dest": "/tmp/live.iso", "source": "path", "source_path": "/usr", "compression": "lz4"},
                  **overrides)
    with hostile_case(canary, throwaway_root):
        refused_twice(sandbox, params, parameter, fix, root=throwaway_root)


# Forms that are their canonical path: accepted, and used in that form.
CANONICAL_CASES = [
    ("{w}/iso//./sub/../live.iso", "{w}/iso/live.iso"),
    ("{w}/via/../iso/live.iso", "{w}/iso/live.iso"),  # via -> elsewhere: the kernel would go elsewhere/..
    ("{w}//iso/live.iso", "{w}/iso/live.iso"),
]


@pytest.mark.parametrize(("dest", "canonical"), CANONICAL_CASES)
def test_a_path_behaves_as_its_canonical_form(sandbox, canary, lab, dest, canonical):
    params = {key: expand(value, lab) for key, value in dict(BASE, dest=dest, work_dir="{w}/work/./").items()}
    before = state_of(lab)
    with hostile_case(canary):
        outcome = run_module(sandbox, "live_iso", params, check=True)
        assert not outcome.failed, outcome.msg
        assert outcome.result["path"] == expand(canonical, lab)
        # Check mode returns the plan a real run carries out, ending with the build itself.
        operations = outcome.result["operations"]
        assert operations[-1] == "built %s from path %s" % (expand(canonical, lab), expand("{w}/src", lab))
        assert any(text.startswith("removed from the copy what the image leaves out (") for text in operations)
        assert state_of(lab) == before, "check mode changed files"


# --- destinations that cannot take the build: refused before the copy ---------

@contextlib.contextmanager
def inode_starved_filesystem(work, name):
    """An ext4 with room but without free inodes, mounted at work/NAME."""
    image, point = os.path.join(work, name + ".img"), os.path.join(work, name)
    with open(image, "wb") as handle:
        handle.truncate(64 << 20)
    run(["mkfs.ext4", "-q", "-F", "-N", "64", image])
    os.makedirs(point)
    run(["mount", "-o", "loop", image, point])
    try:
        os.makedirs(os.path.join(point, "iso"))
        with contextlib.suppress(OSError):
            for index in range(10000):
                open(os.path.join(point, "fill-%d" % index), "w").close()
        yield point
    finally:
        subprocess.run(["umount", point], check=False)
        os.rmdir(point)
        os.unlink(image)


@contextlib.contextmanager
def unwritable(work, kind):
    """The directory for dest (and dest itself, for 'immutable file') in a state that takes no build."""
    if kind == "full":
        with loop_filesystem(work, "full", 16 << 20, "ext4") as point:
            os.makedirs(os.path.join(point, "iso"))
            yield os.path.join(point, "iso"), point
        return
    if kind == "out of inodes":
        with inode_starved_filesystem(work, "inodes") as point:
            yield os.path.join(point, "iso"), point
        return
    directory = os.path.join(work, kind.replace(" ", "-"))
    os.makedirs(directory)
    if kind == "read-only":
        run(["mount", "--bind", directory, directory])
        run(["mount", "-o", "remount,bind,ro", directory])
    elif kind == "immutable dir":
        run(["chattr", "+i", directory])
    else:
        write(os.path.join(directory, "live.iso"), "an earlier ISO\n")
        run(["chattr", "+i", os.path.join(directory, "live.iso")])
    try:
        yield directory, directory
    finally:
        if kind == "read-only":
            run(["umount", directory])
        elif kind == "immutable dir":
            run(["chattr", "-i", directory])
        else:
            run(["chattr", "-i", os.path.join(directory, "live.iso")])
        shutil.rmtree(directory)


DEST_CASES = [
    ("read-only", r"read-only filesystem; remount it read-write"),
    ("immutable dir", r"immutable .*chattr -i"),
    ("immutable file", r"immutable .*chattr -i"),
    ("full", r"not enough free space for the ISO in .*choose a dest on a larger filesystem"),
    ("out of inodes", r"out of inodes"),
]


@pytest.mark.parametrize(("kind", "fix"), DEST_CASES, ids=[case[0] for case in DEST_CASES])
def test_a_destination_that_cannot_take_the_build_is_refused_first(sandbox, canary, lab, kind, fix):
    with unwritable(os.path.join(lab, "work"), kind) as (directory, watched):
        wanted = dict(BASE, dest=os.path.join(directory, "live.iso"), work_dir="{w}/work")
        params = {key: expand(value, lab) for key, value in wanted.items()}
        before, work_before = state_of(watched), os.listdir(os.path.join(lab, "work"))
        with hostile_case(canary):
            for check in (True, False):
                outcome = run_module(sandbox, "live_iso", params, check=check)
                assert outcome.failed and outcome.result is not None, outcome.output[-2000:]
                assert re.search(fix, outcome.msg), outcome.msg
                assert "Nothing was changed" in outcome.msg and "Traceback" not in outcome.output
            assert state_of(watched) == before
            assert os.listdir(os.path.join(lab, "work")) == work_before, "a work tree was started"


# --- a source with planted links: an overlay over the cached Debian tree -------

@contextlib.contextmanager
def overlay(base, name, lower):
    """A writable view of lower (which is never written: changes go to upper/)."""
    top = os.path.join(base, name)
    upper, workdir, merged = (os.path.join(top, part) for part in ("upper", "work", "merged"))
    for path in (upper, workdir, merged):
        os.makedirs(path)
    run(["mount", "-t", "overlay", "overlay", "-o",
         "lowerdir=%s,upperdir=%s,workdir=%s" % (lower, upper, workdir), merged])
    try:
        yield merged
    finally:
        subprocess.run(["umount", merged], check=False)
        shutil.rmtree(top)


def lower_state(tree):
    """Names, kinds, sizes and times of the cached tree: what an overlay must never change."""
    return state_of(tree)["entries"]


def plant(merged, relative, target):
    path = os.path.join(merged, relative)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(target, path)


def add_users(merged):
    """alice (to be removed) and bob (kept with keep_users)."""
    for name, text in (("etc/passwd", "alice:x:1000:1000::/home/alice:/bin/bash\n"
                                      "bob:x:1001:1001::/home/bob:/bin/bash\n"),
                       ("etc/shadow", "alice:!:19000:0:99999:7:::\nbob:!:19000:0:99999:7:::\n"),
                       ("etc/group", "alice:x:1000:\nbob:x:1001:\n"),
                       ("etc/gshadow", "alice:!::\nbob:!::\n")):
        with open(os.path.join(merged, name), "a") as handle:
            handle.write(text)


class Image:
    """What a built ISO holds, read back with xorriso and unsquashfs."""

    def __init__(self, iso, work):
        os.makedirs(work)
        self.grub = self._extract(iso, "/boot/grub/grub.cfg", os.path.join(work, "grub.cfg"))
        squashfs = os.path.join(work, "filesystem.squashfs")
        run(["xorriso", "-osirrox", "on", "-indev", iso, "-extract", "/live/filesystem.squashfs", squashfs])
        self.volume_id = re.search(r"^Volume Id\s*:\s*(\S+)", run(["xorriso", "-indev", iso, "-pvd_info"]).stdout,
                                   re.M).group(1)
        self.entries = {}
        for line in run(["unsquashfs", "-lln", squashfs]).stdout.splitlines():
            match = re.match(r"^(\S)(\S{9}) (\d+)/(\d+) .*? \d{4}-\d\d-\d\d \d\d:\d\d squashfs-root(/.*)?$", line)
            if match:
                path, _sep, target = (match.group(5) or "/").partition(" -> ")
                self.entries[path.lstrip("/")] = (match.group(1), match.group(2), int(match.group(3)),
                                                  target or None)
        self.texts = {}
        for name in ("etc/passwd", "etc/shadow", "etc/group", "etc/hostname", "etc/hosts", "etc/machine-id"):
            self.texts[name] = run(["unsquashfs", "-cat", squashfs, name]).stdout
        os.unlink(squashfs)

    @staticmethod
    def _extract(iso, inner, out):
        run(["xorriso", "-osirrox", "on", "-indev", iso, "-extract", inner, out])
        with open(out) as handle:
            return handle.read()

    def kind(self, path):
        return self.entries.get(path, ("missing",))[0]

    def children(self, path):
        prefix = path + "/"
        return sorted(name[len(prefix):] for name in self.entries
                      if name.startswith(prefix) and "/" not in name[len(prefix):])

    def lines(self, name):
        return [line for line in self.texts[name].splitlines() if line]


# Links planted in the first build's source, each into the canary, and what the
# image must hold there instead of what the link pointed to.
PLANTED = {
    "home": ("data/home", lambda image: image.kind("home") == "d" and image.children("home") == ["live-1"]),
    "root": ("data/home/alice", lambda image: image.kind("root") == "d" and image.children("root") == []
             and image.entries["root"][1] == "rwx------"),
    "var/log": ("data/log", lambda image: image.kind("var/log") == "d" and image.children("var/log") == []),
    "var/tmp": ("data/home", lambda image: image.kind("var/tmp") == "d" and image.children("var/tmp") == []
                and image.entries["var/tmp"][1] == "rwxrwxrwt"),
    "tmp": ("data", lambda image: image.kind("tmp") == "d" and image.children("tmp") == []
            and image.entries["tmp"][1] == "rwxrwxrwt"),
    "var/cache/apt/archives": ("data/home/alice", lambda image: image.kind("var/cache/apt/archives") == "d"
                               and image.children("var/cache/apt/archives") == []),
    "etc/ssh": ("data/ssh", lambda image: image.kind("etc/ssh") == "d" and image.children("etc/ssh") == []),
    "etc/NetworkManager/system-connections": (
        "data/ssh", lambda image: image.kind("etc/NetworkManager/system-connections") == "d"
        and image.children("etc/NetworkManager/system-connections") == []),
    "etc/skel": ("data/home/alice", lambda image: image.kind("etc/skel") == "l"
                 and image.children("home/live-1") == []),
    "etc/hostname": ("data/etc/hostname", lambda image: image.kind("etc/hostname") == "-"
                     and image.lines("etc/hostname") == [HOSTNAME]),
    "etc/hosts": ("data/file.txt", lambda image: image.kind("etc/hosts") == "-"
                  and "127.0.1.1\t%s" % HOSTNAME in image.lines("etc/hosts")),
    "etc/machine-id": ("data/file.txt", lambda image: image.kind("etc/machine-id") == "-"
                       and image.texts["etc/machine-id"] == ""),
    "var/lib/dbus/machine-id": ("data/file.txt", lambda image: image.kind("var/lib/dbus/machine-id") == "missing"),
    "etc/crypttab": ("data/etc/passwd", lambda image: image.kind("etc/crypttab") == "missing"),
}
HOSTNAME = "hostile-" + "x" * 53 + "-1"  # 63 characters, the most a host name holds
LABEL = "HOSTILE_LABEL_OF_32_BYTES_0123.4"
BOOT_PARAMS = ["ipv6.disable=1", "loglevel=3", "net.ifnames=0", "init_on_free=1", "rd.emergency=poweroff"]
LIVE_USER = "live-1"


@pytest.fixture(scope="module")
def linked_build(sandbox, canary, debian_tree):
    """One real build from a source whose clean-up paths are links into the
    canary, with hostile but valid values; the ISO read back."""
    base = os.path.join(sandbox, "hostile-iso-build")
    lower_before = lower_state(debian_tree)
    with overlay(base, "source", debian_tree) as merged:
        with open(os.path.join(merged, "etc/passwd")) as handle:
            system_accounts = [line.split(":")[0] for line in handle if line.strip()]
        add_users(merged)
        os.makedirs(os.path.join(merged, "etc/NetworkManager"))
        for relative, (target, _check) in PLANTED.items():
            plant(merged, relative, canary.path(target))
        dest_dir = os.path.join(base, "iso")
        os.makedirs(os.path.join(dest_dir, "work"))
        # Left as if by a killed build, but links into the canary: removed, never followed.
        os.symlink(canary.path("data/home"), os.path.join(dest_dir, "work/.liveclone-iso-work-planted"))
        os.symlink(canary.path("data/file.txt"), os.path.join(dest_dir, ".live.iso.tmp-planted"))
        os.symlink(canary.path("data"), os.path.join(base, "via"))
        params = {"dest": os.path.join(base, "via/../iso/live.iso"), "source": "path", "source_path": merged,
                  "compression": "lz4", "label": LABEL, "hostname": HOSTNAME, "boot_params": BOOT_PARAMS,
                  "live_user": LIVE_USER, "live_password": "p:w\"x'$(id)}{;|&<>#`\\",
                  "root_password": "root pw: with spaces", "keep_users": ["bob"],
                  "exclude": LINK_SOURCE_EXCLUDES, "work_dir": dest_dir + "/work/./"}
        with hostile_case(canary):
            outcome = run_module(sandbox, "live_iso", params)
            assert not outcome.failed, outcome.msg
        assert lower_state(debian_tree) == lower_before, "the overlay's lower tree changed"
        iso = os.path.join(dest_dir, "live.iso")
        yield {"outcome": outcome, "image": Image(iso, os.path.join(base, "read-back")), "dest_dir": dest_dir,
               "system_accounts": system_accounts, "merged": merged, "params": params}


@pytest.mark.parametrize("planted", list(PLANTED))
def test_a_planted_link_is_replaced_never_followed(canary, linked_build, planted):
    with hostile_case(canary):
        image = linked_build["image"]
        assert PLANTED[planted][1](image), "%s in the image: %s, holding %s" % (
            planted, image.entries.get(planted), image.children(planted))
        if planted != "etc/skel":  # etc/skel is not changed: a link there stays data, and is not followed
            assert any(planted in operation for operation in linked_build["outcome"].result["operations"]) or (
                planted in ("var/lib/dbus/machine-id", "etc/crypttab", "etc/hostname", "etc/hosts",
                            "etc/machine-id")), linked_build["outcome"].result["operations"]


def test_planted_leftovers_beside_dest_are_removed_not_followed(canary, linked_build):
    with hostile_case(canary):
        left = sorted(os.listdir(linked_build["dest_dir"]))
        assert left == ["live.iso", "live.iso.manifest.json", "live.iso.sha256", "work"], left
        assert os.listdir(os.path.join(linked_build["dest_dir"], "work")) == []
        assert linked_build["outcome"].result["path"] == os.path.join(linked_build["dest_dir"], "live.iso")


def test_grub_cfg_holds_exactly_the_intended_entries(canary, linked_build):
    with hostile_case(canary):
        lines = linked_build["image"].grub.splitlines()
        titles = [line for line in lines if line.lstrip().startswith("menuentry")]
        assert titles == ['menuentry "%s (%s)" {' % (title, LABEL) for title in (
            "Live system", "Live system with persistence", "Live system (safe graphics)",
            "Live system (text mode)")]
        kernels = [line for line in lines if line.lstrip().startswith("linux ")]
        assert len(kernels) == len(titles)
        for line in kernels:
            words = line.split()
            for param in BOOT_PARAMS + ["hostname=%s" % HOSTNAME, "username=%s" % LIVE_USER,
                                        "live-config.nocomponents=user-setup"]:
                assert words.count(param) == 1, (param, line)
        for param in BOOT_PARAMS:
            assert linked_build["image"].grub.count(param) == len(kernels)
        assert sum(line.strip() == "}" for line in lines) == len(titles)
        assert linked_build["image"].volume_id == LABEL


def test_passwd_and_shadow_hold_one_line_per_intended_account(canary, linked_build):
    with hostile_case(canary):
        image = linked_build["image"]
        passwd = [line.split(":") for line in image.lines("etc/passwd")]
        intended = linked_build["system_accounts"] + ["bob", LIVE_USER]
        assert [fields[0] for fields in passwd] == intended
        assert all(len(fields) == 7 for fields in passwd)
        assert [fields[0] for fields in passwd if fields[2] == "0"] == ["root"]
        assert passwd[-1] == [LIVE_USER, "x", "1000", "1000", LIVE_USER, "/home/" + LIVE_USER, "/bin/bash"]
        shadow = {line.split(":")[0]: line.split(":") for line in image.lines("etc/shadow")}
        assert sorted(shadow) == sorted(intended) and len(image.lines("etc/shadow")) == len(intended)
        assert all(len(fields) == 9 for fields in shadow.values())
        assert shadow["root"][1].startswith("$6$") and shadow[LIVE_USER][1].startswith("$6$")
        groups = {line.split(":")[0]: line.split(":") for line in image.lines("etc/group")}
        assert "alice" not in groups and LIVE_USER in groups["sudo"][3].split(",")
        assert image.lines("etc/hostname") == [HOSTNAME]


# --- links the build refuses, before anything is written ----------------------

REFUSED_LINKS = [
    ("boot/vmlinuz-99.0.0-hostile", "data/file.txt", r"boot/vmlinuz-99.0.0-hostile in the source is a symlink "
                                                     r"to .*put the file itself there"),
    ("boot/initrd.img-{version}", "data/file.txt", r"boot/initrd.img-\S+ in the source is a symlink"),
    ("etc/passwd", "data/etc/passwd", r"etc/passwd in the source is a symlink"),
    ("etc", "data/etc", r"has a symlink for etc .*make it one in the source"),
]


@pytest.mark.parametrize(("relative", "target", "message"), REFUSED_LINKS, ids=[case[0] for case in REFUSED_LINKS])
def test_a_link_out_of_the_tree_where_the_image_reads_is_refused(
        sandbox, canary, debian_tree, relative, target, message):
    base = os.path.join(sandbox, "hostile-iso-refused")
    with overlay(base, "source", debian_tree) as merged:
        version = sorted(name[len("vmlinuz-"):] for name in os.listdir(os.path.join(merged, "boot"))
                         if name.startswith("vmlinuz-"))[-1]
        plant(merged, relative.format(version=version), canary.path(target))
        dest_dir = os.path.join(base, "iso")
        os.makedirs(dest_dir)
        params = {"dest": os.path.join(dest_dir, "live.iso"), "source": "path", "source_path": merged,
                  "compression": "lz4"}
        with hostile_case(canary):
            for check in (True, False):
                outcome = run_module(sandbox, "live_iso", params, check=check)
                assert outcome.failed and outcome.result is not None, outcome.output[-2000:]
                assert re.search(message, outcome.msg), outcome.msg
                assert "Traceback" not in outcome.output
            assert os.listdir(dest_dir) == []
        shutil.rmtree(dest_dir)


# --- files the build parses, truncated or huge: not signed, or refused by name --

# 68 bytes: an MZ header pointing at a PE signature, and nothing after it.
TRUNCATED_PE = b"MZ" + b"\0" * 0x3A + struct.pack("<I", 0x40) + b"PE\0\0"
SPARSE_SIZE = 2 << 30
# The peak memory of a run that refuses a 2 GiB kernel: it is never read whole.
REFUSAL_RSS_KIB = 256 << 10


def replace_file(merged, relative, content):
    """Put content (bytes, or the size of a sparse file) at relative, a link there removed first."""
    path = os.path.join(merged, relative)
    if os.path.lexists(path):
        os.unlink(path)
    with open(path, "wb") as handle:
        if isinstance(content, int):
            handle.truncate(content)
        else:
            handle.write(content)


def test_a_truncated_kernel_is_reported_unsigned(sandbox, canary, lab):
    source = os.path.join(lab, "src-truncated-kernel")
    shutil.copytree(os.path.join(lab, "src"), source, symlinks=True)
    try:
        replace_file(source, "boot/vmlinuz-6.1.0-1-amd64", TRUNCATED_PE)
        params = {key: expand(value, lab) for key, value in dict(BASE, source_path=source).items()}
        before = state_of(lab)
        with hostile_case(canary):
            outcome = run_module(sandbox, "live_iso", params, check=True)
            assert not outcome.failed, outcome.msg
            assert "Traceback" not in outcome.output
            # (plain strings, or ansible-core's warning summaries holding them)
            warnings = [str(item) for item in outcome.result.get("warnings", [])]
            assert any("/boot/vmlinuz-6.1.0-1-amd64 carries no signature" in text for text in warnings), warnings
            assert state_of(lab) == before, "check mode changed files"
    finally:
        shutil.rmtree(source)


# (the file replaced in the source, its bytes or the size of a sparse file, secure_boot, what the message says)
DAMAGED_PE = [
    ("boot/vmlinuz-{version}", TRUNCATED_PE, "required",
     r"secure_boot is required, but the source's kernel /boot/vmlinuz-\S+ carries no signature"),
    ("usr/lib/shim/shimx64.efi.signed", TRUNCATED_PE, "auto",
     r"/usr/lib/shim/shimx64.efi.signed, a piece of the signed chain, is not a PE image \(truncated"),
    ("boot/vmlinuz-{version}", SPARSE_SIZE, "auto",
     r"/boot/vmlinuz-\S+ in the source is 2.00 GB, more than the 64.00 MB this module reads .*secure_boot: off"),
]


@pytest.mark.parametrize(("relative", "content", "secure_boot", "message"), DAMAGED_PE,
                         ids=["truncated-kernel", "truncated-shim", "sparse-kernel"])
def test_a_truncated_or_huge_pe_image_is_refused_cleanly(
        sandbox, canary, debian_tree, relative, content, secure_boot, message):
    base = os.path.join(sandbox, "hostile-iso-damaged")
    with overlay(base, "source", debian_tree) as merged:
        version = sorted(name[len("vmlinuz-"):] for name in os.listdir(os.path.join(merged, "boot"))
                         if name.startswith("vmlinuz-"))[-1]
        replace_file(merged, relative.format(version=version), content)
        dest_dir = os.path.join(base, "iso")
        os.makedirs(dest_dir)
        params = {"dest": os.path.join(dest_dir, "live.iso"), "source": "path", "source_path": merged,
                  "compression": "lz4", "secure_boot": secure_boot}
        try:
            with hostile_case(canary):
                for check in (True, False):
                    outcome = run_module(sandbox, "live_iso", params, check=check)
                    print("%s, check mode %s: peak memory %d KiB" % (relative, check, outcome.max_rss_kib))
                    assert outcome.failed and outcome.result is not None, outcome.output[-2000:]
                    assert re.search(message, outcome.msg), outcome.msg
                    assert "Traceback" not in outcome.output
                    # A child inherits the peak of the process that forked it (here, the test run's): the
                    # module's own reading is its peak over that of a Python that does nothing.
                    baseline = timed([sys.executable, "-c", "pass"], new_session=True)[3]
                    assert outcome.max_rss_kib - baseline < REFUSAL_RSS_KIB, "peak memory %d KiB over %d KiB" % (
                        outcome.max_rss_kib, baseline)
                assert os.listdir(dest_dir) == []
        finally:
            shutil.rmtree(dest_dir)


# --- the main workflow: a backup, then the ISO from the cache, keeping homes ----

def victims(sandbox):
    """Files outside every target that a followed home or history clean-up would delete."""
    root = os.path.join(sandbox, "hostile-iso-victims")
    for relative in ("carol/.bash_history", "carol/notes.txt", "root/.bash_history", "root/.viminfo"):
        write(os.path.join(root, relative), "%s, not to be touched\n" % relative)
    return root


# Homes in the second build's source (kept with keep_home): where each is, and what the image holds.
KEPT_HOMES = {
    # the live user's home planted as a link into the canary: replaced by a real home from etc/skel
    "home/live": lambda image: image.kind("home/live") == "d" and image.entries["home/live"][2] == 1000
    and ".bashrc" in image.children("home/live") and "notes.txt" not in image.children("home/live"),
    # a kept home that is a link out of the tree: data, kept as a link, never entered
    "home/carol": lambda image: image.kind("home/carol") == "l",
    "root": lambda image: image.kind("root") == "l",
    # a real home: kept, its history removed
    "home/dave": lambda image: image.children("home/dave") == ["notes.txt"],
    # a link inside the tree (/data/erin): its history removed where it leads, in the image
    "home/erin": lambda image: image.kind("home/erin") == "l" and image.children("data/erin") == ["notes.txt"],
}


@pytest.fixture(scope="module")
def cache_build(sandbox, canary, debian_tree):
    base = os.path.join(sandbox, "hostile-iso-cache")
    watched = victims(sandbox)
    with overlay(base, "source", debian_tree) as merged, \
            loop_filesystem(base, "volume", 4 << 30, "btrfs") as volume:
        plant(merged, "home/live", canary.path("data/home/alice"))
        plant(merged, "home/carol", os.path.join(watched, "carol"))
        plant(merged, "root", os.path.join(watched, "root"))
        for relative in ("home/dave/.bash_history", "home/dave/notes.txt", "data/erin/.bash_history",
                         "data/erin/notes.txt"):
            write(os.path.join(merged, relative), "%s in the source\n" % relative)
        plant(merged, "home/erin", "/data/erin")
        backup = {"base_dir": volume, "source": merged, "snapper_config": "reliability-hostile-iso",
                  "versioning": "snapper", "include_home": True, "exclude": LINK_SOURCE_EXCLUDES}
        made = run_module(sandbox, "snapper_cache", backup)
        assert not made.failed, made.msg
        try:
            dest_dir = os.path.join(base, "iso")
            os.makedirs(dest_dir)
            params = {"dest": os.path.join(dest_dir, "live.iso"), "source": "cache", "cache_dir": volume,
                      "snapper_config": "reliability-hostile-iso", "compression": "lz4", "keep_home": True,
                      "exclude": LINK_SOURCE_EXCLUDES}
            with hostile_case(canary, watched):
                outcome = run_module(sandbox, "live_iso", params)
                assert not outcome.failed, outcome.msg
            yield {"outcome": outcome, "image": Image(params["dest"], os.path.join(base, "read-back")),
                   "watched": watched, "volume": volume, "params": params, "base": base}
        finally:
            run_module(sandbox, "snapper_cache", dict(backup, state="absent"))


@pytest.mark.parametrize("home", list(KEPT_HOMES))
def test_a_kept_home_that_is_a_link_is_never_followed(canary, cache_build, home):
    with hostile_case(canary, cache_build["watched"]):
        image = cache_build["image"]
        assert cache_build["outcome"].result["operations"][0].startswith("took a writable btrfs snapshot")
        assert KEPT_HOMES[home](image), "%s in the image: %s, holding %s" % (
            home, image.entries.get(home), image.children(home))


def test_a_cache_reached_through_a_link_is_refused(sandbox, canary, cache_build):
    """A .rootfs_cache that is a link to another cache is not the cache of cache_dir."""
    other = os.path.join(cache_build["volume"], "elsewhere")
    os.makedirs(other)
    os.symlink(os.path.join(cache_build["volume"], ".rootfs_cache"), os.path.join(other, ".rootfs_cache"))
    dest_dir = os.path.join(cache_build["base"], "iso-through-link")
    os.makedirs(dest_dir)
    params = dict(cache_build["params"], cache_dir=other, dest=os.path.join(dest_dir, "live.iso"))
    before = state_of(cache_build["volume"])
    try:
        with hostile_case(canary, cache_build["watched"]):
            for check in (True, False):
                outcome = run_module(sandbox, "live_iso", params, check=check)
                assert outcome.failed and outcome.result is not None, outcome.output[-2000:]
                assert re.search(r"symlink", outcome.msg), outcome.msg
                assert "Traceback" not in outcome.output
            after = state_of(cache_build["volume"])
            # (A snapshot's placeholder of the nested .snapshots subvolume gets new times when btrfs reloads it.)
            changed = {name for name in set(after["entries"]) | set(before["entries"])
                       if after["entries"].get(name) != before["entries"].get(name)
                       and not name.endswith("/snapshot/.snapshots")}
            assert os.listdir(dest_dir) == [] and not changed and after["mounts"] == before["mounts"], changed
    finally:
        os.unlink(os.path.join(other, ".rootfs_cache"))
        os.rmdir(other)
