# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._cache import options as co


@pytest.fixture
def os_release(tmp_path):
    path = tmp_path / "os-release"
    path.write_text('NAME="Debian GNU/Linux"\nID=debian\n')
    return str(path)


@pytest.mark.parametrize("given, expected", [
    (None, "/mnt/debian_backup"),
    ("", "/mnt/debian_backup"),
    ("/srv/cache", "/srv/cache"),
])
def test_cache_directory(os_release, given, expected):
    assert co.cache_directory(given, os_release) == expected


@pytest.mark.parametrize("directory", ["base_dir", "cache_dir"])
def test_cache_argument_spec(directory):
    assert co.cache_argument_spec(directory) == {
        directory: {"type": "path"},
        "snapper_config": {"type": "str", "default": "distroclone-backup"},
    }
