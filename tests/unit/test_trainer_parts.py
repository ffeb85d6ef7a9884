import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.config import TrainConfig
from core.errors import ConfigError, DataError
from trainers.data import check_featurizer, check_shards, load_manifest, read_split, sha256_of
from trainers.featurizer import Featurizer
from trainers.model import ModelSpec, NgramClassifier
from trainers.trainer import (
    STOP_CHECK_EVERY,
    select_device,
    select_kernel,
    select_precision,
    select_sync,
    stop_vote_interval,
    what_runs,
)


def test_precision_plans():
    assert select_precision("fp32", "cpu").param_dtype == torch.float32
    assert select_precision("fp64", "cpu").param_dtype == torch.float64
    bf16 = select_precision("bf16", "cpu")
    assert (bf16.autocast_dtype, bf16.use_scaler) == (torch.bfloat16, False)
    fp16 = select_precision("fp16", "cuda")
    assert (fp16.autocast_dtype, fp16.use_scaler) == (torch.float16, True)
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        select_precision("fp16", "cpu")


def test_device_per_local_rank_and_backend():
    assert select_device(False, 3, cuda_available=True) == (torch.device("cpu"), "gloo")
    assert select_device(True, 3, cuda_available=True) == (torch.device("cuda", 3), "nccl")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        select_device(True, 0, cuda_available=False)


def test_model_capacity_and_forward():
    spec = ModelSpec(num_buckets=100, dim=8, hidden=(16,), num_classes=3)
    assert spec.capacity == "100x8x16"
    model = NgramClassifier(spec)
    logits = model(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 3]))
    assert logits.shape == (2, 3)
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def _write_shards(tmp_path, rows_per_file=(3, 2)):
    featurizer = Featurizer(num_buckets=128, word_ngrams=1)
    entries = []
    queries = iter(["a", "b c", "d e f", "g", "h i"])
    for i, n in enumerate(rows_per_file):
        texts = [next(queries) for _ in range(n)]
        table = pa.table({
            "query": texts,
            "ids": pa.array([featurizer.ids(t).tolist() for t in texts], pa.list_(pa.int32())),
            "label": pa.array(list(range(n)), pa.int32()),
            "weight": pa.array([1.0] * n, pa.float32()),
        })  # fmt: skip
        path = tmp_path / f"train-{i:05d}.parquet"
        pq.write_table(table, path)
        entries.append({"path": path.name, "rows": n, "sha256": sha256_of(path)})
    manifest = {"featurizer": featurizer.settings(), "labels": ["x", "y", "z"],
                "splits": {"train": {"rows": sum(rows_per_file), "files": entries}}}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return featurizer, manifest


def test_reader_gathers_the_right_ids_per_row(tmp_path):
    featurizer, _ = _write_shards(tmp_path)
    data = read_split(tmp_path, "train", rank=0, world_size=1)
    assert data.num_rows == 5
    ids, offsets, labels, weights = data.batch(np.array([2, 0, 4]))
    expected = [featurizer.ids(t) for t in ["d e f", "a", "h i"]]
    assert ids.tolist() == np.concatenate(expected).tolist()
    assert offsets.tolist() == [0, 3, 4]
    assert labels.tolist() == [2, 0, 1]
    assert weights.dtype == torch.float32


def test_ranks_split_the_rows_without_overlap(tmp_path):
    _write_shards(tmp_path)
    a = read_split(tmp_path, "train", rank=0, world_size=2)
    b = read_split(tmp_path, "train", rank=1, world_size=2)
    assert a.num_rows + b.num_rows == 5


def test_reader_refuses_a_changed_shard(tmp_path):
    _write_shards(tmp_path)
    check_shards(tmp_path, load_manifest(tmp_path))  # as written: every file passes
    shard = tmp_path / "train-00001.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, 1), shard)  # same schema, different bytes
    with pytest.raises(DataError, match="sha256 does not match"):
        read_split(tmp_path, "train", rank=0, world_size=1)
    # the train stage checks every split on the driver before it starts any process
    with pytest.raises(DataError, match=r"train-00001.parquet: sha256 does not match"):
        check_shards(tmp_path, load_manifest(tmp_path))


