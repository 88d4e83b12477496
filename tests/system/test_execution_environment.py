"""The AWX execution environment, for real: the image built offline from
meta/execution-environment.yml with ansible-builder and podman
(lab/execution_environment.py; the base image is cached), what it holds
checked against docs/awx.md, and backup_then_build.yml run inside it with
ansible-navigator as AWX runs a sliced job: two slices, each with its part of
an inventory whose variables are in group_vars and host_vars, the survey's
answers as extra vars, and AWX's job and workflow ids. The target is this
machine over SSH on 127.0.0.1 (a test sshd of the sandbox, its host key
pinned), with a loop device per host as its backup disk, as in test_fleet.
Each slice's report covers its own host only; merge_reports.yml joins them
and refuses a host two reports claim."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import execution_environment
import pytest
import yaml
from conftest import COLLECTION_DIR, REPO, release_backup_disks, run
from sshd import make_key, running_sshd

HOSTS = ("alpha", "bravo")
WORKFLOW = 40
JOBS = {"alpha": 41, "bravo": 42}
TEMPLATE = "liveclone backup then build"
# Where the sandbox's directory with the key, the known host and the artifacts appears in the container.
INSIDE = "/liveclone-ee"


@pytest.fixture(scope="module")
def ee_image():
    started = time.monotonic()
    built = subprocess.run([sys.executable, os.path.join(REPO, "lab/execution_environment.py"), "build"],
                           env=dict(os.environ, LIVECLONE_COLLECTION_SOURCE=COLLECTION_DIR), text=True,
                           capture_output=True, check=False)
    if built.returncode:
        pytest.fail("the execution environment did not build:\n%s\n%s" % (built.stdout, built.stderr[-4000:]))
    print("execution environment %s ready in %.0f s" % (built.stdout.strip(), time.monotonic() - started))
    try:
        yield built.stdout.strip()
    finally:
        execution_environment.release_store()
        with open("/proc/self/mountinfo") as handle:
            left = [line.split()[4] for line in handle if execution_environment.CACHE in line.split()[4]]
        assert not left, "podman left mounts behind: %s" % left


def test_docs_list_what_the_image_holds(ee_image):
    with open(execution_environment.DOCS) as handle:
        text = handle.read()
    listed = text[text.index(execution_environment.DOCS_BEGIN) + len(execution_environment.DOCS_BEGIN):
                  text.index(execution_environment.DOCS_END)].strip()
    assert listed == execution_environment.contents(ee_image).strip(), (
        "docs/awx.md is stale: run python3 lab/execution_environment.py docs")


def test_every_package_pip_installed_in_the_image_is_pinned(ee_image):
    """The same commit builds the same Python set on any machine: each
    package pip put into the image is at requirements.txt's pin (or its
    requirement line's own), whatever the registry serves today."""
    report = json.loads(execution_environment.run(
        ["podman", "run", "--rm", "--network=none", ee_image, "python3", "-m", "pip", "inspect"],
        capture_output=True).stdout)
    installed = {item["metadata"]["name"]: item["metadata"]["version"] for item in report["installed"]
                 if item.get("installer") == "pip"}
    assert "ansible-core" in installed and "cryptography" in installed, installed
    with open(os.path.join(REPO, "ee/execution-environment.yml")) as handle:
        requirements = execution_environment.python_requirements(yaml.safe_load(handle))
    names = ["%s-%s-py3-none-any.whl" % (name.replace("-", "_"), version) for name, version in installed.items()]
    assert execution_environment.unpinned_wheels(names, requirements, execution_environment.pins()) == []


