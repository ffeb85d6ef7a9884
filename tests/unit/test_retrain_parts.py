"""The cron entry's parts: the watermark, and ``cmd_retrain``'s parent and child halves (the
lock and the budget themselves: test_retrain_lock.py)."""

from __future__ import annotations

import json
import sys

import pytest

import pipelines.flow
import pipelines.retrain
from core.atomic import Busy
from core.errors import DataError
from core.layout import StageResult
from pipelines.cli import main
from pipelines.retrain import (
    RESULT_FILE,
    WATERMARK_FILE,
    log_line,
    read_watermark,
    retrain_lock,
    run_with_budget,
    something_new,
    write_watermark,
)
from pipelines.stages import RunSummary
from tests.conftest import config_for


def test_the_watermark_sees_new_raw_files_and_labels(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.csv").write_text("query,label\nx,y\n")
    cfg = config_for(tmp_path, f"data.raw_path={raw}")
    root = tmp_path / "data"
    new, fp, last = something_new(cfg)
    assert new and last is None
    write_watermark(root, fp, "run-1")
    assert something_new(cfg)[0] is False  # nothing new
    (raw / "_SUCCESS").write_text("")  # markers do not count
    assert something_new(cfg)[0] is False
    (raw / "b.csv").write_text("query,label\nz,y\n")
    assert something_new(cfg)[0] is True
    write_watermark(root, something_new(cfg)[1], "run-2")
    (root / "labels").mkdir()
    (root / "labels" / "round-1.csv").write_text("query,label\nz,w\n")
    new, _, last = something_new(cfg)
    assert new and last["run_id"] == "run-2"
    log_line(root, "run-2 ok")
    assert (root / "retrain.log").read_text().strip().endswith("run-2 ok")


# Stand-ins for the pipeline run in the child, run through the real budget function: one that
# writes the result a finished run writes, one that fails the way a failed run does, one that
# sleeps past the budget.
FINISHED = """
import json, sys
with open(sys.argv[1], "w") as fh:
    json.dump({"run_id": "r1", "test_error": 0.1234, "promotion": "accepted",
               "summary": "the summary table"}, fh)
"""
FAILED = """
import json, sys
with open(sys.argv[1], "w") as fh:
    json.dump({"error": "ConfigError: bad", "message": "bad", "exit_code": 2}, fh)
sys.exit(2)
"""
SLEEPS = "import time; time.sleep(30)"


def _retrain(tmp_path, *extra):
    sets = [f"data.root={tmp_path / 'data'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *extra]  # fmt: skip
    return main(["retrain", *[a for s in sets for a in ("--set", s)]])


@pytest.fixture
def child(tmp_path, monkeypatch):
    """``child(SCRIPT)`` makes SCRIPT cmd_retrain's child; returns what the parent passed."""
    seen = {}

    def stand_in(argv, budget_s, **kw):
        seen.update(argv=argv, budget_s=budget_s)
        with pytest.raises(Busy):  # the parent holds the lock throughout
            with retrain_lock(tmp_path / "data"):
                pass
        result = argv[argv.index("--child-result") + 1]
        return run_with_budget([sys.executable, "-c", seen["script"], result], budget_s, grace_s=1)

    monkeypatch.setattr(pipelines.retrain, "run_with_budget", stand_in)

    def use(script):
        seen["script"] = script
        return seen

    return use


def test_retrain_runs_the_pipeline_in_a_child_and_moves_the_watermark_after(tmp_path, child,
                                                                            capfd):  # fmt: skip
    seen = child(FINISHED)
    assert _retrain(tmp_path, "retrain.budget_s=30") == 0
    argv = seen["argv"]
    assert argv[:5] == [sys.executable, "-m", "pipelines", "retrain", "--env"]
    assert "--force" not in argv and seen["budget_s"] == 30
    assert f"data.root={tmp_path / 'data'}" in argv  # the child loads the same config
    assert "the summary table" in capfd.readouterr().out
    assert read_watermark(tmp_path / "data")["run_id"] == "r1"
    log = (tmp_path / "data" / "retrain.log").read_text()
    assert log.rstrip().endswith("ok run r1 test_error 0.1234 promotion accepted")
    assert not (tmp_path / "data" / RESULT_FILE).exists()
    assert _retrain(tmp_path) == 0  # nothing new now
    assert "nothing new since" in capfd.readouterr().out


def test_a_failed_or_overlong_child_leaves_the_watermark_and_says_why(tmp_path, child, capfd):
    root = tmp_path / "data"
    child(FAILED)
    assert _retrain(tmp_path) == 2  # the child's exit code and its one line, said by the parent
    assert capfd.readouterr().err.splitlines() == ["zipfline: error: bad"]
    assert (root / "retrain.log").read_text().rstrip().endswith("failed: ConfigError: bad")
    child("import sys; sys.exit(3)")
    assert _retrain(tmp_path) == 1
    assert capfd.readouterr().err.splitlines() == [
        "zipfline: error: retrain: the pipeline run ended with exit code 3 and left no result"
    ]
    child(SLEEPS)
    assert _retrain(tmp_path, "retrain.budget_s=0.5") == 1
    err = capfd.readouterr().err
    assert "zipfline: error: retrain: over its budget of retrain.budget_s = 0.5 s" in err
    log = (root / "retrain.log").read_text().rstrip()
    assert log.endswith("failed: retrain: over its budget of retrain.budget_s = 0.5 s")
    assert not (root / WATERMARK_FILE).exists()
    with retrain_lock(root):  # released
        pass


def test_the_child_runs_the_pipeline_with_trigger_cron_and_writes_its_result(
    tmp_path, monkeypatch, capsys
):
    calls = []

    def fake_run(ctx, *, start=None, stop=None, trigger="manual"):
        calls.append((ctx.force, start, stop, trigger))
        summary = RunSummary(run_id="r7", run_date=ctx.run_date)
        summary.results["evaluate"] = StageResult(metrics={"test_error": 0.25, "test_error_weighted": 0.2,
            "breadth": 0.5, "acc_head": 0.9, "acc_torso": 0.7, "acc_tail": 0.4})  # fmt: skip
        summary.promotion = {"promotion": "rejected"}
        return summary

    monkeypatch.setattr(pipelines.flow, "run_pipeline", fake_run)
    out = tmp_path / "result.json"
    sets = ["--set", f"data.root={tmp_path / 'data'}"]
    assert main(["retrain", *sets, "--child-result", str(out)]) == 0
    assert calls == [(False, None, None, "cron")]  # no force: stages rerun when inputs changed
    result = json.loads(out.read_text())
    assert (result["run_id"], result["test_error"], result["promotion"]) == ("r7", 0.25, "rejected")
    assert "test_error 0.2500" in result["summary"]
    assert not (tmp_path / "data" / WATERMARK_FILE).exists()  # the parent's job

    def failing_run(ctx, **kw):
        calls.append((ctx.force, kw["trigger"]))
        raise DataError("ingest: no rows")

    monkeypatch.setattr(pipelines.flow, "run_pipeline", failing_run)
    assert main(["retrain", *sets, "--force", "--child-result", str(out)]) == 1
    assert json.loads(out.read_text()) == {
        "error": "DataError: ingest: no rows",
        "message": "ingest: no rows",
        "exit_code": 1,
    }
    assert calls[-1] == (True, "cron")  # retrain --force: every stage redone
    assert capsys.readouterr().err == ""  # said once, by the parent
