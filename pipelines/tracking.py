"""The one MLflow helper: a parent run per pipeline run, a child run per stage
(docs/architecture.md, "MLflow record").

Stage counts are logged as metrics (``rows_in``, ``rows_out``, ``rows_quarantined``,
``rows_merged``, ``quarantined.<reason>``) so that ``zipfline report`` and the MLflow UI read
the same numbers; the training and evaluation params and metrics go to the parent run too.

The experiment is tagged as a model-training experiment (``mlflow.experimentKind``), the data a
stage learns from or is judged on is logged as MLflow dataset inputs (digest, source folder,
schema, row count; read from the shard manifest and Parquet footers, never the rows) of its run
and of the parent run, and the parent run's description (``mlflow.note.content``) sums up its
result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.config import TrackingConfig
from core.errors import ConfigError, error_class, one_line
from core.hashing import sha256_of
from core.layout import StageResult, data_files

log = logging.getLogger("zipfline")
COUNT_KEYS = ("rows_in", "rows_out", "rows_quarantined", "rows_merged")
REASON_PREFIX = "quarantined."
PARENT_TAG = "zipfline.kind"
PROMOTED_STAGES = ("train", "evaluate")  # whose params and metrics the parent run repeats
# MLflow 3's UI opens an experiment in its GenAI view unless this tag says otherwise
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" (model training)
MANIFEST = "manifest.json"  # the shard stage's file list (jobs.shard.MANIFEST)
MANIFEST_SPLITS = {"training": "train", "validation": "validation", "test": "test"}
FAILURE_CLASS = "failure.class"  # a failed run's error class (core.errors.error_class)
FAILURE_STAGE = "failure.stage"  # the stage it failed in
HOST_TAG = "host"  # the machine a run's driver ran on


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _quiet_mlflow() -> None:
    """MLflow's INFO lines (schema migrations, progress bars) are noise in a pipeline's output;
    MLflow sets its own levels on import, so this runs after it."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import mlflow  # noqa: F401

    verbose = log.isEnabledFor(logging.DEBUG)
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def connect(cfg: TrackingConfig) -> Any:
    """Point MLflow at the configured store and experiment; returns the experiment."""
    _quiet_mlflow()
    # start-up speed: mlflow imports in seconds; connect() sets its log levels after it
    import mlflow

    mlflow.set_tracking_uri(cfg.uri)
    try:
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            location = None
            if cfg.uri.startswith("sqlite:///"):
                db = Path(cfg.uri.removeprefix("sqlite:///")).resolve()
                location = (db.parent / "mlartifacts").as_uri()
            mlflow.create_experiment(
                cfg.experiment,
                artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
            experiment = mlflow.get_experiment_by_name(cfg.experiment)
        elif EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the tag was set
            mlflow.tracking.MlflowClient().set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
    except Exception as exc:  # MlflowException, SQLAlchemy, connection errors
        raise ConfigError(
            f"tracking.uri = {cfg.uri}: cannot reach the MLflow store ({exc})"
        ) from exc
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """A nested dict as ``dotted.key -> value`` (the config as MLflow params)."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): value}


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def _column_type(arrow_type: Any) -> Any:
    """The MLflow column type of a pyarrow type (``any`` for what MLflow has no name for)."""
    import pyarrow as pa  # pyarrow: only when a dataset is logged
    from mlflow.types import DataType  # mlflow: imported on first use (start-up speed)
    from mlflow.types.schema import AnyType, Array  # likewise

    t = pa.types
    if t.is_list(arrow_type) or t.is_large_list(arrow_type):
        return Array(_column_type(arrow_type.value_type))
    for test, kind in (
        (t.is_string, DataType.string), (t.is_large_string, DataType.string),
        (t.is_boolean, DataType.boolean), (t.is_float64, DataType.double),
        (t.is_floating, DataType.float), (t.is_binary, DataType.binary),
        (t.is_large_binary, DataType.binary), (t.is_timestamp, DataType.datetime),
        (t.is_date, DataType.datetime),
    ):  # fmt: skip
        if test(arrow_type):
            return kind
    if t.is_integer(arrow_type):
        wide = arrow_type.bit_width > 32 or (
            arrow_type.bit_width == 32 and t.is_unsigned_integer(arrow_type)
        )
        return DataType.long if wide else DataType.integer
    return AnyType()


@functools.cache
def _folder_dataset_class() -> type:
    """An MLflow dataset known by its metadata only: digest, source, schema and a profile
    (rows, files, bytes); defined on first use because MLflow's import is slow."""
    from mlflow.data.meta_dataset import MetaDataset  # mlflow: on first use (start-up speed)

    class FolderDataset(MetaDataset):
        def __init__(self, source: Any, name: str, digest: str, schema: Any, profile: dict) -> None:
            self._profile = profile
            super().__init__(source, name=name, digest=digest, schema=schema)

        @property
        def profile(self) -> dict:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    return FolderDataset


def folder_dataset(folder: Path, context: str) -> Any:
    """The MLflow dataset of the Parquet data a stage reads for ``context`` (``training``,
    ``validation``, ``test``) in ``folder``, without reading its rows.

    A shard folder (with ``manifest.json``) gives the context's split of the manifest: its
    files' sha256 make the digest and their rows the count. Any other folder gives its Parquet
    files: the digest is the sha256 of their bytes in order (no names: Spark names its files
    anew on every write), the row count comes from their footers. The schema is the first
    file's; the source is the folder."""
    import pyarrow.parquet as pq  # pyarrow: only when a dataset is logged
    from mlflow.data.dataset_source_registry import resolve_dataset_source  # likewise
    from mlflow.types.schema import ColSpec, Schema  # likewise

    folder = folder.resolve()
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        split = MANIFEST_SPLITS.get(context, context)
        entry = json.loads(manifest_path.read_text())["splits"][split]
        files = [folder / e["path"] for e in entry["files"]]
        hashes = [e["sha256"] for e in entry["files"]]
        rows = int(entry["rows"])
        name = f"{split} shards"
    else:
        files = [p for p in data_files(folder) if p.suffix == ".parquet"]
        hashes = [sha256_of(p) for p in files]
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
        name = f"{folder.name} split"
    if not files:
        raise FileNotFoundError(f"{folder}: no Parquet files for {context}")
    arrow = pq.read_schema(files[0])
    schema = Schema([ColSpec(_column_type(f.type), f.name) for f in arrow])
    digest = hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:10]
    profile = {
        "num_rows": rows,
        "num_files": len(files),
        "num_bytes": sum(p.stat().st_size for p in files),
        "format": "parquet",
    }
    with warnings.catch_warnings():  # "" and file:// are both the local source: it says so
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(folder))
    return _folder_dataset_class()(source, name, digest, schema, profile)


