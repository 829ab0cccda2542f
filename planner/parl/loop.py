"""The PARL training loop (`swarm train CONFIG`): rollouts on Ray -> rewards -> GRPO advantages ->
clipped PG update -> hot weight push, with checkpoints, resume and per-step metrics.

Actors of one run: the policy engine (PolicyHost, trainable orchestrator, hot-updated), the frozen
sub-agent engine (EngineHost, never updated), the rollout workers, and the trainer. With
max_version_lag >= 1 the next step's rollouts are generated while the trainer updates (one step
off-policy); a group whose oldest sample is more than max_version_lag versions behind the trainer
is discarded and re-collected (counted as `stale_groups`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dashboards.metrics import METRICS_FILE
from planner.envs.base import Task
from planner.parl.advantages import group_advantages
from planner.parl.config import PARLConfig
from planner.parl.metrics import (
    EPISODES_FILE,
    MetricsWriter,
    append_episodes,
    episode_record,
    rollout_metrics,
)
from planner.parl.reward import episode_reward
from planner.parl.rollout import (
    Episode,
    EpisodeRequest,
    launch_rollout_workers,
    split_requests,
)

MAX_STALE_RECOLLECTS = 3
LOOP_STATE_FILE = "loop_state.json"  # step, data cursor, config: read before any actor starts
# Fields that may differ between a run and its resume (how long, how it is run); all others must match.
RESUMABLE_CHANGES = {"steps", "threads", "save_every", "tensorboard", "rollout_workers", "swarm_workers",
                     "trainer_actor", "trainer_workers", "trainer_num_cpus", "engine_num_cpus", "episode_timeout_s"}


@dataclass
class TrainResult:
    out: Path
    steps: int
    version: int
    last_metrics: dict[str, Any]


def task_pool(cfg: PARLConfig) -> list[Task]:
    from planner.envs import get_env

    env = get_env(cfg.env)
    tasks = [t for t in env.tasks("train", cfg.task_pool, cfg.data_seed)
             if cfg.max_rows is None or len(t.gold) <= cfg.max_rows]
    if not tasks:
        raise ValueError(f"no {cfg.env} train task has at most max_rows={cfg.max_rows} gold rows "
                         f"(of task_pool={cfg.task_pool}); raise max_rows or task_pool")
    return tasks


def step_requests(pool: list[Task], cursor: int, cfg: PARLConfig) -> list[EpisodeRequest]:
    tasks = [pool[(cursor + g) % len(pool)] for g in range(cfg.tasks_per_step)]
    return [EpisodeRequest(task=t, group=g, index=i) for g, t in enumerate(tasks) for i in range(cfg.group_size)]


def stale_groups(episodes: list[Episode], version: int, max_lag: int) -> set[int]:
    """Groups holding a sample generated more than max_lag policy versions before `version`."""
    return {e.group for e in episodes if e.samples and version - e.min_version > max_lag}


def _config_dump(cfg: PARLConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude=RESUMABLE_CHANGES)


def changed_fields(stored: dict[str, Any], cfg: PARLConfig) -> list[str]:
    """Config fields that differ from a run's stored ones. A field the run predates counts as stored
    with its default, so runs written before a new option was added still resume."""
    defaults = {k: f.default for k, f in PARLConfig.model_fields.items()}
    current = _config_dump(cfg)
    return sorted(k for k, v in current.items() if stored.get(k, defaults.get(k)) != v)


def default_tokenizer(cfg: PARLConfig) -> str:
    """The config's tokenizer, else the policy checkpoint's own (as `swarm demo` loads it)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    from planner.builtin import checkpoint_tokenizer

    return checkpoint_tokenizer(cfg.policy_checkpoint)


