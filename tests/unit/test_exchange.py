"""Sync mode's gradient exchange: two real gloo processes end with the mean of both ranks'
gradients, row for row, whether the rows fit the packed buffer or overflow it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.exchange import RowExchange
from trainers.model import ModelSpec, NgramClassifier

SPEC = ModelSpec(num_buckets=500, dim=6, hidden=(5,), num_classes=3)
# (ids per rank, offsets) of successive steps: the first overflows the empty buffer, the second
# touches more rows than the room made after it, the third fits; rank 1's last batch shares
# rows with rank 0's and one of its bags is empty.
STEPS = [
    ([[1, 2, 3, 4], [5, 6, 7]], [[0, 2], [0, 1]]),
    ([list(range(10, 40)), list(range(100, 111))], [[0, 10, 20], [0, 5]]),
    ([[10, 11, 12], [12, 13, 10, 499]], [[0, 1], [0, 2, 2]]),
]


def _model(dtype: torch.dtype) -> NgramClassifier:
    torch.manual_seed(3)
    return NgramClassifier(SPEC, sparse=True).to(dtype=dtype)


def _grads(model: NgramClassifier, ids: list[int], offsets: list[int]) -> dict[str, torch.Tensor]:
    """Dense gradients of the model's loss on one batch (labels: row index mod classes)."""
    model.zero_grad(set_to_none=True)
    logits = model(torch.tensor(ids), torch.tensor(offsets))
    labels = torch.arange(len(offsets)) % SPEC.num_classes
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
            for n, p in model.named_parameters()}  # fmt: skip


def _rank(rank: int, store_path: str, dtype: torch.dtype, wire, out: str) -> None:  # noqa: ANN001
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        model = _model(dtype)
        exchange = RowExchange(model, 2, wire)
        worst, sent, last = 0.0, 0, {}
        for ids, offsets in STEPS:
            expected = [_grads(_model(dtype), ids[r], offsets[r]) for r in (0, 1)]
            _grads(model, ids[rank], offsets[rank])
            sent += exchange()
            for name, p in model.named_parameters():
                got = p.grad.to_dense() if p.grad.is_sparse else p.grad
                assert got.dtype == dtype  # summed back in the model's precision
                want = (expected[0][name] + expected[1][name]) / 2
                worst = max(worst, float((got - want).abs().max()))
                last[name] = got.clone()
        torch.save({"worst": worst, "overflows": exchange.overflows, "sent": sent,
                    "capacity": exchange.capacity, "last": last}, out)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, dtype: torch.dtype, wire: torch.dtype | None = None) -> list[dict]:
    outs = [str(tmp_path / f"rank-{r}.pt") for r in (0, 1)]
    mp.spawn(_exchange_main, args=(str(tmp_path / "store"), dtype, wire, outs), nprocs=2,
             join=True)  # fmt: skip
    return [torch.load(o) for o in outs]


def _exchange_main(rank: int, store_path: str, dtype: torch.dtype, wire, outs: list[str]) -> None:  # noqa: ANN001
    _rank(rank, store_path, dtype, wire, outs[rank])


def test_both_ranks_end_with_the_mean_gradient_through_overflow_and_fit(tmp_path):
    results = _run(tmp_path, torch.float32)
    for result in results:
        assert result["worst"] < 1e-6
        # step 1 (empty room) and step 2 (more rows than 1.25x step 1's) overflow, step 3 fits
        assert result["overflows"] == 2
    assert results[0]["capacity"] == results[1]["capacity"] >= 30


def test_fp64_gradients_travel_exactly(tmp_path):
    results = _run(tmp_path, torch.float64)
    assert all(r["worst"] < 1e-12 for r in results)
    # the same steps with the gradients on the wire in fp16 (train.exchange_precision): both
    # ranks still end with the same gradients, the mean to within fp16's rounding, for fewer
    # bytes (the indices and the header do not shrink)
    (tmp_path / "fp16").mkdir()
    half = _run(tmp_path / "fp16", torch.float64, torch.float16)
    for name, g in half[0]["last"].items():
        assert torch.equal(g, half[1]["last"][name]), name
    assert all(1e-12 < r["worst"] < 2e-3 for r in half)
    assert half[0]["sent"] < 0.4 * results[0]["sent"]  # 2 bytes a value instead of 8
    # bf16: the same bytes, coarser rounding
    (tmp_path / "bf16").mkdir()
    brain = _run(tmp_path / "bf16", torch.float64, torch.bfloat16)
    for name, g in brain[0]["last"].items():
        assert torch.equal(g, brain[1]["last"][name]), name
    assert all(half[0]["worst"] < r["worst"] < 2e-2 for r in brain)
    assert brain[0]["sent"] == half[0]["sent"]


def test_ddp_communication_hook_follows_the_exchange_precision():
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from core.errors import ConfigError
    from trainers.trainer import ddp_comm_hook

    assert ddp_comm_hook("fp32", "nccl") is None and ddp_comm_hook("fp32", "gloo") is None
    assert ddp_comm_hook("fp16", "gloo") is default_hooks.fp16_compress_hook
    assert ddp_comm_hook("fp16", "nccl") is default_hooks.fp16_compress_hook
    assert ddp_comm_hook("bf16", "nccl") is default_hooks.bf16_compress_hook
    with pytest.raises(ConfigError, match="needs NCCL"):
        ddp_comm_hook("bf16", "gloo")


def _listeners(port: int) -> list[str]:
    """The local addresses (hex, as the kernel lists them) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


def test_the_meeting_point_listens_on_loopback_only(monkeypatch):
    """torch's own TCPStore listens on every address; the launchers' store on 127.0.0.1."""
    from datetime import timedelta

    from trainers.launch import free_port, loopback_store

    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    store = loopback_store(timedelta(seconds=10))
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert _listeners(port) == ["0100007F"]  # 127.0.0.1, and nothing else
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # under torchrun: its own store
    assert loopback_store(timedelta(seconds=10)) is None