def test_featurizer_mismatch_is_refused(tmp_path):
    _, manifest = _write_shards(tmp_path)
    other = Featurizer(num_buckets=256, word_ngrams=1).settings()
    with pytest.raises(DataError, match="featurized with"):
        check_featurizer(manifest, other, str(tmp_path))
    check_featurizer(manifest, manifest["featurizer"], str(tmp_path))


def test_kernel_selection_says_what_runs_and_why():
    auto = TrainConfig(world_size=1, kernel="auto")
    assert select_kernel(auto, "cpu", (), 1)[0] == "numba"
    assert select_kernel(TrainConfig(mode="local_sgd", kernel="auto"), "cpu", (), 4)[0] == "numba"
    assert select_kernel(TrainConfig(), "cpu", (), 2)[0] == "numba"  # the defaults, on a CPU
    assert select_kernel(TrainConfig(), "cuda", (), 2)[0] == "torch"
    for cfg, device, hidden, world, why in (
        (auto, "cuda", (), 1, "CPU"),
        (auto, "cpu", (32,), 1, "linear model"),
        (TrainConfig(precision="bf16", kernel="auto"), "cpu", (), 1, "fp32 or fp64"),
        (TrainConfig(optimizer="sparse_adam", kernel="auto"), "cpu", (), 1, "sgd and adagrad"),
        (TrainConfig(mode="sync", kernel="auto"), "cpu", (), 2, "local_sgd, shared or auto"),
    ):
        kernel, reason = select_kernel(cfg, device, hidden, world)
        assert kernel == "torch" and why in reason
        forced = TrainConfig(**{**cfg.__dict__, "kernel": "numba"})
        with pytest.raises(ConfigError, match=why):
            select_kernel(forced, device, hidden, world)
    assert select_kernel(TrainConfig(kernel="torch"), "cpu", (), 1) == (
        "torch",
        "train.kernel=torch",
    )


def test_sync_selection_exchanges_rows_on_cpu_and_leaves_gpus_to_ddp():
    assert select_sync("sync", "torch", "cpu") == "exchange"
    assert select_sync("auto", "torch", "cpu") == "exchange"  # auto is sync for the torch loop
    assert select_sync("auto", "numba", "cpu", 2) == "average"  # and averaging for the kernel
    assert select_sync("shared", "numba", "cpu", 2) == "shared"  # one copy, when asked for
    assert select_sync("shared", "numba", "cpu", 1) == "average"  # one worker: nothing to share
    assert select_sync("local_sgd", "numba", "cpu", 2) == "average"  # asked for
    assert select_sync("sync", "torch", "cuda") == "ddp"
    assert select_sync("local_sgd", "torch", "cuda") == "average"
    assert select_sync("sync", "numba", "cpu") == "average"  # the kernel averages replicas
    with pytest.raises(ConfigError, match="shared trains Hogwild! with the numba kernel"):
        select_sync("shared", "torch", "cpu", 2)


def test_stop_votes_come_about_every_50_ms_and_at_least_every_8_steps():
    assert stop_vote_interval(0.001) == 50  # 1 ms steps (the numba kernel's): every 50
    assert stop_vote_interval(0.0001) == 500
    assert stop_vote_interval(0.02) == STOP_CHECK_EVERY == 8  # slow steps: the floor
    assert stop_vote_interval(0.0) == 10**5  # a zero step time neither divides by zero nor
    # spaces the votes without bound


def test_auto_settings_resolve_to_the_loop_and_mode_that_run():
    assert what_runs(TrainConfig(), "cpu", ()) == ("numba", "local_sgd")  # the defaults
    assert what_runs(TrainConfig(mode="shared"), "cpu", ()) == ("numba", "shared")
    assert what_runs(TrainConfig(), "cuda", ()) == ("torch", "sync")
    assert what_runs(TrainConfig(), "cpu", (32,)) == ("torch", "sync")  # a hidden layer
    assert what_runs(TrainConfig(mode="sync"), "cpu", ()) == ("torch", "sync")  # 2 workers
    assert what_runs(TrainConfig(mode="sync", world_size=1), "cpu", ()) == ("numba", "local_sgd")
    assert what_runs(TrainConfig(kernel="torch", mode="local_sgd"), "cpu", ()) == (
        "torch",
        "local_sgd",
    )
