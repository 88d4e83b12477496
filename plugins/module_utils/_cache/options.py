# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.
"""The options that name a snapper_cache cache, shared by the modules that
read or write one (snapper_cache, snapper_cache_info, live_iso's cache source).
Their documentation is the doc fragment liveclone.core._cache."""

from __future__ import annotations

from .._common.roottree import default_base_dir


def cache_argument_spec(directory="base_dir"):
    """The argument spec of a cache: its directory, under the name the module
    gives it (live_iso calls it cache_dir), and its snapper config."""
    return {
        directory: dict(type="path"),
        "snapper_config": dict(type="str", default="distroclone-backup"),
    }


def cache_directory(value, os_release="/etc/os-release"):
    """The cache's directory: the one given, else the default base directory
    of the target (/mnt/<ID>_backup)."""
    return value or default_base_dir(os_release)
