"""The stage list: one declaration per stage, and how one stage runs, is fingerprinted and reused.

Each :class:`Stage` names its job module (``jobs.<name>``, whose ``run(ctx, out)`` does the
work), the config sections it reads, when it is enabled, the outside inputs it reads (raw
files, the external test file, the label store) and its hooks: ``checks`` run on the finished
output before its marker is written (the data quality gate), ``after`` run once the stage has
really run (not when it was reused), such as the registry's promotion. Adding a stage is a new
``jobs/<name>.py`` and one entry in :data:`STAGES`.

**Content-addressed reuse.** A stage's fingerprint is a digest of its settings, its outside
inputs, and the fingerprint of the stage before it in the flow, so it changes whenever anything
it was computed from changes, upstream included. A stage is reused only when the fingerprint in
its ``_SUCCESS`` marker equals the one computed now; otherwise it runs again, and so (since
their fingerprints chain through it) does every stage after it. ``--force`` runs them anyway.
"""

from __future__ import annotations

import datetime as dt
import errno
import importlib
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core import atomic
from core.config import Config
from core.errors import ConfigError, StageError, ZipflineError
from core.hashing import digest, labels_fingerprint, source_fingerprint
from core.layout import MARKER, RunContext, StageResult
from pipelines import registry
from pipelines.tracking import Tracker

StageFn = Callable[[RunContext, Path], StageResult]
Check = Callable[[RunContext, str, Path, StageResult], None]
"""A hook on a finished output before its marker: may update the result or raise."""


@dataclass
class RunSummary:
    """What a pipeline run did: each stage's result, which were reused, the registry verdict."""

    run_id: str
    run_date: str
    experiment_id: str = ""
    results: dict[str, StageResult] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    promotion: dict[str, str] = field(default_factory=dict)


@dataclass
class PipelineRun:
    """A run in flight, as the ``after`` hooks see it."""

    ctx: RunContext
    tracker: Tracker
    summary: RunSummary
    child_runs: dict[str, str] = field(default_factory=dict)
    """Stage name → its MLflow child run id."""


After = Callable[[PipelineRun, str, StageResult], None]
"""A hook after a stage has really run, inside its MLflow child run."""


def _always(cfg: Config) -> bool:
    return True


def _labels(ctx: RunContext) -> dict[str, Any]:
    return {"labels": labels_fingerprint(ctx.root)}


def _raw(ctx: RunContext) -> dict[str, Any]:
    return {"raw": source_fingerprint(ctx.cfg.data.raw_path)}


def _test_file(ctx: RunContext) -> dict[str, Any]:
    return {"test": source_fingerprint(ctx.cfg.data.test_path)}


def _shards(ctx: RunContext) -> dict[str, Path]:
    shard = ctx.stage_dir("shard")
    return {"training": shard, "validation": shard}


def _test_split(ctx: RunContext) -> dict[str, Path]:
    return {"test": ctx.stage_dir("split") / "test"}


def gate(ctx: RunContext, stage: str, out: Path, result: StageResult) -> None:
    """The data quality gate of ``stage`` over its output (when ``dq.enabled``)."""
    if ctx.cfg.dq.enabled:
        from data_quality.gates import run_gate  # Great Expectations: seconds, only when gated

        run_gate(ctx.cfg, stage, out, ctx.spark, result)


def promote(run: PipelineRun, stage: str, result: StageResult) -> None:
    """Register the model the train run logged and let it compete for ``champion`` on this
    run's test set; the verdict goes to the parent run's tags and the summary."""
    from jobs.evaluate import weighted_error  # torch and pyspark: only when it runs

    ctx = run.ctx
    if not ctx.cfg.registry.enabled or "train" not in run.child_runs:
        return
    decision = registry.promote(
        ctx.cfg.registry,
        f"runs:/{run.child_runs['train']}/model",
        result.metrics["test_error_weighted"],
        lambda uri: weighted_error(ctx, uri),
        {"run_id": run.summary.run_id, "run_date": ctx.run_date},
    )
    run.tracker.set_parent_tags(decision.tags())
    run.summary.promotion = decision.tags()
    verdict = "champion" if decision.accepted else "not promoted"
    print(f"registry: {ctx.cfg.registry.model_name} version {decision.version} {verdict}: "
          f"{decision.reason}", file=sys.stderr, flush=True)  # fmt: skip


