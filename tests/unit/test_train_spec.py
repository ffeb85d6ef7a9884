"""The typed training spec: one way to build it, a JSON round trip, bad values named by key."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from core.config import ModelConfig, TrainConfig, load_config
from core.errors import ConfigError
from trainers.decompose import cache_key
from trainers.featurizer import Featurizer
from trainers.spec import TrainSpec

MANIFEST = {"labels": ["a", "b", "c"], "splits": {"train": {"rows": 1234, "files": []}}}


def _spec(*overrides: str, checkpoint_dir: str | None = "/runs/ckpt") -> TrainSpec:
    cfg = load_config(overrides=list(overrides))
    return TrainSpec.from_config(cfg, "/runs/shard", "/runs/train", checkpoint_dir=checkpoint_dir)


def test_from_config_holds_the_typed_sections():
    cfg = load_config(overrides=["model.hidden=[8, 4]", "featurizer.num_buckets=4096"])
    spec = TrainSpec.from_config(cfg, "/s", "/o")
    assert isinstance(spec.train, TrainConfig) and spec.train == cfg.train
    assert isinstance(spec.model, ModelConfig) and spec.model.hidden == (8, 4)
    assert spec.featurizer == Featurizer.from_config(cfg.featurizer)
    assert spec.featurizer_settings() == Featurizer.from_config(cfg.featurizer).settings()
    assert spec.checkpoint_dir is None and spec.train_fraction == 1.0 and spec.early_stop
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.out_dir = "/elsewhere"  # type: ignore[misc]


def test_json_round_trip_and_pickle():
    spec = _spec("model.hidden=[8]", "train.optimizer=sgd", "featurizer.char_ngram_min=2",
                 "featurizer.char_ngram_max=4")  # fmt: skip
    spec = dataclasses.replace(spec, train_fraction=0.25, early_stop=False)
    again = TrainSpec.from_json(spec.to_json())
    assert again == spec
    assert isinstance(again.model.hidden, tuple) and isinstance(again.train.lr, float)
    assert json.loads(spec.to_json())["featurizer"] == spec.featurizer_settings()
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert TrainSpec.from_json(_spec(checkpoint_dir=None).to_json()).checkpoint_dir is None


def test_write_and_read(tmp_path):
    spec = _spec()
    spec.write(tmp_path / "train_spec.json")
    assert TrainSpec.read(tmp_path / "train_spec.json") == spec
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("train", "lr"), "fast", "train.lr = 'fast': expected a number"),
        (("train", "optimizer"), "adamw", "train.optimizer = 'adamw': not allowed"),
        (("train", "world_size"), 0, "train.world_size = 0"),
        (("model", "hidden"), ["x"], r"model.hidden\[0\] = 'x': expected an integer"),
        (("featurizer", "num_buckets"), "many", "featurizer.num_buckets = 'many'"),
        (("featurizer", "version"), 99, "featurizer.version/normalization = 99"),
        (("train_fraction",), 0, "train_fraction = 0.0: must be in"),
        (("early_stop",), "yes", "early_stop = 'yes': expected true or false"),
        (("train", "colour"), "red", "unknown config key 'train.colour'"),
        (("colour",), "red", "unknown config key 'colour'"),
    ],
)
def test_a_bad_value_names_the_key(tmp_path, path, value, message):
    data = json.loads(_spec().to_json())
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        TrainSpec.from_json(json.dumps(data))
    (tmp_path / "spec.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"spec.json: {message}"):
        TrainSpec.read(tmp_path / "spec.json")


def test_derived_specs_are_validated_like_the_config():
    spec = _spec()
    faster = spec.with_train(lr=0.1, epochs=2)
    assert (faster.train.lr, faster.train.epochs) == (0.1, 2) and spec.train.lr == 0.5
    assert faster.model == spec.model and faster.shard_dir == spec.shard_dir
    assert spec.with_model(dim=8).model.dim == 8
    with pytest.raises(ConfigError, match="train.tolerance"):
        spec.with_train(tolerance=-1.0)
    with pytest.raises(ConfigError, match="model.dim"):
        spec.with_model(dim=0)
    with pytest.raises(ConfigError, match="train_fraction"):
        dataclasses.replace(spec, train_fraction=1.5)


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd", "sparse_adam"])
def test_params_reflect_the_configured_settings(optimizer):
    spec = _spec(f"train.optimizer={optimizer}", "train.dense_optimizer=sgd", "model.dim=32",
                 "model.hidden=[16]", "featurizer.num_buckets=4096")  # fmt: skip
    params = spec.params(MANIFEST)
    assert params["optimizer"] == optimizer
    assert params["dense_optimizer"] == "sgd"
    assert params["model_capacity"] == "4096x32x16"
    assert params["n_train"] == 1234
    assert (params["dim"], params["num_buckets"]) == (32, 4096)
    t = spec.train
    for key in ("precision", "world_size", "mode", "batch_size", "lr", "time_budget_s",
                "tolerance", "seed", "epochs", "dense_lr", "lr_schedule"):  # fmt: skip
        assert params[key] == getattr(t, key), key


def test_reference_cache_key_follows_what_changes_the_runs():
    manifest = {"splits": {"train": {"files": [{"path": "t-0.parquet", "sha256": "a"}]}}}
    settings = {"fractions": [1.0]}
    spec = _spec()
    key = cache_key(manifest, spec, settings)
    quicker = spec.with_train(timeout_s=5, checkpoint_every=3)
    moved = dataclasses.replace(spec, out_dir="/x", checkpoint_dir=None, shard_dir="/copy")
    assert cache_key(manifest, quicker, settings) == cache_key(manifest, moved, settings) == key
    for other in (spec.with_train(time_budget_s=5), spec.with_train(tolerance=0.5),
                  spec.with_model(dim=8), dataclasses.replace(spec, early_stop=False)):  # fmt: skip
        assert cache_key(manifest, other, settings) != key
    assert cache_key(manifest, spec, {"fractions": [0.5]}) != key


def test_a_missing_key_is_named():
    data = json.loads(_spec().to_json())
    del data["model"]
    with pytest.raises(ConfigError, match="train spec: missing key 'model'"):
        TrainSpec.from_json(json.dumps(data))
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainSpec.from_json("{")
