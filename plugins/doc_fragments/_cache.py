# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

from __future__ import annotations


class ModuleDocFragment:

    # The options of plugins/module_utils/_cache/options.py's cache_argument_spec.

    # The snapper config of a cache, for every module that names a cache.
    DOCUMENTATION = r"""
options:
  snapper_config:
    description:
      - Name of the snapper config of the cache; 1 to 64 of letters, digits, C(-), C(_)
        and C(.), starting with a letter or digit (the whole value, so a trailing newline is refused).
    type: str
    default: distroclone-backup
"""

    # The cache's directory, for the modules that call it base_dir.
    BASE_DIR = r"""
options:
  base_dir:
    description:
      - Directory holding the cache, usually where the backup volume is mounted.
        Defaults to C(/mnt/<ID>_backup), with ID from the target's C(/etc/os-release)
        (V(linux) when ID is not a plain name), as DistroClone Backup does.
      - Made canonical first (V(//) and V(/./) are V(/)); absolute, not V(/), no control
        characters.
      - M(liveclone.core.snapper_cache) also needs it to exist, not to run through a symlink
        nor lie on a kernel filesystem, to be writable (a read-only mount is refused) for
        O(liveclone.core.snapper_cache#module:state=present) and
        O(liveclone.core.snapper_cache#module:state=absent), and to hold none of C(") C(\) C($) C(`),
        since snapper writes it into its config as C(SUBVOLUME="...").
    type: path
"""
