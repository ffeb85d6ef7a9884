import pytest
import torch

from core.config import load_config
from core.errors import ConfigError
from trainers.model import ModelSpec, NgramClassifier
from trainers.trainer import build_optimizers, lr_factor, spec_fingerprint

CFG = {"optimizer": "adagrad", "lr": 0.5, "dense_optimizer": "adam", "dense_lr": 0.01}


def test_schedules():
    assert lr_factor(0, 100, "constant", 0) == 1.0
    assert lr_factor(50, 100, "linear", 0) == pytest.approx(0.5)
    assert lr_factor(100, 100, "linear", 0) == 0.0
    assert lr_factor(50, 100, "cosine", 0) == pytest.approx(0.5)
    assert lr_factor(0, 100, "cosine", 0) == pytest.approx(1.0)
    # warm-up climbs linearly to 1, then the schedule starts from the top
    assert [lr_factor(s, 100, "linear", 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, "linear", 4) == pytest.approx(1.0)


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
        build_optimizers(sparse, {**CFG, "optimizer": "sparse_adam"})[0], torch.optim.SparseAdam
    )
    dense = NgramClassifier(ModelSpec(10, 4, (), 2), sparse=False)
    with pytest.raises(ConfigError, match="sparse_adam needs a sparse embedding"):
        build_optimizers(dense, {**CFG, "optimizer": "sparse_adam"})
    with pytest.raises(ConfigError, match="NCCL cannot"):
        load_config(overrides=["train.optimizer=sparse_adam", "train.use_gpu=true"])


def test_checkpoint_fingerprint_ignores_the_budget_but_not_the_data():
    spec = {
        "train": {"lr": 0.5, "time_budget_s": 10, "epochs": 3},
        "model": {"dim": 8},
        "featurizer": {"v": 1},
    }
    manifest = {"splits": {"train": {"files": [{"sha256": "a"}]}}}
    base = spec_fingerprint(spec, manifest)
    longer = {**spec, "train": {**spec["train"], "time_budget_s": 99, "epochs": 9}}
    assert spec_fingerprint(longer, manifest) == base
    other_data = {"splits": {"train": {"files": [{"sha256": "b"}]}}}
    assert spec_fingerprint(spec, other_data) != base
    other_lr = {**spec, "train": {**spec["train"], "lr": 0.1}}
    assert spec_fingerprint(other_lr, manifest) != base
