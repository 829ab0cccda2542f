"""LLMEngine on the tiny preset in one process: scheduler logic, batching, chunking, prefix reuse,
sampling, stops, constraints, logprobs and hot weight updates."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest
import torch

from model_shards.engine_api import Constraint, GenerationRequest, SamplingParams
from model_shards.scheduler import Scheduler, StepInput, common_prefix_len

# ---- scheduler (pure logic) ---------------------------------------------------------------------


def _run_fake(sched: Scheduler, steps: int, next_token: int = 7) -> list:
    """Drive the scheduler like the engine does, appending `next_token` for sampled rows."""
    log = []
    for _ in range(steps):
        step = sched.schedule()
        if step is None:
            break
        sched.commit(step)
        log.append(step)
        for e in step.entries:
            if e.sample:
                sched.append_token(e.seq.request_id, next_token)
    return log


def test_scheduler_chunks_prefill_under_budget_and_decodes_first() -> None:
    s = Scheduler(max_slots=4, max_len=64, max_prefill_tokens_per_step=5, prefix_reuse=False)
    s.add("a", list(range(12)))
    st1 = s.schedule()
    assert [(e.start, e.n, e.sample) for e in st1.entries] == [(0, 5, False)]
    s.commit(st1)
    s.add("b", [1, 2, 3])
    st2 = s.schedule()
    # a continues its prompt; b waits for budget (FIFO), nothing is sampled yet
    assert [(e.seq.request_id, e.start, e.n, e.sample) for e in st2.entries] == [("a", 5, 5, False)]
    s.commit(st2)
    st3 = s.schedule()
    assert [(e.seq.request_id, e.start, e.n, e.sample) for e in st3.entries] == [("a", 10, 2, True), ("b", 0, 3, True)]
    s.commit(st3)
    s.append_token("a", 9)
    s.append_token("b", 9)
    st4 = s.schedule()
    # both decode one token each at the next position
    assert [(e.seq.request_id, e.start, e.n, e.sample) for e in st4.entries] == [("a", 12, 1, True), ("b", 3, 1, True)]
    inp = st4.to_input()
    assert inp.input_ids.tolist() == [9, 9]
    assert inp.positions.tolist() == [12, 3]
    assert inp.cu_seqlens.tolist() == [0, 1, 2]
    assert inp.context_lens.tolist() == [12, 3]
    assert inp.cache_slots.tolist() == [0, 1]
    # A step travels to every shard each step (Ray, torch.distributed): pickled as int64 arrays, it comes
    # back equal, as writable int64 tensors.
    inp.copies = [(0, 3, 5)]
    back = pickle.loads(pickle.dumps(inp))
    for name in ("input_ids", "positions", "cu_seqlens", "cache_slots", "context_lens"):
        got = getattr(back, name)
        assert got.dtype == torch.int64 and torch.equal(got, getattr(inp, name)), name
        got.add_(0)  # writable
    assert back.copies == [(0, 3, 5)] and back.num_seqs == 2
    empty = pickle.loads(pickle.dumps(StepInput(*(torch.zeros(0, dtype=torch.int64) for _ in range(5)))))
    assert empty.num_seqs == 0 and empty.copies == []


def test_scheduler_waits_for_a_free_slot_and_reuses_it() -> None:
    s = Scheduler(max_slots=1, max_len=32, prefix_reuse=False)
    s.add("a", [1, 2])
    s.add("b", [3, 4])
    _run_fake(s, 1)
    assert [q.request_id for q in s.waiting] == ["b"]
    s.finish("a")
    step = s.schedule()
    assert [e.seq.request_id for e in step.entries] == ["b"]
    assert step.entries[0].seq.slot == 0


def test_scheduler_prefix_reuse_copies_from_running_slot_and_takes_retained_slot() -> None:
    s = Scheduler(max_slots=3, max_len=64, max_prefill_tokens_per_step=64, min_prefix_reuse=4)
    system = list(range(100, 110))
    s.add("a", system + [1, 2])
    _run_fake(s, 1)
    s.add("b", system + [3, 4, 5])
    step = s.schedule()
    # b copies a's 10-token prefix into its own slot and computes only its 3 new tokens
    assert step.copies == [(0, 1, 10)]
    b = [e for e in step.entries if e.seq.request_id == "b"][0]
    assert (b.start, b.n) == (10, 3)
    s.commit(step)
    # a finishes; its slot keeps the cached tokens, and a follow-up turn takes that slot without a copy
    cached_a = s.get("a").cached_tokens()
    s.finish("a")
    s.add("a2", cached_a + [42, 43])
    step = s.schedule()
    a2 = s.get("a2")
    assert step.copies == []
    assert a2.slot == 0 and a2.reused_prefix == len(cached_a)
    assert [(e.start, e.n) for e in step.entries if e.seq is a2] == [(len(cached_a), 2)]


def test_scheduler_keeps_one_prompt_token_to_compute_and_rejects_bad_input() -> None:
    s = Scheduler(max_slots=2, max_len=16, min_prefix_reuse=2)
    s.add("a", [5, 6, 7, 8])
    _run_fake(s, 1)
    s.add("b", [5, 6, 7, 8])  # identical prompt: reuse 3, recompute the last for its logits
    step = s.schedule()
    assert step.copies == [(0, 1, 3)]
    with pytest.raises(ValueError, match="already scheduled"):
        s.add("a", [1])
    with pytest.raises(ValueError, match="empty"):
        s.add("c", [])
    with pytest.raises(ValueError, match="does not fit"):
        s.add("d", list(range(16)))


def test_scheduler_abort_frees_slot_at_next_schedule_and_invalidation_blocks_reuse() -> None:
    s = Scheduler(max_slots=1, max_len=32, min_prefix_reuse=2)
    s.add("a", [1, 2, 3, 4])
    _run_fake(s, 1)
    s.abort("a")
    s.add("b", [1, 2, 3, 4, 5])
    step = s.schedule()
    b = s.get("b")
    assert s.get("a") is None and b.slot == 0 and b.reused_prefix == 4  # a's retained slot, reused
    s.commit(step)
    s.invalidate_prefix_cache()
    s.finish("b")
    s.add("c", [1, 2, 3, 4, 5, 6])
    s.schedule()
    assert s.get("c").reused_prefix == 0


def test_common_prefix_len() -> None:
    a = list(range(200))
    assert common_prefix_len(a, a) == 200
    assert common_prefix_len(a, a[:130] + [-1]) == 130
    assert common_prefix_len([], a) == 0


# ---- the engine on the tiny preset -------------------------------------------------------------

from model_shards.engine import LLMEngine  # noqa: E402
from model_shards.model_runner import LocalRunnerGroup, ModelRunner, RunnerSpec  # noqa: E402
from model_shards.tokenizer import ByteTokenizer  # noqa: E402

SPEC = RunnerSpec(preset="tiny", seed=0, num_slots=8, max_len=192)
PROMPTS = [list(b"The capital of France is"), list(b"ab"), list(b"Once upon a time, in a land far away"), list(b"x" * 13)]


@pytest.fixture(scope="module")
def runners() -> LocalRunnerGroup:
    return LocalRunnerGroup.build(SPEC)


def make_engine(runners: LocalRunnerGroup, **kw) -> LLMEngine:
    kw.setdefault("min_prefix_reuse", 4)
    # no stop ids: random weights would end requests at arbitrary points, and these tests need lengths they choose
    kw.setdefault("stop_token_ids", [])
    return LLMEngine(runners, ByteTokenizer(), "tiny-test", **kw)


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


async def test_batched_generation_equals_one_at_a_time(runners) -> None:
    solo = []
    solo_steps = 0
    for i, p in enumerate(PROMPTS):
        eng = make_engine(runners, prefix_reuse=False)
        solo.append((await eng.complete(GenerationRequest(f"s{i}", p, greedy()))).token_ids)
        solo_steps += eng.steps
        await eng.close()
    eng = make_engine(runners, prefix_reuse=False)
    batched = await asyncio.gather(*(eng.complete(GenerationRequest(f"b{i}", p, greedy())) for i, p in enumerate(PROMPTS)))
    assert [r.token_ids for r in batched] == solo
    assert all(r.finish_reason == "length" and r.completion_tokens == 12 for r in batched)
    assert eng.steps < solo_steps  # the requests really shared steps
    assert eng.scheduler.num_free_slots() == SPEC.num_slots
    await eng.close()


async def test_request_joins_running_batch_and_both_finish_correctly(runners) -> None:
    eng = make_engine(runners, prefix_reuse=False)
    alone_a = (await eng.complete(GenerationRequest("a0", PROMPTS[0], greedy(30)))).token_ids
    alone_b = (await eng.complete(GenerationRequest("b0", PROMPTS[2], greedy(5)))).token_ids
    order: list[str] = []
    a_ids: list[int] = []

    async def run_a() -> None:
        async for ev in eng.generate(GenerationRequest("a1", PROMPTS[0], greedy(30))):
            a_ids.append(ev.token_id)
            order.append("a")

    task = asyncio.create_task(run_a())
    while len(a_ids) < 5:
        await asyncio.sleep(0.001)
    res_b = await eng.complete(GenerationRequest("b1", PROMPTS[2], greedy(5)))
    order.append("b-done")
    await task
    assert a_ids == alone_a and res_b.token_ids == alone_b
    # b was admitted and finished while a was still decoding
    assert order.index("b-done") < len(order) - 1
    await eng.close()


async def test_chunked_prefill_equals_unchunked(runners) -> None:
    prompt = list(b"A long prompt that will be cut into several chunks of seven tokens.")
    outs = []
    for budget in (512, 7):
        eng = make_engine(runners, max_prefill_tokens_per_step=budget, prefix_reuse=False)
        outs.append(await eng.complete(GenerationRequest("c", prompt, greedy(10, logprobs=True))))
        steps = eng.steps
        await eng.close()
    assert outs[0].token_ids == outs[1].token_ids
    assert outs[0].logprobs == pytest.approx(outs[1].logprobs, abs=1e-4)
    assert steps == -(-len(prompt) // 7) + 9  # prefill chunks, then one step per further token


async def test_prefix_reuse_matches_recompute(runners) -> None:
    system = list(b"<system> You are a careful assistant. Answer briefly. </system> ")
    questions = [list(b"What is 2+2?"), list(b"Name a color."), list(b"Why?")]
    ref = []
    for i, q in enumerate(questions):
        eng = make_engine(runners, prefix_reuse=False)
        ref.append((await eng.complete(GenerationRequest(f"r{i}", system + q, greedy(8, logprobs=True)))))
        await eng.close()
    eng = make_engine(runners, prefix_reuse=True)
    # first alone (its slot is retained after it finishes), then two at once (one copies from the other's slot)
    first = await eng.complete(GenerationRequest("p0", system + questions[0], greedy(8, logprobs=True)))
    rest = await asyncio.gather(
        *(eng.complete(GenerationRequest(f"p{i}", system + q, greedy(8, logprobs=True))) for i, q in enumerate(questions[1:], 1))
    )
    got = [first, *rest]
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    for a, b in zip(got, ref):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert eng.scheduler.reused_tokens >= 2 * len(system)
    st = eng.stats()
    assert st["running"] == st["waiting"] == 0 and st["free_slots"] == SPEC.num_slots
    assert st["reused_prefix_tokens"] == eng.scheduler.reused_tokens
    await eng.close()


async def test_seeded_sampling_is_reproducible(runners) -> None:
    eng = make_engine(runners)
    params = lambda seed: SamplingParams(temperature=1.0, top_p=0.9, seed=seed, max_tokens=16)  # noqa: E731
    a = await eng.complete(GenerationRequest("x1", PROMPTS[0], params(123)))
    # same seed inside a busy batch gives the same tokens
    b, _, _ = await asyncio.gather(
        eng.complete(GenerationRequest("x2", PROMPTS[0], params(123))),
        eng.complete(GenerationRequest("x3", PROMPTS[1], params(5))),
        eng.complete(GenerationRequest("x4", PROMPTS[2], params(None))),
    )
    c = await eng.complete(GenerationRequest("x5", PROMPTS[0], params(124)))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    await eng.close()


async def test_stop_string_ends_request_and_is_not_emitted(runners) -> None:
    eng = make_engine(runners)
    full = await eng.complete(GenerationRequest("f", PROMPTS[0], greedy(40)))
    text = full.text
    k = next(i for i in range(4, len(text) - 3) if text.find(text[i : i + 2]) == i)
    stop = text[k : k + 2]
    events = [ev async for ev in eng.generate(GenerationRequest("s", PROMPTS[0], greedy(40, stop=[stop, "\uffff-never"])))]
    streamed = "".join(ev.text for ev in events)
    assert streamed == text[:k]
    assert events[-1].finished and events[-1].finish_reason == "stop"
    assert all(not ev.finished for ev in events[:-1])
    assert len(events) < 40
    await eng.close()


async def test_streamed_text_is_byte_safe(runners) -> None:
    """Random bytes split UTF-8 characters across tokens; the deltas still join to the exact decode."""
    eng = make_engine(runners)
    tok = ByteTokenizer()
    high_bytes = 0
    for seed in range(3):
        events = [
            ev
            async for ev in eng.generate(
                GenerationRequest(f"u{seed}", PROMPTS[0], SamplingParams(temperature=1.0, seed=seed, max_tokens=64))
            )
        ]
        ids = [ev.token_id for ev in events]
        high_bytes += sum(0x80 <= i < 0x100 for i in ids)
        assert "".join(ev.text for ev in events) == tok.decode(ids)
    assert high_bytes > 0  # the samples did contain non-ASCII bytes
    await eng.close()


async def test_max_tokens_and_eos_finish_reasons(runners) -> None:
    eng = make_engine(runners)
    res = await eng.complete(GenerationRequest("m", PROMPTS[1], greedy(3)))
    assert res.finish_reason == "length" and res.completion_tokens == 3
    # make the greedy second token a stop token: the request ends there with "stop"
    second = res.token_ids[1]
    await eng.close()
    eng = make_engine(runners, stop_token_ids=[second])
    res2 = await eng.complete(GenerationRequest("e", PROMPTS[1], greedy(10)))
    assert res2.finish_reason == "stop" and res2.token_ids == res.token_ids[:2]
    await eng.close()


async def test_logprobs_equal_log_softmax_of_model_logits(runners) -> None:
    eng = make_engine(runners)
    t = 0.7
    res = await eng.complete(
        GenerationRequest("l", PROMPTS[0], SamplingParams(temperature=t, seed=7, max_tokens=10, logprobs=True))
    )
    await eng.close()
    ids = torch.tensor([PROMPTS[0] + res.token_ids])
    logits = runners.runner.model.forward_logits(ids)[0]
    n = len(PROMPTS[0])
    lp = torch.log_softmax(logits[n - 1 : n - 1 + len(res.token_ids)] / t, dim=-1)
    want = lp[torch.arange(len(res.token_ids)), torch.tensor(res.token_ids)].tolist()
    assert res.logprobs == pytest.approx(want, abs=1e-4)


async def test_json_schema_constraint_yields_valid_json(runners) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
        "required": ["ok", "color"],
        "additionalProperties": False,
    }
    eng = make_engine(runners, stop_token_ids=None)  # the grammar ends with the tokenizer's stop token
    res = await eng.complete(
        GenerationRequest(
            "j", PROMPTS[0], SamplingParams(temperature=1.0, seed=3, max_tokens=60), Constraint("json_schema", json.dumps(schema))
        )
    )
    assert res.finish_reason == "stop"
    obj = json.loads(res.text)
    assert set(obj) == {"ok", "color"} and isinstance(obj["ok"], bool) and obj["color"] in {"red", "green", "blue"}
    await eng.close()


async def test_closing_the_stream_aborts_and_frees_the_slot(runners) -> None:
    eng = make_engine(runners, max_slots=1)
    gen = eng.generate(GenerationRequest("ab", PROMPTS[0], greedy(100)))
    got = [await gen.__anext__() for _ in range(3)]
    await gen.aclose()
    assert len(got) == 3 and not got[-1].finished
    # the single slot is free again: a new request runs to completion
    res = await eng.complete(GenerationRequest("next", PROMPTS[1], greedy(4)))
    assert res.completion_tokens == 4 and eng.scheduler.get("ab") is None
    await eng.close()


async def test_bad_requests_get_clear_errors(runners) -> None:
    eng = make_engine(runners)
    with pytest.raises(ValueError, match=r"outside \[0, 512\)"):
        await eng.complete(GenerationRequest("bad", [1, 99999], greedy()))
    with pytest.raises(ValueError, match="does not fit"):
        await eng.complete(GenerationRequest("long", [1] * 500, greedy()))
    with pytest.raises(ValueError, match="max_slots"):
        make_engine(runners, max_slots=99)
    await eng.close()


async def test_update_weights_changes_served_outputs() -> None:
    group = LocalRunnerGroup.build(SPEC)
    eng = make_engine(group)
    before = await eng.complete(GenerationRequest("u0", PROMPTS[0], greedy(10)))
    gen = torch.Generator().manual_seed(1)
    new = {"lm_head.weight": torch.randn(group.cfg.vocab_size, group.cfg.hidden_size, generator=gen)}
    await eng.update_weights(new)
    after = await eng.complete(GenerationRequest("u1", PROMPTS[0], greedy(10)))
    assert after.token_ids != before.token_ids
    # the served model is exactly a fresh model with those weights
    fresh = ModelRunner.build(SPEC)
    fresh.update_weights(new)
    ref = make_engine(LocalRunnerGroup(fresh))
    assert (await ref.complete(GenerationRequest("u2", PROMPTS[0], greedy(10)))).token_ids == after.token_ids
    await eng.close()
    await ref.close()


def test_serve_over_http_with_uvicorn() -> None:
    """make_engine + create_openai_app behind a real uvicorn server on loopback (what serve() runs)."""
    import threading
    import time

    import httpx
    import uvicorn

    from model_shards.model_runner import free_port
    from model_shards.serve import make_engine as make_served_engine
    from model_shards.server import create_openai_app

    eng = make_served_engine("tiny", None, tp=1, use_ray=False, num_slots=4, max_len=512)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_openai_app(eng, eng.model_name), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        body = {
            "model": eng.model_name,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6,
            "temperature": 0,
        }
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == "kimi-k2-tiny"
        assert out["usage"]["completion_tokens"] <= 6 and out["usage"]["prompt_tokens"] > 2
        assert out["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        server.should_exit = True
        th.join(timeout=30)


def _tp2_without_ray(q) -> None:  # runs in a spawned process: it becomes rank 0 of a gloo group
    from model_shards.model_runner import DistributedRunnerGroup

    async def go() -> list[list[int]]:
        # collectives time out after 3 s: the engine then idles longer than that, and must survive it
        eng = LLMEngine(DistributedRunnerGroup(SPEC, 2, timeout_s=3.0), ByteTokenizer(), "tiny", stop_token_ids=[])
        res = await asyncio.gather(*(eng.complete(GenerationRequest(f"d{i}", p, greedy())) for i, p in enumerate(PROMPTS)))
        await asyncio.sleep(5)
        new = {"lm_head.weight": torch.randn(eng.runners.cfg.vocab_size, eng.runners.cfg.hidden_size, generator=torch.Generator().manual_seed(1))}
        await eng.update_weights(new)
        upd = await eng.complete(GenerationRequest("after", PROMPTS[0], greedy(10)))
        # a dead rank is named in the error instead of hanging the collective
        worker = eng.runners.procs[0]
        worker.kill()
        worker.join()
        try:
            await eng.complete(GenerationRequest("dead", PROMPTS[0], greedy(3)))
            died = "no error"
        except RuntimeError as e:
            died = str(e)
        await eng.close()
        return [r.token_ids for r in res] + [upd.token_ids, died]

    q.put(asyncio.run(go()))


async def test_tp2_torch_distributed_without_ray_matches_tp1(runners) -> None:
    import multiprocessing as mp

    eng = make_engine(runners, prefix_reuse=False)
    tp1 = [(await eng.complete(GenerationRequest(f"t{i}", p, greedy()))).token_ids for i, p in enumerate(PROMPTS)]
    await eng.close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_tp2_without_ray, args=(q,))
    proc.start()
    got = await asyncio.to_thread(q.get, True, 240)
    await asyncio.to_thread(proc.join, 60)
    died = got.pop()
    assert "rank 1 of 2" in died and "exited" in died
    assert got[:-1] == tp1
    # the hot update reached both ranks: same as TP=1 with the same new head
    fresh = ModelRunner.build(SPEC)
    fresh.update_weights({"lm_head.weight": torch.randn(fresh.cfg.vocab_size, fresh.cfg.hidden_size, generator=torch.Generator().manual_seed(1))})
    ref = make_engine(LocalRunnerGroup(fresh))
    assert (await ref.complete(GenerationRequest("r", PROMPTS[0], greedy(10)))).token_ids == got[-1]
    await ref.close()


async def test_int4_checkpoint_batches_and_hot_updates_through_the_packed_kernel(tmp_path, monkeypatch) -> None:
    """An INT4 checkpoint served on CPU (packed int4 kernel): batching does not change a request's tokens,
    and a hot update of one expert reaches the kernel's packed copy."""
    from model_shards.checkpoint import save_checkpoint
    from model_shards.int4 import quantize_checkpoint
    from model_shards.kernels import int4_cpu

    def _refuse(*args, **kwargs):
        raise AssertionError("the INT4 experts fell back to the dequantizing reference")

    monkeypatch.setattr(int4_cpu, "fused_moe_int4_ref", _refuse)
    full = ModelRunner.build(SPEC)
    save_checkpoint(full.model, full.cfg, tmp_path / "full")
    quantize_checkpoint(tmp_path / "full", tmp_path / "int4")
    spec = RunnerSpec(checkpoint=str(tmp_path / "int4"), num_slots=8, max_len=192)
    group = LocalRunnerGroup.build(spec)
    assert group.cfg.int4_experts
    eng = make_engine(group, prefix_reuse=False)
    solo = [(await eng.complete(GenerationRequest(f"s{i}", p, greedy()))).token_ids for i, p in enumerate(PROMPTS)]
    batched = await asyncio.gather(*(eng.complete(GenerationRequest(f"b{i}", p, greedy())) for i, p in enumerate(PROMPTS)))
    assert [r.token_ids for r in batched] == solo
    # a full-precision expert weight, quantized into the running model's INT4 buffers in place
    gen = torch.Generator().manual_seed(2)
    names = [f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"
             for layer in range(group.cfg.first_k_dense_replace, group.cfg.num_hidden_layers)
             for e in range(group.cfg.n_routed_experts)]
    new = {n: 8 * torch.randn(group.cfg.hidden_size, group.cfg.moe_intermediate_size, generator=gen) for n in names}
    await eng.update_weights(new)
    after = (await eng.complete(GenerationRequest("u", PROMPTS[0], greedy()))).token_ids
    assert after != solo[0]
    fresh = ModelRunner.build(spec)
    fresh.update_weights(new)
    ref = make_engine(LocalRunnerGroup(fresh), prefix_reuse=False)
    assert (await ref.complete(GenerationRequest("r", PROMPTS[0], greedy()))).token_ids == after
    await eng.close()
    await ref.close()
