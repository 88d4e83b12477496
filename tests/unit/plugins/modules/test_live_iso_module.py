# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""live_iso's parameters as main() hands them to the build."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.liveclone.core.plugins.modules import live_iso


def handed_params(monkeypatch, capsys, args):
    """The params main() passes to run(), which stands in for the build."""
    seen = {}

    def fake_run(module, runner, params, check_mode):
        seen.update(params)
        return {"changed": False}, []

    monkeypatch.setattr(live_iso, "run", fake_run)
    monkeypatch.setattr(live_iso, "cache_directory", lambda value: value or "/mnt/testos_backup")
    with patch_module_args(args), pytest.raises(SystemExit):
        live_iso.main()
    result = json.loads(capsys.readouterr().out)
    assert not result.get("failed"), result
    return seen


def test_cache_source_without_cache_dir_takes_the_default_base_dir(monkeypatch, capsys):
    """The role's documented default: an omitted cache_dir is /mnt/<ID>_backup."""
    params = handed_params(monkeypatch, capsys, {"dest": "/srv/live.iso"})
    assert params["cache_dir"] == "/mnt/testos_backup"


def test_cache_dir_given_is_kept(monkeypatch, capsys):
    params = handed_params(monkeypatch, capsys, {"dest": "/srv/live.iso", "cache_dir": "/srv/cache"})
    assert params["cache_dir"] == "/srv/cache"


def test_path_source_leaves_cache_dir_unset(monkeypatch, capsys):
    params = handed_params(monkeypatch, capsys, {"dest": "/srv/live.iso", "source": "path", "source_path": "/srv/tree"})
    assert params["cache_dir"] is None
