"""Why the CPU engine's batch-32 decode step costs what it does: three measurements of this machine.

1. Streaming read rate against working-set size (a `sum` over an fp32 buffer): where the last-level
   cache stops holding the data.
2. The `small` preset's routed-expert matmuls (5 MoE layers x 32 experts of 256 -> 128 -> 256, fp32,
   the engine's in-major layout, a few rows per expert, as in a batch-32 decode step), alone and with
   other memory traffic between the layers, as the attention weights and the KV cache cause in a real
   step.
3. A small parallel torch op on the only thread that runs torch, and on a second thread once the
   first one has run parallel ops too (two OpenMP teams): why the engine keeps all torch work on one
   thread (model_shards/torch_thread.py).

    python bench/cpu_memory.py [--threads 2]

Prints a markdown table per measurement. Timings are best of 5 blocks.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F


def best_ms(fn: Callable[[], object], reps: int, blocks: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e3


def streaming(sizes_mb: list[int]) -> None:
    print("| working set (MB) | fp32 sum, GB/s |\n|---|---|")
    for mb in sizes_mb:
        buf = torch.randn(mb * 2**20 // 4)
        ms = best_ms(buf.sum, reps=max(3, 400 // mb))
        print(f"| {mb} | {mb / 1024 / (ms / 1e3):.1f} |")


def experts(other_mb: list[int], rows: int = 4, layers: int = 5, experts_n: int = 32, hidden: int = 256,
            inter: int = 128) -> None:
    # Memory [E, in, out] like MoE._set_expert_layout on CPU; x @ w_e is the engine's F.linear(x, w_e^T).
    w = [(torch.randn(experts_n, hidden, inter), torch.randn(experts_n, hidden, inter),
          torch.randn(experts_n, inter, hidden)) for _ in range(layers)]
    per = [list(zip(*(t.unbind(0) for t in layer))) for layer in w]
    x = torch.randn(rows, hidden)
    weight_mb = sum(t.numel() for layer in w for t in layer) * 4 / 2**20
    print(f"| other traffic between layers (MB per step) | {layers} layers x {experts_n} experts, {rows} rows each "
          f"({weight_mb:.0f} MB of weights), ms | of which the other traffic alone, ms |\n|---|---|---|")
    with torch.inference_mode():
        for mb in other_mb:
            junk = [torch.randn(max(1, mb * 2**20 // 4 // layers)) for _ in range(layers)]

            def step() -> None:
                for layer, j in zip(per, junk):
                    if mb:
                        j.sum()
                    for wg, wu, wd in layer:
                        (F.silu(x @ wg) * (x @ wu)) @ wd

            alone = best_ms(lambda: [j.sum() for j in junk], reps=10) if mb else 0.0
            print(f"| {mb} | {best_ms(step, reps=10):.2f} | {alone:.2f} |")


def two_teams() -> None:
    a = torch.randn(64, 256)
    w = torch.randn(256, 512)
    ops = {"softmax [64, 256]": lambda: torch.softmax(a, -1), "matmul [64, 256] x [256, 512]": lambda: a @ w}
    first, second = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    alone = {k: first.submit(best_ms, f, 2000).result() for k, f in ops.items()}
    for f in ops.values():  # now a second thread has its own OpenMP team as well
        second.submit(lambda f=f: [f() for _ in range(100)]).result()
    both = {k: first.submit(best_ms, f, 2000).result() for k, f in ops.items()}
    print("| op | only thread running torch, us | after a second thread ran torch, us |\n|---|---|---|")
    for k in ops:
        print(f"| {k} | {alone[k] * 1e3:.1f} | {both[k] * 1e3:.1f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (measurement 3 uses 2 if 1)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {a.threads} thread(s)\n")
    streaming([8, 32, 64, 72, 80, 96, 128, 256])
    print()
    experts([0, 8, 16, 24])
    print()
    # Measurement 3 needs parallel ops; run it in a child so the thread count is set before any team exists.
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_teams_child, args=(max(2, a.threads),))
    p.start()
    p.join()


def _teams_child(threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"({threads} intra-op threads)\n")
    two_teams()


if __name__ == "__main__":
    main()