@dataclass(frozen=True)
class Stage:
    """One stage of the flow, declared once."""

    name: str
    settings: tuple[str, ...]
    """Config sections (``train``) or single keys (``train.world_size``) its output depends on."""
    enabled: Callable[[Config], bool] = _always
    sources: Callable[[RunContext], dict[str, Any]] | None = None
    """Fingerprints of what it reads from outside the run's folders."""
    checks: tuple[Check, ...] = ()
    after: tuple[After, ...] = ()
    gated: bool = False
    """Whether ``checks`` include its data quality gate (the run preloads GX when any does)."""
    datasets: Callable[[RunContext], dict[str, Path]] | None = None
    """The datasets it learns from or is judged on, ``context -> folder`` (``training``,
    ``validation``, ``test``), logged as MLflow dataset inputs of its run."""

    @property
    def run(self) -> StageFn:
        """``jobs.<name>.run``, imported on first use (each job pulls in pyspark or torch)."""
        return importlib.import_module(f"jobs.{self.name}").run


STAGES: tuple[Stage, ...] = (
    Stage("generate", ("generate",), enabled=lambda cfg: not cfg.data.raw_path),
    Stage(
        "ingest",
        ("data.raw_path", "data.raw_format", "data.labels", "ingest", "dq"),
        sources=_raw,
        checks=(gate,),
        gated=True,
    ),
    Stage("dedupe", ("dedupe",), sources=_labels, checks=(gate,), gated=True),
    Stage(
        "split",
        ("split", "data.test_path", "data.test_format"),
        sources=_test_file,
        checks=(gate,),
        gated=True,
    ),
    Stage("augment", ("augment",), enabled=lambda cfg: cfg.augment.enabled),
    Stage("shard", ("shard", "featurizer", "train.world_size"), checks=(gate,), gated=True),
    Stage("train", ("model", "train"), datasets=_shards),
    Stage("evaluate", ("eval", "registry"), datasets=_test_split, after=(promote,)),
    Stage("select", ("select", "label"), sources=_labels, enabled=lambda c: c.select.enabled),
)
NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    """The declaration of ``name``; a :class:`ConfigError` naming the stages otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ConfigError(f"no stage {name!r} (stages: {', '.join(NAMES)})") from None


def enabled_stages(cfg: Config) -> list[Stage]:
    return [s for s in STAGES if s.enabled(cfg)]


def select_stages(cfg: Config, start: str | None = None, stop: str | None = None) -> list[Stage]:
    """The stages a run executes, between ``--from`` and ``--to`` inclusive."""
    names = [s.name for s in enabled_stages(cfg)]
    for flag, value in (("--from", start), ("--to", stop)):
        if value is not None and value not in names:
            raise ConfigError(
                f"{flag} {value}: not a stage of this run (stages: {', '.join(names)})"
            )
    lo = names.index(start) if start else 0
    hi = names.index(stop) if stop else len(names) - 1
    if lo > hi:
        raise ConfigError(f"--from {start} comes after --to {stop}")
    return [BY_NAME[n] for n in names[lo : hi + 1]]


def _setting(cfg: dict[str, Any], key: str) -> Any:
    section, _, name = key.partition(".")
    return cfg[section][name] if name else cfg[section]


def fingerprint(ctx: RunContext, st: Stage, upstream: str | None) -> str:
    """The digest of what ``st``'s output is computed from (see the module docstring)."""
    full = ctx.cfg.to_dict()
    return digest(
        {
            "stage": st.name,
            "settings": {key: _setting(full, key) for key in st.settings},
            "sources": st.sources(ctx) if st.sources else {},
            "upstream": upstream,
        }
    )


