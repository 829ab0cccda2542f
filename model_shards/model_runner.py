"""One tensor-parallel rank: the model's slice plus its latent KV cache, executing scheduled steps.

A `RunnerGroup` is what the engine drives: every rank executes the same `StepInput` in lockstep
(their collectives pair up) and rank 0 samples the step's tokens, which come back.
`LocalRunnerGroup` is the single-process TP=1 group; `DistributedRunnerGroup` runs T ranks as local
processes joined by torch.distributed (no Ray); `model_shards.shards.RayShardGroup` places T ranks in
Ray actors.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from model_shards import torch_thread
from model_shards.config import ModelConfig
from model_shards.scheduler import StepInput
from model_shards.shm_collectives import SharedMemoryGroup

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_COLLECTIVES = ("shared_memory", "gloo")


@dataclass
class RunnerSpec:
    """How to build a rank's model: a checkpoint directory, or a preset initialised from `seed`."""

    preset: str | None = None
    checkpoint: str | None = None
    seed: int = 0
    dtype: str = "float32"
    num_slots: int = 64
    max_len: int = 2048
    expert_layout: str = "ep"
    device: str = "cpu"
    # INT4 checkpoints on CPU: dequantize the experts (exact) instead of ATen's packed kernel (bf16 activations)
    int4_exact: bool = False
    # TP > 1 on CPU: "shared_memory" (ranks on one host exchange partial sums through /dev/shm) or "gloo"
    cpu_collectives: str = "shared_memory"

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("RunnerSpec needs exactly one of 'preset' or 'checkpoint'")
        if self.dtype not in _DTYPES:
            raise ValueError(f"RunnerSpec.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.expert_layout not in ("ep", "tp"):
            raise ValueError(f"RunnerSpec.expert_layout must be 'ep' or 'tp', got {self.expert_layout!r}")
        if self.int4_exact and self.checkpoint is None:
            raise ValueError("RunnerSpec.int4_exact applies to INT4 checkpoints; a preset has full-precision experts")
        if self.cpu_collectives not in CPU_COLLECTIVES:
            raise ValueError(f"RunnerSpec.cpu_collectives must be one of {CPU_COLLECTIVES}, got {self.cpu_collectives!r}")
        if self.num_slots < 1 or self.max_len < 2:
            raise ValueError(f"RunnerSpec needs num_slots >= 1 and max_len >= 2, got {self.num_slots}, {self.max_len}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_distributed(
    rank: int,
    world_size: int,
    init_method: str,
    backend: str | None = None,
    timeout_s: float = 120.0,
    device: str = "cpu",
    cpu_collectives: str = "shared_memory",
) -> object:
    """Join the default process group (gloo for CPU tensors, nccl for CUDA ones); collectives time out
    after timeout_s so a rank whose peer died fails instead of hanging forever.

    Returns the group for the model's collectives: on CPU with cpu_collectives="shared_memory", a
    SharedMemoryGroup when every rank is on this host (gloo's loopback TCP costs ~0.5 ms per collective
    on small machines), else the process group itself."""
    import torch.distributed as dist

    if cpu_collectives not in CPU_COLLECTIVES:
        raise ValueError(f"cpu_collectives must be one of {CPU_COLLECTIVES}, got {cpu_collectives!r}")
    if device == "cuda":
        # "cuda" means the current device: make it this rank's GPU before NCCL and the model touch one.
        torch.cuda.set_device(cuda_index_for_rank(rank, world_size, torch.cuda.device_count()))
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    if backend == "gloo" and cpu_collectives == "shared_memory" and world_size > 1:
        shm = SharedMemoryGroup.join(dist.group.WORLD, rank, world_size, timeout_s)
        if shm is not None:
            return shm
    return dist.group.WORLD


def cuda_index_for_rank(rank: int, world_size: int, visible: int) -> int:
    """The GPU a rank uses when its device is plain "cuda". A Ray shard sees only the GPU Ray gave it
    (visible == 1); ranks started side by side on one machine (DistributedRunnerGroup) see them all and
    take one each."""
    if visible < 1:
        raise RuntimeError("device 'cuda' was asked for, but torch sees no GPU in this process")
    if visible == 1:
        return 0
    if world_size > visible:
        raise ValueError(f"TP={world_size} on CUDA needs a GPU per rank; this process sees {visible}")
    return rank


def collectives_name(group: object) -> str:
    """What a model built with `group` runs its collectives on: "shared_memory", "gloo", "nccl", or "none"
    (no group: TP=1)."""
    import torch.distributed as dist

    if group is None:
        return "none"
    if isinstance(group, SharedMemoryGroup):
        return "shared_memory"
    return str(dist.get_backend(group))


def build_model(
    spec: RunnerSpec, tp_rank: int = 0, tp_size: int = 1, group: object = None
) -> tuple[ModelConfig, torch.nn.Module]:
    """The rank's model slice, in eval mode on spec.device."""
    from model_shards.model import KimiK2ForCausalLM

    if spec.checkpoint is not None:
        from model_shards.checkpoint import load_checkpoint

        cfg, model = load_checkpoint(
            spec.checkpoint,
            tp_rank=tp_rank,
            tp_size=tp_size,
            expert_layout=spec.expert_layout,  # type: ignore[arg-type]
            dtype=spec.torch_dtype,
            group=group,
            device=spec.device,
        )
    else:
        assert spec.preset is not None
        cfg = ModelConfig.preset(spec.preset)
        # Every rank builds the same full model from the seed and keeps its slice, so TP=T serves
        # exactly the weights TP=1 would.
        torch.manual_seed(spec.seed)
        full = KimiK2ForCausalLM(cfg, dtype=spec.torch_dtype)
        if tp_size == 1:
            model = full
        else:
            model = KimiK2ForCausalLM(
                cfg, tp_rank, tp_size, group, spec.expert_layout, dtype=spec.torch_dtype, init=False  # type: ignore[arg-type]
            )
            model.load_state_dict_hf(full.hf_state_dict(), strict=True)
            del full
    model = model.to(device=spec.device).eval()
    if spec.int4_exact:
        if not cfg.int4_experts:
            raise ValueError(f"int4_exact applies to INT4 checkpoints; {spec.checkpoint} has full-precision experts")
        model.int4_exact = True
    return cfg, model


@dataclass
class StepOutput:
    """What a step sends back: the sampled token and its logprob for each row of `StepInput.sample`."""

    token_ids: list[int]
    logprobs: list[float]


class ModelRunner:
    """A rank's model and LatentKVCache; `execute` runs one scheduled step and returns its sampled tokens."""

    def __init__(self, cfg: ModelConfig, model: torch.nn.Module, spec: RunnerSpec, tp_rank: int = 0, tp_size: int = 1):
        from model_shards.model import LatentKVCache

        self.cfg = cfg
        self.model = model
        self.spec = spec
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.device = torch.device(spec.device)
        self.cache = LatentKVCache(cfg, spec.num_slots, spec.max_len, spec.torch_dtype, self.device)

    @classmethod
    def build(cls, spec: RunnerSpec, tp_rank: int = 0, tp_size: int = 1, group: object = None) -> "ModelRunner":
        cfg, model = build_model(spec, tp_rank, tp_size, group)
        return cls(cfg, model, spec, tp_rank, tp_size)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        """Copy reused prefixes, run the forward, sample the rows `step.sample` names (next to the logits,
        on this rank's device): one token and its logprob per row go back, not the logits."""
        from model_shards.sampling import sample_rows

        logits = self.forward(step)
        spec = step.sample
        if spec is None or len(spec) == 0 or self.tp_rank != 0:  # every rank has the logits; rank 0 answers
            return StepOutput([], [])
        tokens, logprobs = sample_rows(logits[spec.rows.to(logits.device)], spec)
        return StepOutput(tokens.tolist(), logprobs.tolist())

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Copy reused prefixes, run the forward; [S, vocab] fp32 logits on this rank's device (every rank
        holds the full logits)."""
        from model_shards.model import ForwardBatch

        for src, dst, n in step.copies:
            self.cache.copy_prefix(src, dst, n)
        if step.num_seqs == 0:
            return torch.empty(0, self.cfg.vocab_size, dtype=torch.float32, device=self.device)
        dev = self.device
        batch = ForwardBatch(
            input_ids=step.input_ids.to(dev),
            positions=step.positions.to(dev),
            cu_seqlens=step.cu_seqlens.to(dev),
            cache_slots=step.cache_slots.to(dev),
            context_lens=step.context_lens.to(dev),
        )
        return self.model(batch, self.cache).float()

    @torch.inference_mode()
    def update_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load HF-named full tensors in place (each rank keeps its slice); the model keeps running."""
        if not tensors:
            raise ValueError("update_weights got no tensors")
        self.model.load_state_dict_hf({k: v.to(self.device) for k, v in tensors.items()})


