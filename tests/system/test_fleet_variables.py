"""The fleet playbooks' variables from an inventory's group_vars, as an AWX
inventory gives them, and extra vars (an AWX survey) over them. Cheap: every
host's build fails at once on its missing source tree, before anything is
read or written; what is checked is which hosts ran, what each play saw, and
where the fleet report went."""

from __future__ import annotations

import json
import os

import ansible_runner
import pytest
import yaml

# delta is also in group odd, whose live_iso_concurrency is no number.
HOSTS = ("alpha", "bravo", "charlie", "delta")


@pytest.fixture(scope="module")
def inventory(tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet-variables")
    hosts = {
        "fleet": {
            "hosts": {host: {} for host in HOSTS},
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_become": False,
                "live_iso_install_packages": False,
                "live_iso_source": "path",
                "live_iso_source_path": str(work / "no-such-tree"),
                "live_iso_dest": str(work / "iso" / "live.iso"),
            },
        },
        "odd": {"hosts": {"delta": {}}},
    }
    group_vars = {
        # The inventory's own variables: the report's play on the controller reads them too.
        "all": {"liveclone_hosts": "alpha:bravo:delta", "liveclone_artifact_dir": str(work / "group-artifacts")},
        "odd": {"live_iso_concurrency": "many"},
    }
    directory = work / "inventory"
    (directory / "group_vars").mkdir(parents=True)
    (directory / "hosts.yml").write_text(yaml.safe_dump(hosts))
    for group, variables in group_vars.items():
        (directory / "group_vars" / ("%s.yml" % group)).write_text(yaml.safe_dump(variables))
    return {"work": work, "dir": str(directory)}


def run_job(inventory, installed_collections, name, extravars):
    private = os.path.join(inventory["work"], "runner-%s" % name)
    os.makedirs(private)
    env = {"ANSIBLE_COLLECTIONS_PATH": str(installed_collections), "ANSIBLE_NOCOLOR": "1"}
    result = ansible_runner.run(private_data_dir=private, playbook="liveclone.core.build_iso",
                                inventory=inventory["dir"], extravars=extravars, envvars=env, quiet=True,
                                timeout=600)
    with open(os.path.join(private, "artifacts", result.config.ident, "stdout")) as handle:
        return result, handle.read()


def hosts_of(result, action, event="runner_on_start"):
    return sorted({e["event_data"]["host"] for e in result.events
                   if e["event"] == event and e.get("event_data", {}).get("task_action") == action})


def report_hosts(directory):
    with open(os.path.join(directory, "fleet-report.json")) as handle:
        return sorted(entry["host"] for entry in json.load(handle)["hosts"])


@pytest.fixture(scope="module")
def jobs(inventory, installed_collections):
    """The survey job first, so that the group's artifact directory is still
    absent when it ends; then the job with the inventory's values only."""
    extra_dir = str(inventory["work"] / "extra-artifacts")
    survey = run_job(inventory, installed_collections, "survey",
                     {"liveclone_artifact_dir": extra_dir, "live_iso_concurrency": 1})
    group_dir_after_survey = os.path.exists(inventory["work"] / "group-artifacts")
    plain = run_job(inventory, installed_collections, "inventory", {})
    return {"survey": survey, "inventory": plain, "extra_dir": extra_dir,
            "group_dir": str(inventory["work"] / "group-artifacts"), "group_dir_after_survey": group_dir_after_survey}


def test_inventory_hosts_pattern(jobs):
    """liveclone_hosts from group_vars/all: charlie is left out, before the
    play's first check, and the report lists the pattern's hosts."""
    result, stdout = jobs["inventory"]
    assert hosts_of(result, "liveclone.core.live_iso") == ["alpha", "bravo"], stdout[-3000:]
    assert "charlie" not in hosts_of(result, "ansible.builtin.validate_argument_spec"), stdout[-3000:]
    assert report_hosts(jobs["group_dir"]) == ["alpha", "bravo", "delta"], stdout[-3000:]


def test_group_concurrency_reaches_the_play(jobs):
    """group_vars/odd's live_iso_concurrency is what delta's play sees: the
    fleet's argument spec refuses it."""
    result, stdout = jobs["inventory"]
    refusals = [e["event_data"]["res"]["msg"] for e in result.events if e["event"] == "runner_on_failed"
                and e["event_data"].get("task_action") == "ansible.builtin.validate_argument_spec"]
    assert len(refusals) == 1 and "live_iso_concurrency" in refusals[0], stdout[-3000:]
    assert hosts_of(result, "ansible.builtin.validate_argument_spec", "runner_on_failed") == ["delta"]


def test_extra_vars_win(jobs):
    """The survey's artifact directory and concurrency win over the inventory's:
    the report is written there, and delta's play sees a number and builds."""
    result, stdout = jobs["survey"]
    assert report_hosts(jobs["extra_dir"]) == ["alpha", "bravo", "delta"], stdout[-3000:]
    assert not jobs["group_dir_after_survey"]
    assert hosts_of(result, "liveclone.core.live_iso") == ["alpha", "bravo", "delta"], stdout[-3000:]
