"""KimiK2ForCausalLM against transformers' own DeepseekV3ForCausalLM, and the cached/ragged/absorbed paths
against the plain full-sequence forward."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from model_shards.checkpoint import load_checkpoint
from model_shards.config import ModelConfig
from model_shards.model import ForwardBatch, KimiK2ForCausalLM, LatentKVCache

VOCAB = 512

VARIANTS = {
    # group-limited routing, YaRN with mscale != mscale_all_dim (attention scaling on cos/sin), q LoRA, interleaved rope
    "yarn_grouped": dict(
        q_lora_rank=32, n_group=2, topk_group=1, rope_interleave=True,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
    ),
    # no q LoRA (q_proj), plain rope in the half-split layout, single group, unnormalised top-k weights
    "plain": dict(q_lora_rank=None, n_group=1, topk_group=1, rope_interleave=False, rope_scaling=None,
                  norm_topk_prob=False),
}


def hf_config(**overrides: object) -> DeepseekV3Config:
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, max_position_embeddings=256, rope_theta=10000.0, initializer_range=0.1,
        bos_token_id=0, eos_token_id=1,
    )
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def randomize_hf(model: DeepseekV3ForCausalLM, seed: int) -> None:
    """HF initialises norms to 1 and the routing bias to 0; perturb them so the test covers them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.2 * torch.randn(b.shape, generator=g))


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(1234)
    hf = DeepseekV3ForCausalLM(hf_config(**VARIANTS[request.param])).eval()
    randomize_hf(hf, 99)
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf.save_pretrained(path)
    cfg, ours = load_checkpoint(path, dtype=torch.float32)
    return hf, cfg, ours


def test_config_read_from_hf_checkpoint(pair) -> None:
    hf, cfg, _ = pair
    assert cfg.n_group == hf.config.n_group and cfg.q_lora_rank == hf.config.q_lora_rank
    assert cfg.rope_interleave == hf.config.rope_interleave
    assert cfg.is_yarn == (hf.config.rope_parameters.get("rope_type") == "yarn")


@pytest.mark.parametrize("length", [1, 5, 17, 48])
def test_logits_match_hf(pair, length: int) -> None:
    hf, _, ours = pair
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        got = ours.forward_logits(ids)
    assert got.shape == (2, length, VOCAB) and got.dtype == torch.float32
    assert ref.abs().max() > 0.5  # the comparison is not between near-zero logits
    assert (got - ref).abs().max().item() <= 1e-4


def greedy_with_cache(model: KimiK2ForCausalLM, prompt: list[int], steps: int) -> list[int]:
    cache = LatentKVCache(model.cfg, num_slots=2, max_len=len(prompt) + steps + 1, dtype=torch.float32)
    logits = model(ForwardBatch.from_sequences([prompt], [1], [0]), cache)
    out: list[int] = []
    for _ in range(steps):
        tok = int(logits[0].argmax())
        out.append(tok)
        logits = model(ForwardBatch.from_sequences([[tok]], [1], [len(prompt) + len(out) - 1]), cache)
    return out


def test_greedy_generation_matches_hf_generate(pair) -> None:
    hf, _, ours = pair
    prompt = [5, 77, 300, 12, 9, 401, 33]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=16)
    ref_new = ref[0, len(prompt):].tolist()
    assert len(ref_new) == 16
    assert greedy_with_cache(ours, prompt, 16) == ref_new


@pytest.fixture(scope="module")
def tiny_model() -> KimiK2ForCausalLM:
    torch.manual_seed(7)
    cfg = ModelConfig.preset("tiny")
    cfg.n_group, cfg.topk_group = 2, 1
    model = KimiK2ForCausalLM(cfg)
    with torch.no_grad():  # stronger weights than the 0.02 init so logits are far from uniform
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.add_(0.3 * torch.randn_like(p))
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    return model


def test_cached_decode_and_chunked_prefill_equal_full_forward(tiny_model: KimiK2ForCausalLM) -> None:
    m = tiny_model
    seq = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    full = m.forward_logits(torch.tensor([seq]))[0]
    # prefill 20 tokens then 10 one-token decode steps
    cache = LatentKVCache(m.cfg, num_slots=3, max_len=64)
    got = [m(ForwardBatch.from_sequences([seq[:20]], [2], [0]), cache)[0]]
    for i in range(20, 30):
        got.append(m(ForwardBatch.from_sequences([[seq[i]]], [2], [i]), cache)[0])
    want = full[19:30]
    assert (torch.stack(got) - want).abs().max().item() <= 1e-4
    # chunked prefill in three uneven chunks
    cache2 = LatentKVCache(m.cfg, num_slots=1, max_len=32)
    last = None
    for a, b in ((0, 11), (11, 12), (12, 30)):
        last = m(ForwardBatch.from_sequences([seq[a:b]], [0], [a]), cache2)[0]
        assert (last - full[b - 1]).abs().max().item() <= 1e-4
    # the chunked cache holds the same latents as the one-shot cache
    assert torch.allclose(cache2.latent[:, 0, :30], cache.latent[:, 2, :30], atol=1e-5)


