"""The measurements behind ``zipfline run --budget``: gradient noise and Chebyshev's batch size,
λ_max by power iteration, Hessian-vector products two ways, and the plan they make."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers.autoplan import (
    EPOCHS_TO_CONVERGE,
    Probe,
    chebyshev_batch,
    choose_mode,
    example_grads_of,
    gradient_noise,
    hvp_double_backward,
    hvp_finite_difference,
    kernel_samples_per_s,
    plan,
    top_eigenvalue,
)
from trainers.model import ModelSpec, NgramClassifier


def _regression(n: int, d: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w_star = rng.standard_normal(d)
    y = x @ w_star + noise * rng.standard_normal(n)
    return torch.from_numpy(x), torch.from_numpy(y), w_star


def test_gradient_noise_and_the_chebyshev_batch_on_a_linear_regression():
    d, noise, n = 5, 0.5, 4000
    x, y, w_star = _regression(n, d, noise)
    e = np.full(d, 0.3)  # the point where the gradients are taken: w = w* + e
    w = [torch.from_numpy(w_star + e).requires_grad_(True)]

    def example_loss(params, i):
        return 0.5 * (x[i] @ params[0] - y[i]) ** 2

    sigma2, mean_sq = gradient_noise(w, example_grads_of(w, example_loss), np.ones(n))
    # the same sample in closed form: g_i = x_i (x_i·w − y_i)
    g = x.numpy() * (x.numpy() @ (w_star + e) - y.numpy())[:, None]
    assert sigma2 == pytest.approx(
        (g * g).sum(axis=1).mean() - (g.mean(axis=0) ** 2).sum(), rel=1e-9
    )
    assert mean_sq == pytest.approx((g.mean(axis=0) ** 2).sum(), rel=1e-9)
    # and the population: E[x xᵀ] = I gives σ² = (d + 1)‖e‖² + d·noise², ‖ḡ‖² = ‖e‖²
    assert sigma2 == pytest.approx((d + 1) * (e @ e) + d * noise**2, rel=0.1)
    assert mean_sq == pytest.approx(e @ e, rel=0.25)

    eps, delta = 1.0, 0.1
    batch = chebyshev_batch(sigma2, eps, delta)
    assert batch == math.ceil(sigma2 / (eps**2 * delta))
    # the bound holds: mini-batches of that size miss the mean gradient by ε at most δ of the time
    rng = np.random.default_rng(1)
    draws = rng.integers(0, n, size=(2000, batch))
    misses = np.linalg.norm(g[draws].mean(axis=1) - g.mean(axis=0), axis=1) > eps
    assert misses.mean() <= delta
    with pytest.raises(ValueError):
        chebyshev_batch(sigma2, 0.0, delta)


def test_with_weights_the_noise_is_that_of_the_trainers_weighted_mean():
    """Rows drawn uniformly, losses weighted: Var(Σ w g / Σ w) over batches of n ≈ σ²/n."""
    d, n = 3, 3000
    x, y, w_star = _regression(n, d, 0.3, seed=4)
    weights = np.random.default_rng(5).pareto(2.5, n) + 0.2  # heavy-tailed, like sqrt_count
    w = [torch.from_numpy(w_star + 0.4)]

    def example_loss(params, i):
        return 0.5 * (x[i] @ params[0] - y[i]) ** 2

    sigma2, _ = gradient_noise(w, example_grads_of(w, example_loss), weights)
    g = x.numpy() * (x.numpy() @ (w_star + 0.4) - y.numpy())[:, None]
    full = (weights[:, None] * g).sum(axis=0) / weights.sum()
    batch, rng = 200, np.random.default_rng(6)
    draws = rng.integers(0, n, size=(4000, batch))
    means = (weights[draws][..., None] * g[draws]).sum(axis=1) / weights[draws].sum(axis=1)[:, None]
    simulated = ((means - full) ** 2).sum(axis=1).mean()
    assert sigma2 / batch == pytest.approx(simulated, rel=0.15)
    plain, _ = gradient_noise(w, example_grads_of(w, example_loss), np.ones(n))
    assert sigma2 > 1.2 * plain  # unequal weights make the estimator noisier


def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    eigenvalues = np.linspace(0.1, 7.3, 30)
    a = torch.from_numpy(q @ np.diag(eigenvalues) @ q.T)
    w = [torch.from_numpy(rng.standard_normal(30))]

    def loss(params):
        return 0.5 * params[0] @ a @ params[0]

    lam, iters = top_eigenvalue(lambda v: hvp_finite_difference(loss, w, v), w, iters=500, tol=1e-7)
    assert lam == pytest.approx(7.3, rel=0.01) and iters < 500
    exact, _ = top_eigenvalue(lambda v: hvp_double_backward(loss, w, v), w, iters=500, tol=1e-7)
    assert exact == pytest.approx(7.3, rel=0.01)


def _model_and_batch(hidden=(8,), seed=0):
    torch.manual_seed(seed)
    model = NgramClassifier(ModelSpec(num_buckets=500, dim=6, hidden=hidden, num_classes=4))
    with torch.no_grad():  # away from the zero initialization, so every block has curvature
        model.output.weight.normal_(0, 0.5)
        model.embedding.weight.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (40,), generator=gen)
    ids = torch.randint(0, 500, (int(lengths.sum()),), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    labels = torch.randint(0, 4, (40,), generator=gen)
    labels[3] = -1  # unlabeled: no weight
    weights = torch.rand(40, generator=gen) + 0.5
    return model, (ids, offsets, labels, weights)


def test_finite_difference_and_double_backward_hessian_products_agree_on_the_model():
    model, batch = _model_and_batch()
    probe = Probe.of(model, batch)
    # the compact problem is the model's own loss on the batch
    logits = model(batch[0], batch[1]).detach().double()
    known = batch[2] >= 0
    per = torch.nn.functional.cross_entropy(logits, batch[2].clamp(min=0), reduction="none")
    w = batch[3].double() * known
    assert float(probe.loss(probe.params).detach()) == pytest.approx(
        float((per * w).sum() / w.sum()), rel=1e-6
    )
    # per-example gradients of each bag's own rows are those of the whole table
    fast = gradient_noise(probe.params, probe.example_grads, probe.weights)
    whole = gradient_noise(
        probe.params, example_grads_of(probe.params, probe.example_loss), probe.weights
    )
    assert fast == pytest.approx(whole, rel=1e-9) and fast[0] > 0
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in probe.params]
        fd = hvp_finite_difference(probe.loss, probe.params, v)
        exact = hvp_double_backward(probe.loss, probe.params, v)
        num = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(fd, exact, strict=True)))
        den = math.sqrt(sum(float((b**2).sum()) for b in exact))
        assert num / den < 1e-3


def test_the_plan_says_what_it_measured_and_caps_plain_sgd():
    model, batch = _model_and_batch(hidden=())
    with torch.no_grad():  # fastText's initialization: the warm-up moves the probe off it
        model.output.weight.zero_()
    kwargs = dict(precisions=["fp32", "bf16"], train_rows=10_000, world_size=2, mode="sync",
                  grad_rel_error=0.5, delta=0.1, lr_safety=0.5)  # fmt: skip
    choices = {c.setting: c for c in plan(model, batch, optimizer="sgd", lr=1e6, **kwargs)}
    assert set(choices) == {"train.batch_size", "train.lr", "train.precision"}
    size = choices["train.batch_size"]
    assert 8 <= size.value <= 8192 and size.measured["sigma2"] > 0 and "Chebyshev" in size.why
    # the bound is on a step's whole batch: in sync mode the two workers share it
    assert size.value == max(8, min(math.ceil(size.measured["n_bound"] / 2), 10_000 // 8))
    lr = choices["train.lr"]
    assert lr.measured["lambda_max"] > 0 and lr.measured["hvp_fd_vs_exact"] < 1e-3
    assert lr.value == pytest.approx(0.5 * 2 / lr.measured["lambda_max"])
    assert "applied, as plain SGD" in lr.why
    assert choices["train.precision"].value in ("fp32", "bf16")
    assert choices["train.precision"].measured["step_ms_fp32"] > 0
    # Adagrad scales its own steps: the cap is reported, the rate kept
    adagrad = {c.setting: c for c in plan(model, batch, optimizer="adagrad", lr=0.5, **kwargs)}
    assert adagrad["train.lr"].value == 0.5 and "reported only" in adagrad["train.lr"].why


def test_the_mode_is_shared_only_where_the_budget_binds():
    # 100k samples/s over 1M rows: 60 s afford 6 epochs (under 10: shared), 120 s afford 12
    tight = choose_mode(100_000, 1_000_000, 60, world_size=2)
    assert (tight.setting, tight.value) == ("train.mode", "shared")
    assert tight.measured["epochs_in_budget"] == pytest.approx(6.0) and EPOCHS_TO_CONVERGE == 10
    assert "the budget binds" in tight.why
    roomy = choose_mode(100_000, 1_000_000, 120, world_size=2)
    assert roomy.value == "local_sgd" and roomy.measured["epochs_in_budget"] == pytest.approx(12)


def test_the_kernel_is_timed_on_copies_of_the_weights():
    from trainers.data import ShardData

    model, _ = _model_and_batch(hidden=())
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 6, 200)
    data = ShardData(
        ids=rng.integers(0, model.embedding.weight.shape[0], int(lengths.sum())).astype(np.int32),
        row_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        labels=rng.integers(0, model.output.weight.shape[0], 200),
        weights=np.ones(200, dtype=np.float32),
    )
    before = [p.detach().clone() for p in model.parameters()]
    sps = kernel_samples_per_s(model, data, np.arange(200), "rowwise_adagrad")
    assert sps > 1000
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
