import dataclasses
import hashlib
import json

import pytest
import torch

from core.config import TrainConfig, load_config
from core.errors import ConfigError
from trainers.featurizer import Featurizer
from trainers.model import ModelSpec, NgramClassifier
from trainers.spec import TrainSpec
from trainers.trainer import advance, build_optimizers, lr_factor, spec_fingerprint

CFG = TrainConfig(optimizer="adagrad", lr=0.5, dense_optimizer="adam", dense_lr=0.01)


def test_schedules():
    assert lr_factor(0, 0.0, "constant", 0) == 1.0
    assert lr_factor(50, 0.5, "linear", 0) == pytest.approx(0.5)
    assert lr_factor(100, 1.0, "linear", 0) == 0.0
    assert lr_factor(50, 0.5, "cosine", 0) == pytest.approx(0.5)
    assert lr_factor(0, 0.0, "cosine", 0) == pytest.approx(1.0)
    # warm-up climbs linearly to 1, then the schedule starts from the top
    assert [lr_factor(s, 0.0, "linear", 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 0.0, "linear", 4) == pytest.approx(1.0)


def _progress(total: int, warmup: int, steps: int, replan: dict[int, int] | None = None) -> list:
    out, progress = [0.0], 0.0
    for step in range(steps):
        total = (replan or {}).get(step, total)
        progress = advance(progress, step, total, warmup)
        out.append(progress)
    return out


def test_a_fixed_plan_advances_linearly_and_a_new_plan_bends_without_turning_back():
    # a fixed plan: the closed form (step - warmup) / (total - warmup)
    fixed = _progress(100, 4, 100)
    for step, progress in enumerate(fixed):
        assert progress == pytest.approx(max(0, step - 4) / 96, abs=1e-12)
    assert fixed[100] == pytest.approx(1.0)
    # the plan grows, then shrinks below the steps done: progress keeps rising, reaches 1
    bent = _progress(100, 0, 130, replan={30: 200, 60: 50})
    assert bent == sorted(bent) and bent[30] == pytest.approx(0.3)
    assert bent[31] - bent[30] == pytest.approx(0.7 / 170)  # the rest over the new plan
    assert bent[61] == 1.0 and bent[-1] == 1.0  # past the plan: no learning rate left
    factors = [lr_factor(s, p, "cosine", 0) for s, p in enumerate(bent)]
    assert factors == sorted(factors, reverse=True)


def test_embedding_and_dense_parameters_get_their_own_optimizers():
    model = NgramClassifier(ModelSpec(100, 8, (4,), 3), sparse=True)
    emb, dense = build_optimizers(model, CFG)
    assert isinstance(emb, torch.optim.Adagrad) and isinstance(dense, torch.optim.Adam)
    assert emb.param_groups[0]["params"] == [model.embedding.weight]
    assert len(dense.param_groups[0]["params"]) == 4  # hidden and output weights and biases
    # a sparse step runs: the embedding gets sparse gradients
    loss = model(torch.tensor([1, 2, 3]), torch.tensor([0, 2])).sum()
    loss.backward()
    assert model.embedding.weight.grad.is_sparse
    emb.step()
    dense.step()


def test_sparse_adam_needs_a_sparse_embedding():
    sparse = NgramClassifier(ModelSpec(10, 4, (), 2), sparse=True)
    assert isinstance(
        build_optimizers(sparse, dataclasses.replace(CFG, optimizer="sparse_adam"))[0],
        torch.optim.SparseAdam,
    )
    dense = NgramClassifier(ModelSpec(10, 4, (), 2), sparse=False)
    with pytest.raises(ConfigError, match="sparse_adam needs a sparse embedding"):
        build_optimizers(dense, dataclasses.replace(CFG, optimizer="sparse_adam"))
    with pytest.raises(ConfigError, match="NCCL cannot"):
        load_config(overrides=["train.optimizer=sparse_adam", "train.use_gpu=true"])


def test_checkpoint_fingerprint_ignores_the_budget_but_not_the_data():
    cfg = load_config(overrides=["train.lr=0.5", "train.time_budget_s=10", "train.epochs=3",
                                 "model.dim=8"])  # fmt: skip
    spec = TrainSpec.from_config(cfg, "/shards", "/out", "/out/checkpoints")
    manifest = {"splits": {"train": {"files": [{"sha256": "a"}]}}}
    base = spec_fingerprint(spec, manifest)
    longer = spec.with_train(time_budget_s=99, epochs=9, timeout_s=5)
    assert spec_fingerprint(longer, manifest) == base
    elsewhere = dataclasses.replace(spec, out_dir="/other", checkpoint_dir="/other/checkpoints")
    assert spec_fingerprint(elsewhere, manifest) == base
    other_data = {"splits": {"train": {"files": [{"sha256": "b"}]}}}
    assert spec_fingerprint(spec, other_data) != base
    assert spec_fingerprint(spec.with_train(lr=0.1), manifest) != base
    assert spec_fingerprint(spec.with_model(dim=16), manifest) != base
    assert spec_fingerprint(spec.with_train(optimizer="sgd"), manifest) != base
    assert spec_fingerprint(dataclasses.replace(spec, early_stop=False), manifest) != base


def test_checkpoints_of_the_untyped_spec_still_match():
    """The payload is what the untyped spec hashed, so a checkpoint written before the spec was
    typed still resumes."""
    cfg = load_config(overrides=["model.hidden=[8]"])
    spec = TrainSpec.from_config(cfg, "/shards", "/out")
    manifest = {"splits": {"train": {"files": [{"sha256": "a"}]}}}
    untyped = {
        "train": {
            k: v
            for k, v in dataclasses.asdict(cfg.train).items()
            if k not in ("time_budget_s", "epochs", "timeout_s", "patience", "launcher")  # newer
            and not k.startswith("auto")  # newer too
            and k != "exchange_precision"  # newer, and left out at fp32
            and k not in ("max_staleness", "lambda_max")  # newer, left out outside async mode
        },
        "model": {"dim": cfg.model.dim, "hidden": list(cfg.model.hidden)},
        "featurizer": Featurizer.from_config(cfg.featurizer).settings(),
        "shards": ["a"],
    }
    digest = hashlib.sha256(json.dumps(untyped, sort_keys=True).encode()).hexdigest()[:16]
    assert spec_fingerprint(spec, manifest) == digest
    # a setting newer than a checkpoint counts only away from its default
    assert spec_fingerprint(spec.with_train(exchange_precision="fp16"), manifest) != digest
    async_spec = spec.with_train(mode="async")
    for change in ({"max_staleness": 4}, {"lambda_max": 0.2}):
        assert spec_fingerprint(async_spec.with_train(**change), manifest) != spec_fingerprint(
            async_spec, manifest
        )
