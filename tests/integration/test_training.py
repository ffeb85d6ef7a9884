"""Distributed training for real: 2-process gloo DDP through TorchDistributor (local and barrier
mode), torchrun and torch.multiprocessing, time budgets, precisions, resume after a crash and
after a killed rank; the stop and learning-rate rules run in this process (a group of one)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from core.errors import StageError
from core.layout import RunContext
from pipelines.flow import run_pipeline
from tests.conftest import config_for
from trainers import trainer as trainer_module
from trainers.launch import launch_distributor, launch_processes
from trainers.model import UnsafeFile
from trainers.predictor import Predictor
from trainers.shared import DIR_ENV
from trainers.spec import TrainSpec
from trainers.staleness import staleness_lr_cap
from trainers.trainer import FAULT_RANK_ENV, FAULT_STEP_ENV, STOP_CHECK_EVERY, Trainer, lr_factor

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

DATA = [
    "generate.num_events=8000",
    "generate.num_queries=1500",
    "generate.num_labels=6",
    "model.dim=16",
    # the shards are all these tests need: no data-quality gates, no near-duplicate clustering
    # (both tested on their own), which makes the fixture faster
    "dq.enabled=false",
    "dedupe.near_enabled=false",
    # the torch loop in sync mode, the trainer's general machinery (row exchange, DDP-style
    # resume, precisions); the numba kernel, the default on CPU, where a test names it, and
    # in every flow test
    "train.kernel=torch",
    "train.mode=sync",
]
_stores = itertools.count()


@pytest.fixture(scope="module")
def shards(spark, tmp_path_factory):
    """Shards of a small generated log, made once by the real data stages."""
    root = tmp_path_factory.mktemp("train")
    cfg = config_for(root, *DATA)
    ctx = RunContext(cfg, "2026-11-01", spark=spark)
    run_pipeline(ctx, stop="shard")
    return cfg, ctx.stage_dir("shard")


def _spec(cfg, shard_dir: Path, out: Path, *, early_stop: bool = False, **train) -> TrainSpec:
    """The config's spec with checkpoints under ``out`` and some ``train.*`` changed; it runs
    every epoch (no early stop) unless told otherwise."""
    spec = TrainSpec.from_config(cfg, shard_dir, out, checkpoint_dir=out / "checkpoints")
    return dataclasses.replace(spec.with_train(**train), early_stop=early_stop)


def _ranks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank-*.json"))]


@contextmanager
def _group_of_one(tmp_path: Path) -> Iterator[None]:
    """This process as rank 0 of a gloo group of one, meeting through a fresh file store."""
    store = dist.FileStore(str(tmp_path / f".store-{next(_stores)}"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _train_here(spec: TrainSpec, tmp_path: Path, trainer_cls: type[Trainer] = Trainer):
    """Train in this process; return the result and the trainer."""
    with _group_of_one(tmp_path):
        trainer = trainer_cls(spec)
        return trainer.train(), trainer


# --- in this process ------------------------------------------------------------------------


class _Crash(Exception):
    """The injected fault, raised instead of killing the test process."""


@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_resume_after_a_crash(shards, tmp_path, monkeypatch, kernel):
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path, world_size=1, epochs=3, batch_size=64,
                 checkpoint_every=10, time_budget_s=60, kernel=kernel)  # fmt: skip

    def crash() -> None:
        raise _Crash("rank 0 at step 25")

    monkeypatch.setattr(trainer_module, "kill_this_process", crash)
    monkeypatch.setenv(FAULT_RANK_ENV, "0")
    monkeypatch.setenv(FAULT_STEP_ENV, "25")
    with pytest.raises(_Crash):
        _train_here(spec, tmp_path)
    assert not dist.is_initialized()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert saved == ["ckpt-10.pt", "ckpt-20.pt"]
    assert not (tmp_path / "model.pt").exists()
    result, resumed = _train_here(spec, tmp_path, _RecordingTrainer)  # the same run again
    assert result["resumed_from_step"] == 20 and result["kernel"] == kernel
    # the schedule goes on where the checkpoint left it: the rates of an uninterrupted run
    monkeypatch.delenv(FAULT_RANK_ENV)
    (tmp_path / "whole").mkdir()
    whole_spec = dataclasses.replace(spec, out_dir=str(tmp_path / "whole"), checkpoint_dir=None)
    _, whole = _train_here(whole_spec, tmp_path / "whole", _RecordingTrainer)
    assert np.allclose(resumed.lrs, whole.lrs[20:], rtol=1e-9)
    assert result["stopped_by"] == "epochs" and result["epochs_run"] == 3
    assert result["world_size"] == 1 and result["steps"] > 25
    assert [r["steps"] for r in _ranks(tmp_path)] == [result["steps"]]
    assert (tmp_path / "model.pt").exists()
    # a finished run resumed once more trains no further
    again, _ = _train_here(spec, tmp_path)
    assert again["resumed_from_step"] == again["steps"] == result["steps"]
    assert again["stopped_by"] == "epochs"


def test_a_checkpoint_of_other_settings_is_not_resumed(shards, tmp_path):
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path, world_size=1, epochs=1, checkpoint_every=5)
    first, _ = _train_here(spec, tmp_path)
    assert first["resumed_from_step"] is None and first["stopped_by"] == "epochs"
    # another budget and epoch count: the same checkpoint (a finished run stays finished)
    same, _ = _train_here(spec.with_train(epochs=2, time_budget_s=30), tmp_path)
    assert same["resumed_from_step"] == same["steps"] == first["steps"]
    other, _ = _train_here(spec.with_train(lr=0.1, epochs=2), tmp_path)
    assert other["resumed_from_step"] is None and other["epochs_run"] == 2


class _Planted:
    """What a tampered file could carry: unpickling it would run ``print``."""

    def __reduce__(self):  # noqa: ANN204
        return (print, ("PLANTED CODE RAN",))


def test_files_carrying_pickled_objects_are_refused_without_running_them(shards, tmp_path, capsys):
    """A checkpoint or model.pt with anything besides tensors and plain values is never
    unpickled: resume refuses it in one line and takes the checkpoint before; the predictor
    refuses the model."""
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path, world_size=1, epochs=1, batch_size=16,
                 checkpoint_every=5)  # fmt: skip
    first, _ = _train_here(spec, tmp_path)
    saved = sorted((tmp_path / "checkpoints").glob("ckpt-*.pt"), key=lambda p: int(p.stem[5:]))
    assert len(saved) == 2
    newest = saved[-1]
    state = torch.load(newest, weights_only=True)
    torch.save(state | {"planted": _Planted()}, newest)
    capsys.readouterr()
    again, _ = _train_here(spec, tmp_path)
    out = capsys.readouterr().out
    assert f"{newest}: refused, it holds pickled Python objects" in out
    assert "PLANTED CODE RAN" not in out
    assert again["resumed_from_step"] == int(saved[0].stem[5:]) < first["steps"]

    model = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.save(model | {"planted": _Planted()}, tmp_path / "model.pt")
    with pytest.raises(UnsafeFile, match="refused"):
        Predictor.from_file(tmp_path / "model.pt")
    assert "PLANTED CODE RAN" not in capsys.readouterr().out


def test_a_single_rank_stops_on_the_budget(shards, tmp_path):
    cfg, shard_dir = shards
    # 2 s: room for the 20 timed steps before the first plan even on a loaded 2-core machine
    # (bf16 steps on a CPU took 60 ms there, and 0.5 s ended after 8 steps)
    spec = _spec(cfg, shard_dir, tmp_path, world_size=1, time_budget_s=2.0, epochs=10_000,
                 batch_size=8, checkpoint_every=0, precision="bf16")  # fmt: skip
    result, _ = _train_here(spec, tmp_path)
    assert result["stopped_by"] == "budget" and result["precision"] == "bf16"
    assert 2.0 <= result["time_used_s"] < 6
    assert result["steps"] > 0 and result["epochs_run"] >= 1
    assert STOP_CHECK_EVERY <= result["stop_vote_every"] < result["steps"]  # agreed in a plan
    assert (tmp_path / "model.pt").exists()


def test_convergence_stops_early_only_when_allowed(shards, tmp_path):
    cfg, shard_dir = shards
    # any epoch after the first improves validation loss by less than a tolerance of 100: the
    # run stops after `patience` such evaluations in a row, with no epoch cap
    for patience in (1, 2):
        spec = _spec(cfg, shard_dir, tmp_path / f"p{patience}", world_size=1, epochs=None,
                     tolerance=100.0, patience=patience, checkpoint_every=0, time_budget_s=120,
                     early_stop=True)  # fmt: skip
        result, _ = _train_here(spec, tmp_path)
        assert result["stopped_by"] == "converged" and result["epochs_run"] == 1 + patience
        assert len(result["history"]) == 1 + patience
    spec = _spec(cfg, shard_dir, tmp_path / "b", world_size=1, epochs=4, tolerance=100.0,
                 checkpoint_every=0, early_stop=False)  # fmt: skip
    result, _ = _train_here(spec, tmp_path)
    assert result["stopped_by"] == "epochs" and result["epochs_run"] == 4


def test_a_budget_run_decays_its_learning_rate_over_the_budget(shards, tmp_path):
    """No epoch cap: the schedule is planned from the step time measured after a warm-up, at
    every stop vote and after each evaluation, so the learning rate reaches about zero as the budget runs out."""
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path, world_size=1, epochs=None, time_budget_s=2.0,
                 batch_size=8, checkpoint_every=0, lr_schedule="linear", lr=0.4)  # fmt: skip
    result, trainer = _train_here(spec, tmp_path, _RecordingTrainer)
    assert result["stopped_by"] == "budget"
    emb = [lrs[0] for lrs in trainer.lrs]
    assert emb[0] == pytest.approx(0.4)  # not decayed before the first plan
    # spent: most of the decay happened within the budget (a quarter of the rate is left where
    # the pace holds; up to a third was left where another test's processes started mid-run)
    assert emb[-1] < 0.4 * 0.5
    assert emb == sorted(emb, reverse=True)  # re-planning bends the schedule, never turns it back
    # the plan foresaw the run's length, to within what a shared machine's pace allows (under
    # pytest-xdist the other worker's load changes the step time between plan and stop)
    assert result["steps"] / 3 <= result["planned_steps"] <= result["steps"] * 3


class _RecordingTrainer(Trainer):
    """Records the learning rates of the embedding and of the dense layers at every step."""

    def __init__(self, spec: TrainSpec) -> None:
        super().__init__(spec)
        self.lrs: list[list[float]] = []

    def train_step(self, batch):  # noqa: ANN001, ANN202
        out = super().train_step(batch)
        self.lrs.append([opt.param_groups[0]["lr"] for opt in self.optimizers])
        return out

    def kernel_step(self, rows):  # noqa: ANN001, ANN202
        start, _ = self.kernel_lr_range()  # the kernel steps the output layer at train.lr too
        self.lrs.append([start, start])
        return super().kernel_step(rows)


@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_learning_rates_follow_the_schedule(shards, tmp_path, kernel):
    cfg, shard_dir = shards
    warmup = 3
    spec = _spec(cfg, shard_dir, tmp_path, world_size=1, epochs=2, batch_size=64,
                 checkpoint_every=0, lr_schedule="cosine", warmup_steps=warmup, lr=0.4,
                 dense_optimizer="sgd", dense_lr=0.02, kernel=kernel)  # fmt: skip
    result, trainer = _train_here(spec, tmp_path, _RecordingTrainer)
    assert result["stopped_by"] == "epochs"
    total = trainer.total_steps
    assert total == result["steps"] == len(trainer.lrs) > warmup
    for step, (emb_lr, dense_lr) in enumerate(trainer.lrs):
        factor = lr_factor(step, max(0, step - warmup) / (total - warmup), "cosine", warmup)
        dense = 0.02 if kernel == "torch" else 0.4
        assert emb_lr == pytest.approx(0.4 * factor) and dense_lr == pytest.approx(dense * factor)
    emb = [lrs[0] for lrs in trainer.lrs]
    assert emb[:warmup] == sorted(emb[:warmup]) and emb[warmup] == pytest.approx(0.4)
    assert emb[warmup:] == sorted(emb[warmup:], reverse=True) and emb[-1] < 0.4 / 4


def test_the_numba_kernel_learns_as_the_torch_loop_does(shards, tmp_path):
    cfg, shard_dir = shards
    runs = {}
    for name, train in (
        ("torch", {"kernel": "torch"}),
        ("numba", {"kernel": "numba"}),
        ("numba again", {"kernel": "numba"}),
        ("numba sgd, 2 threads", {"kernel": "numba", "optimizer": "sgd", "lr": 0.2, "threads": 2}),
    ):
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        spec = _spec(cfg, shard_dir, out, world_size=1, epochs=4, batch_size=64,
                     checkpoint_every=0, **train)  # fmt: skip
        runs[name] = _train_here(spec, tmp_path)[0] | {"checksum": _ranks(out)[0]["param_checksum"]}
    assert runs["torch"]["kernel"] == "torch" and runs["torch"]["optimizer"] == "adagrad+adam"
    assert runs["numba"]["kernel"] == "numba" and runs["numba"]["optimizer"] == "rowwise_adagrad"
    assert runs["numba sgd, 2 threads"]["optimizer"] == "sgd"
    for name, result in runs.items():
        assert result["val_accuracy"] > 0.6, name
    assert runs["numba"]["val_accuracy"] > runs["torch"]["val_accuracy"] - 0.03
    # one thread is deterministic: the same run twice gives the same weights
    assert runs["numba"]["checksum"] == runs["numba again"]["checksum"]


# --- several processes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "mode", "precision", "wire", "ran"),
    # the sync machinery, its gradients on the wire in fp16
    [("torch", "sync", "bf16", "fp16", ("torch", "exchange")),
     ("auto", "auto", "fp32", "fp32", ("numba", "average"))],  # the defaults on a CPU
)  # fmt: skip
def test_all_ranks_stop_at_the_same_step_under_a_budget(
    shards, tmp_path, kernel, mode, precision, wire, ran
):
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path, world_size=2, time_budget_s=1.5, epochs=10_000,
                 batch_size=8, precision=precision, kernel=kernel, mode=mode,
                 exchange_precision=wire)  # fmt: skip
    result = launch_processes(spec)
    assert result["stopped_by"] == "budget" and (result["kernel"], result["sync"]) == ran
    assert result["precision"] == precision and result["world_size"] == 2
    assert 1.5 <= result["time_used_s"] < 6
    ranks = _ranks(tmp_path)
    assert len(ranks) == 2
    assert ranks[0]["steps"] == ranks[1]["steps"] == result["steps"] > 0
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]  # replicas kept equal
    assert 0 <= result["comm_fraction"] <= 1
    assert (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_local_sgd_averages_the_replicas(shards, tmp_path, kernel):
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path, world_size=2, mode="local_sgd", sync_every=7,
                 epochs=3, batch_size=16, kernel=kernel)  # fmt: skip
    result = launch_processes(spec)
    assert result["kernel"] == kernel
    ranks = _ranks(tmp_path)
    assert ranks[0]["steps"] == ranks[1]["steps"] == result["steps"]
    # averaged at the end: both replicas hold the same model, and it learned
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
    assert result["val_accuracy"] > 0.6
    assert 0 < result["comm_fraction"] < 1


def test_shared_mode_trains_one_copy_and_resumes_after_a_killed_rank(shards, tmp_path, monkeypatch):
    """train.mode=shared: two numba workers update one copy of the weights (Hogwild!) and end
    with the same weights; a rank killed mid-epoch fails the run, the rerun resumes from the
    checkpoint, and the mapping's file is gone both times."""
    cfg, shard_dir = shards
    maps = tmp_path / "maps"
    maps.mkdir()
    monkeypatch.setenv(DIR_ENV, str(maps))  # the workers inherit it: their file goes there
    spec = _spec(cfg, shard_dir, tmp_path / "out", world_size=2, mode="shared", kernel="numba",
                 epochs=3, batch_size=16, checkpoint_every=10, time_budget_s=60)  # fmt: skip
    monkeypatch.setenv(FAULT_RANK_ENV, "1")
    monkeypatch.setenv(FAULT_STEP_ENV, "25")
    with pytest.raises(StageError, match="rerun to resume"):
        launch_processes(spec)
    assert list(maps.iterdir()) == []
    monkeypatch.delenv(FAULT_RANK_ENV)
    result = launch_processes(spec)
    assert result["resumed_from_step"] == 20 and result["stopped_by"] == "epochs"
    assert result["sync"] == "shared" and result["sync_reason"] == "train.mode=shared"
    assert 0 <= result["comm_fraction"] < 1  # waits at the meetings
    ranks = _ranks(tmp_path / "out")
    assert ranks[0]["steps"] == ranks[1]["steps"] == result["steps"]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]  # one copy
    assert result["val_accuracy"] > 0.6
    assert list(maps.iterdir()) == []
    # no room where the mapping must go: local SGD instead, saying why
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "missing"))
    fallback = launch_processes(_spec(cfg, shard_dir, tmp_path / "fallback", world_size=2,
                                      mode="shared", kernel="numba", epochs=1))  # fmt: skip
    assert fallback["sync"] == "average" and "no room for" in fallback["sync_reason"]


