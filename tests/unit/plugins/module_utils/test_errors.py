# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One error base: every exception class the collection defines derives from
LivecloneError, and each module's main() catches that once (with OSError)."""

from __future__ import annotations

import ast
import pathlib

PLUGINS = pathlib.Path(__file__).resolve().parents[4] / "plugins"


def classes_deriving_from_builtins():
    found = []
    paths = sorted((PLUGINS / "module_utils").rglob("*.py"))
    assert len(paths) > 20, "module_utils not found at %s" % PLUGINS
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name != "LivecloneError":
                bases = [base.id for base in node.bases if isinstance(base, ast.Name)]
                if any(base in ("Exception", "ValueError", "RuntimeError", "OSError") for base in bases):
                    found.append("%s:%s" % (path.name, node.name))
    return found


def test_every_domain_error_derives_from_the_one_base():
    assert classes_deriving_from_builtins() == []


def test_each_module_catches_the_base_once():
    modules = sorted((PLUGINS / "modules").glob("*.py"))
    assert len(modules) == 4, modules
    for path in modules:
        handlers = [node for node in ast.walk(ast.parse(path.read_text(), str(path)))
                    if isinstance(node, ast.ExceptHandler) and node.type is not None]
        caught = [ast.unparse(handler.type) for handler in handlers]
        assert caught.count("LivecloneError") == 1, (path.name, caught)
        assert not any(name.endswith("Error") and name not in ("LivecloneError", "OSError") for name in caught), (
            path.name, caught)
