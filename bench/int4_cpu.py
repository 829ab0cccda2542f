"""CPU micro-benchmark of the INT4 routed experts (model_shards/kernels/int4_cpu.py).

1. One MoE layer of the `small` preset (32 experts of [128, 256], top-4) at several token counts:
   fp32 weights (the torch reference), INT4 through the dequantizing reference (`exact=True`) and
   INT4 through ATen's packed int4 kernel (the default on CPU), with the packed path's error.
2. One expert matmul at several row counts: the packed kernel against dequantize + fp32 matmul, the
   measurement behind `_PACKED_MAX_ROWS`.

    python bench/int4_cpu.py [--threads 1] [--tokens 1 8 32 512]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import model_shards.kernels as K
from model_shards.config import ModelConfig
from model_shards.kernels import int4_cpu
from model_shards.kernels.reference import pack_int4, unpack_int4


def timed(fn: Callable[[], object], min_s: float = 0.3) -> float:
    """Best-of-5 mean seconds per call, each batch of calls running at least ~min_s / 5."""
    fn()
    n, t = 1, 0.0
    while t < min_s / 5:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        n *= 2
    n //= 2
    best = t / n
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def stacked_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    packs = [pack_int4(w[e]) for e in range(w.shape[0])]
    return torch.stack([p for p, _ in packs]), torch.stack([s for _, s in packs])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 512])
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("small")
    E, H, I, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    gate, up, down = torch.randn(E, I, H) * 0.05, torch.randn(E, I, H) * 0.05, torch.randn(E, H, I) * 0.05
    packs = (*stacked_int4(gate), *stacked_int4(up), *stacked_int4(down))
    deq = [torch.stack([unpack_int4(packs[2 * j][e], packs[2 * j + 1][e]) for e in range(E)]) for j in range(3)]

    print(f"one `small` MoE layer ({E} experts [{I}, {H}], top-{k}), {a.threads} thread(s), torch {torch.__version__}\n")
    print("| tokens | fp32 weights (ms) | INT4, dequantizing (ms) | INT4, packed kernel (ms) | packed vs exact, rel. error |")
    print("|---|---|---|---|---|")
    for n in a.tokens:
        x = torch.randn(n, H)
        weights, ids = torch.topk(torch.randn(n, E).softmax(-1), k)
        with torch.inference_mode():
            exact = K.fused_moe_int4(x, *packs, ids, weights, exact=True)
            packed = K.fused_moe_int4(x, *packs, ids, weights)
            rel = ((packed - exact).norm() / exact.norm()).item()
            t_fp32 = timed(lambda: K.fused_moe(x, *deq, ids, weights))
            t_exact = timed(lambda: K.fused_moe_int4(x, *packs, ids, weights, exact=True))
            t_packed = timed(lambda: K.fused_moe_int4(x, *packs, ids, weights))
        print(f"| {n} | {t_fp32 * 1e3:.3f} | {t_exact * 1e3:.3f} | {t_packed * 1e3:.3f} | {rel:.4f} |")

    print("\none expert matmul: packed kernel (bf16 activations) against dequantize + fp32 matmul, µs\n")
    print("| weight [out, in] | rows | packed | dequantize + fp32 |")
    print("|---|---|---|---|")
    for out_f, in_f in ((2 * I, H), (H, I)):
        p, s = pack_int4(torch.randn(out_f, in_f) * 0.05)
        w, sz = int4_cpu._pack(p, s)
        for rows in (4, 32, 128, 256, 512):
            x = torch.randn(rows, in_f)
            xb = x.bfloat16()
            t_p = timed(lambda: int4_cpu._OP(xb, w, 32, sz), 0.15)
            t_d = timed(lambda: F.linear(x, unpack_int4(p, s, 32, torch.float32)), 0.15)
            print(f"| [{out_f}, {in_f}] | {rows} | {t_p * 1e6:.1f} | {t_d * 1e6:.1f} |")


if __name__ == "__main__":
    main()
