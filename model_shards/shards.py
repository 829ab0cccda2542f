"""Ray placement and supervision of tensor-parallel shards, and the engine host actor.

`RayShardGroup` puts T `ShardActor`s (one ModelRunner each) in one STRICT_PACK placement group,
initialises torch.distributed between them (gloo on CPU, nccl on GPU) and steps them in lockstep:
every rank gets the same StepInput, only rank 0 returns logits. A shard that dies is reported as
`ShardDiedError` (model_runner) naming its rank, and the group refuses further steps instead of hanging.

`EngineHost` is an async Ray actor that owns an LLMEngine; `launch_engine_actor` starts it under a
name so clients in the cluster (swarm.llm_engine.EngineChatClient) reach it without HTTP.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from model_shards.config import ModelConfig
from model_shards.engine_api import Constraint, GenerationRequest, GenerationResult, SamplingParams
from model_shards.model_runner import (
    ModelRunner,
    RunnerSpec,
    ShardDiedError,
    StepOutput,
    collectives_name,
    free_port,
    init_distributed,
)
from model_shards.scheduler import StepInput


class ShardActor:
    """One TP rank in its own process (wrapped with ray.remote by RayShardGroup)."""

    def __init__(self, rank: int, world_size: int, spec: RunnerSpec, num_threads: int) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.rank = rank
        self.world_size = world_size
        self.spec = spec
        self.runner: ModelRunner | None = None

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, init_method: str, backend: str | None, timeout_s: float) -> dict[str, Any]:
        group = None
        if self.world_size > 1:
            group = init_distributed(self.rank, self.world_size, init_method, backend, timeout_s, self.spec.device,
                                     self.spec.cpu_collectives)
        self.runner = ModelRunner.build(self.spec, self.rank, self.world_size, group)
        return {"config": self.runner.cfg.to_hf_dict(), "pid": os.getpid(), "collectives": collectives_name(group)}

    def execute(self, step: StepInput) -> StepOutput | None:
        assert self.runner is not None, "setup() was not called"
        out = self.runner.execute(step)
        return out if self.rank == 0 else None  # rank 0 sampled the tokens

    def update_weights(self, tensors: Mapping[str, torch.Tensor]) -> int:
        assert self.runner is not None, "setup() was not called"
        self.runner.update_weights(tensors)
        return self.rank

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this shard's process (Linux reports ru_maxrss in KiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RayShardGroup:
    """T ranks of one model replica on Ray; implements model_shards.model_runner.RunnerGroup."""

    def __init__(self, actors: list[Any], pg: Any, cfg: ModelConfig, spec: RunnerSpec) -> None:
        self.actors = actors
        self.pg = pg
        self.cfg = cfg
        self.spec = spec
        self.tp_size = len(actors)
        self.num_slots = spec.num_slots
        self.max_len = spec.max_len
        self._dead: str | None = None
        self.collectives = "none"  # what the ranks' collectives run on (collectives_name), set by create()
        # How create() was called, and every weight hot-loaded since: what rebuild() needs to make
        # an identical replica.
        self._create_kwargs: dict[str, Any] = {}
        self._applied: dict[str, torch.Tensor] = {}

    @classmethod
    def create(
        cls,
        spec: RunnerSpec,
        tp: int,
        *,
        num_cpus_per_shard: float = 1.0,
        use_gpu: bool | None = None,
        backend: str | None = None,
        ready_timeout_s: float = 300.0,
        collective_timeout_s: float = 120.0,
        bundle_resources: Mapping[str, float] | None = None,
    ) -> "RayShardGroup":
        """Reserve T bundles on one node (STRICT_PACK), start the shards, join them in one process group.
        `bundle_resources` adds custom resources to every shard's bundle (e.g. {"swarm_model": 1},
        so replicas land only on the nodes meant for them)."""
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        if not ray.is_initialized():
            raise RuntimeError("RayShardGroup.create needs a running Ray (call ray.init() first)")
        use_gpu = spec.device.startswith("cuda") if use_gpu is None else use_gpu
        bundle: dict[str, float] = {"CPU": num_cpus_per_shard}
        if use_gpu:
            bundle["GPU"] = 1
        bundle.update(bundle_resources or {})
        pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK")
        try:
            ray.get(pg.ready(), timeout=ready_timeout_s)
        except GetTimeoutError:
            remove_placement_group(pg)
            raise RuntimeError(
                f"could not place {tp} shards of {bundle} on one node within {ready_timeout_s:.0f}s "
                f"(cluster resources: {ray.available_resources()})"
            ) from None
        remote_cls = ray.remote(ShardActor)
        actors = [
            remote_cls.options(
                num_cpus=num_cpus_per_shard,
                num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=r),
                max_restarts=0,
            ).remote(r, tp, spec, int(max(1, num_cpus_per_shard)))
            for r in range(tp)
        ]
        try:
            ip, port = ray.get(actors[0].address.remote(), timeout=ready_timeout_s)
            infos = ray.get(
                [a.setup.remote(f"tcp://{ip}:{port}", backend, collective_timeout_s) for a in actors],
                timeout=ready_timeout_s,
            )
        except Exception:
            for a in actors:
                ray.kill(a)
            remove_placement_group(pg)
            raise
        cfg = ModelConfig.from_hf_dict(infos[0]["config"])
        group = cls(actors, pg, cfg, spec)
        group.collectives = infos[0]["collectives"]
        group._create_kwargs = {
            "num_cpus_per_shard": num_cpus_per_shard,
            "use_gpu": use_gpu,
            "backend": backend,
            "ready_timeout_s": ready_timeout_s,
            "collective_timeout_s": collective_timeout_s,
            "bundle_resources": dict(bundle_resources or {}),
        }
        return group

    def rebuild(self) -> RayShardGroup:
        """Tear this group down and start a fresh one from the same spec and placement options, with
        every weight hot-loaded into this one re-applied. Blocking (run it off the event loop)."""
        self.shutdown()
        fresh = RayShardGroup.create(self.spec, self.tp_size, **self._create_kwargs)
        if self._applied:
            try:
                ref = ray.put(dict(self._applied))
                ray.get([a.update_weights.remote(ref) for a in fresh.actors],
                        timeout=self._create_kwargs.get("ready_timeout_s", 300.0))
            except Exception:
                fresh.shutdown()
                raise
            fresh._applied = dict(self._applied)
        return fresh

    def _check(self) -> None:
        if self._dead is not None:
            raise ShardDiedError(self._dead)

    async def _all(self, refs: list[Any]) -> list[Any]:
        """Await every rank's result; the first dead shard fails the call at once (no waiting on the
        survivors, which would block in a collective until its timeout)."""
        tasks = [asyncio.ensure_future(r) for r in refs]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for rank, t in enumerate(tasks):
                if t.done() and t.exception() is not None:
                    err = t.exception()
                    if isinstance(err, RayActorError):
                        self._dead = f"shard rank {rank} of {self.tp_size} died: {type(err).__name__}: {err}"
                        for p in pending:
                            p.cancel()
                        self._kill_all()
                        raise ShardDiedError(self._dead) from err
                    raise err
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()

    async def execute(self, step: StepInput) -> StepOutput:
        self._check()
        results = await self._all([a.execute.remote(step) for a in self.actors])
        return results[0]

    async def update_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._check()
        ref = ray.put(dict(tensors))  # one copy in the object store, read by every rank
        await self._all([a.update_weights.remote(ref) for a in self.actors])
        self._applied.update(tensors)  # latest value of each name, for rebuild()

    def _kill_all(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass

    async def close(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self._kill_all()
        try:
            remove_placement_group(self.pg)
        except Exception:
            pass
        if self._dead is None:
            self._dead = "the shard group was shut down"


class EngineHost:
    """An LLMEngine inside an async Ray actor (wrapped with ray.remote by launch_engine_actor)."""

    def __init__(self, spec: RunnerSpec, tp: int, tokenizer: str, model_name: str, engine_kwargs: dict[str, Any]) -> None:
        from model_shards.engine import build_engine

        self.engine = build_engine(spec, tp=tp, tokenizer=tokenizer, model_name=model_name, use_ray=True, **engine_kwargs)

    async def complete(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        constraint: Constraint | None = None,
        request_id: str | None = None,
    ) -> GenerationResult:
        """Generate for a prompt (text with special tokens, or ids)."""
        import uuid

        ids = self.engine.tokenizer.encode(prompt, allow_special=True) if isinstance(prompt, str) else list(prompt)
        rid = request_id or "req-" + uuid.uuid4().hex[:12]
        return await self.engine.complete(GenerationRequest(request_id=rid, prompt_ids=ids, params=params, constraint=constraint))

    async def complete_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        params: SamplingParams,
        constraint: Constraint | None = None,
    ) -> GenerationResult:
        """Generate the assistant turn for OpenAI-format messages, rendered with Kimi K2's chat template.
        Only the template's own markers become control tokens; message text never does."""
        from model_shards.chat_template import encode_chat

        return await self.complete(encode_chat(self.engine.tokenizer, messages, tools), params, constraint)

    async def update_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        await self.engine.update_weights(tensors)

    def info(self) -> dict[str, Any]:
        return {
            "model_name": self.engine.model_name,
            "max_context": self.engine.max_context,
            "tp": self.engine.runners.tp_size,
            "vocab_size": self.engine.vocab_size,
            **self.engine.stats(),
        }

    async def close(self) -> None:
        await self.engine.close()


def launch_engine_actor(
    name: str,
    spec: RunnerSpec,
    tp: int = 1,
    *,
    tokenizer: str = "byte",
    model_name: str = "kimi-k2",
    num_cpus: float = 1.0,
    namespace: str | None = None,
    detached: bool = False,
    **engine_kwargs: Any,
) -> Any:
    """Start a named EngineHost actor (the target of LLMConfig.engine_actor) and wait until it is ready.

    With tp > 1 the host places its shards in their own placement group; with tp == 1 the model runs
    inside the host actor.
    """
    opts: dict[str, Any] = {"name": name, "num_cpus": num_cpus if tp == 1 else 0, "max_concurrency": 1000}
    if namespace is not None:
        opts["namespace"] = namespace
    if detached:
        opts["lifetime"] = "detached"
    actor = ray.remote(EngineHost).options(**opts).remote(spec, tp, tokenizer, model_name, engine_kwargs)
    ray.get(actor.info.remote())
    return actor
