"""Token sampling for a batch of sequences with per-request settings.

Each row has its own temperature (0 = greedy), top-k, top-p, optional seeded generator (same seed, same
tokens) and optional allowed-token mask (structured decoding). The returned logprob is the behaviour
logprob the RL trainer needs: log_softmax(logits / temperature) of the chosen token over the full,
untruncated, unmasked vocabulary (temperature 1 for greedy rows), i.e. exactly what a trainer recomputes
from the same weights.
"""

from __future__ import annotations

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


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. logits [S, V] float; allowed [S, V] bool or None.

    Returns (token_ids [S] int64, logprobs [S] float32) on logits' device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [S, V], got shape {tuple(logits.shape)}")
    S, V = logits.shape
    if len(params) != S:
        raise ValueError(f"got {len(params)} SamplingParams for {S} rows of logits")
    gens = generators if generators is not None else [None] * S
    if len(gens) != S:
        raise ValueError(f"got {len(gens)} generators for {S} rows of logits")
    if allowed is not None:
        if allowed.shape != logits.shape or allowed.dtype != torch.bool:
            raise ValueError(f"allowed must be a bool tensor of shape {tuple(logits.shape)}, got {allowed.dtype} {tuple(allowed.shape)}")
        empty = (~allowed.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"rows {empty} have no allowed token")

    dev = logits.device
    logits = logits.float()
    if allowed is not None:
        allowed = allowed.to(dev)  # masks are usually built on the CPU next to the grammar matchers
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    greedy = temps == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(1)
    logprobs_full = torch.log_softmax(scaled, dim=-1)

    masked = scaled if allowed is None else scaled.masked_fill(~allowed, float("-inf"))
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
    needs_trunc = ((top_k > 0) & (top_k < V)) | (top_p < 1.0)
    if bool((needs_trunc & ~greedy).any()):
        masked = torch.where((needs_trunc & ~greedy).unsqueeze(1), _truncate(masked, top_k, top_p), masked)

    tokens = torch.argmax(masked, dim=-1)
    sampled_rows = (~greedy).nonzero().flatten().tolist()
    if sampled_rows:
        probs = torch.softmax(masked[sampled_rows], dim=-1)
        unseeded = [j for j, r in enumerate(sampled_rows) if gens[r] is None]
        if unseeded:
            draws = torch.multinomial(probs[unseeded], 1).squeeze(1)
            for j, t in zip(unseeded, draws.tolist()):
                tokens[sampled_rows[j]] = t
        for j, r in enumerate(sampled_rows):
            g = gens[r]
            if g is not None:
                # A generator can only drive sampling on its own device (e.g. CPU seeds, GPU logits).
                row = probs[j] if g.device == probs.device else probs[j].to(g.device)
                tokens[r] = torch.multinomial(row, 1, generator=g)[0]
    lps = logprobs_full.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, lps
