"""Absorbed-MLA decode attention over the latent cache, split-K over the sequence (flash-decoding).

Pass 1: program (sequence, head block, split) runs an online softmax over its share of the sequence's
cache rows and writes a normalized partial output plus its log-sum-exp. Pass 2 merges the splits.
Scores use both the latent (R wide) and the roped key (P wide); values are the latent itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from model_shards.kernels.int4 import dot_config, mma


@triton.jit
def _mla_split_kernel(
    qn_ptr, qr_ptr, lat_ptr, kr_ptr, slots_ptr, lens_ptr, part_ptr, lse_ptr,
    Hh, R, P, scale,
    stride_qn_s, stride_qn_h, stride_qr_s, stride_qr_h,
    stride_lat_slot, stride_lat_t, stride_kr_slot, stride_kr_t,
    stride_part_s, stride_part_h, stride_part_split, stride_lse_s, stride_lse_h,
    NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    s = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + s).to(tl.int32)
    slot = tl.load(slots_ptr + s).to(tl.int64)
    chunk = tl.cdiv(seq_len, NUM_SPLITS)
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    h_mask = offs_h < Hh
    r_mask = offs_r < R
    p_mask = offs_p < P
    qn = tl.load(qn_ptr + s * stride_qn_s + offs_h[:, None] * stride_qn_h + offs_r[None, :],
                 mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    qr = tl.load(qr_ptr + s * stride_qr_s + offs_h[:, None] * stride_qr_h + offs_p[None, :],
                 mask=h_mask[:, None] & p_mask[None, :], other=0.0)
    lat_base = lat_ptr + slot * stride_lat_slot
    kr_base = kr_ptr + slot * stride_kr_slot

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_N):
        offs_t = t0 + tl.arange(0, BLOCK_N)
        t_mask = offs_t < end
        # Every dot runs in the query's dtype (a cache stored narrower than q is widened here).
        lat = tl.load(lat_base + offs_t[:, None] * stride_lat_t + offs_r[None, :],
                      mask=t_mask[:, None] & r_mask[None, :], other=0.0).to(qn.dtype)
        kr = tl.load(kr_base + offs_t[:, None] * stride_kr_t + offs_p[None, :],
                     mask=t_mask[:, None] & p_mask[None, :], other=0.0).to(qr.dtype)
        scores = mma(qn, tl.trans(lat), tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32), DOT_PRECISION, UPCAST)
        scores = mma(qr, tl.trans(kr), scores, DOT_PRECISION, UPCAST)
        scores = tl.where(t_mask[None, :], scores * scale, float("-inf"))
        # Every block holds at least one live token (t0 < end), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = mma(p.to(lat.dtype), lat, acc * alpha[:, None], DOT_PRECISION, UPCAST)
        m_i = m_new

    has = l_i > 0.0  # false for an empty split (short sequence) or seq_len 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(part_ptr + s * stride_part_s + offs_h[:, None] * stride_part_h + split * stride_part_split + offs_r[None, :],
             out, mask=h_mask[:, None] & r_mask[None, :])
    tl.store(lse_ptr + s * stride_lse_s + offs_h * stride_lse_h + split, lse, mask=h_mask)


@triton.jit
def _mla_merge_kernel(
    part_ptr, lse_ptr, out_ptr, R,
    stride_part_s, stride_part_h, stride_part_split, stride_lse_s, stride_lse_h, stride_out_s, stride_out_h,
    NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    offs_sp = tl.arange(0, BLOCK_SPLITS)
    offs_r = tl.arange(0, BLOCK_R)
    sp_mask = offs_sp < NUM_SPLITS
    r_mask = offs_r < R
    lse = tl.load(lse_ptr + s * stride_lse_s + h * stride_lse_h + offs_sp, mask=sp_mask, other=float("-inf"))
    g = tl.max(lse, axis=0)
    g = tl.where(g == float("-inf"), 0.0, g)  # all splits empty: weights become 0, output 0
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - g))
    part = tl.load(part_ptr + s * stride_part_s + h * stride_part_h + offs_sp[:, None] * stride_part_split + offs_r[None, :],
                   mask=sp_mask[:, None] & r_mask[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + s * stride_out_s + h * stride_out_h + offs_r, out.to(out_ptr.dtype.element_ty), mask=r_mask)


def _num_splits(num_seqs: int, head_blocks: int, max_len: int, block_n: int) -> int:
    # Enough programs to fill a large GPU (~132 SMs x 2), without splits shorter than two key blocks.
    want = triton.cdiv(264, max(num_seqs * head_blocks, 1))
    return max(1, min(want, triton.cdiv(max_len, 2 * block_n), 16))


def mla_decode_triton(
    q_latent: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    k_rope: Tensor,
    cache_slots: Tensor,
    seq_lens: Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
) -> Tensor:
    """Triton absorbed-MLA decode; shapes are validated by the caller (kernels/__init__)."""
    S, Hh, R = q_latent.shape
    P = q_rope.shape[-1]
    max_len = latent.shape[1]
    out = torch.empty((S, Hh, R), dtype=q_latent.dtype, device=q_latent.device)
    if S == 0 or Hh == 0:
        return out
    q_latent = q_latent if q_latent.stride(-1) == 1 else q_latent.contiguous()
    q_rope = q_rope if q_rope.stride(-1) == 1 else q_rope.contiguous()
    latent = latent if latent.stride(-1) == 1 else latent.contiguous()
    k_rope = k_rope if k_rope.stride(-1) == 1 else k_rope.contiguous()
    block_h = 16  # tl.dot needs >= 16 rows; fewer heads are masked
    block_r = max(16, triton.next_power_of_2(R))
    block_p = max(16, triton.next_power_of_2(P))
    block_n = 16 if q_latent.dtype == torch.float32 or block_r > 512 else 32
    head_blocks = triton.cdiv(Hh, block_h)
    splits = num_splits or _num_splits(S, head_blocks, max_len, block_n)
    part = torch.empty((S, Hh, splits, R), dtype=torch.float32, device=q_latent.device)
    lse = torch.empty((S, Hh, splits), dtype=torch.float32, device=q_latent.device)
    _mla_split_kernel[(S, head_blocks, splits)](
        q_latent, q_rope, latent, k_rope, cache_slots, seq_lens, part, lse,
        Hh, R, P, float(softmax_scale),
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        NUM_SPLITS=splits, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_P=block_p,
        **dot_config(q_latent.dtype), num_stages=2, num_warps=8 if block_r >= 256 else 4,
    )
    _mla_merge_kernel[(S, Hh)](
        part, lse, out, R,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        NUM_SPLITS=splits, BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)), BLOCK_R=block_r,
    )
    return out
