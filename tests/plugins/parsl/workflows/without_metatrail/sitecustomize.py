"""Makes a Python process behave as if metatrail were not installed: on ``PYTHONPATH``, Python runs it at start-up.

worker_env.py puts this directory on its HTEX workers' ``PYTHONPATH``, as a cluster's ``module load`` or a venv
activation would give workers an environment of their own.
"""

import importlib.abc
import sys


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "metatrail" or fullname.startswith("metatrail."):
            raise ModuleNotFoundError("No module named 'metatrail'", name="metatrail")
        return None


sys.meta_path.insert(0, _NotInstalled())
