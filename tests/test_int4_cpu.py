"""INT4 routed experts on CPU through ATen's packed int4 kernel (model_shards/kernels/int4_cpu.py):
against the exact (dequantizing) reference, its fallbacks, the weight-update cache, and the model switch."""

from __future__ import annotations

import copy

import pytest
import torch

import model_shards.kernels as K
from model_shards.config import ModelConfig, int4_quantization_config
from model_shards.kernels import int4_cpu
from model_shards.kernels import reference as R
from model_shards.model import ForwardBatch, KimiK2ForCausalLM, LatentKVCache


def _experts(E: int, out_f: int, in_f: int, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    packs = [R.pack_int4(torch.randn(out_f, in_f) * 0.1, group_size) for _ in range(E)]
    return torch.stack([p for p, _ in packs]), torch.stack([s for _, s in packs])


def _moe(E: int = 6, H: int = 64, I: int = 32, group_size: int = 32) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return (*_experts(E, I, H, group_size), *_experts(E, I, H, group_size), *_experts(E, H, I, group_size))


def _routing(N: int, E: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    return ids, torch.rand(N, k, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def no_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed path must not hand the call to the reference."""

    def _refuse(*args, **kwargs):
        raise AssertionError("fell back to the dequantizing reference")

    monkeypatch.setattr(int4_cpu, "fused_moe_int4_ref", _refuse)


@pytest.mark.parametrize("N", [1, 5, 32])
def test_packed_kernel_matches_reference_within_bf16_rounding(no_reference: None, N: int) -> None:
    w = _moe()
    ids, tw = _routing(N, 6, 2)
    ids[0, 0] = 9  # another EP rank's expert: skipped
    ids[ids == 4] = 3  # expert 4 gets no token
    x = torch.randn(N, 64)
    got = K.fused_moe_int4(x, *w, ids, tw)
    want = R.fused_moe_int4_ref(x, *w, ids, tw)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert 1e-5 < _rel(got, want) < 1e-2  # bf16 activations: close, and not the exact path


def test_no_local_assignment_gives_zeros(no_reference: None) -> None:
    w = _moe()
    x = torch.randn(3, 64)
    ids = torch.full((3, 2), 7)
    assert torch.equal(K.fused_moe_int4(x, *w, ids, torch.rand(3, 2)), torch.zeros(3, 64))


def test_bf16_model_activations_stay_bf16(no_reference: None) -> None:
    gp, gs, up, us, dp, ds = _moe()
    w = (gp, gs.bfloat16(), up, us.bfloat16(), dp, ds.bfloat16())
    x = torch.randn(4, 64).bfloat16()
    ids, tw = _routing(4, 6, 2)
    got = K.fused_moe_int4(x, *w, ids, tw)
    assert got.dtype == torch.bfloat16
    assert _rel(got, R.fused_moe_int4_ref(x.float(), gp, gs, up, us, dp, ds, ids, tw)) < 2e-2


def test_exact_wide_experts_unsupported_groups_and_autograd_take_the_reference() -> None:
    w = _moe()
    x = torch.randn(5, 64)
    ids, tw = _routing(5, 6, 2)
    assert torch.equal(K.fused_moe_int4(x, *w, ids, tw, exact=True), R.fused_moe_int4_ref(x, *w, ids, tw))
    # prefill-sized: more rows for one expert than the packed kernel is faster for
    wide = int4_cpu._PACKED_MAX_ROWS + 1
    xw = torch.randn(wide, 64)
    ids_w, tw_w = torch.zeros(wide, 1, dtype=torch.long), torch.rand(wide, 1)
    assert torch.equal(K.fused_moe_int4(xw, *w, ids_w, tw_w), R.fused_moe_int4_ref(xw, *w, ids_w, tw_w))
    # group 16: not a size the ATen kernel takes
    w16 = _moe(group_size=16)
    assert torch.equal(K.fused_moe_int4(x, *w16, ids, tw, group_size=16),
                       R.fused_moe_int4_ref(x, *w16, ids, tw, group_size=16))
    xg = x.clone().requires_grad_(True)
    assert not int4_cpu.available(xg, 32)
    out = K.fused_moe_int4(xg, *w, ids, tw)
    out.sum().backward()
    assert xg.grad is not None and torch.allclose(out, R.fused_moe_int4_ref(x, *w, ids, tw))


def test_repacked_after_an_in_place_weight_update(no_reference: None) -> None:
    gp, gs, up, us, dp, ds = _moe()
    x = torch.randn(4, 64)
    ids, tw = _routing(4, 6, 2)
    before = K.fused_moe_int4(x, gp, gs, up, us, dp, ds, ids, tw)
    cached = int4_cpu.packed_experts(gp, gs, up, us, dp, ds)
    assert int4_cpu.packed_experts(gp, gs, up, us, dp, ds) is cached  # packed once, not per call
    new_dp, new_ds = _experts(6, 64, 32)
    dp.copy_(new_dp)  # a hot update writes in place
    ds.copy_(new_ds)
    after = K.fused_moe_int4(x, gp, gs, up, us, dp, ds, ids, tw)
    assert int4_cpu.packed_experts(gp, gs, up, us, dp, ds) is not cached
    assert _rel(after, before) > 0.1
    assert _rel(after, R.fused_moe_int4_ref(x, gp, gs, up, us, dp, ds, ids, tw)) < 1e-2


def test_model_switch_and_decode_close_to_exact() -> None:
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(2)
    full = KimiK2ForCausalLM(cfg).eval()
    cfg4 = copy.deepcopy(cfg)
    cfg4.quantization_config = int4_quantization_config()
    model = KimiK2ForCausalLM(cfg4, init=False).eval()
    model.load_state_dict_hf(full.hf_state_dict())
    assert model.int4_exact is False
    prompts = [[5, 6, 7, 8], [300, 2, 9]]

    def decode(exact: bool) -> torch.Tensor:
        model.int4_exact = exact
        cache = LatentKVCache(cfg4, num_slots=2, max_len=16)
        model(ForwardBatch.from_sequences(prompts, [0, 1], [0, 0]), cache)
        return model(ForwardBatch.from_sequences([[11], [12]], [0, 1], [4, 3]), cache)

    exact = decode(True)
    assert model.int4_exact is True and all(m.int4_exact for m in model.modules() if hasattr(m, "int4_exact"))
    packed = decode(False)
    assert 1e-5 < _rel(packed, exact) < 1e-2
