"""The compiled CPU kernel computes fastText's update, on the model's own torch weights."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trainers.kernels import train_examples
from trainers.model import ModelSpec, NgramClassifier


def _model(dtype=torch.float64) -> NgramClassifier:
    torch.manual_seed(0)
    model = NgramClassifier(ModelSpec(num_buckets=50, dim=8, hidden=(), num_classes=4)).to(dtype)
    with torch.no_grad():
        model.output.weight.normal_(0, 0.3)  # away from fastText's zero start: a real gradient
        model.output.bias.normal_(0, 0.1)
    return model


def _arrays(model, classes=4):
    return dict(
        emb=model.embedding.weight.detach().numpy(),
        out_w=model.output.weight.detach().numpy(),
        out_b=model.output.bias.detach().numpy(),
        emb_acc=np.zeros(model.spec.num_buckets),
        out_acc=np.zeros(classes),
    )


def test_one_example_matches_autograd_sgd():
    ids = np.array([3, 7, 7, 19], dtype=np.int64)  # a repeated id counts twice in the mean
    offsets = np.array([0, 4], dtype=np.int64)
    label, weight, lr = 2, 1.5, 0.3
    reference = _model()
    logits = reference(torch.from_numpy(ids), torch.tensor([0]))
    loss = weight * F.cross_entropy(logits, torch.tensor([label]))
    loss.backward()
    with torch.no_grad():
        expected = {n: p - lr * p.grad.to_dense() for n, p in reference.named_parameters()}

    model = _model()
    got = train_examples(
        ids, offsets, np.array([label]), np.array([weight]), np.array([0]),
        lr_start=lr, lr_end=lr, **_arrays(model),
    )  # fmt: skip
    assert abs(got - loss.item()) < 1e-10
    for name, param in model.named_parameters():  # written in place into the torch tensors
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-10, atol=1e-12)


def test_unknown_labels_and_empty_rows_leave_the_weights_alone():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_examples(
        np.array([1, 2], dtype=np.int64), np.array([0, 2, 2], dtype=np.int64),
        np.array([-1, 0]), np.array([1.0, 1.0]), np.array([0, 1]),
        lr_start=0.5, lr_end=0.5, **_arrays(model),
    )  # fmt: skip
    assert loss == 0.0
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.equal(old, new.detach())


def _toy(n=3000, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    rows = [np.concatenate([[10 * c + rng.integers(0, 3)], rng.integers(40, 50, 2)])
            for c in labels]  # fmt: skip
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return np.concatenate(rows).astype(np.int64), offsets, labels, np.ones(n)


def _accuracy(model, ids, offsets, labels) -> float:
    with torch.no_grad():
        logits = model(torch.from_numpy(ids), torch.from_numpy(offsets[:-1]))
    return float((logits.argmax(1).numpy() == labels).mean())


def test_training_learns_with_each_optimizer_and_with_threads():
    ids, offsets, labels, weights = _toy()
    order = np.arange(len(labels))
    for optimizer, threads, lr in (("sgd", 1, 0.5), ("rowwise_adagrad", 1, 0.5), ("sgd", 2, 0.5)):
        model = _model(torch.float32)
        arrays = _arrays(model)
        arrays["emb_acc"] = arrays["emb_acc"].astype(np.float32)
        arrays["out_acc"] = arrays["out_acc"].astype(np.float32)
        first = train_examples(ids, offsets, labels, weights, order, lr_start=lr, lr_end=lr,
                               optimizer=optimizer, threads=threads, **arrays)  # fmt: skip
        second = train_examples(ids, offsets, labels, weights, order, lr_start=lr, lr_end=0.0,
                                optimizer=optimizer, threads=threads, **arrays)  # fmt: skip
        assert second < 0.5 * first, (optimizer, threads)
        assert _accuracy(model, ids, offsets, labels) > 0.95, (optimizer, threads)


def test_one_thread_is_deterministic():
    ids, offsets, labels, weights = _toy(500)
    order = np.random.default_rng(1).permutation(len(labels))
    results = []
    for _ in range(2):
        model = _model()
        train_examples(ids, offsets, labels, weights, order, lr_start=0.3, lr_end=0.1,
                       **_arrays(model))  # fmt: skip
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
