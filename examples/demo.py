"""The metatrail demo: a small real two-stage pipeline recorded through ``metatrail run``, then its lineage and
its OpenLineage export. Runs in a fresh temporary directory with its own store (the embedded SQLite default).

    python examples/demo.py [--keep]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent / "quickstart"


def sh(cmd: list[str], env: dict[str, str], capture: bool = False, limit: int | None = None) -> str:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    out = subprocess.run(cmd, env=env, check=True, text=True, capture_output=True)
    text = out.stdout if limit is None else "\n".join(out.stdout.splitlines()[:limit])
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    if out.stderr:
        sys.stderr.write(out.stderr)
    return out.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the demo directory")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="metatrail-demo-"))
    metatrail = shutil.which("metatrail", path=os.path.dirname(sys.executable)) or "metatrail"
    env = {**os.environ, "METATRAIL_STORE": f"sqlite:///{workdir / '.metatrail' / 'metatrail.db'}",
           "COLUMNS": "120", "METATRAIL_SITE": "demo-site"}
    os.chdir(workdir)
    print(f"demo directory: {workdir}")
    run_id = sh([metatrail, "pipeline", "start", "trackfit", "-p", "seed=7"], env).strip()
    env["METATRAIL_PIPELINE_RUN"] = run_id
    py = sys.executable
    sh([metatrail, "run", "--pipeline", "trackfit", "--stage", "simulate", "-p", "seed=7", "-p", "tracks=200",
        "-o", "hits.csv", "--", py, str(HERE / "make_hits.py"), "7", "200", "hits.csv"], env)
    sh([metatrail, "run", "--pipeline", "trackfit", "--stage", "fit", "-i", "hits.csv", "-p", "lr=0.01",
        "-o", "model.json", "--", py, str(HERE / "fit_tracks.py"), "hits.csv", "0.01", "model.json"], env)
    sh([metatrail, "pipeline", "finish", run_id], env)
    sh([metatrail, "runs"], env)
    sh([metatrail, "lineage", "model.json", "--upstream"], env)
    sh([metatrail, "hash", "hits.csv", "model.json"], env)
    sh([metatrail, "export", "openlineage", "--pipeline", "trackfit"], env, limit=1)
    print("\n(first of 6 OpenLineage events shown; `metatrail export openlineage` prints them all as JSON Lines)")
    if args.keep:
        print(f"\nkept {workdir}; try: cd {workdir} && metatrail show {run_id}")
    else:
        os.chdir("/")
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
