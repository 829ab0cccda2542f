"""The OpenAI-compatible backend against a real HTTP test server, plus make_llm and settings loading."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm.config import CONFIG_ENV, ENV_VARS, ConfigError, Settings, load_settings
from swarm.llm import ChatMessage, LLMClient, LLMError, ToolCall, ToolSpec
from swarm.llm_factory import LLMConfigError, make_llm
from swarm.llm_openai import OpenAIChatClient
from swarm.plans import LLMConfig
from tests.openai_test_server import ErrorReply, OpenAITestServer, completion


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [*ENV_VARS, CONFIG_ENV]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as srv:
        yield srv


def client_for(server: OpenAITestServer, **overrides: object) -> OpenAIChatClient:
    cfg = LLMConfig(base_url=server.url, api_key="sk-test", model="test-model", timeout_s=10, max_retries=3)
    return OpenAIChatClient(cfg.model_copy(update=overrides), backoff_s=0.01, max_backoff_s=0.05)


USER = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="capital of France?")]


# ---------------------------------------------------------------- OpenAIChatClient over HTTP


async def test_plain_answer_and_request_shape(server: OpenAITestServer) -> None:
    server.enqueue(completion("Paris", prompt_tokens=11, completion_tokens=2))
    llm = client_for(server, temperature=0.6, max_tokens=64)
    assert isinstance(llm, LLMClient)
    res = await llm.chat(USER)
    await llm.aclose()
    assert res.message.role == "assistant"
    assert res.message.content == "Paris"
    assert res.message.tool_calls is None
    assert res.message.reasoning_content is None
    assert res.finish_reason == "stop"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (11, 2)
    [body] = server.requests
    assert body["model"] == "test-model"
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of France?"}]
    assert body["temperature"] == 0.6 and body["max_tokens"] == 64
    assert "tools" not in body
    assert server.headers[0]["authorization"] == "Bearer sk-test"


async def test_call_arguments_override_config(server: OpenAITestServer) -> None:
    llm = client_for(server, temperature=0.6, max_tokens=64)
    res = await llm.chat(USER, temperature=1.0, max_tokens=8, response_format={"type": "json_object"})
    await llm.aclose()
    assert res.message.content == "echo: capital of France?"
    body = server.requests[0]
    assert (body["temperature"], body["max_tokens"]) == (1.0, 8)
    assert body["response_format"] == {"type": "json_object"}


async def test_tool_calls_answer(server: OpenAITestServer) -> None:
    args = '{"query": "population of Lyon", "k": 3}'
    server.enqueue(
        completion(
            None,
            tool_calls=[
                {"id": "call_1", "name": "search", "arguments": args},
                {"id": "call_2", "name": "calculator", "arguments": '{"expression": "2+2"}'},
            ],
        )
    )
    search = ToolSpec(name="search", description="search the corpus", parameters={"type": "object", "properties": {"query": {"type": "string"}}})
    llm = client_for(server)
    res = await llm.chat(USER, tools=[search], tool_choice="auto")
    await llm.aclose()
    assert res.finish_reason == "tool_calls"
    assert res.message.content is None
    assert res.message.tool_calls == [
        ToolCall(id="call_1", name="search", arguments=args),
        ToolCall(id="call_2", name="calculator", arguments='{"expression": "2+2"}'),
    ]
    body = server.requests[0]
    assert body["tools"] == [search.to_openai()]
    assert body["tool_choice"] == "auto"


async def test_tool_results_and_reasoning_sent_back(server: OpenAITestServer) -> None:
    history = USER + [
        ChatMessage(
            role="assistant",
            content=None,
            reasoning_content="I should search.",
            tool_calls=[ToolCall(id="call_1", name="search", arguments='{"query": "France"}')],
        ),
        ChatMessage(role="tool", content="Paris is the capital", tool_call_id="call_1", name="search"),
    ]
    llm = client_for(server)
    await llm.chat(history)
    await llm.aclose()
    sent = server.requests[0]["messages"]
    assert sent == [m.to_openai() for m in history]
    assert sent[2]["reasoning_content"] == "I should search."
    assert sent[3]["tool_call_id"] == "call_1"


async def test_reasoning_content_passed_through(server: OpenAITestServer) -> None:
    server.enqueue(completion("Paris", reasoning_content="France's capital is Paris."))
    llm = client_for(server)
    res = await llm.chat(USER)
    await llm.aclose()
    assert res.message.reasoning_content == "France's capital is Paris."
    assert res.message.content == "Paris"


async def test_length_finish_reason_kept(server: OpenAITestServer) -> None:
    server.enqueue(completion("Par", finish_reason="length"))
    llm = client_for(server)
    res = await llm.chat(USER)
    await llm.aclose()
    assert res.finish_reason == "length"


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_retries_then_succeeds(server: OpenAITestServer, status: int) -> None:
    server.enqueue(ErrorReply(status), ErrorReply(status), completion("Paris"))
    llm = client_for(server)
    res = await llm.chat(USER)
    await llm.aclose()
    assert res.message.content == "Paris"
    assert len(server.requests) == 3


async def test_persistent_500_raises_llm_error_after_all_attempts(server: OpenAITestServer) -> None:
    server.enqueue(*[ErrorReply(500, "backend exploded")] * 10)
    llm = client_for(server, max_retries=2)
    with pytest.raises(LLMError) as exc:
        await llm.chat(USER)
    await llm.aclose()
    assert len(server.requests) == 3
    msg = str(exc.value)
    assert "after 3 attempt(s)" in msg and "HTTP 500" in msg and "backend exploded" in msg
    assert server.url in msg


async def test_client_error_is_not_retried(server: OpenAITestServer) -> None:
    server.enqueue(ErrorReply(400, "context too long"), completion("never sent"))
    llm = client_for(server)
    with pytest.raises(LLMError, match="HTTP 400.*context too long"):
        await llm.chat(USER)
    await llm.aclose()
    assert len(server.requests) == 1


async def test_connection_refused_retried_then_llm_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, timeout_s=5)
    llm = OpenAIChatClient(cfg, backoff_s=0.01)
    with pytest.raises(LLMError, match="after 2 attempt\\(s\\): connection error"):
        await llm.chat(USER)
    await llm.aclose()


def test_backoff_doubles_and_honours_retry_after_up_to_the_cap() -> None:
    llm = OpenAIChatClient(LLMConfig(base_url="http://127.0.0.1:9/v1", model="m"), backoff_s=0.5, max_backoff_s=3.0)
    err = RuntimeError("x")
    assert [llm._delay(n, err) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]


async def test_retry_after_header_is_used(server: OpenAITestServer) -> None:
    server.enqueue(ErrorReply(429, headers={"retry-after": "0.2"}), completion("ok"))
    llm = client_for(server)
    llm.max_backoff_s = 0.2
    waits: list[float] = []
    real_delay = llm._delay
    llm._delay = lambda n, e: waits.append(real_delay(n, e)) or waits[-1]  # type: ignore[method-assign]
    assert (await llm.chat(USER)).message.content == "ok"
    await llm.aclose()
    assert waits == [0.2]  # the server asked for 0.2 s, more than backoff_s=0.01


def test_client_rejects_missing_endpoint_or_model() -> None:
    with pytest.raises(ValueError, match="base_url"):
        OpenAIChatClient(LLMConfig(model="m"))
    with pytest.raises(ValueError, match="model"):
        OpenAIChatClient(LLMConfig(base_url="http://127.0.0.1:9/v1"))


# ---------------------------------------------------------------- make_llm


def test_make_llm_without_configuration_says_which_env_vars(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(LLMConfigError) as exc:
        make_llm(LLMConfig())
    msg = str(exc.value)
    for name in ("SWARM_LLM_BASE_URL", "SWARM_LLM_API_KEY", "SWARM_LLM_MODEL", "missing base_url and model"):
        assert name in msg
    assert "e.g." in msg


async def test_make_llm_fills_from_env_and_works(clean_env: pytest.MonkeyPatch, server: OpenAITestServer) -> None:
    clean_env.setenv("SWARM_LLM_BASE_URL", server.url)
    clean_env.setenv("SWARM_LLM_MODEL", "env-model")
    clean_env.setenv("OPENAI_API_KEY", "sk-fallback")
    llm = make_llm(LLMConfig(temperature=0.3))
    assert isinstance(llm, OpenAIChatClient)
    assert (llm.config.base_url, llm.config.model, llm.config.api_key, llm.config.temperature) == (
        server.url, "env-model", "sk-fallback", 0.3,
    )
    assert (await llm.chat(USER)).message.content == "echo: capital of France?"
    await llm.aclose()
    assert server.requests[0]["model"] == "env-model"


def test_make_llm_config_wins_over_settings(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings(llm=LLMConfig(base_url="http://settings/v1", model="s-model", api_key="s-key"))
    llm = make_llm(LLMConfig(model="job-model"), settings)
    assert isinstance(llm, OpenAIChatClient)
    assert (llm.config.base_url, llm.config.model, llm.config.api_key) == ("http://settings/v1", "job-model", "s-key")


def test_make_llm_engine_backend_absent_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    real_import_module = importlib.import_module

    def without_engine(name: str, package: str | None = None) -> object:
        # Simulates a build without swarm.llm_engine, whether or not this checkout has it.
        if name == "swarm.llm_engine":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import_module(name, package)

    monkeypatch.delitem(sys.modules, "swarm.llm_engine", raising=False)
    monkeypatch.setattr(importlib, "import_module", without_engine)
    with pytest.raises(LLMConfigError, match="backend 'engine' needs swarm.llm_engine"):
        make_llm(LLMConfig(backend="engine"))


def test_make_llm_engine_backend_reraises_its_own_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    def engine_missing_dep(name: str, package: str | None = None) -> object:
        raise ModuleNotFoundError("No module named 'some_dep'", name="some_dep")

    monkeypatch.setattr(importlib, "import_module", engine_missing_dep)
    with pytest.raises(ModuleNotFoundError, match="some_dep"):
        make_llm(LLMConfig(backend="engine"))


def test_make_llm_engine_backend_uses_engine_client(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    class EngineChatClientTestDouble:
        def __init__(self, config: LLMConfig) -> None:
            self.config = config

    fake = types.ModuleType("swarm.llm_engine")
    fake.EngineChatClient = EngineChatClientTestDouble  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "swarm.llm_engine", fake)
    cfg = LLMConfig(backend="engine", engine_actor="kimi-replica-0")
    llm = make_llm(cfg)
    assert isinstance(llm, EngineChatClientTestDouble) and llm.config is cfg


# ---------------------------------------------------------------- settings


def test_settings_defaults(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.db_path == str(Path("~/.swarm/swarm.sqlite").expanduser())
    assert (s.host, s.port, s.api_token, s.ray_address, s.num_workers) == ("127.0.0.1", 8321, None, None, 2)
    assert s.max_body_bytes == 1024 * 1024
    assert s.llm == LLMConfig()


def test_settings_from_yaml_with_env_overlay(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "swarm.yaml"
    path.write_text(
        "db_path: ~/jobs.sqlite\nport: 9000\nnum_workers: 4\napi_token: secret\n"
        "llm:\n  base_url: http://file/v1\n  model: file-model\n  temperature: 0.6\n"
    )
    clean_env.setenv("SWARM_PORT", "9100")
    clean_env.setenv("OPENAI_BASE_URL", "http://openai-fallback/v1")
    clean_env.setenv("SWARM_LLM_BASE_URL", "http://env/v1")  # wins over the OPENAI_ fallback
    s = load_settings(str(path))
    assert s.db_path == str(Path("~/jobs.sqlite").expanduser())
    assert (s.port, s.num_workers, s.api_token) == (9100, 4, "secret")
    assert (s.llm.base_url, s.llm.model, s.llm.temperature) == ("http://env/v1", "file-model", 0.6)


def test_settings_path_from_swarm_config_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("host: 0.0.0.0\nray_address: auto\n")
    clean_env.setenv(CONFIG_ENV, str(path))
    clean_env.setenv("SWARM_DB", str(tmp_path / "x.sqlite"))
    s = load_settings()
    assert (s.host, s.ray_address, s.db_path) == ("0.0.0.0", "auto", str(tmp_path / "x.sqlite"))


def test_settings_constructor_reads_llm_and_db_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SWARM_DB", "/tmp/other.sqlite")
    clean_env.setenv("OPENAI_API_KEY", "sk-o")
    clean_env.setenv("SWARM_LLM_MODEL", "kimi-k2")
    s = Settings()
    assert s.db_path == "/tmp/other.sqlite"
    assert (s.llm.api_key, s.llm.model, s.llm.base_url) == ("sk-o", "kimi-k2", None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("port: lots\n", "field 'port'"),
        ("prot: 9000\n", "field 'prot': Extra inputs are not permitted"),
        ("llm:\n  backend: gpt\n", "field 'llm.backend'"),
        ("num_workers: 0\n", "field 'num_workers'"),
        ("- a\n- b\n", "must hold a mapping of settings, got list"),
        ("port: [1\n", "is not valid YAML"),
    ],
)
def test_bad_settings_file_names_the_field(clean_env: pytest.MonkeyPatch, tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(str(path))
    assert expected in str(exc.value)
    assert str(path) in str(exc.value)


def test_bad_env_value_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SWARM_PORT", "eighty")
    with pytest.raises(ConfigError, match="environment variable SWARM_PORT: field 'port'"):
        load_settings()


def test_missing_settings_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(str(tmp_path / "nope.yaml"))


def test_settings_round_trip_json(clean_env: pytest.MonkeyPatch) -> None:
    s = Settings(port=1234, llm=LLMConfig(model="m"))
    assert Settings.model_validate(json.loads(s.model_dump_json())) == s


def test_engine_client_constrains_tool_calls_in_auto_mode() -> None:
    from swarm.llm_engine import EngineChatClient

    client = EngineChatClient(LLMConfig(backend="engine", engine_actor="unused-no-call-is-made"))
    search = ToolSpec(name="search", parameters={"type": "object", "properties": {"query": {"type": "string"}},
                                                 "required": ["query"]})
    msgs = [ChatMessage(role="user", content="hi")]
    # Tools offered, no tool_choice: "auto", the model picks text or calls, but calls are well-formed.
    _, tool_defs, _, auto = client._request(msgs, [search], None, None, None, None)
    assert tool_defs and auto is not None and auto.kind == "ebnf" and "auto_section" in auto.spec
    _, _, _, forced = client._request(msgs, [search], "required", None, None, None)
    assert forced is not None and "auto_section" not in forced.spec
    _, none_defs, _, free = client._request(msgs, [search], "none", None, None, None)
    assert none_defs is None and free is None
    _, _, _, json_only = client._request(msgs, [search], None, None, None, {"type": "json_object"})
    assert json_only is not None and json_only.kind == "json"  # a JSON response format wins
