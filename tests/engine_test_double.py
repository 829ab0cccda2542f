"""ScriptedEngineTestDouble: an Engine test double for the OpenAI server tests (tests/ only).

It has no model. Each request replays the next scripted reply (assistant text in Kimi's format, special
markers included) as a token stream through the real tokenizer, with the real stop-string, max_tokens
and UTF-8 streaming behaviour. A reply of None means "no script": it samples random logits under the
request's grammar constraint with the real sampler and xgrammar matcher, so structured-output tests
exercise real constrained decoding. Logprobs are those of a uniform policy, -log(V).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

import torch

from model_shards.engine_api import GenerationRequest, GenerationResult, TokenEvent, collect
from model_shards.sampling import sample
from model_shards.structured import GrammarCache
from model_shards.tokenizer import ByteTokenizer, StreamDecoder


class ScriptedEngineTestDouble:
    def __init__(self, tokenizer: Any | None = None, model_name: str = "kimi-test", max_context: int = 4096) -> None:
        self.tokenizer = tokenizer or ByteTokenizer()
        self.model_name = model_name
        self.max_context = max_context
        self.replies: deque[str | None] = deque()
        self.requests: list[GenerationRequest] = []
        self.fail_next: Exception | None = None  # raised mid-stream (after one token) by the next request
        self.reject_next: Exception | None = None  # raised by the next request before any token
        self.weight_updates: list[list[str]] = []
        self._grammars = GrammarCache(self.tokenizer)

    def script(self, *replies: str | None) -> None:
        self.replies.extend(replies)

    def _token_ids(self, req: GenerationRequest) -> list[int]:
        reply = self.replies.popleft() if self.replies else "echo"
        if reply is not None:
            return self.tokenizer.encode(reply, allow_special=True) + [self.tokenizer.eos_id]
        if req.constraint is None:
            raise ValueError("a None reply needs a constrained request")
        m = self._grammars.matcher(req.constraint)
        g = torch.Generator().manual_seed(req.params.seed or 0)
        V = self.tokenizer.vocab_size
        row = torch.zeros(1, V, dtype=torch.bool)
        ids: list[int] = []
        for _ in range(req.params.max_tokens):
            m.fill_allowed(row[0])
            logits = torch.randn(1, V, generator=g)
            tok, _ = sample(logits, [req.params], [g], row)
            t = int(tok[0])
            m.accept(t)
            ids.append(t)
            if m.is_terminated():
                break
        return ids

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.requests.append(req)
        if self.reject_next is not None:
            err, self.reject_next = self.reject_next, None
            raise err
        ids = self._token_ids(req)
        dec = StreamDecoder(self.tokenizer)
        lp = -math.log(self.tokenizer.vocab_size) if req.params.logprobs else None
        text = ""
        for n, t in enumerate(ids, 1):
            await asyncio.sleep(0)
            if self.fail_next is not None and n == 2:
                err, self.fail_next = self.fail_next, None
                raise err
            if t == self.tokenizer.eos_id:
                yield TokenEvent(req.request_id, t, dec.flush(), lp, True, "stop")
                return
            piece = dec.push(t)
            text += piece
            cut = min((text.find(s) for s in req.params.stop if s in text), default=-1)
            if cut >= 0:
                keep = len(piece) - (len(text) - cut)
                yield TokenEvent(req.request_id, t, piece[: max(keep, 0)], lp, True, "stop")
                return
            if n >= req.params.max_tokens:
                yield TokenEvent(req.request_id, t, piece + dec.flush(), lp, True, "length")
                return
            yield TokenEvent(req.request_id, t, piece, lp, False, None)
        yield TokenEvent(req.request_id, -1, dec.flush(), None, True, "stop")

    async def complete(self, req: GenerationRequest) -> GenerationResult:
        return await collect(self.generate(req), req.request_id, len(req.prompt_ids))

    async def update_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.weight_updates.append(sorted(tensors))