def test_async_workers_push_stale_gradients_and_a_killed_worker_resumes(
    shards, tmp_path, monkeypatch
):
    """Two workers and a server: pushes arrive a version or more late and are applied at
    η₀/τ, with the rate capped by the stability bound at the pushes' 95th-percentile
    staleness (λ_max given); a worker killed mid-run fails the run, and the rerun resumes from
    the server's checkpoint, each worker from its own place, and learns."""
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path, world_size=3, mode="async", epochs=4, batch_size=16,
                 lr=16.0, checkpoint_every=10, time_budget_s=60, exchange_precision="bf16",
                 lambda_max=0.05)  # fmt: skip
    monkeypatch.setenv(FAULT_RANK_ENV, "2")
    monkeypatch.setenv(FAULT_STEP_ENV, "15")
    with pytest.raises(StageError, match="rerun to resume"):
        launch_processes(spec)
    saved = sorted(int(p.stem[5:]) for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert saved and saved[-1] >= 10 and not (tmp_path / "model.pt").exists()
    monkeypatch.delenv(FAULT_RANK_ENV)
    result = launch_processes(spec)
    assert result["resumed_from_step"] == saved[-1] and result["stopped_by"] == "epochs"
    staleness = {int(k): v for k, v in result["async_staleness"].items()}
    assert (
        sum(staleness.values()) == result["async_pushes_applied"] + result["async_pushes_dropped"]
    )
    assert max(staleness) >= 1 and result["async_staleness_max"] == max(staleness)
    assert result["async_pushes_applied"] == result["steps"] > 2 * saved[-1]
    ranks = {r["rank"]: r for r in _ranks(tmp_path)}
    # each worker did its 4 epochs of its half of the rows, the server applied them all
    assert ranks[1]["steps"] + ranks[2]["steps"] == result["steps"]
    assert result["val_accuracy"] > 0.6 and result["bytes_per_step"] > 0
    # the cap at the observed staleness (τ95 >= 1: under 0.5 x (π/2) / 0.05 = 15.7) bound the rate
    tau95 = int(result["async_staleness_p95"])
    assert tau95 >= 1
    assert result["async_lr_cap"] == pytest.approx(staleness_lr_cap(0.05, tau95, 0.5))
    assert result["async_lr_cap"] < 16.0 and result["async_lr_capped_pushes"] > 0

    # resumed where every worker is through its epochs (as after a rerun with fewer
    # train.epochs, which checkpoints ignore): each is told to stop at its first request
    last = max((tmp_path / "checkpoints").glob("ckpt-*.pt"), key=lambda p: int(p.stem[5:]))
    state = torch.load(last, weights_only=True) | {"stopped_by": None}
    again_dir = tmp_path / "again"
    (again_dir / "checkpoints").mkdir(parents=True)
    torch.save(state, again_dir / "checkpoints" / last.name)
    again = launch_processes(dataclasses.replace(
        spec.with_train(timeout_s=60), out_dir=str(again_dir),
        checkpoint_dir=str(again_dir / "checkpoints"),
    ))  # fmt: skip
    assert again["stopped_by"] == "epochs"
    assert again["resumed_from_step"] == again["steps"] == result["steps"]


def test_distributor_reports_a_killed_rank_and_the_rerun_resumes(shards, tmp_path, monkeypatch):
    """TorchDistributor local mode (the train stage's launcher) fails the run when a rank dies;
    the rerun resumes from the last checkpoint under any launcher (here torch.multiprocessing,
    which starts faster; the train stage's own runs are in test_flow)."""
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path, world_size=2, local_mode=True, epochs=3,
                 batch_size=16, checkpoint_every=10, time_budget_s=60, precision="fp64")  # fmt: skip
    monkeypatch.setenv(FAULT_RANK_ENV, "1")
    monkeypatch.setenv(FAULT_STEP_ENV, "25")
    with pytest.raises(StageError, match="rerun to resume"):
        launch_distributor(spec)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert saved == ["ckpt-10.pt", "ckpt-20.pt"]
    assert not (tmp_path / "model.pt").exists()
    result = launch_processes(spec)  # the same run again
    assert result["resumed_from_step"] == 20
    assert result["stopped_by"] == "epochs" and result["epochs_run"] == 3
    ranks = _ranks(tmp_path)
    assert ranks[0]["steps"] == ranks[1]["steps"] == result["steps"]


