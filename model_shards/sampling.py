"""Token sampling for a batch of sequences with per-request settings.

Each row has its own temperature (0 = greedy), top-k, top-p, one uniform draw (from a seeded generator:
same seed, same tokens) and optional allowed-token mask (structured decoding). The returned logprob is the behaviour
logprob the RL trainer needs: log_softmax(logits / temperature) of the chosen token over the full,
untruncated, unmasked vocabulary (temperature 1 for greedy rows), i.e. exactly what a trainer recomputes
from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model_shards.engine_api import SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A per-request generator, or None to draw from torch's global one."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _truncate(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p nucleus to -inf (the best token always survives)."""
    vals, idx = torch.sort(scaled, dim=-1, descending=True)
    V = scaled.shape[-1]
    ranks = torch.arange(V, device=scaled.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).unsqueeze(1)
    drop = ranks >= k
    probs = torch.softmax(vals.masked_fill(drop, float("-inf")), dim=-1)
    # A token is in the nucleus if the mass strictly before it is still below top_p.
    before = torch.cumsum(probs, dim=-1) - probs
    drop |= before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    vals = vals.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(1, idx, vals)


@dataclass
class SampleSpec:
    """How to sample the rows of one model step, fixed before the step runs: a shard can then sample next
    to its logits and send back one token and logprob per row instead of [rows, vocab] logits (64 rows
    of Kimi-K2's 163,840-token vocabulary are 42 MB of fp32 per step).

    Each row's randomness is one uniform draw: the token is where it falls in the row's cumulative
    distribution, so the draw, not the device or the batch, decides the token."""

    rows: torch.Tensor  # [R] int64: which of the step's sequences
    temperature: torch.Tensor  # [R] float32; 0 = greedy
    top_k: torch.Tensor  # [R] int64; 0 = off
    top_p: torch.Tensor  # [R] float32
    uniform: torch.Tensor  # [R] float64 in [0, 1)
    allowed: torch.Tensor | None = None  # [R, V] bool (structured decoding), or None

    @classmethod
    def build(cls, rows: list[int], params: list[SamplingParams], uniform: torch.Tensor,
              allowed: torch.Tensor | None = None) -> "SampleSpec":
        return cls(
            rows=torch.tensor(rows, dtype=torch.int64),
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            uniform=uniform.to(torch.float64),
            allowed=allowed,
        )

    def __len__(self) -> int:
        return int(self.rows.numel())

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # numpy, not torch tensors, when shipped to shards (Ray's tensor serializer is slow per call); the
        # mask as bits, 1/8 of its bool bytes.
        fields = tuple(t.numpy() for t in (self.rows, self.temperature, self.top_k, self.top_p, self.uniform))
        mask = None if self.allowed is None else (np.packbits(self.allowed.numpy(), axis=1), self.allowed.shape[1])
        return (_spec_from_arrays, (fields, mask))


def _spec_from_arrays(fields: tuple[Any, ...], mask: tuple[Any, int] | None) -> SampleSpec:
    allowed = None
    if mask is not None:
        bits, width = mask
        allowed = torch.from_numpy(np.unpackbits(bits, axis=1, count=width).astype(bool))
    return SampleSpec(*(torch.from_numpy(np.array(a)) for a in fields), allowed=allowed)  # type: ignore[arg-type]


def seeded_uniform(seed: int, index: int) -> float:
    """The draw for token `index` of a request seeded with `seed`: a function of the two alone, so a
    request resumed elsewhere (a rebuilt replica) or batched differently draws the same numbers."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_mix(_mix(int(seed)) ^ int(index)))
    return float(torch.rand(1, generator=g, dtype=torch.float64))


def _mix(x: int) -> int:
    """splitmix64's finaliser: nearby inputs give unrelated 63-bit seeds."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. logits [S, V] float; allowed [S, V] bool or None; each sampled row takes
    one uniform draw from its generator (None: torch's global one).

    Returns (token_ids [S] int64, logprobs [S] float32) on logits' device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [S, V], got shape {tuple(logits.shape)}")
    S = logits.shape[0]
    if len(params) != S:
        raise ValueError(f"got {len(params)} SamplingParams for {S} rows of logits")
    gens = generators if generators is not None else [None] * S
    if len(gens) != S:
        raise ValueError(f"got {len(gens)} generators for {S} rows of logits")
    uniform = torch.zeros(S, dtype=torch.float64)
    for i, (p, g) in enumerate(zip(params, gens)):
        if p.temperature > 0:
            uniform[i] = torch.rand(1, generator=g, dtype=torch.float64, device=g.device if g is not None else "cpu")[0]
    return sample_rows(logits, SampleSpec.build(list(range(S)), params, uniform, allowed))


def sample_rows(logits: torch.Tensor, spec: SampleSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token for each of spec's rows from logits [R, V] (the rows already selected).

    Returns (token_ids [R] int64, logprobs [R] float32) on logits' device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [S, V], got shape {tuple(logits.shape)}")
    R, V = logits.shape
    if len(spec) != R:
        raise ValueError(f"got sampling settings for {len(spec)} rows, but {R} rows of logits")
    allowed = spec.allowed
    if allowed is not None:
        if tuple(allowed.shape) != (R, V) or allowed.dtype != torch.bool:
            raise ValueError(f"allowed must be a bool tensor of shape {(R, V)}, got {allowed.dtype} {tuple(allowed.shape)}")
        empty = (~allowed.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"rows {empty} have no allowed token")

    dev = logits.device
    logits = logits.float()
    if allowed is not None:
        allowed = allowed.to(dev)  # masks are usually built on the CPU next to the grammar matchers
    temps = spec.temperature.to(dev)
    greedy = temps == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(1)
    logprobs_full = torch.log_softmax(scaled, dim=-1)

    masked = scaled if allowed is None else scaled.masked_fill(~allowed, float("-inf"))
    top_k, top_p = spec.top_k.to(dev), spec.top_p.to(dev)
    needs_trunc = ((top_k > 0) & (top_k < V)) | (top_p < 1.0)
    if bool((needs_trunc & ~greedy).any()):
        masked = torch.where((needs_trunc & ~greedy).unsqueeze(1), _truncate(masked, top_k, top_p), masked)

    tokens = torch.argmax(masked, dim=-1)
    sampled = (~greedy).nonzero().flatten()
    if sampled.numel():
        # Inverse CDF: the first token whose cumulative probability exceeds u (in fp64, so the tail of a
        # big vocabulary keeps its share). Tokens outside the mask or the nucleus have probability 0 and
        # can never be the first to exceed it; the clamp guards u * total rounding up to total.
        probs = torch.softmax(masked[sampled].double(), dim=-1)
        cdf = torch.cumsum(probs, dim=-1)
        target = spec.uniform.to(dev)[sampled].unsqueeze(1) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
        last = torch.where(probs > 0, torch.arange(V, device=dev), 0).amax(dim=-1)
        tokens[sampled] = torch.minimum(picked, last)
    lps = logprobs_full.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, lps
