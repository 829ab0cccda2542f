"""The policy engine records orchestrator tokens exactly as the trainer scores them, routes sub-agent
calls to the frozen engine, and serves the trainer's weights after a hot update (real Ray actors)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import ray
import torch

from model_shards.model_runner import RunnerSpec
from model_shards.shards import launch_engine_actor
from planner.parl.config import PARLConfig
from planner.parl.policy_host import (
    PARLLLMFactory,
    call_role,
    episode_llm_config,
    launch_policy_host,
)
from planner.parl.samples import OrchestratorSample, token_logprobs
from planner.parl.trainer import PARLTrainer
from swarm.llm import ChatMessage, ToolSpec
from swarm.messages import AGGREGATOR_SYSTEM_PROMPT
from swarm.plan_writer import load_plan_format, response_format_for
from swarm.plans import Limits

SEARCH = ToolSpec(name="search", description="search", parameters={"type": "object", "properties": {}})


def test_call_role_tells_orchestrator_calls_from_subagent_calls() -> None:
    fmt = load_plan_format()
    plan_rf = response_format_for(fmt, Limits(max_subagents=2))
    sysmsg = ChatMessage(role="system", content=fmt.system_prompt)
    user = ChatMessage(role="user", content="task")
    assert call_role([sysmsg, user], None, plan_rf) == "plan"
    agg = [ChatMessage(role="system", content=AGGREGATOR_SYSTEM_PROMPT), user]
    assert call_role(agg, None, None) == "aggregate"
    assert call_role(agg, [SEARCH], None) == "subagent"  # the aggregator never has tools
    assert call_role([ChatMessage(role="system", content="You are a research sub-agent."), user], [SEARCH], None) == "subagent"
    assert call_role([user], None, {"type": "json_object"}) == "subagent"




def _recompute(trainer: PARLTrainer, s: OrchestratorSample) -> list[float]:
    ids = torch.tensor([s.prompt_ids + s.completion_ids])
    with torch.no_grad():
        return token_logprobs(trainer.model.forward_logits(ids), ids)[0, len(s.prompt_ids) - 1 :].tolist()


async def test_recording_routing_and_hot_weight_update(ray_local: object, tiny_ckpt: str, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    policy_name, sub_name = f"parl-test-policy-{run}", f"parl-test-sub-{run}"
    spec = RunnerSpec(checkpoint=tiny_ckpt, num_slots=4, max_len=1024)
    policy = launch_policy_host(policy_name, spec, tokenizer="byte", num_cpus=0)
    sub = launch_engine_actor(sub_name, spec, tokenizer="byte", num_cpus=0)
    try:
        factory = PARLLLMFactory(sub_name, subagent_max_tokens=8)
        client = factory(episode_llm_config(policy_name, "ep-1", temperature=0.0, max_tokens=24, timeout_s=60))
        fmt = load_plan_format()
        plan_msgs = [ChatMessage(role="system", content=fmt.system_prompt),
                     ChatMessage(role="user", content="Capitals of France and Spain?")]
        rf = response_format_for(fmt, Limits(max_subagents=2))

        sub_msgs = [ChatMessage(role="system", content="You are a research sub-agent."),
                    ChatMessage(role="user", content="find it")]
        sub_steps = ray.get(sub.info.remote())["steps"]
        await client.chat(sub_msgs, [SEARCH])
        assert ray.get(sub.info.remote())["steps"] > sub_steps  # went to the frozen engine
        assert ray.get(policy.take_samples.remote("ep-1")) == []  # and left no trainable sample

        # The job's temperature is the orchestrator's; sub-agents decode at their own (greedy by default),
        # so a hot job temperature leaves their answers unchanged, and a sub-agent temperature of 1 does not.
        hot = episode_llm_config(policy_name, "ep-hot", temperature=1.0, max_tokens=24, timeout_s=60)
        greedy = [(await factory(hot).chat(sub_msgs, [SEARCH])).message.model_dump_json() for _ in range(3)]
        assert len(set(greedy)) == 1
        sampled_factory = PARLLLMFactory(sub_name, subagent_max_tokens=8, subagent_temperature=1.0)
        sampled = {(await sampled_factory(hot).chat(sub_msgs, [SEARCH])).message.model_dump_json() for _ in range(3)}
        assert len(sampled) > 1

        await client.chat(plan_msgs, response_format=rf)
        (before,) = ray.get(policy.take_samples.remote("ep-1"))
        assert before.role == "plan" and before.version == 0 and len(before.completion_ids) > 0
        assert len(before.logprobs) == len(before.completion_ids)

        cfg = PARLConfig(policy_checkpoint=tiny_ckpt, out=str(tmp_path), lr=5e-2, threads=1, temperature=1.0)
        trainer = PARLTrainer(cfg, policy_name)
        initial = PARLTrainer(cfg)
        # the engine reports exactly the logprobs the trainer computes for the same tokens
        assert before.logprobs == pytest.approx(_recompute(trainer, before), abs=1e-4)

        before.advantage = 1.0
        other = OrchestratorSample("plan", before.prompt_ids, before.completion_ids[:1], before.logprobs[:1],
                                   version=0, advantage=-1.0)
        trainer.train_step([before, other])
        trainer.push_weights()
        assert ray.get(policy.get_version.remote()) == 1

        await client.chat(plan_msgs, response_format=rf)
        (after,) = ray.get(policy.take_samples.remote("ep-1"))
        assert after.version == 1
        served = after.logprobs
        assert served == pytest.approx(_recompute(trainer, after), abs=1e-4)  # the new weights are served
        old = _recompute(initial, after)
        assert max(abs(a - b) for a, b in zip(served, old)) > 1e-2  # ... and they differ from the old ones
    finally:
        ray.kill(policy)
        ray.kill(sub)
