"""The parameter server's stale-update rule: the step scaled by staleness, the drop rule, fresh
pushes as plain SGD, and the stability bound's experiment at small size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainers.staleness import (
    StaleServer,
    divergence_threshold,
    diverges,
    scaled_bound,
    stability_bound,
    stale_lr,
    staleness_lr_cap,
)


def test_the_step_shrinks_with_staleness_and_too_stale_pushes_are_dropped_and_counted():
    w = torch.zeros(3)
    server = StaleServer([w], lr0=0.6, max_staleness=2)
    one = [torch.ones(3)]
    assert server.push(one, 0)  # tau 0: the full step
    assert torch.allclose(w, torch.full((3,), -0.6))
    assert server.push(one, 0)  # tau 1: still the full step (eta0 / max(tau, 1))
    assert torch.allclose(w, torch.full((3,), -1.2))
    assert server.push(one, 0)  # tau 2: half of it
    assert torch.allclose(w, torch.full((3,), -1.5))
    before = w.clone()
    assert not server.push(one, 0)  # tau 3 > max_staleness 2: dropped, nothing moves
    assert torch.equal(w, before) and server.version == 3
    assert (server.applied, server.dropped) == (3, 1)
    assert server.staleness_histogram() == {0: 1, 1: 1, 2: 1, 3: 1}
    assert stale_lr(0.6, 4) == pytest.approx(0.15) and stale_lr(0.6, 0) == 0.6
    with pytest.raises(ValueError, match="ahead of"):
        server.push(one, 7)


def test_row_pushes_touch_only_their_rows_and_repeated_rows_add_up():
    table = torch.zeros(5, 2)
    server = StaleServer([table], lr0=1.0, max_staleness=0)
    rows = torch.tensor([1, 3, 1])
    server.push([(rows, torch.ones(3, 2))], server.version)
    assert table[1].tolist() == [-2.0, -2.0] and table[3].tolist() == [-1.0, -1.0]
    assert table[[0, 2, 4]].abs().sum() == 0


def test_fresh_pushes_are_plain_sgd_step_for_step():
    """Staleness 0 throughout: the server's updates are torch.optim.SGD's, on an embedding
    (pushed as the rows the batch touched) and a linear layer (pushed whole)."""
    torch.manual_seed(0)
    emb, lin = torch.randn(20, 4), torch.randn(3, 4)
    ref = [emb.clone().requires_grad_(), lin.clone().requires_grad_()]
    sgd = torch.optim.SGD(ref, lr=0.3)
    server = StaleServer([emb, lin], lr0=0.3, max_staleness=0)

    def loss(e, w, ids, y):
        return F.cross_entropy(e[ids].mean(1) @ w.T, y)

    for _ in range(15):
        ids, y = torch.randint(0, 20, (6, 3)), torch.randint(0, 3, (6,))
        version, (e, w) = server.pull()
        e.requires_grad_()
        w.requires_grad_()
        ge, gw = torch.autograd.grad(loss(e, w, ids, y), [e, w])
        touched = ids.unique()
        assert server.push([(touched, ge[touched]), gw], version)
        sgd.zero_grad()
        loss(ref[0], ref[1], ids, y).backward()
        sgd.step()
        assert torch.allclose(emb, ref[0].detach(), atol=1e-6)
        assert torch.allclose(lin, ref[1].detach(), atol=1e-6)
    assert server.staleness_histogram() == {0: 15}


def test_the_divergence_threshold_is_found_at_the_bound():
    """The bench's experiment at small size (its 2% target at full size lives in the bench)."""
    assert stability_bound(0) == pytest.approx(2.0) and stability_bound(1) == pytest.approx(1.0)
    for tau in (0, 1, 3):
        measured = divergence_threshold(tau, steps=1500, tol=5e-3)
        assert measured == pytest.approx(stability_bound(tau), rel=0.02), tau
    bound = stability_bound(2)
    assert diverges(1.03 * bound, 2, 1500) and not diverges(0.97 * bound, 2, 1500)
    # the staleness-aware step: eta0 bounded by max(tau, 1) x the bound, above 1 for every tau
    scaled = divergence_threshold(4, steps=1500, tol=5e-3, scale=True)
    assert scaled == pytest.approx(4 * stability_bound(4), rel=0.02) and scaled > 1


def test_the_staleness_cap_by_hand():
    """η₀ ≤ c·min over t ≤ τ of max(t, 1)·2·sin(π/(4t+2))/λ_max: at λ_max = 4 and c = 0.5,
    0.25 fresh (the plain 2/λ bound), 0.125 at τ = 1 (the tightest: a full step one version
    late), and still 0.125 at τ = 2 or more, though the bound alone rises there (0.5·2·2·
    sin(π/10)/4 = 0.1545 at τ = 2), since pushes one version late are among them; and a step
    that the cap allows at the observed τ does not diverge there, while twice the bound does."""
    assert staleness_lr_cap(4.0, 0, 0.5) == pytest.approx(0.25)
    assert staleness_lr_cap(4.0, 1, 0.5) == pytest.approx(0.125)
    assert scaled_bound(2) * 0.5 / 4.0 == pytest.approx(0.15451, abs=1e-5)
    assert staleness_lr_cap(4.0, 2, 0.5) == staleness_lr_cap(4.0, 1000, 0.5) == pytest.approx(0.125)
    for tau in (1, 3):
        # on f(x) = x²/2 (a = 1), with the server's staleness-scaled steps
        assert not diverges(staleness_lr_cap(1.0, tau, 0.9), tau, 600, scale=True)
        assert diverges(staleness_lr_cap(1.0, tau, 2.0), tau, 600, scale=True)
