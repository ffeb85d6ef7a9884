"""The data layout: where a run's stages write, what a finished stage leaves, and the run
context a stage is given.

::

    <data.root>/
      <run_date>/<stage>/     one folder per stage, renamed into place when complete
        _SUCCESS              the stage's marker: its result (counts, metrics) and fingerprint
      <run_date>/.checkpoints/train/   training checkpoints while a run is in flight
      <run_date>/.run.lock    held by the one run of that date in flight (a second one is refused)
      labels/                 imported labels, kept across run dates
      retrain.log, retrain.watermark.json, .retrain.lock

A stage is a function ``run(ctx, out) -> StageResult`` that writes into ``out`` (a temporary
folder) and reads earlier stages through :meth:`RunContext.require`. The orchestration layer
(``pipelines.stages``) decides which stages run, fingerprints them and renames their output
into place; nothing here knows the list of stages.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import Config
from core.errors import ConfigError, DataError, StageError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

MARKER = "_SUCCESS"
LABELS_DIR = "labels"
"""``<data.root>/labels/``: imported labels, kept across run dates (``zipfline label import``)."""
RUN_LOCK = ".run.lock"
"""``<data.root>/<run_date>/.run.lock``: held (``core.atomic.exclusive_lock``) by the run of that
date in flight; a second run of the same date stops at once, naming the first one's pid."""
CHECKPOINT_DIR = ".checkpoints/train"
"""Training checkpoints under the run date, beside the stage folders, while a run is in flight."""

# Files and folders that one stage writes and a later one reads.
ROWS_DIR = "rows"
"""``ingest/rows/``: the normalized rows."""
TRUTH_DIR = "_truth"
"""``<raw>/_truth/``: the generator's ground truth beside its log."""
AUGMENTED_TRAIN_DIR = "train"
"""``augment/train/``: the training split with its variants."""
SELECTED_DIR = "selected"
"""``select/selected/``: the active-learning batch as Parquet."""
TRAIN_SPEC_FILE = "train_spec.json"
"""``train/train_spec.json``: the typed training spec a run used."""
PYFUNC_DIR = "model"
"""``train/model/``: the MLflow pyfunc model."""


@dataclass
class StageResult:
    """What a stage reports: its row counts (which must reconcile), metrics, params, tags."""

    rows_in: int = 0
    rows_out: int = 0
    rows_quarantined: int = 0
    rows_merged: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    """Files or folders (relative to the stage folder) to attach to the stage's MLflow run."""
    series: dict[str, list[list[float]]] = field(default_factory=dict)
    """Metric histories as ``[step, value]`` pairs (loss curves), logged in one batch."""
    model: str | None = None
    """A saved ``model.pt`` (relative to the stage folder) to log as the run's pyfunc model."""
    seconds: float = 0.0

    def check_reconciles(self, stage: str) -> None:
        """``rows_in = rows_out + rows_quarantined + rows_merged``, and the reasons add up."""
        total = self.rows_out + self.rows_quarantined + self.rows_merged
        if self.rows_in != total:
            raise DataError(
                f"stage {stage}: counts do not reconcile: rows_in {self.rows_in} != rows_out "
                f"{self.rows_out} + rows_quarantined {self.rows_quarantined} + rows_merged "
                f"{self.rows_merged}"
            )
        by_reason = sum(self.quarantined_by_reason.values())
        if by_reason != self.rows_quarantined:
            raise DataError(
                f"stage {stage}: quarantine reasons add up to {by_reason}, "
                f"not rows_quarantined {self.rows_quarantined}"
            )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageResult:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Champion:
    """The registry's current champion, fetched to a local ``model.pt``."""

    version: str
    model_file: Path


ChampionSource = Callable[[Config, Path], Champion | None]
"""Fetches the registry's champion into a folder (None when there is none): provided to the
stages by the orchestration layer, which owns the registry."""


class RunContext:
    """One pipeline run: the config, the run date, its folders and the lazily made Spark session."""

    def __init__(
        self,
        cfg: Config,
        run_date: str | None = None,
        *,
        force: bool = False,
        spark: SparkSession | None = None,
        champion: ChampionSource | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_date = run_date or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        try:
            dt.date.fromisoformat(self.run_date)
        except ValueError as exc:
            raise ConfigError(f"--run-date {self.run_date!r}: expected YYYY-MM-DD") from exc
        self.force = force
        self._spark = spark
        self.champion = champion
        self.root = data_root(cfg)
        self.run_dir = self.root / self.run_date

    @cached_property
    def spark(self) -> SparkSession:
        """The Spark session, made on first use by the one factory."""
        if self._spark is not None:
            return self._spark
        from core.spark import get_spark  # pyspark's import costs seconds: only when needed

        return get_spark(self.cfg.spark)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / MARKER).exists()

    def require(self, stage: str) -> Path:
        """The output folder of an earlier stage, which must have finished for this run date."""
        if not self.done(stage):
            raise StageError(
                f"stage {stage} has not finished for run date {self.run_date} under {self.run_dir} "
                f"(run it first, e.g. zipfline run --run-date {self.run_date} --from {stage})"
            )
        return self.stage_dir(stage)

    def marker(self, stage: str) -> dict[str, Any]:
        """The ``_SUCCESS`` marker of a finished stage ({} when there is none)."""
        try:
            return json.loads((self.stage_dir(stage) / MARKER).read_text())
        except (OSError, ValueError):
            return {}

    def read_result(self, stage: str) -> StageResult:
        return StageResult.from_json(self.marker(stage).get("result", {}))


def data_root(cfg: Config) -> Path:
    """``data.root`` as an absolute path."""
    return Path(cfg.data.root).expanduser().resolve()


def data_files(path: Path) -> list[Path]:
    """The files a reader sees at ``path``: the file itself, or those below the folder, sorted,
    leaving out hidden ``.``/``_`` paths (markers, quarantine, the generator's ``_truth``)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )  # fmt: skip
