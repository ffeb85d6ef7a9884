"""Error decomposition (Bottou & Bousquet; docs/architecture.md, "Definitions"): why a run's
test error is what it is.

    R(run) − R(f*) = err_approx + err_estim + err_optim
    err_approx = R(f_F*) − R(f*)     the model family's limit over the Bayes risk
    err_estim  = R(f_n)  − R(f_F*)   what n examples leave on the table
    err_optim  = R(run)  − R(f_n)    what the time budget (and tolerance) left unfinished

R(f*) is the Bayes risk from the generator's truth (else the best reference run, with
``bayes_known=false``); R(f_n) is the same model and data trained to convergence without a time
budget; R(f_F*) is the asymptote ``a`` of ``R(m) ≈ a + b·m^(−c)`` fitted on reference runs with
sub-samples n/8, n/4, n/2 and n. The terms add up exactly by construction. Reference runs are
single-process trainings run in parallel on Dask (a ``LocalCluster`` on 127.0.0.1 by default;
on a small training split, one after another in the calling process instead) and cached by the
data's manifest hash and the model and training settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from trainers.spec import TrainSpec

FRACTIONS = (0.125, 0.25, 0.5, 1.0)
RISKS = ("test_error", "test_logloss")


def fit_learning_curve(m: np.ndarray, risk: np.ndarray) -> tuple[float, float, float] | None:
    """``(a, b, c)`` of ``risk ≈ a + b·m^(−c)`` by least squares (``c`` on a grid, ``a`` and
    ``b`` in closed form, ``a`` kept within ``[0, min risk]``), or None when no decreasing curve
    fits (``b ≤ 0`` for every ``c``)."""
    m, risk = np.asarray(m, dtype=float), np.asarray(risk, dtype=float)
    if len(m) < 3 or not np.all(np.isfinite(risk)):
        return None
    best = None
    for c in np.linspace(0.05, 2.0, 196):
        x = m ** (-c)
        design = np.column_stack([np.ones_like(x), x])
        (a, b), *_ = np.linalg.lstsq(design, risk, rcond=None)
        if b <= 0:  # the risk does not fall with more data at this exponent
            continue
        if not 0.0 <= a <= risk.min():  # a risk is ≥ 0 and the limit is below every point
            a = float(np.clip(a, 0.0, risk.min()))
            b = float(x @ (risk - a) / (x @ x))
        sse = float(((a + b * x - risk) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, float(a), float(b), float(c))
    return None if best is None else best[1:]


def decompose(
    run_risk: float, bayes: float, converged: float, asymptote: float
) -> dict[str, float]:
    """The three terms; they sum to ``run_risk − bayes`` exactly."""
    return {
        "err_approx": asymptote - bayes,
        "err_estim": converged - asymptote,
        "err_optim": run_risk - converged,
    }


def cache_key(manifest: dict[str, Any], spec: TrainSpec, settings: dict[str, Any]) -> str:
    """Reference runs depend on the data (its files' hashes), the model and how it trains (not
    on the collective timeout nor on how often it checkpoints)."""
    files = sorted(
        (f["path"], f["sha256"]) for split in manifest["splits"].values() for f in split["files"]
    )
    payload = spec.settings_payload(leave_out=("timeout_s", "checkpoint_every"))
    payload |= {"files": files, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def reference_run(spec: TrainSpec, fraction: float, test_frame: Any) -> dict[str, float]:
    """One reference training (one process, gloo on 127.0.0.1) on ``fraction`` of the training
    rows, scored on the test frame; runs inside a Dask worker."""
    # torch and the trainer: only in the Dask worker
    import torch.distributed as dist

    from trainers.evaluate import TestSet, evaluate
    from trainers.launch import free_port, train_worker
    from trainers.predictor import Predictor
    from trainers.trainer import MODEL_FILE

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                       "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "GLOO_SOCKET_IFNAME": "lo"})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="zipfline-ref-") as tmp:
        run_spec = dataclasses.replace(
            spec, out_dir=tmp, checkpoint_dir=None, train_fraction=fraction
        )
        if dist.is_initialized():  # pragma: no cover - a worker reused after a failure
            dist.destroy_process_group()
        result = train_worker(run_spec)
        predictor = Predictor.from_file(Path(tmp) / MODEL_FILE)
        probs = predictor.predict_proba(list(test_frame["query"]))
    test = TestSet.from_frame(test_frame, predictor.labels)
    metrics = evaluate(test, probs, breadth_recall=0.5)
    return {
        "fraction": fraction,
        "test_error": metrics["test_error"],
        "test_logloss": metrics["test_logloss"],
        "stopped_by": result["stopped_by"],
        "train_rows": int(result.get("train_rows", 0)),
        "time_used_s": float(result["time_used_s"]),
    }


@contextmanager
def _without_model_code_paths() -> Iterator[None]:
    """Loading a pyfunc model puts its ``code/`` snapshot on ``sys.path``; worker processes
    started meanwhile would import that (older) copy of this project instead of this one."""
    root = Path(__file__).resolve().parents[1]
    saved = list(sys.path)
    sys.path[:] = [
        p for p in saved
        if not ((Path(p or ".") / "trainers").is_dir() and Path(p or ".").resolve() != root)
    ]  # fmt: skip
    try:
        yield
    finally:
        sys.path[:] = saved


@contextmanager
def _as_a_worker() -> Iterator[None]:
    """A reference run in this process: what it sets for its one-process group (the rendezvous
    variables, torch's thread count) is put back afterwards."""
    import torch  # torch: only when reference runs are due

    saved_env, threads = dict(os.environ), torch.get_num_threads()
    try:
        yield
    finally:  # only what changed: other threads may read the environment meanwhile
        for key in set(os.environ) - set(saved_env):
            del os.environ[key]
        for key, value in saved_env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        torch.set_num_threads(threads)


def run_references(
    spec: TrainSpec | None,
    test_frame: Any,
    *,
    scheduler: str | None,
    workers: int,
    jobs: list[tuple[TrainSpec, float]] | None = None,
    in_process: bool = False,
) -> list[dict[str, float]]:
    """Single-process trainings in parallel on Dask (or, ``in_process``, one after another
    here), scored on ``test_frame``, in order: the reference runs of ``spec`` for every
    fraction, or the given ``(spec, fraction)`` jobs."""
    jobs = jobs if jobs is not None else [(spec, f) for f in FRACTIONS]
    if in_process:
        results = []
        for job_spec, fraction in jobs:
            with _as_a_worker():
                results.append(reference_run(job_spec, fraction, test_frame))
        return results
    from dask.distributed import Client, LocalCluster  # Dask: only when reference runs are due

    for name in ("distributed", "dask"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if scheduler:
        client, cluster = Client(scheduler), None
    else:
        with _without_model_code_paths():
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, silence_logs=logging.ERROR,
            )  # fmt: skip
        client = Client(cluster)
    try:
        frame = client.scatter(test_frame, broadcast=True)
        futures = [client.submit(reference_run, s, f, frame, pure=False) for s, f in jobs]
        return client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def decomposition(
    run_metrics: dict[str, float], references: list[dict[str, float]], n_train: int
) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics (``bayes_error`` when unknown, ``err_*`` and ``err_*_logloss``) and ``missing.*``
    tags with the reason for what cannot be computed."""
    metrics: dict[str, float] = {}
    missing: dict[str, str] = {}
    refs = sorted(references, key=lambda r: r["fraction"])
    full = next((r for r in refs if r["fraction"] == 1.0), None)
    if full is None:
        return metrics, {f"missing.err_{t}": "no full-data reference run" for t in
                         ("approx", "estim", "optim")}  # fmt: skip
    if full["stopped_by"] == "budget":
        for risk in RISKS:
            suffix = "" if risk == "test_error" else "_logloss"
            for term in ("approx", "estim", "optim"):
                missing[f"missing.err_{term}{suffix}"] = (
                    "the reference run did not converge within eval.reference_budget_s"
                )
        return metrics, missing
    sizes = np.array([max(r["fraction"] * n_train, 1.0) for r in refs])
    for risk in RISKS:
        suffix = "" if risk == "test_error" else "_logloss"
        bayes_key = "bayes_error" if risk == "test_error" else "bayes_logloss"
        fit = fit_learning_curve(sizes, np.array([r[risk] for r in refs]))
        if fit is None:
            for term in ("approx", "estim"):
                missing[f"missing.err_{term}{suffix}"] = (
                    "no decreasing learning curve a + b·m^-c fits the sub-sample runs"
                )
            metrics[f"err_optim{suffix}"] = run_metrics[risk] - full[risk]
            continue
        asymptote = fit[0]
        bayes = run_metrics.get(bayes_key)
        if bayes is None:  # no truth: the best reference stands in for the Bayes risk
            bayes = min(min(r[risk] for r in refs), asymptote)
            metrics[bayes_key] = bayes
        terms = decompose(run_metrics[risk], bayes, full[risk], asymptote)
        metrics |= {f"{k}{suffix}": v for k, v in terms.items()}
        metrics[f"curve_a{suffix}"], metrics[f"curve_b{suffix}"], metrics[f"curve_c{suffix}"] = fit
        metrics[f"r_converged{suffix}"] = full[risk]
    return metrics, missing
