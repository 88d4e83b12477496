"""Benchmarks of liveclone.core against the bare tools, on this machine.

Run through scripts/bench.sh (root, a private mount namespace, the staged
collection). Each figure is a ratio against a floor measured in the same run
on the same data: the same rsync, mksquashfs and grub-mkrescue invocations the
module made (recorded by the tracer in tests/reliability/inject), run bare.
Writes bench/results.json and docs/performance.md.

Usage: bench/run.py [--rounds N] [SECTION ...]
  sections: backup pull iso compression grow playbook (default: all); "report"
  alone rewrites docs/performance.md from bench/results.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import glob
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests/lib"))
from module_run import run_module, timed  # noqa: E402  (after the path insert)
from sandbox import require_root_namespace, sandbox  # noqa: E402
from sshd import make_key, running_sshd  # noqa: E402

BUILD_TREE = os.path.join(REPO, "tests/integration/targets/setup_debian_tree/files/build_tree.sh")
RESULTS = os.path.join(HERE, "results.json")  # kept between runs: a run of some sections updates only those
REPORT = os.path.join(REPO, "docs/performance.md")
GOAL = 1.15
PULL_GOAL = 1.10
# Pulls at once in the concurrency figures (one cache, snapper config and lock each).
PULLS_AT_ONCE = (1, 2, 4)
# The client's mount table as the controller gives it: the tree is one filesystem.
CLIENT_MOUNTINFO = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
GIB = 1 << 30
SMALL_FILES = 200000
PRESETS = {
    "zstd 3": ["-comp", "zstd", "-Xcompression-level", "3", "-b", "1M"],
    "zstd 15": ["-comp", "zstd", "-Xcompression-level", "15", "-b", "1M"],
    "zstd 19": ["-comp", "zstd", "-Xcompression-level", "19", "-b", "1M"],
    "xz -b 256K (reference)": ["-comp", "xz", "-b", "256K"],
    "xz -b 1M -Xbcj x86": ["-comp", "xz", "-b", "1M", "-Xbcj", "x86"],
    "lz4": ["-comp", "lz4", "-b", "1M"],
}


def log(text):
    print("[%s] %s" % (datetime.datetime.now().strftime("%H:%M:%S"), text), flush=True)


def run(argv, **kwargs):
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)


def must(outcome, what):
    if outcome.failed:
        raise SystemExit("%s failed: %s" % (what, outcome.msg))
    return outcome


def traced(work, module, params):
    """A module run with the tools it started: (ModuleRun, [{argv, seconds}])."""
    trace = os.path.join(work, ".trace.jsonl")
    if os.path.exists(trace):
        os.unlink(trace)
    outcome = must(run_module(work, module, params, trace=trace), module)
    with open(trace) as handle:
        tools = [json.loads(line) for line in handle]
    return outcome, tools


def tool_argv(tools, name, without=()):
    for tool in tools:
        words = [os.path.basename(word) for word in tool["argv"]]
        if name in words and not any(word in tool["argv"] for word in without):
            return tool["argv"]
    raise SystemExit("the module never ran %s" % name)


def bare(argv):
    """Run a tool bare: (seconds, peak RSS KiB, output, CPU seconds)."""
    returncode, out, seconds, rss, cpu = timed(argv)
    if returncode not in (0, 24):
        raise SystemExit("%s exited %d: %s" % (argv[0], returncode, out[-2000:]))
    return seconds, rss, out, cpu


def against_rsync(module_times, rsync_times, rss):
    """The medians of alternating module and bare rsync runs, compared."""
    module, rsync = statistics.median(module_times), statistics.median(rsync_times)
    return {"overhead_seconds": round(module - rsync, 3), "module_seconds": round(module, 3),
            "rsync_seconds": round(rsync, 3), "ratio": round(module / rsync, 3), "peak_rss_mib": mib(max(rss))}


def mib(kib):
    return round(kib / 1024, 1)


# --- data -----------------------------------------------------------------------


def debian_copy(work):
    tree = run(["bash", BUILD_TREE]).stdout.strip().splitlines()[-1]
    copy = os.path.join(work, "debian")
    run(["cp", "-a", tree, copy])
    return copy


def synthetic_tree(work):
    rng = random.Random("bench")
    root = os.path.join(work, "synthetic")
    os.makedirs(os.path.join(root, "etc"))
    with open(os.path.join(root, "etc/os-release"), "w") as handle:
        handle.write('PRETTY_NAME="Synthetic"\nID=synthetic\n')
    for index in range(SMALL_FILES):
        directory = os.path.join(root, "d%03d" % (index % 600))
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "f%06d" % index), "wb") as handle:
            handle.write(rng.randbytes(rng.randint(512, 8192)))
    return root


def regular_files(root):
    found = []
    for directory, _dirs, files in os.walk(root):
        found += [os.path.join(directory, name) for name in files
                  if os.path.isfile(os.path.join(directory, name))
                  and not os.path.islink(os.path.join(directory, name))]
    return sorted(found)


def touch_one_percent(files, rng, changeable):
    """Give 1% of the files new content of the same size, chosen among the
    changeable ones (data, not the system files that identify the tree)."""
    for path in rng.sample(changeable, max(1, len(files) // 100)):
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
            handle.write(rng.randbytes(max(1, min(size, 4096))))


def snapshot_count(base):
    return len(os.listdir(os.path.join(base, ".rootfs_cache/.snapshots")))


# --- sections ------------------------------------------------------------------------


def bench_backup(work, volume, rounds, data):
    results = {}
    for name, source in data.items():
        base = os.path.join(volume, name + "_backup")
        os.makedirs(base)
        params = {"base_dir": base, "source": source, "keep": 3, "versioning": "snapper",
                  "snapper_config": "bench-" + name}
        log("backup %s: first backup" % name)
        first = must(run_module(work, "snapper_cache", params), "first backup")
        entry = {"files": first.result["transfer"]["files_total"],
                 "bytes": first.result["transfer"]["total_size"],
                 "first_backup_seconds": round(first.seconds, 2)}
        module_times, rsync_times, rss, snapshots_taken = [], [], [], 0
        for _round in range(rounds):
            before = snapshot_count(base)
            outcome, tools = traced(work, "snapper_cache", params)
            snapshots_taken += snapshot_count(base) - before
            assert not outcome.result["changed"], outcome.result["operations"]
            module_times.append(outcome.seconds)
            rss.append(outcome.max_rss_kib)
            rsync_times.append(bare(tool_argv(tools, "rsync", without=["--dry-run"]))[0])
        entry["unchanged"] = dict(against_rsync(module_times, rsync_times, rss), snapshots_taken=snapshots_taken)
        log("backup %s unchanged: %s" % (name, entry["unchanged"]))
        rng = random.Random("one percent " + name)
        files = regular_files(source)
        changeable = [path for path in files if "/usr/share/" in path or name == "synthetic"]
        module_times, rsync_times, rss = [], [], []
        for _round in range(rounds):
            touch_one_percent(files, rng, changeable)
            outcome, tools = traced(work, "snapper_cache", params)
            module_times.append(outcome.seconds)
            rss.append(outcome.max_rss_kib)
            touch_one_percent(files, rng, changeable)
            rsync_times.append(bare(tool_argv(tools, "rsync", without=["--dry-run"]))[0])
        entry["one_percent_changed"] = dict(against_rsync(module_times, rsync_times, rss),
                                            files_changed=max(1, len(files) // 100))
        log("backup %s 1%% changed: %s" % (name, entry["one_percent_changed"]))
        entry["rounds"] = rounds
        results[name] = entry
    return results


def bench_pull(work, volume, rounds, data):
    """snapper_cache pulling each tree over SSH from a test sshd on 127.0.0.1
    (the key restricted to rrsync -ro, as the backup_server role installs it),
    against the same rsync -e ssh run bare, and rsnapshot pulling the same
    tree with the same rsync options and exclusions; then several pulls at
    once against as many bare rsyncs at once."""
    results = {}
    keys = os.path.join(work, "pull-keys")
    os.makedirs(keys)
    with running_sshd(os.path.join(work, "pull-sshd")) as sshd:
        pinned = " ".join(sshd.host_key_line.split()[:2])
        for name, source in data.items():
            key = make_key(keys, name)
            sshd.authorize(key, 'restrict,command="/usr/bin/rrsync -ro %s"' % source)
            remote = {"host": "127.0.0.1", "port": sshd.port, "user": "root", "identity_file": key.path,
                      "host_keys": [sshd.host_key_line], "mountinfo": CLIENT_MOUNTINFO}
            base = os.path.join(volume, "pull-" + name)
            os.makedirs(base)
            params = {"base_dir": base, "keep": 3, "snapper_config": "bench-pull-" + name, "remote": remote}
            log("pull %s: first pull" % name)
            first, tools = traced(work, "snapper_cache", params)
            rsync_argv = tool_argv(tools, "rsync", without=["--dry-run"])
            entry = {"files": first.result["transfer"]["files_total"], "bytes": first.result["transfer"]["total_size"],
                     "first_pull_seconds": round(first.seconds, 2), "rounds": rounds}
            rsnapshot = Rsnapshot(work, volume, name, sshd, key, rsync_argv)
            log("pull %s: rsnapshot's first pull" % name)
            entry["rsnapshot_first_seconds"] = round(rsnapshot.run()[0], 2)
            rng = random.Random("pull one percent " + name)
            files = regular_files(source)
            changeable = [path for path in files if "/usr/share/" in path or name == "synthetic"]
            for case in ("unchanged", "one_percent_changed"):
                module_times, rsync_times, rsnapshot_times, rss, snapshots_taken = [], [], [], [], 0
                for _round in range(rounds):
                    # Each of the three finds the same change: the tree changes before each run.
                    if case != "unchanged":
                        touch_one_percent(files, rng, changeable)
                    before = snapshot_count(base)
                    outcome, _tools = traced(work, "snapper_cache", params)
                    snapshots_taken += snapshot_count(base) - before
                    assert outcome.result["changed"] == (case != "unchanged"), outcome.result["operations"]
                    module_times.append(outcome.seconds)
                    rss.append(outcome.max_rss_kib)
                    if case != "unchanged":
                        touch_one_percent(files, rng, changeable)
                    rsync_times.append(bare_pull(rsync_argv, pinned))
                    if case != "unchanged":
                        touch_one_percent(files, rng, changeable)
                    rsnapshot_times.append(rsnapshot.run()[0])
                item = dict(against_rsync(module_times, rsync_times, rss),
                            rsnapshot_seconds=round(statistics.median(rsnapshot_times), 3))
                if case == "unchanged":
                    item["snapshots_taken"] = snapshots_taken
                else:
                    item["files_changed"] = max(1, len(files) // 100)
                entry[case] = item
                log("pull %s %s: %s" % (name, case.replace("_", " "), item))
            results[name] = entry
            run_module(work, "snapper_cache", dict(params, state="absent"))
            rsnapshot.remove()
        name, source = next(iter(data.items()))
        key = make_key(keys, name + "-at-once")
        sshd.authorize(key, 'restrict,command="/usr/bin/rrsync -ro %s"' % source)
        results["at_once"] = pulls_at_once(work, volume, sshd, key, pinned, name)
    return results


@contextlib.contextmanager
def module_known_hosts(argv, pinned):
    """The known_hosts file the -e of the module's rsync argv names (the
    module's private one, gone with its run), made again for bare runs."""
    rsh = argv[argv.index("-e") + 1]
    known_hosts = re.search(r"UserKnownHostsFile=([^\s']+)", rsh).group(1)
    os.makedirs(os.path.dirname(known_hosts), mode=0o700)
    try:
        with open(known_hosts, "w") as handle:
            handle.write("liveclone-client %s\n" % pinned)
        yield
    finally:
        shutil.rmtree(os.path.dirname(known_hosts))