@runtime_checkable
class RunnerGroup(Protocol):
    """All ranks of one model replica, stepped in lockstep; the engine's only view of the model."""

    cfg: ModelConfig
    tp_size: int
    num_slots: int
    max_len: int

    async def execute(self, step: StepInput) -> StepOutput: ...

    async def update_weights(self, tensors: Mapping[str, torch.Tensor]) -> None: ...

    async def close(self) -> None: ...


class LocalRunnerGroup:
    """TP=1 in this process. The model is built and stepped on the process's torch thread
    (model_shards.torch_thread), so the event loop keeps serving streams and runs no torch work."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.cfg = runner.cfg
        self.tp_size = 1
        self.num_slots = runner.spec.num_slots
        self.max_len = runner.spec.max_len

    @classmethod
    def build(cls, spec: RunnerSpec) -> "LocalRunnerGroup":
        return cls(torch_thread.call(ModelRunner.build, spec))

    async def execute(self, step: StepInput) -> StepOutput:
        return await torch_thread.run(self.runner.execute, step)

    async def update_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        await torch_thread.run(self.runner.update_weights, tensors)

    async def close(self) -> None:
        return None


class ShardDiedError(RuntimeError):
    """A rank of a runner group died; the group cannot step any more."""


def _dist_worker(rank: int, world_size: int, spec: RunnerSpec, init_method: str, timeout_s: float, threads: int,
                 commands: Any) -> None:
    """Rank > 0 of a DistributedRunnerGroup: build the slice, then run rank 0's commands as they come.

    Commands arrive over a pipe from rank 0, not through a collective: a collective waiting for the next
    command would time out (and kill the rank) whenever the engine sat idle for `timeout_s`."""
    import os
    import pickle

    import torch.distributed as dist

    torch.set_num_threads(max(1, threads))
    parent = os.getppid()
    group = init_distributed(rank, world_size, init_method, None, timeout_s, spec.device, spec.cpu_collectives)
    runner = ModelRunner.build(spec, rank, world_size, group)
    while True:
        try:
            if not commands.poll(1.0):
                if os.getppid() != parent:  # rank 0's process is gone: nobody will send a command again
                    break
                continue
            cmd = pickle.loads(commands.recv_bytes())
        except EOFError:
            break
        if cmd[0] == "step":
            runner.execute(cmd[1])
        elif cmd[0] == "update":
            runner.update_weights(cmd[1])
        else:
            break
    dist.destroy_process_group()


class DistributedRunnerGroup:
    """TP ranks as plain processes joined by torch.distributed, no Ray: rank 0 lives in this process and
    sends every command (step, weight update, stop) to the others over a pipe each; they run
    `_dist_worker`. The model's collectives pair up as the ranks execute the same step.

    This process joins the default process group as rank 0, so use one group per process.
    """

    def __init__(self, spec: RunnerSpec, tp: int, timeout_s: float = 120.0, threads_per_rank: int = 1) -> None:
        import multiprocessing as mp

        if tp < 2:
            raise ValueError(f"DistributedRunnerGroup is for tp >= 2 (use LocalRunnerGroup for 1), got {tp}")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe(duplex=False) for _ in range(1, tp)]  # (receiving end, sending end)
        self._senders = [send for _, send in pipes]
        self.procs = [
            ctx.Process(target=_dist_worker, args=(r, tp, spec, init_method, timeout_s, threads_per_rank, recv),
                        daemon=True)
            for r, (recv, _) in zip(range(1, tp), pipes)
        ]
        for p in self.procs:
            p.start()
        # Rank 0's model lives on this process's torch thread, like a LocalRunnerGroup's.
        group = init_distributed(0, tp, init_method, None, timeout_s, spec.device, spec.cpu_collectives)
        self.runner = torch_thread.call(ModelRunner.build, spec, 0, tp, group)
        self.collectives = collectives_name(group)
        self.cfg = self.runner.cfg
        self.tp_size = tp
        self.num_slots = spec.num_slots
        self.max_len = spec.max_len
        self._dead: str | None = None

    def _broadcast(self, cmd: tuple) -> None:
        import pickle

        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                self._dead = f"rank {rank} of {self.tp_size} (pid {p.pid}) exited with code {p.exitcode}"
        if self._dead is not None:
            raise ShardDiedError(self._dead)
        data = pickle.dumps(cmd)  # once, however many ranks
        for rank, send in enumerate(self._senders, start=1):
            try:
                send.send_bytes(data)
            except OSError as e:  # the rank exited since the check above
                self._dead = f"rank {rank} of {self.tp_size} exited ({e})"
                raise ShardDiedError(self._dead) from e

    def _execute(self, step: StepInput) -> StepOutput:
        self._broadcast(("step", step))
        return self.runner.execute(step)

    def _update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._broadcast(("update", dict(tensors)))
        self.runner.update_weights(tensors)

    async def execute(self, step: StepInput) -> StepOutput:
        return await torch_thread.run(self._execute, step)

    async def update_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        await torch_thread.run(self._update, tensors)

    async def close(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self._dead is None:
            try:
                self._broadcast(("stop",))
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        for send in self._senders:
            send.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        self._dead = self._dead or "the runner group was shut down"
