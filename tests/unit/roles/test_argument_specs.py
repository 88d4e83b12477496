# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The roles' argument specs say what the modules do."""

from __future__ import annotations

import os

import yaml

from ansible_collections.liveclone.core.plugins.module_utils._backstore import desired as bs

ROLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "..", "roles")


def role_options(role):
    with open(os.path.join(ROLES, role, "meta", "argument_specs.yml")) as handle:
        return yaml.safe_load(handle)["argument_specs"]["main"]["options"]


def description(option):
    text = option["description"]
    return " ".join(text) if isinstance(text, list) else text


def test_backstore_path_names_each_layouts_file():
    text = description(role_options("backstore")["backstore_path"])
    for layout in bs.LAYOUTS.values():
        assert "C(%s)" % layout.file_name.format(label="<label>") in text


def test_backstore_persistence_conf_is_for_live_boot_only():
    """layout_tree writes persistence.conf for live-boot only."""
    text = description(role_options("backstore")["backstore_persistence_conf"])
    assert "live-boot" in text
    assert "casper" not in text
