"""Plain-torch references for every kernel: the CPU path and the ground truth the Triton kernels are tested against.

They are also the CPU serving path, so they avoid per-row Python work (the MoE groups assignments by
expert once; decode attention runs every sequence in one padded batch) and work the fused kernels
would not do either (INT4 dequantizes only the experts that received tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

INT4_PACK = 8  # nibbles per int32


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as in HF DeepseekV3RMSNorm: normalize in fp32 (fp64 stays fp64), cast back, scale by the weight."""
    if x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype:
        # Same math in one fused op (no cast between normalising and scaling at full precision).
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def pack_int4(w: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor]:
    """Symmetric group quantization of w [out, in] to (packed int32 [out, in/8], scale [out, in/group]).

    Same on-disk format as model_shards/int4.py (value+8 nibbles, lowest bits first); kept here so the
    kernels and their tests do not depend on the checkpoint code.
    """
    out_f, in_f = w.shape
    _check_int4_dims(in_f, group_size)
    groups = w.float().reshape(out_f, in_f // group_size, group_size)
    scale = groups.abs().amax(-1).clamp_min(1e-8) / 7.0
    q = torch.clamp(torch.round(groups / scale[..., None]), -8, 7).to(torch.int32) + 8
    q = q.reshape(out_f, in_f // INT4_PACK, INT4_PACK)
    shifts = torch.arange(INT4_PACK, dtype=torch.int32, device=w.device) * 4
    # Sum of disjoint nibbles == bitwise OR; int64 avoids overflow before the wrap to int32.
    packed = (q.to(torch.int64) << shifts.to(torch.int64)).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed, scale.to(w.dtype)


def int4_nibbles(packed: Tensor) -> Tensor:
    """packed int32 [..., n/8] -> its stored nibbles (value + 8, 0..15) as uint8 [..., n]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"int4 packed weights must be int32, got {packed.dtype}")
    # Read as bytes (little-endian, as every platform torch runs on): byte j holds nibbles 2j (low four
    # bits) and 2j+1 (high), so two byte ops unpack it; twice as fast as shifting the int32 words 8 ways.
    b = packed.contiguous().view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * INT4_PACK)


def unpack_int4(packed: Tensor, scale: Tensor, group_size: int = 32, dtype: torch.dtype | None = None) -> Tensor:
    """Dequantize (packed [out, in/8] int32, scale [out, in/group]) to w [out, in] as (nibble - 8) * scale."""
    out_f = packed.shape[0]
    in_f = packed.shape[1] * INT4_PACK
    _check_int4_dims(in_f, group_size)
    if scale.shape != (out_f, in_f // group_size):
        raise ValueError(f"int4 scale has shape {tuple(scale.shape)}, expected {(out_f, in_f // group_size)}")
    nib = int4_nibbles(packed).reshape(out_f, in_f // group_size, group_size)
    w = (nib.float() - 8.0) * scale.float().unsqueeze(-1)
    return w.reshape(out_f, in_f).to(dtype or scale.dtype)


def _check_int4_dims(in_features: int, group_size: int) -> None:
    if group_size <= 0 or group_size % INT4_PACK:
        raise ValueError(f"int4 group_size must be a positive multiple of {INT4_PACK}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 input dim {in_features} is not a multiple of group_size {group_size}")


def int4_linear_ref(x: Tensor, packed: Tensor, scale: Tensor, group_size: int = 32) -> Tensor:
    """x [..., in] @ dequant(W)^T -> [..., out] in x's dtype."""
    w = unpack_int4(packed, scale, group_size, dtype=x.dtype)
    return F.linear(x, w)


def fused_moe_ref(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor
) -> Tensor:
    """Σ_j topk_weights[n,j] · down_e(silu(gate_e x) · up_e x), e = topk_ids[n,j]; ids outside [0,E) are skipped."""
    num_experts = w_gate.shape[0]
    return _moe_grouped(
        x, topk_ids, topk_weights, num_experts, lambda e: (w_gate[e], w_up[e], w_down[e]), (w_gate, w_up, w_down)
    )


def fused_moe_int4_ref(
    x: Tensor,
    gate_packed: Tensor,
    gate_scale: Tensor,
    up_packed: Tensor,
    up_scale: Tensor,
    down_packed: Tensor,
    down_scale: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    group_size: int = 32,
    groups: "ExpertGroups | None" = None,
) -> Tensor:
    """fused_moe_ref with INT4 expert weights ([E, out, in/8] packed, [E, out, in/group] scales).
    `groups`: the assignments already grouped by group_by_expert, when the caller has them."""

    def weights(e: int) -> tuple[Tensor, Tensor, Tensor]:
        return (
            unpack_int4(gate_packed[e], gate_scale[e], group_size, dtype=x.dtype),
            unpack_int4(up_packed[e], up_scale[e], group_size, dtype=x.dtype),
            unpack_int4(down_packed[e], down_scale[e], group_size, dtype=x.dtype),
        )

    # No stacked full-precision weights: dequantizing every expert would cost more than it saves.
    return _moe_grouped(x, topk_ids, topk_weights, gate_packed.shape[0], weights, None, groups)


# Cost model (in multiply-adds) for choosing between the padded bmm over every local expert and the loop
# over the busy experts: a small-row matmul is bound by reading its weights, which costs about as much as
# _WEIGHT_READ_ROWS rows of compute; each loop iteration adds dispatch overhead worth about
# _EXPERT_OVERHEAD_MACS; the padded bmm runs its few-row products at about 1/_PADDED_BMM_SLOWDOWN of the
# rate of one matmul per expert. Measured on the 2-core dev machine (fp32, `small` preset, batch-32 decode:
# 15-28 busy experts of 32, widest 14-27 rows): the loop took 0.76-1.04 ms per layer, the bmm 1.3-1.9 ms.
# Tiny experts (test presets) with many busy ones still take the bmm, bigger ones the loop.
_WEIGHT_READ_ROWS = 6
_EXPERT_OVERHEAD_MACS = 1_200_000
_PADDED_BMM_SLOWDOWN = 1.4


def _padded_bmm_is_cheaper(num_experts: int, busy: int, widest: int, assignments: int, macs_per_row: int) -> bool:
    bmm = _PADDED_BMM_SLOWDOWN * num_experts * macs_per_row * max(widest, _WEIGHT_READ_ROWS)
    loop = macs_per_row * max(assignments, busy * _WEIGHT_READ_ROWS) + busy * _EXPERT_OVERHEAD_MACS
    return bmm < loop


def _per_expert_views(stacked: tuple[Tensor, Tensor, Tensor]) -> list[tuple[Tensor, ...]]:
    """[(gate_e, up_e, down_e)] views of the stacked weights. Without autograd they are cached on the
    gate tensor, keyed by storage and layout (views see in-place weight updates; the cache dies with the
    tensor): slicing 3 x E views per layer per step costs more than a decode step's small matmuls on CPU."""
    if torch.is_grad_enabled() and any(w.requires_grad for w in stacked):
        return list(zip(*(w.unbind(0) for w in stacked)))
    key = tuple((w.data_ptr(), w.dtype, tuple(w.shape), w.stride()) for w in stacked)
    hit = getattr(stacked[0], "_expert_views", None)
    if hit is None or hit[0] != key:
        hit = (key, list(zip(*(w.detach().unbind(0) for w in stacked))))
        stacked[0]._expert_views = hit  # type: ignore[attr-defined]
    return hit[1]


@dataclass
class ExpertGroups:
    """The (token, expert) assignments of a routed batch, sorted by expert (stable: token order within one)."""

    rows: Tensor  # [m] token row of each assignment
    experts: Tensor  # [m] its (local) expert, non-decreasing
    gate_w: Tensor  # [m, 1] its routing weight, fp32
    counts_t: Tensor  # [E] assignments per expert
    counts: list[int]  # the same, on the host

    @property
    def busy(self) -> list[int]:
        return [e for e, c in enumerate(self.counts) if c]


def group_by_expert(topk_ids: Tensor, topk_weights: Tensor, num_experts: int) -> ExpertGroups | None:
    """Sorts the assignments by expert once; ids outside [0, num_experts) (other EP ranks) are dropped.
    None when no assignment is local."""
    n, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    assign = torch.arange(n * k, device=topk_ids.device)
    valid = (flat >= 0) & (flat < num_experts)
    if not bool(valid.all()):
        assign = assign[valid]
        flat = flat[valid]
    if flat.numel() == 0:
        return None
    experts, order = torch.sort(flat, stable=True)
    assign = assign[order]
    counts_t = torch.bincount(experts, minlength=num_experts)
    return ExpertGroups(
        rows=torch.div(assign, k, rounding_mode="floor"),
        experts=experts,
        gate_w=topk_weights.reshape(-1)[assign].float().unsqueeze(-1),
        counts_t=counts_t,
        counts=counts_t.tolist(),
    )


def combine_experts(x: Tensor, groups: ExpertGroups | None, y: Tensor | None) -> Tensor:
    """Σ over each token's assignments of routing weight × expert output y [m, H] (rows in `groups` order),
    summed in fp32 -> [N, H] in x's dtype; zeros when nothing was local."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if groups is None or y is None:
        return out.to(x.dtype)
    return out.index_add(0, groups.rows, y.float() * groups.gate_w).to(x.dtype)


def _moe_grouped(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    num_experts: int,
    weights_of: Callable[[int], tuple[Tensor, Tensor, Tensor]],
    stacked: tuple[Tensor, Tensor, Tensor] | None,
    groups: "ExpertGroups | None" = None,
) -> Tensor:
    """Sort the (token, expert) assignments by expert once, then either run every expert in one padded
    bmm (many experts busy: per-expert Python work would dominate on small matrices) or loop over the
    busy experts' contiguous segments (few busy: a bmm would read every expert's weights)."""
    g = groups if groups is not None else group_by_expert(topk_ids, topk_weights, num_experts)
    if g is None:
        return combine_experts(x, None, None)
    busy_ids = g.busy
    widest = max(g.counts)
    m = g.experts.numel()
    xs = x[g.rows]
    if stacked is not None and _padded_bmm_is_cheaper(
        num_experts, len(busy_ids), widest, m, 3 * stacked[0].shape[1] * stacked[0].shape[2]
    ):
        w_gate, w_up, w_down = stacked
        starts = torch.cumsum(g.counts_t, 0) - g.counts_t
        slot = torch.arange(m, device=x.device) - starts[g.experts]
        padded = x.new_zeros(num_experts, widest, x.shape[1])
        padded = padded.index_put((g.experts, slot), xs)
        h = F.silu(torch.bmm(padded, w_gate.transpose(1, 2))) * torch.bmm(padded, w_up.transpose(1, 2))
        y = torch.bmm(h, w_down.transpose(1, 2))[g.experts, slot]
    else:
        # split / unbind instead of per-expert slices and indexing: under autograd each slice's
        # backward would zero-fill a gradient the size of the whole tensor (E fills per layer); these
        # backward as one cat / stack.
        x_parts = torch.split(xs, [g.counts[e] for e in busy_ids])
        per_expert = _per_expert_views(stacked) if stacked is not None else None
        parts = []
        for e, xe in zip(busy_ids, x_parts):
            wg, wu, wd = per_expert[e] if per_expert is not None else weights_of(e)
            parts.append(F.linear(F.silu(F.linear(xe, wg)) * F.linear(xe, wu), wd))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    return combine_experts(x, g, y)


def mla_decode_ref(
    q_latent: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    k_rope: Tensor,
    cache_slots: Tensor,
    seq_lens: Tensor,
    softmax_scale: float,
) -> Tensor:
    """Absorbed-MLA decode attention over the latent cache; returns Σ p·latent [S, Hh, R] in q's dtype.

    A sequence with seq_len 0 attends to nothing and gets zeros. All sequences run at once, padded to
    the longest one (positions past a sequence's length are masked out).
    """
    S, Hh, R = q_latent.shape
    longest = int(seq_lens.max()) if S else 0
    if longest == 0:
        return torch.zeros(S, Hh, R, dtype=q_latent.dtype, device=q_latent.device)
    if S <= latent.shape[0] and bool((cache_slots == torch.arange(S, device=cache_slots.device)).all()):
        lat, kr = latent[:S, :longest], k_rope[:S, :longest]  # slots 0..S-1 (the usual case): views, no copy
    else:
        lat, kr = latent[:, :longest].index_select(0, cache_slots), k_rope[:, :longest].index_select(0, cache_slots)
    lat, kr = lat.float(), kr.float()  # [S, m, R], [S, m, P]
    scores = torch.baddbmm(torch.bmm(q_rope.float(), kr.transpose(1, 2)), q_latent.float(), lat.transpose(1, 2))
    scores = scores * softmax_scale  # [S, Hh, m]
    past_end = torch.arange(longest, device=lat.device).unsqueeze(0) >= seq_lens.unsqueeze(1)  # [S, m]
    scores = scores.masked_fill(past_end.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs, lat)
    empty = seq_lens == 0
    if bool(empty.any()):  # softmax over nothing is NaN; such rows attend to nothing
        out = out.masked_fill(empty.view(S, 1, 1), 0.0)
    return out.to(q_latent.dtype)
