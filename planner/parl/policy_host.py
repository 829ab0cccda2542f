"""The trainable orchestrator's engine and the LLM client that routes a rollout's calls.

`PolicyHost` is model_shards' EngineHost plus a recorder: every orchestrator completion it serves
is kept, per episode, with its prompt ids, completion ids, per-token logprobs and the policy version
that generated it; `update_weights_versioned` hot-loads new weights and bumps the version.

`PARLLLMFactory` is the swarm runtime's `llm_factory` during rollouts. The job's LLMConfig names
the policy host (`engine_actor`) and the episode (`model` = "parl-episode:<id>"). Its client sends
orchestrator calls (plan writing, repairs, the aggregation step) to the policy host and every
sub-agent call to the frozen sub-agent engine, so sub-agent text never becomes a trainable token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from model_shards.engine_api import Constraint, GenerationResult, SamplingParams
from model_shards.shards import EngineHost
from planner.parl.samples import OrchestratorSample
from swarm.llm import ChatMessage, ChatResult, LLMError, ToolSpec
from swarm.llm_engine import EngineChatClient, to_chat_result
from swarm.plans import LLMConfig

EPISODE_PREFIX = "parl-episode:"
PLAN_RESPONSE_NAME = "swarm_plan"  # swarm.plan_writer.response_format_for names the plan schema so


class PolicyHost(EngineHost):
    """EngineHost that records orchestrator completions per episode and carries a policy version."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.version = 0
        self._samples: dict[str, list[OrchestratorSample]] = {}

    async def complete_chat_recorded(
        self,
        episode_id: str,
        role: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        params: SamplingParams,
        constraint: Constraint | None = None,
    ) -> GenerationResult:
        from model_shards.chat_template import encode_chat

        params.logprobs = True  # the trainer needs the behaviour logprob of every token
        ids = encode_chat(self.engine.tokenizer, messages, tools)
        started = self.version
        res = await self.complete(ids, params, constraint)
        assert res.logprobs is not None or not res.token_ids
        self._samples.setdefault(episode_id, []).append(OrchestratorSample(
            role=role, prompt_ids=ids, completion_ids=list(res.token_ids), logprobs=list(res.logprobs or []),
            version=min(started, self.version)))
        return res

    def take_samples(self, episode_id: str) -> list[OrchestratorSample]:
        """The episode's recorded samples, forgotten here (a retried episode calls it to discard)."""
        return self._samples.pop(episode_id, [])

    async def update_weights_versioned(self, tensors: Mapping[str, torch.Tensor], version: int) -> int:
        await self.engine.update_weights(tensors)
        self.version = version
        return version

    def get_version(self) -> int:
        return self.version


def launch_policy_host(name: str, spec: Any, *, tokenizer: str, num_cpus: float, namespace: str | None = None,
                       **engine_kwargs: Any) -> Any:
    """Start the named PolicyHost actor (tp 1, model inside the actor) and wait until it answers."""
    import ray

    opts: dict[str, Any] = {"name": name, "num_cpus": num_cpus, "max_concurrency": 1000}
    if namespace is not None:
        opts["namespace"] = namespace
    actor = ray.remote(PolicyHost).options(**opts).remote(spec, 1, tokenizer, "parl-policy", engine_kwargs)
    ray.get(actor.info.remote())
    return actor


def call_role(messages: list[ChatMessage], tools: list[ToolSpec] | None,
              response_format: dict[str, Any] | None) -> str:
    """'plan' (the plan writer's calls, repairs included), 'aggregate' (the job's aggregation call) or
    'subagent'. Plan calls are the only ones asking for the plan schema; the aggregation call is the
    only one with the job host's aggregator system prompt and no tools."""
    from swarm.messages import AGGREGATOR_SYSTEM_PROMPT

    if response_format and (response_format.get("json_schema") or {}).get("name") == PLAN_RESPONSE_NAME:
        return "plan"
    if not tools and messages and messages[0].role == "system" and messages[0].content == AGGREGATOR_SYSTEM_PROMPT:
        return "aggregate"
    return "subagent"


def episode_llm_config(policy_actor: str, episode_id: str, *, temperature: float, max_tokens: int,
                       timeout_s: float) -> LLMConfig:
    return LLMConfig(backend="engine", engine_actor=policy_actor, model=EPISODE_PREFIX + episode_id,
                     temperature=temperature, max_tokens=max_tokens, timeout_s=timeout_s, max_retries=2)


class PARLChatClient:
    """swarm.llm.LLMClient of one episode: orchestrator calls -> policy host (recorded), others -> sub-agent engine."""

    def __init__(self, config: LLMConfig, subagent_actor: str, subagent_max_tokens: int,
                 subagent_temperature: float = 0.0) -> None:
        if not (config.model or "").startswith(EPISODE_PREFIX):
            raise ValueError(f"PARLChatClient needs LLMConfig.model = '{EPISODE_PREFIX}<id>', got {config.model!r}")
        self.episode_id = (config.model or "")[len(EPISODE_PREFIX):]
        self.policy = EngineChatClient(config)
        self.subagent_max_tokens = subagent_max_tokens
        self.subagent_temperature = subagent_temperature
        self.subagents = EngineChatClient(config.model_copy(update={"engine_actor": subagent_actor}))

    async def chat(
        self,
        messages: list[ChatMessage],
        tools: list[ToolSpec] | None = None,
        *,
        tool_choice: str | dict[str, Any] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> ChatResult:
        role = call_role(messages, tools, response_format)
        if role == "subagent":
            # The job passes one max_tokens and temperature to every agent; the frozen sub-agents get their
            # own (greedy by default: their sampling noise would only add variance to the orchestrator's reward).
            return await self.subagents.chat(messages, tools, tool_choice=tool_choice,
                                             temperature=self.subagent_temperature,
                                             max_tokens=self.subagent_max_tokens, response_format=response_format)
        try:
            chat, tool_defs, params, constraint = self.policy._request(
                messages, tools, tool_choice, temperature, max_tokens, response_format)
        except ValueError as e:
            raise LLMError(f"invalid orchestrator request: {e}") from e
        from ray.exceptions import RayActorError, RayTaskError

        try:
            ref = self.policy._handle().complete_chat_recorded.remote(
                self.episode_id, role, chat, tool_defs, params, constraint)
            res = await asyncio.wait_for(ref, timeout=self.policy.config.timeout_s)
        except (TimeoutError, RayActorError) as e:
            raise LLMError(f"policy engine {self.policy.config.engine_actor!r} failed: {e!r}") from e
        except RayTaskError as e:
            raise LLMError(f"engine {self.policy.config.engine_actor!r} rejected the orchestrator request: {e.cause!r}") from e
        return to_chat_result(res)


@dataclass(frozen=True)
class PARLLLMFactory:
    """The runtime's llm_factory during rollouts (pickled into job hosts and workers)."""

    subagent_actor: str
    subagent_max_tokens: int = 256
    subagent_temperature: float = 0.0

    def __call__(self, config: LLMConfig) -> PARLChatClient:
        return PARLChatClient(config, self.subagent_actor, self.subagent_max_tokens, self.subagent_temperature)
