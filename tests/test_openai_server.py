"""The OpenAI-compatible server on a real uvicorn (loopback), driven by the official openai client."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from model_shards.chat_template import render
from model_shards.server import create_openai_app
from tests.engine_test_double import ScriptedEngineTestDouble

MODEL = "kimi-test"
SEARCH = {"type": "function", "function": {"name": "search", "description": "Search the web",
                                           "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                          "required": ["query"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city", "days"]}}}
CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.search:0<|tool_call_argument_begin|>'
        '{"query": "capital of France"}<|tool_call_end|><|tool_call_begin|>functions.search:1'
        '<|tool_call_argument_begin|>{"query": "capital of Japan"}<|tool_call_end|><|tool_calls_section_end|>')


class _Server:
    def __init__(self, engine: ScriptedEngineTestDouble) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_openai_app(engine, MODEL), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def engine() -> ScriptedEngineTestDouble:
    return ScriptedEngineTestDouble(model_name=MODEL, max_context=2048)


@pytest.fixture(scope="module")
def base_url(engine: ScriptedEngineTestDouble) -> Iterator[str]:
    with _Server(engine) as srv:
        yield f"http://127.0.0.1:{srv.port}/v1"


@pytest.fixture()
def client(base_url: str, engine: ScriptedEngineTestDouble) -> openai.OpenAI:
    engine.replies.clear()
    engine.fail_next = engine.reject_next = None
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)


USER = [{"role": "user", "content": "What is the capital of France?"}]


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_plain_completion_and_request_mapping(client: openai.OpenAI, engine: ScriptedEngineTestDouble) -> None:
    engine.script("Paris.")
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0.6, top_p=0.9, seed=11,
                                       max_tokens=50, stop=["###"])
    msg = r.choices[0].message
    assert msg.content == "Paris." and msg.tool_calls is None and r.choices[0].finish_reason == "stop"
    req = engine.requests[-1]
    assert engine.tokenizer.decode(req.prompt_ids) == render(USER)
    p = req.params
    assert (p.temperature, p.top_p, p.seed, p.max_tokens, p.stop) == (0.6, 0.9, 11, 50, ["###"])
    assert req.constraint is None
    assert r.usage.prompt_tokens == len(req.prompt_ids)
    assert r.usage.completion_tokens == len("Paris.") + 1  # + the end-of-turn token
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_reasoning_content_is_separate(client: openai.OpenAI, engine: ScriptedEngineTestDouble) -> None:
    engine.script("<think>France's capital is Paris.</think>Paris.")
    msg = client.chat.completions.create(model=MODEL, messages=USER).choices[0].message
    assert msg.content == "Paris."
    assert msg.model_extra["reasoning_content"] == "France's capital is Paris."


def test_tools_give_tool_calls_and_results_round_trip(client: openai.OpenAI, engine: ScriptedEngineTestDouble) -> None:
    engine.script("<think>search both</think>" + CALL)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[SEARCH])
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls] == [
        ("functions.search:0", "search", {"query": "capital of France"}),
        ("functions.search:1", "search", {"query": "capital of Japan"}),
    ]
    prompt = engine.tokenizer.decode(engine.requests[-1].prompt_ids)
    assert prompt.startswith("<|im_system|>tool_declare<|im_middle|>") and '"name": "search"' in prompt
    # Second turn: the assistant's calls and the tool results go back in OpenAI format.
    engine.script("Paris and Tokyo.")
    follow = USER + [ch.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": f"result {i}"} for i, c in enumerate(ch.message.tool_calls)
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=follow, tools=[SEARCH])
    assert r2.choices[0].message.content == "Paris and Tokyo."
    prompt2 = engine.tokenizer.decode(engine.requests[-1].prompt_ids)
    assert "<think>search both</think>" in prompt2  # current-turn reasoning is kept for the model
    assert "## Return of functions.search:1\nresult 1" in prompt2


def test_tool_choice_none_does_not_parse_calls(client: openai.OpenAI, engine: ScriptedEngineTestDouble) -> None:
    engine.script("plain answer")
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[SEARCH], tool_choice="none")
    assert r.choices[0].message.content == "plain answer"
    assert "tool_declare" not in engine.tokenizer.decode(engine.requests[-1].prompt_ids)


def test_streaming_content_reasoning_and_usage(client: openai.OpenAI, engine: ScriptedEngineTestDouble) -> None:
    reply = "<think>hmm, 世界</think>Bonjour, 世界!"
    engine.script(reply)
    stream = client.chat.completions.create(model=MODEL, messages=USER, stream=True,
                                            stream_options={"include_usage": True})
    content, reasoning, finish, usage, n_chunks = "", "", None, None, 0
    for chunk in stream:
        n_chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Bonjour, 世界!" and reasoning == "hmm, 世界" and finish == "stop"
    assert n_chunks > 5  # streamed, not one blob
    assert usage is not None and usage.completion_tokens == len(engine.tokenizer.encode(reply, allow_special=True)) + 1


def test_streaming_tool_calls(client: openai.OpenAI, engine: ScriptedEngineTestDouble) -> None:
    engine.script("Let me check." + CALL)
    calls: dict[int, dict[str, str]] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(model=MODEL, messages=USER, tools=[SEARCH], stream=True):
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            c["id"] += tc.id or ""
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me check." and finish == "tool_calls"
    assert [(c["id"], c["name"], json.loads(c["arguments"])["query"]) for _, c in sorted(calls.items())] == [
        ("functions.search:0", "search", "capital of France"), ("functions.search:1", "search", "capital of Japan")]


def test_json_schema_response_format_is_enforced(client: openai.OpenAI, engine: ScriptedEngineTestDouble) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"},
                                               "capital": {"type": "boolean"}}, "required": ["city", "population", "capital"]}
    for seed in range(3):
        engine.script(None)  # no script: random tokens under the compiled schema's mask
        r = client.chat.completions.create(
            model=MODEL, messages=USER, seed=seed, max_tokens=1500,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
        obj = json.loads(r.choices[0].message.content)
        assert set(obj) == {"city", "population", "capital"}
        assert isinstance(obj["population"], int) and isinstance(obj["capital"], bool) and isinstance(obj["city"], str)
        assert engine.requests[-1].constraint.kind == "json_schema"


def test_json_object_response_format(client: openai.OpenAI, engine: ScriptedEngineTestDouble) -> None:
    engine.script(None)
    r = client.chat.completions.create(model=MODEL, messages=USER, seed=1, max_tokens=1500,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_tool_choice_required_and_named_are_enforced(client: openai.OpenAI, engine: ScriptedEngineTestDouble) -> None:
    engine.script(None)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[SEARCH, WEATHER], tool_choice="required",
                                       seed=3, max_tokens=1500)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) >= 1
    for c in ch.message.tool_calls:
        assert c.function.name in ("search", "get_weather")
        json.loads(c.function.arguments)
    for seed in range(3):  # parallel_tool_calls=False: exactly one call
        engine.script(None)
        r = client.chat.completions.create(model=MODEL, messages=USER, tools=[SEARCH, WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, seed=seed, max_tokens=1500)
        assert len(r.choices[0].message.tool_calls) == 1
    engine.script(None)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[SEARCH, WEATHER], seed=4, max_tokens=1500,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(args) == {"city", "days"} and isinstance(args["days"], int)


def test_logprobs_length_and_stop(client: openai.OpenAI, engine: ScriptedEngineTestDouble) -> None:
    engine.script("abcdefghij")
    r = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, max_tokens=4)
    ch = r.choices[0]
    assert ch.finish_reason == "length" and ch.message.content == "abcd"
    assert [t.token for t in ch.logprobs.content] == list("abcd")
    assert all(t.logprob == pytest.approx(-math.log(512)) for t in ch.logprobs.content)
    engine.script("one two. three")
    r = client.chat.completions.create(model=MODEL, messages=USER, stop=".")
    assert r.choices[0].message.content == "one two" and r.choices[0].finish_reason == "stop"


def test_errors_are_openai_shaped_and_server_keeps_serving(client: openai.OpenAI, base_url: str, engine: ScriptedEngineTestDouble) -> None:
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.chat.completions.create(model="gpt-9", messages=USER)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 3000}])
    assert "maximum context length is 2048 tokens" in e.value.message and "the prompt has 3" in e.value.message
    bad_tool = {"type": "function", "function": {"name": "broken_tool", "parameters": {"type": "object", "properties": 3}}}
    with pytest.raises(openai.BadRequestError, match="broken_tool") as e:
        client.chat.completions.create(model=MODEL, messages=USER, tools=[SEARCH, bad_tool])
    assert e.value.body["param"] == "tools.1.function.parameters"
    with pytest.raises(openai.BadRequestError, match="defined twice"):
        client.chat.completions.create(model=MODEL, messages=USER, tools=[SEARCH, SEARCH])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, top_logprobs=3)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=MODEL, messages=USER, tools=[SEARCH],
                                       tool_choice={"type": "function", "function": {"name": "missing"}})
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}})
    raw = httpx.post(f"{base_url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    raw = httpx.post(f"{base_url}/chat/completions", json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "messages.0.role"
    raw = httpx.get(f"{base_url}/nowhere")
    assert raw.status_code == 404 and "error" in raw.json()
    engine.script("still here")
    assert client.chat.completions.create(model=MODEL, messages=USER).choices[0].message.content == "still here"


def test_engine_failure_is_reported_and_server_keeps_serving(client: openai.OpenAI, engine: ScriptedEngineTestDouble) -> None:
    engine.script("will fail")
    engine.fail_next = RuntimeError("shard 3 died")
    with pytest.raises(openai.InternalServerError, match="shard 3 died"):
        client.chat.completions.create(model=MODEL, messages=USER)
    engine.script("will fail too")
    engine.fail_next = RuntimeError("shard 4 died")
    with pytest.raises(openai.APIError, match="shard 4 died"):
        for _ in client.chat.completions.create(model=MODEL, messages=USER, stream=True):
            pass
    engine.reject_next = ValueError("prompt_ids contains token 999 outside the vocabulary")
    with pytest.raises(openai.BadRequestError, match="token 999"):
        client.chat.completions.create(model=MODEL, messages=USER)
    engine.script("recovered")
    assert client.chat.completions.create(model=MODEL, messages=USER).choices[0].message.content == "recovered"


@pytest.mark.slow
def test_real_engine_end_to_end() -> None:
    """The same API over the real LLMEngine (tiny random-weight model): contracts line up end to end."""
    from model_shards.chat_template import encode_chat
    from model_shards.engine import build_engine
    from model_shards.model_runner import RunnerSpec

    eng = build_engine(RunnerSpec(preset="tiny", seed=0, num_slots=4, max_len=1024), tp=1, use_ray=False, model_name=MODEL)
    with _Server(eng) as srv:  # type: ignore[arg-type]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, seed=0, logprobs=True)
        assert r.usage.prompt_tokens == len(encode_chat(eng.tokenizer, USER))
        assert 1 <= r.usage.completion_tokens <= 4 and r.choices[0].finish_reason in ("stop", "length")
        assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
        assert all(t.logprob <= 0 for t in r.choices[0].logprobs.content)
        schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}}, "required": ["n", "ok"]}
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=60, seed=1,
                                           response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        obj = json.loads(r.choices[0].message.content)
        assert isinstance(obj["n"], int) and isinstance(obj["ok"], bool) and r.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, seed=2, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
