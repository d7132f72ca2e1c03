"""The plugin's settings: an optional ``[metatrail]`` section of ``airflow.cfg`` on top of metatrail's own settings.

Airflow users configure everything in ``airflow.cfg`` (or ``AIRFLOW__METATRAIL__<KEY>`` environment variables, which
Airflow maps onto the same section), so the plugin reads its section there; metatrail's own precedence applies
below it (``airflow.cfg`` counts as an argument: it beats ``.metatrail/config.toml`` and ``METATRAIL_*``).

| ``[metatrail]`` key | meaning | default |
|---|---|---|
| ``disabled`` | record nothing (``METATRAIL_DISABLED=1`` does the same, and reads no file) | ``False`` |
| ``namespace`` | OpenLineage job namespace of DAGs and tasks | ``METATRAIL_NAMESPACE``, else ``airflow`` |
| ``hook_timeout`` | hard cap (s) on the plugin's own work in one hook | metatrail's ``timeout`` (2 s) |
| ``store``, ``site``, ``timeout``, ``flush_timeout``, ``energy``, ``hash_cache`` | metatrail's | ``metatrail.config`` |

Read once per process, lazily, from Airflow's already-loaded configuration: no file is opened for it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from metatrail.config import FALSE_WORDS, TRUE_WORDS, Settings, load_settings
from metatrail.errors import ConfigError
from metatrail.logsafe import log_once

SECTION = "metatrail"
DEFAULT_NAMESPACE = "airflow"
SETTINGS_KEYS = ("store", "site", "timeout", "flush_timeout", "energy", "hash_cache")


@dataclass(frozen=True)
class PluginConfig:
    """What the listener needs to know, resolved once per process."""

    disabled: bool
    namespace: str
    hook_timeout: float
    settings: Settings | None


def _option(conf: Any, key: str) -> str | None:
    try:
        value = conf.get(SECTION, key, fallback=None)
    except Exception:  # Airflow raises its own errors for odd sections; treat as unset
        return None
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip()


def _is_true(key: str, value: str | None) -> bool:
    if value is None:
        return False
    word = value.lower()
    if word in TRUE_WORDS:
        return True
    if word not in FALSE_WORDS:
        log_once(f"cfg-bool:{key}", "metatrail: [metatrail] %s = %r is not a boolean; taken as False", key, value)
    return False


def read_config(conf: Any) -> PluginConfig:
    """Resolve the plugin's settings from Airflow's configuration parser ``conf`` (see module docstring).

    Raises ``ConfigError`` when a value is invalid; the listener logs it once and records nothing.
    """
    if _is_true("disabled", _option(conf, "disabled")):
        return PluginConfig(disabled=True, namespace=DEFAULT_NAMESPACE, hook_timeout=0.0, settings=None)
    overrides = {key: value for key in SETTINGS_KEYS if (value := _option(conf, key)) is not None}
    settings = load_settings(**overrides)
    namespace = _option(conf, "namespace") or (
        settings.namespace if settings.namespace != Settings.namespace else DEFAULT_NAMESPACE)
    hook_timeout = settings.timeout
    if (raw := _option(conf, "hook_timeout")) is not None:
        try:
            hook_timeout = float(raw)
        except ValueError:
            raise ConfigError(f"[metatrail] hook_timeout must be a number of seconds, got {raw!r}") from None
        if hook_timeout <= 0:
            raise ConfigError(f"[metatrail] hook_timeout must be positive, got {raw!r}")
    return PluginConfig(disabled=False, namespace=namespace, hook_timeout=hook_timeout, settings=settings)


@functools.cache
def plugin_config() -> PluginConfig:
    """This process's configuration (read on first use; an invalid one disables recording, logged once)."""
    from metatrail.plugins.airflow.compat import airflow_conf

    try:
        return read_config(airflow_conf())
    except Exception as exc:
        log_once("airflow-config", "metatrail: invalid configuration (%s); recording nothing", exc)
        return PluginConfig(disabled=True, namespace=DEFAULT_NAMESPACE, hook_timeout=0.0, settings=None)