def bare_pull(argv, pinned):
    """The module's rsync over ssh, run bare: its wall time."""
    with module_known_hosts(argv, pinned):
        return bare(argv)[0]


class Rsnapshot:
    """rsnapshot (the peer) pulling the same tree through the same sshd and
    key: the module's rsync options and exclusions, one retain level of 3."""

    def __init__(self, work, volume, name, sshd, key, rsync_argv):
        self.root = os.path.join(volume, "rsnapshot-" + name)
        self.config = os.path.join(work, "rsnapshot-%s.conf" % name)
        ssh_args = " ".join(sshd.ssh_argv(key)[1:-2])
        excludes = [word.split("=", 1)[1] for word in rsync_argv if word.startswith("--exclude=")]
        lines = [("config_version", "1.2"), ("snapshot_root", self.root + "/"), ("no_create_root", "0"),
                 ("cmd_cp", "/bin/cp"), ("cmd_rm", "/bin/rm"), ("cmd_rsync", "/usr/bin/rsync"),
                 ("cmd_ssh", "/usr/bin/ssh"), ("rsync_short_args", "-aAXHS"),
                 ("rsync_long_args", "--delete --numeric-ids --relative --delete-excluded"),
                 ("ssh_args", ssh_args), ("lockfile", os.path.join(work, "rsnapshot-%s.pid" % name)),
                 ("retain", "alpha\t3")]
        lines += [("exclude", pattern) for pattern in excludes]
        lines.append(("backup", "root@127.0.0.1:/\tclient/"))
        with open(self.config, "w") as handle:
            handle.write("".join("%s\t%s\n" % line for line in lines))
        run(["rsnapshot", "-c", self.config, "configtest"])

    def run(self):
        seconds, rss, _out, cpu = bare(["rsnapshot", "-c", self.config, "alpha"])
        return seconds, rss, cpu

    def remove(self):
        shutil.rmtree(self.root)


