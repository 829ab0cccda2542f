"""INT4 weight-only GEMM (K2 Thinking's native format) with dequantization inside the tile loop.

Format: packed int32 [out, in/8] where packed[o, j] holds input columns 8j..8j+7 as value+8 nibbles,
lowest bits first; scale [out, in/group] (symmetric, group 32 along the input dim); w = (nibble - 8) * scale.
`load_int4_tile` is shared with the INT4 fused-MoE kernel in fused_moe.py; `mma`/`dot_config` (the dot
product settings every kernel here uses) live here too because this is the lowest kernel module.
"""

from __future__ import annotations

import torch
import triton
import triton.knobs
import triton.language as tl
from torch import Tensor

from model_shards.kernels.reference import INT4_PACK, _check_int4_dims


@triton.jit
def load_int4_tile(p_ptr, s_ptr, k0, K, offs_n, n_mask, stride_pn, stride_sn,
                   BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Dequantized tile of W^T rows k0..k0+BLOCK_K, [BLOCK_K, BLOCK_N] fp32, for W stored as
    (packed [N, K/8] int32, scale [N, K/GROUP]). Each int32 and scale is loaded once per packed row;
    the 8 nibbles are unpacked along a middle axis and folded back into k order (k = 8*j + i)."""
    offs_j = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask = (offs_j < K // 8)[:, None] & n_mask[None, :]
    packed = tl.load(p_ptr + offs_n[None, :] * stride_pn + offs_j[:, None], mask=mask, other=0)  # [BK/8, BN]
    scale = tl.load(s_ptr + offs_n[None, :] * stride_sn + (offs_j * 8 // GROUP)[:, None], mask=mask, other=0.0)
    shifts = tl.arange(0, 8) * 4
    nibble = (packed[:, None, :] >> shifts[None, :, None]) & 0xF  # [BK/8, 8, BN]
    w = (nibble - 8).to(tl.float32) * scale[:, None, :].to(tl.float32)
    return tl.reshape(w, (BLOCK_K, w.shape[2]))


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST computes in fp32: the Triton interpreter multiplies bf16 as raw uint16 bits."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _int4_linear_kernel(
    x_ptr, p_ptr, s_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_pn, stride_sn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = load_int4_tile(p_ptr, s_ptr, k0, K, offs_n, n_mask, stride_pn, stride_sn, BLOCK_K, GROUP)
        acc = mma(a, w.to(a.dtype), acc, DOT_PRECISION, UPCAST)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def dot_config(dtype: torch.dtype) -> dict[str, object]:
    """Constexprs for `mma`: fp32 inputs get exact fp32 products (not TF32) so they match the torch
    reference; under the interpreter 16-bit operands are upcast (bf16 dots are wrong there)."""
    upcast = dtype in (torch.bfloat16, torch.float16) and bool(triton.knobs.runtime.interpret)
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}


def check_int4_weight(packed: Tensor, scale: Tensor, in_features: int, group_size: int, name: str = "weight") -> None:
    """Validate one (or a stack of) INT4 weights against the activation width; raises ValueError naming the mismatch."""
    _check_int4_dims(in_features, group_size)
    if packed.dtype != torch.int32:
        raise ValueError(f"{name} packed must be int32, got {packed.dtype}")
    if packed.shape[-1] * INT4_PACK != in_features:
        raise ValueError(f"{name} packed has {packed.shape[-1]} int32 columns, expected in_features/8 = {in_features // INT4_PACK}")
    if scale.shape[:-1] != packed.shape[:-1] or scale.shape[-1] != in_features // group_size:
        raise ValueError(
            f"{name} scale has shape {tuple(scale.shape)}, expected {(*packed.shape[:-1], in_features // group_size)}"
        )


def int4_linear_triton(x: Tensor, packed: Tensor, scale: Tensor, group_size: int = 32) -> Tensor:
    K = x.shape[-1]
    check_int4_weight(packed, scale, K, group_size)
    N = packed.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    packed = packed.contiguous()
    scale = scale.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*x.shape[:-1], N)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64 if M <= 64 else 128
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _int4_linear_kernel[grid](
        x2, packed, scale, out, M, N, K,
        x2.stride(0), packed.stride(0), scale.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64,
        **dot_config(x.dtype),
    )
    return out.reshape(*x.shape[:-1], N)
