"""HF safetensors checkpoints (single file, sharded with index), per-rank slice loading, and the native INT4 expert format."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV3ForCausalLM

from model_shards.checkpoint import list_checkpoint_files, load_checkpoint, save_checkpoint
from model_shards.config import ModelConfig
from model_shards.int4 import dequantize_checkpoint, dequantize_int4, quantize_checkpoint, quantize_int4, unpack_int4
from model_shards.model import KimiK2ForCausalLM

VOCAB = 512


def make_model(seed: int = 0) -> KimiK2ForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny")
    model = KimiK2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.add_(0.3 * torch.randn_like(p))
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    model = make_model()
    path = tmp_path_factory.mktemp("ckpt_sharded")
    save_checkpoint(model, model.cfg, path, max_shard_bytes=200_000)
    return model, path


IDS = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))


# ---- INT4 format -------------------------------------------------------------------------------------
def test_int4_nibble_layout_is_value_plus_8_lowest_bits_first() -> None:
    packed = torch.tensor([[0x76543210, -0x0FEDCBA9 - 1]], dtype=torch.int32)  # second = 0xF0123456 as int32
    vals = unpack_int4(packed)[0].tolist()
    assert vals[:8] == [-8, -7, -6, -5, -4, -3, -2, -1]
    assert vals[8:] == [-2, -3, -4, -5, -6, -7, -8, 7]  # nibbles 6,5,4,3,2,1,0,F
    w = torch.tensor([[float(v) for v in range(-7, 8)] + [0.0] * 17])  # one group of 32, amax 7 -> scale 1
    p, s = quantize_int4(w)
    assert p.shape == (1, 4) and p.dtype == torch.int32 and s.shape == (1, 1) and s.item() == 1.0
    assert p[0, 0].item() == int.from_bytes(bytes([0x21, 0x43, 0x65, 0x87]), "little") - 2**32  # 1..8 packed
    assert torch.equal(dequantize_int4(p, s, 1, 32), w)


def test_int4_round_trip_error_bound_and_shapes() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 96, generator=g) * torch.linspace(0.01, 3.0, 96)
    packed, scale = quantize_int4(w)
    assert packed.shape == (48, 12) and scale.shape == (48, 3)
    back = dequantize_int4(packed, scale, 48, 96)
    groups = w.reshape(48, 3, 32)
    amax = groups.abs().amax(-1)
    # each group's scale is one of the clipping candidates, never above absmax / 7
    ratio = scale * 7 / amax
    assert torch.all(ratio <= 1 + 1e-6) and torch.all(ratio >= 0.8 - 1e-6)
    # values inside the clipped range round to the nearest step: at most half a step off
    steps = scale.repeat_interleave(32, dim=1)
    inside = w.abs() <= 7 * steps
    assert torch.all((back - w).abs()[inside] <= steps[inside] / 2 + 1e-6)
    # and per group the squared error is no worse than plain absmax / 7 scaling (which is one candidate)
    plain = amax / 7
    plain_back = (torch.clamp(torch.round(groups / plain.unsqueeze(-1)), -8, 7) * plain.unsqueeze(-1)).reshape(48, 96)
    err = (back - w).pow(2).reshape(48, 3, 32).sum(-1)
    plain_err = (plain_back - w).pow(2).reshape(48, 3, 32).sum(-1)
    assert torch.all(err <= plain_err + 1e-6)
    assert err.sum() < 0.95 * plain_err.sum()  # clipping pays on Gaussian groups
    assert (back - w).abs().max() > 0  # it really is lossy
    # stacked experts [E, out, in] quantize the same as one at a time
    stacked = torch.stack([w, 2 * w])
    sp, ss = quantize_int4(stacked)
    assert torch.equal(sp[1], quantize_int4(2 * w)[0]) and torch.equal(dequantize_int4(sp, ss, 48, 96)[0], back)


def test_int4_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(torch.randn(4, 40))
    with pytest.raises(TypeError, match="int32"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int64))
    packed, scale = quantize_int4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="weight_packed shape"):
        dequantize_int4(packed, scale, 4, 128)


# ---- save / load ---------------------------------------------------------------------------------------
def test_sharded_checkpoint_layout_and_exact_reload(saved) -> None:
    model, path = saved
    files = list_checkpoint_files(path)
    assert len(files) > 1 and all(f.name.startswith("model-0000") for f in files)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.hf_state_dict())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in index["weight_map"]
    assert json.loads((path / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]
    cfg, loaded = load_checkpoint(path)
    assert cfg == model.cfg
    assert torch.equal(loaded.forward_logits(IDS), model.forward_logits(IDS))


def test_transformers_reads_our_checkpoint(saved) -> None:
    model, path = saved
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(IDS).logits.float()
    assert (ref - model.forward_logits(IDS)).abs().max().item() <= 1e-4


def test_single_file_save_and_rank_slices(tmp_path, saved) -> None:
    model, _ = saved
    save_checkpoint(model.hf_state_dict(), model.cfg, tmp_path)
    assert [f.name for f in list_checkpoint_files(tmp_path)] == ["model.safetensors"]
    full = model.hf_state_dict()
    _, ep1 = load_checkpoint(tmp_path, tp_rank=1, tp_size=2, expert_layout="ep")
    moe = ep1.model.layers[1].mlp
    assert (moe.expert_start, moe.num_local_experts) == (4, 4)
    assert torch.equal(moe.w_up[0], full["model.layers.1.mlp.experts.4.up_proj.weight"])
    attn = ep1.model.layers[0].self_attn
    assert torch.equal(attn.q_b_proj.weight, full["model.layers.0.self_attn.q_b_proj.weight"].chunk(2, 0)[1])
    assert torch.equal(attn.o_proj.weight, full["model.layers.0.self_attn.o_proj.weight"].chunk(2, 1)[1])
    assert torch.equal(attn.q_a_proj.weight, full["model.layers.0.self_attn.q_a_proj.weight"])  # replicated
    _, tp1 = load_checkpoint(tmp_path, tp_rank=1, tp_size=2, expert_layout="tp")
    moe = tp1.model.layers[2].mlp
    assert moe.w_down.shape == (8, 64, 32)
    assert torch.equal(moe.w_down[3], full["model.layers.2.mlp.experts.3.down_proj.weight"].chunk(2, 1)[1])
    assert torch.equal(tp1.lm_head.weight, full["lm_head.weight"].chunk(2, 0)[1])


def test_missing_tensor_and_bad_directory_errors(tmp_path, saved) -> None:
    model, _ = saved
    state = model.hf_state_dict()
    del state["model.layers.2.self_attn.kv_b_proj.weight"]
    save_checkpoint(state, model.cfg, tmp_path / "broken")
    with pytest.raises(KeyError, match="kv_b_proj"):
        load_checkpoint(tmp_path / "broken")
    # tensors of layers the config does not run (e.g. an MTP layer) are ignored, not an error
    state = model.hf_state_dict()
    state["model.layers.3.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_checkpoint(state, model.cfg, tmp_path / "mtp")
    assert torch.equal(load_checkpoint(tmp_path / "mtp")[1].forward_logits(IDS), model.forward_logits(IDS))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(KeyError, match="unexpected tensor"):
        model.load_state_dict_hf({"model.layers.0.bogus.weight": torch.zeros(1)})


def test_hot_update_of_a_subset_changes_only_that_tensor(saved) -> None:
    _, path = saved
    _, m = load_checkpoint(path)
    before = m.forward_logits(IDS)
    untouched = m.model.layers[2].mlp.w_gate.clone()
    new = {f"model.layers.1.mlp.experts.{e}.gate_proj.weight": torch.randn(64, 64) for e in range(8)}
    m.load_state_dict_hf(new)
    assert torch.equal(m.model.layers[1].mlp.w_gate[2], new["model.layers.1.mlp.experts.2.gate_proj.weight"])
    assert torch.equal(m.model.layers[2].mlp.w_gate, untouched)
    assert not torch.equal(m.forward_logits(IDS), before)


# ---- INT4 checkpoints ----------------------------------------------------------------------------------
def test_quantize_checkpoint_loads_and_matches_dequantized_model(tmp_path, saved) -> None:
    model, path = saved
    dst = tmp_path / "int4"
    quantize_checkpoint(path, dst, max_shard_bytes=200_000)
    cfg_json = json.loads((dst / "config.json").read_text())
    assert cfg_json["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 32
    names = {}
    for f in list_checkpoint_files(dst):
        with safe_open(str(f), framework="pt") as h:
            names.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    assert names["model.layers.1.mlp.experts.0.gate_proj.weight_packed"] == "I32"
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" not in names
    for kept in ("model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.1.self_attn.kv_b_proj.weight", "lm_head.weight"):
        assert names[kept] == "F32"  # full precision outside the routed experts

    cfg4, q = load_checkpoint(dst)
    q.int4_exact = True  # the dequantizing path: the same sums as the reference model
    assert cfg4.int4_experts and q.model.layers[1].mlp.w_gate_packed.dtype == torch.int32
    # Reference: the full-precision model with each routed expert replaced by its dequantized weight.
    deq = {}
    for name, t in model.hf_state_dict().items():
        if ".mlp.experts." in name:
            p, s = quantize_int4(t)
            t = dequantize_int4(p, s, *t.shape)
        deq[name] = t
    ref_model = KimiK2ForCausalLM(model.cfg, init=False)
    ref_model.load_state_dict_hf(deq, strict=True)
    got, ref = q.forward_logits(IDS), ref_model.forward_logits(IDS)
    assert (got - ref).abs().max().item() <= 1e-5  # same weights: equal up to summation order in kernels
    full = model.forward_logits(IDS)
    assert (got - full).abs().max() > 0  # quantization changed something...
    rel = ((got - full).norm() / full.norm()).item()
    # ...but little: ~0.18 here (4-bit groups of 32 on random Gaussian weights; unrelated weights give ~1.4)
    assert rel < 0.3

    # INT4 model saved again round-trips, and TP slices of packed tensors load
    save_checkpoint(q, cfg4, tmp_path / "int4_again")
    _, q2 = load_checkpoint(tmp_path / "int4_again")
    assert torch.equal(q2.forward_logits(IDS), got)
    with pytest.raises(ValueError, match="already an INT4"):
        quantize_checkpoint(dst, tmp_path / "twice")


def test_dequantize_checkpoint_gives_transformers_the_int4_weights(tmp_path, saved) -> None:
    model, shared = saved
    path = tmp_path / "src"
    shutil.copytree(shared, path)
    (path / "tiktoken.model").write_text("stands in for a tokenizer file\n")
    q_dir, back_dir = tmp_path / "q", tmp_path / "back"
    seen: list[tuple[int, int]] = []
    quantize_checkpoint(path, q_dir, max_shard_bytes=30_000, progress=lambda d, n: seen.append((d, n)))
    assert len(list_checkpoint_files(q_dir)) > 3  # packed tensors and their scales land in different shards
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == list(range(1, seen[-1][1] + 1))
    assert (q_dir / "tiktoken.model").read_text() == (path / "tiktoken.model").read_text()
    dequantize_checkpoint(q_dir, back_dir)
    assert (back_dir / "tiktoken.model").is_file()
    cfg_json = json.loads((back_dir / "config.json").read_text())
    assert "quantization_config" not in cfg_json or cfg_json["quantization_config"] is None
    _, q = load_checkpoint(q_dir)
    q.int4_exact = True
    want = q.forward_logits(IDS)
    hf = DeepseekV3ForCausalLM.from_pretrained(back_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(IDS).logits
    assert (got - want).abs().max().item() <= 1e-4
    assert (got - model.forward_logits(IDS)).abs().max().item() > 1e-3  # the INT4 weights, not the originals
    with pytest.raises(ValueError, match="not an INT4 checkpoint"):
        dequantize_checkpoint(back_dir, tmp_path / "again")
    with pytest.raises(ValueError, match="another directory"):
        quantize_checkpoint(back_dir, back_dir)
    assert len(list_checkpoint_files(back_dir)) >= 1  # the refused conversion deleted nothing


def test_full_precision_update_of_int4_model_is_quantized(tmp_path, saved) -> None:
    model, path = saved
    quantize_checkpoint(path, tmp_path / "q")
    _, q = load_checkpoint(tmp_path / "q")
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    w = torch.randn(64, 64)
    q.load_state_dict_hf({name: w})
    packed, scale = quantize_int4(w)
    assert torch.equal(q.model.layers[2].mlp.w_down_packed[5], packed)
    assert torch.equal(q.model.layers[2].mlp.w_down_scale[5], scale)


def test_foreign_safetensors_without_index(tmp_path) -> None:
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path)


def test_bfloat16_load_runs_close_to_fp32(saved) -> None:
    model, path = saved
    cfg, m16 = load_checkpoint(path, dtype=torch.bfloat16)
    assert m16.model.layers[1].mlp.w_up.dtype == torch.bfloat16
    assert m16.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32  # router stays fp32
    with torch.no_grad():
        got = m16.forward_logits(IDS)
        want = model.forward_logits(IDS)
    assert got.dtype == torch.float32
    assert ((got - want).norm() / want.norm()).item() < 0.1
    from model_shards.model import ForwardBatch, LatentKVCache

    cache = LatentKVCache(cfg, num_slots=1, max_len=32, dtype=torch.bfloat16)
    step = m16(ForwardBatch.from_sequences([IDS[0].tolist()], [0], [0]), cache)
    assert ((step[0] - want[0, -1]).norm() / want[0, -1].norm()).item() < 0.1
