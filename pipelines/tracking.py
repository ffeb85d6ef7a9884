"""The one MLflow helper: a parent run per pipeline run, a child run per stage (DESIGN §7).

Stage counts are logged as metrics (``rows_in``, ``rows_out``, ``rows_quarantined``,
``rows_merged``, ``quarantined.<reason>``) so that ``zipfline report`` and the MLflow UI read
the same numbers; the training and evaluation params and metrics go to the parent run too.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.config import TrackingConfig
from core.errors import ConfigError
from core.layout import StageResult

log = logging.getLogger("zipfline")
COUNT_KEYS = ("rows_in", "rows_out", "rows_quarantined", "rows_merged")
REASON_PREFIX = "quarantined."
PARENT_TAG = "zipfline.kind"
PROMOTED_STAGES = ("train", "evaluate")  # whose params and metrics the parent run repeats


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
    import mlflow

    mlflow.set_tracking_uri(cfg.uri)
    try:
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            location = None
            if cfg.uri.startswith("sqlite:///"):
                db = Path(cfg.uri.removeprefix("sqlite:///")).resolve()
                location = (db.parent / "mlartifacts").as_uri()
            mlflow.create_experiment(cfg.experiment, artifact_location=location)
            experiment = mlflow.get_experiment_by_name(cfg.experiment)
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


class Tracker:
    """Parent and child runs of one pipeline run."""

    def __init__(self, cfg: TrackingConfig) -> None:
        self.cfg = cfg
        self.experiment = connect(cfg)
        import mlflow

        self.mlflow = mlflow
        self.parent_id: str | None = None

    @contextmanager
    def parent(
        self, run_date: str, trigger: str, params: dict[str, Any], kind: str = "pipeline"
    ) -> Iterator[str]:
        tags = {
            "run_date": run_date,
            "trigger": trigger,
            "git_sha": git_sha(),
            PARENT_TAG: kind,
        }
        # system metrics (CPU, memory, disk, network; GPU where there is one) on the parent
        with self.mlflow.start_run(
            run_name=f"zipfline {run_date}", tags=tags, log_system_metrics=True
        ) as run:
            self.parent_id = run.info.run_id
            self.mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
            yield run.info.run_id

    @contextmanager
    def stage(self, name: str) -> Iterator[str]:
        tags = {"stage": name, PARENT_TAG: "stage"}
        with self.mlflow.start_run(run_name=name, nested=True, tags=tags) as run:
            yield run.info.run_id

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
            from trainers.serving import pyfunc_kwargs, quiet_pyfunc

            with quiet_pyfunc():
                mlflow.pyfunc.log_model(name="model", **pyfunc_kwargs(stage_dir / result.model))
        if name in PROMOTED_STAGES and self.parent_id:
            client = mlflow.tracking.MlflowClient()
            for key, value in _finite(result.metrics).items():
                client.log_metric(self.parent_id, key, value)
            for key, value in result.params.items():
                client.log_param(self.parent_id, key, str(value)[:6000])
            for key, value in result.tags.items():
                client.set_tag(self.parent_id, key, value)

    def set_parent_tags(self, tags: dict[str, str]) -> None:
        """Tags on the pipeline's parent run (the registry's verdict)."""
        if self.parent_id:
            client = self.mlflow.tracking.MlflowClient()
            for key, value in tags.items():
                client.set_tag(self.parent_id, key, value)

    def describe_parent(self, summary: Any) -> None:
        """A short description of the run's result on the parent run (the UI's description):
        which stages ran and which were reused, the test error, the registry's verdict."""
        ran = [s for s in summary.results if s not in summary.skipped]
        lines = [
            f"zipfline run {summary.run_date}: ran {', '.join(ran) or 'nothing'}"
            + (f"; reused {', '.join(summary.skipped)}" if summary.skipped else "")
            + f" ({summary.seconds:.0f} s)."
        ]
        ev = summary.results.get("evaluate")
        if ev and "test_error" in ev.metrics:
            m = ev.metrics
            lines.append(
                f"test_error {m['test_error']:.4f}, weighted {m['test_error_weighted']:.4f}, "
                f"breadth {m.get('breadth', float('nan')):.3f}."
            )
        tr = summary.results.get("train")
        if tr and "samples_per_s" in tr.metrics:
            lines.append(
                f"train: {int(tr.metrics.get('steps', 0))} steps at "
                f"{tr.metrics['samples_per_s']:,.0f} samples/s, stopped by "
                f"{tr.tags.get('stopped_by', '?')}."
            )
        if summary.promotion:
            lines.append(
                f"registry: version {summary.promotion.get('model_version')} "
                f"{summary.promotion.get('promotion')} ({summary.promotion.get('promotion_reason')})."
            )
        self.set_parent_tags({"mlflow.note.content": "\n".join(lines)})
