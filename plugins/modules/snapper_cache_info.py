#!/usr/bin/python
# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: snapper_cache_info
short_description: Read a rootfs backup cache without changing it
version_added: 0.1.0
description:
  - Returns the view M(liveclone.core.snapper_cache) returns of an existing
    cache (its versioning, snapshots and C(.backup_meta)), changing nothing.
author:
  - liveclone.core maintainers (@liveclone)
extends_documentation_fragment:
  - liveclone.core._attributes
  - liveclone.core._attributes.INFO_MODULE
  - liveclone.core._cache
  - liveclone.core._cache.BASE_DIR
notes:
  - Nothing in O(base_dir) is followed through a symlink. A C(.rootfs_cache) or
    C(.snapshots) that is a link (or no directory, a mount point, on another
    filesystem) and a C(.backup_meta) that is a directory fail the task with a
    message; entries of C(.snapshots) that are links or no subvolumes are not
    snapshots and are named in a warning.
seealso:
  - module: liveclone.core.snapper_cache
"""

EXAMPLES = r"""
- name: Read the cache
  liveclone.core.snapper_cache_info:
    base_dir: /mnt/debian_backup
  register: cache

- name: Show the newest snapshot
  ansible.builtin.debug:
    msg: "{{ cache.snapshots | last }}"
  when: cache.snapshots | length > 0
"""

RETURN = r"""
base_dir:
  description: The cache's base directory.
  returned: always
  type: str
exists:
  description: Whether C(.rootfs_cache) exists.
  returned: always
  type: bool
versioning:
  description: The versioning found (V(snapper), V(btrfs) or V(none)), null when there is no cache.
  returned: always
  type: str
snapshots:
  description: The snapshots, oldest first, as M(liveclone.core.snapper_cache) returns them.
  returned: always
  type: list
  elements: dict
metadata:
  description: The C(.backup_meta) values, read as data; null when there is none.
  returned: always
  type: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.liveclone.core.plugins.module_utils._cache.layout import CacheReader
from ansible_collections.liveclone.core.plugins.module_utils._cache.options import (
    cache_argument_spec,
    cache_directory,
)
from ansible_collections.liveclone.core.plugins.module_utils._cache.snapper import Snapper
from ansible_collections.liveclone.core.plugins.module_utils._common.command import (
    CommandRunner,
)
from ansible_collections.liveclone.core.plugins.module_utils._common.errors import LivecloneError
from ansible_collections.liveclone.core.plugins.module_utils._common.fs import (
    canonical_path,
    check_path_text,
    describe_os_error,
)
from ansible_collections.liveclone.core.plugins.module_utils._common.text import check_snapper_name


def check_params(base_dir, snapper_config):
    """The refusal of the parameters, or None; base_dir is canonical ('//' is '/')."""
    problem = check_path_text("base_dir", base_dir) or check_snapper_name("snapper_config", snapper_config)
    if problem:
        return problem
    if not os.path.isabs(base_dir):
        return "base_dir %r is relative; give an absolute path" % base_dir
    if base_dir == "/":
        return "base_dir / holds no cache; give the directory of one, such as /mnt/debian_backup"
    return None


def main():
    module = AnsibleModule(
        argument_spec=cache_argument_spec(),
        supports_check_mode=True,
    )
    runner = CommandRunner(module)
    base_dir = canonical_path(cache_directory(module.params["base_dir"]))
    problem = check_params(base_dir, module.params["snapper_config"])
    if problem:
        module.fail_json(msg=problem)
    try:
        cache = CacheReader(runner, Snapper(runner, module.params["snapper_config"])).read(base_dir)
    except LivecloneError as error:
        module.fail_json(msg=str(error))
    except OSError as error:
        module.fail_json(msg=describe_os_error(error, "reading the cache"))
    if cache.problems:
        module.fail_json(msg="; ".join(cache.problems))
    for warning in cache.ignored:
        module.warn(warning)
    module.exit_json(changed=False, **cache.view())


if __name__ == "__main__":
    main()
