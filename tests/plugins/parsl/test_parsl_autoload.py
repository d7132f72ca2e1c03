"""Zero-code activation: the runner (``python -m metatrail.plugins.parsl script.py``) and the ``.pth`` hook."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from golden import assert_golden
from parsl_helpers import EXPECTED_RESULTS, golden_view, outcome, run_pipeline, stored_events

from metatrail.plugins.parsl import autoload

GOLDEN = Path(__file__).parent / "golden"

# How site.py processes a .pth in site-packages, applied to a temporary directory (the test must not install
# anything into the environment); the script then runs as `python pipeline.py` would run it.
RUN_WITH_SITE_DIR = ("import runpy, site, sys; site.addsitedir(sys.argv[1]); sys.argv = sys.argv[2:]; "
                     "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_runner_records_an_unmodified_script(tmp_path: Path) -> None:
    results = run_pipeline(tmp_path / "work", "threads", "plain", prefix=["-m", "metatrail.plugins.parsl"])
    assert outcome(results) == EXPECTED_RESULTS
    # the same events as with track(config) in the script
    assert_golden(golden_view(stored_events(), tmp_path), GOLDEN / "threads.json")


def test_pth_hook_with_env_var_records(tmp_path: Path) -> None:
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    (site_dir / autoload.PTH_NAME).write_text(autoload.PTH_LINE)
    results = run_pipeline(tmp_path / "work", "threads", "plain", env={"METATRAIL_PARSL": "1"},
                           prefix=["-c", RUN_WITH_SITE_DIR, str(site_dir)])
    assert outcome(results) == EXPECTED_RESULTS
    assert_golden(golden_view(stored_events(), tmp_path), GOLDEN / "threads.json")


def test_pth_hook_costs_nothing_unless_enabled(tmp_path: Path) -> None:
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    (site_dir / autoload.PTH_NAME).write_text(autoload.PTH_LINE)
    probe = ("import site, sys; site.addsitedir(sys.argv[1]); "
             "print(sorted(m for m in ('metatrail', 'parsl') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "METATRAIL_PARSL"}
    off = subprocess.run([sys.executable, "-c", probe, str(site_dir)], env=env, capture_output=True, text=True)
    on = subprocess.run([sys.executable, "-c", probe, str(site_dir)], env={**env, "METATRAIL_PARSL": "1"},
                        capture_output=True, text=True)
    assert off.stdout.strip() == "[]", off.stderr
    assert on.stdout.strip() == "['metatrail']", on.stderr  # the hook waits for parsl; it does not import it

