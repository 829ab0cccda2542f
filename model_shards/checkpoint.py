"""HF-layout safetensors checkpoints: save (optionally sharded, with model.safetensors.index.json) and
per-rank load that reads only the rank's slices (safe_open + get_slice)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_shards.config import ModelConfig
from model_shards.model import KimiK2ForCausalLM, is_beyond_layers
from model_shards.parallel import ExpertLayout, rank_slices

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {ckpt_dir}")
    return ModelConfig.from_hf_dict(json.loads(path.read_text()))


def list_checkpoint_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: those named by the index, else model.safetensors."""
    root = Path(ckpt_dir)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (root / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{ckpt_dir} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
    paths = [root / f for f in files]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file {p} named by the index is missing")
    return paths


class ShardWriter:
    """Streams tensors into shards of at most max_shard_bytes; close() writes the index and config.json."""

    def __init__(self, out_dir: str | os.PathLike, cfg: ModelConfig, max_shard_bytes: int | None = None) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.max_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        if self.max_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []  # tensor names of each written shard
        self.total_bytes = 0
        self._tmp_names: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self._flush()
        self.current[name] = tensor.detach().contiguous().cpu()
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self.current:
            return
        tmp = f"shard-{len(self._tmp_names):05d}.tmp.safetensors"
        save_file(self.current, str(self.out / tmp), metadata={"format": "pt"})
        self._tmp_names.append(tmp)
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self._tmp_names)
        if n == 0:
            raise ValueError("ShardWriter: no tensors to save")
        # Stale files from an earlier save would confuse list_checkpoint_files.
        for stale in [self.out / SINGLE_FILE, self.out / INDEX_FILE, *self.out.glob("model-*-of-*.safetensors")]:
            if stale.exists():
                stale.unlink()
        if n == 1:
            os.replace(self.out / self._tmp_names[0], self.out / SINGLE_FILE)
        else:
            weight_map: dict[str, str] = {}
            for i, (tmp, names) in enumerate(zip(self._tmp_names, self.shards)):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(self.out / tmp, self.out / final)
                weight_map.update({name: final for name in names})
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (self.out / "config.json").write_text(json.dumps(self.cfg.to_hf_dict(), indent=2))


def save_checkpoint(model_or_state: KimiK2ForCausalLM | Mapping[str, torch.Tensor], cfg: ModelConfig,
                    out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes config.json + HF-named safetensors (sharded with an index when over max_shard_bytes)."""
    if isinstance(model_or_state, KimiK2ForCausalLM):
        state: Mapping[str, torch.Tensor] = model_or_state.hf_state_dict()
    elif isinstance(model_or_state, Mapping):
        state = model_or_state
    else:
        raise TypeError(f"save_checkpoint expects a KimiK2ForCausalLM or a mapping of tensors, got {type(model_or_state).__name__}")
    writer = ShardWriter(out_dir, cfg, max_shard_bytes)
    for name in _hf_order(state):
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        writer.add(name, state[name])
    writer.close()
    return Path(out_dir)


def _hf_order(state: Mapping[str, Any]) -> list[str]:
    """Embedding first, layers in numeric order, then norm and lm_head (keeps each layer in few shards)."""
    def key(name: str) -> tuple[int, int, str]:
        parts = name.split(".")
        if name.startswith("model.layers.") and parts[2].isdigit():
            return (1, int(parts[2]), name)
        return (0 if "embed_tokens" in name else 2, 0, name)
    return sorted(state, key=key)


def load_checkpoint(ckpt_dir: str | os.PathLike, tp_rank: int = 0, tp_size: int = 1, expert_layout: ExpertLayout = "ep",
                    dtype: torch.dtype | None = None, group: Any = None, device: torch.device | str = "cpu",
                    ) -> tuple[ModelConfig, KimiK2ForCausalLM]:
    """Builds this rank's model and fills it reading only its slices; dtype None = config's torch_dtype."""
    cfg = read_config(ckpt_dir)
    with torch.device(device):  # allocate the rank's parameters where they will live
        model = KimiK2ForCausalLM(cfg, tp_rank, tp_size, group, expert_layout, dtype=dtype, init=False)
    expected = set(model._param_targets())
    loaded: set[str] = set()
    for path in list_checkpoint_files(ckpt_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.endswith(".weight_shape") or is_beyond_layers(name, cfg.num_hidden_layers):
                    continue  # INT4 shape records; MTP layers we do not run
                sl = f.get_slice(name)
                index = rank_slices(name, sl.get_shape(), cfg, tp_rank, tp_size, expert_layout)
                if index is None:
                    continue
                loaded |= model.load_local_tensors({name: sl[index]})
    missing = expected - loaded
    if missing:
        raise KeyError(f"checkpoint {ckpt_dir} lacks {len(missing)} tensors for rank {tp_rank}/{tp_size}, e.g. {sorted(missing)[:5]}")
    return cfg, model
