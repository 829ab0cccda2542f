"""PARL throughput: rollouts/s with 1, 2, 4 and 8 rollout workers, the time split of a training step
between rollouts (generation and tools), the update and the weight sync, and the weight-sync time.

    python bench/parl_rollouts.py --checkpoint CKPT --workers 1 2 4 8 --steps 2 [--trainer-workers N]

Each worker count is one short `swarm train` run (examples/parl_widegeo.yaml with these overrides:
its rollout workers, `steps`, `max_version_lag: 0` so that rollouts and the update do not overlap
and the split is clean, a temporary `out`). The numbers are those of the last step (the first one
also pays engine warm-up). Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from planner.parl import load_config
from planner.parl.loop import run_training

FIELDS = ("rollouts_per_s", "tokens_per_s", "episodes", "gen_s", "train_s", "sync_s", "share_gen", "share_train",
          "share_sync", "share_tools_in_rollout", "episode_wall_s")


def run(config: str, checkpoint: str, workers: int, steps: int, out: Path,
        trainer_workers: int = 1) -> dict[str, float]:
    cfg = load_config(config, policy_checkpoint=checkpoint, subagent_checkpoint=checkpoint, rollout_workers=workers,
                      steps=steps, max_version_lag=0, out=str(out), save_every=10_000, trainer_workers=trainer_workers)
    run_training(cfg, log=lambda m: print(f"  [{workers} workers] {m}", flush=True))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "rollouts_per_s" in r][-1]
    return {k: last.get(k) for k in FIELDS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="examples/parl_widegeo.yaml")
    p.add_argument("--checkpoint", required=True, help="policy checkpoint (also the frozen sub-agents)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--trainer-workers", type=int, default=1, help="data-parallel trainer actors")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in a.workers:
            results[w] = run(a.config, a.checkpoint, w, a.steps, Path(tmp) / f"w{w}", a.trainer_workers)
            print(json.dumps({"workers": w, **results[w]}), flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; checkpoint {a.checkpoint}; "
          f"{a.trainer_workers} trainer worker(s)")
    print("| rollout workers | rollouts/s | generated tok/s (all agents) | step: rollouts | update | weight sync | "
          "tools' share of rollout time | mean episode wall |")
    print("|---|---|---|---|---|---|---|---|")
    for w, r in results.items():
        def f(k: str, fmt: str = "{:.2f}") -> str:
            return "-" if r.get(k) is None else fmt.format(r[k])
        print(f"| {w} | {f('rollouts_per_s', '{:.3f}')} | {f('tokens_per_s', '{:.1f}')} | {f('gen_s', '{:.1f} s')} "
              f"({f('share_gen', '{:.0%}')}) | {f('train_s', '{:.1f} s')} ({f('share_train', '{:.0%}')}) | "
              f"{f('sync_s', '{:.2f} s')} ({f('share_sync', '{:.1%}')}) | {f('share_tools_in_rollout', '{:.1%}')} | "
              f"{f('episode_wall_s', '{:.1f} s')} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
