"""Run a workflow script as ``__main__`` with metatrail reading the mount table from ``$METATRAIL_TEST_MOUNTINFO``.

    python on_network_fs.py pipeline.py ARGS...

No test machine mounts NFS: the file (tests/mounts.py writes it) says which directories are network mounts, and
metatrail in this process (the DataFlowKernel's) takes it for the kernel's table. Everything else is as a user runs
the script.
"""

from __future__ import annotations

import os
import runpy
import sys

from metatrail import fstype

fstype.MOUNTINFO = os.environ["METATRAIL_TEST_MOUNTINFO"]
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` sets it
runpy.run_path(script, run_name="__main__")
