"""``train.auto`` (``zipfline run --budget``): the training setup chosen from measurements on a
probe of the training rows, not from a grid; every choice keeps the measurement that made it.

- **Batch size** from Chebyshev's bound: the mini-batch gradient is within ε of the full one
  with probability at least 1 − δ when n ≥ σ²/(ε²δ), σ² the variance of per-example gradients
  (measured one example at a time on the probe) and ε = ``auto.grad_rel_error`` × ‖mean
  gradient‖.
- **Learning-rate cap** from the largest Hessian eigenvalue λ_max, found by power iteration on
  Hessian-vector products (finite differences of gradients, checked against double backward):
  plain gradient descent is stable on a quadratic only while η < 2/λ_max, so η ≤ c·2/λ_max
  (c = ``auto.lr_safety``) where the optimizer takes plain steps (``sgd``, and async mode's
  server); Adagrad scales its steps by the gradients' history, and the cap is reported, not
  applied. In async mode, whose server steps every parameter at ``train.lr``, λ_max is the whole
  model's and goes to the server too (``train.lambda_max``), which caps its rate by the
  stability bound at the staleness its pushes arrive with.
- **Precision** from measured step times: T_sol = N_it × T_step, and lower precision leaves N_it
  about as it is on this model, so the faster step wins when it is faster by a clear margin.
- **Mode** of the numba kernel's workers (``train.mode=auto``, more than one worker) from its
  measured samples/s: where the budget leaves one worker room for fewer than
  ``EPOCHS_TO_CONVERGE`` epochs it binds, and the workers share one copy of the weights
  (``shared``: Hogwild!, nothing sent, about twice the samples/s of averaged replicas on two
  workers); otherwise they average replicas (``local_sgd``), which generalize better.

The first three are measured on the compact problem of the probe (the embedding rows its n-grams
touch and the dense layers, in float64), after a few steps of gradient descent on as many
other rows (:func:`warm_up`): at fastText's initialization the output layer is zero, and so is
every embedding row's gradient. λ_max is the embedding block's, since ``train.lr`` is the embedding
table's rate; σ² is the variance of the trainer's own estimator (rows drawn uniformly, losses
weighted), and n bounds a step's whole batch (split among the workers in sync mode).
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from core.errors import ConfigError
from trainers.data import ShardData, read_split
from trainers.kernels import train_examples
from trainers.model import NgramClassifier
from trainers.spec import TrainSpec
from trainers.trainer import KERNEL_OPTIMIZER, kernel_arrays, kernel_state_for, what_runs

Params = list[torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]
MIN_BATCH, MAX_BATCH = 8, 8192
WARM_UP_STEPS = 10  # gradient steps on the probe before it is measured
WARM_UP_FIRST_STEP = 1000.0  # the step size each warm-up step tries first (then halves): the
# gradients at fastText's initialization are tiny (inputs of size 1/dim, a zero output layer)
PRECISION_MARGIN = 0.8  # a lower precision is chosen when its step takes under 80% of fp32's
EPOCHS_TO_CONVERGE = 10  # the numba kernel's runs converge in 4-6 epochs on the generated log and
# on WordNet's glosses: a budget with room for fewer at one worker's pace binds
KERNEL_PROBE_S = 0.3  # seconds of the numba kernel timed on the probe rows


# --- the measurements -----------------------------------------------------------------------


ExampleGrads = Callable[[int], list[tuple[torch.Tensor | None, torch.Tensor]]]
"""Example i's gradient, parameter by parameter: ``(rows, grad)`` where only ``rows`` of that
parameter have a gradient, ``(None, grad)`` where the whole parameter has one."""


def gradient_noise(
    params: Params, example_grads: ExampleGrads, weights: np.ndarray
) -> tuple[float, float]:
    """The noise of the trainer's mini-batch gradient, one backward pass per example: rows are
    drawn uniformly and weighted, so the mean of n of them, Σ w_i g_i / Σ w_i, has variance about
    σ²/n with σ² = E_i[(w_i/w̄)² ‖g_i − ḡ‖²], ḡ = Σ w_i g_i / Σ w_i. Returns (σ², ‖ḡ‖²); with
    equal weights σ² is the plain variance E‖g_i − ḡ‖²."""
    w = np.asarray(weights, dtype=np.float64)
    count = len(w)
    p = w / w.sum()  # the weights of the mean gradient
    a = (w / w.mean()) ** 2 / count  # the uniform draw's weights of the squared deviations
    mean = [torch.zeros_like(t) for t in params]
    spread = [torch.zeros_like(t) for t in params]  # Σ a_i g_i
    square = 0.0  # Σ a_i ‖g_i‖²
    for i in np.flatnonzero(w > 0):
        for m, s_, (rows, g) in zip(mean, spread, example_grads(int(i)), strict=True):
            square += a[i] * float((g * g).sum())
            for acc, alpha in ((m, float(p[i])), (s_, float(a[i]))):
                if rows is None:
                    acc.add_(g, alpha=alpha)
                else:
                    acc.index_add_(0, rows, g, alpha=alpha)
    mean_sq = sum(float((t * t).sum()) for t in mean)
    cross = sum(float((m * s_).sum()) for m, s_ in zip(mean, spread, strict=True))
    sigma2 = square - 2.0 * cross + float(a[w > 0].sum()) * mean_sq
    return float(max(sigma2, 0.0)), float(mean_sq)


def example_grads_of(
    params: Params, example_loss: Callable[[Params, int], torch.Tensor]
) -> ExampleGrads:
    """Whole-parameter per-example gradients of ``example_loss(params, i)`` by autograd."""
    leaves = [t.detach().requires_grad_(True) for t in params]

    def grads(i: int) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        return [(None, g) for g in torch.autograd.grad(example_loss(leaves, i), leaves)]

    return grads


def chebyshev_batch(sigma2: float, eps: float, delta: float) -> int:
    """The smallest n with σ²/(n ε²) ≤ δ: Chebyshev's bound on a mean of n i.i.d. gradients."""
    if eps <= 0 or not 0 < delta < 1:
        raise ValueError("eps must be > 0 and delta in (0, 1)")
    return max(1, math.ceil(sigma2 / (eps * eps * delta)))


