"""Soak: schemathesis against the server's OpenAPI description with ≥ 1,000 cases per operation, on SQLite and on
PostgreSQL, asserting zero 5xx (the CI tests ``tests/server/test_fuzz.py`` and ``test_fuzz_postgresql.py`` run the
same with 100 per operation).

    python bench/soak_server.py                 # 1,000 cases per operation, SQLite then PostgreSQL
    python bench/soak_server.py --examples 200  # shorter

Writes a summary to ``bench/results/server_soak.txt``; exit status 1 when any case produced a 5xx.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "server_soak.txt"
PG = os.environ.get("METATRAIL_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    lines = [f"schemathesis soak, {args.examples} cases per operation, {time.strftime('%Y-%m-%d %H:%M:%S %z')}; "
             f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} at start"]
    failed = False
    for backend in ("sqlite", "postgresql"):
        env = {**os.environ, "METATRAIL_FUZZ_EXAMPLES": str(args.examples)}
        name = None
        if backend == "postgresql":
            import psycopg

            name = f"mt_soak_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            env["METATRAIL_FUZZ_STORE"] = f"{PG}/{name}"
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/server/test_fuzz.py", "-q", "-p",
                               "no:cacheprovider", "--hypothesis-show-statistics"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        elapsed = time.time() - start
        if name:
            import psycopg

            with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        summary = [line for line in proc.stdout.splitlines() if re.search(r"passed|failed|error", line)][-1:]
        cases = sum(int(n) for n in re.findall(r"(\d+) passing, \d+ failing", proc.stdout))
        lines.append(f"  {backend:10} {elapsed:7.0f} s  {cases:,} passing examples in all  "
                     f"{summary[0] if summary else proc.stdout[-300:]}")
        if proc.returncode != 0:
            failed = True
            errors = [line for line in proc.stdout.splitlines() if line.startswith("E   ")][:20]
            lines.append("    " + "\n    ".join(errors or proc.stdout.splitlines()[-40:]))
    lines.append("5xx responses: " + ("SOME (see above)" if failed else "none"))
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
