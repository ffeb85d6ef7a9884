"""The stability bound of stale SGD, reproduced: the η·a at which SGD on a quadratic of curvature
a diverges when every gradient is τ versions old, found by experiment for τ = 0..8, against
2·sin(π/(4τ+2)).

The experiment runs the parameter server's own update rule (``trainers.staleness.StaleServer``)
on f(x) = x²/2 with workers simulated by a queue of pulls, so that every push is exactly τ
versions old, and bisects on η·a (a run diverges when its |x| grows from its second fifth to its
last). A second column gives the threshold of η₀ under the server's staleness-aware step
η₀/max(τ, 1), which is what lets asynchronous training keep one base rate at any staleness.

    .venv/bin/python bench/staleness_stability.py [--max-tau 8] [--steps 4000] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

from trainers.staleness import divergence_threshold, stability_bound

TARGET = 0.02  # measured within 2% of the bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tau", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4000, help="pushes per trial run")
    parser.add_argument("--tol", type=float, default=1e-3, help="bisection's relative width")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows, t0 = [], time.perf_counter()
    for tau in range(args.max_tau + 1):
        measured = divergence_threshold(tau, steps=args.steps, tol=args.tol)
        scaled = divergence_threshold(tau, steps=args.steps, tol=args.tol, scale=True)
        predicted = stability_bound(tau)
        rows.append({"tau": tau, "measured": round(measured, 5), "predicted": round(predicted, 5),
                     "rel_error": round(measured / predicted - 1, 5),
                     "measured_lr0_scaled": round(scaled, 5),
                     "predicted_lr0_scaled": round(max(tau, 1) * predicted, 5)})  # fmt: skip
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"{'tau':>3}  {'measured':>9}  {'predicted':>9}  {'error':>7}  "
          f"{'eta0 scaled':>11}  {'predicted':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['tau']:>3}  {r['measured']:>9.4f}  {r['predicted']:>9.4f}  "
              f"{100 * r['rel_error']:>+6.2f}%  {r['measured_lr0_scaled']:>11.4f}  "
              f"{r['predicted_lr0_scaled']:>9.4f}")  # fmt: skip
    worst = max(abs(r["rel_error"]) for r in rows)
    print(f"worst error {100 * worst:.2f}% (target {100 * TARGET:.0f}%): "
          f"{'met' if worst <= TARGET else 'MISSED'}; {time.perf_counter() - t0:.1f}s")  # fmt: skip


if __name__ == "__main__":
    main()
