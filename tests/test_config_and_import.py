"""Configuration precedence and the weight of ``import metatrail``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from metatrail.config import load_settings
from metatrail.errors import ConfigError


def test_precedence_arguments_over_file_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[metatrail]\nnamespace = "from-file"\nsite = "file-site"\n')
    monkeypatch.setenv("METATRAIL_CONFIG", str(config))
    monkeypatch.setenv("METATRAIL_NAMESPACE", "from-env")
    monkeypatch.setenv("METATRAIL_TIMEOUT", "5")
    settings = load_settings(site="arg-site")
    assert (settings.namespace, settings.site, settings.timeout) == ("from-file", "arg-site", 5.0)


def test_default_store_is_found_by_walking_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METATRAIL_STORE")
    monkeypatch.delenv("METATRAIL_HASH_CACHE")
    (tmp_path / ".metatrail").mkdir()
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    settings = load_settings()
    assert settings.store == f"sqlite:///{tmp_path / '.metatrail' / 'metatrail.db'}"
    assert settings.hash_cache == str(tmp_path / ".metatrail" / "hashcache.db")


@pytest.mark.parametrize("name,value", [("timeout", "soon"), ("timeout", "-1"), ("energy", "maybe"),
                                        ("timeout", "nan"), ("flush_timeout", "inf")])
def test_bad_values_are_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(**{name: value})


def test_relative_paths_in_the_project_config_are_taken_from_the_project_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every working directory of a project finds the one store its ``.metatrail/config.toml`` names."""
    monkeypatch.delenv("METATRAIL_STORE")
    monkeypatch.delenv("METATRAIL_HASH_CACHE")
    (tmp_path / ".metatrail").mkdir()
    (tmp_path / ".metatrail" / "config.toml").write_text(
        '[metatrail]\nstore = "sqlite:///.metatrail/project.db"\nhash_cache = "cache/hc.db"\n')
    for cwd in (tmp_path, tmp_path / "sub" / "deeper"):
        cwd.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(cwd)
        settings = load_settings()
        assert settings.store == f"sqlite:///{tmp_path / '.metatrail' / 'project.db'}"
        assert settings.hash_cache == str(tmp_path / "cache" / "hc.db")


def test_relative_paths_in_a_named_config_file_are_taken_from_its_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.toml").write_text('[metatrail]\nstore = "sqlite:///m.db"\n')
    monkeypatch.setenv("METATRAIL_CONFIG", str(tmp_path / "conf" / "c.toml"))
    monkeypatch.chdir(tmp_path)
    assert load_settings().store == f"sqlite:///{tmp_path / 'conf' / 'm.db'}"


def test_bad_config_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[metatrail\n")
    monkeypatch.setenv("METATRAIL_CONFIG", str(bad))
    with pytest.raises(ConfigError, match=str(bad)):
        load_settings()


def test_import_is_light() -> None:
    code = ("import sys, json, metatrail\n"
            "heavy = ['airflow', 'prefect', 'snakemake', 'parsl', 'fastapi', 'torch', 'pandas', 'sqlalchemy',\n"
            "         'openlineage', 'pynvml', 'numpy', 'rich', 'uvicorn', 'dvc_data']\n"
            "print(json.dumps([m for m in heavy if m in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize(("value", "disabled"), [(None, False), ("1", True), (" Yes ", True), ("TRUE", True),
                                                 ("on", True), ("0", False), ("", False), ("no", False)])
def test_the_kill_switch_follows_the_environment_as_it_changes(monkeypatch: pytest.MonkeyPatch, value: str | None,
                                                               disabled: bool) -> None:
    from metatrail.config import is_disabled

    monkeypatch.delenv("METATRAIL_DISABLED", raising=False)
    assert is_disabled() is False
    if value is not None:
        monkeypatch.setenv("METATRAIL_DISABLED", value)
    assert is_disabled() is disabled
    monkeypatch.delenv("METATRAIL_DISABLED", raising=False)
    assert is_disabled() is False
