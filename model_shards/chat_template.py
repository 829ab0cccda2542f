"""Kimi K2 chat format: render OpenAI-style messages to prompt text, and parse assistant output back.

Format (Kimi K2 / K2 Thinking):
  <|im_system|>tool_declare<|im_middle|>[tools JSON]<|im_end|>          (when tools are given)
  <|im_system|>system<|im_middle|>...<|im_end|>
  <|im_user|>user<|im_middle|>...<|im_end|>
  <|im_assistant|>assistant<|im_middle|><think>...</think>content
      <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>...<|tool_calls_section_end|><|im_end|>
  <|im_system|>tool<|im_middle|>## Return of functions.NAME:IDX\n...<|im_end|>
The rendered text contains special-token strings; encode it with allow_special=True.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

IM_END = "<|im_end|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"

DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
GENERATION_PROMPT = f"{IM_ASSISTANT}assistant{IM_MIDDLE}"

# Kimi tool-call ids: "functions.NAME:IDX"; NAME may itself contain dots or dashes.
CALL_ID_RE = re.compile(r"^functions\.(?P<name>[^:\s]+):(?P<idx>\d+)$")


def _text_of(content: Any) -> str:
    """OpenAI content is a string, None, or a list of parts; only text parts are rendered."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                out.append(str(part.get("text", "")))
            elif isinstance(part, str):
                out.append(part)
            else:
                raise ValueError(f"unsupported message content part {part!r}: only text parts are supported")
        return "".join(out)
    raise ValueError(f"message content must be a string, a list of parts or null, got {type(content).__name__}")


def normalize_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """Accept OpenAI {"type":"function","function":{...}} or a bare {"name",...}; return the OpenAI form."""
    fn = tool.get("function") if tool.get("type", "function") == "function" and "function" in tool else tool
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"tool definition without a function name: {tool!r}")
    out: dict[str, Any] = {"name": fn["name"]}
    if fn.get("description"):
        out["description"] = fn["description"]
    out["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "function", "function": out}


def _call_fields(call: dict[str, Any]) -> tuple[str, str, str]:
    """(id, name, arguments text) of an OpenAI tool call or of our flat {"id","name","arguments"} form."""
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool call without a function name: {call!r}")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return str(call.get("id") or ""), name, args


def render_segments(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    default_system: str | None = DEFAULT_SYSTEM,
) -> list[tuple[str, bool]]:
    """The prompt as (text, is_control) pieces: control pieces hold the format's special tokens, the
    others hold message text, which must be encoded as plain text (a user typing "<|im_end|>" must not
    end their turn)."""
    segs: list[tuple[str, bool]] = []

    def block(open_tok: str, who: str, body: list[tuple[str, bool]]) -> None:
        segs.append((open_tok, True))
        segs.append((who, False))
        segs.append((IM_MIDDLE, True))
        segs.extend(body)
        segs.append((IM_END, True))

    if tools:
        decl = [normalize_tool(t) for t in tools]
        block(IM_SYSTEM, "tool_declare", [(json.dumps(decl, ensure_ascii=False), False)])
    if default_system is not None and (not messages or messages[0].get("role") not in ("system", "developer")):
        block(IM_SYSTEM, "system", [(default_system, False)])

    # Tool-call ids are rewritten to Kimi's functions.NAME:IDX (a global counter), and tool results follow.
    id_map: dict[str, str] = {}
    counter = 0
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role in ("system", "developer"):
            block(IM_SYSTEM, "system", [(_text_of(m.get("content")), False)])
        elif role == "user":
            block(IM_USER, str(m.get("name") or "user"), [(_text_of(m.get("content")), False)])
        elif role == "assistant":
            body: list[tuple[str, bool]] = []
            reasoning = m.get("reasoning_content")
            # Only the current turn's reasoning (after the last user message) is kept, as K2 Thinking does.
            if reasoning and i > last_user:
                body += [(THINK_BEGIN, True), (reasoning, False), (THINK_END, True)]
            body.append((_text_of(m.get("content")), False))
            calls = m.get("tool_calls") or []
            if calls:
                body.append((SECTION_BEGIN, True))
                for call in calls:
                    cid, name, args = _call_fields(call)
                    kimi_id = cid if CALL_ID_RE.match(cid) else f"functions.{name}:{counter}"
                    if cid:
                        id_map[cid] = kimi_id
                    counter += 1
                    body += [(CALL_BEGIN, True), (kimi_id, False), (ARG_BEGIN, True), (args, False), (CALL_END, True)]
                body.append((SECTION_END, True))
            block(IM_ASSISTANT, "assistant", body)
        elif role == "tool":
            cid = str(m.get("tool_call_id") or "")
            text = f"## Return of {id_map.get(cid, cid)}\n{_text_of(m.get('content'))}"
            block(IM_SYSTEM, "tool", [(text, False)])
        else:
            raise ValueError(f"messages[{i}].role must be system, user, assistant or tool, got {role!r}")
    if add_generation_prompt:
        segs += [(IM_ASSISTANT, True), ("assistant", False), (IM_MIDDLE, True)]
    return [(t, c) for t, c in segs if t]


def render(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    default_system: str | None = DEFAULT_SYSTEM,
) -> str:
    """Render OpenAI-format messages (and tool definitions) as Kimi K2 prompt text."""
    return "".join(t for t, _ in render_segments(messages, tools, add_generation_prompt, default_system))


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    default_system: str | None = DEFAULT_SYSTEM,
) -> list[int]:
    """Token ids of the rendered prompt; only the format's own markers become special tokens."""
    ids: list[int] = []
    for text, control in render_segments(messages, tools, add_generation_prompt, default_system):
        ids += tokenizer.encode(text, allow_special=control)
    return ids


