"""Request queue and continuous-batching scheduler over a fixed set of KV-cache slots.

Pure bookkeeping (no torch model): each call to `Scheduler.schedule()` says which tokens of which
sequences the model runs next. Sequences join the running batch as soon as a slot is free and
leave it when they finish, between any two steps (continuous batching). Decodes (one token per
running sequence) always run; prompt tokens are added in chunks up to a per-step token budget
(chunked prefill), so a long prompt never stalls the decodes of others. A prompt whose prefix is
already in some slot's cache (a shared system prompt, the previous turn of a conversation) starts
from a copy of that prefix (`LatentKVCache.copy_prefix`) instead of recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model_shards.sampling import SampleSpec


@dataclass(eq=False)  # identity semantics: membership tests must not compare token lists
class Sequence:
    """One request's token state. `num_cached` tokens of `prompt_ids + output_ids` are in the cache."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    num_cached: int = 0
    reused_prefix: int = 0  # prompt tokens taken from another slot instead of computed
    shareable: bool = True  # False once a weight update made part of its cache stale
    aborted: bool = False
    finished: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, start: int, n: int) -> list[int]:
        p = len(self.prompt_ids)
        if start + n <= p:
            return self.prompt_ids[start : start + n]
        if start >= p:  # decode: no need to join the whole history
            return self.output_ids[start - p : start - p + n]
        return (self.prompt_ids + self.output_ids)[start : start + n]

    def cached_tokens(self) -> list[int]:
        return (self.prompt_ids + self.output_ids)[: self.num_cached]


@dataclass(eq=False)
class StepEntry:
    """The tokens of one sequence in a step: positions [start, start + n); sample when it reaches the end."""

    seq: Sequence
    start: int
    n: int
    sample: bool


