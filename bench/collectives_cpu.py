"""Latency of one tensor-parallel all-reduce between CPU processes on this host: gloo against
model_shards.shm_collectives.SharedMemoryGroup (what co-located TP shards use by default).

    python bench/collectives_cpu.py [--ranks 2] [--iters 500]

Sizes are a decode step's partial sums of the `small` preset ([1, 256] and [32, 256] fp32), of Kimi-K2
([32, 7168] bf16) and a 2k-token Kimi-K2 prefill chunk ([2048, 7168] bf16: 28 MiB, which shared
memory passes through its 2 MiB slots in 14 pieces).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from model_shards.model_runner import free_port  # noqa: E402
from model_shards.shm_collectives import SharedMemoryGroup  # noqa: E402

CASES = [((1, 256), torch.float32), ((32, 256), torch.float32), ((32, 7168), torch.bfloat16),
         ((2048, 7168), torch.bfloat16)]


def _rank(rank: int, world: int, port: int, iters: int, q: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    shm = SharedMemoryGroup.join(dist.group.WORLD, rank, world)
    assert shm is not None, "the ranks could not share memory here"
    rows = []
    for shape, dtype in CASES:
        x = torch.randn(*shape).to(dtype)
        for name, op in (("gloo", lambda t: dist.all_reduce(t)), ("shared memory", shm.all_reduce)):
            for _ in range(20):
                op(x)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                op(x)
            pieces = -(-x.numel() * x.element_size() // shm.slot_bytes) if name == "shared memory" else 1
            rows.append((f"{list(shape)} {str(dtype).removeprefix('torch.')}", name, pieces,
                         (time.perf_counter() - t0) / iters * 1e6))
    if rank == 0:
        q.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, a.ranks, port, a.iters, q)) for r in range(a.ranks)]
    for p in procs:
        p.start()
    rows = q.get(timeout=600)
    for p in procs:
        p.join()
    print(f"\n{a.ranks} ranks, 1 thread each, {os.cpu_count()} CPUs, {a.iters} calls, torch {torch.__version__}, "
          f"1-min load average {os.getloadavg()[0]:.1f}\n")
    print("| tensor | collectives | exchanges | µs per all-reduce |")
    print("|---|---|---:|---:|")
    for tensor, name, pieces, us in rows:
        print(f"| {tensor} | {name} | {pieces} | {us:.1f} |")


if __name__ == "__main__":
    main()
