"""Zero-code activation: every ``parsl.Config`` made in this process is tracked.

Parsl has no plugin entry points, so something must run before the user's script builds its ``Config``. Two ways:

* ``python -m metatrail.plugins.parsl my_workflow.py [args]`` installs the hook and runs the script as
  ``__main__``. Nothing is installed and no other Python process is affected.
* ``METATRAIL_PARSL=1`` with the ``metatrail_parsl.pth`` hook in site-packages
  (``python -m metatrail.plugins.parsl --install-pth``). Python runs a ``.pth`` import line in *every* process of the
  environment at start-up, so the line is one environment lookup when the variable is unset (see
  ``bench/results/parsl.txt`` for its measured cost) and imports this module only when it is set.

The hook is an import hook, not an import: Parsl is patched when (and if) the process imports ``parsl.config``;
``Config.__init__`` then ends with :func:`metatrail.plugins.parsl.track`. Nothing here raises into start-up.

Both ways track as ``track(config)`` does, so ``METATRAIL_PARSL_WORKER_SIDE=0`` (the setting of ``track``'s
``worker_side`` when no argument gives it) records from the DFK only: for workers that cannot import metatrail.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

ENV_VAR = "METATRAIL_PARSL"
PTH_NAME = "metatrail_parsl.pth"
PTH_LINE = ("import os; os.environ.get('METATRAIL_PARSL', '').strip().lower() in ('1', 'true', 'yes', 'on') "
            "and __import__('metatrail.plugins.parsl.autoload', fromlist=['_']).install()\n")
_TARGET = "parsl.config"


def enabled() -> bool:
    """Whether ``METATRAIL_PARSL`` asks for zero-code tracking."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def patch_config_class(config_cls: Any) -> None:
    """Make ``config_cls.__init__`` track every config it builds (once; idempotent)."""
    original = config_cls.__init__
    if getattr(original, "_metatrail_tracking", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from metatrail.plugins.parsl import track

        track(self)

    __init__._metatrail_tracking = True  # type: ignore[attr-defined]
    config_cls.__init__ = __init__


def _patch_module(module: ModuleType) -> None:
    try:
        patch_config_class(module.Config)
    except Exception as exc:  # a Parsl without Config where we expect it: run untracked
        _warn(f"cannot hook parsl.Config ({type(exc).__name__}: {exc}); Parsl runs untracked")


class _ConfigHook(importlib.abc.MetaPathFinder):
    """Finds ``parsl.config`` through the other finders and patches it right after it is executed."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # one shot; also keeps the search below from finding us again
        try:
            spec: importlib.machinery.ModuleSpec | None = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                found = find(fullname, path, target) if find is not None else None
                spec = found if isinstance(found, importlib.machinery.ModuleSpec) else None
                if spec is not None:
                    break
            else:
                return None
            loader = spec.loader
            exec_module = getattr(loader, "exec_module", None)
            if exec_module is None:
                return spec

            def exec_and_patch(module: ModuleType) -> None:
                exec_module(module)
                _patch_module(module)

            loader.exec_module = exec_and_patch  # type: ignore[method-assign,union-attr]  # this spec only
            return spec
        except Exception as exc:
            _warn(f"import hook failed ({type(exc).__name__}: {exc}); Parsl runs untracked")
            return None


def install() -> None:
    """Track every ``parsl.Config`` built from now on in this process. Never raises."""
    try:
        module = sys.modules.get(_TARGET)
        if module is not None:
            _patch_module(module)
        elif not any(isinstance(f, _ConfigHook) for f in sys.meta_path):
            sys.meta_path.insert(0, _ConfigHook())
    except Exception as exc:
        _warn(f"cannot install the Parsl hook ({type(exc).__name__}: {exc})")


def _warn(message: str) -> None:
    try:
        from metatrail.logsafe import log_once

        log_once(f"parsl:autoload:{message}", "metatrail: %s", message)
    except Exception:
        print(f"metatrail: {message}", file=sys.stderr)


def pth_path() -> str:
    """Where ``--install-pth`` puts the hook: this environment's site-packages (purelib)."""
    import sysconfig

    return os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)
