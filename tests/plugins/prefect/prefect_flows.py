"""The flows the Prefect plugin tests run: ordinary Prefect code, with nothing metatrail-specific in it.

They run in the test process, in process-pool children (which import this module by name), and as scripts:
``python prefect_flows.py NAME ARG…`` prints the flow's result as JSON on the last line of stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner


class Opaque:
    """A parameter value that is not JSON: recorded by its type (its own repr is never called)."""

    def __init__(self, level: int) -> None:
        self.level = level

    def __repr__(self) -> str:
        return f"Opaque(level={self.level})"


# -- a three-stage file pipeline: extract -> transform -> load (load fails once, then succeeds on its retry) -


@task(task_run_name="extract")
def extract(out: str, n: int) -> str:
    Path(out).write_text("".join(f"{i}\n" for i in range(n)))
    return out


@task(task_run_name="transform")
def transform(raw: str, factor: float, options: Opaque) -> str:
    out = Path(raw).with_name("clean.txt")
    out.write_text("".join(f"{int(line) * factor}\n" for line in Path(raw).read_text().split()))
    return str(out)


@task(task_run_name="load", retries=1)
def load(clean: str) -> dict[str, Any]:
    marker = Path(clean).with_name("load.tried")
    if not marker.exists():
        marker.write_text("")
        raise ConnectionError("warehouse not reachable")
    report = Path(clean).with_name("report.json")
    rows = Path(clean).read_text().split()
    report.write_text(json.dumps({"rows": len(rows)}))
    return {"report": str(report), "rows": len(rows)}


@flow(flow_run_name="etl-run")
def etl(workdir: str, n: int = 3) -> dict[str, Any]:
    raw = extract(f"{workdir}/raw.txt", n)
    clean = transform(raw, 2.0, Opaque(3))
    return load(clean)


# -- a flow that fails ---------------------------------------------------------------------------------------


@task(task_run_name="explode")
def explode(x: int) -> int:
    raise RuntimeError(f"bad input {x}")


@flow(flow_run_name="failing-run")
def failing(x: int = 7) -> int:
    return explode(x)


# -- fan-out / fan-in with .map() and .submit() --------------------------------------------------------------


@task
def square(x: int) -> int:
    return x * x


@task
def total(values: list[int]) -> int:
    return sum(values)


@flow(task_runner=ThreadPoolTaskRunner(max_workers=3))
def fanout_threads(n: int = 4) -> int:
    squares = square.map(range(n))
    return total.submit(squares).result()


@flow(task_runner=ProcessPoolTaskRunner(max_workers=2))
def fanout_processes(n: int = 3) -> int:
    squares = square.map(range(n))
    return total.submit(squares).result()


# -- async ---------------------------------------------------------------------------------------------------


@task
async def add_async(x: int, y: int) -> int:
    await asyncio.sleep(0)
    return x + y


@flow
async def async_sum(a: int = 1) -> int:
    first = await add_async(a, 1)
    return await add_async(first, 10)


# -- for overhead and fault tests ----------------------------------------------------------------------------


@task
def noop(i: int) -> int:
    return i


@flow
def many_noops(count: int = 10) -> list[int]:
    return [noop(i) for i in range(count)]


# -- values that are hard to record --------------------------------------------------------------------------


class Hostile:
    """A parameter whose ``repr`` raises."""

    def __repr__(self) -> str:
        raise ValueError("no repr for you")


@task
def swallow(thing: Hostile, n: int) -> list[int]:
    return list(range(n))


@flow
def hostile(n: int = 200_000) -> int:
    return len(swallow(Hostile(), n))


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    if name == "async-sum":
        result: Any = asyncio.run(async_sum())
    else:
        target = {"etl": etl, "failing": failing, "fanout-threads": fanout_threads,
                  "many-noops": many_noops}[name]
        result = target(*[int(a) if a.isdigit() else a for a in args])
    print(json.dumps(result))
