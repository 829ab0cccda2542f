"""Kernel entry points: each dispatches to a Triton kernel when `triton_enabled(x)`, else to the torch reference.

The engine thus gets Triton on CUDA and torch on CPU with no configuration. Tests set
SWARM_TRITON_INTERPRET=1 (with TRITON_INTERPRET=1) to run the Triton kernels on CPU tensors.
The Triton path has no backward, so calls that need gradients always take the torch path.
Without triton installed everything runs on the torch references.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from model_shards.kernels import int4_cpu, reference
from model_shards.kernels.reference import (
    _check_int4_dims,
    fused_moe_int4_ref,
    fused_moe_ref,
    int4_linear_ref,
    mla_decode_ref,
    pack_int4,
    rms_norm_ref,
    unpack_int4,
)

__all__ = [
    "rms_norm",
    "fused_moe",
    "fused_moe_int4",
    "int4_linear",
    "mla_decode",
    "triton_enabled",
    "pack_int4",
    "unpack_int4",
    "reference",
    "rms_norm_ref",
    "fused_moe_ref",
    "fused_moe_int4_ref",
    "int4_linear_ref",
    "mla_decode_ref",
]


# Triton decides interpreter vs compiler when a kernel is decorated, so the flag must be in the environment
# before the kernel modules load. They load here, eagerly: importing `kernels.fused_moe` later would otherwise
# rebind the package attribute `fused_moe` (the function below) to the submodule of the same name.
if os.environ.get("SWARM_TRITON_INTERPRET") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton.knobs

    from model_shards.kernels import fused_moe as _fused_moe_mod
    from model_shards.kernels import int4 as _int4_mod
    from model_shards.kernels import mla_decode as _mla_decode_mod
    from model_shards.kernels import rmsnorm as _rmsnorm_mod

    _HAVE_TRITON = True
    _INTERPRETED = bool(triton.knobs.runtime.interpret)  # kernels were decorated for the CPU interpreter
except ImportError:
    _HAVE_TRITON = False
    _INTERPRETED = False


def triton_enabled(t: Tensor) -> bool:
    """True on CUDA tensors when triton is installed, or anywhere when SWARM_TRITON_INTERPRET=1
    (which also needs TRITON_INTERPRET=1 before this package was first imported)."""
    if not _HAVE_TRITON:
        return False
    if os.environ.get("SWARM_TRITON_INTERPRET") == "1" and _INTERPRETED:
        return True
    return t.is_cuda


_RMS_NORM_MAX_WIDTH = 65536  # the kernel holds a whole row in one block


def _use_triton(*tensors: Tensor) -> bool:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return triton_enabled(tensors[0])


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_ids_weights(x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> None:
    _require(x.dim() == 2, f"x must be [N, H], got shape {tuple(x.shape)}")
    _require(topk_ids.dim() == 2 and topk_ids.shape[0] == x.shape[0],
             f"topk_ids must be [N={x.shape[0]}, k], got shape {tuple(topk_ids.shape)}")
    _require(not topk_ids.is_floating_point() and not topk_ids.is_complex() and topk_ids.dtype != torch.bool,
             f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    _require(topk_weights.shape == topk_ids.shape,
             f"topk_weights shape {tuple(topk_weights.shape)} != topk_ids shape {tuple(topk_ids.shape)}")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim: weight * (x / sqrt(mean(x²) + eps)), normalized in fp32."""
    _require(weight.dim() == 1 and x.shape[-1] == weight.shape[0],
             f"rms_norm weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    if x.shape[-1] <= _RMS_NORM_MAX_WIDTH and _use_triton(x, weight):
        return _rmsnorm_mod.rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_moe(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor
) -> Tensor:
    """Σ_j topk_weights[n,j] · down_e(silu(gate_e x) · up_e x), e = topk_ids[n,j] (LOCAL expert ids).

    x [N, H]; w_gate, w_up [E, I, H]; w_down [E, H, I]; ids outside [0, E) (other EP ranks) are skipped.
    """
    _check_ids_weights(x, topk_ids, topk_weights)
    _require(w_gate.dim() == 3 and w_gate.shape[2] == x.shape[1],
             f"w_gate must be [E, I, H={x.shape[1]}], got shape {tuple(w_gate.shape)}")
    _require(w_up.shape == w_gate.shape, f"w_up shape {tuple(w_up.shape)} != w_gate shape {tuple(w_gate.shape)}")
    E, I, H = w_gate.shape
    _require(tuple(w_down.shape) == (E, H, I), f"w_down must be [E, H, I]={(E, H, I)}, got {tuple(w_down.shape)}")
    if _use_triton(x, w_gate, w_up, w_down, topk_weights):
        return _fused_moe_mod.fused_moe_triton(x, w_gate, w_up, w_down, topk_ids, topk_weights)
    return fused_moe_ref(x, w_gate, w_up, w_down, topk_ids, topk_weights)


def fused_moe_int4(
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
    exact: bool = False,
) -> Tensor:
    """fused_moe with INT4 experts: *_packed [E, out, in/8] int32, *_scale [E, out, in/group_size].

    On CPU it runs ATen's packed int4 kernel, which rounds activations and scales to bf16 (int4_cpu.py);
    exact=True dequantizes instead (the torch reference: the same sums as the dequantized weights in fp32)."""
    _check_ids_weights(x, topk_ids, topk_weights)
    H = x.shape[1]
    _require(gate_packed.dim() == 3, f"gate_packed must be [E, I, H/8], got shape {tuple(gate_packed.shape)}")
    E, I = gate_packed.shape[0], gate_packed.shape[1]
    _check_int4_dims(H, group_size)
    _check_int4_dims(I, group_size)
    for name, packed, scale, out_f, in_f in (
        ("gate", gate_packed, gate_scale, I, H),
        ("up", up_packed, up_scale, I, H),
        ("down", down_packed, down_scale, H, I),
    ):
        _require(packed.dtype == torch.int32, f"{name}_packed must be int32, got {packed.dtype}")
        _require(tuple(packed.shape) == (E, out_f, in_f // 8),
                 f"{name}_packed must be {(E, out_f, in_f // 8)}, got {tuple(packed.shape)}")
        _require(tuple(scale.shape) == (E, out_f, in_f // group_size),
                 f"{name}_scale must be {(E, out_f, in_f // group_size)}, got {tuple(scale.shape)}")
    if _use_triton(x, gate_scale, up_scale, down_scale, topk_weights):
        return _fused_moe_mod.fused_moe_triton(
            x, gate_packed, up_packed, down_packed, topk_ids, topk_weights,
            scales=(gate_scale, up_scale, down_scale), group_size=group_size,
        )
    if not exact and int4_cpu.available(x, group_size):
        return int4_cpu.fused_moe_int4_cpu(
            x, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale, topk_ids, topk_weights, group_size
        )
    return fused_moe_int4_ref(
        x, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale, topk_ids, topk_weights, group_size
    )


def int4_linear(x: Tensor, packed: Tensor, scale: Tensor, group_size: int = 32) -> Tensor:
    """x [..., in] @ W^T with W INT4 (packed [out, in/8] int32, scale [out, in/group_size]) -> [..., out]."""
    _require(packed.dim() == 2 and scale.dim() == 2,
             f"int4_linear wants 2-D packed/scale, got {tuple(packed.shape)} / {tuple(scale.shape)}")
    _check_int4_dims(x.shape[-1], group_size)
    _require(packed.dtype == torch.int32, f"packed must be int32, got {packed.dtype}")
    _require(packed.shape[1] * 8 == x.shape[-1],
             f"packed has {packed.shape[1]} int32 columns; x's last dim {x.shape[-1]} needs {x.shape[-1] // 8}")
    _require(tuple(scale.shape) == (packed.shape[0], x.shape[-1] // group_size),
             f"scale must be {(packed.shape[0], x.shape[-1] // group_size)}, got {tuple(scale.shape)}")
    if _use_triton(x, scale):
        return _int4_mod.int4_linear_triton(x, packed, scale, group_size)
    return int4_linear_ref(x, packed, scale, group_size)


def mla_decode(
    q_latent: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    k_rope: Tensor,
    cache_slots: Tensor,
    seq_lens: Tensor,
    softmax_scale: float,
) -> Tensor:
    """Decode attention over each sequence's latent rows [0, seq_len) of its cache slot -> [S, Hh, R].

    scores = (q_latent·latent + q_rope·k_rope)·scale; out = softmax(scores)·latent. seq_len 0 gives zeros.
    """
    _require(q_latent.dim() == 3, f"q_latent must be [S, Hh, R], got shape {tuple(q_latent.shape)}")
    S, Hh, R = q_latent.shape
    _require(q_rope.dim() == 3 and q_rope.shape[:2] == (S, Hh),
             f"q_rope must be [S={S}, Hh={Hh}, P], got shape {tuple(q_rope.shape)}")
    P = q_rope.shape[2]
    _require(latent.dim() == 3 and latent.shape[2] == R,
             f"latent must be [num_slots, max_len, R={R}], got shape {tuple(latent.shape)}")
    _require(tuple(k_rope.shape) == (latent.shape[0], latent.shape[1], P),
             f"k_rope must be {(latent.shape[0], latent.shape[1], P)}, got {tuple(k_rope.shape)}")
    _require(tuple(cache_slots.shape) == (S,) and tuple(seq_lens.shape) == (S,),
             f"cache_slots and seq_lens must be [S={S}], got {tuple(cache_slots.shape)} / {tuple(seq_lens.shape)}")
    if not seq_lens.is_cuda and S:  # a cheap bounds check where it costs no device sync
        lo, hi = (int(v) for v in torch.aminmax(seq_lens))
        _require(lo >= 0 and hi <= latent.shape[1],
                 f"seq_lens must lie in [0, max_len={latent.shape[1]}], got {seq_lens.tolist()}")
        lo, hi = (int(v) for v in torch.aminmax(cache_slots))
        _require(lo >= 0 and hi < latent.shape[0],
                 f"cache_slots must lie in [0, num_slots={latent.shape[0]}), got {cache_slots.tolist()}")
    if _use_triton(q_latent, q_rope, latent, k_rope):
        return _mla_decode_mod.mla_decode_triton(q_latent, q_rope, latent, k_rope, cache_slots, seq_lens, softmax_scale)
    return mla_decode_ref(q_latent, q_rope, latent, k_rope, cache_slots, seq_lens, softmax_scale)