@pytest.fixture(scope="module")
def fleet(sandbox, debian_tree):
    """The sshd, the loop devices, the project (a playbook per job template)
    and one inventory per slice."""
    work = os.path.join(sandbox, "ee")
    shared = os.path.join(work, "shared")  # mounted into the container at INSIDE
    os.makedirs(os.path.join(shared, "artifacts"))
    devices = {}
    try:
        key = make_key(shared, "controller")
        for host in HOSTS:
            image = os.path.join(work, "%s-disk.img" % host)
            run(["truncate", "--size", "3G", image])
            devices[host] = run(["losetup", "--find", "--show", image]).stdout.strip()
        with running_sshd(os.path.join(work, "sshd")) as sshd:
            sshd.authorize(key)
            shutil.copyfile(sshd.known_hosts, os.path.join(shared, "known_hosts"))
            project = os.path.join(work, "project")
            os.makedirs(project)
            for name in ("backup_then_build", "merge_reports"):
                with open(os.path.join(project, name + ".yml"), "w") as handle:
                    handle.write("---\n- name: The collection's playbook, as a job template runs it\n"
                                 "  ansible.builtin.import_playbook: liveclone.core.%s\n" % name)
            group_vars = {
                "ansible_host": "127.0.0.1", "ansible_port": sshd.port, "ansible_user": "root",
                "ansible_ssh_private_key_file": INSIDE + "/controller",
                "ansible_ssh_common_args": "-o UserKnownHostsFile=%s/known_hosts -o StrictHostKeyChecking=yes"
                                           % INSIDE,
                # The test sshd has no sftp subsystem: files go through the ssh channel.
                "ansible_ssh_transfer_method": "piped", "ansible_pipelining": True,
                "ansible_python_interpreter": "/usr/bin/python3", "ansible_become": False,
                "rootfs_backup_format_device": True,
                "live_iso_compression_level": 3,
            }
            host_vars = {host: {
                "rootfs_backup_source": debian_tree,
                "rootfs_backup_base_dir": os.path.join(work, "%s_backup" % host),
                "rootfs_backup_snapper_config": "liveclone-ee-%s" % host,
                "rootfs_backup_device": devices[host],
                "live_iso_dest": os.path.join(work, host, "live.iso"),
                "live_iso_hostname": host,
            } for host in HOSTS}
            inventories = {}
            for host in HOSTS:
                # A slice's inventory as AWX writes it: every group, only the slice's hosts.
                inventory = os.path.join(work, "slice-%s" % host)
                for directory, content in (("group_vars", {"fleet": group_vars}),
                                           ("host_vars", {host: host_vars[host]})):
                    os.makedirs(os.path.join(inventory, directory))
                    for name, values in content.items():
                        with open(os.path.join(inventory, directory, name + ".yml"), "w") as handle:
                            yaml.safe_dump(values, handle)
                with open(os.path.join(inventory, "hosts.yml"), "w") as handle:
                    yaml.safe_dump({"all": {"children": {"fleet": {"hosts": {host: None}}}}}, handle)
                inventories[host] = inventory
            yield {"work": work, "shared": shared, "project": project, "inventories": inventories,
                   "host_vars": host_vars}
    finally:
        release_backup_disks(work, devices)


def navigator(fleet, image, playbook, inventory, extravars):
    """ansible-navigator run in the image, as AWX runs a job; returns (exit status, output)."""
    survey = os.path.join(fleet["shared"], "extravars-%d.json" % time.monotonic_ns())
    with open(survey, "w") as handle:
        json.dump(extravars, handle)
    argv = ["run", os.path.join(fleet["project"], playbook), "--ee", "true", "--ce", "podman", "--eei", image,
            "--pull-policy", "never", "--mode", "stdout", "--pae", "false",
            "--lf", os.path.join(fleet["work"], "navigator.log"), "-i", inventory,
            "--eev", "%s:%s" % (fleet["shared"], INSIDE), "--co=--network=host", "--co=--user=0",
            "-e", "@%s/%s" % (INSIDE, os.path.basename(survey)),
            # The slowest tasks, printed below.
            "--senv", "ANSIBLE_CALLBACKS_ENABLED=ansible.posix.profile_tasks"]
    started = time.monotonic()
    done = execution_environment.navigator(argv, cwd=fleet["project"], text=True, capture_output=True)
    # Without ansible-runner's event markers (escape sequences around base64) in the text.
    output = re.sub(r"\x1b\[K[^\x1b]*\x1b\[\d+D\x1b\[K", "", done.stdout + done.stderr)
    print("%s in the execution environment: exit %d in %.0f s; its slowest tasks:" % (
        playbook, done.returncode, time.monotonic() - started))
    profile = re.findall(r"^(.*-{3,} +[\d.]+s)$", output, re.MULTILINE)
    print("\n".join("    " + line.strip() for line in profile[:6]))
    return done.returncode, output


