"""Tensor/expert parallel helpers: which slice of each HF tensor a rank holds, and the collectives.

The slicing rules live here once and serve both `KimiK2ForCausalLM.load_state_dict_hf` (slicing full
tensors in memory) and `checkpoint.load_checkpoint` (reading only the slice from safetensors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from model_shards.config import ModelConfig
from model_shards.shm_collectives import SharedMemoryGroup

ExpertLayout = Literal["ep", "tp"]

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_packed|weight_scale|weight_shape)$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")

# Column-parallel: output rows split (dim 0). Row-parallel: input columns split (dim 1).
_COLUMN = ("self_attn.q_b_proj.weight", "self_attn.q_proj.weight", "self_attn.kv_b_proj.weight",
           "mlp.gate_proj.weight", "mlp.up_proj.weight",
           "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight")
_ROW = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.shared_experts.down_proj.weight")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class TPGroup:
    """One rank's view of its tensor-parallel group (size 1 = no communication). group: a torch.distributed
    process group (None = the default one), or a SharedMemoryGroup over one (ranks on one host)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"bad tensor-parallel rank {self.rank} for size {self.size}")


def all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Sum of x over the TP group (in place; returns x)."""
    if tp.size > 1:
        if isinstance(tp.group, SharedMemoryGroup):
            tp.group.all_reduce(x)
        else:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=tp.group)
    return x


def all_gather_last_dim(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Concatenates each rank's x along the last dim, in rank order."""
    if tp.size == 1:
        return x
    if isinstance(tp.group, SharedMemoryGroup):
        return torch.cat(tp.group.all_gather(x), dim=-1)
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)


def chunk_range(total: int, tp_rank: int, tp_size: int, what: str) -> tuple[int, int]:
    """[start, end) of rank's equal chunk of `total`; a clear error when it does not divide."""
    if total % tp_size:
        raise ValueError(f"{what}: size {total} does not divide evenly over tp_size={tp_size}")
    step = total // tp_size
    return tp_rank * step, (tp_rank + 1) * step


def local_experts(cfg: ModelConfig, tp_rank: int, tp_size: int, expert_layout: ExpertLayout) -> tuple[int, int]:
    """Global ids [start, end) of the routed experts this rank holds."""
    if expert_layout == "ep":
        return chunk_range(cfg.n_routed_experts, tp_rank, tp_size, "n_routed_experts (expert parallel)")
    if expert_layout == "tp":
        return 0, cfg.n_routed_experts
    raise ValueError(f"expert_layout must be 'ep' or 'tp', got {expert_layout!r}")


def check_divisibility(cfg: ModelConfig, tp_size: int, expert_layout: ExpertLayout) -> None:
    """Raises a clear error if cfg cannot be split tp_size ways with this expert layout."""
    chunk_range(cfg.num_attention_heads, 0, tp_size, "num_attention_heads")
    chunk_range(cfg.vocab_size, 0, tp_size, "vocab_size")
    chunk_range(cfg.intermediate_size, 0, tp_size, "intermediate_size")
    chunk_range(cfg.moe_intermediate_size * cfg.n_shared_experts, 0, tp_size, "shared experts' intermediate size")
    local_experts(cfg, 0, tp_size, expert_layout)
    if expert_layout == "tp":
        chunk_range(cfg.moe_intermediate_size, 0, tp_size, "moe_intermediate_size (expert tensor parallel)")
        if cfg.int4_experts:
            chunk_range(cfg.moe_intermediate_size // 32, 0, tp_size, "INT4 groups of moe_intermediate_size")


@dataclass(frozen=True)
class ShardRule:
    """How a rank holds one HF tensor: `dim` None = replicated, else an equal chunk along `dim`.
    `held` False = the tensor belongs to another rank (an expert of another EP rank)."""

    held: bool
    dim: int | None


def shard_rule(name: str, cfg: ModelConfig, tp_size: int, expert_layout: ExpertLayout, tp_rank: int = 0) -> ShardRule:
    """The rule for HF tensor `name` (also for INT4 `weight_packed`/`weight_scale`, sliced on the stored tensor)."""
    if tp_size == 1:
        return ShardRule(True, None)
    m = _EXPERT_RE.match(name)
    if m:
        expert, proj, kind = int(m.group(2)), m.group(3), m.group(4)
        if kind == "weight_shape":
            return ShardRule(True, None)
        if expert_layout == "ep":
            start, end = local_experts(cfg, tp_rank, tp_size, "ep")
            return ShardRule(start <= expert < end, None)
        if expert_layout != "tp":
            raise ValueError(f"expert_layout must be 'ep' or 'tp', got {expert_layout!r}")
        return ShardRule(True, 1 if proj == "down_proj" else 0)
    if name in _VOCAB:
        return ShardRule(True, 0)
    suffix = _LAYER_RE.sub("", name)
    if suffix in _COLUMN:
        return ShardRule(True, 0)
    if suffix in _ROW:
        return ShardRule(True, 1)
    return ShardRule(True, None)


def rank_slices(name: str, shape: tuple[int, ...] | list[int], cfg: ModelConfig, tp_rank: int, tp_size: int,
                expert_layout: ExpertLayout) -> tuple[slice, ...] | None:
    """Index tuple selecting this rank's part of tensor `name` of full `shape`; None if the rank holds none of it."""
    rule = shard_rule(name, cfg, tp_size, expert_layout, tp_rank)
    if not rule.held:
        return None
    index = [slice(None)] * len(shape)
    if rule.dim is not None:
        start, end = chunk_range(int(shape[rule.dim]), tp_rank, tp_size, f"{name} dim {rule.dim}")
        index[rule.dim] = slice(start, end)
    return tuple(index)


def slice_for_rank(name: str, tensor: torch.Tensor, cfg: ModelConfig, tp_rank: int, tp_size: int,
                   expert_layout: ExpertLayout) -> torch.Tensor | None:
    """This rank's part of a full HF tensor (None if another rank owns it)."""
    index = rank_slices(name, tuple(tensor.shape), cfg, tp_rank, tp_size, expert_layout)
    return None if index is None else tensor[index]
