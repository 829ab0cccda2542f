"""INT4 routed experts on CPU through ATen's packed int4 matmul (`aten._weight_int4pack_mm_for_cpu`).

Why: a CPU decode step is bound by reading the expert weights (docs/benchmarks.md), and the torch
reference dequantizes every busy expert to full precision each step, so an INT4 checkpoint served ~7x
slower in its experts than the fp32 one. The ATen kernel reads the 4-bit weights as they are.

Its numerics differ from the reference in one way, which is why the model keeps an exact path: the
kernel is only fast with bf16 activations (with fp32 ones it runs a slow path, ~100 vs ~6 us for a
[4, 256] x [128, 256] product here), so each expert's input and its gate/up and down outputs are rounded
to bf16, and so are the scales. Against the INT4 weights' own error (~18% relative on random weights)
that adds ~0.5%. Accumulation and the routed sum stay fp32.

A batch with more than `_PACKED_MAX_ROWS` rows for one expert (prefill) takes the reference instead: the
packed kernel's cost grows with rows faster than dequantize + full-precision matmul's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model_shards.kernels.reference import combine_experts, fused_moe_int4_ref, group_by_expert, int4_nibbles

_OP = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_PACK_OP = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
# What the ATen kernel takes. Its packing also wants output widths divisible by 16; these always are, since
# each expert's output width is the other matmul's input width, a multiple of the group size.
_GROUP_SIZES = (32, 64, 128, 256)
# `python bench/int4_cpu.py` on the dev machine (1 thread, [256, 256] and [256, 128] weights): the packed
# kernel took 47/25 us at 32 rows against 94/57 us for dequantize + fp32 matmul, 183/94 against 161/87 at
# 128 rows and 363/184 against 256/129 at 256.
_PACKED_MAX_ROWS = 96


def available(x: Tensor, group_size: int) -> bool:
    """Whether the packed CPU kernel can run this call (CPU, no autograd, an op this torch build has)."""
    return (_OP is not None and _PACK_OP is not None and x.device.type == "cpu" and group_size in _GROUP_SIZES
            and not (torch.is_grad_enabled() and x.requires_grad))


def _pack(packed: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Our format -> the ATen kernel's (weight, scales_and_zeros [in/g, out, 2] bf16). Its dequantization is
    (nibble - 8) * scale + zero, so the symmetric format maps over with zero = 0 and the nibbles unchanged."""
    weight = _PACK_OP(int4_nibbles(packed).to(torch.int32), 1)
    s = scale.t().to(torch.bfloat16)
    return weight, torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


@dataclass
class PackedExperts:
    """Per local expert: [gate; up] packed as one weight (one kernel call for both), and down."""

    gate_up: list[tuple[Tensor, Tensor]]
    down: list[tuple[Tensor, Tensor]]


def packed_experts(gate_packed: Tensor, gate_scale: Tensor, up_packed: Tensor, up_scale: Tensor,
                   down_packed: Tensor, down_scale: Tensor) -> PackedExperts:
    """The ATen-format copy of these expert weights, cached on `gate_packed` and rebuilt when any of the six
    tensors is replaced or updated in place (version counters), so hot weight updates reach it."""
    parts = (gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale)
    key = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in parts)
    hit = getattr(gate_packed, "_aten_int4", None)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            experts = PackedExperts(
                gate_up=[_pack(torch.cat([gate_packed[e], up_packed[e]]), torch.cat([gate_scale[e], up_scale[e]]))
                         for e in range(gate_packed.shape[0])],
                down=[_pack(down_packed[e], down_scale[e]) for e in range(down_packed.shape[0])],
            )
        hit = (key, experts)
        gate_packed._aten_int4 = hit  # type: ignore[attr-defined]
    return hit[1]


def fused_moe_int4_cpu(
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
    """fused_moe_int4 on CPU: the busy experts' gate/up then down through the packed kernel (bf16
    activations), silu-and-mul once over all of them, the routed sum in fp32; -> [N, H] in x's dtype."""
    num_experts, inter = gate_packed.shape[0], gate_packed.shape[1]
    g = group_by_expert(topk_ids, topk_weights, num_experts)
    if g is None:
        return combine_experts(x, None, None)
    if max(g.counts) > _PACKED_MAX_ROWS:  # prefill-sized: dequantizing is cheaper than the packed kernel
        return fused_moe_int4_ref(x, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale,
                                  topk_ids, topk_weights, group_size, groups=g)
    w = packed_experts(gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale)
    busy = g.busy
    sizes = [g.counts[e] for e in busy]
    x_parts = torch.split(x[g.rows].to(torch.bfloat16), sizes)
    gate_up = torch.cat([_OP(xe, w.gate_up[e][0], group_size, w.gate_up[e][1])
                         for e, xe in zip(busy, x_parts)]).float()
    h = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(torch.bfloat16)  # fp32, rounded once
    y = torch.cat([_OP(he, w.down[e][0], group_size, w.down[e][1]) for e, he in zip(busy, torch.split(h, sizes))])
    return combine_experts(x, g, y)