class Tracker:
    """Parent and child runs of one pipeline run."""

    def __init__(self, cfg: TrackingConfig) -> None:
        self.cfg = cfg
        self.experiment = connect(cfg)
        # start-up speed: mlflow, as above
        import mlflow

        self.mlflow = mlflow
        self.parent_id: str | None = None
        self.datasets: dict[str, tuple[str, str, int]] = {}
        """``context -> (name, digest, rows)`` of the datasets logged so far (the description)."""
        self.failed_stage: str | None = None
        """The stage that raised, once one has."""

    @contextmanager
    def parent(
        self, run_date: str, trigger: str, params: dict[str, Any], kind: str = "pipeline"
    ) -> Iterator[str]:
        tags = {
            "run_date": run_date,
            "trigger": trigger,
            "git_sha": git_sha(),
            HOST_TAG: socket.gethostname(),
            PARENT_TAG: kind,
        }
        # system metrics (CPU, memory, disk, network; GPU where there is one) on the parent
        with self.mlflow.start_run(
            run_name=f"zipfline {run_date}", tags=tags, log_system_metrics=True
        ) as run:
            self.parent_id = run.info.run_id
            self.datasets, self.failed_stage = {}, None
            self.mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
            try:
                yield run.info.run_id
            except BaseException as exc:  # MLflow ends the run FAILED; say why, then go on
                self._record_failure(exc)
                raise

    @contextmanager
    def stage(self, name: str) -> Iterator[str]:
        tags = {"stage": name, PARENT_TAG: "stage"}
        with self.mlflow.start_run(run_name=name, nested=True, tags=tags) as run:
            try:
                yield run.info.run_id
            except BaseException:
                self.failed_stage = self.failed_stage or name
                raise

    def _record_failure(self, exc: BaseException) -> None:
        """``failure.class``, ``failure.message`` and ``failure.stage`` on the parent run, for
        ``zipfline failures`` (an interrupt is class ``KeyboardInterrupt``, which it counts as
        killed); a store that cannot take them, or an error whose text cannot be read (a Java
        error once the JVM is gone), leaves the run's own error as it was."""
        try:
            interrupted = isinstance(exc, KeyboardInterrupt)
            tags = {
                FAILURE_CLASS: "KeyboardInterrupt" if interrupted else error_class(exc),
                "failure.message": one_line(exc)[:5000],
                FAILURE_STAGE: self.failed_stage or "(between stages)",
            }
            self.set_parent_tags(tags)
        except Exception as problem:  # the run's own error is the one to report
            log.warning("MLflow: the failure's tags were not recorded (%s)", problem)

    def log_stage(
        self,
        name: str,
        result: StageResult,
        stage_dir: Path,
        *,
        skipped: bool,
        fingerprint: str = "",
        datasets: dict[str, Path] | None = None,
    ) -> None:
        """Counts, metrics, params, tags, artifacts and model of a stage, into its child run."""
        mlflow = self.mlflow
        counts = {k: getattr(result, k) for k in COUNT_KEYS}
        reasons = {f"{REASON_PREFIX}{r}": n for r, n in result.quarantined_by_reason.items()}
        mlflow.log_metrics(
            _finite({**counts, **reasons, **result.metrics, "stage_seconds": result.seconds})
        )
        if result.series:
            # start-up speed: mlflow, as above
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            points = [
                Metric(name, float(value), now, int(step))
                for name, pairs in result.series.items()
                for step, value in pairs
                if value is not None and math.isfinite(float(value))
            ]
            client = mlflow.tracking.MlflowClient()
            run_id = mlflow.active_run().info.run_id
            for i in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics a batch
                client.log_batch(run_id, metrics=points[i : i + 1000])
        if result.params:
            mlflow.log_params({k: str(v)[:6000] for k, v in result.params.items()})
        mlflow.set_tags(
            {
                **result.tags,
                "skipped": str(skipped).lower(),
                "reused": str(skipped).lower(),
                "stage_dir": str(stage_dir),
                "fingerprint": fingerprint,
            }
        )
        for rel in result.artifacts:
            path = stage_dir / rel
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=rel)
            elif path.exists():
                mlflow.log_artifact(str(path))
        if result.model:
            # start-up speed: the pyfunc pulls in torch, only for a stage with a model
            from trainers.serving import pyfunc_kwargs, quiet_pyfunc

            with quiet_pyfunc():
                mlflow.pyfunc.log_model(name="model", **pyfunc_kwargs(stage_dir / result.model))
        if datasets:
            self.log_datasets(datasets)
        if name in PROMOTED_STAGES and self.parent_id:
            client = mlflow.tracking.MlflowClient()
            for key, value in _finite(result.metrics).items():
                client.log_metric(self.parent_id, key, value)
            for key, value in result.params.items():
                client.log_param(self.parent_id, key, str(value)[:6000])
            for key, value in result.tags.items():
                client.set_tag(self.parent_id, key, value)

    def log_datasets(self, datasets: dict[str, Path]) -> None:
        """Each ``context -> folder`` as a dataset input of the active run (the stage's) and of
        the parent run, whose page then lists the data the pipeline trained and was judged on.
        A folder that cannot be described is a warning, not a failed run."""
        from mlflow.entities import Dataset, DatasetInput, InputTag  # mlflow: on first use
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # likewise

        mlflow = self.mlflow
        inputs = []
        for context, folder in datasets.items():
            try:
                dataset = folder_dataset(Path(folder), context)
            except (OSError, KeyError, ValueError) as exc:  # pyarrow's errors are among these
                log.warning("MLflow: %s dataset %s not logged (%s)", context, folder, exc)
                continue
            mlflow.log_input(dataset, context=context)
            self.datasets[context] = (dataset.name, dataset.digest, dataset.profile["num_rows"])
            d = dataset.to_dict()
            entity = Dataset(
                name=d["name"], digest=d["digest"], source_type=d["source_type"],
                source=d["source"], schema=d.get("schema"), profile=d.get("profile"),
            )  # fmt: skip
            inputs.append(DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        active = mlflow.active_run()
        if inputs and self.parent_id and (active is None or active.info.run_id != self.parent_id):
            mlflow.tracking.MlflowClient().log_inputs(self.parent_id, datasets=inputs)

    def set_parent_tags(self, tags: dict[str, str]) -> None:
        """Tags on the pipeline's parent run (the registry's verdict)."""
        if self.parent_id:
            client = self.mlflow.tracking.MlflowClient()
            for key, value in tags.items():
                client.set_tag(self.parent_id, key, value)

    def describe_parent(self, summary: Any) -> None:
        """A short description of the run's result on the parent run (``mlflow.note.content``,
        the run page's Description, whose first lines show): which stages ran and which were
        reused, the test error, the registry's verdict, training, the data (as the dataset inputs
        name them)."""
        ran = [s for s in summary.results if s not in summary.skipped]
        head = f"Pipeline run {summary.run_date} in {summary.seconds:.0f} s: "
        if not ran:
            head += "every stage reused (same settings and inputs)"
        else:
            head += f"ran {', '.join(ran)}"
            if summary.skipped:
                head += f"; reused {', '.join(summary.skipped)} (same settings and inputs)"
        lines = [head + "."]
        ev = summary.results.get("evaluate")
        if ev and "test_error" in ev.metrics:
            m = ev.metrics
            lines.append(
                f"Test: test_error {m['test_error']:.4f}, test_error_weighted "
                f"{m['test_error_weighted']:.4f}, breadth {m.get('breadth', float('nan')):.3f}."
            )
        if summary.promotion:
            p = summary.promotion
            verdict = "is the new champion" if p.get("promotion") == "accepted" else "not promoted"
            lines.append(
                f"Registry: version {p.get('model_version')} {verdict} "
                f"({p.get('promotion_reason')})."
            )
        tr = summary.results.get("train")
        if tr and "samples_per_s" in tr.metrics:
            lines.append(
                f"Training: {int(tr.metrics.get('steps', 0))} steps at "
                f"{tr.metrics['samples_per_s']:,.0f} samples/s, stopped by "
                f"{tr.tags.get('stopped_by', '?')}."
            )
        if self.datasets:
            lines.append(
                "Data: "
                + ", ".join(
                    f"{name} {digest} ({context}, {rows:,} rows)"
                    for context, (name, digest, rows) in self.datasets.items()
                )
                + "."
            )
        self.set_parent_tags({"mlflow.note.content": "\n".join(lines)})
