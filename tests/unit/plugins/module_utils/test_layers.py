# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The layering of plugins/module_utils, as a rule on paths: the bottom
layer (_common) imports only itself; the shared cache layout (_cache) the
bottom layer; each resource (_backstore, _snapper_cache, _live_iso) itself,
the cache layout and the bottom layer, never another resource."""

from __future__ import annotations

import ast
import pathlib

import pytest

MODULE_UTILS = pathlib.Path(__file__).resolve().parents[4] / "plugins" / "module_utils"
PACKAGE = "ansible_collections.liveclone.core.plugins.module_utils"
ALLOWED = {
    "_common": {"_common"},
    "_cache": {"_common", "_cache"},
    "_backstore": {"_common", "_cache", "_backstore"},
    "_snapper_cache": {"_common", "_cache", "_snapper_cache"},
    "_live_iso": {"_common", "_cache", "_live_iso"},
}
# Each resource holds the same files by the same names.
RESOURCE_FILES = {"__init__.py", "desired.py", "read.py", "plan.py", "apply.py", "run.py"}


def imported_packages(path, package):
    """The subpackages of module_utils that the file imports from."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found.add(package)
            elif node.level == 2:
                found.add((node.module or "").split(".")[0])
            elif node.level == 0 and (node.module or "").startswith(PACKAGE + "."):
                found.add(node.module[len(PACKAGE) + 1:].split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name[len(PACKAGE) + 1:].split(".")[0] for alias in node.names
                         if alias.name.startswith(PACKAGE + "."))
    return found


def layer_violations(root):
    violations = []
    for path in sorted(root.glob("*/*.py")):
        package = path.parent.name
        for imported in imported_packages(path, package) - ALLOWED.get(package, set()):
            violations.append("%s/%s imports %s" % (package, path.name, imported or "module_utils itself"))
    return violations


def test_no_file_lies_outside_a_layer():
    assert sorted(path.name for path in MODULE_UTILS.iterdir() if path.name != "__pycache__") == sorted(ALLOWED)


def test_each_layer_imports_only_what_it_may():
    assert layer_violations(MODULE_UTILS) == []


@pytest.mark.parametrize("resource", ["_backstore", "_snapper_cache", "_live_iso"])
def test_each_resource_has_the_same_shape(resource):
    assert {path.name for path in (MODULE_UTILS / resource).glob("*.py")} >= RESOURCE_FILES


def test_the_rule_catches_a_resource_importing_another(tmp_path):
    (tmp_path / "_live_iso").mkdir()
    (tmp_path / "_live_iso" / "plan.py").write_text("from .._snapper_cache.read import backup_excludes\n")
    (tmp_path / "_common").mkdir()
    (tmp_path / "_common" / "fs.py").write_text("from %s._cache.layout import Cache\n" % PACKAGE)
    assert layer_violations(tmp_path) == ["_common/fs.py imports _cache", "_live_iso/plan.py imports _snapper_cache"]