def cpu_ticks():
    """The machine's CPU time so far, from /proc/stat: (busy, iowait, all) in ticks."""
    with open("/proc/stat") as handle:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(word) for word in handle.readline().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, iowait, busy + idle + iowait


def cpu_share(before):
    """Of all the machine's CPU time since before: the busy and the iowait shares (every process: the
    client's sshd and rsync too, which are not the benchmark's children)."""
    after = cpu_ticks()
    total = max(1, after[2] - before[2])
    return {"busy": round((after[0] - before[0]) / total, 2), "iowait": round((after[1] - before[1]) / total, 2)}


def pulls_at_once(work, volume, sshd, key, pinned, name):
    """Full pulls of the same client tree into N caches at once (N modules),
    against N bare rsyncs at once: wall time, CPU time, and throughput."""
    remote = {"host": "127.0.0.1", "port": sshd.port, "user": "root", "identity_file": key.path,
              "host_keys": [sshd.host_key_line], "mountinfo": CLIENT_MOUNTINFO}
    results = {"tree": name, "cores": os.cpu_count(), "runs": []}
    for count in PULLS_AT_ONCE:
        caches = [{"base_dir": os.path.join(volume, "at-once-%d-%d" % (count, index)), "keep": 3,
                   "snapper_config": "bench-at-once-%d-%d" % (count, index), "remote": remote}
                  for index in range(count)]
        for params in caches:
            os.makedirs(params["base_dir"])
        log("pull %d at once: modules" % count)
        started, cpu_before = time.monotonic(), cpu_ticks()
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            outcomes = list(pool.map(lambda params: must(run_module(work, "snapper_cache", params), "pull"),
                                     caches))
        module_seconds, module_cpu = time.monotonic() - started, cpu_share(cpu_before)
        byte_count = sum(outcome.result["transfer"]["total_size"] for outcome in outcomes)
        # The same copies bare: the module's rsync argv into fresh directories.
        _outcome, tools = traced(work, "snapper_cache", caches[0])
        argv = tool_argv(tools, "rsync", without=["--dry-run"])
        targets = [os.path.join(volume, "at-once-bare-%d-%d" % (count, index)) for index in range(count)]
        log("pull %d at once: bare rsync" % count)
        started, cpu_before = time.monotonic(), cpu_ticks()
        with module_known_hosts(argv, pinned), concurrent.futures.ThreadPoolExecutor(count) as pool:
            list(pool.map(bare, [argv[:-1] + [target + "/"] for target in targets]))
        rsync_seconds, rsync_cpu = time.monotonic() - started, cpu_share(cpu_before)
        entry = {"pulls": count, "module_seconds": round(module_seconds, 2), "rsync_seconds": round(rsync_seconds, 2),
                 "ratio": round(module_seconds / rsync_seconds, 3), "bytes": byte_count,
                 "module_mb_per_s": round(byte_count / module_seconds / 10 ** 6, 1),
                 "rsync_mb_per_s": round(byte_count / rsync_seconds / 10 ** 6, 1),
                 "module_cpu": module_cpu, "rsync_cpu": rsync_cpu}
        results["runs"].append(entry)
        log("pull %d at once: %s" % (count, entry))
        for params in caches:
            run_module(work, "snapper_cache", dict(params, state="absent"))
        for target in targets:
            shutil.rmtree(target)
    return results


