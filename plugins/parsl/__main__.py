"""``python -m metatrail.plugins.parsl``: run a Parsl script with tracking on, or manage the ``.pth`` hook.

    python -m metatrail.plugins.parsl my_workflow.py [args ...]   # run the script as __main__, tracked
    python -m metatrail.plugins.parsl --install-pth               # METATRAIL_PARSL=1 then tracks any Parsl run
    python -m metatrail.plugins.parsl --uninstall-pth

Set METATRAIL_PARSL_WORKER_SIDE=0 to record from the DFK only (workers that cannot import metatrail).
"""

from __future__ import annotations

import os
import runpy
import sys

from metatrail.plugins.parsl import autoload

USAGE = __doc__ or ""


def main(argv: list[str]) -> int:
    """Entry point; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.strip())
        return 0 if argv else 2
    if argv[0] == "--install-pth":
        path = autoload.pth_path()
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(autoload.PTH_LINE)
        print(f"installed {path}; set {autoload.ENV_VAR}=1 to track Parsl workflows in this environment")
        return 0
    if argv[0] == "--uninstall-pth":
        path = autoload.pth_path()
        if os.path.exists(path):
            os.remove(path)
        print(f"removed {path}")
        return 0
    script = argv[0]
    autoload.install()
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` sets it
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
