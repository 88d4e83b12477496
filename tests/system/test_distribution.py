"""The collection as it is published: the tarball's contents, the execution
environment's build context, and the module documentation under docs/."""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import tarfile

import yaml
from conftest import COLLECTION_DIR, REPO, run, tarball_members


def test_tarball_holds_the_collection_and_no_caches(collection_tarball):
    members = tarball_members(collection_tarball)
    for wanted in ("MANIFEST.json", "FILES.json", "plugins/modules/live_iso.py",
                   "roles/rootfs_backup/meta/argument_specs.yml", "playbooks/backup_then_build.yml",
                   "meta/execution-environment.yml", "ee/execution-environment.yml", "docs/modules/backstore.md"):
        assert wanted in members
    unwanted = re.compile(r"(^|/)(__pycache__|\.pytest_cache|\.ruff_cache|\.venv|\.git|artifacts|context)(/|$)|"
                          r"^tests/output/|\.tar\.gz$|\.pyc$")
    assert [member for member in members if unwanted.search(member)] == []


def test_installed_copy_lists_its_roles_and_playbooks(installed_collections):
    root = installed_collections / "ansible_collections/liveclone/core"
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["collection_info"]["dependencies"] == {"community.general": ">=10.0.0", "ansible.posix": ">=2.0.0"}
    out = run(["ansible-doc", "--list", "--type", "role", "liveclone.core"],
              env=dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(installed_collections))).stdout
    for role in ("backstore", "rootfs_backup", "live_iso"):
        assert "liveclone.core.%s" % role in out


def test_execution_environment_context(tmp_path, collection_tarball):
    """ansible-builder writes the build context of ee/execution-environment.yml
    (the image itself is built and run by test_execution_environment.py)."""
    ee = tmp_path / "ee"
    run(["cp", "-r", os.path.join(COLLECTION_DIR, "ee"), str(ee)])
    run(["cp", str(collection_tarball), str(ee)])
    context = tmp_path / "context"
    run(["ansible-builder", "create", "--file", str(ee / "execution-environment.yml"), "--context", str(context),
         "--output-filename", "Containerfile"])
    containerfile = (context / "Containerfile").read_text()
    definition = yaml.safe_load((ee / "execution-environment.yml").read_text())
    assert 'ARG EE_BASE_IMAGE="%s"' % definition["images"]["base_image"]["name"] in containerfile
    build = context / "_build"
    galaxy = yaml.safe_load((build / "requirements.yml").read_text())
    names = {item["name"] for item in galaxy["collections"]}
    assert names == {"community.general", "ansible.posix", "liveclone.core"}
    assert (build / "collections" / collection_tarball.name).is_file()
    local = [item for item in galaxy["collections"] if item["name"] == "liveclone.core"][0]
    assert os.path.basename(local["source"]) == collection_tarball.name
    # ansible-core and ansible-runner pinned as in requirements.txt.
    requirements = pathlib.Path(REPO, "requirements.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in requirements if "==" in line)
    deps = definition["dependencies"]
    assert deps["ansible_core"]["package_pip"] == "ansible-core==" + pins["ansible-core"].strip()
    assert deps["ansible_runner"]["package_pip"] == "ansible-runner==" + pins["ansible-runner"].strip()
    assert "ansible-core==" + pins["ansible-core"].strip() in containerfile


def test_the_collection_declares_its_ee_dependencies(collection_tarball):
    """ansible-builder's introspection reads meta/execution-environment.yml of
    each collection in an image, with paths from the collection's root."""
    with tarfile.open(collection_tarball) as tar:
        declared = yaml.safe_load(tar.extractfile("meta/execution-environment.yml"))
        python = tar.extractfile(declared["dependencies"]["python"]).read().decode()
        system = tar.extractfile(declared["dependencies"]["system"]).read().decode()
    requirements = pathlib.Path(REPO, "requirements.txt").read_text().splitlines()
    assert [line for line in python.splitlines() if line and line[0] != "#"] == [
        line for line in requirements if line.startswith("jmespath==")]
    assert "openssh-clients [platform:rpm]" in system and "openssh-client [platform:dpkg]" in system
    assert "btrfs-progs" not in system  # the targets' tools stay out of the image


def test_module_docs_are_current(tmp_path):
    """docs/modules/*.md are made from ansible-doc by scripts/module_docs.py (scripts/update_docs.sh)."""
    run([sys.executable, os.path.join(COLLECTION_DIR, "scripts/module_docs.py"), "--out", str(tmp_path)])
    docs = os.path.join(COLLECTION_DIR, "docs/modules")
    made = sorted(os.listdir(tmp_path))
    assert made == sorted(os.listdir(docs)), "run scripts/update_docs.sh"
    for name in made:
        current = pathlib.Path(docs, name).read_text()
        assert (tmp_path / name).read_text() == current, "docs/modules/%s is stale: run scripts/update_docs.sh" % name


def test_backup_task_and_timer_job_take_the_same_arguments():
    """The role's backup task names each argument of the dict the timer's job is written from."""
    role = pathlib.Path(REPO) / "roles/rootfs_backup"
    shared = yaml.safe_load((role / "vars/main.yml").read_text())["__rootfs_backup_module_args"]
    task = next(task for task in yaml.safe_load((role / "tasks/main.yml").read_text())
                if "liveclone.core.snapper_cache" in task)
    arguments = task["liveclone.core.snapper_cache"]
    assert arguments == {key: "{{ __rootfs_backup_module_args.%s }}" % key for key in shared}