def bench_iso(work, volume, rounds):
    base = os.path.join(volume, "debian_backup")
    iso_dir = os.path.join(work, "iso")
    os.makedirs(iso_dir, exist_ok=True)
    params = {"dest": os.path.join(iso_dir, "bench.iso"), "source": "cache", "cache_dir": base,
              "snapper_config": "bench-debian", "force": True}
    module_times, floor_times, rss, stages = [], [], [], None
    # Read the newest snapshot once, so that neither side pays for a cold page cache.
    snapshots = glob.glob(os.path.join(base, ".rootfs_cache/.snapshots/*/snapshot"))
    newest = max(snapshots, key=lambda path: int(path.split("/")[-2]))
    subprocess.run(["find", newest, "-type", "f", "-exec", "cat", "{}", "+"], stdout=subprocess.DEVNULL, check=True)
    for _round in range(rounds):
        log("iso: live_iso from the newest snapshot")
        outcome, tools = traced(work, "live_iso", params)
        module_times.append(outcome.seconds)
        rss.append(outcome.max_rss_kib)
        stages = outcome.result["stages"]
        snapshot = outcome.result["source"]["path"]
        squash_argv = tool_argv(tools, "mksquashfs")
        rescue_argv = tool_argv(tools, "grub-mkrescue")
        # The same invocations on the same tree: the snapshot itself, into a fresh ISO tree.
        floor_root = os.path.join(work, "floor-iso")
        shutil.rmtree(floor_root, ignore_errors=True)
        os.makedirs(os.path.join(floor_root, "live"))
        os.makedirs(os.path.join(floor_root, "boot/grub"))
        position = [os.path.basename(word) for word in squash_argv].index("mksquashfs")
        squashfs = os.path.join(floor_root, "live/filesystem.squashfs")
        argv = squash_argv[:position + 1] + [snapshot, squashfs] + squash_argv[position + 3:]
        squash_seconds, squash_rss, squash_out, _cpu = bare(argv)
        match = re.search(r"of uncompressed filesystem size \(([\d.]+) Kbytes\)", squash_out)
        floor_input = int(float(match.group(1)) * 1024) if match else None
        kernel = sorted(name for name in os.listdir(os.path.join(snapshot, "boot")) if name.startswith("vmlinuz-"))
        shutil.copyfile(os.path.join(snapshot, "boot", kernel[-1]), os.path.join(floor_root, "live/vmlinuz"))
        shutil.copyfile(os.path.join(snapshot, "boot", kernel[-1].replace("vmlinuz", "initrd.img")),
                        os.path.join(floor_root, "live/initrd.img"))
        with open(os.path.join(floor_root, "boot/grub/grub.cfg"), "w") as handle:
            handle.write('menuentry "floor" {\n  linux /live/vmlinuz boot=live\n  initrd /live/initrd.img\n}\n')
        position = rescue_argv.index("--output")
        iso_root = rescue_argv[position + 2]
        argv = [os.path.join(work, "floor.iso") if word == rescue_argv[position + 1] else
                floor_root if word == iso_root else word for word in rescue_argv]
        rescue_seconds, rescue_rss, _out, _cpu = bare(argv)
        floor_times.append(squash_seconds + rescue_seconds)
        rss += [squash_rss, rescue_rss]
    result = {"rounds": rounds, "module_seconds": round(statistics.median(module_times), 2),
              "floor_seconds": round(statistics.median(floor_times), 2),
              "ratio": round(statistics.median(module_times) / statistics.median(floor_times), 3),
              "stages": stages, "iso_bytes": outcome.result["size"], "compression": "zstd (the default)",
              "module_squashfs_input_bytes": outcome.result["squashfs"]["uncompressed_size"],
              "floor_squashfs_input_bytes": floor_input,
              "peak_rss_mib": mib(max(rss))}
    log("iso: %s" % result)
    return result


