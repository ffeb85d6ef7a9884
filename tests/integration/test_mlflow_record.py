"""What a user finds in MLflow: a model-training experiment, the data of the train and evaluate
stages as dataset inputs (on the stage runs and the pipeline's parent run), and a description
of the parent run; real MLflow on sqlite in a temp folder, folders written with pyarrow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from core.config import TrackingConfig
from core.layout import StageResult
from pipelines.registry import Decision
from pipelines.stages import RunSummary
from pipelines.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker, folder_dataset


def _shard_rows(n: int, offset: int = 0) -> pa.Table:
    return pa.table(
        {
            "query": [f"query {i}" for i in range(offset, offset + n)],
            "ids": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int32())),
            "label": pa.array([i % 3 for i in range(n)], pa.int32()),
            "weight": pa.array([1.0] * n, pa.float32()),
        }
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_shards(folder: Path) -> Path:
    """A shard folder as jobs.shard writes it: files and a manifest with rows and sha256."""
    folder.mkdir(parents=True)
    splits = {}
    for split, files in (("train", [(0, 30), (30, 20)]), ("validation", [(100, 10)])):
        entries = []
        for i, (offset, n) in enumerate(files):
            path = folder / f"{split}-{i:05d}.parquet"
            pq.write_table(_shard_rows(n, offset), path)
            entries.append({"path": path.name, "rows": n, "sha256": _sha256(path)})
        splits[split] = {"rows": sum(e["rows"] for e in entries), "files": entries}
    (folder / "manifest.json").write_text(json.dumps({"splits": splits, "labels": ["a", "b"]}))
    return folder


def make_test_split(folder: Path, n: int = 12) -> Path:
    """A Spark-style Parquet folder: part files and a ``_SUCCESS`` marker."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"query": [f"t {i}" for i in range(n)], "weight": [2.0] * n})
    pq.write_table(table.slice(0, n // 2), folder / "part-00000-a.parquet")
    pq.write_table(table.slice(n // 2), folder / "part-00001-a.parquet")
    (folder / "_SUCCESS").write_text("")
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module (a new one costs seconds of schema migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracking(store: str, request: pytest.FixtureRequest) -> TrackingConfig:
    """An experiment of its own for each test."""
    return TrackingConfig(uri=store, experiment=request.node.name)


def _inputs(client: MlflowClient, run_id: str) -> dict[str, object]:
    """``context -> dataset`` of a run's dataset inputs."""
    out = {}
    for di in client.get_run(run_id).inputs.dataset_inputs:
        context = {t.key: t.value for t in di.tags}["mlflow.data.context"]
        out[context] = di.dataset
    return out


def test_experiment_opens_as_model_training(tracking: TrackingConfig) -> None:
    experiment = Tracker(tracking).experiment
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"

    # an experiment made before the tag existed (an upgrade) gets it on the next connect
    old_id = mlflow.create_experiment("made-by-an-older-zipfline")
    assert EXPERIMENT_KIND_TAG not in mlflow.get_experiment(old_id).tags
    Tracker(TrackingConfig(uri=tracking.uri, experiment="made-by-an-older-zipfline"))
    assert mlflow.get_experiment(old_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_stage_datasets_are_run_inputs(tmp_path: Path, tracking: TrackingConfig) -> None:
    shards = make_shards(tmp_path / "data" / "shard")
    test_dir = make_test_split(tmp_path / "data" / "split" / "test")
    tracker = Tracker(tracking)
    client = MlflowClient()
    with tracker.parent("2024-01-02", "test", {"a": 1}) as parent_id:
        with tracker.stage("train") as train_id:
            tracker.log_stage(
                "train", StageResult(), tmp_path / "train", skipped=False,
                datasets={"training": shards, "validation": shards},
            )  # fmt: skip
        with tracker.stage("evaluate") as eval_id:
            tracker.log_stage(
                "evaluate", StageResult(), tmp_path / "evaluate", skipped=True,
                datasets={"test": test_dir},
            )  # fmt: skip

    train = _inputs(client, train_id)
    assert set(train) == {"training", "validation"}
    assert train["training"].name == "train shards"
    assert train["validation"].name == "validation shards"
    assert train["training"].digest != train["validation"].digest
    assert json.loads(train["training"].source) == {"uri": str(shards.resolve())}
    assert train["training"].source_type == "local"
    assert json.loads(train["training"].profile)["num_rows"] == 50  # the manifest's count
    assert json.loads(train["validation"].profile)["num_rows"] == 10
    columns = json.loads(train["training"].schema)["mlflow_colspec"]
    assert [(c["name"], c["type"]) for c in columns] == [
        ("query", "string"), ("ids", "array"), ("label", "integer"), ("weight", "float"),
    ]  # fmt: skip

    test = _inputs(client, eval_id)
    assert set(test) == {"test"}
    assert test["test"].name == "test split"
    assert json.loads(test["test"].source) == {"uri": str(test_dir.resolve())}
    # rows from the footers; the _SUCCESS marker is no data file
    assert json.loads(test["test"].profile) == {
        "num_rows": 12, "num_files": 2,
        "num_bytes": sum(p.stat().st_size for p in test_dir.glob("*.parquet")),
        "format": "parquet",
    }  # fmt: skip

    # the description names them as the run page lists them
    tracker.parent_id = parent_id
    tracker.describe_parent(RunSummary(run_id=parent_id, run_date="2024-01-02"))
    note = client.get_run(parent_id).data.tags["mlflow.note.content"]
    assert f"train shards {train['training'].digest} (training, 50 rows)" in note
    assert f"test split {test['test'].digest} (test, 12 rows)" in note

    # the pipeline's run shows every dataset the stages logged, with the same digests
    parent = _inputs(client, parent_id)
    assert {c: d.digest for c, d in parent.items()} == {
        "training": train["training"].digest,
        "validation": train["validation"].digest,
        "test": test["test"].digest,
    }


def test_digest_follows_the_data(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shard")
    test_dir = make_test_split(tmp_path / "split" / "test")
    before = folder_dataset(test_dir, "test").digest
    assert folder_dataset(test_dir, "test").digest == before  # stable
    # the same bytes in a folder elsewhere (Spark names its files anew) are the same data
    other = tmp_path / "copy" / "test"
    other.mkdir(parents=True)
    for i, p in enumerate(sorted(test_dir.glob("*.parquet"))):
        (other / f"part-{i:05d}-b.parquet").write_bytes(p.read_bytes())
    assert folder_dataset(other, "test").digest == before
    make_test_split(test_dir, n=14)  # other rows
    assert folder_dataset(test_dir, "test").digest != before

    # shards: the manifest's sha256 are the digest's input (no file is read for it)
    train = folder_dataset(shards, "training").digest
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["files"][0]["sha256"] = "0" * 64
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert folder_dataset(shards, "training").digest != train


def test_missing_folder_is_a_warning(tmp_path: Path, tracking: TrackingConfig) -> None:
    tracker = Tracker(tracking)
    with tracker.parent("2024-01-02", "test", {}), tracker.stage("evaluate") as eval_id:
        tracker.log_stage(
            "evaluate", StageResult(), tmp_path, skipped=False,
            datasets={"test": tmp_path / "nowhere"},
        )  # fmt: skip
    assert MlflowClient().get_run(eval_id).inputs.dataset_inputs == []


def test_parent_run_is_described(tracking: TrackingConfig) -> None:
    tracker = Tracker(tracking)
    summary = RunSummary(run_id="", run_date="2024-01-02", seconds=42.0, skipped=["split"])
    summary.results = {
        "split": StageResult(),
        "train": StageResult(
            metrics={"steps": 120, "samples_per_s": 5000.0}, tags={"stopped_by": "budget"}
        ),
        "evaluate": StageResult(
            metrics={"test_error": 0.25, "test_error_weighted": 0.125, "breadth": 0.5}
        ),
    }
    summary.promotion = Decision(accepted=True, version="3", reason="no champion yet").tags()
    with tracker.parent("2024-01-02", "test", {}) as parent_id:
        tracker.describe_parent(summary)
    note = MlflowClient().get_run(parent_id).data.tags["mlflow.note.content"]
    assert note.splitlines() == [
        "Pipeline run 2024-01-02 in 42 s: ran train, evaluate; reused split "
        "(same settings and inputs).",
        "Test: test_error 0.2500, test_error_weighted 0.1250, breadth 0.500.",
        "Registry: version 3 is the new champion (no champion yet).",
        "Training: 120 steps at 5,000 samples/s, stopped by budget.",
    ]
