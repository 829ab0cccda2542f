"""OpenAITestServer: a test double of an OpenAI-compatible endpoint, for tests only.

A real uvicorn HTTP server on 127.0.0.1 (a free port, in a background thread) serving
POST /v1/chat/completions in the OpenAI response format. Tests queue the replies it gives, in
order (a completion body, or an HTTP error), and read back every request it received, so retries
can be counted. With nothing queued it answers "echo: <last user message>".
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class ErrorReply:
    status: int
    message: str = "test double error"
    headers: dict[str, str] = field(default_factory=dict)


def completion(
    content: str | None = "ok",
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    reasoning_content: str | None = None,
    finish_reason: str | None = None,
    prompt_tokens: int = 7,
    completion_tokens: int = 3,
    model: str = "test-model",
) -> dict[str, Any]:
    """A chat.completion body; tool_calls are given as {"id", "name", "arguments"}."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in tool_calls
        ]
    if reasoning_content is not None:
        message["reasoning_content"] = reasoning_content
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:12],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop"),
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class OpenAITestServer:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # JSON bodies, in arrival order
        self.headers: list[dict[str, str]] = []
        self._replies: deque[dict[str, Any] | ErrorReply] = deque()
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.app = self._make_app()

    @property
    def url(self) -> str:
        """The base_url an OpenAI client takes."""
        return f"http://127.0.0.1:{self.port}/v1"

    def enqueue(self, *replies: dict[str, Any] | ErrorReply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def _next_reply(self, body: dict[str, Any]) -> dict[str, Any] | ErrorReply:
        with self._lock:
            if self._replies:
                return self._replies.popleft()
        last_user = next((m.get("content") for m in reversed(body["messages"]) if m.get("role") == "user"), "")
        return completion(f"echo: {last_user}")

    def _make_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> JSONResponse:
            body = await request.json()
            with self._lock:
                self.requests.append(body)
                self.headers.append(dict(request.headers))
            if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
                return JSONResponse(
                    {"error": {"message": "'model' and 'messages' are required", "type": "invalid_request_error"}},
                    status_code=400,
                )
            reply = self._next_reply(body)
            if isinstance(reply, ErrorReply):
                return JSONResponse(
                    {"error": {"message": reply.message, "type": "test_error", "code": reply.status}},
                    status_code=reply.status,
                    headers=reply.headers,
                )
            return JSONResponse(reply)

        return app

    def start(self) -> "OpenAITestServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("OpenAITestServer did not start within 10 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "OpenAITestServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