def bench_compression(work):
    tree = run(["bash", BUILD_TREE]).stdout.strip().splitlines()[-1]
    size = int(run(["du", "-sb", tree]).stdout.split()[0])
    results = {"tree_bytes": size, "presets": {}}
    output = os.path.join(work, "preset.squashfs")
    for name, options in PRESETS.items():
        if os.path.exists(output):
            os.unlink(output)
        log("compression: %s" % name)
        seconds, rss, _out, cpu = bare(["mksquashfs", tree, output, "-noappend", "-no-progress", "-quiet"] + options)
        results["presets"][name] = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                                    "bytes": os.path.getsize(output),
                                    "ratio": round(size / os.path.getsize(output), 2), "peak_rss_mib": mib(rss)}
        log("compression %s: %s" % (name, results["presets"][name]))
    os.unlink(output)
    return results


def bench_grow(work):
    results = {}
    for fstype, online in (("ext4", False), ("xfs", False), ("btrfs", False), ("xfs", True), ("btrfs", True),
                           ("ext4", True)):
        name = "%s %s" % (fstype, "online" if online else "offline")
        directory = os.path.join(work, "grow-%s-%s" % (fstype, "on" if online else "off"))
        os.makedirs(directory)
        store = os.path.join(directory, "store.img")
        must(run_module(work, "backstore", {"path": store, "size": "1G", "fstype": fstype}), "create")
        mount_point = os.path.join(directory, "mnt")
        os.makedirs(mount_point)
        run(["mount", "-o", "loop", store, mount_point])
        with open(os.path.join(mount_point, "data"), "wb") as handle:
            for _block in range(256):
                handle.write(os.urandom(1 << 20))
        if not online:
            run(["umount", mount_point])
        try:
            outcome = run_module(work, "backstore", {"path": store, "size": "8G", "fstype": fstype})
        finally:
            if online:
                subprocess.run(["umount", mount_point], check=False)
        if outcome.failed:
            results[name] = {"refused": outcome.msg}
        else:
            results[name] = {"seconds": round(outcome.seconds, 2), "peak_rss_mib": mib(outcome.max_rss_kib)}
        log("grow 1 GiB to 8 GiB, %s: %s" % (name, results[name]))
        os.unlink(store)
    return results


