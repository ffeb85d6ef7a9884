"""``zipfline failures``: do the runs' failures depend on how they ran?

Every pipeline run in the experiment is one observation: its outcome (``ok``, or the class of
the error it failed with, the parent run's ``failure.class`` tag) and the factors it ran
under: the stage it failed in, the training mode, the number of training processes, the
precision, and the host. For each factor, a contingency table of outcome against the factor's
values and Pearson's χ² test of independence (Yates' correction on a 2×2 table) say whether
the outcome depends on it. The ``stage`` factor is tested over the failed runs alone (a run
that finished has no failing stage), the others over every run that ended. An interrupted run
(killed, or stopped by Ctrl-C) counts as ``killed``. Runs recorded before zipfline tagged
failures (no ``host`` tag) are left out and counted apart: their failures have no class.

χ² is an approximation that needs about five expected runs per cell; a table with fewer says
so next to its p-value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from core.config import TrackingConfig
from pipelines.tracking import FAILURE_CLASS, FAILURE_STAGE, HOST_TAG, PARENT_TAG, connect

OK = "ok"
FACTORS = {
    "stage": f"tags.{FAILURE_STAGE}",
    "mode": "params.train.mode",
    "world_size": "params.train.world_size",
    "precision": "params.train.precision",
    "host": f"tags.{HOST_TAG}",
}
"""Factor name -> the run field it is read from (the settings asked for, as logged)."""
ENDED = ("FINISHED", "FAILED", "KILLED")
"""Run statuses counted: a running run is not an outcome yet."""
MIN_EXPECTED = 5.0
ALPHA = 0.05


@dataclass(frozen=True)
class FactorTest:
    """One factor's contingency table (outcomes × values) and its χ² test; ``p_value`` is
    None when the table has fewer than two outcomes or two values with runs in them."""

    factor: str
    table: pd.DataFrame
    chi2: float | None
    dof: int | None
    p_value: float | None
    min_expected: float | None

    @property
    def verdict(self) -> str:
        if self.p_value is None:
            return "not testable: fewer than two outcomes or two values with runs"
        rough = (
            f" (χ² is rough here: a cell expects {self.min_expected:.1f} runs, under "
            f"{MIN_EXPECTED:.0f})"
            if self.min_expected is not None and self.min_expected < MIN_EXPECTED
            else ""
        )
        if self.p_value < ALPHA:
            return f"the outcome depends on {self.factor} (p < {ALPHA}){rough}"
        return f"no evidence that the outcome depends on {self.factor}{rough}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "table": {
                str(o): {str(v): int(n) for v, n in row.items()} for o, row in self.table.iterrows()
            },  # fmt: skip
            "chi2": self.chi2,
            "dof": self.dof,
            "p_value": self.p_value,
            "min_expected": self.min_expected,
            "verdict": self.verdict,
        }


def outcomes(cfg: TrackingConfig) -> tuple[pd.DataFrame, int]:
    """One row per pipeline run of the experiment that ended: ``run_id``, ``outcome`` and a
    column per factor (``n/a`` where the run did not record it); and how many ended runs were
    left out as recorded before failures were tagged."""
    # start-up speed: mlflow's client, when the command is run
    from mlflow.tracking import MlflowClient

    experiment = connect(cfg)
    client = MlflowClient(cfg.uri)
    rows, token, unrecorded = [], None, 0
    while True:
        page = client.search_runs(
            [experiment.experiment_id], f"tags.`{PARENT_TAG}` = 'pipeline'",
            max_results=1000, page_token=token,
        )  # fmt: skip
        for run in page:
            if run.info.status not in ENDED:
                continue
            if HOST_TAG not in run.data.tags:
                unrecorded += 1
                continue
            fields = {"tags": run.data.tags, "params": run.data.params}
            row = {"run_id": run.info.run_id, "outcome": _outcome(run.info.status, run.data.tags)}
            for factor, where in FACTORS.items():
                kind, key = where.split(".", 1)
                row[factor] = fields[kind].get(key, "n/a")
            rows.append(row)
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows, columns=["run_id", "outcome", *FACTORS]), unrecorded


def _outcome(status: str, tags: dict[str, str]) -> str:
    """``ok``, ``killed`` (MLflow's KILLED, or an interrupt, which MLflow ends FAILED), or the
    failed run's error class."""
    if status == "FINISHED":
        return OK
    cls = tags.get(FAILURE_CLASS, "unknown")
    return "killed" if status == "KILLED" or cls == "KeyboardInterrupt" else cls


def factor_test(runs: pd.DataFrame, factor: str) -> FactorTest:
    """The contingency table of outcome × ``factor`` over ``runs`` and its χ² test."""
    # start-up speed: scipy, when the command is run
    from scipy.stats import chi2_contingency

    if factor == "stage":
        runs = runs[runs["outcome"] != OK]
    table = pd.crosstab(runs["outcome"], runs[factor]) if len(runs) else pd.DataFrame()
    table = table.loc[table.sum(axis=1) > 0, table.sum(axis=0) > 0]
    if table.shape[0] < 2 or table.shape[1] < 2:
        return FactorTest(factor, table, None, None, None, None)
    result = chi2_contingency(table.to_numpy())
    return FactorTest(
        factor, table, float(result.statistic), int(result.dof), float(result.pvalue),
        float(result.expected_freq.min()),
    )  # fmt: skip


def failure_analysis(cfg: TrackingConfig) -> dict[str, Any]:
    """Every factor's test over the experiment's runs, as one JSON-ready object."""
    runs, unrecorded = outcomes(cfg)
    return {
        "runs": len(runs),
        "left_out": unrecorded,
        "failed": int((runs["outcome"] != OK).sum()),
        "outcomes": {str(k): int(v) for k, v in runs["outcome"].value_counts().items()},
        "factors": [factor_test(runs, f).to_dict() for f in FACTORS],
    }


def format_analysis(data: dict[str, Any]) -> str:
    """The tables and tests as text."""
    lines = [
        f"{data['runs']} runs, {data['failed']} failed: "
        + ", ".join(f"{k} {v}" for k, v in data["outcomes"].items())
    ]
    if data["left_out"]:
        lines.append(f"({data['left_out']} older runs left out: recorded before failures were "
                     "tagged)")  # fmt: skip
    for test in data["factors"]:
        lines.append("")
        lines.append(f"outcome × {test['factor']}" + (" (failed runs)" if test["factor"] ==
                                                       "stage" else ""))  # fmt: skip
        if test["table"]:
            table = pd.DataFrame(test["table"]).T.fillna(0).astype(int)
            table.index.name, table.columns.name = "outcome", test["factor"]
            lines.extend("  " + line for line in table.to_string().splitlines())
        if test["p_value"] is not None:
            lines.append(f"  χ² = {test['chi2']:.2f}, dof {test['dof']}, p = {test['p_value']:.3g}")
        lines.append(f"  {test['verdict']}")
    return "\n".join(lines)
