"""PARLConfig: the one configuration of a PARL training run, loadable from YAML.

Every field is checked at load time (pydantic, unknown keys rejected), so a typo or a bad value
fails before Ray starts, with a message naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarm.config import ConfigError, read_yaml_mapping


class PARLConfigError(ValueError):
    """The config file is missing, not YAML, or has a bad field (the message names it)."""


class PARLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # ---- what is trained, on what ----
    env: Literal["widegeo", "deepgeo"] = "widegeo"
    policy_checkpoint: str = Field(description="HF-layout checkpoint of the trainable orchestrator")
    subagent_checkpoint: str | None = Field(
        None, description="frozen sub-agent checkpoint (own engine replica, never updated); default: policy_checkpoint")
    tokenizer: str | None = Field(
        None, description="'byte', 'byte:VOCAB' or a tiktoken dir; default: policy.json's, else model_shards' default")
    task_pool: int = Field(200, ge=1, description="train-split tasks drawn once (seeded); steps cycle through them")
    data_seed: int = 0
    max_rows: int | None = Field(None, ge=1, description="only tasks with at most this many gold rows")

    # ---- rollouts ----
    group_size: int = Field(4, ge=2, description="G: rollouts per task (group-relative baseline)")
    tasks_per_step: int = Field(2, ge=1)
    rollout_workers: int = Field(1, ge=1, description="Ray actors running episodes concurrently")
    swarm_workers: int = Field(2, ge=1, description="sub-agent worker actors of the swarm runtime")
    episode_retries: int = Field(2, ge=0, description="re-runs of an episode that failed for infrastructure reasons")
    temperature: float = Field(1.0, gt=0, description="orchestrator sampling temperature (the loss uses the same)")
    subagent_temperature: float = Field(
        0.0, ge=0, description="frozen sub-agents' sampling temperature (0 = greedy: they are part of the environment)")
    orchestrator_max_tokens: int = Field(1024, ge=16)
    subagent_max_tokens: int = Field(256, ge=16)
    max_subagents: int = Field(8, ge=1, le=100)
    subagent_max_steps: int = Field(8, ge=1)
    critical_steps_budget: int = Field(24, ge=1, description="episodes over it get r_perf = 0")
    episode_timeout_s: float = Field(600.0, gt=0)
    engine_max_len: int = Field(4096, ge=64, description="context per engine slot, prompt included")
    engine_slots: int = Field(16, ge=1)
    engine_num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per engine actor")
    namespace: str = Field("agent-swarm-parl", min_length=1, description="Ray namespace of the run's actors")

    # ---- reward ----
    lambda1: float = Field(0.3, ge=0, description="initial weight of r_parallel")
    lambda2: float = Field(0.3, ge=0, description="initial weight of r_finish")
    anneal: Literal["linear", "cosine", "none"] = "linear"
    anneal_steps: int = Field(100, ge=1, description="steps until lambda1, lambda2 reach 0")
    parallel_target: int = Field(4, ge=2, description="k: parallel width at which r_parallel saturates")
    latency_beta: float = Field(0.05, ge=0, le=1, description="r_perf -= beta * critical_steps / budget")

    # ---- optimisation ----
    steps: int = Field(10, ge=1)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon on hidden weight matrices, AdamW on embeddings, head and vectors")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's (Nesterov) momentum")
    clip_eps: float = Field(0.2, gt=0, lt=1)
    kl_coef: float = Field(0.0, ge=0, description="k3 KL to the initial policy; 0 disables the reference model")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    grad_clip: float = Field(1.0, gt=0)
    max_version_lag: int = Field(0, ge=0, description="0: synchronous; >=1: next step's rollouts overlap training")
    trainer_actor: bool = Field(True, description="run the trainer in a Ray actor (else in the driver)")
    trainer_workers: int = Field(
        1, ge=1, description="trainer actors in data parallel: each takes a share of a step's samples, "
                             "gradients are all-reduced (gloo) before every optimizer step")
    trainer_num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per trainer actor")
    threads: int | None = Field(None, ge=1, description="torch threads of the trainer")
    seed: int = 0

    # ---- output ----
    out: str = Field(description="run directory: metrics.jsonl, checkpoint/, train_state.pt")
    save_every: int = Field(10, ge=1)
    tensorboard: bool = False

    @model_validator(mode="after")
    def _checks(self) -> PARLConfig:
        if self.subagent_checkpoint is None:
            self.subagent_checkpoint = self.policy_checkpoint
        if self.trainer_workers > 1 and not self.trainer_actor:
            raise ValueError(f"trainer_workers={self.trainer_workers} needs trainer_actor: true "
                             "(data-parallel trainers are Ray actors)")
        if self.betas[0] < 0 or self.betas[0] >= 1 or self.betas[1] < 0 or self.betas[1] >= 1:
            raise ValueError(f"betas must both be in [0, 1), got {self.betas}")
        return self

    def check_paths(self) -> None:
        """The checkpoints must exist before anything starts (a clear error instead of a failed actor)."""
        for field in ("policy_checkpoint", "subagent_checkpoint"):
            path = Path(str(getattr(self, field)))
            if not (path / "config.json").is_file():
                raise PARLConfigError(f"{field}: {str(path)!r} is not a checkpoint directory (no config.json in it)")


def _format_errors(e: ValidationError) -> str:
    return "; ".join(f"field {'.'.join(map(str, err['loc'])) or '(root)'!r}: {err['msg']}" for err in e.errors())


def parse_overrides(items: list[str]) -> dict[str, object]:
    """`KEY=VALUE` strings (`swarm train --set`) as config overrides; VALUE is read as a YAML scalar
    (`lambda1=0` is 0, `anneal=none` is "none", `tensorboard=true` is True). Raises PARLConfigError."""
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PARLConfigError(f"--set takes KEY=VALUE (e.g. --set lambda1=0), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise PARLConfigError(f"--set {item!r}: the value is not a YAML scalar") from None
    return out


def load_config(path: str | os.PathLike[str], **overrides: object) -> PARLConfig:
    """Read a YAML config; `overrides` replace top-level keys (e.g. out=...). Raises PARLConfigError."""
    p = Path(path)
    try:
        raw = read_yaml_mapping(p)
    except ConfigError as e:
        raise PARLConfigError(str(e)) from None
    raw.update(overrides)
    try:
        return PARLConfig.model_validate(raw)
    except ValidationError as e:
        where = f" with --set {', '.join(sorted(overrides))}" if overrides else ""
        raise PARLConfigError(f"config file {str(p)!r}{where}: {_format_errors(e)}") from None
