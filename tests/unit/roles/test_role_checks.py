# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The roles' and playbooks' checks of names, evaluated by Ansible's own
templating as a run evaluates them: a pattern is matched whole. Python's `$`
matches before a trailing newline too, so `^name$` let `name\\n` through."""

from __future__ import annotations

import glob
import os
import re

import pytest
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

COLLECTION = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
LOADER = DataLoader()

# (file, task name): the variable the check is of, values it takes, values it refuses.
CHECKS = {
    ("roles/backup_server/tasks/client.yml", "Refuse a client name that could leave the server's base directory"): (
        "backup_server_client_name",
        ["web1", "Web-1.example_2", "a" * 54],
        ["web1\n", "web1\n../../etc", "../etc", ".hidden", "-x", "a b", "", "a" * 55]),
    ("playbooks/merge_reports.yml", "Refuse a run without a workflow to merge"): (
        "__liveclone_workflow",
        [12, "12"],
        ["12\n", "12\nx", None, "x", "1 2", ""]),
}
# A test of a pattern in a condition: `is regex(...)`, `is not match(...)`.
PATTERN_TEST = re.compile(r"\bis\s+(?:not\s+)?(?:regex|match|search)\(\s*([^,)]+)")


def load(path):
    return LOADER.load_from_file(os.path.join(COLLECTION, path))


def role_vars():
    values = {}
    for path in sorted(glob.glob(os.path.join(COLLECTION, "roles/*/defaults/main.yml"))
                       + glob.glob(os.path.join(COLLECTION, "roles/*/vars/main.yml"))):
        values.update(LOADER.load_from_file(path) or {})
    return values


def tasks_of(data):
    """Every task of a tasks file or a playbook, blocks opened."""
    found = []
    for item in data or []:
        if "hosts" in item:
            found += tasks_of(item.get("pre_tasks")) + tasks_of(item.get("tasks")) + tasks_of(item.get("post_tasks"))
        elif "block" in item:
            found += tasks_of(item["block"]) + tasks_of(item.get("rescue")) + tasks_of(item.get("always"))
        else:
            found.append(item)
    return found


def conditions(path, name):
    task = next(task for task in tasks_of(load(path)) if task.get("name") == name)
    that = task["ansible.builtin.assert"]["that"]
    return that if isinstance(that, list) else [that]


def holds(path, name, variable, value):
    templar = Templar(loader=LOADER, variables=dict(role_vars(), **{variable: value}))
    # A run trusts the conditions of the collection's own files as templates; so does this test.
    return all(templar.evaluate_conditional(trust_as_template(condition)) for condition in conditions(path, name))


@pytest.mark.parametrize("check", sorted(CHECKS), ids=lambda check: check[1])
def test_a_check_takes_good_names_and_refuses_the_rest_newlines_included(check):
    variable, good, bad = CHECKS[check]
    assert [value for value in good if not holds(*check, variable, value)] == []
    assert [value for value in bad if holds(*check, variable, value)] == []


def test_no_check_anchors_a_pattern_with_dollar():
    """Each pattern tested in a role's or playbook's condition, given as a
    literal or as a role variable, ends with \\Z (or is matched whole)."""
    variables = role_vars()
    found = []
    for path in sorted(glob.glob(os.path.join(COLLECTION, "roles/*/tasks/*.yml"))
                       + glob.glob(os.path.join(COLLECTION, "playbooks/*.yml"))):
        with open(path) as handle:
            for match in PATTERN_TEST.finditer(handle.read()):
                argument = match.group(1).strip()
                pattern = argument.strip("'\"") if argument[0] in "'\"" else str(variables.get(argument, ""))
                if pattern.endswith("$"):
                    found.append("%s: %s" % (os.path.relpath(path, COLLECTION), match.group(0)))
    assert found == []