def hvp_double_backward(loss: LossFn, params: Params, v: Params) -> Params:
    """H·v by differentiating g·v (exact)."""
    params = [p.detach().requires_grad_(True) for p in params]
    grads = torch.autograd.grad(loss(params), params, create_graph=True)
    dot = sum((g * u).sum() for g, u in zip(grads, v, strict=True))
    return [h.detach() for h in torch.autograd.grad(dot, params)]


def _grad(loss: LossFn, params: Params) -> Params:
    params = [p.detach().requires_grad_(True) for p in params]
    return [g.detach() for g in torch.autograd.grad(loss(params), params)]


def hvp_finite_difference(loss: LossFn, params: Params, v: Params, h: float = 1e-5) -> Params:
    """H·v ≈ (∇L(w + h v) − ∇L(w − h v)) / 2h, with h relative to ‖w‖ / ‖v‖."""
    scale = h * max(_norm(params), 1.0) / max(_norm(v), 1e-30)
    plus = _grad(loss, [p + scale * u for p, u in zip(params, v, strict=True)])
    minus = _grad(loss, [p - scale * u for p, u in zip(params, v, strict=True)])
    return [(a - b) / (2 * scale) for a, b in zip(plus, minus, strict=True)]


def _norm(tensors: Params) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in tensors))


def _random_like(like: Params, seed: int, block: Sequence[bool] | None = None) -> Params:
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in like]
    return _only(v, block)


def _only(v: Params, block: Sequence[bool] | None) -> Params:
    """``v`` with the parameters outside ``block`` set to zero."""
    return (
        v
        if block is None
        else [u if keep else torch.zeros_like(u) for u, keep in zip(v, block, strict=True)]
    )


def top_eigenvalue(
    hvp: Callable[[Params], Params], like: Params, *, iters: int = 100, tol: float = 1e-4,
    seed: int = 0, block: Sequence[bool] | None = None,
) -> tuple[float, int]:  # fmt: skip
    """The Hessian's eigenvalue of largest magnitude by power iteration on ``hvp``; with the
    iterations it took (at most ``iters``, until λ moves by less than ``tol`` relative). With
    ``block``, of the Hessian's block of the parameters marked True."""
    v = _random_like(like, seed, block)
    norm = _norm(v)
    v = [u / norm for u in v]
    lam = 0.0
    for i in range(1, iters + 1):
        hv = _only(hvp(v), block)
        new = sum(float((a * b).sum()) for a, b in zip(v, hv, strict=True))
        norm = _norm(hv)
        if norm == 0:
            return 0.0, i
        v = [u / norm for u in hv]
        if i > 1 and abs(new - lam) <= tol * abs(new):
            return new, i
        lam = new
    return lam, iters


