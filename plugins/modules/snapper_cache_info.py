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
options:
  base_dir:
    description:
      - Directory holding the cache. Defaults to C(/mnt/<ID>_backup), with ID
        from the target's C(/etc/os-release).
    type: path
  snapper_config:
    description: Name of the snapper config of the cache.
    type: str
    default: distroclone-backup
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

from ansible_collections.liveclone.core.plugins.module_utils._command import (
    CommandError,
    CommandRunner,
)
from ansible_collections.liveclone.core.plugins.module_utils._snapper_cache import (
    CacheReader,
    Snapper,
    default_base_dir,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            base_dir=dict(type="path"),
            snapper_config=dict(type="str", default="distroclone-backup"),
        ),
        supports_check_mode=True,
    )
    runner = CommandRunner(module)
    base_dir = os.path.normpath(module.params["base_dir"] or default_base_dir())
    try:
        cache = CacheReader(runner, Snapper(runner, module.params["snapper_config"])).read(base_dir)
    except CommandError as error:
        module.fail_json(msg=str(error))
    module.exit_json(changed=False, **cache.view())


if __name__ == "__main__":
    main()