def _strip_stop(text: str) -> str:
    for stop in (IM_END, "[EOS]"):
        if text.endswith(stop):
            text = text[: -len(stop)]
    return text


def split_reasoning(text: str) -> tuple[str, str | None]:
    """(rest, reasoning). A <think> block left open (generation cut off) is all reasoning."""
    end = text.find(THINK_END)
    if end >= 0:
        head = text[:end]
        start = head.find(THINK_BEGIN)
        # Reasoning may come without the opening tag when the prompt prefilled it.
        reasoning = head[start + len(THINK_BEGIN) :] if start >= 0 else head
        pre = head[:start] if start >= 0 else ""
        return pre + text[end + len(THINK_END) :], reasoning.strip()
    stripped = text.lstrip()
    if stripped.startswith(THINK_BEGIN):
        return "", stripped[len(THINK_BEGIN) :].strip()
    return text, None


def parse_tool_section(section: str) -> tuple[list[dict[str, str]], str]:
    """Parse the text after <|tool_calls_section_begin|>; return (calls, malformed remainder text).

    Complete, well-formed calls are kept even when the section end is missing; anything after the last
    good call that does not parse (a cut-off call, a bad id) comes back as the remainder.
    """
    calls: list[dict[str, str]] = []
    pos = 0
    end_at = section.find(SECTION_END)
    body = section if end_at < 0 else section[:end_at]
    while True:
        while pos < len(body) and body[pos].isspace():
            pos += 1
        if pos >= len(body):
            return calls, ""
        if not body.startswith(CALL_BEGIN, pos):
            return calls, body[pos:]
        a = body.find(ARG_BEGIN, pos)
        e = body.find(CALL_END, pos)
        if a < 0 or e < 0 or e < a:
            return calls, body[pos:]
        cid = body[pos + len(CALL_BEGIN) : a].strip()
        m = CALL_ID_RE.match(cid)
        if not m:
            return calls, body[pos:]
        calls.append({"id": cid, "name": m.group("name"), "arguments": body[a + len(ARG_BEGIN) : e].strip()})
        pos = e + len(CALL_END)


def parse_assistant(text: str, parse_tools: bool = True, parse_reasoning: bool = True) -> tuple[str, str | None, list[dict[str, str]]]:
    """Split generated assistant text into (content, reasoning_content, tool_calls).

    parse_reasoning/parse_tools False leave <think> / tool-call markers in content (e.g. for output
    constrained to a JSON schema, which is content by construction).

    tool_calls: [{"id": "functions.NAME:IDX", "name": NAME, "arguments": raw JSON text as written}].
    A malformed or cut-off tool-call section is returned as content (with its markers) rather than lost.
    """
    rest, reasoning = split_reasoning(_strip_stop(text)) if parse_reasoning else (_strip_stop(text), None)
    i = rest.find(SECTION_BEGIN) if parse_tools else -1
    if i < 0:
        return rest.strip(), reasoning, []
    content = rest[:i]
    calls, bad = parse_tool_section(rest[i + len(SECTION_BEGIN) :])
    if not calls:
        return rest.strip(), reasoning, []
    if bad:
        content = content + bad
    return content.strip(), reasoning, calls


