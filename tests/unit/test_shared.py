"""``train.mode=shared``: two real gloo processes map one copy of their tensors, see each
other's writes, keep the tensors' identity, and leave no file behind; without room they say
why and keep their own tensors."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.shared import mapping_dir, share_tensors


def _rank(rank: int, store_path: str, folder: str, out: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        weight = torch.nn.Parameter(torch.full((3, 4), float(rank + 1)))
        state = torch.zeros(5) + 10 * rank
        before = id(weight)
        nowhere = share_tensors([weight, state], folders=(Path(folder) / "missing",))
        still_own = float(weight.sum())
        why_not = share_tensors([weight, state], folders=(Path(folder),))
        seen = {"initial": float(weight.sum()) + float(state.sum())}
        dist.barrier()  # both have read the initial values before rank 1 writes
        if rank == 1:
            with torch.no_grad():
                weight[1, 2] = 42.0  # what the numba kernel does: writes through .numpy() too
            state.numpy()[4] = 7.0
        dist.barrier()
        seen |= {"weight_12": float(weight[1, 2]), "state_4": float(state[4])}
        dist.barrier()
        torch.save({"nowhere": nowhere, "still_own": still_own, "why_not": why_not,
                    "same_object": id(weight) == before, "is_param": isinstance(weight, torch.nn.Parameter),
                    "left": sorted(p.name for p in Path(folder).iterdir()), **seen}, out)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _main(rank: int, store_path: str, folder: str, outs: list[str]) -> None:
    _rank(rank, store_path, folder, outs[rank])


def test_two_processes_update_one_copy_and_leave_no_file(tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    outs = [str(tmp_path / f"rank-{r}.pt") for r in (0, 1)]
    mp.spawn(_main, args=(str(tmp_path / "store"), str(folder), outs), nprocs=2, join=True)
    results = [torch.load(o) for o in outs]
    for rank, got in enumerate(results):
        assert got["nowhere"].startswith("no room for 0.0 MiB of shared weights in ")
        assert got["still_own"] == 12.0 * (rank + 1)  # untouched where sharing failed
        assert got["why_not"] == ""
        assert got["initial"] == 12.0  # rank 0's values, on both ranks
        assert (got["weight_12"], got["state_4"]) == (42.0, 7.0)  # rank 1's writes, seen by both
        assert got["same_object"] and got["is_param"]
        assert got["left"] == []  # the file went as soon as both had mapped it


def test_the_mapping_goes_where_there_is_room(tmp_path):
    assert mapping_dir(1, (tmp_path / "missing", tmp_path)) == tmp_path
    assert mapping_dir(2**62, (tmp_path,)) is None
