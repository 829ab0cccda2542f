"""Token-level clipped policy-gradient loss (PPO-clip ratios, GRPO advantages), optional k3 KL.

All per-token tensors are [B, T] over next-token positions; `mask` is 1 on orchestrator completion
tokens only, so masked positions contribute neither to the loss nor to its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossStats:
    tokens: int
    clip_fraction: float  # share of tokens whose ratio left [1 - eps, 1 + eps] on the clipped side
    ratio_mean: float
    kl: float  # mean k3 estimate of KL(new || ref); 0 without a reference
    pg_loss: float


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """Σ_masked [ -min(ρ·A, clip(ρ, 1±ε)·A) + β·k3 ] / normalizer, with ρ = exp(new - old).

    advantages: [B] (one per sequence, broadcast over its tokens) or [B, T].
    normalizer: tokens to divide by; default mask.sum(). Gradient accumulation passes the token count
    of the whole batch, so micro-batches add up to one token-level mean.
    """
    if new_logprobs.shape != old_logprobs.shape or new_logprobs.shape != mask.shape:
        raise ValueError(f"shape mismatch: new {tuple(new_logprobs.shape)}, old {tuple(old_logprobs.shape)}, "
                         f"mask {tuple(mask.shape)}")
    if not 0.0 < clip_eps < 1.0:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    adv = advantages.unsqueeze(-1).expand_as(mask) if advantages.dim() == 1 else advantages
    m = mask.to(new_logprobs.dtype)
    n_tokens = float(m.sum())
    norm = normalizer if normalizer is not None else max(n_tokens, 1.0)
    if norm <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    # Masked positions are zeroed BEFORE exp, so a huge logprob there can neither overflow nor leak.
    log_ratio = (new_logprobs - old_logprobs.detach()) * m
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl_tok = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        d = (ref_logprobs.detach() - new_logprobs) * m
        kl_tok = torch.exp(d) - d - 1.0  # k3: unbiased, always >= 0
    total = ((per_token + kl_coef * kl_tok) * m).sum() / norm
    with torch.no_grad():
        denom = max(n_tokens, 1.0)
        was_clipped = ((clipped < unclipped) & (m > 0)).float()
        stats = LossStats(
            tokens=int(n_tokens),
            clip_fraction=float(was_clipped.sum()) / denom,
            ratio_mean=float((ratio * m).sum()) / denom,
            kl=float((kl_tok * m).sum()) / denom,
            pg_loss=float((per_token * m).sum()) / denom,
        )
    return total, stats
