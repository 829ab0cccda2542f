"""OpenAI-compatible HTTP API over any model_shards Engine: /v1/models and /v1/chat/completions.

Prompts are rendered with Kimi K2's chat format; the generated text is split back into content,
`reasoning_content` and `tool_calls`. tool_choice "required"/named and response_format json_object /
json_schema become grammar constraints that the engine enforces token by token. Errors use OpenAI's
JSON error shape so the official client raises its usual exceptions.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_shards.chat_template import StreamingAssistantParser, encode_chat, parse_assistant
from model_shards.engine_api import Constraint, Engine, GenerationRequest, SamplingParams
from model_shards.structured import ConstraintError, check_json_schema, tool_call_grammar

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 4096


class OpenAIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ---- request models -------------------------------------------------------------------------------


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[MessageIn] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # extension (vLLM/SGLang also accept it)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v


def _validation_error(e: ValidationError) -> OpenAIError:
    err = e.errors()[0]
    path = ".".join(str(p) for p in err.get("loc", ()))
    return OpenAIError(400, f"Invalid value for '{path}': {err.get('msg')}", param=path or None, code="invalid_value")


# ---- request -> engine ----------------------------------------------------------------------------


def _constraint_for(req: ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> Constraint | None:
    forced_tool = req.tool_choice == "required" or isinstance(req.tool_choice, dict)
    rf = req.response_format
    rf_type = rf.get("type") if isinstance(rf, dict) else None
    if rf is not None and rf_type not in ("text", "json_object", "json_schema"):
        raise OpenAIError(400, f"response_format.type must be text, json_object or json_schema, got {rf_type!r}", param="response_format.type")
    if forced_tool:
        if not tools:
            raise OpenAIError(400, "tool_choice requires `tools`", param="tool_choice")
        if rf_type in ("json_object", "json_schema"):
            raise OpenAIError(400, "tool_choice 'required' or a named function cannot be combined with a JSON response_format", param="response_format")
        mode: str | dict[str, Any] = "required" if req.tool_choice == "required" else req.tool_choice  # type: ignore[assignment]
        try:
            return tool_call_grammar(tools, mode, parallel=req.parallel_tool_calls is not False)
        except ConstraintError as e:
            raise OpenAIError(400, str(e), param="tool_choice") from e
    if tools and req.tool_choice in (None, "auto") and rf_type not in ("json_object", "json_schema"):
        # The model still chooses between text and calls, but a call it starts is well-formed.
        try:
            return tool_call_grammar(tools, "auto", parallel=req.parallel_tool_calls is not False)
        except ConstraintError as e:
            raise OpenAIError(400, str(e), param="tools") from e
    if rf_type == "json_object":
        return Constraint(kind="json_schema", spec='{"type": "object"}')
    if rf_type == "json_schema":
        js = rf.get("json_schema") if isinstance(rf, dict) else None  # type: ignore[union-attr]
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise OpenAIError(400, "response_format.json_schema.schema must be a JSON schema object", param="response_format.json_schema.schema")
        try:
            check_json_schema(js["schema"], f"response_format.json_schema {js.get('name', '')!r}".rstrip())
        except ConstraintError as e:
            raise OpenAIError(400, str(e), param="response_format.json_schema.schema") from e
        return Constraint(kind="json_schema", spec=json.dumps(js["schema"]))
    return None


def _check_tools(tools: list[ToolDef]) -> list[dict[str, Any]]:
    out = []
    seen: set[str] = set()
    for i, t in enumerate(tools):
        if t.function.name in seen:
            raise OpenAIError(400, f"tool {t.function.name!r} is defined twice", param=f"tools.{i}.function.name")
        seen.add(t.function.name)
        try:
            check_json_schema(t.function.parameters, f"parameters of tool {t.function.name!r}")
        except ConstraintError as e:
            raise OpenAIError(400, str(e), param=f"tools.{i}.function.parameters") from e
        out.append(t.model_dump(exclude_none=True))
    return out


@dataclass
class _Prepared:
    gen: GenerationRequest
    tools_active: bool
    prompt_tokens: int
    # Output constrained to a JSON response_format is content by construction: no marker parsing.
    raw_content: bool = False


def _prepare(engine: Engine, req: ChatCompletionRequest, request_id: str) -> _Prepared:
    if req.n != 1:
        raise OpenAIError(400, f"only n=1 is supported, got n={req.n}", param="n", code="unsupported_value")
    if req.top_logprobs:
        raise OpenAIError(400, "top_logprobs is not supported (logprobs=true returns each sampled token's logprob)", param="top_logprobs", code="unsupported_value")
    tools = _check_tools(req.tools) if req.tools else None
    constraint = _constraint_for(req, tools)
    tools_active = bool(tools) and req.tool_choice != "none"
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        prompt_ids = encode_chat(engine.tokenizer, messages, tools if tools_active else None)
    except ValueError as e:
        raise OpenAIError(400, str(e), param="messages") from e
    n_prompt = len(prompt_ids)
    if n_prompt >= engine.max_context:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {engine.max_context} tokens, but the prompt has {n_prompt} tokens.",
            param="messages",
            code="context_length_exceeded",
        )
    room = engine.max_context - n_prompt
    want = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        max_tokens=min(want, room),
        stop=[s for s in stop if s],
        logprobs=req.logprobs,
    )
    gen = GenerationRequest(request_id=request_id, prompt_ids=prompt_ids, params=params, constraint=constraint)
    raw = constraint is not None and constraint.kind != "ebnf"
    return _Prepared(gen=gen, tools_active=tools_active and not raw, prompt_tokens=n_prompt, raw_content=raw)


# ---- engine -> response ---------------------------------------------------------------------------


def _finish_reason(engine_reason: str | None, has_tool_calls: bool) -> str:
    if has_tool_calls:
        return "tool_calls"
    return "length" if engine_reason == "length" else "stop"


def _logprob_entry(engine: Engine, token_id: int, logprob: float) -> dict[str, Any]:
    b = engine.tokenizer.token_bytes(token_id)
    return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b), "top_logprobs": []}


def _tool_calls_out(calls: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _complete(engine: Engine, model_name: str, prep: _Prepared, created: int) -> dict[str, Any]:
    gen: GenerationRequest = prep.gen
    ids: list[int] = []
    lps: list[float | None] = []
    texts: list[str] = []
    reason: str | None = None
    agen = engine.generate(gen)
    try:
        async for ev in agen:
            if ev.token_id >= 0:
                ids.append(ev.token_id)
                lps.append(ev.logprob)
            texts.append(ev.text)
            if ev.finished:
                reason = ev.finish_reason
                break
    except ValueError as e:
        # The engine rejected the request before producing anything: the client's fault, not ours.
        if not ids:
            raise OpenAIError(400, f"invalid request: {e}") from e
        raise
    finally:
        await _aclose(agen)
    text = "".join(texts)
    content, reasoning, calls = parse_assistant(text, parse_tools=prep.tools_active, parse_reasoning=not prep.raw_content)
    message: dict[str, Any] = {"role": "assistant", "content": content if (content or not calls) else None}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = _tool_calls_out(calls)
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": _finish_reason(reason, bool(calls)), "logprobs": None}
    if gen.params.logprobs:
        choice["logprobs"] = {"content": [_logprob_entry(engine, t, lp if lp is not None else 0.0) for t, lp in zip(ids, lps)]}
    return {
        "id": gen.request_id,
        "object": "chat.completion",
        "created": created,
        "model": model_name,
        "choices": [choice],
        "usage": _usage(prep.prompt_tokens, len(ids)),
        "system_fingerprint": None,
    }


async def _aclose(it: Any) -> None:
    """Close an engine's async generator early (client gone, stop hit) so it can free its sequence."""
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _stream(engine: Engine, model_name: str, prep: _Prepared, created: int, include_usage: bool) -> AsyncIterator[bytes]:
    gen: GenerationRequest = prep.gen
    base = {"id": gen.request_id, "object": "chat.completion.chunk", "created": created, "model": model_name, "system_fingerprint": None}

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: list[dict[str, Any]] | None = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        return _sse({**base, "choices": [choice]})

    parser = StreamingAssistantParser(parse_tools=prep.tools_active, parse_reasoning=not prep.raw_content)
    n_calls = 0
    n_tokens = 0
    reason: str | None = None

    def deltas_of(items: list[Any]) -> list[dict[str, Any]]:
        nonlocal n_calls
        out: list[dict[str, Any]] = []
        for d in items:
            if d.kind == "reasoning":
                out.append({"reasoning_content": d.text})
            elif d.kind == "content":
                out.append({"content": d.text})
            elif d.kind == "tool_call" and d.call is not None:
                c = d.call
                out.append({"tool_calls": [{"index": n_calls, "id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}]})
                n_calls += 1
        return out

    yield chunk({"role": "assistant", "content": ""})
    agen = engine.generate(gen)
    try:
        async for ev in agen:
            lp = None
            if ev.token_id >= 0:
                n_tokens += 1
                if gen.params.logprobs:
                    lp = [_logprob_entry(engine, ev.token_id, ev.logprob if ev.logprob is not None else 0.0)]
            items = deltas_of(parser.feed(ev.text)) if ev.text else []
            for k, delta in enumerate(items):
                yield chunk(delta, logprobs=lp if k == 0 else None)
            if not items and lp is not None:
                yield chunk({}, logprobs=lp)
            if ev.finished:
                reason = ev.finish_reason
                break
        for delta in deltas_of(parser.finish()):
            yield chunk(delta)
        yield chunk({}, finish=_finish_reason(reason, n_calls > 0))
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prep.prompt_tokens, n_tokens)})
    except Exception as e:  # the status line is already sent: report in-band, as OpenAI does
        log.exception("generation failed for %s", gen.request_id)
        yield _sse({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None, "code": None}})
    finally:
        await _aclose(agen)
    yield b"data: [DONE]\n\n"


