"""Benchmark of the model_shards engine against transformers' DeepseekV3ForCausalLM.generate.

Same weights (a preset, random-initialised, saved as an HF checkpoint and read by both), greedy
decoding, fixed lengths. Per configuration: time to first token (TTFT, mean over the batch), decode
throughput (tokens/s after every request has its first token), peak memory (resident memory of the
processes that hold the model on CPU; allocated GPU memory on CUDA) and how many greedy sequences
equal transformers'. Prints a markdown table.

    python bench/engine.py [--batches 1 8 32] [--prompt-len 64] [--new-tokens 64] [--tp 1 2]

On a GPU (no Ray needed: TP=1 in-process; the engine takes the Triton kernels by itself):

    python bench/engine.py --device cuda --dtype bfloat16 --tp 1 --batches 1 8 32 64
    python bench/engine.py --device cuda --dtype bfloat16 --tp 1 --preset kimi-k2 --layers 3 --experts 64

--layers / --experts shrink a preset (e.g. Kimi-K2's real widths with fewer layers and experts).
Every configuration runs in a fresh process so peak memory is its own.

--int4: the engine serves the checkpoint quantized to K2's native INT4 experts (`swarm model quantize`),
and transformers runs the same weights dequantized to fp32 (`swarm model dequantize`): it cannot run INT4
on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from typing import Any

import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _prompts(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, vocab - 1, (batch, prompt_len), generator=g).tolist()


def make_checkpoint(out_dir: str, seed: int, preset: str = "small", layers: int | None = None,
                    experts: int | None = None, dtype: str = "float32", device: str = "cpu") -> None:
    from model_shards.checkpoint import save_checkpoint
    from model_shards.config import ModelConfig
    from model_shards.model import KimiK2ForCausalLM

    cfg = ModelConfig.preset(preset)
    if layers is not None:
        cfg.num_hidden_layers = layers
    if experts is not None:
        cfg.n_routed_experts = experts
        cfg.num_experts_per_tok = min(cfg.num_experts_per_tok, experts)
    cfg.torch_dtype = dtype
    torch.manual_seed(seed)
    with torch.device(device):  # initialising Kimi-K2-wide layers is much faster on a GPU
        model = KimiK2ForCausalLM(cfg, dtype=getattr(torch, dtype))
    save_checkpoint(model, cfg, out_dir)


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mb()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_int4_checkpoints(full: str, int4: str, dequantized: str) -> None:
    from model_shards.int4 import dequantize_checkpoint, quantize_checkpoint

    quantize_checkpoint(full, int4)
    dequantize_checkpoint(int4, dequantized, torch.float32)


def run_hf(ckpt: str, batch: int, prompt_len: int, new_tokens: int, threads: int, repeat: int = 3,
           dtype: str = "float32", device: str = "cpu") -> dict[str, Any]:
    from transformers import DeepseekV3ForCausalLM

    torch.set_num_threads(threads)
    model = DeepseekV3ForCausalLM.from_pretrained(ckpt, torch_dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.tensor(_prompts(batch, prompt_len, model.config.vocab_size), device=device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Timestamps generate()'s puts: the first is the prompt, the next ones are new tokens."""

        def __init__(self) -> None:
            self.puts: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            _sync(device)
            self.puts.append(time.perf_counter())

        def end(self) -> None:
            pass

    runs: list[tuple[float, float]] = []
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        for _ in range(repeat):  # best of `repeat`: the machine may be shared
            clock = Clock()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock, **kw)
            _sync(device)
            t_end = time.perf_counter()
            first = clock.puts[1]
            runs.append((first - t0, batch * (new_tokens - 1) / max(t_end - first, 1e-9)))
    return {
        "ttft_s": min(r[0] for r in runs),
        "decode_tps": max(r[1] for r in runs),
        "peak_mb": _peak_mb(device),
        "tokens": out[:, prompt_len:].tolist(),
    }