def upstream_fingerprint(ctx: RunContext, name: str) -> str | None:
    """The fingerprint on disk of the enabled stage right before ``name`` (None for the first;
    ``"missing"`` when that stage has not finished for this run date)."""
    names = [s.name for s in enabled_stages(ctx.cfg)]
    i = names.index(name) if name in names else NAMES.index(name)
    if i == 0:
        return None
    return ctx.marker(names[i - 1]).get("fingerprint", "missing")


def is_current(ctx: RunContext, name: str, fp: str) -> bool:
    """Whether ``name`` finished for this run date from exactly these inputs."""
    return ctx.done(name) and ctx.marker(name).get("fingerprint") == fp


def run_stage(
    ctx: RunContext, name: str, fn: StageFn | None = None, *, upstream: str | None = ""
) -> StageResult:
    """Run one stage into a temporary folder, run its checks, write its marker (counts and
    fingerprint), and rename it into place. ``upstream`` defaults to the fingerprint on disk of
    the stage before it."""
    st = stage(name)
    if upstream == "":
        upstream = upstream_fingerprint(ctx, name)
    fp = fingerprint(ctx, st, upstream)
    start = time.monotonic()
    try:
        with atomic.atomic_dir(ctx.stage_dir(name)) as tmp:
            result = (fn or st.run)(ctx, tmp)
            for check in st.checks:
                check(ctx, name, tmp, result)
            result.check_reconciles(name)  # before the marker: a stage that loses rows never ends
            result.seconds = round(time.monotonic() - start, 3)
            marker = {
                "stage": name,
                "run_date": ctx.run_date,
                "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "fingerprint": fp,
                "upstream": upstream,
                "result": asdict(result),
            }
            atomic.write_json(tmp / MARKER, marker)
    except Exception as exc:
        full = disk_full(exc, ctx.run_dir)
        if full is None:
            raise
        raise StageError(
            f"{name}: no space left under {ctx.run_dir} ({full / 2**20:.1f} MiB free); nothing "
            "of the stage was kept: make room (or point data.root elsewhere), then run the "
            "same command again"
        ) from exc
    return result


LOW_SPACE_BYTES = 64 << 20
"""Under this much free space where a stage failed, the failure is put down to a full disk:
writers that hit one do not all say so (``torch.save`` reports an iostream error, a training
process's error reaches the driver only as "TorchDistributor failed")."""


def disk_full(exc: BaseException, where: Path) -> int | None:
    """The free bytes under ``where`` when the failure ``exc`` looks like a full disk (ENOSPC in
    its chain or its text, or, for a failure not of the data or config, under
    :data:`LOW_SPACE_BYTES` free now); None otherwise."""
    try:
        free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
    except (OSError, StopIteration):
        return None
    chain, seen = exc, False
    while chain is not None and not seen:
        seen = getattr(chain, "errno", None) == errno.ENOSPC or "No space left on device" in str(
            chain
        )
        chain = chain.__cause__ or chain.__context__
    # a failure of the data or config is not the disk's, however little room is left
    blameless = isinstance(exc, ZipflineError) and not isinstance(exc, StageError)
    return free if seen or (free < LOW_SPACE_BYTES and not blameless) else None


def stale_before(ctx: RunContext, first: str) -> list[str]:
    """The finished stages before ``first`` whose output no longer matches this config and
    inputs (a ``--from`` run builds on them as they are)."""
    stale, upstream = [], None
    for st in enabled_stages(ctx.cfg):
        if st.name == first:
            break
        fp = fingerprint(ctx, st, upstream)
        if ctx.done(st.name) and not is_current(ctx, st.name, fp):
            stale.append(st.name)
        upstream = ctx.marker(st.name).get("fingerprint", "missing")
    return stale