# ---- app ------------------------------------------------------------------------------------------


def create_openai_app(engine: Engine, model_name: str | None = None) -> FastAPI:
    """A FastAPI app serving the OpenAI chat-completions API over `engine`."""
    name = model_name or engine.model_name
    app = FastAPI(title=f"agent-swarm model_shards: {name}")
    created_at = int(time.time())

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return OpenAIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return OpenAIError(500, f"internal error: {exc}", type="server_error").response()

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created_at, "owned_by": "agent-swarm", "max_model_len": engine.max_context}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise OpenAIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found", type="not_found_error")
        return model_card()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise OpenAIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from e
        if not isinstance(body, dict):
            raise OpenAIError(400, "The request body must be a JSON object", code="invalid_json")
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from e
        if req.model != name:
            raise OpenAIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found", type="not_found_error")
        request_id = "chatcmpl-" + uuid.uuid4().hex
        prep = _prepare(engine, req, request_id)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(engine, name, prep, created, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            body_out = await _complete(engine, name, prep, created)
        except OpenAIError:
            raise
        except Exception as e:  # an engine failure fails this request only
            log.exception("generation failed for %s", request_id)
            raise OpenAIError(500, f"generation failed: {e}", type="server_error") from e
        return JSONResponse(body_out)

    return app


def serve_openai(engine: Engine, model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the API with uvicorn in this process (blocking)."""
    import uvicorn

    uvicorn.run(create_openai_app(engine, model_name), host=host, port=port, log_level="info")