# --- the model's compact problem ------------------------------------------------------------


@dataclass
class Probe:
    """The loss of ``model`` on one batch, as a function of the embedding rows the batch touches
    and the dense layers (float64 copies): all the curvature and gradient noise of that batch."""

    params: Params
    loss: LossFn
    example_grads: ExampleGrads
    example_loss: Callable[[Params, int], torch.Tensor]
    weights: np.ndarray
    names: list[str] = field(default_factory=list)
    warm_loss: LossFn | None = None
    """The loss of the rows set aside for :func:`warm_up` (none: the measured rows')."""

    @classmethod
    def of(
        cls, model: NgramClassifier, batch: Sequence[torch.Tensor], warm: torch.Tensor | None = None
    ) -> Probe:
        """The probe of ``batch``; the rows marked in ``warm`` only serve :func:`warm_up`, so
        that the measured rows' mean gradient is not one the warm-up has just driven down."""
        ids, offsets, labels, weights = batch
        uniq, local = torch.unique(ids, return_inverse=True)
        dense = {n: p for n, p in model.named_parameters() if not n.startswith("embedding.")}
        names = list(dense)
        params = [model.embedding.weight.detach()[uniq].double().clone()]
        params += [p.detach().double().clone() for p in dense.values()]
        known = labels >= 0
        w_all = weights.double() * known
        w = w_all if warm is None else w_all * ~warm
        device = ids.device
        ends = torch.cat([offsets[1:], torch.tensor([len(ids)], device=device)])
        lengths = (ends - offsets).clamp(min=1).double()
        bag = torch.repeat_interleave(torch.arange(len(offsets), device=device), ends - offsets)

        def logits(ps: Params, rows: torch.Tensor) -> torch.Tensor:
            # the mean of each bag's rows by index_add, which (unlike embedding_bag) has a
            # second derivative
            tokens = torch.isin(bag, rows) if len(rows) < len(offsets) else None
            which = bag if tokens is None else bag[tokens]
            gathered = ps[0][local if tokens is None else local[tokens]]
            pooled = torch.zeros(len(offsets), ps[0].shape[1], dtype=ps[0].dtype, device=device)
            pooled = pooled.index_add(0, which, gathered)[rows] / lengths[rows, None]
            return head(ps, pooled)

        def head(ps: Params, pooled: torch.Tensor) -> torch.Tensor:
            state = dict(zip(names, ps[1:], strict=True))
            hidden = {
                k.removeprefix("hidden."): v for k, v in state.items() if k.startswith("hidden.")
            }
            out = {
                k.removeprefix("output."): v for k, v in state.items() if k.startswith("output.")
            }
            h = functional_call(model.hidden, hidden, (pooled,)) if hidden else pooled
            return functional_call(model.output, out, (h,))

        every = torch.arange(len(offsets), device=device)

        def weighted(by: torch.Tensor) -> LossFn:
            def loss(ps: Params) -> torch.Tensor:
                per = F.cross_entropy(logits(ps, every), labels.clamp(min=0), reduction="none")
                return (per * by).sum() / by.sum().clamp(min=1e-12)

            return loss

        loss = weighted(w)
        warm_loss = None if warm is None else weighted(w_all * warm)

        dense_leaves = [t.detach().requires_grad_(True) for t in params[1:]]

        def example_grads(i: int) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
            # only the example's own rows: a gradient the size of the bag, not of the table
            rows, inverse = torch.unique(local[int(offsets[i]) : int(ends[i])], return_inverse=True)
            mine = params[0][rows].detach().requires_grad_(True)
            pooled = mine[inverse].mean(dim=0, keepdim=True)
            z = head([mine, *dense_leaves], pooled)
            loss = F.cross_entropy(z, labels[i : i + 1].clamp(min=0))
            grads = torch.autograd.grad(loss, [mine, *dense_leaves])
            return [(rows, grads[0]), *((None, g) for g in grads[1:])]

        def example_loss(ps: Params, i: int) -> torch.Tensor:  # the same, by the whole table
            z = logits(ps, torch.tensor([i], device=device))
            return F.cross_entropy(z, labels[i : i + 1].clamp(min=0))

        return cls(params, loss, example_grads, example_loss, w.cpu().numpy(), names, warm_loss)


