"""The contract between the serving engine and everything that drives it (server, LLM client, trainer).

Plain dataclasses and Protocols only, so the engine (model_shards.engine.LLMEngine), the OpenAI server
(model_shards.server) and test doubles can be written against it independently.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class SamplingParams:
    """Per-request decoding settings. temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False

    def __post_init__(self) -> None:
        # Fail at the boundary with a message that names the field, not deep inside sampling.
        if not self.temperature >= 0.0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Constraint:
    """A structured-decoding constraint; the engine compiles it with model_shards.structured.GrammarCache.

    kind "json_schema": spec is a JSON schema (text); "json": any JSON value (spec ignored, may be "");
    "ebnf": spec is an EBNF grammar in xgrammar's GBNF dialect with a `root` rule.
    """

    kind: Literal["json_schema", "json", "ebnf"]
    spec: str = ""


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    constraint: Constraint | None = None


@dataclass
class TokenEvent:
    """One generated token. `text` is the newly decodable text (may be "" mid multi-byte character).

    The last event of a request has finished=True and a finish_reason; an "abort" event may carry
    token_id -1 and no text when no token was produced.
    """

    request_id: str
    token_id: int
    text: str
    logprob: float | None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    special: dict[str, int]  # special token string -> id

    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self, id: int) -> bytes: ...


@runtime_checkable
class Engine(Protocol):
    tokenizer: Tokenizer
    model_name: str
    max_context: int

    def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Async generator of the request's tokens; the last event has finished=True."""
        ...

    async def complete(self, req: GenerationRequest) -> GenerationResult:
        """Drain generate() into one result."""
        ...

    async def update_weights(self, tensors: Mapping[str, "torch.Tensor"]) -> None:
        """Hot-swap weights of the running shards (full HF-named tensors)."""
        ...


async def collect(events: AsyncIterator[TokenEvent], request_id: str, prompt_tokens: int) -> GenerationResult:
    """Drain a TokenEvent stream into a GenerationResult (helper for Engine.complete implementations)."""
    ids: list[int] = []
    texts: list[str] = []
    lps: list[float] = []
    have_lp = True
    reason = "abort"
    async for ev in events:
        if ev.token_id >= 0:
            ids.append(ev.token_id)
            texts.append(ev.text)
            if ev.logprob is None:
                have_lp = False
            else:
                lps.append(ev.logprob)
        elif ev.text:
            texts.append(ev.text)
        if ev.finished:
            reason = ev.finish_reason or "stop"
            break
    return GenerationResult(
        request_id=request_id,
        token_ids=ids,
        text="".join(texts),
        logprobs=lps if (have_lp and ids) else None,
        finish_reason=reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(ids),
    )
