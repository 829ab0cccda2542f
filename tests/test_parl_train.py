"""End to end: `examples/parl_tiny.yaml` trains a tiny random policy for 2 steps on WideGeo through the
real runtime and engines on local Ray, writes metrics and a checkpoint, and --resume continues it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dashboards.metrics import read_metrics
from model_shards.checkpoint import read_config
from model_shards.config import ModelConfig
from planner.parl import PARLConfigError, load_config
from planner.parl.config import parse_overrides
from planner.parl.loop import LOOP_STATE_FILE, run_training
from planner.parl.metrics import EPISODES_FILE
from swarm.cli import app

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "parl_tiny.yaml"




def test_train_two_steps_then_resume(ray_local: object, tiny_ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(EXAMPLE, policy_checkpoint=tiny_ckpt, out=str(out))
    assert (cfg.steps, cfg.group_size) == (2, 2)
    res = run_training(cfg, log=lambda m: None)
    assert res.steps == 2 and res.version == 2

    chunk = read_metrics(out / "metrics.jsonl")
    assert not chunk.errors and [r.step for r in chunk.records] == [1, 2]
    for rec in chunk.records:
        v = rec.values
        for key in ("reward", "r_parallel", "r_finish", "r_perf", "lambda1", "lambda2", "critical_steps",
                    "item_f1", "subagents_per_task", "tool_calls_per_task", "rollouts_per_s", "tokens_per_s",
                    "share_gen", "share_train", "share_sync", "policy_version"):
            assert v.get(key) is not None, key
        assert v["episodes"] == 2 and v["critical_steps"] >= 1  # every episode wrote a plan at least
        assert v["orchestrator_tokens"] > 0 and v["samples"] >= 2
        assert 0 <= v["share_gen"] <= 1 and v["share_gen"] + v["share_train"] + v["share_sync"] == pytest.approx(1)
        # throughput over the rollouts' own wall time, which covers at least the loop's wait for them
        assert v["rollout_s"] >= v["gen_s"] and v["rollouts_per_s"] == pytest.approx(v["episodes"] / v["rollout_s"])
        if v["logprob_mismatch"] is not None and v["version_lag"] == 0:
            # on-policy samples: engine and trainer scored the same tokens alike (with lag 1 the
            # samples come from the previous weights and legitimately differ)
            assert v["logprob_mismatch"] < 1e-3
    first, second = chunk.records[0].values, chunk.records[1].values
    # step 2's rollouts were generated while step 1 trained (max_version_lag 1): at most one version old
    assert first["version_lag"] == 0 and second["version_lag"] in (0, 1) and second["stale_groups"] == 0
    assert first["lambda1"] == pytest.approx(cfg.lambda1) and second["lambda1"] == pytest.approx(cfg.lambda1 / 2)
    assert second["policy_version"] == 2

    # one episodes.jsonl record per rollout: what the orchestrator wrote, the answer, its score and reward
    episodes = [json.loads(line) for line in (out / EPISODES_FILE).read_text().splitlines()]
    assert [e["step"] for e in episodes] == [1, 1, 2, 2]
    for e in episodes:
        assert e["task_id"].startswith("widegeo-train-") and 0 <= e["item_f1"] <= 1
        assert e["orchestrator"] and all(o["role"] in ("plan", "aggregate") for o in e["orchestrator"])
        assert any(o["text"] for o in e["orchestrator"])
        assert isinstance(e["answer"], str) and e["critical_steps"] >= 1
    by_step = {s: [e for e in episodes if e["step"] == s] for s in (1, 2)}
    for s, group in by_step.items():  # the logged advantages are the group's (zero-mean) ones
        assert sum(e["advantage"] for e in group) == pytest.approx(0, abs=1e-6)
        assert sum(e["reward"] for e in group) / 2 == pytest.approx(chunk.records[s - 1].values["reward"])

    assert read_config(out / "checkpoint").num_hidden_layers == ModelConfig.preset("tiny").num_hidden_layers
    state = json.loads((out / LOOP_STATE_FILE).read_text())
    assert (state["step"], state["cursor"]) == (2, 2)
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 2

    # a resume with a changed training setting is refused before anything starts
    with pytest.raises(ValueError, match="lr"):
        run_training(load_config(EXAMPLE, policy_checkpoint=tiny_ckpt, out=str(out), steps=3, lr=0.5), resume=True)
    with pytest.raises(ValueError, match="already did 2"):
        run_training(load_config(EXAMPLE, policy_checkpoint=tiny_ckpt, out=str(out)), resume=True)

    # resumed into two data-parallel trainers: both load the state, rank 0 pushes and saves
    res = run_training(load_config(EXAMPLE, policy_checkpoint=tiny_ckpt, out=str(out), steps=3, trainer_workers=2),
                       resume=True, log=lambda m: None)
    assert res.steps == 3 and res.version == 3
    chunk = read_metrics(out / "metrics.jsonl")
    assert [r.step for r in chunk.records] == [1, 2, 3]  # appended, not restarted
    assert [json.loads(line)["step"] for line in (out / EPISODES_FILE).read_text().splitlines()] == [1, 1, 2, 2, 3, 3]
    assert chunk.records[2].values["policy_version"] == 3
    assert chunk.records[2].values["lambda1"] == pytest.approx(0.0)  # annealed to 0 at anneal_steps=2
    assert json.loads((out / LOOP_STATE_FILE).read_text())["cursor"] == 3
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 3


def test_cli_train_rejects_bad_config(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy_checkpoint: ck\nout: o\ngroup_size: 1\n")

    def run(path: Path) -> tuple[int, str]:
        r = runner.invoke(app, ["train", str(path)])
        return r.exit_code, " ".join(r.output.split())  # the console wraps long lines

    code, text = run(bad)
    assert code == 2 and "group_size" in text
    code, text = run(tmp_path / "nope.yaml")
    assert code == 2 and "does not exist" in text
    missing = tmp_path / "missing_ckpt.yaml"
    missing.write_text(f"policy_checkpoint: {tmp_path / 'no-such-ckpt'}\nout: o\n")
    code, text = run(missing)
    assert code == 2 and "policy_checkpoint" in text and "config.json" in text


def test_set_overrides_config_keys_and_names_bad_ones(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("policy_checkpoint: ck\nout: o\nlambda1: 0.3\n")
    cfg = load_config(base, **parse_overrides(["lambda1=0", "anneal=none", "out=runs/x", "tensorboard=true"]))
    assert (cfg.lambda1, cfg.anneal, cfg.out, cfg.tensorboard) == (0, "none", "runs/x", True)
    for bad, words in ((["lambda1"], "KEY=VALUE"), (["=3"], "KEY=VALUE"), (["lambda1=[1"], "YAML")):
        with pytest.raises(PARLConfigError, match=words):
            parse_overrides(bad)
    with pytest.raises(PARLConfigError, match=r"--set lamda1.*lamda1"):
        load_config(base, **parse_overrides(["lamda1=0"]))  # a misspelt key is named, not ignored
    r = CliRunner().invoke(app, ["train", str(base), "--set", "group_size=1"])
    assert r.exit_code == 2 and "group_size" in r.output


def test_resume_check_reads_fields_a_run_predates_as_their_defaults(tiny_ckpt: str, tmp_path: Path) -> None:
    from planner.parl.loop import _config_dump, changed_fields

    cfg = load_config(EXAMPLE, policy_checkpoint=tiny_ckpt, out=str(tmp_path))
    stored = _config_dump(cfg)
    old = {k: v for k, v in stored.items() if k not in ("optimizer", "muon_momentum")}  # an older run's
    assert changed_fields(old, cfg) == []
    assert changed_fields(old, cfg.model_copy(update={"optimizer": "muon"})) == ["optimizer"]
    assert changed_fields(stored, cfg.model_copy(update={"lr": 0.5, "trainer_workers": 3})) == ["lr"]