def bench_playbook():
    """backup_then_build.yml twice on a lab VM, as the main command runs it: the
    unchanged rerun's wall time and changed count."""
    state = os.path.join("/var/tmp", "liveclone-bench-lab")
    lab = [sys.executable, os.path.join(REPO, "lab/lab.py")]
    run(lab + ["image"])
    log("playbook: booting a lab VM")
    run(lab + ["up", "bench", state])
    try:
        inventory = os.path.join(state, "inventory.json")
        with open(inventory, "w") as handle:
            handle.write(run(lab + ["inventory", state]).stdout)
        argv = ["ansible-playbook", "-i", inventory, os.path.join(REPO, "playbooks/backup_then_build.yml"),
                "-e", "rootfs_backup_device=/dev/vdb", "-e", "rootfs_backup_format_device=true",
                "-e", "live_iso_live_password=live", "-e", "liveclone_artifact_dir=" + os.path.join(state, "out")]
        env = dict(os.environ, ANSIBLE_PIPELINING="True")
        runs = []
        for label in ("first", "unchanged rerun"):
            log("playbook: %s run" % label)
            returncode, out, seconds, _rss, _cpu = timed(argv, env=env, timeout=3600)
            if returncode:
                raise SystemExit("backup_then_build.yml failed:\n" + out[-3000:])
            recap = [line for line in out.splitlines() if "changed=" in line and "ok=" in line]
            changed = sum(int(line.split("changed=")[1].split()[0]) for line in recap)
            runs.append({"run": label, "seconds": round(seconds, 1), "changed": changed})
            log("playbook %s: %s" % (label, runs[-1]))
        return {"runs": runs, "where": "lab VM under QEMU TCG (no KVM), -cpu qemu64"}
    finally:
        subprocess.run(lab + ["down", "bench", state], check=False)
        # What is left is the inventory and the fetched ISO: no mounts, nothing running.
        shutil.rmtree(state, ignore_errors=True)


# --- report ------------------------------------------------------------------------------


