"""Data-parallel trainers (trainer_workers > 1): Ray actors that split a step's samples and all-reduce
their gradients make the same update as one trainer on the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

from planner.parl.config import PARLConfig
from planner.parl.trainer import PARLTrainer, TrainerGroup, launch_trainers, rank_share
from tests.test_parl_loss import _cfg, _samples


def test_rank_share_splits_every_sample_once_with_balanced_tokens(tiny_ckpt: str, tmp_path: Path) -> None:
    tr = PARLTrainer(_cfg(tiny_ckpt, tmp_path))
    samples = _samples(tr, [1.0, -1.0, 0.5, 0.25, -0.5])
    shares = [rank_share(samples, r, 2) for r in range(2)]
    assert sorted(id(s) for sh in shares for s in sh) == sorted(id(s) for s in samples)
    loads = [sum(len(s) for s in sh) for sh in shares]
    assert abs(loads[0] - loads[1]) <= max(len(s) for s in samples)
    assert rank_share(samples[:1], 1, 2) == []  # a rank may get nothing; it still joins the all-reduce


def test_trainer_workers_need_the_trainer_actor(tiny_ckpt: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trainer_workers=2 needs trainer_actor"):
        PARLConfig(policy_checkpoint=tiny_ckpt, out=str(tmp_path), trainer_workers=2, trainer_actor=False)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_two_data_parallel_trainers_make_the_update_of_one(ray_local: object, tiny_ckpt: str, tmp_path: Path,
                                                           kl_coef: float) -> None:
    cfg = _cfg(tiny_ckpt, tmp_path, grad_clip=0.5, kl_coef=kl_coef)
    single = PARLTrainer(cfg)
    samples = _samples(single, [1.0, -1.0, 0.5])  # 3 samples over 2 ranks: uneven shares
    group = TrainerGroup(launch_trainers(cfg.model_copy(update={"trainer_workers": 2}), None), remote=True)
    try:
        def grads(trainer: PARLTrainer) -> torch.Tensor:
            return torch.cat([p.grad.flatten() for p in trainer.model.parameters()])

        want = single.train_step(samples)
        got = group("train_step", samples)
        for key in ("loss", "pg_loss", "kl", "entropy", "ratio_mean", "grad_norm", "trained_tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
        # the all-reduced gradient (left on each rank after its step) is the one-trainer gradient. Later
        # steps are compared only across ranks: Adam's first steps magnify float noise in near-zero
        # gradient coordinates into lr-sized weight differences between the two setups.
        g0, g1 = ray.get([t.__ray_call__.remote(grads) for t in group.targets])
        assert torch.equal(g0, g1) and torch.allclose(g0, grads(single), atol=1e-6, rtol=1e-4)
        group("train_step", samples)  # the replicas stay in lockstep
        g0, g1 = ray.get([t.__ray_call__.remote(grads) for t in group.targets])
        assert torch.equal(g0, g1)
        w0, w1 = ray.get([t.weights.remote() for t in group.targets])
        assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the ranks hold identical weights
        assert any(not torch.equal(w0[k], v) for k, v in PARLTrainer(cfg).weights().items())  # that moved
        assert group("get_version") == 0
    finally:
        for t in group.targets:
            ray.kill(t)


def test_trainers_that_cannot_all_start_fail_with_the_resource_named(ray_local: object, tiny_ckpt: str,
                                                                     tmp_path: Path) -> None:
    # two trainers of 3 CPUs each on the 4-CPU test cluster: the second can never be placed, and rank 0
    # must not be left waiting for it in the process group's rendezvous
    cfg = _cfg(tiny_ckpt, tmp_path).model_copy(update={"trainer_workers": 2, "trainer_num_cpus": 3.0})
    with pytest.raises(RuntimeError, match=r"did not start within 5 s.*trainer_num_cpus=3\.0"):
        launch_trainers(cfg, None, ready_timeout_s=5)
