"""Orchestrator samples: what the policy engine records per orchestrator completion, and their
collation into padded training tensors whose mask covers completion tokens only.

Only the orchestrator's own completion ids are trainable. Everything else the orchestrator sees
(its system prompt, the task, repair messages, sub-agent results in the aggregation prompt) is in
`prompt_ids`: it conditions the logprobs but is never a target of the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class OrchestratorSample:
    role: str  # "plan" (plan writing and repairs) or "aggregate" (the final answer)
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # behaviour logprob of each completion token (engine, full vocabulary)
    version: int  # policy version that generated it (the oldest, if an update landed mid-way)
    advantage: float = 0.0

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.completion_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.completion_ids)} completion tokens")

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class TrainBatch:
    """[B, L] tensors of one micro-batch; position t scores token t+1 (next-token prediction)."""

    ids: torch.Tensor  # [B, L] long, right-padded
    mask: torch.Tensor  # [B, L-1] float: 1 where target ids[:, t+1] is an orchestrator completion token
    old_logprobs: torch.Tensor  # [B, L-1] behaviour logprobs at the masked positions (0 elsewhere)
    advantages: torch.Tensor  # [B] per sequence


def collate(samples: Sequence[OrchestratorSample], pad_id: int = 0) -> TrainBatch:
    if not samples:
        raise ValueError("collate needs at least one sample")
    longest = max(len(s) for s in samples)
    if longest < 2:
        raise ValueError("every sample needs at least two tokens")
    B = len(samples)
    ids = torch.full((B, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((B, longest - 1), dtype=torch.float32)
    old = torch.zeros((B, longest - 1), dtype=torch.float32)
    for r, s in enumerate(samples):
        seq = s.prompt_ids + s.completion_ids
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        start, end = len(s.prompt_ids) - 1, len(seq) - 1  # target index t+1 in [len(prompt), len(seq))
        mask[r, start:end] = 1.0
        old[r, start:end] = torch.tensor(s.logprobs, dtype=torch.float32)
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    return TrainBatch(ids, mask, old, adv)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, L, V] logits of `ids` [B, L] -> [B, L-1] logprob of each next token under softmax(logits / T),
    the distribution the engine samples from (and reports logprobs of)."""
    lp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, L-1] entropy of each next-token distribution (a diagnostic; no gradient)."""
    with torch.no_grad():
        lp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
        return -(lp.exp() * lp).sum(-1)