def test_torchrun_launches_async_mode_whose_one_worker_is_plain_sgd_step_for_step(shards, tmp_path):
    """torchrun starts the trainer from a spec file, here in async mode with one worker (rank 0
    serves, rank 1 trains; the other modes' processes meet the same way): every push is applied
    at the version it was pulled at (τ = 0, the full step), so the served model is plain SGD's
    on the worker's batches, step for step."""
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path / "unused", world_size=2, mode="async", epochs=2,
                 batch_size=32, lr=2.0, lr_schedule="constant", precision="fp64",
                 checkpoint_every=0)  # fmt: skip
    spec.write(tmp_path / "train_spec.json")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
         "-m", "trainers.launch", str(tmp_path / "train_spec.json"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["stopped_by"] == "epochs" and printed["sync"] == "async"
    assert len(_ranks(tmp_path / "out")) == 2
    result = json.loads((tmp_path / "out" / "train_result.json").read_text())
    assert (result["optimizer"], result["kernel"], result["epochs_run"]) == (
        "stale_sgd",
        "torch",
        2,
    )
    assert result["async_staleness"] == {"0": result["steps"]}
    assert result["async_pushes_dropped"] == 0
    served = torch.load(tmp_path / "out" / "model.pt", weights_only=True)["state_dict"]

    # the same batches in this process: the worker's share is all the rows, its shuffle is
    # seeded by its rank (1), and it starts from the same seeded model
    one = dataclasses.replace(spec.with_train(world_size=1, mode="sync"),
                              out_dir=str(tmp_path / "plain"))  # fmt: skip
    with _group_of_one(tmp_path):
        plain = Trainer(one)
    model, data = plain.model, plain.train_data
    steps = 0
    for epoch in range(2):
        order = np.random.default_rng([cfg.train.seed, epoch, 1]).permutation(data.num_rows)
        for start in range(0, data.num_rows, 32):
            for p in model.parameters():
                p.grad = None
            plain.loss_of(data.batch(order[start : start + 32])).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-2.0)
            steps += 1
    assert steps == result["steps"]
    for name, value in model.state_dict().items():
        assert torch.allclose(served[name].double(), value.double(), atol=1e-6), name