def survey(fleet, host):
    """The survey's answers, and the ids AWX gives each slice of a sliced job."""
    # No fetch: ansible's ssh connection moves a 300 MB ISO through its own
    # pipe at about 1 MB/s without sftp; docs/awx.md says the same for AWX.
    return {"liveclone_hosts": "fleet", "liveclone_artifact_dir": INSIDE + "/artifacts",
            "liveclone_fetch_iso": False, "live_iso_live_password": "live", "rootfs_backup_keep": 2,
            "awx_job_id": JOBS[host], "awx_workflow_job_id": WORKFLOW, "awx_job_template_name": TEMPLATE}


def report(fleet, name):
    with open(os.path.join(fleet["shared"], "artifacts", name)) as handle:
        return json.load(handle)


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@pytest.fixture(scope="module")
def sliced_job(fleet, ee_image):
    """The two slices of one sliced job, run one after the other."""
    outcomes = {}
    for host in HOSTS:
        outcomes[host] = navigator(fleet, ee_image, "backup_then_build.yml", fleet["inventories"][host],
                                   survey(fleet, host))
    return outcomes


def test_each_slice_backs_up_builds_and_reports_its_own_host(fleet, sliced_job):
    for host in HOSTS:
        status, output = sliced_job[host]
        assert status == 0, output[-4000:]
        sliced = report(fleet, "fleet-report-job%d.json" % JOBS[host])
        # The slice names itself and claims only the host it saw.
        assert sliced["scope"] == {"hosts": [host], "pattern": "fleet", "awx_job_id": JOBS[host],
                                   "awx_workflow_job_id": WORKFLOW, "awx_job_template_name": TEMPLATE}
        (entry,) = sliced["hosts"]
        assert entry["host"] == host and entry["status"] == "ok" and entry["snapshot"] == "1", entry
        assert entry["iso"] == fleet["host_vars"][host]["live_iso_dest"]
        # The ISO on the host (this machine) is the one reported; it was not fetched.
        assert sha256(entry["iso"]) == entry["sha256"]
        assert not os.path.exists(os.path.join(fleet["shared"], "artifacts", host))
        with open(os.path.join(fleet["shared"], "artifacts", "fleet-report-job%d.md" % JOBS[host])) as handle:
            markdown = handle.read()
        assert "AWX job %d of workflow %d: 1 hosts (%s)." % (JOBS[host], WORKFLOW, host) in markdown
    # No unsliced report was written beside them.
    assert not os.path.exists(os.path.join(fleet["shared"], "artifacts", "fleet-report.json"))


def test_the_slices_reports_merge_and_a_host_claimed_twice_is_refused(fleet, ee_image, sliced_job):
    merge = {"liveclone_artifact_dir": INSIDE + "/artifacts", "liveclone_workflow_job_id": WORKFLOW}
    # A report of another workflow in the same directory is left out.
    other = report(fleet, "fleet-report-job%d.json" % JOBS["alpha"])
    other["scope"].update(awx_job_id=99, awx_workflow_job_id=98)
    with open(os.path.join(fleet["shared"], "artifacts", "fleet-report-job99.json"), "w") as handle:
        json.dump(other, handle)
    status, output = navigator(fleet, ee_image, "merge_reports.yml", fleet["inventories"]["alpha"], merge)
    assert status == 0, output[-4000:]
    merged = report(fleet, "fleet-report-workflow%d.json" % WORKFLOW)
    assert merged["scope"]["hosts"] == list(HOSTS)
    assert merged["scope"]["awx_job_id"] == sorted(JOBS.values())
    assert [entry["host"] for entry in merged["hosts"]] == list(HOSTS)
    assert merged["summary"]["ok"] == list(HOSTS) and merged["summary"]["hosts"] == 2
    # A third job of the workflow that claims alpha again: no merged report can be right.
    twice = report(fleet, "fleet-report-job%d.json" % JOBS["alpha"])
    twice["scope"]["awx_job_id"] = 43
    with open(os.path.join(fleet["shared"], "artifacts", "fleet-report-job43.json"), "w") as handle:
        json.dump(twice, handle)
    status, output = navigator(fleet, ee_image, "merge_reports.yml", fleet["inventories"]["alpha"], merge)
    assert status != 0
    assert re.search(r"hosts reported by more than one job of workflow %d: alpha;" % WORKFLOW, output), output[-3000:]
