"""PARLTrainer: the fp32 orchestrator policy, its optimizer and the clipped policy-gradient update.

A plain class (tests use it in-process); `launch_trainers` runs it as one Ray actor, or as
`trainer_workers` actors in data parallel: every rank holds the whole model and optimizer, trains on
its share of the step's samples, and the summed gradients are all-reduced (torch.distributed, gloo)
before each rank takes the same optimizer step, so the replicas never diverge. The gradients are
reduced by hand once per step rather than through DistributedDataParallel, whose per-backward hooks
would hang when ranks run different numbers of micro-batches (a step's samples do not split evenly).

After each update `push_weights` hot-loads the new weights into the policy engine (PolicyHost.
update_weights_versioned; rank 0 only) and bumps the policy version that rollouts record. Checkpoints
hold the HF-format model (model_shards.checkpoint.save_checkpoint), the optimizer, the step, the
version, torch's RNG state and whatever loop state the driver passes (data cursor, config).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model_shards.bpe import TOKENIZER_FILES
from model_shards.checkpoint import load_checkpoint, save_checkpoint
from planner.parl.config import PARLConfig
from planner.parl.loss import policy_loss
from planner.parl.muon import build_optimizer
from planner.parl.samples import (
    OrchestratorSample,
    collate,
    token_entropy,
    token_logprobs,
)

STATE_FILE = "train_state.pt"
CHECKPOINT_DIR = "checkpoint"
POLICY_FILE = "policy.json"


def micro_batches(samples: Sequence[OrchestratorSample], n: int) -> list[list[OrchestratorSample]]:
    """At most n micro-batches of similar lengths (sorted first, so little padding)."""
    ordered = sorted(samples, key=len)
    size = max(1, math.ceil(len(ordered) / n))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def rank_share(samples: Sequence[OrchestratorSample], rank: int, world: int) -> list[OrchestratorSample]:
    """The samples data-parallel rank `rank` trains on: longest first, each to the rank with the fewest
    tokens so far (ties to the lower rank), so ranks get about equal work. Every rank computes the
    same split from the same list."""
    loads = [0] * world
    mine: list[OrchestratorSample] = []
    for s in sorted(samples, key=len, reverse=True):
        r = min(range(world), key=lambda i: loads[i])
        loads[r] += len(s)
        if r == rank:
            mine.append(s)
    return mine


class PARLTrainer:
    def __init__(self, cfg: PARLConfig, policy_actor: str | None = None, rank: int = 0, world: int = 1) -> None:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.policy_actor = policy_actor
        self.rank, self.world = rank, world
        self.mcfg, self.model = load_checkpoint(cfg.policy_checkpoint, dtype=torch.float32)
        self.model.train()
        # The reference (initial) policy exists only when the KL term is on.
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
        self.opt = build_optimizer(self.model, cfg.optimizer, lr=cfg.lr, betas=cfg.betas,
                                   weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
        self.step = 0
        self.version = 0
        self._policy: Any = None

    # ---- data parallel ---------------------------------------------------------------------------
    def dist_address(self) -> tuple[str, int]:
        """Where rank 0 listens for the others (called on rank 0 before `join`)."""
        import ray

        from model_shards.model_runner import free_port

        return ray.util.get_node_ip_address(), free_port()

    def join(self, init_method: str, timeout_s: float = 300.0) -> int:
        """Join the trainers' process group (gloo: the trainer runs on CPU); returns this rank."""
        from model_shards.model_runner import init_distributed

        # The trainers all-reduce whole gradients (far beyond a shared-memory slot): plain gloo.
        init_distributed(self.rank, self.world, init_method, backend="gloo", timeout_s=timeout_s, cpu_collectives="gloo")
        return self.rank

    def _all_reduce(self, acc: dict[str, float]) -> None:
        """Sum the gradients and the loss statistics over the ranks (one flat buffer, one collective).
        A parameter without a gradient on this rank contributes zeros."""
        import torch.distributed as dist

        params = [p for p in self.model.parameters() if p.requires_grad]
        keys = sorted(acc)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
                         + [torch.tensor([acc[k] for k in keys], dtype=torch.float32)])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)  # views of the one reduced buffer
            offset += p.numel()
        acc.update(zip(keys, flat[offset:].tolist()))

    # ---- the update ------------------------------------------------------------------------------
    def train_step(self, samples: Sequence[OrchestratorSample]) -> dict[str, float | None]:
        """One optimizer step on orchestrator samples carrying advantages; returns loss statistics.
        Samples with a zero advantage add no policy gradient, so without KL they are skipped. With
        several data-parallel ranks every rank gets the whole list, trains on its `rank_share` and
        returns the statistics of the whole batch."""
        cfg = self.cfg
        used = [s for s in samples if s.completion_ids and (s.advantage != 0.0 or cfg.kl_coef > 0)]
        out: dict[str, float | None] = {"samples": float(len(samples)), "trained_samples": float(len(used)),
                                        "loss": None, "pg_loss": None, "clip_fraction": None, "kl": None,
                                        "entropy": None, "ratio_mean": None, "grad_norm": None,
                                        "logprob_mismatch": None, "trained_tokens": 0.0}
        if not used:
            self.step += 1
            return out
        total_tokens = float(sum(len(s.completion_ids) for s in used))
        self.opt.zero_grad(set_to_none=True)
        acc = {"loss": 0.0, "pg_loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "ratio_mean": 0.0,
               "logprob_mismatch": 0.0}
        for mb in micro_batches(rank_share(used, self.rank, self.world), cfg.grad_accum):
            batch = collate(mb)
            logits = self.model.forward_logits(batch.ids)
            new_lp = token_logprobs(logits, batch.ids, cfg.temperature)
            ref_lp = None
            if self.ref is not None:
                with torch.no_grad():
                    ref_lp = token_logprobs(self.ref.forward_logits(batch.ids), batch.ids, cfg.temperature)
            loss, st = policy_loss(new_lp, batch.old_logprobs, batch.advantages, batch.mask, clip_eps=cfg.clip_eps,
                                   ref_logprobs=ref_lp, kl_coef=cfg.kl_coef, normalizer=total_tokens)
            loss.backward()
            w = st.tokens / total_tokens  # token-weighted means over the whole batch
            acc["loss"] += float(loss.detach())
            for k in ("pg_loss", "clip_fraction", "kl", "ratio_mean"):
                acc[k] += getattr(st, k) * w
            with torch.no_grad():
                m = batch.mask
                acc["entropy"] += float((token_entropy(logits, cfg.temperature) * m).sum()) / total_tokens
                # Engine vs trainer logprobs of the same tokens: ~0 when both hold the same weights.
                acc["logprob_mismatch"] += float(((new_lp - batch.old_logprobs).abs() * m).sum()) / total_tokens
        if self.world > 1:
            self._all_reduce(acc)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.opt.step()
        self.step += 1
        out.update(acc)
        out.update(grad_norm=grad_norm, trained_tokens=total_tokens)
        return out

    # ---- weights to the policy engine ------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.hf_state_dict()

    def push_weights(self, bump: bool = True) -> float:
        """Hot-load the current weights into the policy engine as version+1 (bump=False: as the current
        version, e.g. after a resume); returns the seconds it took. Ranks other than 0 hold the same
        weights and only follow the version."""
        if self.rank > 0:
            self.version += int(bump)
            return 0.0
        if self.policy_actor is None:
            raise RuntimeError("push_weights needs the policy engine's actor name (policy_actor)")
        import ray

        if self._policy is None:
            self._policy = ray.get_actor(self.policy_actor)
        t0 = time.perf_counter()
        self.version += int(bump)
        ray.get(self._policy.update_weights_versioned.remote(self.weights(), self.version))
        return time.perf_counter() - t0

    def get_version(self) -> int:
        return self.version

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, out: str, extra: dict[str, Any]) -> str:
        """HF checkpoint under out/checkpoint (servable as is) and out/train_state.pt for --resume."""
        root = Path(out)
        ckpt = root / CHECKPOINT_DIR
        save_checkpoint(self.model, self.mcfg, ckpt)
        src_policy = Path(self.cfg.policy_checkpoint) / POLICY_FILE
        info: dict[str, Any] = json.loads(src_policy.read_text()) if src_policy.is_file() else {}
        info.update({"parl_step": self.step, "parl_version": self.version, "initial_policy": self.cfg.policy_checkpoint})
        if self.cfg.tokenizer:
            info["tokenizer"] = self.cfg.tokenizer
        (ckpt / POLICY_FILE).write_text(json.dumps(info, indent=2))
        for name in TOKENIZER_FILES:  # so the checkpoint serves with the policy's own tokenizer
            src = Path(self.cfg.policy_checkpoint) / name
            if src.is_file():
                shutil.copy(src, ckpt / name)
        tmp = root / (STATE_FILE + ".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                    "version": self.version, "rng": torch.get_rng_state(), "extra": extra}, tmp)
        tmp.replace(root / STATE_FILE)  # a crash mid-save never leaves a half-written state
        return str(root / STATE_FILE)

    def load(self, out: str) -> dict[str, Any]:
        """Restore from out/train_state.pt; returns the driver's `extra`."""
        path = Path(out) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {out}")
        state = torch.load(path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.version = int(state["version"])
        torch.set_rng_state(state["rng"])
        return dict(state["extra"])


def launch_trainers(cfg: PARLConfig, policy_actor: str | None, ready_timeout_s: float = 180.0) -> list[Any]:
    """`cfg.trainer_workers` PARLTrainer actors; with more than one, joined in one process group.
    Raises RuntimeError when they cannot all start (e.g. too few free CPUs for trainer_num_cpus each),
    instead of leaving the ranks that did start waiting for the others."""
    import ray

    world = cfg.trainer_workers
    cls = ray.remote(PARLTrainer).options(num_cpus=cfg.trainer_num_cpus, max_restarts=0)
    actors = [cls.remote(cfg, policy_actor, rank, world) for rank in range(world)]
    _, pending = ray.wait([a.get_version.remote() for a in actors], num_returns=world, timeout=ready_timeout_s)
    if pending:
        for a in actors:
            ray.kill(a)
        raise RuntimeError(
            f"{len(pending)} of {world} trainer actor(s) did not start within {ready_timeout_s:.0f} s; each "
            f"asks for trainer_num_cpus={cfg.trainer_num_cpus} CPUs and the cluster has "
            f"{ray.available_resources().get('CPU', 0):g} free: lower trainer_num_cpus or trainer_workers")
    if world > 1:
        try:
            ip, port = ray.get(actors[0].dist_address.remote())
            ray.get([a.join.remote(f"tcp://{ip}:{port}") for a in actors])
        except Exception:
            for a in actors:
                ray.kill(a)
            raise
    return actors


class TrainerGroup:
    """The trainer as the training loop calls it, with one syntax: a PARLTrainer in-process, or its
    data-parallel Ray actors. Every rank runs every call (they must stay in lockstep), except those
    that only read or write what all ranks hold alike, which rank 0 answers alone."""

    RANK0_ONLY = frozenset({"save", "get_version", "weights"})

    def __init__(self, targets: list[Any], remote: bool) -> None:
        self.targets, self.remote = targets, remote

    def __call__(self, method: str, *args: Any) -> Any:
        if not self.remote:
            return getattr(self.targets[0], method)(*args)
        import ray

        targets = self.targets[:1] if method in self.RANK0_ONLY else self.targets
        if len(targets) > 1:
            args = tuple(ray.put(a) for a in args)  # one copy in the object store, not one per rank
        return ray.get([getattr(t, method).remote(*args) for t in targets])[0]