def step_seconds(model: NgramClassifier, batch: Sequence[torch.Tensor], precision: str,
                 repeats: int = 5) -> float:  # fmt: skip
    """The median wall time of one forward and backward pass on ``batch`` at ``precision``
    (autocast for bf16/fp16), on the model's device."""
    ids, offsets, labels, _ = batch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    device = next(model.parameters()).device
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
        with ctx:
            out = model(ids, offsets)
        F.cross_entropy(out.float(), labels.clamp(min=0)).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


# --- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One choice of the plan: the setting, its value and what decided it."""

    setting: str
    value: Any
    why: str
    measured: dict[str, float]


def plan(
    model: NgramClassifier,
    probe_batch: Sequence[torch.Tensor],
    *,
    optimizer: str,
    lr: float,
    precisions: Sequence[str],
    train_rows: int,
    world_size: int,
    mode: str,
    grad_rel_error: float,
    delta: float,
    lr_safety: float,
    seed: int = 0,
) -> list[Choice]:
    """Batch size, learning-rate cap and precision for ``model`` from measurements on
    ``probe_batch`` (see the module docstring), taken after :func:`warm_up`."""
    ids, offsets, labels, weights = probe_batch
    half = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    half[len(labels) // 2 :] = True  # the batch's rows are in random order: a random half
    probe = Probe.of(model, probe_batch, warm=half if len(labels) >= 2 * MIN_BATCH else None)
    warm_loss = warm_up(probe)
    choices = []

    t0 = time.perf_counter()
    sigma2, mean_sq = gradient_noise(probe.params, probe.example_grads, probe.weights)
    eps = grad_rel_error * math.sqrt(mean_sq)
    n = chebyshev_batch(sigma2, eps, delta) if eps > 0 else MAX_BATCH
    # n bounds the batch one gradient step averages: in sync mode the workers' batches together
    per_worker = math.ceil(n / world_size) if mode == "sync" else n
    ceiling = max(MIN_BATCH, train_rows // max(4 * world_size, 1))  # at least 4 steps an epoch
    batch = int(min(max(per_worker, MIN_BATCH), MAX_BATCH, ceiling))
    choices.append(Choice(
        "train.batch_size", batch,
        f"Chebyshev: n >= sigma^2/(eps^2 delta) = {n} (eps = {grad_rel_error} x |mean gradient|, "
        f"delta = {delta}); {per_worker} per worker ({mode}, {world_size} workers), within "
        f"[{MIN_BATCH}, {min(MAX_BATCH, ceiling)}]",
        {"sigma2": sigma2, "mean_grad_norm2": mean_sq, "eps": eps, "delta": delta, "n_bound": n,
         "probe_rows": int((probe.weights > 0).sum()), "warm_up_loss": warm_loss,
         "seconds": time.perf_counter() - t0},
    ))  # fmt: skip

    t0 = time.perf_counter()
    # the embedding's block: train.lr is the embedding table's rate; in async mode the server
    # steps every parameter at train.lr, so all of them
    block = None if mode == "async" else [True] + [False] * (len(probe.params) - 1)
    lam, iters = top_eigenvalue(
        lambda v: hvp_finite_difference(probe.loss, probe.params, v), probe.params, seed=seed,
        block=block,
    )  # fmt: skip
    v = _random_like(probe.params, seed + 1)
    fd = hvp_finite_difference(probe.loss, probe.params, v)
    exact = hvp_double_backward(probe.loss, probe.params, v)
    diff = _norm([a - b for a, b in zip(fd, exact, strict=True)]) / max(_norm(exact), 1e-30)
    cap = lr_safety * 2.0 / lam if lam > 0 else None
    applied = (optimizer == "sgd" or mode == "async") and cap is not None  # plain SGD steps
    value = min(lr, cap) if applied else lr
    choices.append(Choice(
        "train.lr", value,
        (f"cap c x 2/lambda_max = {cap or math.inf:.4g} (lambda_max {lam:.4g} of the "
         f"{'whole model' if block is None else 'embedding block'}, {iters} power iterations); "
         + ("applied, as plain SGD steps" if applied else
            f"reported only: {optimizer} scales its own steps")),
        {"lambda_max": lam, "power_iterations": iters, "lr_cap": cap, "hvp_fd_vs_exact": diff,
         "seconds": time.perf_counter() - t0},
    ))  # fmt: skip
    if mode == "async" and lam > 0:
        choices.append(Choice(
            "train.lambda_max", lam,
            f"async: the server caps its rate at c x (the lowest max(t, 1) x 2 sin(pi/(4t + 2)) "
            f"for t up to its pushes' 95th-percentile staleness) / lambda_max (c = {lr_safety})",
            {"lambda_max": lam},
        ))  # fmt: skip

    t0 = time.perf_counter()
    rows = min(batch, len(probe.weights))
    sub = _head(probe_batch, rows)
    times = {p: step_seconds(model, sub, p) for p in precisions}
    fastest = min(times, key=times.get)
    base = "fp32" if "fp32" in times else precisions[0]
    chosen = fastest if times[fastest] < PRECISION_MARGIN * times[base] else base
    choices.append(Choice(
        "train.precision", chosen,
        "step time " + ", ".join(f"{p} {t * 1e3:.2f} ms" for p, t in times.items())
        + f" at batch {rows}: T_sol = N_it x T_step, lower precision only when its step is under "
        f"{PRECISION_MARGIN:.0%} of {base}'s",
        {**{f"step_ms_{p}": t * 1e3 for p, t in times.items()}, "seconds": time.perf_counter() - t0},
    ))  # fmt: skip
    return choices


def kernel_samples_per_s(
    model: NgramClassifier, data: ShardData, rows: np.ndarray, optimizer: str
) -> float:
    """One worker's samples/s under the numba kernel: the probe ``rows`` trained over and over
    for about ``KERNEL_PROBE_S`` on copies of ``model``'s weights (the kernel compiled first)."""
    copy = copy_module.deepcopy(model)
    arrays = kernel_arrays(copy, kernel_state_for(copy))
    args = (data.ids, data.row_offsets, data.labels, data.weights)
    train_examples(*args, rows[:1], lr_start=0.0, lr_end=0.0, **arrays, optimizer=optimizer)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < KERNEL_PROBE_S:
        train_examples(*args, rows, lr_start=0.05, lr_end=0.05, **arrays, optimizer=optimizer)
        done += len(rows)
    return done / (time.perf_counter() - t0)


def choose_mode(samples_per_s: float, train_rows: int, budget_s: float, world_size: int) -> Choice:
    """``shared`` (Hogwild! on one copy: about twice the samples/s of averaged replicas on two
    workers) where the budget is too short for one worker to converge, else ``local_sgd``
    (averaged replicas generalize better, and the budget has the room)."""
    epochs = budget_s * samples_per_s / max(train_rows, 1)
    mode = "shared" if epochs < EPOCHS_TO_CONVERGE else "local_sgd"
    return Choice(
        "train.mode", mode,
        f"one worker trains {samples_per_s:,.0f} samples/s, {epochs:.1f} epochs of {train_rows:,} "
        f"rows in {budget_s:.0f}s; "
        + (f"under {EPOCHS_TO_CONVERGE}, so the budget binds: {world_size} workers share one copy"
           if mode == "shared" else
           f"at least {EPOCHS_TO_CONVERGE}, room to converge: {world_size} replicas averaged"),
        {"kernel_samples_per_s": samples_per_s, "epochs_in_budget": epochs,
         "epochs_to_converge": EPOCHS_TO_CONVERGE},
    )  # fmt: skip


def warm_up(probe: Probe, steps: int = WARM_UP_STEPS) -> float:
    """A few steps of gradient descent with backtracking on the probe's loss, in place, so that
    the measurements are taken away from the initialization (whose zero output layer gives every
    embedding row a zero gradient); returns the loss reached."""
    params, objective = probe.params, probe.warm_loss or probe.loss
    loss = float(objective(params))
    for _ in range(steps):
        grads = _grad(objective, params)
        size = WARM_UP_FIRST_STEP
        for _ in range(40):  # halve until the loss goes down
            trial = [p - size * g for p, g in zip(params, grads, strict=True)]
            trial_loss = float(objective(trial))
            if trial_loss < loss:
                break
            size /= 2
        else:
            break
        for p, t in zip(params, trial, strict=True):
            p.copy_(t)
        loss = trial_loss
    return loss


def _head(batch: Sequence[torch.Tensor], rows: int) -> tuple[torch.Tensor, ...]:
    ids, offsets, labels, weights = batch
    end = int(offsets[rows]) if rows < len(offsets) else len(ids)
    return ids[:end], offsets[:rows], labels[:rows], weights[:rows]


def configure(spec: TrainSpec, manifest: dict[str, Any]) -> tuple[TrainSpec, dict[str, Any]]:
    """``train.auto``: measure on a seeded probe of the training shards, choose, and return the
    spec to train with (its budget less the time the measuring took) and the plan as JSON data
    (``auto_plan.json``)."""
    t0 = time.perf_counter()
    t = spec.train
    data = read_split(Path(spec.shard_dir), "train", 0, 1)
    rng = np.random.default_rng(t.seed)
    labeled = np.flatnonzero(data.labels >= 0)
    if len(labeled) == 0:
        raise ConfigError("train.auto: no labeled training rows to measure on")
    # twice the probe: half to warm up on, half to measure (in random order: a random split)
    rows = rng.choice(labeled, size=min(2 * t.auto_probe_rows, len(labeled)), replace=False)
    batch = data.batch(rows)
    train_rows = int(manifest["splits"]["train"]["rows"])
    torch.manual_seed(t.seed)
    model = NgramClassifier(spec.model_spec(max(len(manifest["labels"]), 1)))
    on_gpu = t.use_gpu and torch.cuda.is_available()
    # what train.kernel / train.mode = auto become here: the numba kernel computes in fp32 (its
    # step times are not the torch loop's), and its workers average or share rather than split a
    # batch
    kernel, mode = what_runs(t, "cuda" if on_gpu else "cpu", tuple(spec.model.hidden))
    precisions = (  # async mode's server applies unscaled gradients: no fp16
        ["fp32"]
        if kernel == "numba"
        else ["fp32", "bf16", "fp16"]
        if on_gpu and mode != "async"
        else ["fp32", "bf16"]
    )
    if on_gpu:
        model = model.cuda()
        batch = tuple(x.cuda() for x in batch)
    choices = plan(
        model, batch, optimizer=t.optimizer, lr=t.lr, precisions=precisions,
        train_rows=train_rows, world_size=t.world_size, mode=mode,
        grad_rel_error=t.auto_grad_rel_error, delta=t.auto_delta, lr_safety=t.auto_lr_safety,
        seed=t.seed,
    )  # fmt: skip
    left_alone = {
        "capacity and data fraction": "not measured yet: model.*, featurizer.* as configured"
    }
    if kernel == "numba" and t.world_size > 1 and t.mode == "auto":
        sps = kernel_samples_per_s(model.cpu(), data, rows, KERNEL_OPTIMIZER[t.optimizer])
        left = t.time_budget_s - (time.perf_counter() - t0)
        choices.append(choose_mode(sps, train_rows, left, t.world_size))
        left_alone["workers"] = "not measured yet: train.world_size as configured"
    else:
        left_alone["workers and mode"] = (
            f"train.world_size, train.mode as configured ({mode}; the mode is chosen for the "
            "numba kernel's workers under train.mode=auto)"
        )
    seconds = time.perf_counter() - t0
    budget = max(t.time_budget_s - seconds, 1.0)
    report = {
        "budget_s": t.time_budget_s, "measuring_s": seconds, "training_budget_s": budget,
        "probe_rows": len(rows),
        "choices": [dataclasses.asdict(c) for c in choices],
        "left_alone": left_alone,
    }  # fmt: skip
    return apply_plan(spec, report), report


def apply_plan(spec: TrainSpec, report: dict[str, Any]) -> TrainSpec:
    """``spec`` with the plan's choices and the training budget it left."""
    changes = {c["setting"].removeprefix("train."): c["value"] for c in report["choices"]}
    return spec.with_train(**changes, time_budget_s=report["training_budget_s"])


def auto_params(report: dict[str, Any]) -> dict[str, Any]:
    """The plan as MLflow params: ``auto.<setting>`` and ``auto.<setting>.<measurement>``."""
    params: dict[str, Any] = {"auto.measuring_s": round(report["measuring_s"], 3)}
    for choice in report["choices"]:
        name = choice["setting"].removeprefix("train.")
        params[f"auto.{name}"] = choice["value"]
        for key, value in choice["measured"].items():
            params[f"auto.{name}.{key}"] = f"{value:.6g}" if isinstance(value, float) else value
    return params
