"""Benchmark each Triton kernel against its torch reference, plus fused-MoE decode against the HBM roofline.

On a CUDA machine (real Kimi-K2 shapes, bf16):
    python bench/kernels_gpu.py                   # all kernels; bandwidth peak guessed from the GPU name
    python bench/kernels_gpu.py --experts 48      # one EP8 rank's share of a MoE layer (less memory)
    python bench/kernels_gpu.py --bw-tbps 3.35    # give the HBM peak explicitly
Without a GPU (tiny shapes, Triton interpreter on CPU; checks that everything runs and agrees):
    python bench/kernels_gpu.py --dry-run
Without a GPU, compile every kernel ahead of time for a CUDA arch with the real K2 launch configs
(catches what the interpreter forgives: type or layout errors only the compiler sees):
    python bench/kernels_gpu.py --compile-only [--arch 90]

Prints one markdown table. Decode is memory-bound: its roofline time is the bytes that must be read
(weights of every expert the batch touches, or the KV latent rows) divided by the HBM bandwidth.
Exits 1 if any kernel disagrees with its reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

# Peak HBM bandwidth (bytes/s) by GPU name fragment; more specific names first.
_HBM_PEAK = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12), ("L40", 0.864e12))


@dataclass
class Shapes:
    hidden: int
    moe_inter: int
    top_k: int
    experts: int
    routed_total: int
    rms_rows: tuple[int, ...]
    linear_out: int
    linear_rows: tuple[int, ...]
    moe_tokens: tuple[int, ...]
    prefill_tokens: int
    mla_heads: int
    kv_lora: int
    rope_dim: int
    mla_cases: tuple[tuple[int, int], ...]  # (sequences, context length)


def kimi_shapes(experts: int) -> Shapes:
    return Shapes(
        hidden=7168, moe_inter=2048, top_k=8, experts=experts, routed_total=384,
        rms_rows=(1, 64, 4096), linear_out=4096, linear_rows=(1, 16, 256),
        moe_tokens=(1, 8, 32, 128), prefill_tokens=2048,
        mla_heads=16, kv_lora=512, rope_dim=64, mla_cases=((1, 4096), (32, 4096), (8, 32768)),
    )


def tiny_shapes() -> Shapes:
    return Shapes(
        hidden=64, moe_inter=32, top_k=2, experts=6, routed_total=8,
        rms_rows=(1, 5), linear_out=48, linear_rows=(1, 3),
        moe_tokens=(1, 4), prefill_tokens=9,
        mla_heads=4, kv_lora=32, rope_dim=16, mla_cases=((1, 7), (3, 40)),
    )


@dataclass
class Row:
    kernel: str
    case: str
    triton_ms: float
    torch_ms: float
    max_err: float
    ok: bool
    bytes_moved: float | None = None  # minimum HBM traffic, for the roofline
    flops: float | None = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    ap.add_argument("--experts", type=int, default=384, help="routed experts held by this GPU (384 = full layer)")
    ap.add_argument("--bw-tbps", type=float, default=None, help="peak HBM bandwidth in TB/s (default: from GPU name)")
    ap.add_argument("--compile-only", action="store_true", help="compile all kernels for --arch on CPU; no run")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-only (90 = H100/H200)")
    ap.add_argument("--only", default="", help="comma list of kernels to run: rms_norm,int4_linear,fused_moe,mla_decode")
    args = ap.parse_args(argv)

    if args.compile_only:
        # The compiler, not the interpreter, must see the kernels.
        os.environ["TRITON_INTERPRET"] = "0"
        os.environ.pop("SWARM_TRITON_INTERPRET", None)
        return compile_only(args.arch)
    if args.dry_run:
        # Must precede the first triton import (the kernels are decorated at import).
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["SWARM_TRITON_INTERPRET"] = "1"
    import torch

    import model_shards.kernels as K

    if args.dry_run:
        device, shapes = "cpu", tiny_shapes()
        peak_bw = (args.bw_tbps or 1.0) * 1e12  # meaningless on CPU; keeps the columns filled
        gpu_name = "CPU (Triton interpreter)"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run for the CPU interpreter check", file=sys.stderr)
            return 2
        device, shapes = "cuda", kimi_shapes(args.experts)
        gpu_name = torch.cuda.get_device_name()
        peak_bw = _peak_bandwidth(gpu_name, args.bw_tbps)
    if not K.triton_enabled(torch.empty(0, device=device)):
        print("triton is not enabled for this device (is triton installed?)", file=sys.stderr)
        return 2

    timer = _cpu_timer if args.dry_run else _cuda_timer
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    torch.manual_seed(0)
    rows: list[Row] = []
    suites: dict[str, Callable[[], list[Row]]] = {
        "rms_norm": lambda: bench_rms_norm(K, shapes, device, timer),
        "int4_linear": lambda: bench_int4_linear(K, shapes, device, timer),
        "fused_moe": lambda: bench_fused_moe(K, shapes, device, timer),
        "mla_decode": lambda: bench_mla_decode(K, shapes, device, timer),
    }
    for name, suite in suites.items():
        if not only or name in only:
            rows += suite()
            if device == "cuda":
                torch.cuda.empty_cache()

    print(f"\n### Kernels vs torch reference on {gpu_name} (peak HBM {peak_bw / 1e12:.2f} TB/s, bf16)\n")
    print("| kernel | case | triton ms | torch ms | speedup | max abs err | check | GB/s | % of HBM roofline | TFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        gbps = f"{r.bytes_moved / r.triton_ms / 1e6:.4g}" if r.bytes_moved else "-"
        roof = f"{100 * r.bytes_moved / (r.triton_ms * 1e-3) / peak_bw:.3g}%" if r.bytes_moved else "-"
        tflops = f"{r.flops / r.triton_ms / 1e9:.3g}" if r.flops else "-"
        print(f"| {r.kernel} | {r.case} | {r.triton_ms:.3f} | {r.torch_ms:.3f} | {r.torch_ms / r.triton_ms:.2f}x "
              f"| {r.max_err:.2e} | {'ok' if r.ok else 'MISMATCH'} | {gbps} | {roof} | {tflops} |")
    bad = [r for r in rows if not r.ok]
    if bad:
        print(f"\n{len(bad)} case(s) disagree with the torch reference", file=sys.stderr)
    return 1 if bad else 0


# ---------------------------------------------------------------- ahead-of-time compile check


class _LaunchRecorder:
    """Stands in for a kernel: `kernel[grid](*args, **kw)` records the launch instead of running it."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((args, kw))


