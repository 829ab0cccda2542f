"""Triton kernels (run on CPU through the Triton interpreter) against their torch references.

Tests that exercise the Triton path use the `triton_path` fixture: it turns on SWARM_TRITON_INTERPRET
and makes the torch references raise, so a silent fallback to torch would fail the test.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

# The interpreter must be chosen before triton decorates the kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

import model_shards.kernels as K
from model_shards.kernels import reference as R
from model_shards.kernels.fused_moe import moe_align_block_size
from model_shards.kernels.mla_decode import mla_decode_triton

_REFS = ("rms_norm_ref", "fused_moe_ref", "fused_moe_int4_ref", "int4_linear_ref", "mla_decode_ref")


@pytest.fixture
def triton_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_TRITON_INTERPRET", "1")

    def _refuse(*args, **kwargs):
        raise AssertionError("dispatch fell back to the torch reference")

    for name in _REFS:
        monkeypatch.setattr(K, name, _refuse)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- references against first principles


def test_rms_norm_reference_matches_formula() -> None:
    x = torch.randn(3, 7, 37, dtype=torch.float64)
    w = torch.randn(37, dtype=torch.float64)
    want = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(R.rms_norm_ref(x, w, 1e-5), want)


def _moe_dense(x, wg, wu, wd, ids, tw):
    """Every expert on every token, weighted by a dense routing matrix (zero for unrouted/foreign experts)."""
    E = wg.shape[0]
    route = torch.zeros(x.shape[0], E, dtype=torch.float64)
    for n in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if 0 <= int(ids[n, j]) < E:
                route[n, int(ids[n, j])] += float(tw[n, j])
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(E):
        h = F.silu(x.double() @ wg[e].double().T) * (x.double() @ wu[e].double().T)
        out += route[:, e : e + 1] * (h @ wd[e].double().T)
    return out


def test_fused_moe_reference_matches_dense_computation() -> None:
    x, wg, wu, wd = _moe_weights(N=9, H=20, I=12, E=5)
    ids = torch.tensor([[0, 3], [3, 3], [4, 9], [-1, 1], [2, 0], [1, 1], [0, 4], [4, 4], [7, -3]])
    tw = torch.rand(9, 2)
    torch.testing.assert_close(R.fused_moe_ref(x, wg, wu, wd, ids, tw).double(), _moe_dense(x, wg, wu, wd, ids, tw),
                               atol=1e-5, rtol=1e-5)


def test_mla_decode_reference_matches_concatenated_attention() -> None:
    S, Hh, Rr, P = 2, 3, 10, 4
    ql, qr = torch.randn(S, Hh, Rr), torch.randn(S, Hh, P)
    lat, kr = torch.randn(3, 9, Rr), torch.randn(3, 9, P)
    slots, lens = torch.tensor([2, 0]), torch.tensor([5, 9])
    out = R.mla_decode_ref(ql, qr, lat, kr, slots, lens, 0.3)
    for s in range(S):
        keys = torch.cat([lat[slots[s], : lens[s]], kr[slots[s], : lens[s]]], dim=-1)
        q = torch.cat([ql[s], qr[s]], dim=-1)
        want = F.scaled_dot_product_attention(q[None], keys[None], lat[slots[s], : lens[s]][None], scale=0.3)[0]
        torch.testing.assert_close(out[s], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- INT4 format


def test_int4_nibble_order_is_lowest_bits_first() -> None:
    # Nibbles 0..7 from the lowest bits: columns 0..7 hold values 0-8 .. 7-8.
    packed = torch.tensor([[0x76543210, 0x000000F8]], dtype=torch.int64)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    # 16 input columns in two groups of 8 (group 32 is only the default): scale 2 for group 0, 0.5 for group 1.
    scale = torch.tensor([[2.0, 0.5]])
    w = R.unpack_int4(packed, scale, group_size=8)
    assert w[0, :8].tolist() == [2.0 * (v - 8) for v in range(8)]
    assert w[0, 8:].tolist() == [0.5 * (8 - 8), 0.5 * (15 - 8)] + [0.5 * (0 - 8)] * 6


def test_int4_pack_roundtrip_exact_on_representable_values() -> None:
    q = torch.randint(-7, 8, (6, 64))  # this quantizer maps amax to 7, so -8 is never produced
    q[:, ::32] = 7  # make each group's max |q| == 7 so the chosen scale reproduces the values exactly
    scale = torch.rand(6, 2) + 0.5
    w = q.float() * scale.repeat_interleave(32, dim=1)
    packed, s = R.pack_int4(w)
    assert packed.dtype == torch.int32 and packed.shape == (6, 8) and s.shape == (6, 2)
    torch.testing.assert_close(R.unpack_int4(packed, s), w, atol=1e-5, rtol=1e-5)


def test_int4_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        R.pack_int4(torch.randn(4, 40))
    x = torch.randn(2, 64)
    packed, scale = R.pack_int4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="scale must be"):
        K.int4_linear(x, packed, scale[:, :1])
    with pytest.raises(ValueError, match="int32 columns"):
        K.int4_linear(torch.randn(2, 96), packed, scale)
    with pytest.raises(ValueError, match="must be int32"):
        K.int4_linear(x, packed.to(torch.int64), scale)


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("shape", [(1, 16), (5, 37), (2, 3, 130)])
def test_rms_norm_triton_matches_reference(triton_path: None, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape) * 3
    w = torch.randn(shape[-1])
    torch.testing.assert_close(K.rms_norm(x, w, 1e-6), R.rms_norm_ref(x, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_rms_norm_triton_bf16(triton_path: None) -> None:
    x = torch.randn(4, 48).to(torch.bfloat16)
    w = (torch.rand(48) + 0.5).to(torch.bfloat16)
    out = K.rms_norm(x, w, 1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), R.rms_norm_ref(x, w, 1e-6).float(), atol=2e-2, rtol=2e-2)


def test_rms_norm_rejects_wrong_weight() -> None:
    with pytest.raises(ValueError, match="rms_norm weight shape"):
        K.rms_norm(torch.randn(2, 8), torch.randn(9), 1e-6)


# ---------------------------------------------------------------- moe_align_block_size


def test_moe_align_blocks_hold_one_expert_each() -> None:
    E, block = 6, 4
    ids = torch.tensor([[1, 3], [3, 1], [3, 3], [5, -1], [8, 1], [3, 0]])  # expert 2 and 4 get nothing
    al = moe_align_block_size(ids, E, block)
    flat = ids.reshape(-1)
    num_assign = flat.numel()
    used = int(al.num_padded)
    counts = {e: int((flat == e).sum()) for e in range(E)}
    assert used == sum(-(-c // block) * block for c in counts.values())
    seen = []
    for t in range(used // block):
        e = int(al.expert_ids[t])
        tile = al.sorted_ids[t * block : (t + 1) * block].tolist()
        real = [a for a in tile if a < num_assign]
        assert real and all(int(flat[a]) == e for a in real)
        assert tile[: len(real)] == real  # padding only at the end of an expert's run
        seen += real
    valid = [a for a in range(num_assign) if 0 <= int(flat[a]) < E]
    assert sorted(seen) == valid  # every local assignment exactly once, foreign ones dropped
    assert set(int(e) for e in al.expert_ids[: used // block]) == {0, 1, 3, 5}
    assert all(int(e) == -1 for e in al.expert_ids[used // block :])
    assert all(a == num_assign for a in al.sorted_ids[used:].tolist())


def test_moe_align_all_foreign_ids_gives_no_tiles() -> None:
    al = moe_align_block_size(torch.tensor([[7, 9]]), 4, 16)
    assert int(al.num_padded) == 0
    assert (al.expert_ids == -1).all()


# ---------------------------------------------------------------- fused MoE


def _moe_weights(N: int, H: int, I: int, E: int, dtype: torch.dtype = torch.float32):
    x = torch.randn(N, H, dtype=dtype)
    wg = (torch.randn(E, I, H) / H**0.5).to(dtype)
    wu = (torch.randn(E, I, H) / H**0.5).to(dtype)
    wd = (torch.randn(E, H, I) / I**0.5).to(dtype)
    return x, wg, wu, wd


@pytest.mark.parametrize(
    "N,H,I,E,k",
    [
        (1, 32, 32, 4, 2),  # one token (decode), most experts idle
        (7, 40, 24, 5, 3),  # H, I not multiples of any block
        (40, 48, 20, 2, 2),  # many tokens per expert: the BLOCK_M=32 configuration
        (3, 16, 16, 3, 1),  # k = 1
    ],
)
def test_fused_moe_triton_matches_reference(triton_path: None, N: int, H: int, I: int, E: int, k: int) -> None:
    x, wg, wu, wd = _moe_weights(N, H, I, E)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    tw = torch.rand(N, k)
    torch.testing.assert_close(K.fused_moe(x, wg, wu, wd, ids, tw), R.fused_moe_ref(x, wg, wu, wd, ids, tw),
                               atol=1e-4, rtol=1e-4)


def test_fused_moe_triton_skips_foreign_and_idle_experts(triton_path: None) -> None:
    N, H, I, E = 6, 24, 40, 4
    x, wg, wu, wd = _moe_weights(N, H, I, E)
    # Expert 2 gets no token; ids 4, 11 and -1 belong to other EP ranks.
    ids = torch.tensor([[0, 4], [1, 3], [11, 0], [3, 3], [-1, 1], [0, 1]])
    tw = torch.rand(N, 2)
    out = K.fused_moe(x, wg, wu, wd, ids, tw)
    torch.testing.assert_close(out.double(), _moe_dense(x, wg, wu, wd, ids, tw), atol=1e-4, rtol=1e-4)
    # Changing a foreign or idle expert's weights must not change anything.
    wg2 = wg.clone()
    wg2[2] += 5.0
    torch.testing.assert_close(K.fused_moe(x, wg2, wu, wd, ids, tw), out)


def test_fused_moe_triton_all_foreign_is_zero(triton_path: None) -> None:
    x, wg, wu, wd = _moe_weights(3, 16, 16, 2)
    out = K.fused_moe(x, wg, wu, wd, torch.tensor([[2, 3], [5, -1], [9, 9]]), torch.rand(3, 2))
    assert out.shape == (3, 16) and (out == 0).all()


def test_triton_paths_accept_empty_batches(triton_path: None) -> None:
    x, wg, wu, wd = _moe_weights(0, 16, 16, 2)
    out = K.fused_moe(x, wg, wu, wd, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 16)
    assert K.rms_norm(torch.randn(0, 16), torch.randn(16), 1e-6).shape == (0, 16)
    packed, scale = R.pack_int4(torch.randn(8, 32))
    assert K.int4_linear(torch.randn(0, 32), packed, scale).shape == (0, 8)


def test_fused_moe_triton_sliced_weights(triton_path: None) -> None:
    # A TP slice of the intermediate dim is a strided view, not a copy.
    x, wg, wu, wd = _moe_weights(5, 32, 48, 3)
    wg_s, wu_s, wd_s = wg[:, 16:], wu[:, 16:], wd[:, :, 16:]
    ids, tw = torch.randint(0, 3, (5, 2)), torch.rand(5, 2)
    torch.testing.assert_close(K.fused_moe(x, wg_s, wu_s, wd_s, ids, tw),
                               R.fused_moe_ref(x, wg_s.contiguous(), wu_s.contiguous(), wd_s.contiguous(), ids, tw),
                               atol=1e-4, rtol=1e-4)


def test_fused_moe_triton_bf16(triton_path: None) -> None:
    x, wg, wu, wd = _moe_weights(4, 32, 32, 3, dtype=torch.bfloat16)
    ids, tw = torch.randint(0, 3, (4, 2)), torch.rand(4, 2)
    out = K.fused_moe(x, wg, wu, wd, ids, tw)
    assert out.dtype == torch.bfloat16
    want = _moe_dense(x.float(), wg.float(), wu.float(), wd.float(), ids, tw)
    torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=3e-2)


def test_fused_moe_rejects_bad_shapes() -> None:
    x, wg, wu, wd = _moe_weights(2, 16, 8, 2)
    ids, tw = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
    with pytest.raises(ValueError, match="w_down must be"):
        K.fused_moe(x, wg, wu, wd.transpose(1, 2), ids, tw)
    with pytest.raises(ValueError, match="topk_ids must be an integer"):
        K.fused_moe(x, wg, wu, wd, ids.float(), tw)
    with pytest.raises(ValueError, match="topk_weights shape"):
        K.fused_moe(x, wg, wu, wd, ids, torch.ones(2, 2))
    with pytest.raises(ValueError, match="w_gate must be"):
        K.fused_moe(x[:, :8], wg, wu, wd, ids, tw)


# ---------------------------------------------------------------- INT4 GEMM and INT4 fused MoE


def _int4_experts(E: int, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    packed, scale = R.pack_int4(torch.randn(E * out_f, in_f) / in_f**0.5)
    return packed.reshape(E, out_f, in_f // 8), scale.reshape(E, out_f, in_f // 32)


@pytest.mark.parametrize("x_shape,out_f", [((1, 64), 48), ((2, 3, 96), 40), ((33, 32), 16)])
def test_int4_linear_triton_matches_reference(triton_path: None, x_shape: tuple[int, ...], out_f: int) -> None:
    x = torch.randn(*x_shape)
    packed, scale = R.pack_int4(torch.randn(out_f, x_shape[-1]))
    out = K.int4_linear(x, packed, scale)
    assert out.shape == (*x_shape[:-1], out_f)
    torch.testing.assert_close(out, R.int4_linear_ref(x, packed, scale), atol=1e-4, rtol=1e-4)
    # The reference itself is x @ dequant(W)^T.
    torch.testing.assert_close(out, x @ R.unpack_int4(packed, scale).T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group_size", [16, 128])
def test_int4_linear_triton_other_group_sizes(triton_path: None, group_size: int) -> None:
    x = torch.randn(2, 256)
    packed, scale = R.pack_int4(torch.randn(24, 256), group_size=group_size)
    assert scale.shape == (24, 256 // group_size)
    out = K.int4_linear(x, packed, scale, group_size=group_size)
    torch.testing.assert_close(out, x @ R.unpack_int4(packed, scale, group_size).T, atol=1e-4, rtol=1e-4)


def test_int4_linear_triton_bf16(triton_path: None) -> None:
    x = torch.randn(3, 64).to(torch.bfloat16)
    packed, scale = R.pack_int4(torch.randn(32, 64) / 8)
    scale = scale.to(torch.bfloat16)
    out = K.int4_linear(x, packed, scale)
    assert out.dtype == torch.bfloat16
    want = x.float() @ R.unpack_int4(packed, scale, dtype=torch.float32).T
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("N,H,I,E,k", [(1, 64, 32, 4, 2), (9, 96, 64, 3, 2)])
def test_fused_moe_int4_triton_matches_reference(triton_path: None, N: int, H: int, I: int, E: int, k: int) -> None:
    x = torch.randn(N, H)
    gp, gs = _int4_experts(E, I, H)
    up, us = _int4_experts(E, I, H)
    dp, ds = _int4_experts(E, H, I)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    ids[0, -1] = E + 2  # a foreign expert
    tw = torch.rand(N, k)
    out = K.fused_moe_int4(x, gp, gs, up, us, dp, ds, ids, tw)
    torch.testing.assert_close(out, R.fused_moe_int4_ref(x, gp, gs, up, us, dp, ds, ids, tw), atol=1e-4, rtol=1e-4)
    # INT4 MoE == float MoE on the dequantized experts.
    deq = [torch.stack([R.unpack_int4(p[e], s[e]) for e in range(E)]) for p, s in ((gp, gs), (up, us), (dp, ds))]
    torch.testing.assert_close(out, R.fused_moe_ref(x, *deq, ids, tw), atol=1e-4, rtol=1e-4)


def test_fused_moe_int4_rejects_bad_shapes() -> None:
    x = torch.randn(2, 64)
    gp, gs = _int4_experts(2, 32, 64)
    dp, ds = _int4_experts(2, 64, 32)
    ids, tw = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
    with pytest.raises(ValueError, match="down_packed must be"):
        K.fused_moe_int4(x, gp, gs, gp, gs, gp, gs, ids, tw)
    with pytest.raises(ValueError, match="up_scale must be"):
        K.fused_moe_int4(x, gp, gs, gp, gs[:, :, :1], dp, ds, ids, tw)


# ---------------------------------------------------------------- MLA decode


def _mla_inputs(S: int, Hh: int, Rr: int, P: int, slots: int, max_len: int, dtype=torch.float32):
    return (
        torch.randn(S, Hh, Rr, dtype=dtype),
        torch.randn(S, Hh, P, dtype=dtype),
        torch.randn(slots, max_len, Rr, dtype=dtype),
        torch.randn(slots, max_len, P, dtype=dtype),
    )


@pytest.mark.parametrize(
    "Hh,Rr,P,lens",
    [
        (2, 32, 16, [1]),  # one sequence, one cached token
        (3, 24, 8, [1, 70, 33]),  # ragged lengths, R/P not powers of two
        (18, 16, 16, [5, 64]),  # two head blocks
    ],
)
def test_mla_decode_triton_matches_reference(triton_path: None, Hh: int, Rr: int, P: int, lens: list[int]) -> None:
    S = len(lens)
    ql, qr, lat, kr = _mla_inputs(S, Hh, Rr, P, slots=4, max_len=70)
    slots = torch.tensor([3, 0, 2][:S])
    seq_lens = torch.tensor(lens)
    out = K.mla_decode(ql, qr, lat, kr, slots, seq_lens, 0.15)
    torch.testing.assert_close(out, R.mla_decode_ref(ql, qr, lat, kr, slots, seq_lens, 0.15), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_mla_decode_split_k_merges_exactly(triton_path: None, splits: int) -> None:
    # 8 splits over a 5-token sequence leaves empty splits that the merge must ignore.
    ql, qr, lat, kr = _mla_inputs(3, 2, 32, 16, slots=3, max_len=40)
    slots, seq_lens = torch.tensor([1, 2, 0]), torch.tensor([40, 5, 17])
    out = mla_decode_triton(ql, qr, lat, kr, slots, seq_lens, 0.2, num_splits=splits)
    torch.testing.assert_close(out, R.mla_decode_ref(ql, qr, lat, kr, slots, seq_lens, 0.2), atol=1e-4, rtol=1e-4)


def test_mla_decode_triton_ignores_rows_past_seq_len(triton_path: None) -> None:
    ql, qr, lat, kr = _mla_inputs(2, 2, 16, 16, slots=2, max_len=32)
    slots, seq_lens = torch.tensor([0, 1]), torch.tensor([10, 0])
    out = K.mla_decode(ql, qr, lat, kr, slots, seq_lens, 0.25)
    lat2, kr2 = lat.clone(), kr.clone()
    lat2[:, 10:] = 1e4  # garbage beyond the live rows
    kr2[:, 10:] = -1e4
    torch.testing.assert_close(K.mla_decode(ql, qr, lat2, kr2, slots, seq_lens, 0.25), out)
    assert (out[1] == 0).all()  # seq_len 0 attends to nothing


def test_mla_decode_triton_bf16(triton_path: None) -> None:
    ql, qr, lat, kr = _mla_inputs(2, 4, 32, 16, slots=2, max_len=24, dtype=torch.bfloat16)
    slots, seq_lens = torch.tensor([1, 0]), torch.tensor([24, 7])
    out = K.mla_decode(ql, qr, lat, kr, slots, seq_lens, 0.1)
    assert out.dtype == torch.bfloat16
    want = R.mla_decode_ref(ql.float(), qr.float(), lat.float(), kr.float(), slots, seq_lens, 0.1)
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


def test_mla_decode_triton_fp32_query_over_bf16_cache(triton_path: None) -> None:
    ql, qr, lat, kr = _mla_inputs(2, 3, 32, 16, slots=2, max_len=20)
    lat, kr = lat.to(torch.bfloat16), kr.to(torch.bfloat16)
    slots, seq_lens = torch.tensor([1, 0]), torch.tensor([20, 3])
    out = K.mla_decode(ql, qr, lat, kr, slots, seq_lens, 0.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, R.mla_decode_ref(ql, qr, lat, kr, slots, seq_lens, 0.2), atol=1e-4, rtol=1e-4)


def test_mla_decode_rejects_bad_input() -> None:
    ql, qr, lat, kr = _mla_inputs(2, 2, 16, 8, slots=2, max_len=8)
    with pytest.raises(ValueError, match="seq_lens must lie"):
        K.mla_decode(ql, qr, lat, kr, torch.tensor([0, 1]), torch.tensor([3, 9]), 0.1)
    with pytest.raises(ValueError, match="cache_slots must lie"):
        K.mla_decode(ql, qr, lat, kr, torch.tensor([0, 2]), torch.tensor([3, 3]), 0.1)
    with pytest.raises(ValueError, match="k_rope must be"):
        K.mla_decode(ql, qr, lat, kr[:, :, :4], torch.tensor([0, 1]), torch.tensor([3, 3]), 0.1)


# ---------------------------------------------------------------- real compiler (no GPU needed)


def test_kernels_compile_for_hopper_with_k2_launch_configs() -> None:
    # The interpreter forgives type/layout errors the compiler rejects: compile every launch config the
    # launchers choose for K2 shapes down to an sm_90 cubin, and check shared memory fits the SM.
    env = {k: v for k, v in os.environ.items() if k != "SWARM_TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    bench = Path(__file__).resolve().parents[1] / "bench" / "kernels_gpu.py"
    proc = subprocess.run([sys.executable, str(bench), "--compile-only", "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "sm_90" not in line]
    assert len(rows) == 18 and all("| ok (" in r for r in rows), proc.stdout
    assert sum("SPLIT_K=True" in r for r in rows) == 4  # gate/up and down, bf16 and INT4
    kernels = {r.split("|")[1].strip() for r in rows}
    assert kernels == {"rms_norm", "int4_linear", "moe_gate_up", "moe_down", "mla_split", "mla_merge"}


# ---------------------------------------------------------------- dispatch


def test_cpu_tensors_use_torch_without_interpret_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARM_TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 16)
    assert not K.triton_enabled(x)

    # importlib, not `import a.b as m`: the package attributes fused_moe/mla_decode are the functions.
    fm, i4, md, rn = (importlib.import_module(f"model_shards.kernels.{m}")
                      for m in ("fused_moe", "int4", "mla_decode", "rmsnorm"))

    def _refuse(*args, **kwargs):
        raise AssertionError("Triton path taken for a CPU tensor")

    for mod, name in ((rn, "rms_norm_triton"), (fm, "fused_moe_triton"), (i4, "int4_linear_triton"),
                      (md, "mla_decode_triton")):
        monkeypatch.setattr(mod, name, _refuse)
    w = torch.randn(16)
    torch.testing.assert_close(K.rms_norm(x, w, 1e-6), R.rms_norm_ref(x, w, 1e-6))
    _, wg, wu, wd = _moe_weights(3, 16, 8, 2)
    ids, tw = torch.randint(0, 2, (3, 1)), torch.rand(3, 1)
    torch.testing.assert_close(K.fused_moe(x, wg, wu, wd, ids, tw), R.fused_moe_ref(x, wg, wu, wd, ids, tw))
    packed, scale = R.pack_int4(torch.randn(8, 32))
    x32 = torch.randn(2, 32)
    torch.testing.assert_close(K.int4_linear(x32, packed, scale), R.int4_linear_ref(x32, packed, scale))
    ql, qr, lat, kr = _mla_inputs(1, 2, 16, 8, slots=1, max_len=4)
    torch.testing.assert_close(K.mla_decode(ql, qr, lat, kr, torch.tensor([0]), torch.tensor([4]), 0.1),
                               R.mla_decode_ref(ql, qr, lat, kr, torch.tensor([0]), torch.tensor([4]), 0.1))


def test_public_names_stay_functions_after_submodule_import() -> None:
    # kernels/fused_moe.py and kernels/mla_decode.py share names with the public functions.
    importlib.import_module("model_shards.kernels.fused_moe")
    importlib.import_module("model_shards.kernels.mla_decode")
    from model_shards.kernels import fused_moe, mla_decode

    assert callable(fused_moe) and callable(mla_decode)
    assert K.fused_moe.__module__ == "model_shards.kernels" and K.mla_decode.__module__ == "model_shards.kernels"


def test_interpret_flag_enables_triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_TRITON_INTERPRET", "1")
    assert K.triton_enabled(torch.zeros(1))


def test_gradients_take_the_torch_path(triton_path: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Triton kernels have no backward: a call that needs gradients must use the (differentiable) reference.
    monkeypatch.setattr(K, "rms_norm_ref", R.rms_norm_ref)
    x = torch.randn(2, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    K.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None and w.grad is not None and torch.isfinite(x.grad).all()


def test_fused_moe_gradients_match_dense_computation(triton_path: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Training (e.g. the CPU "small" model) differentiates through the MoE: the reference path must be exact.
    monkeypatch.setattr(K, "fused_moe_ref", R.fused_moe_ref)
    x, wg, wu, wd = (t.double().requires_grad_() for t in _moe_weights(5, 12, 8, 3))
    ids = torch.tensor([[0, 2], [1, 5], [2, 2], [-1, 0], [1, 0]])
    tw = torch.rand(5, 2, dtype=torch.float64)
    K.fused_moe(x, wg, wu, wd, ids, tw).square().sum().backward()
    got = [t.grad.clone() for t in (x, wg, wu, wd)]
    for t in (x, wg, wu, wd):
        t.grad = None
    _moe_dense(x, wg, wu, wd, ids, tw).square().sum().backward()
    for g, t in zip(got, (x, wg, wu, wd)):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("split_k", [2, 3, 64])
def test_fused_moe_split_k_matches_reference(triton_path: None, split_k: int) -> None:
    # Decode-sized: one and two tokens; H, I not multiples of the block; a foreign expert; 64 slices
    # is more than there are K blocks (the extra slices are empty).
    from model_shards.kernels.fused_moe import fused_moe_triton

    for N in (1, 2):
        x, wg, wu, wd = _moe_weights(N, 72, 40, 5)
        ids = torch.stack([torch.randperm(5)[:3] for _ in range(N)])
        ids[0, -1] = 7  # another rank's expert
        tw = torch.rand(N, 3)
        torch.testing.assert_close(fused_moe_triton(x, wg, wu, wd, ids, tw, split_k=split_k),
                                   R.fused_moe_ref(x, wg, wu, wd, ids, tw), atol=1e-4, rtol=1e-4)


def test_fused_moe_int4_split_k_matches_reference(triton_path: None) -> None:
    from model_shards.kernels.fused_moe import fused_moe_triton

    x = torch.randn(1, 128)
    gp, gs = _int4_experts(4, 64, 128)
    up, us = _int4_experts(4, 64, 128)
    dp, ds = _int4_experts(4, 128, 64)
    ids, tw = torch.tensor([[0, 3]]), torch.rand(1, 2)
    out = fused_moe_triton(x, gp, up, dp, ids, tw, scales=(gs, us, ds), split_k=2)
    torch.testing.assert_close(out, R.fused_moe_int4_ref(x, gp, gs, up, us, dp, ds, ids, tw), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="split_k must be >= 1"):
        fused_moe_triton(x, gp, up, dp, ids, tw, scales=(gs, us, ds), split_k=0)


def test_model_decode_through_the_kernels_equals_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model end to end with every kernel on the Triton path (interpreted): MLA decode reads the
    engine's cache, whose latent and roped-key halves are strided views of one [latent | k_rope] buffer."""
    from model_shards.config import ModelConfig
    from model_shards.model import ForwardBatch, KimiK2ForCausalLM, LatentKVCache

    torch.manual_seed(3)
    model = KimiK2ForCausalLM(ModelConfig.preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # logits far from uniform, so a wrong kernel shows

    def run() -> torch.Tensor:
        cache = LatentKVCache(model.cfg, num_slots=3, max_len=16)
        out = [model(ForwardBatch.from_sequences([[5, 9, 2, 7], [3, 1]], [2, 0], [0, 0]), cache)]
        ctx = [4, 2]
        for step in range(3):
            out.append(model(ForwardBatch.from_sequences([[11 + step], [40 + step]], [2, 0], ctx), cache))
            ctx = [c + 1 for c in ctx]
        return torch.stack(out)

    want = run()
    monkeypatch.setenv("SWARM_TRITON_INTERPRET", "1")
    calls: list[str] = []
    for name in ("mla_decode_triton", "rms_norm_triton", "fused_moe_triton"):
        mod = {"mla_decode_triton": K._mla_decode_mod, "rms_norm_triton": K._rmsnorm_mod,
               "fused_moe_triton": K._fused_moe_mod}[name]
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    got = run()
    assert {"mla_decode_triton", "rms_norm_triton", "fused_moe_triton"} <= set(calls)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
