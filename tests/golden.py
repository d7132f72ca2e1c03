"""Test helper for golden-event tests: normalise what changes between runs (ids, times, hosts, pids, temp paths),
then compare with a reviewed expected file.

Set ``METATRAIL_UPDATE_GOLDEN=1`` to (re)write expected files; review the diff before committing them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:\d{2}|Z)?")
VOLATILE_KEYS = frozenset({"host", "user", "pid", "durationSeconds", "codeVersion", "stackTrace", "integrationVersion",
                           "version", "openlineageAdapterVersion", "metatrail_energy"})


def normalise(events: Iterable[Mapping[str, Any]], *, paths: Mapping[str, str] | None = None) -> list[Any]:
    """Events with run ids replaced by ``<run-N>`` (N in order of first appearance), times by ``<time>``,
    volatile fields by ``<volatile>``, and each prefix in ``paths`` replaced by its label; sorted stably by
    (job name, event type order)."""
    ids: dict[str, str] = {}
    path_map = sorted((paths or {}).items(), key=lambda kv: -len(kv[0]))

    def text(value: str) -> str:
        for prefix, label in path_map:
            value = value.replace(prefix, label)
        value = _UUID.sub(lambda m: ids.setdefault(m.group(0), f"<run-{len(ids) + 1}>"), value)
        return _TIME.sub("<time>", value)

    def walk(value: Any, key: str = "") -> Any:
        # "version" names two things: the processing engine's version (volatile) and a dataset's version facet, the
        # content hash we record (compared, like every hash).
        if key in VOLATILE_KEYS and value is not None and not (key == "version" and isinstance(value, Mapping)):
            return "<volatile>"
        if isinstance(value, Mapping):
            return {k: walk(v, k) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str):
            return text(value)
        return value

    order = {"START": 0, "RUNNING": 1, "OTHER": 1, "COMPLETE": 2, "FAIL": 2, "ABORT": 2}
    ordered = sorted(events, key=lambda e: (str(e.get("job", {}).get("name")), order.get(str(e.get("eventType")), 3),
                                            str(e.get("eventTime"))))
    return [walk(e) for e in ordered]


def assert_golden(actual: Any, expected_file: Path) -> None:
    """Compare ``actual`` (JSON-ready) with ``expected_file``; write it instead when METATRAIL_UPDATE_GOLDEN=1."""
    text = json.dumps(actual, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if os.environ.get("METATRAIL_UPDATE_GOLDEN") == "1":
        expected_file.parent.mkdir(parents=True, exist_ok=True)
        expected_file.write_text(text)
        return
    assert expected_file.exists(), f"no golden file {expected_file}; run with METATRAIL_UPDATE_GOLDEN=1 and review it"
    expected = json.loads(expected_file.read_text())
    assert actual == expected, f"events differ from {expected_file} (rerun with METATRAIL_UPDATE_GOLDEN=1 to see)"
