"""The PARL loss trains orchestrator completion tokens only; the trainer's update and accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planner.parl.config import PARLConfig
from planner.parl.loss import policy_loss
from planner.parl.samples import OrchestratorSample, collate, token_logprobs
from planner.parl.trainer import PARLTrainer, micro_batches


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    new = (-torch.rand(2, 6, generator=g) * 3).requires_grad_(True)
    old = new.detach() + torch.randn(2, 6, generator=g) * 0.1
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([1.0, -0.5])
    return new, old, mask, adv


def _loss_and_grad(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor,
                   **kw: object) -> tuple[float, torch.Tensor]:
    leaf = new.detach().clone().requires_grad_(True)
    loss, _ = policy_loss(leaf, old, adv, mask, clip_eps=0.2, **kw)  # type: ignore[arg-type]
    loss.backward()
    assert leaf.grad is not None
    return float(loss.detach()), leaf.grad.clone()


@pytest.mark.parametrize("with_kl", [False, True])
def test_masked_tokens_do_not_reach_loss_or_gradient(with_kl: bool) -> None:
    new, old, mask, adv = _inputs()
    kw = {"ref_logprobs": old - 0.05, "kl_coef": 0.1} if with_kl else {}
    loss, grad = _loss_and_grad(new, old, mask, adv, **kw)
    assert torch.all(grad[mask == 0] == 0) and torch.any(grad[mask == 1] != 0)
    # a masked position (prompt, tool result, sub-agent text) changes wildly: nothing moves
    masked_new, masked_old = new.detach().clone(), old.clone()
    masked_new[0, 0] += 50.0
    masked_old[1, 5] -= 7.0
    loss2, grad2 = _loss_and_grad(masked_new, masked_old, mask, adv, **kw)
    assert loss2 == pytest.approx(loss, abs=1e-7) and torch.allclose(grad2, grad)
    # an orchestrator token changes: the loss does
    unmasked = new.detach().clone()
    unmasked[0, 3] += 0.05
    loss3, _ = _loss_and_grad(unmasked, old, mask, adv, **kw)
    assert loss3 != pytest.approx(loss, abs=1e-6)


def test_clipping_stops_the_gradient_beyond_the_trust_region() -> None:
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, 0.05]], requires_grad=True)  # ratios e^0.5 (outside 1.2) and e^0.05 (inside)
    loss, st = policy_loss(new, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    loss.backward()
    assert new.grad is not None
    assert new.grad[0, 0] == 0 and new.grad[0, 1] < 0  # positive advantage: raise the in-region token only
    assert st.clip_fraction == 0.5 and st.tokens == 2
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(new, old, torch.tensor([1.0]), mask, clip_eps=1.5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(new, old, torch.tensor([1.0]), mask, clip_eps=0.2, kl_coef=0.1)


def test_k3_kl_is_zero_at_the_reference_and_positive_away_from_it() -> None:
    new, old, mask, adv = _inputs()
    _, at_ref = policy_loss(new, old, adv, mask, clip_eps=0.2, ref_logprobs=new.detach(), kl_coef=1.0)
    _, away = policy_loss(new, old, adv, mask, clip_eps=0.2, ref_logprobs=new.detach() - 0.3, kl_coef=1.0)
    assert at_ref.kl == pytest.approx(0.0, abs=1e-7) and away.kl > 0.01


def test_collate_masks_exactly_the_completion_targets() -> None:
    s1 = OrchestratorSample("plan", prompt_ids=[5, 6, 7], completion_ids=[8, 9], logprobs=[-1.0, -2.0], version=0)
    s2 = OrchestratorSample("aggregate", prompt_ids=[5], completion_ids=[4, 3, 2], logprobs=[-0.1, -0.2, -0.3],
                            version=0, advantage=0.5)
    b = collate([s1, s2])
    assert b.ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    # position t predicts ids[t+1]: s1 trains on targets 8, 9 (t = 2, 3); s2 on 4, 3, 2 (t = 0, 1, 2)
    assert b.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert torch.allclose(b.old_logprobs, torch.tensor([[0, 0, -1.0, -2.0], [-0.1, -0.2, -0.3, 0]]))
    assert b.advantages.tolist() == [0.0, 0.5]
    with pytest.raises(ValueError, match="logprobs"):
        OrchestratorSample("plan", [1], [2, 3], [-1.0], version=0)


# ---- the trainer in-process on a tiny random policy -------------------------------------------------------


def _samples(trainer: PARLTrainer, advantages: list[float]) -> list[OrchestratorSample]:
    """Samples whose behaviour logprobs are the trainer's own (as the engine reports them)."""
    out = []
    g = torch.Generator().manual_seed(1)
    for i, adv in enumerate(advantages):
        prompt = torch.randint(0, 256, (6 + i,), generator=g).tolist()
        comp = torch.randint(0, 256, (4 + 2 * i,), generator=g).tolist()
        ids = torch.tensor([prompt + comp])
        with torch.no_grad():
            lp = token_logprobs(trainer.model.forward_logits(ids), ids)[0, len(prompt) - 1 :].tolist()
        out.append(OrchestratorSample("plan", prompt, comp, lp, version=0, advantage=adv))
    return out


