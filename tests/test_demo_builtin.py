"""`swarm demo` / `swarm eval` on a policy checkpoint served by this project's engine: a tiny random
checkpoint (byte tokenizer) saved here, real TP=2 shards on the session's Ray cluster, the real job
service with its dashboard on loopback, SQLite. A random model's answers are noise, so these tests
check the machinery (engine, service, storage, output), not the scores."""

from __future__ import annotations

import io
import json
import shutil
import socket
import time
from pathlib import Path

import httpx
import orjson
import pytest
import ray
from rich.console import Console
from typer.testing import CliRunner

from planner import builtin
from planner.builtin import (
    ENGINE_NAME_PREFIX,
    CheckpointError,
    NoModelError,
    builtin_policy_available,
    checkpoint_problems,
    checkpoint_tokenizer,
    select_model,
    start_engine,
)
from planner.demo import _listen_socket, run_demo
from planner.evaluate import run_eval
from planner.prompts import SUBAGENT_SYSTEM_PROMPT
from swarm.cli import app
from swarm.config import Settings
from swarm.events import JobFinished, JobSubmitted
from swarm.plans import LLMConfig
from swarm.store import JobStore

# Short generations keep a random model's turns cheap (its output is noise either way); the tiny
# preset's 1024 positions are too few for the prompts, so the cache is made longer.
ENGINE_OPTIONS = {"max_tokens": 12, "num_slots": 8, "max_len": 4096}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from model_shards.checkpoint import save_checkpoint
    from model_shards.model_runner import ModelRunner, RunnerSpec

    out = tmp_path_factory.mktemp("tiny-policy")
    runner = ModelRunner.build(RunnerSpec(preset="tiny", seed=0, num_slots=1, max_len=64))
    save_checkpoint(runner.model, runner.cfg, str(out))
    (out / "policy.json").write_text(json.dumps({"tokenizer": "byte"}))
    return out


def no_endpoint(tmp_path: Path, **kw) -> Settings:
    return Settings(db_path=str(tmp_path / "jobs.sqlite"), port=0, llm=LLMConfig(base_url=None, model=None), **kw)


