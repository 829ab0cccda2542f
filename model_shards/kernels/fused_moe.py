"""Fused MoE: align (token, expert) assignments into per-expert blocks, then two grouped GEMMs.

1. `moe_align_block_size` sorts the N·k assignments by expert and pads each expert's run to a multiple of
   BLOCK_M, so every BLOCK_M-row tile of the sorted list belongs to exactly one expert (experts with no
   tokens get no tiles; ids outside [0, E), i.e. experts of other EP ranks, are dropped).
2. gate/up grouped GEMM with SiLU-and-mul fused: h[a] = silu(x[tok(a)] W_gate[e]^T) * (x[tok(a)] W_up[e]^T).
3. down grouped GEMM scaled by the routing weight: y[a] = w[a] · h[a] W_down[e]^T; then sum over the k slots.
Both GEMMs optionally read INT4 weights, dequantized inside the tile loop (see int4.py).
Everything stays on device: no host synchronisation, so decode steps can be captured in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from model_shards.kernels.int4 import dot_config, load_int4_tile, mma


@dataclass
class AlignedAssignments:
    """Assignments sorted by expert and padded per expert to block_m (moe_align_block_size output)."""

    sorted_ids: Tensor  # [max_padded] int32: flat assignment index n*k+j, or num_assign for padding
    expert_ids: Tensor  # [max_padded // block_m] int32: expert of each tile, -1 past the end
    num_padded: Tensor  # [1] int32: used length of sorted_ids (tiles beyond it are skipped)
    block_m: int


def moe_align_block_size(topk_ids: Tensor, num_experts: int, block_m: int) -> AlignedAssignments:
    """Sort flat assignments by expert, padding every expert's run to a multiple of block_m (torch ops, no sync)."""
    if num_experts <= 0 or block_m <= 0:
        raise ValueError(f"moe_align_block_size needs num_experts > 0 and block_m > 0, got {num_experts}, {block_m}")
    flat = topk_ids.reshape(-1).long()
    num_assign = flat.numel()
    device = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))  # invalid ids sort last
    # scatter_add, not bincount: CUDA bincount reads the max id back to the host.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    expert_of = sorted_key.clamp(max=num_experts - 1)
    rank = torch.arange(num_assign, device=device) - cnt_start[expert_of]
    # A static upper bound on the padded length avoids reading the counts back to the host.
    max_padded = triton.cdiv(num_assign + min(num_experts, num_assign) * (block_m - 1), block_m) * block_m
    dest = torch.where(sorted_key < num_experts, pad_start[expert_of] + rank, torch.full_like(rank, max_padded))
    sorted_ids = torch.full((max_padded + 1,), num_assign, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))  # invalid assignments land in the spare last slot
    tile_starts = torch.arange(0, max_padded, block_m, device=device)
    expert_ids = torch.searchsorted(pad_end, tile_starts, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, torch.full_like(expert_ids, -1)).to(torch.int32)
    num_padded = pad_end[-1:].to(torch.int32)
    return AlignedAssignments(sorted_ids[:max_padded], expert_ids, num_padded, block_m)


