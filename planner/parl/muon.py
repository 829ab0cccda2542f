"""Muon (the optimizer Kimi K2 was trained with, minus its QK-clip): momentum SGD whose update for
each weight matrix is replaced by the nearest semi-orthogonal matrix, computed with a few
Newton-Schulz iterations. Matrices use Muon; embeddings, the output head and vectors (norms,
biases) use AdamW, as in Moonlight ("Muon is Scalable for LLM Training", 2025).

The orthogonalised update is scaled by 0.2·sqrt(max(rows, cols)), Moonlight's rule, which gives it
about the RMS of an AdamW update, so one learning rate and one weight decay serve both kinds of
parameter and `optimizer: muon` can be tried without re-tuning `lr`.

Expert weights are stored as (experts, out, in) stacks; each expert's matrix is orthogonalised on
its own (the iteration is batched over the leading dimension).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): five iterations take every singular
# value of a normalised matrix into roughly [0.7, 1.2], which is orthogonal enough for an update.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MOONLIGHT_SCALE = 0.2


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U·Vᵀ of g = U·S·Vᵀ over g's last two dimensions (leading ones are a batch)."""
    a, b, c = NS_COEFFS
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide form, so that x·xᵀ is the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)  # Frobenius ≥ spectral: singular values ≤ 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def muon_scale(shape: torch.Size) -> float:
    return MOONLIGHT_SCALE * max(shape[-2], shape[-1]) ** 0.5


class Muon(torch.optim.Optimizer):
    """Param groups carry `use_muon`: True for weight matrices, False for the AdamW ones."""

    def __init__(self, groups: Iterable[dict[str, Any]], lr: float, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 nesterov: bool = True) -> None:
        defaults = {"lr": lr, "momentum": momentum, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "nesterov": nesterov, "use_muon": False}
        super().__init__(list(groups), defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                p.mul_(1 - lr * wd)  # decoupled weight decay, as AdamW
                if group["use_muon"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    p.add_(orthogonalize(update), alpha=-lr * muon_scale(p.shape))
                else:
                    self._adamw(p, state, group)
        return loss

    @staticmethod
    def _adamw(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        b1, b2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(p.grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1**t))


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Hidden weight matrices (expert stacks included); not the token embedding or the output head,
    whose rows are per-token vectors rather than a linear map, and not vectors."""
    return p.dim() >= 2 and "embed_tokens" not in name and "lm_head" not in name


def build_optimizer(model: torch.nn.Module, name: str, *, lr: float, betas: tuple[float, float],
                    weight_decay: float, momentum: float = 0.95) -> torch.optim.Optimizer:
    """`adamw` (decay on matrices only) or `muon` (Muon on hidden matrices, AdamW on the rest)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "adamw":
        decay = [p for _, p in named if p.dim() >= 2]
        no_decay = [p for _, p in named if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    if name == "muon":
        groups = [
            {"params": [p for n, p in named if is_muon_param(n, p)], "use_muon": True, "weight_decay": weight_decay},
            {"params": [p for n, p in named if not is_muon_param(n, p) and p.dim() >= 2],
             "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
        ]
        return Muon([g for g in groups if g["params"]], lr=lr, momentum=momentum, betas=betas)
    raise ValueError(f"optimizer must be 'adamw' or 'muon', got {name!r}")