def test_ragged_batch_equals_each_sequence_alone(tiny_model: KimiK2ForCausalLM) -> None:
    m = tiny_model
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 1, 23, 4)]
    alone = [m(ForwardBatch.from_sequences([s], [0], [0]), LatentKVCache(m.cfg, 1, 32))[0] for s in seqs]
    cache = LatentKVCache(m.cfg, num_slots=6, max_len=32)
    slots = [5, 0, 3, 1]
    batched = m(ForwardBatch.from_sequences(seqs, slots, [0, 0, 0, 0]), cache)
    assert batched.shape == (4, VOCAB)
    assert (batched - torch.stack(alone)).abs().max().item() <= 1e-4
    # a mixed step: sequences continue with different context lengths (decode + a chunk) in one batch
    extra = [[7], [8, 9, 10], [11], [12, 13]]
    mixed = m(ForwardBatch.from_sequences(extra, slots, [len(s) for s in seqs]), cache)
    for i, (s, e) in enumerate(zip(seqs, extra)):
        ref = m.forward_logits(torch.tensor([s + e]))[0, -1]
        assert (mixed[i] - ref).abs().max().item() <= 1e-4


def test_absorbed_mla_decode_equals_naive_path(tiny_model: KimiK2ForCausalLM) -> None:
    m = tiny_model
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 13, 2)]
    results = {}
    for path in ("auto", "naive"):
        m.attention_path = path
        try:
            cache = LatentKVCache(m.cfg, num_slots=3, max_len=32)
            m(ForwardBatch.from_sequences(prompts, [0, 1, 2], [0, 0, 0]), cache)
            steps = []
            ctx = [len(p) for p in prompts]
            for step in range(4):
                toks = [[(17 * step + i) % VOCAB] for i in range(3)]
                steps.append(m(ForwardBatch.from_sequences(toks, [0, 1, 2], ctx), cache))
                ctx = [c + 1 for c in ctx]
            results[path] = torch.stack(steps)
        finally:
            m.attention_path = "auto"
    assert (results["auto"] - results["naive"]).abs().max().item() <= 1e-4
    # and the decode really attends: different contexts give different logits
    assert (results["auto"][0, 0] - results["auto"][0, 1]).abs().max().item() > 1e-3


def _decode_run(m: KimiK2ForCausalLM, path: str, slots: list[int]) -> torch.Tensor:
    """Ragged prompts, then 5 one-token steps for every sequence: [steps, S, vocab] logits."""
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 13, 2, 9)]
    m.attention_path = path
    try:
        cache = LatentKVCache(m.cfg, num_slots=6, max_len=32)
        m(ForwardBatch.from_sequences(prompts, slots, [0] * len(prompts)), cache)
        ctx = [len(p) for p in prompts]
        steps = []
        for step in range(5):
            toks = [[(31 * step + 7 * i) % VOCAB] for i in range(len(prompts))]
            steps.append(m(ForwardBatch.from_sequences(toks, slots, ctx), cache))
            ctx = [c + 1 for c in ctx]
        return torch.stack(steps)
    finally:
        m.attention_path = "auto"


@pytest.mark.parametrize("slots", [[0, 1, 2, 3], [4, 0, 5, 2]])
def test_fused_cpu_decode_equals_absorbed_kernel_path(tiny_model: KimiK2ForCausalLM, slots: list[int]) -> None:
    """The fused CPU decode path (folded weights, one score matmul, a shared mask) against the absorbed
    path through the kernels, for ragged contexts in the first cache slots and in scattered ones."""
    m = tiny_model
    layer = m.model.layers[0].self_attn
    with torch.no_grad():  # the model's forward runs without autograd; the fused path needs that
        assert layer._fast_decode_applies(torch.zeros(1, m.cfg.hidden_size), _pure_decode_plan(), torch.zeros(1, 1, 1))
    fused, kernel = _decode_run(m, "auto", slots), _decode_run(m, "absorbed", slots)
    assert (fused - kernel).abs().max().item() <= 1e-4
    assert (fused[:, 0] - fused[:, 1]).abs().max().item() > 1e-3  # sequences differ: the mask is per sequence