@dataclass
class StreamDelta:
    kind: str  # "reasoning" | "content" | "tool_call"
    text: str = ""
    call: dict[str, str] | None = None
    index: int = 0


@dataclass
class StreamingAssistantParser:
    """Incremental parse_assistant for streaming: feed text deltas, get reasoning/content/tool-call deltas.

    Text that might be the start of a marker is held back until it is decided. Tool calls are emitted
    whole, each when its <|tool_call_end|> arrives. finish() flushes and applies the same fallbacks as
    parse_assistant (a cut-off section becomes content).
    """

    reasoning_prefilled: bool = False
    parse_tools: bool = True
    parse_reasoning: bool = True
    _buf: str = field(default="", init=False)
    _state: str = field(default="start", init=False)  # start | think | content | tools | done
    _section: str = field(default="", init=False)
    _n_calls: int = field(default=0, init=False)
    _out: list[StreamDelta] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.reasoning_prefilled:
            self._state = "think"

    def _emit(self, kind: str, text: str) -> None:
        if not text:
            return
        if self._out and self._out[-1].kind == kind and kind != "tool_call":
            self._out[-1].text += text
        else:
            self._out.append(StreamDelta(kind=kind, text=text))

    @staticmethod
    def _holdback(buf: str, markers: tuple[str, ...]) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a marker."""
        best = 0
        for mk in markers:
            for k in range(min(len(mk) - 1, len(buf)), best, -1):
                if buf.endswith(mk[:k]):
                    best = k
                    break
        return best

    def feed(self, delta: str) -> list[StreamDelta]:
        self._out = []
        self._buf += delta
        self._run(final=False)
        return self._out

    def finish(self) -> list[StreamDelta]:
        self._out = []
        self._run(final=True)
        if self._state == "tools":
            # Cut off inside the section: calls already emitted stay, the rest is content.
            calls, bad = parse_tool_section(_strip_stop(self._section))
            if not calls:
                self._emit("content", SECTION_BEGIN + _strip_stop(self._section))
            elif bad:
                self._emit("content", bad)
            self._state = "done"
        return self._out

    def _run(self, final: bool) -> None:
        while True:
            if self._state == "start":
                if not self.parse_reasoning:
                    self._state = "content"
                    continue
                s = self._buf.lstrip()
                if not s and not final:
                    return
                if s.startswith(THINK_BEGIN):
                    self._buf = s[len(THINK_BEGIN) :]
                    self._state = "think"
                    continue
                if THINK_BEGIN.startswith(s) and not final:
                    return
                self._state = "content"
                continue
            if self._state == "think":
                j = self._buf.find(THINK_END)
                if j >= 0:
                    self._emit("reasoning", self._buf[:j])
                    self._buf = self._buf[j + len(THINK_END) :].lstrip()
                    self._state = "content"
                    continue
                keep = 0 if final else self._holdback(self._buf, (THINK_END, IM_END))
                self._emit("reasoning", _strip_stop(self._buf[: len(self._buf) - keep]) if final else self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return
            if self._state == "content":
                j = self._buf.find(SECTION_BEGIN) if self.parse_tools else -1
                if j >= 0:
                    self._emit("content", self._buf[:j])
                    self._buf = self._buf[j + len(SECTION_BEGIN) :]
                    self._state = "tools"
                    continue
                keep = 0 if final else self._holdback(self._buf, (SECTION_BEGIN, IM_END))
                text = self._buf[: len(self._buf) - keep]
                self._emit("content", _strip_stop(text) if final else text)
                self._buf = self._buf[len(self._buf) - keep :]
                return
            if self._state == "tools":
                self._section += self._buf
                self._buf = ""
                calls, _ = parse_tool_section(self._section)
                for c in calls[self._n_calls :]:
                    self._out.append(StreamDelta(kind="tool_call", call=c, index=self._n_calls))
                    self._n_calls += 1
                return
            return