def _signature(kernel, args: tuple, kw: dict) -> tuple[dict[str, str], dict[str, object], dict[str, int]]:
    import torch

    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
           torch.int64: "*i64"}
    options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    values = dict(zip(kernel.arg_names, args)) | kw
    sig: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    for param in kernel.params:
        v = values[param.name]
        if param.is_constexpr:
            sig[param.name] = "constexpr"
            constexprs[param.name] = v
        elif isinstance(v, torch.Tensor):
            sig[param.name] = ptr[v.dtype]
        elif isinstance(v, bool):
            sig[param.name] = "i1"
        elif isinstance(v, int):
            sig[param.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {param.name}={v!r}")
    return sig, constexprs, options


def compile_only(arch: int) -> int:
    """Run every launcher on CPU tensors with K2 shapes, record its launches, compile them for sm_{arch}."""
    import importlib

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mods = {m: importlib.import_module(f"model_shards.kernels.{m}") for m in ("rmsnorm", "int4", "fused_moe", "mla_decode")}
    recorders = {
        "rms_norm": (mods["rmsnorm"], "_rms_norm_kernel"),
        "int4_linear": (mods["int4"], "_int4_linear_kernel"),
        "moe_gate_up": (mods["fused_moe"], "_moe_gate_up_kernel"),
        "moe_down": (mods["fused_moe"], "_moe_down_kernel"),
        "mla_split": (mods["mla_decode"], "_mla_split_kernel"),
        "mla_merge": (mods["mla_decode"], "_mla_merge_kernel"),
    }
    recs = {}
    for name, (mod, attr) in recorders.items():
        recs[name] = _LaunchRecorder(getattr(mod, attr))
        setattr(mod, attr, recs[name])

    # K2 shapes, but few experts/slots: the launch configs depend on widths and token counts only.
    H, I, R, P = 7168, 2048, 512, 64
    bf16 = torch.bfloat16
    for dtype in (bf16, torch.float32):
        mods["rmsnorm"].rms_norm_triton(torch.empty(3, H, dtype=dtype), torch.empty(H, dtype=dtype), 1e-6)
    packed, scale = torch.zeros(256, H // 8, dtype=torch.int32), torch.empty(256, H // 32, dtype=bf16)
    for m in (1, 256):
        mods["int4"].int4_linear_triton(torch.empty(m, H, dtype=bf16), packed, scale)
    E = 2
    wg, wu, wd = torch.empty(E, I, H, dtype=bf16), torch.empty(E, I, H, dtype=bf16), torch.empty(E, H, I, dtype=bf16)
    for n, split_k in ((1, 1), (1, 4), (64, 1)):  # decode (BLOCK_M 16; split-K) and prefill (BLOCK_M 64)
        ids, tw = torch.randint(0, E, (n, 8)), torch.rand(n, 8)
        mods["fused_moe"].fused_moe_triton(torch.empty(n, H, dtype=bf16), wg, wu, wd, ids, tw, split_k=split_k)
    q4 = [torch.zeros(E, I, H // 8, dtype=torch.int32), torch.empty(E, I, H // 32, dtype=bf16)]
    d4 = [torch.zeros(E, H, I // 8, dtype=torch.int32), torch.empty(E, H, I // 32, dtype=bf16)]
    ids, tw = torch.randint(0, E, (1, 8)), torch.rand(1, 8)
    for split_k in (1, 4):
        mods["fused_moe"].fused_moe_triton(torch.empty(1, H, dtype=bf16), q4[0], q4[0], d4[0], ids, tw,
                                           scales=(q4[1], q4[1], d4[1]), split_k=split_k)
    for dtype in (bf16, torch.float32):
        mods["mla_decode"].mla_decode_triton(
            torch.empty(2, 16, R, dtype=dtype), torch.empty(2, 16, P, dtype=dtype), torch.empty(2, 64, R, dtype=dtype),
            torch.empty(2, 64, P, dtype=dtype), torch.tensor([0, 1]), torch.tensor([5, 64]), 0.1)

    target = GPUTarget("cuda", arch, 32)
    # Opt-in shared memory per block: 227 KiB on Hopper, 163 KiB on A100, ~99 KiB on consumer parts.
    smem_limit = {90: 232448, 80: 166912, 87: 166912}.get(arch, 101376)
    failures = 0
    print(f"| kernel | constexprs | sm_{arch} |")
    print("|---|---|---|")
    for name, rec in recs.items():
        for args, kw in rec.launches:
            sig, constexprs, options = _signature(rec.kernel, args, dict(kw))
            shown = ", ".join(f"{k}={v}" for k, v in constexprs.items())
            try:
                compiled = triton.compile(ASTSource(rec.kernel, sig, constexprs), target=target, options=options)
                smem = int(compiled.metadata.shared)
                if smem > smem_limit:
                    failures += 1
                    status = f"FAILED: needs {smem / 1024:.0f} KiB shared memory > {smem_limit / 1024:.0f} KiB"
                else:
                    status = f"ok ({smem / 1024:.0f} KiB smem, {compiled.metadata.num_warps} warps)"
            except Exception as exc:  # report every failing config, not just the first
                failures += 1
                status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"| {name} | {shown} | {status} |")
    if not all(rec.launches for rec in recs.values()):
        print("some kernel was never launched", file=sys.stderr)
        return 1
    return 1 if failures else 0


# ---------------------------------------------------------------- timing


def _cuda_timer(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _cpu_timer(fn: Callable[[], object]) -> float:
    fn()  # first call compiles/warms caches
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_bandwidth(gpu_name: str, override_tbps: float | None) -> float:
    if override_tbps:
        return override_tbps * 1e12
    for fragment, bw in _HBM_PEAK:
        if fragment in gpu_name:
            return bw
    raise SystemExit(f"unknown HBM peak for {gpu_name!r}: pass --bw-tbps")


def _compare(out, ref) -> tuple[float, bool]:
    """bf16 tolerance relative to the output's scale (bf16 keeps ~3 significant digits)."""
    err = float((out.float() - ref.float()).abs().max())
    scale = float(ref.float().abs().max()) or 1.0
    return err, err <= 2e-2 * scale + 1e-3


# ---------------------------------------------------------------- suites


def bench_rms_norm(K, sh: Shapes, device: str, timer) -> list[Row]:
    import torch

    rows = []
    for n in sh.rms_rows:
        x = torch.randn(n, sh.hidden, device=device, dtype=torch.bfloat16)
        w = torch.rand(sh.hidden, device=device, dtype=torch.bfloat16) + 0.5
        out = K.rms_norm(x, w, 1e-6)
        err, ok = _compare(out, K.rms_norm_ref(x, w, 1e-6))
        rows.append(Row("rms_norm", f"[{n}, {sh.hidden}]", timer(lambda: K.rms_norm(x, w, 1e-6)),
                        timer(lambda: K.rms_norm_ref(x, w, 1e-6)), err, ok, bytes_moved=2 * x.numel() * 2 + w.numel() * 2))
    return rows


def bench_int4_linear(K, sh: Shapes, device: str, timer) -> list[Row]:
    import torch

    rows = []
    out_f, in_f = sh.linear_out, sh.hidden
    packed, scale = K.pack_int4(torch.randn(out_f, in_f, device=device) / in_f**0.5)
    scale = scale.to(torch.bfloat16)
    w_bf16 = K.unpack_int4(packed, scale, dtype=torch.bfloat16)
    weight_bytes = packed.numel() * 4 + scale.numel() * 2
    for m in sh.linear_rows:
        x = torch.randn(m, in_f, device=device, dtype=torch.bfloat16)
        out = K.int4_linear(x, packed, scale)
        err, ok = _compare(out, K.int4_linear_ref(x, packed, scale))
        t_triton = timer(lambda: K.int4_linear(x, packed, scale))
        rows.append(Row("int4_linear", f"x[{m}, {in_f}] W[{out_f}, {in_f}] int4 vs dequant+matmul", t_triton,
                        timer(lambda: K.int4_linear_ref(x, packed, scale)), err, ok,
                        bytes_moved=weight_bytes + (x.numel() + m * out_f) * 2, flops=2 * m * out_f * in_f))
        # The bf16 matmul on pre-dequantized weights is what INT4 must beat: it reads 4x the weight bytes.
        rows.append(Row("int4_linear", f"x[{m}, {in_f}] vs bf16 F.linear", t_triton,
                        timer(lambda: torch.nn.functional.linear(x, w_bf16)), err, ok,
                        bytes_moved=weight_bytes + (x.numel() + m * out_f) * 2, flops=2 * m * out_f * in_f))
    return rows


def _route(n: int, sh: Shapes, device: str):
    """Top-k over all routed experts of the model; ids >= sh.experts belong to other EP ranks."""
    import torch

    scores = torch.rand(n, sh.routed_total, device=device)
    weights, ids = scores.topk(sh.top_k, dim=-1)
    return ids, (weights / weights.sum(-1, keepdim=True)).float()


def _moe_bytes(ids, sh: Shapes, per_expert_bytes: float, n: int) -> float:
    local = ids[(ids >= 0) & (ids < sh.experts)]
    touched = int(local.unique().numel())
    return touched * per_expert_bytes + 2 * n * sh.hidden * 2


SPLIT_KS = (2, 4, 8)  # split-K launches tried at the smallest decode batches (fused_moe_triton(split_k=...))
SPLIT_K_MAX_TOKENS = 8


def bench_fused_moe(K, sh: Shapes, device: str, timer) -> list[Row]:
    import torch

    from model_shards.kernels.fused_moe import fused_moe_triton

    rows = []
    E, H, I = sh.experts, sh.hidden, sh.moe_inter
    # Allocated one expert tensor at a time to keep the peak near the final footprint.
    wg = torch.empty(E, I, H, device=device, dtype=torch.bfloat16)
    wu = torch.empty(E, I, H, device=device, dtype=torch.bfloat16)
    wd = torch.empty(E, H, I, device=device, dtype=torch.bfloat16)
    for w, fan_in in ((wg, H), (wu, H), (wd, I)):
        for e in range(E):
            w[e].normal_(0, fan_in**-0.5)
    expert_bytes_bf16 = 3 * I * H * 2
    for n in (*sh.moe_tokens, sh.prefill_tokens):
        x = torch.randn(n, H, device=device, dtype=torch.bfloat16)
        ids, tw = _route(n, sh, device)
        out = K.fused_moe(x, wg, wu, wd, ids, tw)
        err, ok = _compare(out, K.fused_moe_ref(x, wg, wu, wd, ids, tw))
        local = int(((ids >= 0) & (ids < E)).sum())
        phase = "prefill" if n == sh.prefill_tokens else "decode"
        rows.append(Row("fused_moe", f"{phase} N={n} k={sh.top_k} E={E}/{sh.routed_total} bf16",
                        timer(lambda: K.fused_moe(x, wg, wu, wd, ids, tw)),
                        timer(lambda: K.fused_moe_ref(x, wg, wu, wd, ids, tw)), err, ok,
                        bytes_moved=_moe_bytes(ids, sh, expert_bytes_bf16, n), flops=local * 3 * 2 * H * I))
        for split_k in SPLIT_KS if n <= SPLIT_K_MAX_TOKENS else ():
            def run(split_k=split_k):
                return fused_moe_triton(x, wg, wu, wd, ids, tw, split_k=split_k)
            err, ok = _compare(run(), K.fused_moe_ref(x, wg, wu, wd, ids, tw))
            rows.append(Row("fused_moe", f"decode N={n} k={sh.top_k} E={E}/{sh.routed_total} bf16 split_k={split_k}",
                            timer(run), timer(lambda: K.fused_moe_ref(x, wg, wu, wd, ids, tw)), err, ok,
                            bytes_moved=_moe_bytes(ids, sh, expert_bytes_bf16, n), flops=local * 3 * 2 * H * I))
    del wg, wu, wd
    if device == "cuda":
        torch.cuda.empty_cache()

    # INT4 experts (K2 Thinking): a quarter of the weight bytes, so decode's roofline is ~4x lower.
    packs = []
    for out_f, in_f in ((I, H), (I, H), (H, I)):
        p = torch.empty(E, out_f, in_f // 8, device=device, dtype=torch.int32)
        s = torch.empty(E, out_f, in_f // 32, device=device, dtype=torch.bfloat16)
        for e in range(E):
            pe, se = K.pack_int4(torch.randn(out_f, in_f, device=device) / in_f**0.5)
            p[e], s[e] = pe, se
        packs += [p, s]
    expert_bytes_int4 = sum(t[0].numel() * t.element_size() for t in packs)
    for n in sh.moe_tokens:
        x = torch.randn(n, H, device=device, dtype=torch.bfloat16)
        ids, tw = _route(n, sh, device)
        out = K.fused_moe_int4(x, *packs, ids, tw)
        err, ok = _compare(out, K.fused_moe_int4_ref(x, *packs, ids, tw))
        local = int(((ids >= 0) & (ids < E)).sum())
        rows.append(Row("fused_moe_int4", f"decode N={n} k={sh.top_k} E={E}/{sh.routed_total} int4 g32",
                        timer(lambda: K.fused_moe_int4(x, *packs, ids, tw)),
                        timer(lambda: K.fused_moe_int4_ref(x, *packs, ids, tw)), err, ok,
                        bytes_moved=_moe_bytes(ids, sh, expert_bytes_int4, n), flops=local * 3 * 2 * H * I))
        for split_k in SPLIT_KS if n <= SPLIT_K_MAX_TOKENS else ():
            def run4(split_k=split_k):
                return fused_moe_triton(x, packs[0], packs[2], packs[4], ids, tw, scales=(packs[1], packs[3], packs[5]),
                                        split_k=split_k)
            err, ok = _compare(run4(), K.fused_moe_int4_ref(x, *packs, ids, tw))
            rows.append(Row("fused_moe_int4", f"decode N={n} k={sh.top_k} E={E}/{sh.routed_total} int4 g32 split_k={split_k}",
                            timer(run4), timer(lambda: K.fused_moe_int4_ref(x, *packs, ids, tw)), err, ok,
                            bytes_moved=_moe_bytes(ids, sh, expert_bytes_int4, n), flops=local * 3 * 2 * H * I))
    return rows


def bench_mla_decode(K, sh: Shapes, device: str, timer) -> list[Row]:
    import torch

    rows = []
    Hh, R, P = sh.mla_heads, sh.kv_lora, sh.rope_dim
    scale = (128 + P) ** -0.5
    for S, L in sh.mla_cases:
        latent = torch.randn(S, L, R, device=device, dtype=torch.bfloat16)
        k_rope = torch.randn(S, L, P, device=device, dtype=torch.bfloat16)
        ql = torch.randn(S, Hh, R, device=device, dtype=torch.bfloat16)
        qr = torch.randn(S, Hh, P, device=device, dtype=torch.bfloat16)
        slots = torch.arange(S, device=device)
        lens = torch.full((S,), L, device=device, dtype=torch.int64)
        args = (ql, qr, latent, k_rope, slots, lens, scale)
        out = K.mla_decode(*args)
        err, ok = _compare(out, K.mla_decode_ref(*args))
        cache_bytes = S * L * (R + P) * 2
        rows.append(Row("mla_decode", f"S={S} ctx={L} heads={Hh} R={R} P={P}", timer(lambda: K.mla_decode(*args)),
                        timer(lambda: K.mla_decode_ref(*args)), err, ok,
                        bytes_moved=cache_bytes + 2 * S * Hh * (R + P) * 2, flops=S * Hh * L * 2 * (2 * R + P)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
