"""Muon (optimizer: muon): the Newton-Schulz orthogonalisation, which parameters it takes, and a
trainer step and checkpoint with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planner.parl.muon import Muon, build_optimizer, muon_scale, orthogonalize
from planner.parl.trainer import PARLTrainer
from tests.test_parl_loss import _cfg, _samples


@pytest.mark.parametrize("shape", [(16, 16), (8, 32), (32, 8), (3, 12, 20)])
def test_orthogonalize_flattens_the_spectrum_and_keeps_the_singular_vectors(shape: tuple[int, ...]) -> None:
    # g = U·diag(s)·Vᵀ with singular values spread 30x. Five iterations lift a small singular value by
    # at most ~3.4^5 relative to the Frobenius norm, so a far wider spread is not fully flattened
    # (Muon's known limit, harmless for an update direction).
    gen = torch.Generator().manual_seed(0)
    k = min(shape[-2:])
    u, _ = torch.linalg.qr(torch.randn(*shape[:-1], k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(*shape[:-2], shape[-1], k, generator=gen))
    g = u @ torch.diag_embed(torch.logspace(-1.5, 0, k).expand(*shape[:-2], k)) @ v.mT
    o = orthogonalize(g)
    assert o.shape == g.shape
    s = torch.linalg.svdvals(o)
    assert float(s.min()) > 0.6 and float(s.max()) < 1.2, s  # all pulled towards 1 (the input's: 0.03 to 1)
    exact = u @ v.mT
    cos = (o * exact).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * exact.norm(dim=(-2, -1)))
    assert bool((cos > 0.9).all()), cos  # the same direction as U·Vᵀ


def test_muon_groups_take_hidden_matrices_and_leave_embeddings_and_vectors_to_adamw(tiny_ckpt: str) -> None:
    from model_shards.checkpoint import load_checkpoint

    _, model = load_checkpoint(tiny_ckpt, dtype=torch.float32)
    opt = build_optimizer(model, "muon", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    other = {names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert "model.embed_tokens.weight" in other and not any("embed_tokens" in n or "lm_head" in n for n in muon)
    assert any(n.endswith("mlp.w_gate") for n in muon)  # the expert stacks, one matrix per expert
    assert any(n.endswith("o_proj.weight") for n in muon)
    assert all(model.get_parameter(n).dim() >= 2 for n in muon)
    assert muon | other == set(names.values())
    with pytest.raises(ValueError, match="'sgd'"):
        build_optimizer(model, "sgd", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)


def test_muon_step_moves_a_matrix_by_its_scaled_orthogonalised_gradient() -> None:
    w = torch.nn.Parameter(torch.zeros(4, 6))
    opt = Muon([{"params": [w], "use_muon": True}], lr=0.1, momentum=0.0, nesterov=False)
    g = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    w.grad = g.clone()
    opt.step()
    assert torch.allclose(w.detach(), -0.1 * muon_scale(w.shape) * orthogonalize(g), atol=1e-6)


def test_trainer_with_muon_learns_and_resumes(tiny_ckpt: str, tmp_path: Path) -> None:
    cfg = _cfg(tiny_ckpt, tmp_path, optimizer="muon")
    tr = PARLTrainer(cfg)
    good, bad = _samples(tr, [1.0, -1.0])
    st = tr.train_step([good, bad])
    assert st["trained_samples"] == 2 and st["grad_norm"] > 0
    ids = torch.tensor([good.prompt_ids + good.completion_ids])
    from planner.parl.samples import token_logprobs

    with torch.no_grad():
        lp = token_logprobs(tr.model.forward_logits(ids), ids)[0, len(good.prompt_ids) - 1 :].sum()
    assert float(lp) > sum(good.logprobs)  # the positive-advantage completion became more likely

    tr.save(str(tmp_path), {"step": 1})
    tr2 = PARLTrainer(cfg)
    tr2.load(str(tmp_path))
    bufs = [s["momentum_buffer"] for s in tr2.opt.state.values() if "momentum_buffer" in s]
    assert bufs and any(float(b.abs().sum()) > 0 for b in bufs)  # Muon's momentum came back
    tr.train_step([good, bad])
    tr2.train_step([good, bad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(tr.weights().values(), tr2.weights().values()))
