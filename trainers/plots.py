"""The evaluation's pictures, as PNG artifacts: learning curve, error decomposition, buckets,
the sweep's trade-off chart (test error against compute time with its lower envelope), and the
plan's predicted scaling."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():  # noqa: ANN202
    # start-up speed: matplotlib only when a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    # start-up speed: matplotlib, as above
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int = 100, **kwargs) -> None:  # noqa: ANN001, ANN003
    """Lay out, write and close a figure (pyplot keeps every open figure alive otherwise)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, **kwargs)
    pyplot().close(fig)


def learning_curve(
    references: list[dict], n_train: int, metrics: dict[str, float], path: Path
) -> None:
    """Reference test error against training rows, the fitted curve, the run and Bayes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    m = np.array([r["fraction"] * n_train for r in references])
    ax.plot(m, [r["test_error"] for r in references], "o", label="reference runs (converged)")
    if "curve_a" in metrics:
        grid = np.geomspace(m.min(), m.max() * 4, 100)
        fitted = metrics["curve_a"] + metrics["curve_b"] * grid ** -metrics["curve_c"]
        ax.plot(grid, fitted, "-", label=f"a + b·m^-c, a = {metrics['curve_a']:.4f}")
    ax.axhline(metrics["test_error"], color="C3", ls="--", label="this run")
    if "bayes_error" in metrics:
        ax.axhline(metrics["bayes_error"], color="k", ls=":", label="Bayes error")
    ax.set_xscale("log")
    ax.set_xlabel("training rows m")
    ax.set_ylabel("test error")
    ax.set_title("Learning curve")
    ax.legend(fontsize=8)
    save(fig, path)


def decomposition_bar(metrics: dict[str, float], path: Path) -> None:
    """The test error stacked as Bayes + approximation + estimation + optimization."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    parts = [("bayes_error", "Bayes"), ("err_approx", "approximation"),
             ("err_estim", "estimation"), ("err_optim", "optimization")]  # fmt: skip
    bottom = 0.0
    for key, label in parts:
        value = metrics.get(key)
        if value is None:
            continue
        ax.bar(0, value, bottom=bottom, label=f"{label} {value:+.4f}")
        bottom += value
    ax.axhline(metrics["test_error"], color="k", lw=1)
    ax.set_xticks([])
    ax.set_ylabel("test error")
    ax.set_title(f"test_error {metrics['test_error']:.4f}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    save(fig, path, bbox_inches="tight")


def bucket_accuracy(metrics: dict[str, float], path: Path) -> None:
    """Accuracy per Zipf bucket, with how many test queries each has."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    names = [b for b in ("head", "torso", "tail") if np.isfinite(metrics.get(f"acc_{b}", np.nan))]
    ax.bar(names, [metrics[f"acc_{b}"] for b in names], color=["C0", "C1", "C2"][: len(names)])
    for i, b in enumerate(names):
        ax.text(i, metrics[f"acc_{b}"], f"n={int(metrics.get(f'n_test_{b}', 0))}", ha="center",
                va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy by Zipf bucket")
    save(fig, path)


def lower_envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no cheaper point beats: sorted by cost, each with a lower error than all
    before it."""
    out: list[tuple[float, float]] = []
    for cost, err in sorted(points):
        if not out or err < out[-1][1]:
            out.append((cost, err))
    return out


def tradeoff(points: list[dict], path: Path) -> None:
    """Test error against compute time for every sweep point, with the lower envelope."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for precision in sorted({p["precision"] for p in points}):
        mine = [p for p in points if p["precision"] == precision]
        ax.scatter([p["compute_s"] for p in mine], [p["test_error"] for p in mine], label=precision,
                   s=[12 + 30 * p["fraction"] for p in mine], alpha=0.7)  # fmt: skip
    env = lower_envelope([(p["compute_s"], p["test_error"]) for p in points])
    env.append((max(p["compute_s"] for p in points), env[-1][1]))  # draw it to the right edge
    ax.step(
        [c for c, _ in env], [e for _, e in env], where="post", color="k", label="lower envelope"
    )
    ax.set_xscale("log")
    ax.set_xlabel("compute time (s, log)")
    ax.set_ylabel("test error")
    ax.set_title("Trade-off: test error against compute (size ∝ n)")
    ax.legend(fontsize=8)
    save(fig, path)


def scaling(predictions: list[dict], path: Path) -> None:
    """``zipfline plan``: predicted samples/s against workers, one line per mode."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(p["mode"] for p in predictions):
        mine = [p for p in predictions if p["mode"] == mode and np.isfinite(p["samples_per_s"])]
        ax.plot([p["workers"] for p in mine], [p["samples_per_s"] for p in mine], "o-", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers (world size)")
    ax.set_ylabel("predicted samples/s")
    ax.set_title("the alpha-beta model")
    ax.legend()
    save(fig, path)
