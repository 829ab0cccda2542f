"""ModelConfig: the Kimi-K2 / DeepSeek-V3 architecture hyper-parameters, named exactly as in HF's config.json."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class ModelConfig:
    """Field names mirror transformers' DeepseekV3Config so config.json round-trips."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 64
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    q_lora_rank: int | None = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    torch_dtype: str = "float32"
    attention_bias: bool = False
    # compressed-tensors style description of the native INT4 routed experts, None = full precision.
    quantization_config: dict[str, Any] | None = None
    # Unknown config.json keys, kept so a load/save round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_routed_experts", "num_experts_per_tok", "moe_layer_freq", "n_group", "topk_group",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"ModelConfig.q_lora_rank must be a positive int or None, got {self.q_lora_rank!r}")
        if self.n_shared_experts < 0:
            raise ValueError(f"ModelConfig.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                f"({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"ModelConfig.n_routed_experts ({self.n_routed_experts}) must divide by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"ModelConfig.topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ValueError("ModelConfig: group-limited routing needs at least 2 experts per group")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"ModelConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.scoring_func != "sigmoid":
            raise ValueError(f"ModelConfig.scoring_func {self.scoring_func!r} is not supported (only 'sigmoid')")
        if self.hidden_act != "silu":
            raise ValueError(f"ModelConfig.hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.attention_bias:
            raise ValueError("ModelConfig.attention_bias=True is not supported (Kimi-K2 has no attention bias)")
        if self.torch_dtype not in _DTYPES:
            raise ValueError(f"ModelConfig.torch_dtype must be one of {sorted(_DTYPES)}, got {self.torch_dtype!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("yarn", "default"):
                raise ValueError(f"ModelConfig.rope_scaling type {kind!r} is not supported (only 'yarn')")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in self.rope_scaling:
                        raise ValueError(f"ModelConfig.rope_scaling (yarn) is missing {key!r}")
        if self.quantization_config is not None:
            qc = self.quantization_config
            bits = [g.get("weights", {}).get("num_bits") for g in qc.get("config_groups", {}).values()]
            if qc.get("quant_method") != "compressed-tensors" or bits != [4]:
                raise ValueError(
                    f"ModelConfig.quantization_config: only compressed-tensors INT4 routed experts are supported, got "
                    f"quant_method={qc.get('quant_method')!r} num_bits={bits} (dequantize FP8 checkpoints first)")
            if self.int4_group_size != 32:
                raise ValueError(f"ModelConfig.quantization_config: only group_size 32 INT4 is supported, got {self.int4_group_size}")

    # ---- derived values -----------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.torch_dtype]

    @property
    def is_yarn(self) -> bool:
        return self.rope_scaling is not None and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) == "yarn"

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 (the softmax correction)."""
        scale = self.qk_head_dim ** -0.5
        if self.is_yarn:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_mscale(float(self.rope_scaling["factor"]), float(mscale_all_dim))
                scale = scale * m * m
        return scale

    @property
    def int4_group_size(self) -> int | None:
        if self.quantization_config is None:
            return None
        for group in self.quantization_config.get("config_groups", {}).values():
            return int(group.get("weights", {}).get("group_size", 32))
        return None

    @property
    def int4_experts(self) -> bool:
        return self.quantization_config is not None

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    def num_parameters(self) -> int:
        """Total parameter count (embedding and lm_head included)."""
        h = self.hidden_size
        q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.num_attention_heads * self.qk_head_dim
             if self.q_lora_rank else h * self.num_attention_heads * self.qk_head_dim)
        attn = (q + h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                + self.kv_lora_rank * self.num_attention_heads * (self.qk_nope_head_dim + self.v_head_dim)
                + self.num_attention_heads * self.v_head_dim * h)
        total = 0
        for i in range(self.num_hidden_layers):
            total += attn + 2 * h
            if self.is_moe_layer(i):
                inter = self.moe_intermediate_size
                total += (self.n_routed_experts + self.n_shared_experts) * 3 * h * inter
                total += self.n_routed_experts * (h + 1)
            else:
                total += 3 * h * self.intermediate_size
        total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        return total

    # ---- presets ------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """"kimi-k2" (the real dimensions), "small" (CPU-trainable, ~10M params) or "tiny" (tests)."""
        if name == "tiny":
            return cls(
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
            )
        if name == "small":
            return cls(
                vocab_size=512, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128,
                kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32,
                n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, routed_scaling_factor=2.5,
                max_position_embeddings=4096, rope_theta=10000.0,
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
            )
        if name == "kimi-k2":
            return cls(
                vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                num_hidden_layers=61, num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1536,
                kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1,
                moe_layer_freq=1, routed_scaling_factor=2.827, norm_topk_prob=True, n_group=1, topk_group=1,
                topk_method="noaux_tc", scoring_func="sigmoid", rms_norm_eps=1e-6, rope_theta=50000.0,
                rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                              "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=163584,
                eos_token_id=163585, torch_dtype="bfloat16",
            )
        raise ValueError(f"unknown ModelConfig preset {name!r}; choose 'kimi-k2', 'small' or 'tiny'")

    # ---- HF config.json -----------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Reads a DeepseekV3 config.json dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        if not isinstance(d, dict):
            raise TypeError(f"from_hf_dict expects a dict, got {type(d).__name__}")
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        rope_params = d.pop("rope_parameters", None)
        if isinstance(rope_params, dict):
            rope_params = dict(rope_params)
            if "rope_theta" in rope_params and "rope_theta" not in d:
                d["rope_theta"] = rope_params["rope_theta"]
            rope_params.pop("rope_theta", None)
            kind = rope_params.get("rope_type", rope_params.get("type", "default"))
            if kind != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = rope_params
        if isinstance(d.get("rope_scaling"), dict):
            rs = dict(d["rope_scaling"])
            kind = rs.get("rope_type", rs.get("type", "default"))
            d["rope_scaling"] = None if kind == "default" else rs
        dtype = d.pop("dtype", None)
        if "torch_dtype" not in d and dtype is not None:
            d["torch_dtype"] = dtype
        # HF derives these; they are not independent fields.
        for derived in ("qk_head_dim", "head_dim", "architectures", "model_type", "transformers_version"):
            d.pop(derived, None)
        extra: dict[str, Any] = {}
        for key, value in d.items():
            if key in names:
                if value is None and key in ("num_key_value_heads",):
                    continue
                if value is None and key in ("n_group", "topk_group"):
                    value = 1
                kwargs[key] = value
            else:
                extra[key] = value
        if "num_key_value_heads" not in kwargs:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        if isinstance(kwargs.get("eos_token_id"), list) and len(kwargs["eos_token_id"]) == 1:
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        for key in ("routed_scaling_factor", "rms_norm_eps", "rope_theta"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json of DeepseekV3ForCausalLM (rope in the widely read `rope_scaling` + `rope_theta` form)."""
        d: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        d.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "quantization_config"):
                continue
            value = getattr(self, f.name)
            d[f.name] = dict(value) if isinstance(value, dict) else value
        if self.quantization_config is not None:
            d["quantization_config"] = self.quantization_config
        d["hidden_act"] = self.hidden_act
        return d


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature factor (0.1·m·ln(s) + 1 for s > 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def int4_quantization_config(group_size: int = 32) -> dict[str, Any]:
    """The compressed-tensors description K2 Thinking ships for its INT4 routed experts."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": group_size},
            }
        },
        # Only routed experts are quantized; everything else stays full precision.
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
    }