@triton.jit
def _load_weight_tile(w_ptr, s_ptr, k0, K, offs_k, offs_n, n_mask, stride_wn, stride_sn,
                      INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_K, BLOCK_N] tile (rows k0..) of W^T for one expert's W [N, K] (plain, or INT4 packed + scales)."""
    if INT4:
        w = load_int4_tile(w_ptr, s_ptr, k0, K, offs_n, n_mask, stride_wn, stride_sn, BLOCK_K, GROUP)
    else:
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=(offs_k < K)[:, None] & n_mask[None, :], other=0.0)
    return w


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, g_ptr, u_ptr,
    sorted_ptr, expert_ptr, num_padded_ptr,
    num_assign, H, I, k_per_split,
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
    TOP_K: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """One (tile, N block[, K slice]). SPLIT_K: program axis 2 takes k_per_split of H and adds its partial
    gate and up sums into fp32 g/u ([num_assign, I], atomics): more programs when few tokens are routed,
    and SiLU-and-mul runs after all slices are in."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ptr + offs_m).to(tl.int64)
    row_mask = ids < num_assign
    tok = ids // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    wg_base = wg_ptr + expert * stride_we
    wu_base = wu_ptr + expert * stride_we
    sg_base = sg_ptr + expert * stride_se
    su_base = su_ptr + expert * stride_se
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, H), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < H
        a = tl.load(x_ptr + tok[:, None] * stride_xm + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wg = _load_weight_tile(wg_base, sg_base, k0, H, offs_k, offs_n, n_mask, stride_wn, stride_sn, INT4, GROUP, BLOCK_K)
        wu = _load_weight_tile(wu_base, su_base, k0, H, offs_k, offs_n, n_mask, stride_wn, stride_sn, INT4, GROUP, BLOCK_K)
        acc_g = mma(a, wg.to(a.dtype), acc_g, DOT_PRECISION, UPCAST)
        acc_u = mma(a, wu.to(a.dtype), acc_u, DOT_PRECISION, UPCAST)
    out_mask = row_mask[:, None] & n_mask[None, :]
    if SPLIT_K:
        tl.atomic_add(g_ptr + ids[:, None] * I + offs_n[None, :], acc_g, mask=out_mask)
        tl.atomic_add(u_ptr + ids[:, None] * I + offs_n[None, :], acc_u, mask=out_mask)
    else:
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(h_ptr + ids[:, None] * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _moe_down_kernel(
    h_ptr, wd_ptr, sd_ptr, topk_w_ptr, y_ptr,
    sorted_ptr, expert_ptr, num_padded_ptr,
    num_assign, H, I, k_per_split,
    stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_ym,
    INT4: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """One (tile, N block[, K slice]); SPLIT_K adds the weighted partial into fp32 y with atomics."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ptr + offs_m).to(tl.int64)
    row_mask = ids < num_assign
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    wd_base = wd_ptr + expert * stride_we
    sd_base = sd_ptr + expert * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, I), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < I
        a = tl.load(h_ptr + ids[:, None] * stride_hm + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = _load_weight_tile(wd_base, sd_base, k0, I, offs_k, offs_n, n_mask, stride_wn, stride_sn, INT4, GROUP, BLOCK_K)
        acc = mma(a, w.to(a.dtype), acc, DOT_PRECISION, UPCAST)
    route_w = tl.load(topk_w_ptr + ids, mask=row_mask, other=0.0).to(tl.float32)
    acc = acc * route_w[:, None]
    out_mask = row_mask[:, None] & n_mask[None, :]
    if SPLIT_K:
        tl.atomic_add(y_ptr + ids[:, None] * stride_ym + offs_n[None, :], acc, mask=out_mask)
    else:
        tl.store(y_ptr + ids[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _block_m(num_assign: int, num_experts: int) -> int:
    # Decode routes ~1 token per expert: small tiles waste less padding; prefill fills bigger tiles.
    per_expert = num_assign / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def fused_moe_triton(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    scales: tuple[Tensor, Tensor, Tensor] | None = None,
    group_size: int = 32,
    split_k: int = 1,
) -> Tensor:
    """Triton fused MoE. With `scales`, the three weights are INT4 packed ([E, out, in/8] int32) and
    `scales` holds their ([E, out, in/group]) scales; shapes are validated by the caller (kernels/__init__).
    `split_k` > 1 splits both GEMMs' reduction over that many programs per tile (fp32 atomics): for
    decode at one or a few tokens, where one program per (tile, N block) is too few to keep HBM busy.
    Sums then run in another order, so results differ from split_k=1 by rounding."""
    N, H = x.shape
    top_k = topk_ids.shape[1]
    num_experts = w_gate.shape[0]
    I = w_gate.shape[1]
    num_assign = N * top_k
    if num_assign == 0 or num_experts == 0:
        return torch.zeros_like(x)
    int4 = scales is not None
    x = _last_contiguous(x)
    w_gate, w_up, w_down = _last_contiguous(w_gate), _last_contiguous(w_up), _last_contiguous(w_down)
    if w_gate.stride() != w_up.stride():  # the kernel walks gate and up with one set of strides
        w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    if int4:
        s_gate, s_up, s_down = (_last_contiguous(s) for s in scales)
        if s_gate.stride() != s_up.stride():
            s_gate, s_up = s_gate.contiguous(), s_up.contiguous()
    else:
        s_gate, s_up, s_down = w_gate, w_up, w_down  # unused by the kernels when INT4=False
    block_m = _block_m(num_assign, num_experts)
    aligned = moe_align_block_size(topk_ids, num_experts, block_m)
    num_tiles = aligned.expert_ids.numel()
    dots = dot_config(x.dtype)
    block_k = 64 if int4 else 32 if x.dtype == torch.float32 else 64
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    split = split_k > 1
    # Each slice covers whole BLOCK_K steps (and so whole INT4 groups, which divide BLOCK_K).
    k_per_split1 = triton.cdiv(triton.cdiv(H, split_k), block_k) * block_k
    k_per_split2 = triton.cdiv(triton.cdiv(I, split_k), block_k) * block_k
    h = torch.empty((num_assign, I), dtype=x.dtype, device=x.device)
    # Split partial sums (zeroed: assignments of other ranks' experts and padding get no atomics).
    g = torch.zeros((num_assign, I) if split else (1,), dtype=torch.float32, device=x.device)
    u = torch.zeros_like(g)
    block_n1 = 64
    _moe_gate_up_kernel[(num_tiles, triton.cdiv(I, block_n1), triton.cdiv(H, k_per_split1))](
        x, w_gate, w_up, s_gate, s_up, h, g, u,
        aligned.sorted_ids, aligned.expert_ids, aligned.num_padded,
        num_assign, H, I, k_per_split1,
        x.stride(0), w_gate.stride(0), w_gate.stride(1), s_gate.stride(0), s_gate.stride(1), h.stride(0),
        TOP_K=top_k, INT4=int4, GROUP=group_size,
        BLOCK_M=block_m, BLOCK_N=block_n1, BLOCK_K=block_k, SPLIT_K=split, **dots,
    )
    if split:
        h = (torch.nn.functional.silu(g) * u).to(x.dtype)
    # Zero rows stay for assignments routed to other ranks' experts, so the k-sum skips them.
    y = torch.zeros((num_assign, H), dtype=torch.float32 if split else x.dtype, device=x.device)
    route_w = topk_weights.reshape(-1).contiguous()
    block_n2 = 64
    _moe_down_kernel[(num_tiles, triton.cdiv(H, block_n2), triton.cdiv(I, k_per_split2))](
        h, w_down, s_down, route_w, y,
        aligned.sorted_ids, aligned.expert_ids, aligned.num_padded,
        num_assign, H, I, k_per_split2,
        h.stride(0), w_down.stride(0), w_down.stride(1), s_down.stride(0), s_down.stride(1), y.stride(0),
        INT4=int4, GROUP=group_size,
        BLOCK_M=block_m, BLOCK_N=block_n2, BLOCK_K=block_k, SPLIT_K=split, **dots,
    )
    return y.view(N, top_k, H).sum(dim=1, dtype=torch.float32).to(x.dtype)