@pytest.mark.slow
def test_barrier_mode_on_a_local_cluster_and_each_gpu_task_gets_its_own_gpu(shards, tmp_path):
    """``train.local_mode=false``: the processes are barrier tasks on the two executor JVMs of a
    ``local-cluster`` master (a Spark standalone cluster in miniature), in a driver of their own;
    they train in async mode, the server on one executor and the worker on the other.
    On the same cluster, whose workers each find a GPU through a fake discovery script (the way
    Spark's own tests schedule GPUs without one), two tasks of a ``train.use_gpu`` run each get
    their own GPU, and the training process the distributor starts sees only that one, which
    the trainer's device selection then takes (see ``tests/integration/cluster_child.py``)."""
    from tests.integration.cluster_child import GPU_ADDRESSES

    cfg, shard_dir = shards
    spec_path = tmp_path / "spec.json"
    # async mode (a parameter server and one worker, meeting point to point across the two
    # executors); the other modes' processes start the same way
    _spec(cfg, shard_dir, tmp_path / "out", world_size=2, local_mode=False, epochs=2,
          mode="async", lr=2.0).write(spec_path)  # fmt: skip
    # the first worker to ask gets GPU "0", the second "1" (mkdir is atomic)
    claim, script = tmp_path / "gpu-claimed", tmp_path / "discover_gpus.sh"
    script.write_text(
        f"#!/bin/sh\nif mkdir {claim} 2>/dev/null; then a={GPU_ADDRESSES[0]}; "
        f"else a={GPU_ADDRESSES[1]}; fi\n"
        'echo "{\\"name\\": \\"gpu\\", \\"addresses\\": [\\"$a\\"]}"\n'
    )
    script.chmod(0o755)
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # set, it would win over the tasks' own GPUs
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.cluster_child", str(spec_path), str(script),
         str(gpus)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["world_size"] == 2 and result["stopped_by"] == "epochs"
    assert result["sync"] == "async" and result["async_pushes_applied"] == result["steps"] > 0
    ranks = _ranks(tmp_path / "out")
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["steps"] == ranks[1]["steps"]

    tasks = [json.loads(p.read_text()) for p in sorted(gpus.glob("gpu-*.json"))]
    assert len(tasks) == 2 and {t["world_size"] for t in tasks} == {2}
    # each task was handed one of the discovered GPUs, and not the same one
    assert sorted(t["visible"] for t in tasks) == GPU_ADDRESSES
    # one process per task: local rank 0, so the trainer takes the only device it sees, NCCL
    assert {(t["local_rank"], t["device"], t["backend"]) for t in tasks} == {(0, "cuda:0", "nccl")}
    assert {t["master_addr"] for t in tasks} == {"127.0.0.1"}


