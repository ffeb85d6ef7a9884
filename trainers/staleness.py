"""Asynchronous updates with bounded staleness: the parameter server's update rule, and the
stability bound it lives under.

A worker pulls the parameters at the server's version ``v``, computes a gradient there and pushes
it; by the time the push arrives the server is at version ``v + τ`` (τ other pushes were applied
in between: the push's *staleness*). The server applies a push at once, with the step scaled by
its staleness, η_τ = η₀ / max(τ, 1), and drops a push whose τ exceeds ``max_staleness`` (counted,
never silent). Each applied push advances the version by one.

Why the scaling: on a quadratic with curvature ``a``, gradient descent whose every gradient is τ
steps old, x_{t+1} = x_t − η·a·x_{t−τ}, converges only while

    η·a < 2·sin(π / (4τ + 2))

(the delay-difference equation's stability region; Levin and May, 1976). The bound falls like
π/(2τ) as τ grows, so a step that is safe fresh diverges once updates are a few versions old;
with η_τ = η₀/max(τ, 1) the bound on η₀ becomes max(τ, 1)·2·sin(π/(4τ+2)), which is at least 1
for every τ (it tends to π/2). :func:`divergence_threshold` finds the bound by experiment: a
synthetic quadratic, workers simulated by a queue of pulled versions so that every push is
exactly τ versions old, and this module's :class:`StaleServer` applying each push.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def stability_bound(tau: int) -> float:
    """The largest stable η·a for SGD on a quadratic of curvature ``a`` whose gradients are all
    ``tau`` steps old: 2·sin(π/(4τ+2)) (2 for fresh gradients, 1 for τ = 1)."""
    if tau < 0:
        raise ValueError(f"staleness is at least 0, not {tau}")
    return 2.0 * math.sin(math.pi / (4 * tau + 2))


def scaled_bound(tau: int) -> float:
    """The largest stable η₀·a where a push of staleness ``tau`` steps by η₀ / max(τ, 1):
    max(τ, 1)·2·sin(π/(4τ+2)) (2 fresh, 1 at τ = 1, then rising towards π/2)."""
    return max(tau, 1) * stability_bound(tau)


def staleness_lr_cap(lambda_max: float, tau: int, safety: float) -> float:
    """The rate η₀ that keeps η₀·λ_max at ``safety`` of :func:`scaled_bound` for every
    staleness up to ``tau`` (async mode's cap, with τ its pushes' 95th percentile): the bound
    is not monotone (1 at τ = 1, then rising), and pushes under the percentile are as late as
    any, so the smallest of them: 2 at τ = 0, else 1."""
    return safety * min(scaled_bound(t) for t in range(tau + 1)) / lambda_max


def stale_lr(lr0: float, tau: int) -> float:
    """The step a push of staleness ``tau`` is applied with: η₀ / max(τ, 1)."""
    return lr0 / max(tau, 1)


Gradient = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""One parameter's pushed gradient: the whole tensor's, or ``(rows, values)`` for the rows of
an embedding table that the worker's batch touched."""


@dataclass
class StaleServer:
    """The parameters of an asynchronous run and the rule that updates them: :meth:`pull` hands
    out a copy and its version, :meth:`push` applies (or drops) a gradient computed at a pulled
    version. ``scale=False`` applies every push with η₀ (plain stale SGD, for the stability
    bound's experiment). Counts what it did for the run's record: pushes applied and dropped,
    and the staleness of every push (:meth:`staleness_histogram`)."""

    params: Sequence[torch.Tensor]
    lr0: float
    max_staleness: int
    scale: bool = True
    version: int = 0
    applied: int = 0
    dropped: int = 0
    staleness: Counter[int] = field(default_factory=Counter)

    def pull(self) -> tuple[int, list[torch.Tensor]]:
        """The current version and a copy of the parameters at it."""
        return self.version, [p.detach().clone() for p in self.params]

    def push(self, grads: Sequence[Gradient], pulled_version: int) -> bool:
        """Apply ``grads`` (one per parameter, computed at ``pulled_version``) with the step of
        their staleness; False, and nothing changes, where they are too stale."""
        tau = self.version - pulled_version
        if tau < 0:
            raise ValueError(f"a push from version {pulled_version}, ahead of {self.version}")
        self.staleness[tau] += 1
        if tau > self.max_staleness:
            self.dropped += 1
            return False
        lr = stale_lr(self.lr0, tau) if self.scale else self.lr0
        with torch.no_grad():
            for p, g in zip(self.params, grads, strict=True):
                if isinstance(g, tuple):
                    rows, values = g
                    p.index_add_(0, rows, values, alpha=-lr)
                else:
                    p.add_(g, alpha=-lr)
        self.version += 1
        self.applied += 1
        return True

    def staleness_histogram(self) -> dict[int, int]:
        """Pushes by staleness τ (applied and dropped), in order of τ."""
        return dict(sorted(self.staleness.items()))


def stale_run(step: float, tau: int, steps: int, *, scale: bool = False) -> list[float]:
    """|x| after each applied push on f(x) = x²/2 (curvature 1) through a :class:`StaleServer`
    of rate ``step`` (η₀ where ``scale``), every push ``tau`` versions old: workers are
    simulated by a queue of pulls, and a pull's gradient is pushed once ``tau`` others have
    been. The first ``tau`` pushes come from pulls at version 0, x = 1: the delay equation's
    constant history."""
    x = torch.ones(1, dtype=torch.float64)
    server = StaleServer([x], lr0=step, max_staleness=tau, scale=scale)
    pulled = [server.pull() for _ in range(tau)]  # the first τ workers' pulls, all at version 0
    trace = []
    for _ in range(steps):
        pulled.append(server.pull())
        version, (at,) = pulled.pop(0)
        server.push([at], version)  # the gradient of x²/2 at the pulled x is the pulled x
        trace.append(abs(float(x[0])))
        if not math.isfinite(trace[-1]) or trace[-1] > 1e12:
            break
    return trace


def diverges(step: float, tau: int, steps: int, *, scale: bool = False) -> bool:
    """Whether stale SGD of rate ``step`` (η·a, a = 1) at staleness ``tau`` grows: the largest
    |x| of the run's last fifth above that of its second fifth (both windows span many of the
    slowest mode's periods, about 4τ + 2 steps)."""
    trace = stale_run(step, tau, steps, scale=scale)
    if len(trace) < steps:
        return True  # ran off to infinity
    fifth = steps // 5
    return max(trace[-fifth:]) > max(trace[fifth : 2 * fifth])


def divergence_threshold(
    tau: int, *, steps: int = 4000, tol: float = 1e-3, scale: bool = False
) -> float:
    """The smallest η·a at which stale SGD at staleness ``tau`` diverges (of η₀·a, where the
    server scales the step by staleness), by bisection on :func:`diverges` to within ``tol``
    relative, between 0 and 2.5."""
    lo, hi = 0.0, 2.5
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        if diverges(mid, tau, steps, scale=scale):
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2