def machine():
    with open("/proc/meminfo") as handle:
        memory = int(handle.readline().split()[1]) // 1024 // 1024
    with open("/proc/cpuinfo") as handle:
        model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                     platform.processor())
    return {"cpus": os.cpu_count(), "cpu": model, "memory_gib": memory, "kernel": platform.release(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def verdict(ratio):
    return "met" if ratio <= GOAL else "missed"


def write_report(results):
    lines = ["# Performance", "",
             "Written by `bash scripts/bench.sh` (bench/run.py) from `bench/results.json`; do not edit by hand.",
             "Every ratio is the module's wall time (python start-up included) over the same tool invocations run",
             "bare, measured in the same run on the same data (the median of the rounds each section names).",
             "", "Machine: %(cpus)d cores (%(cpu)s), %(memory_gib)d GiB, kernel %(kernel)s, %(date)s." %
             results["machine"], ""]
    if results.get("note"):
        lines += [results["note"], ""]
    chart = []
    backup = results.get("backup")
    if backup:
        rounds = next(iter(backup.values()))["rounds"]
        lines += ["## Backups (snapper_cache against bare rsync; %s rounds)" % rounds, "",
                  "| data | files | size | case | module s | rsync s | module - rsync s | ratio | goal 1.15 "
                  "| peak RSS MiB |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
        for name, entry in backup.items():
            for case in ("unchanged", "one_percent_changed"):
                item = entry[case]
                lines.append("| %s | %d | %d MB | %s | %.2f | %.2f | %.2f | %.2f | %s | %s |" % (
                    name, entry["files"], entry["bytes"] // 10 ** 6, case.replace("_", " "), item["module_seconds"],
                    item["rsync_seconds"], item["overhead_seconds"],
                    item["ratio"], verdict(item["ratio"]),
                    item["peak_rss_mib"]))
                chart.append(("%s %s" % (name, "unchanged" if case == "unchanged" else "1%"), item["ratio"]))
        lines += ["", "Snapshots taken by the unchanged runs: %s." % ", ".join(
            "%s %d" % (name, entry["unchanged"]["snapshots_taken"]) for name, entry in backup.items()), ""]
    pull = results.get("pull")
    if pull:
        trees = {name: entry for name, entry in pull.items() if name != "at_once"}
        rounds = next(iter(trees.values()))["rounds"]
        lines += ["## Pulls over SSH (snapper_cache with remote, against the same rsync -e ssh bare, and rsnapshot; "
                  "%s rounds)" % rounds, "",
                  "A test sshd on 127.0.0.1 serves each tree through a key restricted to `rrsync -ro`, as the "
                  "backup_server role installs it. The module's time includes its checks of the key (a probe and a "
                  "dry-run push: two ssh connections) and the snapshot; rsnapshot runs with the same rsync options "
                  "and exclusions and rotates one level of 3 (`cp -al`).", "",
                  "| data | files | size | case | module s | rsync s | ratio | goal 1.10 | rsnapshot s | module / "
                  "rsnapshot | peak RSS MiB |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        for name, entry in trees.items():
            for case in ("unchanged", "one_percent_changed"):
                item = entry[case]
                lines.append("| %s | %d | %d MB | %s | %.2f | %.2f | %.2f | %s | %.2f | %.2f | %s |" % (
                    name, entry["files"], entry["bytes"] // 10 ** 6, case.replace("_", " "), item["module_seconds"],
                    item["rsync_seconds"], item["ratio"], "met" if item["ratio"] <= PULL_GOAL else "missed",
                    item["rsnapshot_seconds"], item["module_seconds"] / item["rsnapshot_seconds"],
                    item["peak_rss_mib"]))
                chart.append(("pull %s %s" % (name, "unchanged" if case == "unchanged" else "1%"), item["ratio"]))
        lines += ["", "First (full) pulls: %s." % ", ".join(
            "%s %.1f s (rsnapshot %.1f s)" % (name, entry["first_pull_seconds"], entry["rsnapshot_first_seconds"])
            for name, entry in trees.items()), ""]
        at_once = pull.get("at_once")
        if at_once:
            lines += ["### Several full pulls at once (the %s tree, %d cores)" % (at_once["tree"], at_once["cores"]),
                      "", "Each pull has its own cache, snapper config and lock. Busy and iowait are shares of all "
                      "the machine's CPU time during the batch (the client's sshd and rsync included).", "",
                      "| pulls | module s | bare rsync s | ratio | module MB/s | rsync MB/s | busy (module) "
                      "| iowait (module) | busy (rsync) |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for item in at_once["runs"]:
                lines.append("| %d | %.1f | %.1f | %.2f | %.1f | %.1f | %.0f%% | %.0f%% | %.0f%% |" % (
                    item["pulls"], item["module_seconds"], item["rsync_seconds"], item["ratio"],
                    item["module_mb_per_s"], item["rsync_mb_per_s"], 100 * item["module_cpu"]["busy"],
                    100 * item["module_cpu"]["iowait"], 100 * item["rsync_cpu"]["busy"]))
            lines.append("")
    iso = results.get("iso")
    if iso:
        title = "## ISO from a snapshot (live_iso against mksquashfs + grub-mkrescue; %s rounds)" % (
            iso["rounds"])
        lines += [title, "",
                  "| module s | floor s | ratio | goal 1.15 | ISO bytes | peak RSS MiB |",
                  "| ---: | ---: | ---: | --- | ---: | ---: |",
                  "| %.1f | %.1f | %.2f | %s | %d | %s |" % (
                      iso["module_seconds"], iso["floor_seconds"], iso["ratio"], verdict(iso["ratio"]),
                      iso["iso_bytes"], iso["peak_rss_mib"]),
                  "", "Stages of the module run (s): %s. mksquashfs read %s MB in the module (its cleaned copy "
                  "of the snapshot) and %s MB in the floor (the snapshot itself, with the module's excludes)." % (
                      ", ".join("%s %s" % item for item in iso["stages"].items()),
                      (iso.get("module_squashfs_input_bytes") or 0) // 10 ** 6,
                      (iso.get("floor_squashfs_input_bytes") or 0) // 10 ** 6), ""]
        chart.append(("ISO", iso["ratio"]))
    if chart:
        lines += ["## Ratios against the floor", "", "```mermaid", "xychart-beta",
                  '    title "module time / bare tools (goal: at most 1.15)"',
                  "    x-axis [%s]" % ", ".join('"%s"' % label for label, _ratio in chart),
                  '    y-axis "ratio" 0 --> %.1f' % max(2.0, max(ratio for _label, ratio in chart) + 0.2),
                  "    bar [%s]" % ", ".join("%.2f" % ratio for _label, ratio in chart),
                  "    line [%s]" % ", ".join("1.15" for _item in chart), "```", ""]
    compression = results.get("compression")
    if compression:
        title = "## Compression presets (mksquashfs of the %d MB Debian tree)" % (compression["tree_bytes"] // 10 ** 6)
        lines += [title,
                  "", "| preset | wall s | CPU s | size MB | ratio | peak RSS MiB |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, item in compression["presets"].items():
            lines.append("| %s | %.1f | %.1f | %.1f | %.2f | %s |" % (
                name, item["seconds"], item["cpu_seconds"], item["bytes"] / 10 ** 6, item["ratio"],
                item["peak_rss_mib"]))
        lines.append("")
    grow = results.get("grow")
    if grow:
        lines += ["## Backing-store grow, 1 GiB to 8 GiB (backstore, 256 MiB of data in the store)", "",
                  "| filesystem | seconds | peak RSS MiB |",
                  "| --- | ---: | ---: |"]
        for name, item in grow.items():
            if "refused" in item and "CAP_SYS_RESOURCE" in item["refused"]:
                lines.append("| %s | not possible here: root lacks CAP_SYS_RESOURCE on this machine (the module "
                             "refuses, saying so) | |" % name)
            elif "refused" in item:
                lines.append("| %s | refused: %s | |" % (name, item["refused"]))
            else:
                lines.append("| %s | %.2f | %s |" % (name, item["seconds"], item["peak_rss_mib"]))
        lines.append("")
    playbook = results.get("playbook")
    if playbook:
        lines += ["## backup_then_build.yml on one host (%s)" % playbook["where"], "",
                  "| run | seconds | tasks changed |", "| --- | ---: | ---: |"]
        lines += ["| %(run)s | %(seconds).1f | %(changed)d |" % item for item in playbook["runs"]]
        lines.append("")
    # What the figures mean, written by hand after a run: bench/discussion.md.
    discussion = os.path.join(HERE, "discussion.md")
    if os.path.exists(discussion):
        with open(discussion) as handle:
            lines += [handle.read()]
    with open(REPORT, "w") as handle:
        handle.write("\n".join(lines).rstrip() + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("sections", nargs="*", default=["backup", "pull", "iso", "compression", "grow", "playbook"])
    options = parser.parse_args()
    results = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as handle:
            results = json.load(handle)
    if options.sections == ["report"]:  # rewrite docs/performance.md from the stored results
        write_report(results)
        return
    problem = require_root_namespace("bench")
    if problem:
        raise SystemExit(problem)
    results.update(machine=machine())
    with sandbox("liveclone-bench-") as work:
        needs_volume = {"backup", "pull", "iso"} & set(options.sections)
        volume = os.path.join(work, "volume")
        if needs_volume:
            image = os.path.join(work, "volume.img")
            with open(image, "wb") as handle:
                handle.truncate(16 * GIB)
            run(["mkfs.btrfs", "-q", "-f", image])
            os.makedirs(volume)
            run(["mount", "-o", "loop", image, volume])
        try:
            if needs_volume:
                log("data: a copy of the Debian tree and %d small files" % SMALL_FILES)
                data = {"debian": debian_copy(work), "synthetic": synthetic_tree(work)}
            if {"backup", "iso"} & set(options.sections):
                results["backup"] = bench_backup(work, volume, options.rounds, data)
            if "iso" in options.sections:
                results["iso"] = bench_iso(work, volume, max(1, options.rounds // 2))
            if {"backup", "iso"} & set(options.sections):
                for name in data:
                    run_module(work, "snapper_cache", {"base_dir": os.path.join(volume, name + "_backup"),
                                                       "snapper_config": "bench-" + name, "state": "absent"})
            if "pull" in options.sections:
                results["pull"] = bench_pull(work, volume, options.rounds, data)
            if "compression" in options.sections:
                results["compression"] = bench_compression(work)
            if "grow" in options.sections:
                results["grow"] = bench_grow(work)
        finally:
            if needs_volume:
                subprocess.run(["umount", volume], check=False)
    if "playbook" in options.sections:
        results["playbook"] = bench_playbook()
    with open(RESULTS, "w") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    write_report(results)
    log("wrote %s and %s" % (RESULTS, REPORT))


if __name__ == "__main__":
    main()
