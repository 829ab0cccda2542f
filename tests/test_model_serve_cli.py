"""`swarm model serve` as an operator runs it: a real subprocess serving the tiny preset, queried
with the official openai client, then pointed at by the swarm's own OpenAI backend."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import openai
import pytest

from swarm.llm import ChatMessage
from swarm.llm_openai import OpenAIChatClient
from swarm.plans import LLMConfig
from tests.net import free_port


def test_model_serve_answers_openai_clients(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm.cli", "model", "serve", "--preset", "tiny", "--no-ray", "--port", str(port),
         "--max-len", "512", "--num-slots", "4"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=base, api_key="unused")
        model = client.models.list().data[0].id
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0, seed=1
        )
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens > 1
        # The swarm's own backend talks to it too.
        llm = OpenAIChatClient(LLMConfig(base_url=base, model=model, max_tokens=8, temperature=0.0))
        res = asyncio.run(llm.chat([ChatMessage(role="user", content="hi")]))
        assert res.usage.completion_tokens >= 1
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def test_serve_cli_passes_shard_options_on_and_refuses_bad_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """--cpu-collectives and --cpus-per-shard reach the engine builder (serve itself replaced by a recorder)."""
    from typer.testing import CliRunner

    import model_shards.serve
    from swarm.cli import app

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(model_shards.serve, "serve", lambda *a, **k: seen.append(k))
    runner = CliRunner()
    r = runner.invoke(app, ["model", "serve", "--preset", "tiny", "--tp", "2", "--cpu-collectives", "tcp"])
    assert r.exit_code == 2 and "--cpu-collectives must be shared_memory or gloo" in r.output and not seen
    r = runner.invoke(app, ["model", "serve", "--preset", "tiny", "--tp", "2", "--cpu-collectives", "gloo"])
    assert r.exit_code == 0, r.output
    assert seen[-1]["cpu_collectives"] == "gloo"
    assert runner.invoke(app, ["model", "serve", "--preset", "tiny", "--tp", "2"]).exit_code == 0
    assert seen[-1]["cpu_collectives"] == "shared_memory"
    assert "num_cpus_per_shard" not in seen[-1]  # build_engine's default: one CPU per shard
    r = runner.invoke(app, ["model", "serve", "--preset", "tiny", "--tp", "2", "--cpus-per-shard", "4"])
    assert r.exit_code == 0 and seen[-1]["num_cpus_per_shard"] == 4.0
    r = runner.invoke(app, ["model", "serve", "--preset", "tiny", "--cpus-per-shard", "4"])
    assert r.exit_code == 2 and "--cpus-per-shard applies to --tp 2 or more" in r.output