def test_fused_cpu_decode_follows_hot_weight_updates(tiny_model: KimiK2ForCausalLM) -> None:
    """The folded query/output weights are rebuilt when the weights they come from change in place."""
    m = tiny_model
    before = _decode_run(m, "auto", [0, 1, 2, 3])
    w = m.model.layers[1].self_attn.kv_b_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(1.5)
        after, kernel = _decode_run(m, "auto", [0, 1, 2, 3]), _decode_run(m, "absorbed", [0, 1, 2, 3])
        assert (after - before).abs().max().item() > 1e-3
        assert (after - kernel).abs().max().item() <= 1e-4
    finally:
        with torch.no_grad():
            w.copy_(saved)


def _pure_decode_plan():
    from model_shards.model import _BatchPlan

    batch = ForwardBatch.from_sequences([[1], [2]], [0, 1], [3, 5])
    return _BatchPlan.of(batch, absorbed_decode=True)


def test_copy_prefix_reuses_a_cached_prompt(tiny_model: KimiK2ForCausalLM) -> None:
    m = tiny_model
    prefix, tail = [3, 14, 15, 92, 65, 35], [89, 79]
    cache = LatentKVCache(m.cfg, num_slots=2, max_len=16)
    m(ForwardBatch.from_sequences([prefix], [0], [0]), cache)
    cache.copy_prefix(0, 1, len(prefix))
    reused = m(ForwardBatch.from_sequences([tail], [1], [len(prefix)]), cache)[0]
    ref = m.forward_logits(torch.tensor([prefix + tail]))[0, -1]
    assert (reused - ref).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="dst_slot"):
        cache.copy_prefix(0, 2, 3)


def test_bad_batches_are_rejected_with_clear_errors(tiny_model: KimiK2ForCausalLM) -> None:
    m = tiny_model
    cache = LatentKVCache(m.cfg, num_slots=1, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        m(ForwardBatch.from_sequences([[1, 2, 3, 4, 5]], [0], [0]), cache)
    with pytest.raises(ValueError, match="cache_slots"):
        m(ForwardBatch.from_sequences([[1]], [3], [0]), cache)
    with pytest.raises(ValueError, match="token id out of range"):
        m.forward_logits(torch.tensor([[1, VOCAB]]))
    bad = ForwardBatch(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([0, 3]), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(bad, cache)
    with pytest.raises(ValueError, match="context_lens > 0 needs"):
        m(ForwardBatch.from_sequences([[1]], [0], [2]), None)


def test_forward_logits_is_trainable() -> None:
    torch.manual_seed(0)
    m = KimiK2ForCausalLM(ModelConfig.preset("tiny"))
    ids = torch.randint(0, VOCAB, (2, 12))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = m.forward_logits(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert m.model.layers[1].mlp.w_gate.grad is not None
    assert losses[-1] < losses[0] - 0.5


def test_presets_and_config_round_trip(tmp_path) -> None:
    k2 = ModelConfig.preset("kimi-k2")
    assert (k2.num_hidden_layers, k2.hidden_size, k2.n_routed_experts, k2.vocab_size) == (61, 7168, 384, 163840)
    assert 0.95e12 < k2.num_parameters() < 1.1e12  # ~1T total
    small = ModelConfig.preset("small")
    assert 5e6 <= small.num_parameters() <= 30e6
    for cfg in (k2, small, ModelConfig.preset("tiny")):
        d = cfg.to_hf_dict()
        assert ModelConfig.from_hf_dict(json.loads(json.dumps(d))) == cfg
        hf = DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
        back = ModelConfig.from_hf_dict(hf.to_dict())
        assert back.rope_scaling["factor"] == cfg.rope_scaling["factor"] and back.rope_theta == cfg.rope_theta
        assert back.n_routed_experts == cfg.n_routed_experts and back.q_lora_rank == cfg.q_lora_rank
    with pytest.raises(ValueError, match="unknown ModelConfig preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig(num_experts_per_tok=9, n_routed_experts=8)
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(hidden_size=0)


def test_unsupported_quantization_is_named() -> None:
    fp8 = ModelConfig.preset("tiny").to_hf_dict()
    fp8["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ValueError, match="quant_method='fp8'"):
        ModelConfig.from_hf_dict(fp8)


def test_kimi_k2_style_config_json_parses_to_the_preset() -> None:
    real = {  # the fields of moonshotai/Kimi-K2-Instruct's config.json (FP8 quantization_config left out)
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 131072, "model_type": "kimi_k2",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 384,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 64, "num_nextn_predict_layers": 0, "pretraining_tp": 1,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "use_cache": True, "v_head_dim": 128, "vocab_size": 163840,
    }
    cfg = ModelConfig.from_hf_dict(real)
    preset = ModelConfig.preset("kimi-k2")
    cfg.extra = {}
    assert cfg == preset
    assert cfg.softmax_scale == pytest.approx((192 ** -0.5) * (0.1 * __import__("math").log(32.0) + 1.0) ** 2)
