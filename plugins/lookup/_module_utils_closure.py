# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

from __future__ import annotations

DOCUMENTATION = r"""
name: _module_utils_closure
short_description: The collection's module_utils files a module imports
version_added: 0.1.0
description:
  - Returns the paths of the files in the collection's C(plugins/module_utils/) that a module
    imports, directly or through one another, read from their import statements, with the
    C(__init__.py) of each subpackage on the way, so that a copy of the module (the
    C(rootfs_backup) role's timer) gets exactly what it runs.
  - Private to liveclone.core.
author:
  - liveclone.core maintainers (@liveclone)
options:
  _terms:
    description: Paths of module files in the collection's C(plugins/modules/).
    type: list
    elements: path
    required: true
"""

EXAMPLES = r"""
- name: Copy the module_utils snapper_cache imports
  ansible.builtin.copy:
    src: "{{ item }}"
    dest: /usr/local/share/liveclone/module_utils/{{ item | relpath(role_path ~ '/../../plugins/module_utils') }}
    mode: "0644"
  loop: "{{ query('liveclone.core._module_utils_closure', role_path ~ '/../../plugins/modules/snapper_cache.py') }}"
"""

RETURN = r"""
_raw:
  description: The module_utils files, sorted by path.
  type: list
  elements: path
"""

import ast
import os

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase

PACKAGE = "ansible_collections.liveclone.core.plugins.module_utils"


def imported_names(source, path, package):
    """Dotted names below module_utils (tuples of parts) that `source`
    imports: absolutely (ansible_collections.liveclone.core.plugins.module_utils._x.y)
    or, in a module_utils file of package (a tuple of parts below
    module_utils; None for a module file), relatively (from .y import z,
    from ..x.y import z, from . import y). A name may end in a name defined
    in the module it names; resolve() tells."""
    names = set()
    prefix = tuple(PACKAGE.split("."))
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            dotted = [tuple(alias.name.split(".")) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = tuple(node.module.split("."))
            elif package is not None and node.level <= len(package) + 1:
                module = tuple(filter(None, (node.module or "").split(".")))
                base = prefix + package[:len(package) - node.level + 1] + module
            else:
                continue
            dotted = [base + (alias.name,) for alias in node.names]
        else:
            continue
        names.update(name[len(prefix):] for name in dotted if name[:len(prefix)] == prefix and len(name) > len(prefix))
    return names


def resolve(directory, parts):
    """The files a dotted name below module_utils stands for: the module it
    names (or whose name it ends in), and the __init__.py of each package on the way."""
    for module in (parts, parts[:-1]):
        if not module:
            continue
        if os.path.isfile(os.path.join(directory, *module) + ".py"):
            found = [os.path.join(directory, *module) + ".py"]
        elif os.path.isfile(os.path.join(directory, *module, "__init__.py")):
            found = [os.path.join(directory, *module, "__init__.py")]
        else:
            continue
        return found + [os.path.join(directory, *module[:depth], "__init__.py") for depth in range(1, len(module))]
    return None


def closure(module_path):
    """The module_utils files `module_path` imports, directly or through one another."""
    directory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(module_path))), "module_utils")
    found, todo = set(), [module_path]
    while todo:
        path = todo.pop()
        package = None
        if path != module_path:
            relative = os.path.relpath(os.path.dirname(path), directory)
            package = () if relative == "." else tuple(relative.split(os.sep))
        with open(path, encoding="utf-8") as handle:
            names = imported_names(handle.read(), path, package)
        for name in names:
            files = resolve(directory, name)
            if files is None:
                raise AnsibleLookupError("%s imports module_utils %s, but no file under %s holds it"
                                         % (path, ".".join(name), directory))
            for wanted in files:
                if wanted not in found:
                    found.add(wanted)
                    todo.append(wanted)
    return sorted(found)


class LookupModule(LookupBase):

    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        files = set()
        for term in terms:
            try:
                files.update(closure(term))
            except (OSError, SyntaxError) as error:
                raise AnsibleLookupError("cannot read the imports of %s: %s" % (term, error)) from error
        return sorted(files)
