"""The engine's Ray layer: TP shards in one placement group, hot weight updates across shards, dead
shards, and the in-cluster LLM client (EngineChatClient) talking to a named engine actor."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import ray
import torch

from model_shards.chat_template import encode_chat
from model_shards.checkpoint import save_checkpoint
from model_shards.engine import LLMEngine
from model_shards.engine_api import GenerationRequest, SamplingParams
from model_shards.model_runner import LocalRunnerGroup, ModelRunner, RunnerSpec
from model_shards.shards import RayShardGroup, ShardDiedError, launch_engine_actor
from model_shards.tokenizer import ByteTokenizer
from swarm.llm import ChatMessage, LLMError, ToolSpec
from swarm.llm_engine import EngineChatClient
from swarm.plans import LLMConfig

SPEC = RunnerSpec(preset="tiny", seed=0, num_slots=4, max_len=128)
PROMPTS = [list(b"The capital of France is"), list(b"Once upon a time"), list(b"zz")]


def engine(group, **kw) -> LLMEngine:
    return LLMEngine(group, ByteTokenizer(), "tiny", stop_token_ids=[], min_prefix_reuse=4, **kw)


async def greedy_all(eng: LLMEngine, n: int = 10) -> list[list[int]]:
    res = await asyncio.gather(
        *(
            eng.complete(GenerationRequest(f"g{i}-{id(eng)}", p, SamplingParams(temperature=0.0, max_tokens=n, logprobs=True)))
            for i, p in enumerate(PROMPTS)
        )
    )
    return [r.token_ids for r in res]


@pytest.fixture(scope="module")
def tp1_greedy() -> list[list[int]]:
    async def run() -> list[list[int]]:
        eng = engine(LocalRunnerGroup.build(SPEC))
        out = await greedy_all(eng)
        await eng.close()
        return out

    return asyncio.run(run())


async def test_tp2_on_ray_matches_tp1_and_updates_weights_on_every_shard(ray_local, tp1_greedy, tmp_path) -> None:
    # the shards read only their slices of a saved checkpoint, experts split by intermediate dim
    runner = ModelRunner.build(SPEC)
    save_checkpoint(runner.model, runner.cfg, str(tmp_path / "ckpt"))
    spec = RunnerSpec(checkpoint=str(tmp_path / "ckpt"), num_slots=4, max_len=128, expert_layout="tp")
    group = RayShardGroup.create(spec, tp=2)
    try:
        pg_table = ray.util.placement_group_table(group.pg)
        assert pg_table["strategy"] == "STRICT_PACK" and len(pg_table["bundles"]) == 2
        pids = await asyncio.gather(*(a.pid.remote() for a in group.actors))
        assert len(set(pids)) == 2
        assert group.collectives == "shared_memory"  # the default for shards on one host
        eng = engine(group)
        assert await greedy_all(eng) == tp1_greedy
        # hot update on both shards: outputs change and equal a TP=1 model with the same new weights
        gen = torch.Generator().manual_seed(2)
        new = {
            "lm_head.weight": torch.randn(group.cfg.vocab_size, group.cfg.hidden_size, generator=gen),
            "model.layers.0.self_attn.o_proj.weight": torch.randn(
                group.cfg.hidden_size, group.cfg.num_attention_heads * group.cfg.v_head_dim, generator=gen
            ) * 0.05,
        }
        await eng.update_weights(new)
        after = await greedy_all(eng)
        assert after != tp1_greedy
        assert await asyncio.gather(*(a.pid.remote() for a in group.actors)) == pids  # same processes, not restarted
        runner.update_weights(new)
        ref = engine(LocalRunnerGroup(runner))
        assert await greedy_all(ref) == after
        await ref.close()
    finally:
        group.shutdown()


async def test_dead_shard_is_reported_by_rank(ray_local) -> None:
    # over gloo, the other way CPU shards can talk (the default, shared memory, runs in the tests around)
    group = RayShardGroup.create(dataclasses.replace(SPEC, cpu_collectives="gloo"), tp=2)
    try:
        assert group.collectives == "gloo"
        eng = engine(group, max_shard_rebuilds=0)  # rebuilding off: the failure reaches the caller
        ok = await eng.complete(GenerationRequest("alive", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=3)))
        assert ok.completion_tokens == 3
        ray.kill(group.actors[1])
        with pytest.raises(RuntimeError, match=r"shard rank 1 of 2 died"):
            await eng.complete(GenerationRequest("dead", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=3)))
        # the group stays failed, with the same clear message, instead of hanging
        with pytest.raises(ShardDiedError, match="shard rank 1 of 2 died"):
            await group.execute(None)  # type: ignore[arg-type]
    finally:
        group.shutdown()


async def test_dead_shard_rebuilds_the_replica_and_resumes_in_flight_requests(ray_local) -> None:
    """Rank 1 dies mid-generation: the engine builds a new TP-2 group (new processes, the hot-loaded
    weights re-applied) and every in-flight request ends with exactly the tokens of an undisturbed run."""
    gen = torch.Generator().manual_seed(5)
    cfg = ModelRunner.build(SPEC).cfg
    new = {"lm_head.weight": torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen)}
    n = 12
    params = [SamplingParams(temperature=0.0, max_tokens=n), SamplingParams(temperature=0.0, max_tokens=n),
              SamplingParams(temperature=1.0, seed=7, max_tokens=n)]

    async def stream(eng: LLMEngine, i: int, kill_after: int | None = None) -> tuple[list[int], str]:
        toks, text = [], ""
        async for ev in eng.generate(GenerationRequest(f"s{i}-{id(eng)}", PROMPTS[i], params[i])):
            toks.append(ev.token_id)
            text += ev.text
            if kill_after is not None and len(toks) == kill_after:
                ray.kill(eng.runners.actors[1])
        return toks, text

    runner = ModelRunner.build(SPEC)
    runner.update_weights(new)
    ref_eng = engine(LocalRunnerGroup(runner))
    want = await asyncio.gather(*(stream(ref_eng, i) for i in range(3)))
    await ref_eng.close()

    group = RayShardGroup.create(SPEC, tp=2)
    eng = engine(group)
    try:
        await eng.update_weights(new)
        old_pids = set(await asyncio.gather(*(a.pid.remote() for a in group.actors)))
        old_ids = {a._actor_id.hex() for a in group.actors}
        got = await asyncio.wait_for(asyncio.gather(stream(eng, 0, kill_after=4), stream(eng, 1), stream(eng, 2)), 180)
        assert eng.rebuilds == 1 and eng.runners is not group
        # same tokens and text as the undisturbed run, each streamed once (greedy and seeded sampling)
        assert got == want
        assert all(len(toks) == n for toks, _ in got)
        new_pids = set(await asyncio.gather(*(a.pid.remote() for a in eng.runners.actors)))
        assert len(new_pids) == 2 and not new_pids & old_pids
        assert not {a._actor_id.hex() for a in eng.runners.actors} & old_ids
        # a request arriving after the rebuild runs on the new replica
        res = await eng.complete(GenerationRequest("after", PROMPTS[0], params[0]))
        assert res.token_ids == want[0][0]
    finally:
        await eng.close()
        group.shutdown()


def test_requeued_sequence_recomputes_prompt_and_output_in_chunks() -> None:
    """After a rebuild a running sequence restarts from an empty cache: prompt + generated tokens are
    recomputed in budget-sized chunks (a chunk may end past the prompt) and only the last one samples."""
    from model_shards.scheduler import Scheduler

    sched = Scheduler(max_slots=2, max_len=64, max_prefill_tokens_per_step=5)
    seq = sched.add("r", [10, 11, 12, 13])
    sched.commit(sched.schedule())
    for tok in (20, 21, 22, 23):  # four generated tokens; the last is not in the cache yet
        sched.append_token("r", tok)
        if tok != 23:
            sched.commit(sched.schedule())
    assert seq.num_cached == 7
    assert sched.requeue_running() == [seq]
    assert seq.slot == -1 and seq.num_cached == 0 and list(sched.waiting) == [seq] and sched.num_free_slots() == 2
    first = sched.schedule()
    assert [(e.start, e.n, e.sample) for e in first.entries] == [(0, 5, False)]
    assert first.to_input().input_ids.tolist() == [10, 11, 12, 13, 20]
    sched.commit(first)
    second = sched.schedule()
    assert [(e.start, e.n, e.sample) for e in second.entries] == [(5, 3, True)]
    assert second.to_input().input_ids.tolist() == [21, 22, 23]
    assert seq.output_ids == [20, 21, 22, 23]  # nothing generated twice


def test_placement_that_cannot_fit_fails_clearly(ray_local) -> None:
    with pytest.raises(RuntimeError, match="could not place 2 shards"):
        RayShardGroup.create(SPEC, tp=2, num_cpus_per_shard=64, ready_timeout_s=2)


async def test_engine_chat_client_tool_call_round_trip(ray_local) -> None:
    name = "test-engine-chat"
    actor = launch_engine_actor(name, RunnerSpec(preset="tiny", seed=0, num_slots=4, max_len=1024), tp=1, tokenizer="byte")
    try:
        client = EngineChatClient(LLMConfig(backend="engine", engine_actor=name, max_tokens=96, temperature=1.0))
        weather = ToolSpec(
            name="get_weather",
            description="Weather for a city",
            parameters={
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Tokyo", "Lima"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        )
        # a control-token string inside user text stays text (it is not a turn end)
        msgs = [ChatMessage(role="system", content="Use tools."), ChatMessage(role="user", content="Weather in Paris?<|im_end|>")]
        res = await client.chat(msgs, [weather], tool_choice={"type": "function", "function": {"name": "get_weather"}})
        want_prompt = encode_chat(ByteTokenizer(), [m.to_openai() for m in msgs], [weather.to_openai()])
        assert res.usage.prompt_tokens == len(want_prompt)
        assert b"Paris?<|im_end|>" in bytes(i for i in want_prompt if i < 256)
        assert res.finish_reason == "tool_calls"
        (call,) = res.message.tool_calls
        assert call.name == "get_weather"
        assert json.loads(call.arguments)["city"] in {"Paris", "Tokyo", "Lima"}
        assert res.usage.prompt_tokens > 20 and res.usage.completion_tokens > 0
        # the tool result goes back in and the next turn is plain text with usage
        msgs += [res.message, ChatMessage(role="tool", content="sunny", tool_call_id=call.id, name=call.name)]
        res2 = await client.chat(msgs, [weather], max_tokens=5, temperature=0.0)
        assert res2.usage.completion_tokens <= 5 and res2.usage.prompt_tokens > res.usage.prompt_tokens
        assert res2.finish_reason in ("stop", "length", "tool_calls")
        # structured output through response_format (a bounded schema, so any sample completes)
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
        res3 = await client.chat(
            msgs[:2], max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
        )
        assert res3.finish_reason == "stop"
        assert isinstance(json.loads(res3.message.content or "")["ok"], bool)
        # the engine's own rejection (a prompt longer than its context) comes back as LLMError, not a hang
        with pytest.raises(LLMError, match="does not fit"):
            await client.chat([ChatMessage(role="user", content="x" * 2000)], max_tokens=4)
        with pytest.raises(LLMError, match="no engine actor named 'nope'"):
            await EngineChatClient(LLMConfig(backend="engine", engine_actor="nope")).chat(msgs[:2])
    finally:
        ray.kill(actor)


def test_engine_chat_client_config_errors() -> None:
    with pytest.raises(ValueError, match="engine_actor"):
        EngineChatClient(LLMConfig(backend="engine"))
    with pytest.raises(ValueError, match="backend"):
        EngineChatClient(LLMConfig(backend="openai", engine_actor="x"))
