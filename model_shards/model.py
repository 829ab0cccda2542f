"""KimiK2ForCausalLM: the Kimi-K2 / DeepSeek-V3 MoE transformer (MLA + YaRN RoPE + sigmoid-routed experts),
with a ragged batched forward over a latent KV cache and tensor/expert parallel sharding.

Parameter names follow HF's DeepseekV3ForCausalLM except routed experts, which are stacked per layer
([E_local, out, in]) so one fused kernel call runs them; `load_state_dict_hf`/`hf_state_dict` translate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model_shards.config import ModelConfig, yarn_mscale
from model_shards.int4 import dequantize_int4, quantize_int4
from model_shards.parallel import (
    ExpertLayout,
    TPGroup,
    all_gather_last_dim,
    all_reduce,
    check_divisibility,
    chunk_range,
    local_experts,
    slice_for_rank,
)

_kernels_module: ModuleType | None | bool = False  # False = not looked up yet


def _kernels() -> ModuleType | None:
    """model_shards.kernels if present (Triton kernels + torch references), else None (plain torch here)."""
    global _kernels_module
    if _kernels_module is False:
        try:
            from model_shards import kernels as module
            _kernels_module = module if hasattr(module, "fused_moe") else None
        except ModuleNotFoundError as exc:
            if exc.name not in ("model_shards.kernels",):
                raise
            _kernels_module = None
    return _kernels_module  # type: ignore[return-value]


# ---- batch and cache ---------------------------------------------------------------------------------
@dataclass
class ForwardBatch:
    """A flattened ragged batch of S sequences; sequence s owns tokens input_ids[cu_seqlens[s]:cu_seqlens[s+1]]."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute positions within each sequence
    cu_seqlens: torch.Tensor  # [S+1] int64
    cache_slots: torch.Tensor  # [S] int64: the cache row each sequence uses
    context_lens: torch.Tensor  # [S] int64: tokens of that sequence already in the cache before this batch

    @classmethod
    def from_sequences(cls, seqs: list[list[int]], cache_slots: list[int], context_lens: list[int],
                       device: torch.device | str = "cpu") -> "ForwardBatch":
        """Builds a batch from per-sequence new token lists; positions continue after each context."""
        if not (len(seqs) == len(cache_slots) == len(context_lens)) or not seqs:
            raise ValueError("ForwardBatch.from_sequences: seqs, cache_slots and context_lens must be equal, non-empty lists")
        if any(len(s) == 0 for s in seqs):
            raise ValueError("ForwardBatch.from_sequences: every sequence needs at least one new token")
        ids = [t for s in seqs for t in s]
        pos = [c + i for s, c in zip(seqs, context_lens) for i in range(len(s))]
        cu = [0]
        for s in seqs:
            cu.append(cu[-1] + len(s))
        as_t = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
        return cls(as_t(ids), as_t(pos), as_t(cu), as_t(cache_slots), as_t(context_lens))

    def validate(self, cache: "LatentKVCache | None") -> None:
        t, s = self.input_ids.numel(), self.cache_slots.numel()
        if s == 0:
            raise ValueError("ForwardBatch: empty batch (no sequences)")
        if self.input_ids.dim() != 1 or self.positions.shape != self.input_ids.shape:
            raise ValueError(f"ForwardBatch: input_ids and positions must both be [T], got {tuple(self.input_ids.shape)} "
                             f"and {tuple(self.positions.shape)}")
        if self.cu_seqlens.shape != (s + 1,) or self.context_lens.shape != (s,):
            raise ValueError(f"ForwardBatch: cu_seqlens must be [S+1] and context_lens [S] for S={s} cache_slots")
        cu = self.cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != t or any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"ForwardBatch: cu_seqlens {cu} must start at 0, end at T={t} and strictly increase")
        if cache is None:
            if any(c != 0 for c in self.context_lens.tolist()):
                raise ValueError("ForwardBatch: context_lens > 0 needs a LatentKVCache")
            return
        slots = self.cache_slots.tolist()
        if len(set(slots)) != len(slots) or min(slots) < 0 or max(slots) >= cache.num_slots:
            raise ValueError(f"ForwardBatch: cache_slots {slots} must be distinct and within [0, {cache.num_slots})")
        for i, (c, a, b) in enumerate(zip(self.context_lens.tolist(), cu, cu[1:])):
            if c < 0 or c + (b - a) > cache.max_len:
                raise ValueError(f"ForwardBatch: sequence {i} needs {c + b - a} cache positions, cache max_len is {cache.max_len}")


class LatentKVCache:
    """MLA cache: per layer, slot and position only the normed latent (kv_lora_rank) and the roped key (qk_rope_head_dim)."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if num_slots <= 0 or max_len <= 0:
            raise ValueError(f"LatentKVCache needs num_slots > 0 and max_len > 0, got {num_slots}, {max_len}")
        self.num_slots, self.max_len = num_slots, max_len
        # One buffer, [latent | roped key] per position: a token's row is written with one scatter, and
        # decode attention scores both parts with one matmul. `latent` and `k_rope` are views of it.
        r = cfg.kv_lora_rank
        self.kv = torch.zeros(cfg.num_hidden_layers, num_slots, max_len, r + cfg.qk_rope_head_dim, dtype=dtype,
                              device=device)
        self.latent = self.kv[..., :r]
        self.k_rope = self.kv[..., r:]

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Copies the first `length` cached positions of src_slot into dst_slot (prefix reuse)."""
        for name, v in (("src_slot", src_slot), ("dst_slot", dst_slot)):
            if not 0 <= v < self.num_slots:
                raise ValueError(f"copy_prefix: {name}={v} is outside [0, {self.num_slots})")
        if not 0 <= length <= self.max_len:
            raise ValueError(f"copy_prefix: length={length} is outside [0, {self.max_len}]")
        if src_slot == dst_slot or length == 0:
            return
        self.kv[:, dst_slot, :length] = self.kv[:, src_slot, :length]