def test_a_rerun_after_a_failure_reuses_the_budget_plan(shards, tmp_path, capsys):
    """--budget: the plan is kept beside the checkpoints, so the rerun of an interrupted run
    trains with the same choices (and its checkpoints match) instead of measuring again."""
    from jobs.train import AUTO_PLAN_FILE, plan_training
    from trainers.data import load_manifest

    cfg, shard_dir = shards
    manifest = load_manifest(shard_dir)
    spec = _spec(cfg, shard_dir, tmp_path, world_size=1, auto=True, time_budget_s=30)
    first, params = plan_training(spec, manifest, tmp_path)
    assert "measuring on 512 training rows" in capsys.readouterr().err
    assert params["time_budget_s"] == 30 and first.train.time_budget_s < 30
    assert (tmp_path / "checkpoints" / AUTO_PLAN_FILE).exists() and (
        tmp_path / AUTO_PLAN_FILE
    ).exists()
    again, _ = plan_training(spec, manifest, tmp_path)
    assert "the interrupted run's plan" in capsys.readouterr().err
    assert again == first
    # other settings: the kept plan is not theirs, so they are measured
    other, _ = plan_training(spec.with_train(seed=1), manifest, tmp_path)
    assert "measuring on" in capsys.readouterr().err and other.train.seed == 1
