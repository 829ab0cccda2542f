"""Serve a model over the OpenAI-compatible HTTP API: `python -m model_shards.serve --preset small`.

Builds an LLMEngine (in-process for tp == 1; T Ray shards for tp > 1) and runs
model_shards.server.create_openai_app on it with uvicorn.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from model_shards.model_runner import CPU_COLLECTIVES, RunnerSpec


def default_tokenizer(checkpoint: str | None) -> str:
    """Kimi's tiktoken vocabulary when the checkpoint ships one, else the byte tokenizer."""
    if checkpoint is not None and (Path(checkpoint) / "tiktoken.model").is_file():
        return checkpoint
    return "byte"


def make_engine(
    preset: str | None,
    checkpoint: str | None,
    tp: int,
    use_ray: bool = True,
    *,
    tokenizer: str | None = None,
    model_name: str | None = None,
    num_slots: int = 64,
    max_len: int = 2048,
    dtype: str = "float32",
    device: str = "cpu",
    int4_exact: bool = False,
    cpu_collectives: str = "shared_memory",
    **engine_kwargs: Any,
) -> Any:
    from model_shards.engine import build_engine

    spec = RunnerSpec(preset=preset, checkpoint=checkpoint, num_slots=num_slots, max_len=max_len, dtype=dtype, device=device,
                      int4_exact=int4_exact, cpu_collectives=cpu_collectives)
    name = model_name or (Path(checkpoint).name if checkpoint else f"kimi-k2-{preset}")
    return build_engine(
        spec, tp, tokenizer=tokenizer or default_tokenizer(checkpoint), model_name=name, use_ray=use_ray, **engine_kwargs
    )


def serve(
    preset: str | None,
    checkpoint: str | None,
    tp: int,
    host: str,
    port: int,
    use_ray: bool = True,
    **kwargs: Any,
) -> None:
    """Build the engine and serve it until interrupted."""
    import uvicorn

    from model_shards.server import create_openai_app

    engine = make_engine(preset, checkpoint, tp, use_ray, **kwargs)
    if tp > 1:
        print(f"{tp} shards ready; their collectives run on {getattr(engine.runners, 'collectives', '?')}", flush=True)
    app = create_openai_app(engine, engine.model_name)
    uvicorn.run(app, host=host, port=port, log_level="info")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve a Kimi-K2-architecture model over the OpenAI chat API")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="random-initialised preset: tiny, small, kimi-k2")
    src.add_argument("--checkpoint", help="HF-layout checkpoint directory")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-ray", action="store_true", help="tp must be 1")
    p.add_argument("--tokenizer", default=None, help='"byte", "byte:VOCAB" or a dir with tiktoken.model')
    p.add_argument("--model-name", default=None)
    p.add_argument("--num-slots", type=int, default=64)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--int4-exact", action="store_true",
                   help="INT4 checkpoint on CPU: dequantize the experts instead of the packed int4 kernel")
    p.add_argument("--cpus-per-shard", type=int, default=1,
                   help="tp > 1: Ray CPUs each shard reserves and the torch threads it runs")
    p.add_argument("--cpu-collectives", default="shared_memory", choices=list(CPU_COLLECTIVES),
                   help="tp > 1 on CPU: how the shards exchange partial sums")
    a = p.parse_args(argv)
    if a.int4_exact and a.preset:
        p.error("--int4-exact applies to INT4 checkpoints, not presets")
    serve(
        a.preset,
        a.checkpoint,
        a.tp,
        a.host,
        a.port,
        use_ray=not a.no_ray,
        tokenizer=a.tokenizer,
        model_name=a.model_name,
        num_slots=a.num_slots,
        max_len=a.max_len,
        dtype=a.dtype,
        device=a.device,
        int4_exact=a.int4_exact,
        cpu_collectives=a.cpu_collectives,
        num_cpus_per_shard=float(max(1, a.cpus_per_shard)),
    )


if __name__ == "__main__":
    main()