def _cfg(ckpt: str, tmp: Path, **kw: object) -> PARLConfig:
    return PARLConfig(policy_checkpoint=ckpt, out=str(tmp), lr=1e-2, threads=1, **kw)  # type: ignore[arg-type]


def test_trainer_step_raises_the_advantaged_completion_and_skips_zero_advantage(tiny_ckpt: str, tmp_path: Path) -> None:
    tr = PARLTrainer(_cfg(tiny_ckpt, tmp_path))
    flat = _samples(tr, [0.0, 0.0])
    before = {k: v.clone() for k, v in tr.weights().items()}
    st = tr.train_step(flat)
    assert st["trained_samples"] == 0 and st["loss"] is None and tr.step == 1
    assert all(torch.equal(before[k], v) for k, v in tr.weights().items())  # nothing to learn, nothing moved

    good, bad = _samples(tr, [1.0, -1.0])
    st = tr.train_step([good, bad])
    assert st["trained_samples"] == 2 and st["logprob_mismatch"] == pytest.approx(0.0, abs=1e-5)
    assert st["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and st["grad_norm"] > 0
    ids_g = torch.tensor([good.prompt_ids + good.completion_ids])
    ids_b = torch.tensor([bad.prompt_ids + bad.completion_ids])
    with torch.no_grad():
        lp_g = token_logprobs(tr.model.forward_logits(ids_g), ids_g)[0, len(good.prompt_ids) - 1 :].sum()
        lp_b = token_logprobs(tr.model.forward_logits(ids_b), ids_b)[0, len(bad.prompt_ids) - 1 :].sum()
    assert float(lp_g) > sum(good.logprobs)  # the positive-advantage completion became more likely
    assert float(lp_b) < sum(bad.logprobs)  # the negative one less


def test_grad_accumulation_gives_the_same_gradient_as_one_batch(tiny_ckpt: str, tmp_path: Path) -> None:
    grads = []
    for accum in (1, 3):
        tr = PARLTrainer(_cfg(tiny_ckpt, tmp_path, grad_accum=accum, grad_clip=1e9))
        samples = _samples(tr, [1.0, -0.5, 0.25])
        assert len(micro_batches(samples, accum)) == accum
        tr.opt.step = lambda *a, **k: None  # type: ignore[method-assign]  # keep the weights: compare grads only
        tr.train_step(samples)
        grads.append(torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_checkpoint_round_trip(tiny_ckpt: str, tmp_path: Path) -> None:
    tr = PARLTrainer(_cfg(tiny_ckpt, tmp_path))
    tr.train_step(_samples(tr, [1.0, -1.0]))
    tr.save(str(tmp_path), {"step": 1, "cursor": 2})
    assert (tmp_path / "checkpoint" / "config.json").is_file()
    tr2 = PARLTrainer(_cfg(tiny_ckpt, tmp_path))
    extra = tr2.load(str(tmp_path))
    assert extra == {"step": 1, "cursor": 2} and tr2.step == 1
    assert all(torch.equal(a, b) for a, b in zip(tr.weights().values(), tr2.weights().values()))
    assert tr2.opt.state_dict()["state"].keys() == tr.opt.state_dict()["state"].keys()
    from model_shards.checkpoint import load_checkpoint

    _, served = load_checkpoint(tmp_path / "checkpoint", dtype=torch.float32)  # the HF checkpoint is servable
    assert all(torch.equal(served.hf_state_dict()[k], v) for k, v in tr.weights().items())
