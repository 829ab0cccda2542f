"""Native INT4 routed-expert format (K2 Thinking): symmetric, group 32 along the input dim,
8 nibbles (value+8, lowest bits first) per int32 in `weight_packed` [out, in/8], `weight_scale` [out, in/32]."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

GROUP_SIZE = 32
_EXPERT_WEIGHT_RE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def is_routed_expert_weight(name: str) -> bool:
    return _EXPERT_WEIGHT_RE.match(name) is not None


def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] float -> (packed int32 [..., out, in/8], scale [..., out, in/group] in w's dtype)."""
    if not w.is_floating_point():
        raise TypeError(f"quantize_int4 expects a floating-point weight, got {w.dtype}")
    if w.dim() < 2:
        raise ValueError(f"quantize_int4 expects a weight of rank >= 2, got shape {tuple(w.shape)}")
    in_features = w.shape[-1]
    if in_features % group_size or group_size % 8:
        raise ValueError(f"quantize_int4: in_features {in_features} must be a multiple of group_size {group_size} (itself a multiple of 8)")
    groups = w.float().reshape(*w.shape[:-1], in_features // group_size, group_size)
    # Scale rounded to the stored dtype first, so dequantize reproduces exactly what we quantized against.
    scale = (groups.abs().amax(dim=-1) / 7.0).to(w.dtype)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float().unsqueeze(-1)
    q = torch.clamp(torch.round(groups / safe), -8, 7).to(torch.int64) + 8
    q = q.reshape(*w.shape[:-1], in_features // 8, 8)
    packed = (q << _SHIFTS.to(device=q.device, dtype=torch.int64)).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's complement wrap
    return packed, scale


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n/8] -> signed int8 values in [-8, 7], [..., n]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"weight_packed must be int32, got {packed.dtype}")
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return (nibbles - 8).to(torch.int8).reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, out_features: int, in_features: int,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """(packed [..., out, in/8], scale [..., out, in/g]) -> w [..., out, in] = (nibble - 8) * scale."""
    if packed.shape[-2:] != (out_features, in_features // 8) or in_features % 8:
        raise ValueError(f"weight_packed shape {tuple(packed.shape)} does not match [{out_features}, {in_features}/8]")
    if scale.shape[-2] != out_features or in_features % scale.shape[-1]:
        raise ValueError(f"weight_scale shape {tuple(scale.shape)} does not match [{out_features}, {in_features}/group]")
    group = in_features // scale.shape[-1]
    values = unpack_int4(packed).to(scale.dtype)
    w = values.reshape(*values.shape[:-1], scale.shape[-1], group) * scale.unsqueeze(-1)
    w = w.reshape(*packed.shape[:-2], out_features, in_features)
    return w if dtype is None else w.to(dtype)


def quantize_checkpoint(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                        max_shard_bytes: int | None = None) -> None:
    """Copies an HF checkpoint, replacing every routed-expert `.weight` with INT4 `.weight_packed`,
    `.weight_scale` and `.weight_shape`; other tensors stay as they are. Streams one shard at a time."""
    from safetensors import safe_open

    from model_shards.checkpoint import ShardWriter, list_checkpoint_files, read_config
    from model_shards.config import int4_quantization_config

    src, dst = Path(src_dir), Path(dst_dir)
    cfg = read_config(src)
    if cfg.int4_experts:
        raise ValueError(f"{src} is already an INT4 checkpoint")
    cfg.quantization_config = int4_quantization_config(GROUP_SIZE)
    writer = ShardWriter(dst, cfg, max_shard_bytes)
    for file in list_checkpoint_files(src):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if is_routed_expert_weight(name):
                    packed, scale = quantize_int4(tensor)
                    base = name[: -len(".weight")]
                    writer.add(base + ".weight_packed", packed)
                    writer.add(base + ".weight_scale", scale)
                    writer.add(base + ".weight_shape", torch.tensor(list(tensor.shape), dtype=torch.int32))
                else:
                    writer.add(name, tensor)
    writer.close()
