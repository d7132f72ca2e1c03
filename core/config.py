"""Settings, read lazily, with one precedence: explicit arguments > config file > environment > defaults.

The kill switch ``METATRAIL_DISABLED=1`` is checked first and only in the environment, so a disabled process reads no
file and touches no disk or network.

| setting          | environment                 | ``[metatrail]`` key | default                                   |
|------------------|-----------------------------|---------------------|-------------------------------------------|
| store            | ``METATRAIL_STORE``         | ``store``           | the nearest ``.metatrail/metatrail.db``   |
| namespace        | ``METATRAIL_NAMESPACE``     | ``namespace``       | ``default`` (hosts pass their own)        |
| site             | ``METATRAIL_SITE``          | ``site``            | ``local``                                 |
| call timeout (s) | ``METATRAIL_TIMEOUT``       | ``timeout``         | ``2.0``                                   |
| exit flush (s)   | ``METATRAIL_FLUSH_TIMEOUT`` | ``flush_timeout``   | ``30``                                    |
| energy on/off    | ``METATRAIL_ENERGY``        | ``energy``          | on                                        |
| hash cache file  | ``METATRAIL_HASH_CACHE``    | ``hash_cache``      | beside an SQLite store, or ~/.cache       |
| event writer     | ``METATRAIL_WRITER``        | ``writer``          | ``auto``                                  |

``writer`` says where events are built and stored: ``thread`` (a thread of the host process), ``process`` (a child
process, so that the work holds none of the host's GIL), or ``auto``: a thread, and a child process once a process has
recorded ``PROCESS_AFTER_EVENTS`` events (busy hosts; a short-lived process never pays the child's start-up).

The config file is ``$METATRAIL_CONFIG`` or ``config.toml`` inside the ``.metatrail`` directory found by walking up
from the working directory. A relative path in it (an ``sqlite:///`` store, ``hash_cache``) is taken from the project
root, the directory that holds ``.metatrail`` (for a file elsewhere: from the file's directory), so that every
working directory of the project finds the same store; relative paths in the environment or in arguments are taken
from the working directory.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from metatrail.errors import ConfigError

STORE_DIR_NAME = ".metatrail"
# URL prefixes of the stores that are one file (an embedded SQLite store, and the drop directory beside one,
# metatrail.store.drop): the path follows the third slash.
FILE_STORE_PREFIXES = ("sqlite:///", "drop:///")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def is_disabled() -> bool:
    """True when the kill switch is set. Reads one environment variable and nothing else."""
    if _ENVIRON_DATA is not None:
        # Every hook asks, several times per task: os.environ.get of a variable that is not set raises and catches a
        # KeyError inside (about a microsecond); the mapping underneath answers in a few tens of nanoseconds.
        raw = _ENVIRON_DATA.get(_DISABLED_KEY)
        if raw is None:
            return False
        return os.environ.decodevalue(raw).strip().lower() in TRUE_WORDS
    return os.environ.get("METATRAIL_DISABLED", "").strip().lower() in TRUE_WORDS


# CPython's os.environ keeps its values in ``_data`` (encoded keys, kept in step with os.environ's own changes); on an
# interpreter without it, is_disabled() asks os.environ itself.
_ENVIRON_DATA: dict[Any, Any] | None = getattr(os.environ, "_data", None)
_DISABLED_KEY = os.environ.encodekey("METATRAIL_DISABLED") if hasattr(os.environ, "encodekey") else None
if not isinstance(_ENVIRON_DATA, dict) or _DISABLED_KEY is None or not hasattr(os.environ, "decodevalue"):
    _ENVIRON_DATA = None


def find_store_dir(start: Path | None = None) -> Path | None:
    """The nearest ``.metatrail`` directory at or above ``start`` (default: the working directory)."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        candidate = d / STORE_DIR_NAME
        if candidate.is_dir():
            return candidate
    return None


@dataclass(frozen=True)
class Settings:
    """Resolved settings; build with :func:`load_settings`."""

    store: str = ""
    namespace: str = "default"
    site: str = "local"
    timeout: float = 2.0
    flush_timeout: float = 30.0
    energy: bool = True
    hash_cache: str = ""
    writer: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def store_dir(self) -> Path | None:
        """The directory of an SQLite store file, where side files (the hash cache) live."""
        for prefix in FILE_STORE_PREFIXES:  # a drop store's side files are its store's
            if self.store.startswith(prefix):
                return Path(self.store[len(prefix) :]).parent
        return None