def run_engine(
    ckpt: str, batch: int, prompt_len: int, new_tokens: int, tp: int, threads: int, repeat: int = 3,
    dtype: str = "float32", int4_exact: bool = False, device: str = "cpu", cpu_collectives: str = "shared_memory",
) -> dict[str, Any]:
    from model_shards.engine import LLMEngine
    from model_shards.engine_api import GenerationRequest, SamplingParams
    from model_shards.model_runner import LocalRunnerGroup, RunnerSpec
    from model_shards.tokenizer import ByteTokenizer

    spec = RunnerSpec(checkpoint=ckpt, num_slots=max(batch, 1), max_len=prompt_len + new_tokens + 8, dtype=dtype,
                      device=device, int4_exact=int4_exact, cpu_collectives=cpu_collectives)
    shard_peaks: list[float] = []
    if tp == 1:
        torch.set_num_threads(threads)
        group: Any = LocalRunnerGroup.build(spec)
    else:
        import ray

        from model_shards.shards import RayShardGroup

        ray.init(num_cpus=max(tp, threads), include_dashboard=False, log_to_driver=False)
        group = RayShardGroup.create(spec, tp=tp, num_cpus_per_shard=max(1, threads // tp))
        if group.collectives != cpu_collectives:
            raise RuntimeError(f"asked for {cpu_collectives} collectives, the shards run {group.collectives}")
    prompts = _prompts(batch, prompt_len, group.cfg.vocab_size)

    async def once(eng: Any, tag: str) -> tuple[float, float, list[list[int]]]:
        """(mean TTFT, decode tokens/s, tokens) of one batch submitted at once."""
        firsts: list[float] = []
        toks: list[list[int]] = [[] for _ in prompts]
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            req = GenerationRequest(f"{tag}-{i}", prompts[i], SamplingParams(temperature=0.0, max_tokens=new_tokens))
            async for ev in eng.generate(req):
                if not toks[i]:
                    firsts.append(time.perf_counter())
                toks[i].append(ev.token_id)

        await asyncio.gather(*(one(i) for i in range(batch)))
        t_end = time.perf_counter()
        ttft = sum(f - t0 for f in firsts) / len(firsts)
        return ttft, batch * (new_tokens - 1) / max(t_end - max(firsts), 1e-9), toks

    async def go() -> dict[str, Any]:
        eng = LLMEngine(group, ByteTokenizer(), "small", stop_token_ids=[], prefix_reuse=False,
                        max_prefill_tokens_per_step=max(512, batch * prompt_len))
        await eng.complete(GenerationRequest("warm", prompts[0][:8], SamplingParams(temperature=0.0, max_tokens=2)))
        runs = [await once(eng, f"run{k}") for k in range(repeat)]  # best of `repeat`: the machine may be shared
        if tp > 1:
            import ray

            shard_peaks.extend(ray.get([a.peak_rss_mb.remote() for a in group.actors]))
        await eng.close()
        return {"ttft_s": min(r[0] for r in runs), "decode_tps": max(r[1] for r in runs), "tokens": runs[0][2]}

    out = asyncio.run(go())
    out["peak_mb"] = _peak_mb(device) + sum(shard_peaks)  # driver plus every shard process
    if device != "cpu":
        from model_shards.kernels import triton_enabled

        out["kernels"] = "triton" if triton_enabled(torch.empty(1, device=device)) else "torch"
    return out


def _child(q: Any, fn: str, args: tuple) -> None:
    try:
        q.put(globals()[fn](*args))
    except Exception as e:  # report the failure in the table instead of hanging the parent
        q.put({"error": f"{type(e).__name__}: {e}"})


def in_fresh_process(fn: str, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, args))
    p.start()
    res = q.get()
    p.join()
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per configuration; the best is reported")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the checkpoint's weights, and the activations of both systems")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "kimi-k2"])
    ap.add_argument("--layers", type=int, help="num_hidden_layers instead of the preset's")
    ap.add_argument("--experts", type=int, help="n_routed_experts instead of the preset's")
    ap.add_argument("--int4", action="store_true",
                    help="engine on the INT4-quantized checkpoint, transformers on its dequantized fp32 copy")
    ap.add_argument("--int4-exact", action="store_true",
                    help="with --int4: the engine's dequantizing INT4 path instead of the packed kernel")
    from model_shards.model_runner import CPU_COLLECTIVES

    ap.add_argument("--cpu-collectives", choices=list(CPU_COLLECTIVES), default="shared_memory",
                    help="how TP > 1 shards on CPU exchange partial sums (RunnerSpec.cpu_collectives)")
    a = ap.parse_args(argv)
    if a.int4_exact and not a.int4:
        ap.error("--int4-exact needs --int4")
    if a.int4 and a.dtype != "float32":
        ap.error("--int4 runs the non-expert weights in float32; leave --dtype at float32")
    if a.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no GPU here")
        if a.tp != [1]:
            ap.error("--device cuda runs TP=1 in-process: use --tp 1")
        if a.int4:
            ap.error("--int4 compares against transformers on CPU: leave --device at cpu")
    for name in ("layers", "experts"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name} must be at least 1")

    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]  # the machine may be shared: report how busy it was
    with tempfile.TemporaryDirectory() as root:
        ckpt = hf_ckpt = os.path.join(root, "full")
        setup = [("make_checkpoint", ckpt, a.seed, a.preset, a.layers, a.experts, a.dtype, a.device)]
        if a.int4:
            ckpt, hf_ckpt = os.path.join(root, "int4"), os.path.join(root, "dequantized")
            setup.append(("make_int4_checkpoints", os.path.join(root, "full"), ckpt, hf_ckpt))
        for fn, *args in setup:
            res = in_fresh_process(fn, *args)
            if isinstance(res, dict) and "error" in res:
                raise SystemExit(f"{fn} failed: {res['error']}")
        for b in a.batches:
            hf = in_fresh_process("run_hf", hf_ckpt, b, a.prompt_len, a.new_tokens, a.threads, a.repeat, a.dtype,
                                  a.device)
            rows.append({"system": "transformers generate", "tp": 1, "batch": b, **hf})
            for tp in a.tp:
                r = in_fresh_process("run_engine", ckpt, b, a.prompt_len, a.new_tokens, tp, a.threads, a.repeat, a.dtype,
                                     a.int4_exact, a.device, a.cpu_collectives)
                if "tokens" in r and "tokens" in hf:
                    same = sum(x == y for x, y in zip(r["tokens"], hf["tokens"]))
                    r["same_as_hf"] = f"{same}/{b}"
                if "decode_tps" in r and "decode_tps" in hf:
                    r["speedup"] = r["decode_tps"] / hf["decode_tps"]
                rows.append({"system": "model_shards engine", "tp": tp, "batch": b, **r})
            print(f"done batch {b}", file=sys.stderr, flush=True)

    weights = a.dtype
    if a.int4:
        path = "dequantizing path" if a.int4_exact else "packed kernel"
        weights = f"INT4 experts ({path}; transformers: dequantized to float32)"
    shape = a.preset + "".join(f", {getattr(a, n)} {n}" for n in ("layers", "experts") if getattr(a, n) is not None)
    where = (f"{torch.cuda.get_device_name()}" if a.device == "cuda"
             else f"{a.threads} threads, {os.cpu_count()} CPUs")
    if a.device == "cpu" and any(tp > 1 for tp in a.tp):
        where += f", TP > 1 collectives: {a.cpu_collectives}"
    kernels = {r["kernels"] for r in rows if "kernels" in r}
    print(f"\n{shape} preset, prompt {a.prompt_len} tokens, {a.new_tokens} new tokens, greedy, {weights}, "
          f"{where}{', engine kernels: ' + '/'.join(sorted(kernels)) if kernels else ''}, best of {a.repeat} runs, "
          f"torch {torch.__version__}, 1-min load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after\n")
    memory = "peak GPU memory allocated (MB)" if a.device == "cuda" else "peak RSS (MB)"
    print(f"| system | TP | batch | TTFT (ms) | decode tok/s | decode × HF | {memory} | greedy tokens equal to HF |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['system']} | {r['tp']} | {r['batch']} | error: {r['error']} | | | | |")
            continue
        ratio = f"{r['speedup']:.2f}" if "speedup" in r else "-"
        print(f"| {r['system']} | {r['tp']} | {r['batch']} | {r['ttft_s'] * 1000:.1f} | {r['decode_tps']:.1f} | {ratio} | "
              f"{r['peak_mb']:.0f} | {r.get('same_as_hf', '-')} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "tokens"} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
