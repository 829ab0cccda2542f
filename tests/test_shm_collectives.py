"""SharedMemoryGroup: tensor-parallel collectives through /dev/shm between real processes (spawned, joined
by gloo on 127.0.0.1), checked against gloo's own results; a dead or late peer fails the call by name."""

from __future__ import annotations

import glob
import multiprocessing
import os
import random
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from model_shards.model_runner import RunnerSpec, collectives_name, init_distributed
from model_shards.parallel import TPGroup, all_gather_last_dim, all_reduce
from model_shards.shm_collectives import SharedMemoryGroup
from tests.net import free_port

SLOT = 4096  # small slots, so bigger tensors go through in several pieces


def _inputs(rank: int, k: int) -> torch.Tensor:
    """Call k's tensor on `rank`: varying shapes and dtypes, some beyond a slot, some non-contiguous."""
    g = torch.Generator().manual_seed(1000 * k + rank)
    shape = [(3, 5), (1,), (32, 16), (40, 40), (7, 8, 3)][k % 5]  # (40, 40) fp32: 6400 bytes, 2 pieces
    dtype = [torch.float32, torch.bfloat16, torch.float64][k % 3]
    x = torch.randn(*shape, generator=g).to(dtype)
    if k % 4 == 3 and x.dim() == 2:
        x = x.t()  # a transposed view: not contiguous
    return x


def _run(rank: int, world: int, port: int, out: str, case: str) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        host = f"host-{rank}" if case == "hosts" else None
        shm = SharedMemoryGroup.join(dist.group.WORLD, rank, world, timeout_s=60 if case != "late" else 2.0,
                                     slot_bytes=SLOT, host_id=host)
        result: dict[str, Any] = {"joined": shm is not None, "pid": os.getpid()}
        if case == "match":
            assert shm is not None
            rng = random.Random(rank)
            reduced, gathered, via_gloo, gathered_gloo = [], [], [], []
            for k in range(30):
                time.sleep(rng.random() * 0.002)  # ranks arrive in every order
                x = _inputs(rank, k)
                ref = x.clone()
                dist.all_reduce(ref)
                via_gloo.append(ref)
                y = x.clone()
                assert all_reduce(y, TPGroup(rank, world, shm)) is y  # in place, like dist.all_reduce
                reduced.append(y)
                gathered.append(all_gather_last_dim(x, TPGroup(rank, world, shm)))
                gathered_gloo.append(all_gather_last_dim(x, TPGroup(rank, world, None)))
            result.update(reduced=reduced, gathered=gathered, via_gloo=via_gloo, gathered_gloo=gathered_gloo)
        elif case == "dies":
            assert shm is not None
            if rank == 1:
                os._exit(3)  # gone without a word, as a killed shard would be
            try:
                shm.all_reduce(torch.ones(4))
            except RuntimeError as e:
                result["error"] = str(e)
        elif case == "late":
            assert shm is not None
            if rank == 1:
                time.sleep(6)  # alive, but never arrives in time
            else:
                try:
                    shm.all_reduce(torch.ones(4))
                except RuntimeError as e:
                    result["error"] = str(e)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        if case not in ("dies", "late"):
            dist.destroy_process_group()
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _spawn(world: int, case: str, tmp_path: Path) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_run, args=(r, world, port, str(tmp_path), case)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in tmp_path.glob("*.err")]
    assert not errors, errors[0]
    return [torch.load(tmp_path / f"rank{r}.pt") if (tmp_path / f"rank{r}.pt").exists() else {} for r in range(world)]


def test_results_equal_gloo_and_are_identical_on_every_rank(tmp_path: Path) -> None:
    ranks = _spawn(3, "match", tmp_path)
    assert all(r["joined"] for r in ranks)
    # the segment's name is gone once every rank has mapped it: nothing is left in /dev/shm
    assert glob.glob(f"/dev/shm/agent-swarm-tp-{ranks[0]['pid']}-*") == []
    for k in range(30):
        x = _inputs(0, k)
        want = _inputs(0, k).double() + _inputs(1, k).double() + _inputs(2, k).double()
        for rank in ranks:
            got = rank["reduced"][k]
            assert got.dtype == x.dtype and got.shape == x.shape and got.stride() == x.stride()
            tol = 2e-2 if x.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
            torch.testing.assert_close(got, rank["via_gloo"][k], atol=tol, rtol=tol)
            # all_gather is a copy: exactly gloo's
            assert torch.equal(rank["gathered"][k], rank["gathered_gloo"][k])
            assert torch.equal(rank["gathered"][k], torch.cat([_inputs(r, k) for r in range(3)], dim=-1))
        # every rank holds the same bits (the model's ranks must not drift apart)
        assert all(torch.equal(rank["reduced"][k], ranks[0]["reduced"][k]) for rank in ranks)


def test_ranks_on_different_hosts_keep_gloo(tmp_path: Path) -> None:
    ranks = _spawn(2, "hosts", tmp_path)
    assert [r["joined"] for r in ranks] == [False, False]


def test_a_rank_that_exits_fails_the_collective_by_name(tmp_path: Path) -> None:
    ranks = _spawn(2, "dies", tmp_path)
    assert "rank(s) [1] of 2 exited" in ranks[0]["error"]


def test_a_rank_that_never_arrives_times_out_by_name(tmp_path: Path) -> None:
    ranks = _spawn(2, "late", tmp_path)
    assert "rank(s) [1] of 2 did not reach shared-memory collective #1 within 2 s" in ranks[0]["error"]


def test_unknown_collectives_are_refused() -> None:
    with pytest.raises(ValueError, match="cpu_collectives must be one of"):
        RunnerSpec(preset="tiny", cpu_collectives="mpi")
    with pytest.raises(ValueError, match="cpu_collectives must be one of"):
        init_distributed(0, 1, "tcp://127.0.0.1:1", cpu_collectives="tcp")
    assert collectives_name(None) == "none"

