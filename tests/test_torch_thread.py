"""A serving process runs its torch work on one thread (model_shards.torch_thread), never on the event loop's."""

from __future__ import annotations

import asyncio
import threading

import torch

from model_shards import torch_thread
from model_shards.engine import LLMEngine
from model_shards.engine_api import GenerationRequest, SamplingParams
from model_shards.model import ForwardBatch
from model_shards.model_runner import LocalRunnerGroup, ModelRunner, RunnerSpec
from model_shards.tokenizer import ByteTokenizer


def test_call_and_run_go_to_one_thread_and_nest_without_deadlock() -> None:
    main = threading.get_ident()
    first = torch_thread.call(threading.get_ident)
    assert first != main and not torch_thread.on_torch_thread()
    assert torch_thread.call(lambda: torch_thread.call(threading.get_ident)) == first  # inline when already there
    assert asyncio.run(torch_thread.run(threading.get_ident)) == first
    assert torch_thread.call(torch_thread.on_torch_thread)
    try:
        torch_thread.call(lambda: 1 / 0)
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("an exception on the torch thread must reach the caller")


def test_engine_builds_steps_and_samples_off_the_event_loop(monkeypatch) -> None:
    """Building, every step and every sampling call run on the torch thread; the event loop thread runs
    none of them (two threads running parallel torch ops slow both down, see torch_thread)."""
    seen: dict[str, set[bool]] = {"build": set(), "execute": set(), "sample": set()}
    build, execute = ModelRunner.build.__func__, ModelRunner.execute  # type: ignore[attr-defined]

    def spy_build(cls, *a, **k):  # noqa: ANN001
        seen["build"].add(torch_thread.on_torch_thread())
        return build(cls, *a, **k)

    def spy_execute(self, step):  # noqa: ANN001
        seen["execute"].add(torch_thread.on_torch_thread())
        return execute(self, step)

    monkeypatch.setattr(ModelRunner, "build", classmethod(spy_build))
    monkeypatch.setattr(ModelRunner, "execute", spy_execute)
    sample_rows = LLMEngine._step_input

    def spy_sample(self, *a):  # noqa: ANN001  (builds the step input and its sampling spec)
        seen["sample"].add(torch_thread.on_torch_thread())
        return sample_rows(self, *a)

    monkeypatch.setattr(LLMEngine, "_step_input", spy_sample)
    group = LocalRunnerGroup.build(RunnerSpec(preset="tiny", num_slots=2, max_len=64))

    async def go() -> list[int]:
        eng = LLMEngine(group, ByteTokenizer(), "tiny", stop_token_ids=[])
        try:
            res = await eng.complete(GenerationRequest("r", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4)))
            return res.token_ids
        finally:
            await eng.close()

    tokens = asyncio.run(go())
    assert len(tokens) == 4
    assert seen == {"build": {True}, "execute": {True}, "sample": {True}}
    # and the tokens are the model's greedy ones, as if run inline
    runner = ModelRunner.build(RunnerSpec(preset="tiny", num_slots=2, max_len=64))
    with torch.inference_mode():
        ctx, seq, want = 0, [5, 6, 7], []
        for _ in range(4):
            logits = runner.model(ForwardBatch.from_sequences([seq], [0], [ctx]), runner.cache)
            ctx += len(seq)
            seq = [int(logits[0].argmax())]
            want.append(seq[0])
    assert tokens == want