def run_training(cfg: PARLConfig, *, resume: bool = False, address: str | None = None,
                 log: Callable[[str], None] = print) -> TrainResult:
    import ray

    from model_shards.model_runner import RunnerSpec
    from model_shards.shards import launch_engine_actor
    from model_shards.tokenizer import load_tokenizer
    from planner.parl.policy_host import launch_policy_host
    from planner.parl.trainer import STATE_FILE, PARLTrainer, TrainerGroup, launch_trainers

    cfg.check_paths()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    loop_state: dict[str, Any] = {}
    if resume:
        # Checked before any actor starts: a wrong resume fails in a second, not after engine start-up.
        if not (out / STATE_FILE).is_file() or not (out / LOOP_STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} and {LOOP_STATE_FILE} in {out} (nothing to resume)")
        loop_state = json.loads((out / LOOP_STATE_FILE).read_text())
        changed = changed_fields(loop_state.get("config", {}), cfg)
        if changed:
            raise ValueError(f"--resume: {out} was written with a different configuration (changed: "
                             f"{', '.join(changed)}; only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
        if loop_state["step"] >= cfg.steps:
            raise ValueError(f"--resume: the run in {out} already did {loop_state['step']} step(s); "
                             f"raise `steps` (now {cfg.steps}) to train further")
    pool = task_pool(cfg)
    tokenizer = default_tokenizer(cfg)
    decode = load_tokenizer(tokenizer).decode  # the orchestrator's text, for episodes.jsonl
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=False)
    run_id = uuid.uuid4().hex[:8]
    policy_name, sub_name = f"parl-policy-{run_id}", f"parl-subagents-{run_id}"
    actors: list[Any] = []
    writer: MetricsWriter | None = None
    try:
        def spec(ckpt: str) -> RunnerSpec:
            return RunnerSpec(checkpoint=ckpt, num_slots=cfg.engine_slots, max_len=cfg.engine_max_len)

        log(f"starting the policy engine ({cfg.policy_checkpoint}) and the frozen sub-agent engine "
            f"({cfg.subagent_checkpoint})")
        actors.append(launch_policy_host(policy_name, spec(cfg.policy_checkpoint), tokenizer=tokenizer,
                                         num_cpus=cfg.engine_num_cpus))
        actors.append(launch_engine_actor(sub_name, spec(str(cfg.subagent_checkpoint)), tokenizer=tokenizer,
                                          model_name="parl-subagents", num_cpus=cfg.engine_num_cpus))
        if cfg.trainer_actor:
            trainers = launch_trainers(cfg, policy_name)
            actors.extend(trainers)
            if len(trainers) > 1:
                log(f"{len(trainers)} data-parallel trainer actors joined one process group (gloo)")
        else:
            trainers = [PARLTrainer(cfg, policy_name)]
        trainer = TrainerGroup(trainers, cfg.trainer_actor)
        workers = launch_rollout_workers(cfg, policy_name, sub_name)
        actors.extend(workers)

        step, cursor = 0, 0
        if resume:
            extra = trainer("load", str(out))
            if extra.get("step") != loop_state["step"]:
                raise ValueError(f"--resume: {STATE_FILE} (step {extra.get('step')}) and {LOOP_STATE_FILE} "
                                 f"(step {loop_state['step']}) disagree; the last save was interrupted")
            step, cursor = int(loop_state["step"]), int(loop_state["cursor"])
            trainer("push_weights", False)  # the engine serves the resumed policy, not the initial one
            log(f"resumed at step {step} (policy version {trainer('get_version')})")
        else:
            for name in (METRICS_FILE, EPISODES_FILE):  # a fresh run starts a fresh curve and log
                (out / name).unlink(missing_ok=True)
        writer = MetricsWriter(out, cfg.tensorboard, log)

        def submit(reqs: list[EpisodeRequest]) -> list[Any]:
            return [w.run.remote(chunk) for w, chunk in zip(workers, split_requests(reqs, len(workers)))]

        pending: list[Any] | None = None
        last: dict[str, Any] = {}
        t_run = time.perf_counter()
        submitted_at = 0.0  # when the rollouts being collected were submitted (maybe during the last update)
        while step < cfg.steps:
            t0 = time.perf_counter()
            if pending is None:
                pending, submitted_at = submit(step_requests(pool, cursor, cfg)), t0
            episodes = [e for chunk in ray.get(pending) for e in chunk]
            pending = None
            reqs = step_requests(pool, cursor, cfg)
            cursor += cfg.tasks_per_step
            version = trainer("get_version")
            stale_total = 0
            for _ in range(MAX_STALE_RECOLLECTS):
                stale = stale_groups(episodes, version, cfg.max_version_lag)
                if not stale:
                    break
                stale_total += len(stale)
                fresh = [e for chunk in ray.get(submit([r for r in reqs if r.group in stale])) for e in chunk]
                episodes = [e for e in episodes if e.group not in stale] + fresh
            else:
                raise RuntimeError(f"rollouts stayed more than max_version_lag={cfg.max_version_lag} versions "
                                   f"behind after {MAX_STALE_RECOLLECTS} re-collections")
            gen_s = time.perf_counter() - t0
            rollout_s = time.perf_counter() - submitted_at  # the rollouts' own wall time, overlap included
            if cfg.max_version_lag >= 1 and step + 1 < cfg.steps:
                # generated while the trainer updates
                pending, submitted_at = submit(step_requests(pool, cursor, cfg)), time.perf_counter()

            terms = [episode_reward(e.stats, step, cfg) for e in episodes]
            for g in {e.group for e in episodes}:
                members = [(e, t) for e, t in zip(episodes, terms) if e.group == g]
                for (e, _), adv in zip(members, group_advantages([t.total for _, t in members])):
                    for s in e.samples:
                        s.advantage = adv
            samples = [s for e in episodes for s in e.samples]
            t1 = time.perf_counter()
            stats = trainer("train_step", samples)
            train_s = time.perf_counter() - t1
            sync_s = trainer("push_weights")
            step += 1
            total = gen_s + train_s + sync_s
            last = {**rollout_metrics(episodes, terms, cfg.tasks_per_step), **stats,
                    "stale_groups": float(stale_total), "policy_version": float(trainer("get_version")),
                    "version_lag": float(max((version - e.min_version for e in episodes if e.samples), default=0)),
                    "gen_s": gen_s, "train_s": train_s, "sync_s": sync_s,
                    "share_gen": gen_s / total, "share_train": train_s / total, "share_sync": sync_s / total,
                    "rollout_s": rollout_s,
                    "rollouts_per_s": len(episodes) / rollout_s if rollout_s > 0 else None,
                    "tokens_per_s": sum(e.completion_tokens for e in episodes) / rollout_s if rollout_s > 0 else None,
                    "elapsed_s": time.perf_counter() - t_run}
            writer.write(step, last)
            append_episodes(out, [episode_record(step, e, t, decode) for e, t in zip(episodes, terms)])
            log(f"step {step}/{cfg.steps}: reward {_fmt(last['reward'])} item-F1 {_fmt(last['item_f1'])} "
                f"critical steps {_fmt(last['critical_steps'])} sub-agents {_fmt(last['subagents_per_task'])} "
                f"loss {_fmt(last['loss'])} ({gen_s:.1f}s gen, {train_s:.1f}s train, {sync_s:.2f}s sync)")
            if step % cfg.save_every == 0 or step == cfg.steps:
                state = {"step": step, "cursor": cursor, "config": _config_dump(cfg)}
                trainer("save", str(out), state)
                tmp = out / (LOOP_STATE_FILE + ".tmp")
                tmp.write_text(json.dumps(state, indent=2))
                tmp.replace(out / LOOP_STATE_FILE)
        return TrainResult(out=out, steps=step, version=int(trainer("get_version")), last_metrics=last)
    finally:
        if writer is not None:
            writer.close()
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # already gone, or Ray is shutting down: nothing left to free
                pass
        if owns_ray:
            ray.shutdown()


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"
