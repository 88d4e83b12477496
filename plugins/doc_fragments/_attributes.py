# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

from __future__ import annotations


class ModuleDocFragment:

    # Standard attributes shared by every module of the collection.
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Can run in check_mode and return the planned operations without changing the target.
  diff_mode:
    description: Will return details on what has changed (or would change) in diff mode.
  idempotent:
    description: A second run with the same arguments reports C(changed=false).
"""

    ALL_SUPPORTED = r"""
options: {}
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  idempotent:
    support: full
"""

    # For _info modules, which change nothing.
    INFO_MODULE = r"""
options: {}
attributes:
  check_mode:
    support: full
    details: This module changes nothing, in check mode or not.
  diff_mode:
    support: N/A
    details: This module changes nothing.
  idempotent:
    support: full
"""