def engine_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ENGINE_NAME_PREFIX)]


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_problems_name_the_path_and_what_is_missing(tmp_path, tiny_checkpoint) -> None:
    assert checkpoint_problems(tiny_checkpoint) == []
    assert builtin_policy_available(tiny_checkpoint)
    missing = tmp_path / "nowhere"
    assert checkpoint_problems(missing) == [f"{missing} does not exist"]
    assert not builtin_policy_available(missing)

    bad = tmp_path / "bad"
    bad.mkdir()
    problems = checkpoint_problems(bad)
    assert any("no config.json" in p and str(bad) in p for p in problems), problems
    assert any("no weights" in p for p in problems), problems

    # Weights checked out without `git lfs pull`: a pointer file where the tensors should be.
    (bad / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    (bad / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    (bad / "tokenizer_config.json").write_text("{}")
    problems = checkpoint_problems(bad)
    assert any("Git LFS pointer" in p for p in problems), problems
    assert any("no tiktoken.model" in p for p in problems), problems
    assert not any("config.json" in p for p in problems), problems

    (bad / "config.json").write_text("{not json")
    assert any("config.json is not a valid model config" in p for p in checkpoint_problems(bad))
    with pytest.raises(CheckpointError, match="bad cannot be served"):
        start_engine(bad)


def test_checkpoint_tokenizer_prefers_the_shipped_vocabulary(tmp_path, tiny_checkpoint) -> None:
    assert checkpoint_tokenizer(tiny_checkpoint) == "byte"
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "policy.json").write_text(json.dumps({"tokenizer": "byte:400"}))
    assert checkpoint_tokenizer(ck) == "byte:400"
    (ck / "tiktoken.model").write_text("")  # a vocabulary next to the weights wins
    assert checkpoint_tokenizer(ck) == str(ck)


def test_select_model_endpoint_checkpoint_or_builtin(tmp_path, tiny_checkpoint, monkeypatch) -> None:
    endpoint = Settings(db_path=str(tmp_path / "db"), llm=LLMConfig(base_url="http://127.0.0.1:9/v1", model="m"))
    sel = select_model(endpoint)
    assert not sel.builtin and sel.llm == endpoint.llm and sel.orchestrator == "agent"
    assert sel.single_agent_prompt is None
    # An explicit checkpoint wins over the endpoint; the policy's own prompt and plan mode come with it.
    sel = select_model(endpoint, tiny_checkpoint)
    assert sel.builtin and sel.checkpoint == tiny_checkpoint.resolve() and sel.llm is None
    assert sel.orchestrator == "plan" and sel.single_agent_prompt == SUBAGENT_SYSTEM_PROMPT
    assert select_model(endpoint, tiny_checkpoint, "agent").orchestrator == "agent"
    # No endpoint: the built-in policy's directory.
    monkeypatch.setattr(builtin, "BUILTIN_POLICY_DIR", tiny_checkpoint)
    assert select_model(no_endpoint(tmp_path)).checkpoint == tiny_checkpoint.resolve()
    monkeypatch.setattr(builtin, "BUILTIN_POLICY_DIR", tmp_path / "not-trained")
    with pytest.raises(NoModelError, match="python -m planner.sft") as e:
        select_model(no_endpoint(tmp_path))
    assert str(tmp_path / "not-trained") in str(e.value)
    with pytest.raises(ValueError, match="--orchestrator must be 'agent' or 'plan', got 'tree'"):
        select_model(endpoint, orchestrator="tree")


def test_listen_socket_falls_back_to_a_free_port_when_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sock = _listen_socket("127.0.0.1", port)
        try:
            assert sock.getsockname()[1] not in (0, port)
        finally:
            sock.close()


def test_demo_without_a_policy_says_how_to_train_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(builtin, "BUILTIN_POLICY_DIR", tmp_path / "builtin_policy")
    out = io.StringIO()
    code = run_demo(settings=no_endpoint(tmp_path), console=Console(file=out, width=200))
    text = out.getvalue()
    assert code == 2
    assert str(tmp_path / "builtin_policy") in text and "does not exist" in text
    assert "python -m planner.sft" in text and "SWARM_LLM_BASE_URL" in text
    assert not (tmp_path / "jobs.sqlite").exists()  # nothing started


def test_cli_demo_and_eval_exit_2_on_a_missing_checkpoint(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SWARM_CONFIG", raising=False)
    monkeypatch.setenv("SWARM_DB", str(tmp_path / "jobs.sqlite"))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    missing = tmp_path / "no-ckpt"
    for args in (["demo", "--checkpoint", str(missing)], ["eval", "widegeo", "--checkpoint", str(missing), "--n", "1"],
                 ["eval", "widegeo", "--subagent-checkpoint", str(missing), "--n", "1"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        assert str(missing) in r.output and "python -m planner.sft" in r.output
    r = runner.invoke(app, ["demo", "--checkpoint", str(missing), "--tp", "0"])
    assert r.exit_code == 2 and "--tp" in r.output


# ---------------------------------------------------------------------------- end to end


def test_demo_serves_the_checkpoint_with_tp2_and_runs_both_jobs_through_the_service(
        ray_local, tiny_checkpoint, tmp_path, monkeypatch) -> None:
    # the tiny checkpoint stands in for the shipped policy (the note on its serial start follows the table)
    monkeypatch.setattr(builtin, "BUILTIN_POLICY_DIR", tiny_checkpoint)
    settings = no_endpoint(tmp_path)
    seen: dict[str, object] = {}

    def on_started(url: str) -> None:
        # While the demo runs: the dashboard answers, and the engine is up with its two shards.
        seen["url"] = url
        seen["dashboard"] = httpx.get(f"{url}/dashboard", timeout=10).status_code
        names = engine_actors()
        seen["engines"] = names
        seen["info"] = ray.get(ray.get_actor(names[0]).info.remote()) if names else None

    runs = []
    out = io.StringIO()
    code = run_demo(settings=settings, checkpoint=tiny_checkpoint, tp=2, max_rows=3,
                    console=Console(file=out, width=220), engine_options=ENGINE_OPTIONS,
                    on_service_started=on_started, on_run=runs.append)
    text = out.getvalue()
    assert code in (0, 1), text  # the jobs ended (a random policy may well fail the plan)
    url = seen["url"]
    assert seen["dashboard"] == 200
    assert len(seen["engines"]) == 1 and seen["info"]["tp"] == 2, seen
    # The URL was printed before the first job ran, and the closing lines say where to look.
    assert f"{url}/dashboard" in text
    assert text.index(f"{url}/dashboard") < text.index("job-")
    assert "policy " + str(tiny_checkpoint.resolve()) in text and "TP=2" in text
    for col in ("item-F1", "row-F1", "critical steps", "total steps", "sub-agents", "tool calls", "wall"):
        assert col in text, text
    assert "starts out serial" in text and "swarm train examples/parl_widegeo.yaml" in text
    assert text.rindex("critical steps") < text.index("starts out serial")  # under the results table

    store = JobStore(settings.db_path)
    try:
        jobs = sorted(store.list_jobs(), key=lambda j: j.created_at)
        assert [j.name.rsplit(" ", 1)[0] for j in jobs] == ["demo swarm", "demo single agent"]
        for j in jobs:
            assert j.state.terminal, j
            assert f"{url}/dashboard#/jobs/{j.id}" in text
            events = store.events(j.id)
            assert isinstance(events[0], JobSubmitted) and isinstance(events[-1], JobFinished)
            assert events[0].spec["llm"]["backend"] == "engine"
        swarm_job, single_job = jobs
        assert [(r.label, r.job_id, r.status.state) for r in runs] == [
            ("swarm", swarm_job.id, swarm_job.state), ("single agent", single_job.id, single_job.state)]
        assert f"swarm status {swarm_job.id}" in text and f"swarm serve --db {settings.db_path}" in text
        assert store.get_spec(swarm_job.id).orchestrator == "plan"
        single_spec = store.get_spec(single_job.id)
        assert single_spec.plan.subagents[0].system_prompt == SUBAGENT_SYSTEM_PROMPT
    finally:
        store.close()

    # Everything the demo started is gone: the service and the engine (with its shards).
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=2)
    deadline = time.monotonic() + 30
    while engine_actors():
        assert time.monotonic() < deadline, engine_actors()
        time.sleep(0.2)


def test_eval_runs_on_the_checkpoint_engine(ray_local, tiny_checkpoint, tmp_path) -> None:
    # The single agent runs on a second engine (--subagent-checkpoint), as PARL's frozen sub-agents do.
    frozen = tmp_path / "frozen-subagents"
    shutil.copytree(tiny_checkpoint, frozen)
    out_path = tmp_path / "res.jsonl"
    out = io.StringIO()
    code = run_eval("widegeo", settings=no_endpoint(tmp_path), policy="single", n=1, max_rows=3, out=out_path,
                    console=Console(file=out, width=200), checkpoint=tiny_checkpoint, tp=1,
                    engine_options=ENGINE_OPTIONS, subagent_checkpoint=frozen)
    assert code in (0, 1), out.getvalue()
    rows = [orjson.loads(line) for line in out_path.read_bytes().splitlines()]
    assert len(rows) == 1 and rows[0]["policy"] == "single" and rows[0]["state"] in ("succeeded", "failed")
    # The engine really generated (a random model writes noise, but it writes tokens).
    assert rows[0]["completion_tokens"] > 0 and rows[0]["prompt_tokens"] > 0, rows[0]
    assert "policy " + str(tiny_checkpoint.resolve()) in out.getvalue()
    assert "sub-agents: policy " + str(frozen.resolve()) in out.getvalue()
    deadline = time.monotonic() + 30
    while engine_actors():
        assert time.monotonic() < deadline, engine_actors()
        time.sleep(0.2)
