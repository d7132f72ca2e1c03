"""The explicit API for scripts: ``metatrail.pipeline_run`` and ``metatrail.execution``."""

from __future__ import annotations

from pathlib import Path

import pytest

import metatrail
from metatrail.hashing import md5_file
from metatrail.recorder import Recorder
from metatrail.store import open_store


def test_execution_records_inputs_outputs_and_params(tmp_path: Path) -> None:
    recorder = Recorder()
    raw = tmp_path / "raw.txt"
    raw.write_text("data")
    out = tmp_path / "model.bin"
    with metatrail.pipeline_run("exatrkx", params={"site": 1}, recorder=recorder) as run:
        with metatrail.execution(stage="embed", inputs=[raw], outputs=[out], params={"lr": 0.001},
                                 recorder=recorder) as ex:
            out.write_bytes(b"weights")
    assert recorder.flush(30)
    assert ex.pipeline == "exatrkx" and ex.pipeline_run_id == run.id
    with open_store(recorder.settings.store) as store:
        detail = store.get_run(ex.id)
        parent = store.get_run(run.id)
    assert detail is not None and parent is not None
    assert detail["state"] == "completed" and detail["params"] == {"lr": 0.001}
    assert [i["hash"] for i in detail["inputs"]] == [md5_file(raw)]
    assert [o["hash"] for o in detail["outputs"]] == [md5_file(out)]
    assert parent["state"] == "completed" and [c["stage"] for c in parent["children"]] == ["embed"]


def test_an_exception_marks_the_execution_failed_and_propagates_unchanged() -> None:
    recorder = Recorder()
    error = KeyError("missing column")
    with pytest.raises(KeyError) as caught, metatrail.pipeline_run("p", recorder=recorder) as run:
        with metatrail.execution(stage="s", recorder=recorder) as ex:
            raise error
    assert caught.value is error
    assert recorder.flush(30)
    with open_store(recorder.settings.store) as store:
        assert store.get_run(ex.id)["state"] == "failed"
        assert "missing column" in store.get_run(ex.id)["error"]
        assert store.get_run(run.id)["state"] == "failed"


def test_disabled_api_still_runs_the_block(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METATRAIL_DISABLED", "1")
    recorder = Recorder()
    ran = []
    with metatrail.execution("p", "s", recorder=recorder, inputs=[tmp_path / "x"]):
        ran.append(True)
    assert ran == [True]
    assert not (tmp_path / ".metatrail").exists()


def test_executions_on_a_pools_threads_belong_to_the_open_pipeline_run() -> None:
    """A pool's threads do not inherit the context of the block that opened the run: they found no run and were
    recorded under pipeline "default", without a parent. With one run open in the process, there is no doubt."""
    from concurrent.futures import ThreadPoolExecutor

    recorder = Recorder()

    def step(i: int) -> str:
        with metatrail.execution(stage=f"t{i}", recorder=recorder) as ex:
            return ex.id

    with metatrail.pipeline_run("fanout", recorder=recorder) as run, ThreadPoolExecutor(2) as pool:
        ids = list(pool.map(step, range(3)))
    assert recorder.flush(30)
    with open_store(recorder.settings.store) as store:
        children = {c["run_id"] for c in store.get_run(run.id)["children"]}
        assert children == set(ids)
        assert {store.get_run(i)["pipeline"] for i in ids} == {"fanout"}
