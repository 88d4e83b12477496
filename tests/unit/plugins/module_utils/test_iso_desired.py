# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""live_iso's cache directory as Desired resolves it from the parameters."""

from __future__ import annotations

from ansible_collections.liveclone.core.plugins.module_utils._live_iso import desired as _iso_desired


def desired(monkeypatch, **params):
    monkeypatch.setattr(_iso_desired, "cache_directory", lambda value: value or "/mnt/testos_backup")
    return _iso_desired.Desired.from_params(dict({"dest": "/srv/live.iso"}, **params))


def test_cache_source_without_cache_dir_takes_the_default_base_dir(monkeypatch):
    """The role's documented default: an omitted cache_dir is /mnt/<ID>_backup."""
    assert desired(monkeypatch).cache_dir == "/mnt/testos_backup"


def test_cache_dir_given_is_kept(monkeypatch):
    assert desired(monkeypatch, cache_dir="/srv/cache").cache_dir == "/srv/cache"


def test_path_source_leaves_cache_dir_unset(monkeypatch):
    assert desired(monkeypatch, source="path", source_path="/srv/tree").cache_dir is None