@dataclass
class StepInput:
    """What every model rank executes for one step (picklable: it travels to Ray shard actors).

    `copies` (src_slot, dst_slot, length) run before the forward; the tensors follow ForwardBatch.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [S+1] int64
    cache_slots: torch.Tensor  # [S] int64
    context_lens: torch.Tensor  # [S] int64
    copies: list[tuple[int, int, int]] = field(default_factory=list)
    sample: SampleSpec | None = None  # the sequences to sample a token for after the forward, and how

    @property
    def num_seqs(self) -> int:
        return int(self.cache_slots.numel())

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickled as numpy arrays: Ray ships a step to every shard every step, and its serializer for
        # torch tensors cost ~0.9 ms per shard call on the dev machine, against ~0.1 ms for these.
        arrays = tuple(t.cpu().numpy() for t in (self.input_ids, self.positions, self.cu_seqlens,
                                                 self.cache_slots, self.context_lens))
        return (_step_input_from_arrays, (arrays, list(self.copies), self.sample))


def _step_input_from_arrays(arrays: tuple[Any, ...], copies: list[tuple[int, int, int]],
                            sample: SampleSpec | None = None) -> StepInput:
    return StepInput(*(torch.from_numpy(np.array(a, dtype=np.int64)) for a in arrays), copies=copies, sample=sample)


@dataclass
class ScheduledStep:
    entries: list[StepEntry]
    copies: list[tuple[int, int, int]]

    def to_input(self) -> StepInput:
        ids: list[int] = []
        pos: list[int] = []
        cu = [0]
        for e in self.entries:
            ids.extend(e.seq.token_at(e.start, e.n))
            pos.extend(range(e.start, e.start + e.n))
            cu.append(cu[-1] + e.n)
        as_long = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
        return StepInput(
            input_ids=as_long(ids),
            positions=as_long(pos),
            cu_seqlens=as_long(cu),
            cache_slots=as_long([e.seq.slot for e in self.entries]),
            context_lens=as_long([e.start for e in self.entries]),
            copies=list(self.copies),
        )


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    # Compare in blocks first: list slice equality runs in C.
    i = 0
    block = 64
    while i + block <= n and a[i : i + block] == b[i : i + block]:
        i += block
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    """Slot allocation and per-step token selection for up to `max_slots` concurrent sequences.

    Args:
        max_slots: cache rows, i.e. the most sequences in the running batch.
        max_len: tokens one slot holds (prompt + generated).
        max_prefill_tokens_per_step: prompt tokens added per step across all sequences (the chunk budget).
        prefix_reuse: copy a cached prefix from another slot instead of recomputing it.
        min_prefix_reuse: shortest prefix worth a copy.
    """

    def __init__(
        self,
        max_slots: int,
        max_len: int,
        max_prefill_tokens_per_step: int = 512,
        prefix_reuse: bool = True,
        min_prefix_reuse: int = 16,
    ) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        if max_prefill_tokens_per_step < 1:
            raise ValueError(f"max_prefill_tokens_per_step must be >= 1, got {max_prefill_tokens_per_step}")
        if min_prefix_reuse < 1:
            raise ValueError(f"min_prefix_reuse must be >= 1, got {min_prefix_reuse}")
        self.max_slots = max_slots
        self.max_len = max_len
        self.max_prefill_tokens_per_step = max_prefill_tokens_per_step
        self.prefix_reuse = prefix_reuse
        self.min_prefix_reuse = min_prefix_reuse
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._empty_slots: list[int] = list(range(max_slots - 1, -1, -1))  # pop() gives slot 0 first
        # Free slots whose cache still holds a finished sequence's tokens, least recently freed first.
        self._retained: OrderedDict[int, list[int]] = OrderedDict()
        self.reused_tokens = 0  # total prompt tokens served from copies (a metric)

    # ---- requests ------------------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: list[int]) -> Sequence:
        if request_id in self._by_id:
            raise ValueError(f"request_id {request_id!r} is already scheduled")
        if not prompt_ids:
            raise ValueError(f"request {request_id!r}: prompt_ids is empty")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(
                f"request {request_id!r}: prompt of {len(prompt_ids)} tokens does not fit the context "
                f"({self.max_len} tokens including at least one generated token)"
            )
        seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids))
        self.waiting.append(seq)
        self._by_id[request_id] = seq
        return seq

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def abort(self, request_id: str) -> None:
        """Mark a request aborted; its slot is freed at the next `schedule()` (never mid-step)."""
        seq = self._by_id.get(request_id)
        if seq is not None:
            seq.aborted = True

    def finish(self, request_id: str) -> None:
        """A sequence is done: free its slot now, keeping the slot's cached tokens for prefix reuse."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.running)

    def invalidate_prefix_cache(self) -> None:
        """Forget retained caches (after a weight update their latents belong to the old weights)."""
        for slot in self._retained:
            self._empty_slots.append(slot)
        self._retained.clear()
        for seq in self.running:
            seq.shareable = False

    def requeue_running(self) -> list[Sequence]:
        """The replica's KV caches were lost (it was rebuilt): forget every cached prefix and put each
        running sequence back at the front of the queue, in order, to recompute its prompt and the
        tokens it already generated. Generated tokens are kept, so nothing is sampled twice."""
        requeued = list(self.running)
        for seq in reversed(requeued):
            seq.slot = -1
            seq.num_cached = 0
            seq.reused_prefix = 0
            seq.shareable = True
            self.waiting.appendleft(seq)
        self.running.clear()
        self._retained.clear()
        self._empty_slots = list(range(self.max_slots - 1, -1, -1))
        return requeued

    # ---- slots ---------------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        if seq.slot < 0:
            return
        if self.prefix_reuse and seq.num_cached > 0 and seq.shareable:
            self._retained[seq.slot] = seq.cached_tokens()
        else:
            self._empty_slots.append(seq.slot)
        seq.slot = -1

    def num_free_slots(self) -> int:
        return len(self._empty_slots) + len(self._retained)

    def _take_free_slot(self) -> int:
        if self._empty_slots:
            return self._empty_slots.pop()
        slot, _ = self._retained.popitem(last=False)  # evict the least recently freed cache
        return slot

    def _admit(self, seq: Sequence, copies: list[tuple[int, int, int]]) -> None:
        prompt = seq.prompt_ids
        limit = len(prompt) - 1  # keep >= 1 prompt token to compute: its logits start the decode
        best_len, best_slot, best_retained = 0, -1, False
        if self.prefix_reuse and limit >= self.min_prefix_reuse:
            for slot, toks in self._retained.items():
                n = min(common_prefix_len(toks, prompt), limit)
                if n > best_len:
                    best_len, best_slot, best_retained = n, slot, True
            for other in self.running:
                if other.slot < 0 or not other.shareable or other.num_cached == 0:
                    continue
                n = min(common_prefix_len(other.cached_tokens(), prompt), limit)
                if n > best_len:
                    best_len, best_slot, best_retained = n, other.slot, False
        if best_len >= self.min_prefix_reuse:
            if best_retained:
                # The finished sequence's own slot already holds the prefix: take it, no copy.
                del self._retained[best_slot]
                seq.slot = best_slot
            else:
                seq.slot = self._take_free_slot()
                copies.append((best_slot, seq.slot, best_len))
            seq.num_cached = best_len
            seq.reused_prefix = best_len
            self.reused_tokens += best_len
        else:
            seq.slot = self._take_free_slot()
        self.running.append(seq)

    # ---- steps ---------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep | None:
        """Pick the next step's tokens; None when nothing is runnable."""
        for seq in [s for s in self.running if s.aborted]:
            self.running.remove(seq)
            self._by_id.pop(seq.request_id, None)
            self._release(seq)
        for seq in [s for s in self.waiting if s.aborted]:
            self.waiting.remove(seq)
            self._by_id.pop(seq.request_id, None)

        copies: list[tuple[int, int, int]] = []
        while self.waiting and self.num_free_slots() > 0:
            self._admit(self.waiting.popleft(), copies)

        entries: list[StepEntry] = []
        # Decodes first: every sequence past its prompt advances by exactly one token.
        for seq in self.running:
            if seq.num_cached >= len(seq.prompt_ids) and seq.num_tokens - seq.num_cached == 1:
                entries.append(StepEntry(seq, seq.num_cached, 1, True))
        budget = self.max_prefill_tokens_per_step
        for seq in self.running:
            if budget <= 0:
                break
            # A prompt still to compute, or (after a replica rebuild) prompt + generated tokens to recompute.
            if seq.num_cached < len(seq.prompt_ids) or seq.num_tokens - seq.num_cached > 1:
                n = min(seq.num_tokens - seq.num_cached, budget)
                entries.append(StepEntry(seq, seq.num_cached, n, seq.num_cached + n == seq.num_tokens))
                budget -= n
        if not entries and not copies:
            return None
        return ScheduledStep(entries=entries, copies=copies)

    def commit(self, step: ScheduledStep) -> None:
        """The step ran: its tokens are now in the cache."""
        for e in step.entries:
            e.seq.num_cached = e.start + e.n

    def append_token(self, request_id: str, token_id: int) -> Sequence:
        seq = self._by_id[request_id]
        seq.output_ids.append(token_id)
        return seq
