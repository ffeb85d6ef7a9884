"""What every stage shares: the run context, the result it reports, markers and atomic output.

A stage writes into a temporary folder beside its final one, writes ``_SUCCESS`` (its result as
JSON) into it, and renames it into place: a reader never sees half a stage, and a rerun for the
same run date skips every stage whose marker exists unless ``--force`` (DESIGN §1, §9).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import DataError, StageError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipelines.config import Config

log = logging.getLogger("zipfline")
MARKER = "_SUCCESS"
LABELS_DIR = "labels"
"""``<data.root>/labels/``: imported labels, kept across run dates (``zipfline label import``)."""
# Config sections (or single dotted keys) each stage reads, in flow order; a stage's output
# depends on its own and on every earlier stage's.
GATED = ("ingest", "dedupe", "split", "shard")
"""Stages whose output passes a data quality gate before its marker is written."""

SETTINGS_BY_STAGE: dict[str, tuple[str, ...]] = {
    "generate": ("generate",),
    "ingest": ("data", "ingest", "dq"),
    "dedupe": ("dedupe",),
    "split": ("split",),
    "augment": ("augment",),
    "shard": ("shard", "featurizer", "train.world_size"),
    "train": ("model", "train"),
    "evaluate": ("eval",),
    "select": ("select", "label"),  # last: its settings shape its own output only
}


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
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class RunContext:
    """One pipeline run: the config, the run date, its folders and the lazily made Spark session."""

    def __init__(
        self,
        cfg: Config,
        run_date: str | None = None,
        *,
        force: bool = False,
        spark: SparkSession | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_date = run_date or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        _check_run_date(self.run_date)
        self.force = force
        self._spark = spark
        self.root = Path(cfg.data.root).expanduser().resolve()
        self.run_dir = self.root / self.run_date

    @cached_property
    def spark(self) -> SparkSession:
        """The Spark session, made on first use by the one factory."""
        if self._spark is not None:
            return self._spark
        from pipelines.spark import get_spark

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

    def read_result(self, stage: str) -> StageResult:
        return StageResult.from_json(self._marker(stage)["result"])

    def _marker(self, stage: str) -> dict[str, Any]:
        return json.loads((self.stage_dir(stage) / MARKER).read_text())

    def settings_sha(self, stage: str) -> str:
        """A fingerprint of the config sections that shape ``stage``'s output, its own and its
        upstream stages' (not where runs are tracked or how Spark is sized), and from dedupe on
        of the imported labels."""
        order = list(SETTINGS_BY_STAGE)
        upto = order[: order.index(stage) + 1] if stage in order else order
        keys = sorted({name for s in upto for name in SETTINGS_BY_STAGE[s]})
        full = self.cfg.to_dict()
        settings = {}
        for key in keys:
            section, _, field_name = key.partition(".")
            settings[key] = full[section][field_name] if field_name else full[section]
        if "dedupe" in upto:  # dedupe merges the imported labels: new labels, new output
            from pipelines.retrain import labels_fingerprint

            settings["imported labels"] = labels_fingerprint(self.root)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def settings_changed(self, stage: str) -> bool:
        """True when ``stage`` finished under other settings than this run's."""
        return self._marker(stage).get("settings_sha") != self.settings_sha(stage)


def _check_run_date(value: str) -> None:
    from pipelines.errors import ConfigError

    try:
        dt.date.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"--run-date {value!r}: expected YYYY-MM-DD") from exc


StageFn = Callable[[RunContext, Path], StageResult]


def run_atomically(ctx: RunContext, stage: str, fn: StageFn) -> StageResult:
    """Run ``fn`` into a temporary folder, write the marker, rename into place."""
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ctx.run_dir.glob(f".{stage}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ctx.run_dir / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    start = time.monotonic()
    try:
        result = fn(ctx, tmp)
        if ctx.cfg.dq.enabled and stage in GATED:
            from data_quality.gates import run_gate

            run_gate(ctx.cfg, stage, tmp, ctx.spark, result)
        result.check_reconciles(stage)  # before the marker: a stage that loses rows never finishes
        result.seconds = round(time.monotonic() - start, 3)
        marker = {
            "stage": stage,
            "run_date": ctx.run_date,
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "settings_sha": ctx.settings_sha(stage),
            "result": asdict(result),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        final = ctx.stage_dir(stage)
        if final.exists():
            old = ctx.run_dir / f".{stage}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        return result
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