# ---- building blocks -----------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = _kernels()
        if k is not None:
            return k.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32, cast back, then scale (HF's order of operations).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _linear_weight(out_f: int, in_f: int, dtype: torch.dtype, init: bool) -> nn.Parameter:
    w = torch.empty(out_f, in_f, dtype=dtype)
    if init:
        nn.init.normal_(w, std=0.02)
    return nn.Parameter(w)


class Linear(nn.Module):
    """Bias-free linear holding this rank's slice; the parallel style is decided by the caller."""

    def __init__(self, in_f: int, out_f: int, dtype: torch.dtype, init: bool) -> None:
        super().__init__()
        self.weight = _linear_weight(out_f, in_f, dtype, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Rotary:
    """RoPE (optionally YaRN-scaled) frequencies; HF DeepseekV3's interleaved layout by default."""

    def __init__(self, cfg: ModelConfig) -> None:
        dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.attention_scaling = 1.0
        if cfg.is_yarn:
            rs = cfg.rope_scaling
            factor = float(rs["factor"])
            original = float(rs["original_max_position_embeddings"])
            beta_fast = float(rs.get("beta_fast") or 32.0)
            beta_slow = float(rs.get("beta_slow") or 1.0)
            mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
            if rs.get("attention_factor") is not None:
                self.attention_scaling = float(rs["attention_factor"])
            elif mscale and mscale_all_dim:
                self.attention_scaling = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
            else:
                self.attention_scaling = yarn_mscale(factor)

            def correction_dim(rotations: float) -> float:
                return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

            low, high = correction_dim(beta_fast), correction_dim(beta_slow)
            if rs.get("truncate", True):
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, dim - 1)
            if low == high:
                high += 0.001
            ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
            extrapolate = 1 - ramp  # 1 = keep the original frequency (high-frequency dims)
            inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
        else:
            inv_freq = 1.0 / pos_freqs
        self.inv_freq = inv_freq
        self.interleave = cfg.rope_interleave

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., dim/2] cos and sin (times YaRN's attention scaling) for int positions [...]."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)
        return (freqs.cos() * self.attention_scaling).to(dtype), (freqs.sin() * self.attention_scaling).to(dtype)

    def matrices(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[T, dim, dim] per-token maps R with x @ R == apply(x, cos, sin) for positions [T]: the serving path
        ropes every head's query and the key with one batched matmul instead of a dozen elementwise ops."""
        cos, sin = self.cos_sin(positions, dtype)  # [T, half]
        t, half = cos.shape
        rot = cos.new_zeros(t, 2 * half, 2 * half)
        i = torch.arange(half, device=cos.device)
        first, second = (2 * i, 2 * i + 1) if self.interleave else (i, i + half)
        rot[:, first, i] = cos
        rot[:, second, i] = -sin
        rot[:, second, i + half] = cos
        rot[:, first, i + half] = sin
        return rot

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., dim]; cos/sin broadcastable to [..., dim/2]. Output in HF's (de-interleaved) layout."""
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---- attention -------------------------------------------------------------------------------------------
# Per-call overhead tricks (fused small projections, RoPE as one matmul) only where tensors are small enough
# that launch overhead dominates; beyond these sizes the plain path is as fast and needs no extra memory.
_FUSE_MAX_ELEMENTS = 1 << 22
_ROPE_MATRIX_MAX_ELEMENTS = 1 << 17

class MLAttention(nn.Module):
    """Multi-head latent attention; this rank holds heads [h0, h1)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TPGroup, dtype: torch.dtype, init: bool) -> None:
        super().__init__()
        self.cfg, self.layer_idx, self.tp = cfg, layer_idx, tp
        self.n_heads = cfg.num_attention_heads // tp.size
        h = cfg.hidden_size
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, dtype, init)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.n_heads * cfg.qk_head_dim, dtype, init)
        else:
            self.q_proj = Linear(h, self.n_heads * cfg.qk_head_dim, dtype, init)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype, init)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, self.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype, init)
        self.o_proj = Linear(self.n_heads * cfg.v_head_dim, h, dtype, init)
        self.scale = cfg.softmax_scale

    def _derived_weight(self, name: str, parts: tuple[torch.Tensor, ...],
                        build: "Callable[..., torch.Tensor]") -> torch.Tensor:
        """build(*parts), cached; rebuilt when any part is replaced or updated in place (version counters),
        so hot weight updates reach it. Serving only: no autograd."""
        key = tuple((id(w), w.data_ptr(), w._version) for w in parts)
        cache = self.__dict__.setdefault("_derived_cache", {})
        hit = cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, build(*(w.detach() for w in parts)))
            cache[name] = hit
        return hit[1]

    def _fused_a_weight(self) -> torch.Tensor:
        """[q_a_proj; kv_a_proj_with_mqa] stacked, so serving runs one matmul for both (both read x)."""
        return self._derived_weight("fused_a", (self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight),
                                    lambda a, b: torch.cat([a, b], dim=0))

    def _absorbed_q_weight(self) -> torch.Tensor:
        """[h*(R+P), q_lora]: per head, q_b_proj's nope rows mapped into the latent space through kv_b_proj's
        key half (so q·latent needs no per-step matmul), then its rope rows; times the softmax scale."""
        cfg, h = self.cfg, self.n_heads
        nope, rope_dim, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank

        def build(wq: torch.Tensor, wkv: torch.Tensor) -> torch.Tensor:
            wq = wq.view(h, nope + rope_dim, -1)
            w_k = wkv.view(h, nope + cfg.v_head_dim, r)[:, :nope]  # [h, nope, R]
            q_latent = torch.einsum("hnr,hnq->hrq", w_k, wq[:, :nope])
            return (torch.cat([q_latent, wq[:, nope:]], dim=1) * self.scale).reshape(h * (r + rope_dim), -1)

        return self._derived_weight("absorbed_q", (self.q_b_proj.weight, self.kv_b_proj.weight), build)

    def _absorbed_o_weight(self) -> torch.Tensor:
        """[hidden, h*R]: o_proj composed with kv_b_proj's value half, applied to the attended latents."""
        cfg, h = self.cfg, self.n_heads
        nope, v, r = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

        def build(wo: torch.Tensor, wkv: torch.Tensor) -> torch.Tensor:
            w_v = wkv.view(h, nope + v, r)[:, nope:]  # [h, v, R]
            return torch.einsum("ohv,hvr->ohr", wo.view(wo.shape[0], h, v), w_v).reshape(wo.shape[0], h * r)

        return self._derived_weight("absorbed_o", (self.o_proj.weight, self.kv_b_proj.weight), build)

    def _fast_decode_applies(self, x: torch.Tensor, plan: "_BatchPlan", rope: torch.Tensor | None) -> bool:
        """The fused decode path: pure-decode batches of small fp32 models on CPU (where per-op overhead
        dominates), when the Triton kernels are not in use. Its absorbed weights are larger than the
        factors they replace, so big models (compute-bound) keep the plain path."""
        cfg = self.cfg
        if plan.decode_keys is None or rope is None or x.device.type != "cpu" or x.dtype != torch.float32:
            return False
        if not cfg.q_lora_rank or torch.is_grad_enabled():
            return False
        k = _kernels()
        if k is not None and k.triton_enabled(x):
            return False
        r, p = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        absorbed = self.n_heads * (r + p) * cfg.q_lora_rank + cfg.hidden_size * self.n_heads * r
        return absorbed <= _FUSE_MAX_ELEMENTS and self._fuse_a_projections(x)

    def _decode_fast(self, x: torch.Tensor, plan: "_BatchPlan", cache: LatentKVCache, rope: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, in ~15 ops: absorbed MLA with the softmax scale and both halves of
        kv_b_proj folded into the query and output weights, one score matmul over the cache's
        [latent | roped key] rows and a mask shared by every layer. x [S, H] -> partial o_proj output [S, H]."""
        cfg = self.cfg
        h, r, p = self.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        s = x.shape[0]
        q_a, kv = F.linear(x, self._fused_a_weight()).split([cfg.q_lora_rank, r + p], dim=-1)
        q = F.linear(self.q_a_layernorm(q_a), self._absorbed_q_weight()).view(s, h, r + p)
        roped = torch.bmm(torch.cat([q[..., r:], kv[:, None, r:]], dim=1), rope)  # [S, h+1, P]: heads, then key
        q = torch.cat([q[..., :r], roped[:, :h]], dim=-1)
        rows = cache.kv[self.layer_idx]
        rows[plan.token_slots, plan.token_cache_pos] = torch.cat([self.kv_a_layernorm(kv[:, :r]), roped[:, h]], dim=-1)
        m = plan.decode_keys
        keys = rows[:s, :m] if plan.decode_slots_are_prefix else rows[:, :m].index_select(0, plan.batch.cache_slots)
        scores = torch.bmm(q, keys.transpose(1, 2)).add_(plan.decode_mask)  # [S, h, m]
        o_latent = torch.bmm(torch.softmax(scores, dim=-1), keys[..., :r])  # [S, h, R]
        return F.linear(o_latent.reshape(s, h * r), self._absorbed_o_weight())

    def _fuse_a_projections(self, x: torch.Tensor) -> bool:
        """Only small CPU models gain from saving one matmul launch; big ones would pay a second copy of
        the weights for nothing (their matmuls are compute-bound)."""
        w = self.q_a_proj.weight
        return x.device.type == "cpu" and w.numel() + self.kv_a_proj_with_mqa.weight.numel() <= _FUSE_MAX_ELEMENTS

    def _project(self, x: torch.Tensor, rotary: Rotary, positions: torch.Tensor,
                 rope: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., H] -> q_nope [..., h, nope], q_pe [..., h, rope] (roped), latent [..., R] (normed), k_pe [..., rope] (roped).
        rope: rotary.matrices(positions) for x [T, H], computed once per forward for every layer."""
        cfg = self.cfg
        if cfg.q_lora_rank and not torch.is_grad_enabled() and self._fuse_a_projections(x):
            q_a, kv = F.linear(x, self._fused_a_weight()).split(
                [cfg.q_lora_rank, cfg.kv_lora_rank + cfg.qk_rope_head_dim], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if cfg.q_lora_rank else self.q_proj(x)
            kv = self.kv_a_proj_with_mqa(x)
        q = q.view(*x.shape[:-1], self.n_heads, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        latent, k_pe = kv.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        if rope is not None:  # x is [T, H]: rope the h query heads and the key as h+1 rows per token
            roped = torch.bmm(torch.cat([q_pe, k_pe.unsqueeze(1)], dim=1), rope)
            q_pe, k_pe = roped[:, :-1], roped[:, -1]
        else:
            cos, sin = rotary.cos_sin(positions, x.dtype)
            q_pe = rotary.apply(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2))
            k_pe = rotary.apply(k_pe, cos, sin)
        return q_nope, q_pe, latent, k_pe

    def _expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [..., m, R] -> k_nope [..., m, h, nope], v [..., m, h, v]."""
        kv = self.kv_b_proj(latent).view(*latent.shape[:-1], self.n_heads, self.cfg.qk_nope_head_dim + self.cfg.v_head_dim)
        return kv.split([self.cfg.qk_nope_head_dim, self.cfg.v_head_dim], dim=-1)

    def _attend_naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                      visible: torch.Tensor) -> torch.Tensor:
        """Expanded-KV attention. q_* [B, n, h, d]; latent [B, m, R]; k_pe [B, m, P]; visible [B or 1, n, m]
        says which keys each query sees (every query must see at least one). Returns [B, n, h*v]."""
        k_nope, v = self._expand(latent)
        b, n, h, _ = q_nope.shape
        m = latent.shape[1]
        # One matmul over [nope | rope] (not two summed ones): low-precision dtypes round the sum once.
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, h, n, dk]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(b, m, h, k_pe.shape[-1])], dim=-1).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [B, h, n, m]
        v = v.transpose(1, 2)
        scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        out = torch.matmul(probs, v)  # [B, h, n, v]
        return out.transpose(1, 2).reshape(b, n, h * self.cfg.v_head_dim)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: w_k [h, nope, R] (absorbed into the query), w_v [h, v, R] (into the output)."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(self.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]

    def _attend_absorbed_decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: LatentKVCache,
                                slots: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: attention over the cached latent. q_* [S, h, d] -> [S, h*v]."""
        w_k, w_v = self.absorbed_weights()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_k).transpose(0, 1)  # [S, h, R]
        latent, k_rope = cache.latent[self.layer_idx], cache.k_rope[self.layer_idx]
        k = _kernels()
        if k is not None and hasattr(k, "mla_decode"):
            o_latent = k.mla_decode(q_latent, q_pe, latent, k_rope, slots, seq_lens, self.scale)
        else:
            o_latent = mla_decode_torch(q_latent, q_pe, latent, k_rope, slots, seq_lens, self.scale)
        out = torch.bmm(o_latent.to(q_nope.dtype).transpose(0, 1), w_v.transpose(1, 2))  # [h, S, v]
        return out.transpose(0, 1).reshape(out.shape[1], -1)

    def forward_dense(self, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        """x [B, L, H], positions 0..L-1, no cache -> partial o_proj output [B, L, H] (before all-reduce)."""
        n = x.shape[1]
        positions = torch.arange(n, device=x.device).expand(x.shape[0], -1)
        q_nope, q_pe, latent, k_pe = self._project(x, rotary, positions)
        return self.o_proj(self._attend_causal(q_nope, q_pe, latent, k_pe))

    def _attend_causal(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                       k_pe: torch.Tensor) -> torch.Tensor:
        """Causal expanded-KV attention through torch's fused SDPA (the training path). q_* [B, n, h, d];
        latent [B, n, R]; k_pe [B, n, P] -> [B, n, h*v]."""
        k_nope, v = self._expand(latent)
        b, n, h, _ = q_nope.shape
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, h, n, dk]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(b, n, h, k_pe.shape[-1])], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        dk, dv = q.shape[-1], v.shape[-1]
        # The flash kernels want equal q/k and v head sizes; zero columns added to v give zero output
        # columns (cut off below), so values and gradients are unchanged — and on CPU the fused kernel
        # is ~10x faster than materialising the [n, n] scores.
        if dv < dk:
            v = F.pad(v, (0, dk - dv))
        dtype = q.dtype
        if dtype != torch.float32:  # softmax in fp32, as in the cached paths
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)[..., :dv].to(dtype)
        return out.transpose(1, 2).reshape(b, n, h * dv)

    def forward_cached(self, x: torch.Tensor, plan: "_BatchPlan", cache: LatentKVCache | None, rotary: Rotary,
                       absorbed_decode: bool, rope: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] of a ragged batch; writes latents into the cache; -> partial o_proj output [T, H].
        One-token rows attend over the latent (absorbed) when allowed; the others run as one padded batch."""
        if cache is not None and absorbed_decode and self._fast_decode_applies(x, plan, rope):
            assert rope is not None
            return self._decode_fast(x, plan, cache, rope)
        batch = plan.batch
        q_nope, q_pe, latent, k_pe = self._project(x, rotary, batch.positions, rope)
        if cache is not None:  # one scatter for the whole batch
            row = torch.cat([latent, k_pe], dim=-1).to(cache.kv.dtype)
            cache.kv[self.layer_idx, plan.token_slots, plan.token_cache_pos] = row
        if cache is None or not absorbed_decode or plan.decode is None:
            assert plan.whole is not None
            return self.o_proj(self._attend_padded(q_nope, q_pe, latent, k_pe, cache, plan.whole))
        if plan.prefill is None:
            out = self._attend_absorbed_decode(q_nope, q_pe, cache, batch.cache_slots, batch.context_lens + 1)
            return self.o_proj(out)
        d, p = plan.decode, plan.prefill
        out = x.new_empty(x.shape[0], self.n_heads * self.cfg.v_head_dim)
        out[d.tokens] = self._attend_absorbed_decode(q_nope[d.tokens], q_pe[d.tokens], cache, d.slots, d.ctx + 1)
        out[p.tokens] = self._attend_padded(q_nope, q_pe, latent, k_pe, cache, p)
        return self.o_proj(out)

    def _attend_padded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                       cache: LatentKVCache | None, g: "_PaddedGroup") -> torch.Tensor:
        """Naive attention for the group's sequences at once, each padded to the longest; -> [T_group, h*v]
        in token order. Keys come from the cache (which already holds this step's latents) or, without a
        cache, from this step's own tokens."""
        if cache is not None:
            lat = cache.latent[self.layer_idx, :, : g.keys].index_select(0, g.slots).to(q_nope.dtype)
            kpe = cache.k_rope[self.layer_idx, :, : g.keys].index_select(0, g.slots).to(q_nope.dtype)
        else:
            lat, kpe = latent[g.gather], k_pe[g.gather]
        o = self._attend_naive(q_nope[g.gather], q_pe[g.gather], lat, kpe, g.visible)
        return o.reshape(-1, o.shape[-1])[g.scatter]


@dataclass
class _DecodeRows:
    """The one-token sequences of a batch (absorbed attention over the latent cache)."""

    tokens: torch.Tensor  # [D] their token indices in the batch
    slots: torch.Tensor  # [D] cache slots
    ctx: torch.Tensor  # [D] context lengths before this token


@dataclass
class _PaddedGroup:
    """Sequences run as one padded [G, L, ...] attention batch (L = longest of them)."""

    tokens: torch.Tensor  # [T_g] their token indices in the batch (token order)
    slots: torch.Tensor  # [G] cache slots
    gather: torch.Tensor  # [G, L] batch token index of each padded query (pads repeat a real token)
    scatter: torch.Tensor  # [T_g] row of each real token in the flattened [G*L] output
    visible: torch.Tensor  # [G, L, keys] query i of sequence g sees key j iff j <= ctx_g + i
    keys: int  # key positions attended: max over the group of ctx + new tokens

    @classmethod
    def of(cls, batch: ForwardBatch, seqs: list[int], cu: list[int], ctx: list[int]) -> "_PaddedGroup":
        dev = batch.input_ids.device
        lens = [cu[s + 1] - cu[s] for s in seqs]
        longest = max(lens)
        keys = max(ctx[s] + n for s, n in zip(seqs, lens))
        starts = torch.tensor([cu[s] for s in seqs], dtype=torch.int64, device=dev)
        lens_t = torch.tensor(lens, dtype=torch.int64, device=dev)
        ctx_t = torch.tensor([ctx[s] for s in seqs], dtype=torch.int64, device=dev)
        i = torch.arange(longest, device=dev)
        real = i.unsqueeze(0) < lens_t.unsqueeze(1)  # [G, L]
        gather = starts.unsqueeze(1) + torch.minimum(i.unsqueeze(0), lens_t.unsqueeze(1) - 1)
        tokens = gather[real]
        scatter = (torch.arange(len(seqs), device=dev).unsqueeze(1) * longest + i.unsqueeze(0))[real]
        q_pos = ctx_t.unsqueeze(1) + i.unsqueeze(0)  # [G, L] key position of each query
        visible = torch.arange(keys, device=dev).view(1, 1, -1) <= q_pos.unsqueeze(-1)
        return cls(tokens, batch.cache_slots[seqs], gather, scatter, visible, keys)


@dataclass
class _BatchPlan:
    """Host-side facts about a ForwardBatch, computed once per forward instead of once per layer."""

    batch: ForwardBatch
    token_slots: torch.Tensor  # [T] cache slot of each token
    token_cache_pos: torch.Tensor  # [T] cache position each token's latent goes to
    whole: "_PaddedGroup | None"  # every sequence, for the naive path (built only when that path runs)
    decode: _DecodeRows | None  # one-token sequences, if any
    prefill: "_PaddedGroup | None"  # the other sequences, if any
    # Pure-decode batches: keys attended (longest sequence), an additive [S, 1, keys] mask (-inf past each
    # sequence's end) and whether the sequences sit in cache slots 0..S-1 (keys are then a view).
    decode_keys: int | None = None
    decode_mask: torch.Tensor | None = None
    decode_slots_are_prefix: bool = False

    @classmethod
    def of(cls, batch: ForwardBatch, absorbed_decode: bool, fused_decode: bool = True) -> "_BatchPlan":
        cu = batch.cu_seqlens.tolist()
        ctx = batch.context_lens.tolist()
        lens = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
        t = batch.input_ids.numel()
        token_slots = torch.repeat_interleave(batch.cache_slots, lens, output_size=t)
        offset = torch.repeat_interleave(batch.context_lens - batch.cu_seqlens[:-1], lens, output_size=t)
        pos = offset + torch.arange(t, device=offset.device)
        n_seqs = len(cu) - 1
        one = [s for s in range(n_seqs) if cu[s + 1] - cu[s] == 1]
        more = [s for s in range(n_seqs) if cu[s + 1] - cu[s] > 1]
        decode = None
        if one:
            idx = torch.tensor(one, dtype=torch.int64, device=batch.input_ids.device)
            decode = _DecodeRows(batch.cu_seqlens[idx], batch.cache_slots[idx], batch.context_lens[idx])
        prefill = _PaddedGroup.of(batch, more, cu, ctx) if more else None
        whole = None
        if not absorbed_decode or decode is None:
            whole = prefill if decode is None else _PaddedGroup.of(batch, list(range(n_seqs)), cu, ctx)
        plan = cls(batch, token_slots, pos, whole, decode, prefill)
        if absorbed_decode and fused_decode and prefill is None and pos.device.type == "cpu":  # (no GPU syncs)
            keys = max(ctx) + 1
            past_end = torch.arange(keys, device=pos.device) > batch.context_lens.unsqueeze(1)  # [S, keys]
            plan.decode_keys = keys
            plan.decode_mask = torch.zeros(n_seqs, 1, keys, device=pos.device).masked_fill_(
                past_end.unsqueeze(1), float("-inf"))
            plan.decode_slots_are_prefix = batch.cache_slots.tolist() == list(range(n_seqs))
        return plan


def mla_decode_torch(q_latent: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                     cache_slots: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Absorbed MLA decode in plain torch: q_latent [S,h,R], q_rope [S,h,P] over latent [slots,len,R] -> [S,h,R]."""
    max_len = int(seq_lens.max())
    lat = latent[cache_slots, :max_len].to(q_latent.dtype)  # [S, m, R]
    kr = k_rope[cache_slots, :max_len].to(q_latent.dtype)
    scores = (torch.einsum("shr,smr->shm", q_latent, lat) + torch.einsum("shp,smp->shm", q_rope, kr)) * softmax_scale
    valid = torch.arange(max_len, device=lat.device).unsqueeze(0) < seq_lens.unsqueeze(1)  # [S, m]
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_latent.dtype)
    return torch.einsum("shm,smr->shr", probs, lat)


# ---- MLPs and experts ------------------------------------------------------------------------------------
class DenseMLP(nn.Module):
    """SwiGLU MLP, column-parallel gate/up and row-parallel down (caller all-reduces)."""

    def __init__(self, hidden: int, inter_local: int, dtype: torch.dtype, init: bool) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, inter_local, dtype, init)
        self.up_proj = Linear(hidden, inter_local, dtype, init)
        self.down_proj = Linear(inter_local, hidden, dtype, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid router (fp32): top-k of scores + e_score_correction_bias (group-limited when n_group > 1);
    weights are the chosen unbiased scores, normalised if norm_topk_prob, times routed_scaling_factor."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, init: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = _linear_weight(cfg.n_routed_experts, cfg.hidden_size, dtype, init)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (topk_ids [N, k] global expert ids, topk_weights [N, k] fp32)."""
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if cfg.n_group > 1:
            n = choice.shape[0]
            grouped = choice.view(n, cfg.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            top_groups = group_scores.topk(cfg.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            choice = choice.masked_fill(~keep.unsqueeze(-1).expand_as(grouped).reshape(n, -1), float("-inf"))
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor


class MoE(nn.Module):
    """Routed experts (this rank's experts under EP, or this rank's slice of every expert under TP) + shared experts."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, expert_layout: ExpertLayout, dtype: torch.dtype, init: bool) -> None:
        super().__init__()
        self.cfg, self.tp, self.expert_layout = cfg, tp, expert_layout
        self.expert_start, self.expert_end = local_experts(cfg, tp.rank, tp.size, expert_layout)
        e = self.expert_end - self.expert_start
        h = cfg.hidden_size
        inter = cfg.moe_intermediate_size // (tp.size if expert_layout == "tp" else 1)
        self.num_local_experts, self.inter_local = e, inter
        self.gate = Router(cfg, dtype, init)
        self.int4 = cfg.int4_experts
        self.int4_exact = False  # see KimiK2ForCausalLM.int4_exact
        if self.int4:
            g = 32
            self.register_buffer("w_gate_packed", torch.zeros(e, inter, h // 8, dtype=torch.int32))
            self.register_buffer("w_gate_scale", torch.zeros(e, inter, h // g, dtype=dtype))
            self.register_buffer("w_up_packed", torch.zeros(e, inter, h // 8, dtype=torch.int32))
            self.register_buffer("w_up_scale", torch.zeros(e, inter, h // g, dtype=dtype))
            self.register_buffer("w_down_packed", torch.zeros(e, h, inter // 8, dtype=torch.int32))
            self.register_buffer("w_down_scale", torch.zeros(e, h, inter // g, dtype=dtype))
        else:
            self.w_gate = nn.Parameter(torch.empty(e, inter, h, dtype=dtype))
            self.w_up = nn.Parameter(torch.empty(e, inter, h, dtype=dtype))
            self.w_down = nn.Parameter(torch.empty(e, h, inter, dtype=dtype))
            if init:
                for p in (self.w_gate, self.w_up, self.w_down):
                    nn.init.normal_(p, std=0.02)
            self._set_expert_layout()
        self.shared_experts = (
            DenseMLP(h, cfg.moe_intermediate_size * cfg.n_shared_experts // tp.size, dtype, init)
            if cfg.n_shared_experts else None
        )

    def _set_expert_layout(self) -> None:
        """Stacked expert weights keep their [E, out, in] shape everywhere, but on CPU their memory is
        [E, in, out] (a transposed view): MKL's batched matmul of x [E, c, in] with a contiguous [E, in, out]
        runs ~30% faster than with the transposed operand, and the MoE is most of a CPU decode step. The
        Triton kernels want `in` contiguous, so other devices keep the plain layout."""
        if self.int4:
            return
        for name in ("w_gate", "w_up", "w_down"):
            p = getattr(self, name)
            in_major = p.stride(1) == 1 and p.stride(2) == p.shape[1]
            if p.device.type == "cpu" and not in_major:
                p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)
            elif p.device.type != "cpu" and not p.data.is_contiguous():
                p.data = p.data.contiguous()

    def _apply(self, fn: Any, recurse: bool = True) -> "MoE":
        super()._apply(fn, recurse)  # .to(device) / .cuda() keep strides: pick the layout for the new device
        self._set_expert_layout()
        return self

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-precision stacked local expert weights (dequantized when INT4)."""
        if not self.int4:
            return self.w_gate, self.w_up, self.w_down
        h, i = self.cfg.hidden_size, self.inter_local
        dt = self.w_gate_scale.dtype
        return (dequantize_int4(self.w_gate_packed, self.w_gate_scale, i, h, dt),
                dequantize_int4(self.w_up_packed, self.w_up_scale, i, h, dt),
                dequantize_int4(self.w_down_packed, self.w_down_scale, h, i, dt))

    def _experts_forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Σ_j w[n,j]·down_e(silu(gate_e x)·up_e x) over this rank's experts; ids are LOCAL, others skipped.
        The one place fused kernels replace."""
        k = _kernels()
        if k is not None:
            if self.int4 and hasattr(k, "fused_moe_int4"):
                return k.fused_moe_int4(x, self.w_gate_packed, self.w_gate_scale, self.w_up_packed, self.w_up_scale,
                                        self.w_down_packed, self.w_down_scale, topk_ids, topk_weights,
                                        exact=self.int4_exact)
            if not self.int4:
                return k.fused_moe(x, self.w_gate, self.w_up, self.w_down, topk_ids, topk_weights)
        w_gate, w_up, w_down = self.expert_weights()
        out = torch.zeros_like(x)
        for e in torch.unique(topk_ids).tolist():
            if not 0 <= e < self.num_local_experts:
                continue
            tok, slot = torch.where(topk_ids == e)
            h = F.silu(F.linear(x[tok], w_gate[e])) * F.linear(x[tok], w_up[e])
            y = F.linear(h, w_down[e]) * topk_weights[tok, slot].unsqueeze(-1)
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> partial output [N, H] (caller all-reduces once for experts + shared experts)."""
        ids, weights = self.gate(x)
        local_ids = ids - self.expert_start
        out = self._experts_forward(x, local_ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TPGroup, expert_layout: ExpertLayout,
                 dtype: torch.dtype, init: bool) -> None:
        super().__init__()
        self.tp = tp
        self.self_attn = MLAttention(cfg, layer_idx, tp, dtype, init)
        if cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(cfg, tp, expert_layout, dtype, init)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size // tp.size, dtype, init)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.mlp(self.post_attention_layernorm(x).reshape(-1, shape[-1]))
        return x + all_reduce(y, self.tp).view(shape)


class _Backbone(nn.Module):
    """Holds `embed_tokens`, `layers`, `norm` so parameter names read `model.…` as in HF."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, expert_layout: ExpertLayout, dtype: torch.dtype, init: bool) -> None:
        super().__init__()
        vocab_local = cfg.vocab_size // tp.size
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = _linear_weight(vocab_local, cfg.hidden_size, dtype, init)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp, expert_layout, dtype, init) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class KimiK2ForCausalLM(nn.Module):
    """Kimi-K2 causal LM; under TP each rank holds its slices and returns full-vocab logits."""

    def __init__(self, cfg: ModelConfig, tp_rank: int = 0, tp_size: int = 1, group: Any = None,
                 expert_layout: ExpertLayout = "ep", *, dtype: torch.dtype | None = None, init: bool = True) -> None:
        super().__init__()
        if expert_layout not in ("ep", "tp"):
            raise ValueError(f"expert_layout must be 'ep' or 'tp', got {expert_layout!r}")
        check_divisibility(cfg, tp_size, expert_layout)
        self.cfg = cfg
        self.tp = TPGroup(tp_rank, tp_size, group)
        self.expert_layout: ExpertLayout = expert_layout
        dtype = dtype or cfg.dtype
        self.vocab_start, self.vocab_end = chunk_range(cfg.vocab_size, tp_rank, tp_size, "vocab_size")
        self.model = _Backbone(cfg, self.tp, expert_layout, dtype, init)
        if cfg.tie_word_embeddings:
            self.lm_head = nn.Module()
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size // tp_size, dtype, init)
        self.rotary = Rotary(cfg)
        # "auto": absorbed MLA for decode rows, through the fused CPU decode path where it applies;
        # "absorbed": absorbed MLA through the kernels only; "naive": always expand the latent (tests/debugging).
        self.attention_path = "auto"

    @property
    def int4_exact(self) -> bool:
        """INT4 routed experts on CPU: False (default) runs ATen's packed int4 kernel, which reads the 4-bit
        weights as they are but rounds the experts' activations to bf16; True dequantizes each busy expert
        (results equal to the full-precision model with the dequantized weights, several times slower)."""
        return any(getattr(m, "int4_exact", False) for m in self.modules() if isinstance(m, MoE))

    @int4_exact.setter
    def int4_exact(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, MoE):
                m.int4_exact = bool(value)

    # ---- forward ---------------------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token id out of range [0, {self.cfg.vocab_size}): min {int(ids.min())}, max {int(ids.max())}")
        w = self.model.embed_tokens.weight
        if self.tp.size == 1:
            return F.embedding(ids, w)
        # Vocab-parallel: each rank embeds the ids it owns, zeros elsewhere, then sum.
        local = ids - self.vocab_start
        owned = (local >= 0) & (local < w.shape[0])
        out = F.embedding(local.clamp(0, w.shape[0] - 1), w) * owned.unsqueeze(-1).to(w.dtype)
        return all_reduce(out, self.tp)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.model.norm(h), self.lm_head.weight).float()
        return all_gather_last_dim(logits, self.tp)

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, cache: LatentKVCache | None) -> torch.Tensor:
        """Runs a ragged batch, writing its latents into `cache`; -> logits of each sequence's LAST token, [S, vocab] fp32."""
        batch.validate(cache)
        absorbed = cache is not None and self.attention_path in ("auto", "absorbed")
        plan = _BatchPlan.of(batch, absorbed, fused_decode=self.attention_path == "auto")
        x = self._embed(batch.input_ids)
        dim = self.cfg.qk_rope_head_dim
        rope = None  # per-token RoPE maps, built once for every layer, when the batch is small
        if batch.positions.numel() * dim * dim <= _ROPE_MATRIX_MAX_ELEMENTS:
            rope = self.rotary.matrices(batch.positions, x.dtype)
        for layer in self.model.layers:
            attn = layer.self_attn.forward_cached(layer.input_layernorm(x), plan, cache, self.rotary, absorbed, rope)
            x = x + all_reduce(attn, self.tp)
            x = layer.mlp_block(x)
        last = batch.cu_seqlens[1:] - 1
        return self._logits(x[last])

    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, L, vocab] fp32 logits, no cache (parity tests, training).
        Differentiable at tp_size 1; under TP it runs without autograd (the collectives carry no gradients)."""
        if input_ids.dim() != 2:
            raise ValueError(f"forward_logits expects input_ids of shape [B, L], got {tuple(input_ids.shape)}")
        if self.tp.size > 1 and torch.is_grad_enabled():
            with torch.no_grad():
                return self.forward_logits(input_ids)
        x = self._embed(input_ids)
        for layer in self.model.layers:
            x = x + all_reduce(layer.self_attn.forward_dense(layer.input_layernorm(x), self.rotary), self.tp)
            x = layer.mlp_block(x)
        return self._logits(x)

    # ---- weights ---------------------------------------------------------------------------------------
    def _param_targets(self) -> dict[str, tuple[torch.Tensor, int | None]]:
        """HF name -> (local tensor to copy into, expert index within the stacked tensor or None)."""
        targets: dict[str, tuple[torch.Tensor, int | None]] = {}
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            m = re.match(r"^model\.layers\.(\d+)\.mlp\.w_(gate|up|down)(_packed|_scale)?$", name)
            if m:
                layer, proj, kind = m.group(1), m.group(2), m.group(3)
                moe = self.model.layers[int(layer)].mlp
                suffix = {None: "weight", "_packed": "weight_packed", "_scale": "weight_scale"}[kind]
                for e in range(moe.num_local_experts):
                    hf = f"model.layers.{layer}.mlp.experts.{moe.expert_start + e}.{proj}_proj.{suffix}"
                    targets[hf] = (t, e)
                continue
            targets[name] = (t, None)
        if self.cfg.tie_word_embeddings:
            targets.pop("lm_head.weight", None)
        return targets

    @torch.no_grad()
    def load_local_tensors(self, tensors: Mapping[str, torch.Tensor], strict: bool = False) -> set[str]:
        """Copies tensors ALREADY sliced for this rank (HF names) into the model; returns the names loaded.
        Full-precision routed-expert weights are quantized on the fly when the model is INT4."""
        targets = self._param_targets()
        loaded: set[str] = set()
        for name, value in tensors.items():
            if name.endswith(".weight_shape") or is_beyond_layers(name, self.cfg.num_hidden_layers):
                continue  # INT4 shape records and MTP layers carry nothing we hold
            if name.endswith(".weight") and name not in targets and name + "_packed" in targets:
                packed, scale = quantize_int4(value.to(self.model.norm.weight.dtype))
                for suffix, v in (("_packed", packed), ("_scale", scale)):
                    dst, e = targets[name + suffix]
                    (dst[e] if e is not None else dst).copy_(v)
                    loaded.add(name + suffix)
                continue
            if name not in targets:
                raise KeyError(f"unexpected tensor {name!r} for this model (rank {self.tp.rank}/{self.tp.size}, "
                               f"layout {self.expert_layout}, int4={self.cfg.int4_experts})")
            dst, e = targets[name]
            dst_view = dst[e] if e is not None else dst
            if tuple(value.shape) != tuple(dst_view.shape):
                raise ValueError(f"tensor {name!r}: got shape {tuple(value.shape)}, this rank expects {tuple(dst_view.shape)}")
            dst_view.copy_(value.to(dst_view.dtype) if dst_view.dtype != torch.int32 else value)
            loaded.add(name)
        if strict:
            missing = set(targets) - loaded
            if missing:
                raise KeyError(f"missing {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
        return loaded

    def load_state_dict_hf(self, tensors: Mapping[str, torch.Tensor], strict: bool = False) -> None:
        """Loads FULL HF-named tensors (any subset, for hot updates); each rank keeps its slice.
        strict=True also requires every tensor this rank holds to be present."""
        local: dict[str, torch.Tensor] = {}
        for name, value in tensors.items():
            if is_beyond_layers(name, self.cfg.num_hidden_layers):
                continue
            part = slice_for_rank(name, value, self.cfg, self.tp.rank, self.tp.size, self.expert_layout)
            if part is not None:
                local[name] = part
        self.load_local_tensors(local, strict=strict)

    @torch.no_grad()
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Full HF-named tensors (only at tp_size 1; INT4 experts as weight_packed/weight_scale/weight_shape)."""
        if self.tp.size != 1:
            raise ValueError("hf_state_dict needs tp_size == 1; save each rank's slices another way")
        out: dict[str, torch.Tensor] = {}
        for name, (t, e) in self._param_targets().items():
            out[name] = (t[e] if e is not None else t).detach().clone()
            if name.endswith(".weight_packed"):
                rows, cols = out[name].shape
                out[name[: -len("_packed")] + "_shape"] = torch.tensor([rows, cols * 8], dtype=torch.int32)
        return out


def is_beyond_layers(name: str, num_layers: int) -> bool:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= num_layers
