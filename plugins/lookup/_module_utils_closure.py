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
    imports, directly or through one another, read from their import statements, so that
    a copy of the module (the C(rootfs_backup) role's timer) gets exactly what it runs.
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
    dest: /usr/local/share/liveclone/module_utils/{{ item | basename }}
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


def imported_names(source, path, relative_to_module_utils):
    """Names of the module_utils modules that `source` imports, absolutely
    (ansible_collections.liveclone.core.plugins.module_utils._x) or, in a
    module_utils file, relatively (from ._x import ..., from . import _x)."""
    names = set()
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            dotted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module
            elif node.level == 1 and relative_to_module_utils:
                base = ".".join(filter(None, (PACKAGE, node.module)))
            else:
                continue
            # from X import y: y is a module of X, or a name defined in X.
            dotted = [base + "." + alias.name for alias in node.names]
        else:
            continue
        names.update(name[len(PACKAGE) + 1:].split(".")[0] for name in dotted if name.startswith(PACKAGE + "."))
    return names


def closure(module_path):
    """The module_utils files `module_path` imports, directly or through one another."""
    directory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(module_path))), "module_utils")
    found, todo = set(), [module_path]
    while todo:
        path = todo.pop()
        with open(path, encoding="utf-8") as handle:
            names = imported_names(handle.read(), path, path != module_path)
        for name in names:
            wanted = os.path.join(directory, name + ".py")
            if not os.path.isfile(wanted):
                raise AnsibleLookupError("%s imports module_utils %s, but %s is no file" % (path, name, wanted))
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
