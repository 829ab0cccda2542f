"""The main job (`swarm demo`) end to end: real Ray runtime, real search over the GeoNames corpus,
real OpenAI HTTP client; the model is the OpenAITestServer test double answering from a script."""

from __future__ import annotations

import io
import json

from rich.console import Console

from planner.demo import pick_task, run_demo
from planner.envs import get_env
from swarm.config import Settings
from swarm.plans import LLMConfig
from tests.openai_test_server import OpenAITestServer, completion


def _markdown(task) -> str:
    lines = ["| " + " | ".join(task.columns) + " |", "|" + "---|" * len(task.columns)]
    for row in task.gold:
        lines.append("| " + " | ".join(str(row[c]) for c in task.columns) + " |")
    return "\n".join(lines)


def test_demo_without_endpoint_or_policy_says_what_to_set(tmp_path, monkeypatch):
    import planner.builtin

    # No endpoint and no built-in policy (tests/test_demo_builtin.py runs the built-in path).
    monkeypatch.setattr(planner.builtin, "BUILTIN_POLICY_DIR", tmp_path / "builtin_policy")
    out = io.StringIO()
    settings = Settings(db_path=str(tmp_path / "db.sqlite"), llm=LLMConfig(base_url=None, model=None))
    code = run_demo(settings=settings, console=Console(file=out, width=120))
    assert code == 2
    text = out.getvalue()
    assert "SWARM_LLM_BASE_URL" in text and "SWARM_LLM_MODEL" in text and "python -m planner.sft" in text


def test_demo_runs_swarm_and_single_agent_and_scores_them(ray_local, tmp_path):
    task = pick_task(get_env("widegeo").eval_set(), None, 12)
    table = _markdown(task)
    first_entity = str(task.gold[0][task.key_columns[0]])
    with OpenAITestServer() as server:
        server.enqueue(
            completion(table),  # the orchestrator answers at once (no sub-agents)
            completion(None, tool_calls=[{"id": "c1", "name": "search", "arguments": json.dumps({"query": first_entity})}]),
            completion(table),  # the single agent answers after one real search
        )
        settings = Settings(
            db_path=str(tmp_path / "db.sqlite"),
            port=0,
            llm=LLMConfig(base_url=server.url, model="test-model", api_key="k", max_retries=0),
        )
        out = io.StringIO()
        code = run_demo(settings=settings, console=Console(file=out, width=200))
        text = out.getvalue()
        assert code == 0, text
        # Both runs are scored by the environment: the scripted answers are the gold table.
        assert text.count("1.000") >= 4, text
        assert "swarm" in text and "single agent" in text
        # The single agent's search ran over the real corpus and came back as a tool message.
        tool_msgs = [m for r in server.requests for m in r["messages"] if m["role"] == "tool"]
        assert tool_msgs and first_entity.split()[0] in tool_msgs[0]["content"]
