"""LLMEngine: continuous-batching generation over a RunnerGroup (one process, torch.distributed, or Ray).

A background asyncio task runs the step loop: ask the Scheduler for the next step, decide how its
finished rows are sampled (temperature, top-k/p, grammar masks, one uniform draw each: seeded requests
draw from their seed and token index), execute it on every rank (rank 0 samples next to its logits),
stream each token to its request's queue, and free slots of finished requests so waiting ones join
the batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from model_shards import torch_thread
from model_shards.engine_api import (
    Constraint,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenEvent,
    Tokenizer,
    collect,
)
from model_shards.model_runner import RunnerGroup, RunnerSpec, ShardDiedError
from model_shards.scheduler import ScheduledStep, Scheduler, StepInput
from model_shards.tokenizer import StreamDecoder

log = logging.getLogger(__name__)


@dataclass
class _Request:
    req: GenerationRequest
    queue: asyncio.Queue
    matcher: Any = None
    decoder: StreamDecoder | None = None
    text: str = ""  # decoded completion so far
    emitted: int = 0  # characters of `text` already sent
    completion_tokens: int = 0
    done: bool = False
    stop: list[str] = field(default_factory=list)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class LLMEngine:
    """Implements model_shards.engine_api.Engine.

    Args:
        runners: the model replica (LocalRunnerGroup, RayShardGroup, ...).
        tokenizer: decodes streamed tokens and compiles grammars.
        max_slots: most concurrent sequences (<= the runners' cache slots).
        max_len: most tokens per sequence, prompt included (<= the runners' cache length).
        max_prefill_tokens_per_step: prompt tokens per step (chunked prefill budget).
        prefix_reuse / min_prefix_reuse: copy cached prompt prefixes between slots.
        stop_token_ids: ids that end a request (default: the tokenizer's stop ids or its eos).
        max_shard_rebuilds: when a shard of a rebuildable group (RayShardGroup) dies, rebuild the
            replica and resume the in-flight requests, at most this many times in a row without a
            successful step in between; 0 fails the in-flight requests instead.
    """

    def __init__(
        self,
        runners: RunnerGroup,
        tokenizer: Tokenizer,
        model_name: str,
        max_slots: int | None = None,
        max_len: int | None = None,
        max_prefill_tokens_per_step: int = 512,
        prefix_reuse: bool = True,
        min_prefix_reuse: int = 16,
        stop_token_ids: list[int] | None = None,
        max_shard_rebuilds: int = 3,
    ) -> None:
        if max_shard_rebuilds < 0:
            raise ValueError(f"max_shard_rebuilds must be >= 0, got {max_shard_rebuilds}")
        max_slots = runners.num_slots if max_slots is None else max_slots
        max_len = runners.max_len if max_len is None else max_len
        if max_slots > runners.num_slots:
            raise ValueError(f"max_slots={max_slots} exceeds the runners' {runners.num_slots} cache slots")
        if max_len > runners.max_len:
            raise ValueError(f"max_len={max_len} exceeds the runners' cache length {runners.max_len}")
        if tokenizer.vocab_size > runners.cfg.vocab_size:
            raise ValueError(
                f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's vocab_size {runners.cfg.vocab_size}"
            )
        self.runners = runners
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context = max_len
        self.vocab_size = runners.cfg.vocab_size
        self.scheduler = Scheduler(max_slots, max_len, max_prefill_tokens_per_step, prefix_reuse, min_prefix_reuse)
        ids = stop_token_ids if stop_token_ids is not None else getattr(tokenizer, "stop_ids", [tokenizer.eos_id])
        self.stop_token_ids: set[int] = set(ids)
        self._requests: dict[str, _Request] = {}
        self._grammars: Any = None
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._step_lock: asyncio.Lock | None = None
        self._closed = False
        self.steps = 0  # steps executed (a metric; tests read it)
        self.max_shard_rebuilds = max_shard_rebuilds
        self.rebuilds = 0  # replicas rebuilt after a dead shard (a metric)
        self._rebuilds_in_a_row = 0

    # ---- public API ----------------------------------------------------------------------------
    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's tokens; closing the generator early aborts it and frees its slot."""
        st = await self._add(req)
        try:
            while True:
                ev = await st.queue.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if ev.finished:
                    return
        finally:
            if not st.done:
                st.done = True
                self._requests.pop(req.request_id, None)
                self.scheduler.abort(req.request_id)
                if self._wake is not None:
                    self._wake.set()

    async def complete(self, req: GenerationRequest) -> GenerationResult:
        gen = self.generate(req)
        try:
            return await collect(gen, req.request_id, len(req.prompt_ids))
        finally:
            await gen.aclose()

    async def update_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load new HF-named weights into every rank between two steps; running requests continue."""
        self._ensure_loop()
        assert self._step_lock is not None
        async with self._step_lock:
            await self.runners.update_weights(tensors)
            # Cached latents of finished requests were computed with the old weights.
            self.scheduler.invalidate_prefix_cache()

    def stats(self) -> dict[str, int]:
        """Queue and cache occupancy (for dashboards and load balancing)."""
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "free_slots": s.num_free_slots(),
            "steps": self.steps,
            "reused_prefix_tokens": s.reused_tokens,
            "rebuilds": self.rebuilds,
        }

    async def close(self) -> None:
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        for st in list(self._requests.values()):
            st.queue.put_nowait(RuntimeError("engine closed"))
        self._requests.clear()
        await self.runners.close()

    # ---- requests ------------------------------------------------------------------------------
    def _validate(self, req: GenerationRequest) -> None:
        if not isinstance(req.params, SamplingParams):
            raise TypeError(f"request {req.request_id!r}: params must be SamplingParams, got {type(req.params).__name__}")
        if req.request_id in self._requests:
            raise ValueError(f"request_id {req.request_id!r} is already running")
        bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"request {req.request_id!r}: prompt token ids {bad[:5]} are outside [0, {self.vocab_size})")
        if req.constraint is not None and not isinstance(req.constraint, Constraint):
            raise TypeError(f"request {req.request_id!r}: constraint must be a Constraint")

    async def _add(self, req: GenerationRequest) -> _Request:
        if self._closed:
            raise RuntimeError("the engine is closed")
        self._validate(req)
        self._ensure_loop()
        matcher = None
        if req.constraint is not None:
            # Building the token table and compiling a grammar can take a while on a big vocabulary:
            # do it off the event loop so running streams keep flowing.
            matcher = await asyncio.to_thread(self._matcher, req.constraint)
        st = _Request(
            req=req,
            queue=asyncio.Queue(),
            matcher=matcher,
            decoder=StreamDecoder(self.tokenizer),
            stop=[s for s in req.params.stop if s],
        )
        self.scheduler.add(req.request_id, req.prompt_ids)
        self._requests[req.request_id] = st
        assert self._wake is not None
        self._wake.set()
        return st

    def _matcher(self, constraint: Constraint) -> Any:
        if self._grammars is None:
            from model_shards.structured import GrammarCache

            # Masks are as wide as the model's logits, which may exceed the tokenizer's vocabulary.
            self._grammars = GrammarCache(self.tokenizer, vocab_size=self.vocab_size)
        return self._grammars.matcher(constraint)

    # ---- the step loop -------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._step_lock = asyncio.Lock()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None and self._step_lock is not None
        while not self._closed:
            if not self.scheduler.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._step_lock:
                ran = await self._step()
            if not ran:
                # Nothing runnable (only aborted requests were left): wait for news instead of spinning.
                self._wake.clear()
                if self.scheduler.has_work():
                    await self._wake.wait()
            await asyncio.sleep(0)  # let consumers read and new requests arrive between steps

    async def _step(self) -> bool:
        step = self.scheduler.schedule()
        if step is None:
            return False
        try:
            # Built on the torch thread, like the steps: masks over a big vocabulary are not small torch work.
            inp, sampled = await torch_thread.run(self._step_input, step)
            out = await self.runners.execute(inp)
        except ShardDiedError as e:
            if not await self._rebuild_replica(e):
                log.exception("engine step failed")
                self._fail_running(e)
            return True
        except Exception as e:  # a bad checkpoint, a broken runner: fail the requests, keep serving
            log.exception("engine step failed")
            self._fail_running(e)
            return True
        self._rebuilds_in_a_row = 0
        self.scheduler.commit(step)
        self.steps += 1
        try:
            for st, tok, logprob in zip(sampled, out.token_ids, out.logprobs, strict=True):
                if not st.done:  # a request closed while its step ran gets nothing more
                    self._on_token(st, tok, logprob)
        except Exception as e:
            log.exception("emitting the step's tokens failed")
            self._fail_running(e)
        return True

    async def _rebuild_replica(self, err: ShardDiedError) -> bool:
        """Replace a replica that lost a shard and requeue its in-flight requests; False when the group
        cannot be rebuilt. Runs under the step lock, so weight updates and new requests wait for it.
        Requests keep their generated tokens and grammar state: the new replica
        recomputes prompt + generated tokens and decoding resumes where it stopped (nothing is
        streamed twice; a seeded request's draws depend only on its seed and token index)."""
        rebuild = getattr(self.runners, "rebuild", None)
        if rebuild is None or self.max_shard_rebuilds == 0:
            return False
        last: Exception = err
        while self._rebuilds_in_a_row < self.max_shard_rebuilds:
            self._rebuilds_in_a_row += 1
            log.warning("%s: rebuilding the model replica (attempt %d of %d)", last, self._rebuilds_in_a_row,
                        self.max_shard_rebuilds)
            try:
                # create() blocks on Ray; off the event loop, so streams and new requests keep flowing.
                self.runners = await asyncio.to_thread(rebuild)
            except Exception as e:
                log.exception("rebuilding the model replica failed")
                last = e
                continue
            self.rebuilds += 1
            self.scheduler.requeue_running()
            return True
        self._fail_running(RuntimeError(
            f"gave up rebuilding the model replica after {self.max_shard_rebuilds} attempts without a "
            f"successful step; first error: {err}; last error: {last}"
        ))
        self._rebuilds_in_a_row = 0  # a later request gets a fresh set of attempts
        return True

    def _fail_running(self, err: Exception) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            st = self._requests.pop(seq.request_id, None)
            self.scheduler.finish(seq.request_id)
            if st is not None and not st.done:
                st.done = True
                st.queue.put_nowait(RuntimeError(f"engine step failed: {err}"))

    def _step_input(self, step: ScheduledStep) -> tuple[StepInput, list[_Request]]:
        """The step for the ranks, with how to sample each sequence that ends its tokens in it; and the
        requests those samples go to, in row order."""
        from model_shards.sampling import SampleSpec, seeded_uniform

        inp = step.to_input()
        rows: list[int] = []
        states: list[_Request] = []
        for i, e in enumerate(step.entries):
            st = self._requests.get(e.seq.request_id)
            if e.sample and st is not None and not st.done and not e.seq.aborted:
                rows.append(i)
                states.append(st)
        if not rows:
            return inp, []
        uniform = torch.rand(len(rows), dtype=torch.float64)  # unseeded rows: torch's global generator
        for k, st in enumerate(states):
            if st.req.params.seed is not None:
                uniform[k] = seeded_uniform(st.req.params.seed, st.completion_tokens)
        allowed = None
        if any(st.matcher is not None for st in states):
            allowed = torch.ones(len(rows), self.vocab_size, dtype=torch.bool)
            for k, st in enumerate(states):
                if st.matcher is not None:
                    allowed[k] = False
                    st.matcher.fill_allowed(allowed[k])
        inp.sample = SampleSpec.build(rows, [st.req.params for st in states], uniform, allowed)
        return inp, states

    def _on_token(self, st: _Request, tok: int, logprob: float) -> None:
        rid = st.req.request_id
        params = st.req.params
        seq = self.scheduler.append_token(rid, tok)
        st.completion_tokens += 1
        reason: str | None = None
        flush = False  # the request ends without a stop string: emit everything still held back
        if st.matcher is not None:
            st.matcher.accept(tok)
        if tok in self.stop_token_ids:
            reason, flush = "stop", True
        else:
            assert st.decoder is not None
            st.text += st.decoder.push(tok)
            cut = self._find_stop(st)
            if cut >= 0:
                st.text = st.text[:cut]
                reason = "stop"
        if reason is None:
            if st.matcher is not None and st.matcher.is_terminated():
                reason, flush = "stop", True
            elif st.completion_tokens >= params.max_tokens or seq.num_tokens >= self.max_context:
                reason, flush = "length", True
        if flush:
            assert st.decoder is not None
            st.text += st.decoder.flush()
        end = len(st.text) if reason is not None else len(st.text) - _held_back(st.text, st.stop)
        delta = st.text[st.emitted : end] if end > st.emitted else ""
        st.emitted = max(st.emitted, end)
        ev = TokenEvent(
            request_id=rid,
            token_id=tok,
            text=delta,
            logprob=logprob if params.logprobs else None,
            finished=reason is not None,
            finish_reason=reason,
        )
        st.queue.put_nowait(ev)
        if reason is not None:
            st.done = True
            self._requests.pop(rid, None)
            self.scheduler.finish(rid)

    @staticmethod
    def _find_stop(st: _Request) -> int:
        """Index in st.text where the earliest stop string starts, or -1."""
        if not st.stop:
            return -1
        longest = max(len(s) for s in st.stop)
        # Only text that arrived since the last emit (plus a stop's length back) can hold a new match.
        start = max(0, st.emitted - longest)
        hits = [i for i in (st.text.find(s, start) for s in st.stop) if i >= 0]
        return min(hits) if hits else -1


def build_engine(
    spec: RunnerSpec,
    tp: int = 1,
    *,
    tokenizer: str = "byte",
    model_name: str = "kimi-k2",
    use_ray: bool = True,
    num_cpus_per_shard: float = 1.0,
    shard_resources: Mapping[str, float] | None = None,
    **engine_kwargs: Any,
) -> LLMEngine:
    """An LLMEngine over a model built from `spec`: in this process for tp == 1; else T Ray shards
    (use_ray) or T local processes joined by torch.distributed (this process is rank 0).

    tokenizer: "byte", "byte:VOCAB", or a directory with Kimi's tiktoken.model.
    shard_resources: custom Ray resources added to each shard's bundle (Ray shards only, tp > 1).
    """
    from model_shards.model_runner import LocalRunnerGroup
    from model_shards.tokenizer import load_tokenizer

    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    tok = load_tokenizer(tokenizer)
    runners: RunnerGroup
    if tp == 1:
        runners = LocalRunnerGroup.build(spec)
    elif use_ray:
        import ray

        from model_shards.shards import RayShardGroup

        if not ray.is_initialized():
            ray.init()
        runners = RayShardGroup.create(spec, tp, num_cpus_per_shard=num_cpus_per_shard, bundle_resources=shard_resources)
    else:
        from model_shards.model_runner import DistributedRunnerGroup

        runners = DistributedRunnerGroup(spec, tp, threads_per_rank=int(max(1, num_cpus_per_shard)))
    if tp > 1:
        log.info("TP=%d shards built; their collectives run on %s", tp, getattr(runners, "collectives", "?"))
    return LLMEngine(runners, tok, model_name, **engine_kwargs)
