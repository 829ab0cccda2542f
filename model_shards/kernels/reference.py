"""Plain-torch references for every kernel: the CPU path and the ground truth the Triton kernels are tested against.

They favour clarity over speed, but avoid work the fused kernels would not do either (e.g. the MoE
reference only runs experts that received tokens, and INT4 dequantizes only those experts).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

INT4_PACK = 8  # nibbles per int32


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as in HF DeepseekV3RMSNorm: normalize in fp32 (fp64 stays fp64), cast back, scale by the weight."""
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


def unpack_int4(packed: Tensor, scale: Tensor, group_size: int = 32, dtype: torch.dtype | None = None) -> Tensor:
    """Dequantize (packed [out, in/8] int32, scale [out, in/group]) to w [out, in] as (nibble - 8) * scale."""
    out_f = packed.shape[0]
    in_f = packed.shape[1] * INT4_PACK
    _check_int4_dims(in_f, group_size)
    if scale.shape != (out_f, in_f // group_size):
        raise ValueError(f"int4 scale has shape {tuple(scale.shape)}, expected {(out_f, in_f // group_size)}")
    shifts = torch.arange(INT4_PACK, dtype=torch.int32, device=packed.device) * 4
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF
    vals = (nib - 8).reshape(out_f, in_f // group_size, group_size).float()
    w = vals * scale.float().unsqueeze(-1)
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
    return _moe_loop(
        x, topk_ids, topk_weights, num_experts, lambda e: (w_gate[e], w_up[e], w_down[e])
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
) -> Tensor:
    """fused_moe_ref with INT4 expert weights ([E, out, in/8] packed, [E, out, in/group] scales)."""

    def weights(e: int) -> tuple[Tensor, Tensor, Tensor]:
        return (
            unpack_int4(gate_packed[e], gate_scale[e], group_size, dtype=x.dtype),
            unpack_int4(up_packed[e], up_scale[e], group_size, dtype=x.dtype),
            unpack_int4(down_packed[e], down_scale[e], group_size, dtype=x.dtype),
        )

    return _moe_loop(x, topk_ids, topk_weights, gate_packed.shape[0], weights)


def _moe_loop(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    num_experts: int,
    weights_of: Callable[[int], tuple[Tensor, Tensor, Tensor]],
) -> Tensor:
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    ids = topk_ids.long()
    for e in torch.unique(ids[(ids >= 0) & (ids < num_experts)]).tolist():
        rows, slots = torch.nonzero(ids == e, as_tuple=True)
        wg, wu, wd = weights_of(e)
        xe = x[rows]
        h = F.silu(F.linear(xe, wg)) * F.linear(xe, wu)
        y = F.linear(h, wd).float() * topk_weights[rows, slots].float().unsqueeze(-1)
        out.index_add_(0, rows, y)
    return out.to(x.dtype)


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

    A sequence with seq_len 0 attends to nothing and gets zeros.
    """
    S, Hh, R = q_latent.shape
    out = torch.zeros(S, Hh, R, dtype=torch.float32, device=q_latent.device)
    for s in range(S):
        n = int(seq_lens[s])
        if n == 0:
            continue
        slot = int(cache_slots[s])
        lat = latent[slot, :n].float()  # [n, R]
        kr = k_rope[slot, :n].float()  # [n, P]
        scores = (q_latent[s].float() @ lat.T + q_rope[s].float() @ kr.T) * softmax_scale  # [Hh, n]
        out[s] = torch.softmax(scores, dim=-1) @ lat
    return out.to(q_latent.dtype)