_ENV = {
    "store": "METATRAIL_STORE",
    "namespace": "METATRAIL_NAMESPACE",
    "site": "METATRAIL_SITE",
    "timeout": "METATRAIL_TIMEOUT",
    "flush_timeout": "METATRAIL_FLUSH_TIMEOUT",
    "energy": "METATRAIL_ENERGY",
    "hash_cache": "METATRAIL_HASH_CACHE",
    "writer": "METATRAIL_WRITER",
}
WRITERS = ("auto", "thread", "process")


def _coerce(name: str, value: Any) -> Any:
    if name in ("timeout", "flush_timeout"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"setting '{name}' must be a number of seconds, got {value!r}") from None
        if not math.isfinite(number) or number <= 0:
            raise ConfigError(f"setting '{name}' must be a positive, finite number of seconds, got {value!r}")
        return number
    if name == "energy":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ConfigError(f"setting 'energy' must be on/off (1/0), got {value!r}")
    if name == "writer":
        word = str(value).strip().lower()
        if word not in WRITERS:
            raise ConfigError(f"setting 'writer' must be one of {', '.join(WRITERS)}, got {value!r}")
        return word
    return str(value)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    section = data.get("metatrail", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [metatrail] must be a table")
    return section


def _file_root(config: Path) -> Path:
    """The directory relative paths in ``config`` are taken from: the project root for ``.metatrail/config.toml``
    (the directory holding ``.metatrail``), else the directory of the file."""
    directory = config.resolve().parent
    return directory.parent if directory.name == STORE_DIR_NAME else directory


def _from_file(name: str, value: Any, root: Path | None) -> Any:
    """A config file's value, with a relative SQLite store or hash cache path made absolute from ``root``: the
    file belongs to a project, and the same store must be found from any working directory in it."""
    if root is None or not isinstance(value, str):
        return value
    if name == "store":
        for prefix in FILE_STORE_PREFIXES:
            if value.startswith(prefix):
                path = value[len(prefix) :]
                if path and path != ":memory:" and not os.path.isabs(path):
                    return f"{prefix}{root / path}"
    if name == "hash_cache" and value and not os.path.isabs(os.path.expanduser(value)):
        return str(root / value)
    return value


def load_settings(**overrides: Any) -> Settings:
    """Resolve settings: ``overrides`` (arguments) > config file > environment > defaults."""
    known = {f.name for f in fields(Settings)} - {"extra"}
    values: dict[str, Any] = {}
    for name, var in _ENV.items():
        if var in os.environ and os.environ[var] != "":
            values[name] = os.environ[var]
    store_dir = find_store_dir()
    config_path = os.environ.get("METATRAIL_CONFIG")
    config = Path(config_path) if config_path else store_dir / "config.toml" if store_dir is not None else None
    if config is not None:
        root = _file_root(config)
        values.update({k: _from_file(k, v, root) for k, v in _read_file(config).items() if k in known})
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    settings = Settings(**{k: _coerce(k, v) for k, v in values.items()})
    if not settings.store:
        directory = store_dir or (Path.cwd() / STORE_DIR_NAME)
        settings = replace(settings, store=f"sqlite:///{directory / 'metatrail.db'}")
    if not settings.hash_cache:
        if settings.store_dir is not None:
            cache = settings.store_dir / "hashcache.db"
        else:
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metatrail" / "hashcache.db"
        settings = replace(settings, hash_cache=str(cache))
    return settings


def client_settings(url: str | None = None, token: str | None = None) -> tuple[str | None, str | None, str | None]:
    """The metatrail server a client talks to: ``(server URL, token, CA bundle)`` with the project's precedence:
    arguments > config file > environment. (Here, not with the HTTP client: the Recorder's writer reads it after
    its first write, and needs no HTTP or TLS module when no server is configured.)

    The config file is ``$METATRAIL_CONFIG`` or ``.metatrail/config.toml`` (keys ``server``, ``token``,
    ``ca_bundle`` under ``[metatrail]``); the environment ``METATRAIL_SERVER``, ``METATRAIL_TOKEN``,
    ``METATRAIL_CA_BUNDLE``.
    """
    values = {"server": os.environ.get("METATRAIL_SERVER") or None, "token": os.environ.get("METATRAIL_TOKEN") or None,
              "ca_bundle": os.environ.get("METATRAIL_CA_BUNDLE") or None}
    path = os.environ.get("METATRAIL_CONFIG")
    store_dir = None if path else find_store_dir()
    config_file = path or (str(store_dir / "config.toml") if store_dir else None)
    if config_file and os.path.isfile(config_file):
        section = _read_file(Path(config_file))
        values.update({k: str(section[k]) for k in values if section.get(k)})
    if url:
        values["server"] = url
    if token:
        values["token"] = token
    return values["server"], values["token"], values["ca_bundle"]
