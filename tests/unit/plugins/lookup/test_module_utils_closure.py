# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The module_utils a module imports: what the rootfs_backup timer copies."""

from __future__ import annotations

import os

import pytest
from ansible.errors import AnsibleLookupError

from ansible_collections.liveclone.core.plugins.lookup import _module_utils_closure as closure_lookup

PLUGINS = os.path.dirname(os.path.dirname(closure_lookup.__file__))
PACKAGE = closure_lookup.PACKAGE


def plant(tmp_path, module, utils):
    """A plugins tree: modules/mod.py, and module_utils/<name>.py for each entry."""
    (tmp_path / "modules").mkdir()
    (tmp_path / "module_utils").mkdir()
    (tmp_path / "modules" / "mod.py").write_text(module)
    for name, text in utils.items():
        (tmp_path / "module_utils" / ("%s.py" % name)).write_text(text)
    return str(tmp_path / "modules" / "mod.py")


def names(paths):
    return [os.path.basename(path) for path in paths]


@pytest.mark.parametrize("module, utils, expected", [
    # absolute, then relative through one another
    ("from %s._a import x\n" % PACKAGE,
     {"_a": "from ._b import y\n", "_b": "from . import _c\n", "_c": "", "_unused": ""},
     ["_a.py", "_b.py", "_c.py"]),
    # `import package.x`, and `from package import x`, also inside a function
    ("import %s._a\ndef f():\n    from %s import _b\n" % (PACKAGE, PACKAGE),
     {"_a": "", "_b": "import os\nfrom ansible.module_utils.basic import AnsibleModule\n", "_c": ""},
     ["_a.py", "_b.py"]),
    # a cycle ends
    ("from %s._a import x\n" % PACKAGE, {"_a": "from ._b import y\n", "_b": "from ._a import x\n"},
     ["_a.py", "_b.py"]),
    # a relative import in the module file is of plugins.modules, not module_utils
    ("from ._a import x\n", {"_a": ""}, []),
])
def test_closure(tmp_path, module, utils, expected):
    assert names(closure_lookup.closure(plant(tmp_path, module, utils))) == expected


def test_an_import_of_a_missing_file_fails(tmp_path):
    path = plant(tmp_path, "from %s._gone import x\n" % PACKAGE, {})
    with pytest.raises(AnsibleLookupError, match="_gone"):
        closure_lookup.closure(path)


def test_subpackages_resolve_with_their_init_files(tmp_path):
    """Relative imports between subpackages (from ..b.y import z), and a name imported from a module."""
    module = plant(tmp_path, "from %s._a.x import f\n" % PACKAGE, {})
    utils = tmp_path / "module_utils"
    for package, files in {"_a": {"x": "from ..b.y import g\nfrom .z import h\n", "z": ""},
                           "b": {"y": "from . import w\n", "w": "", "unused": ""}}.items():
        (utils / package).mkdir()
        (utils / package / "__init__.py").write_text("")
        for name, text in files.items():
            (utils / package / (name + ".py")).write_text(text)
    found = [os.path.relpath(path, str(utils)) for path in closure_lookup.closure(module)]
    assert found == ["_a/__init__.py", "_a/x.py", "_a/z.py", "b/__init__.py", "b/w.py", "b/y.py"]


def test_snapper_cache_closure_is_what_it_imports():
    """The timer's copy holds what the module runs, and not the ISO builder
    or the backing store. (Its job taking a snapshot with only these files is
    checked on a VM by the backup_then_build scenario.)"""
    utils = os.path.join(PLUGINS, "module_utils")
    files = [os.path.relpath(path, utils)
             for path in closure_lookup.closure(os.path.join(PLUGINS, "modules", "snapper_cache.py"))]
    assert {"_snapper_cache/__init__.py", "_snapper_cache/run.py", "_snapper_cache/plan.py",
            "_snapper_cache/apply.py", "_cache/layout.py", "_cache/snapper.py", "_common/command.py",
            "_cache/options.py", "_common/plan.py", "_common/lock.py", "_common/btrfs.py",
            "_common/roottree.py"} <= set(files)
    assert not [name for name in files if name.startswith(("_live_iso", "_backstore"))]
