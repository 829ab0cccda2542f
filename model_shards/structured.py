"""Structured decoding with xgrammar: token masks that keep generation inside a JSON schema or grammar.

GrammarCache(tokenizer) builds xgrammar's TokenizerInfo once per tokenizer and compiles constraints
(cached); each request gets its own Matcher, which fills an allowed-token row before sampling and
advances on the sampled token.

Special tokens are invisible to grammars (they can never be generated under a constraint) except the
tool-call and thinking markers, which EBNF grammars write by their literal text ("<|tool_call_begin|>"),
and the stop tokens, which end a completed grammar. Inside xgrammar each marker is spelled with a private
pair of control characters instead of its text, because JSON strings cannot contain control characters:
so a marker token can never appear inside a JSON string value, only where a grammar asks for it. When a
marker's token is allowed, the byte tokens that could spell its private code are masked out so the model
emits the real control token (prefer_special_tokens).
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
import xgrammar as xgr

from model_shards.chat_template import ARG_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END, normalize_tool
from model_shards.engine_api import Constraint, Tokenizer

# Special tokens that grammars may produce, by their literal text.
GRAMMAR_VISIBLE_SPECIALS: tuple[str, ...] = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END, "<think>", "</think>")

# Private spelling of each marker inside xgrammar: \x1f plus a distinct control character.
PRIVATE_CODES: dict[str, str] = {s: "\x1f" + chr(1 + k) for k, s in enumerate(GRAMMAR_VISIBLE_SPECIALS)}

_SHIFTS = torch.arange(32, dtype=torch.int32)


def _to_private(ebnf: str) -> str:
    """Rewrite marker literals in an EBNF text to their private codes (fixed-width \\u escapes, so
    a following hex-digit letter is not read as part of the escape)."""
    for text, code in PRIVATE_CODES.items():
        ebnf = ebnf.replace(text, "".join(f"\\u{ord(c):04x}" for c in code))
    return ebnf


class ConstraintError(ValueError):
    """A constraint (schema, grammar, tool definition) that cannot be compiled; the message says which."""


def _is_special(tokenizer: Tokenizer, i: int) -> bool:
    fn = getattr(tokenizer, "is_special", None)
    if fn is not None:
        return bool(fn(i))
    return i in set(tokenizer.special.values())


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's packed int32 bitmask [..., ceil(V/32)] -> bool [..., V]."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.reshape(*bitmask.shape[:-1], -1)[..., :vocab_size].bool()


class Matcher:
    """Per-request grammar state. Call fill_allowed before sampling, accept after."""

    def __init__(self, cache: "GrammarCache", compiled: xgr.CompiledGrammar) -> None:
        self._cache = cache
        self._m = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, cache.vocab_size)

    def fill_allowed(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into row ([V] bool, any device) in place."""
        self._m.fill_next_token_bitmask(self._bitmask)
        allowed = bitmask_to_bool(self._bitmask[0], self._cache.vocab_size)
        if self._cache.prefer_special_tokens:
            for sid, spellings in self._cache.special_spellings.items():
                if allowed[sid]:
                    allowed[spellings] = False
        V = self._cache.vocab_size
        if row.shape[-1] < V:
            raise ValueError(f"allowed row has {row.shape[-1]} entries, the grammar's vocabulary has {V}")
        # Logits may be wider than the tokenizer (padded vocab): the padding is never allowed.
        row[V:] = False
        row[:V].copy_(allowed.to(row.device))

    def accept(self, token_id: int) -> bool:
        """Advance on token_id; False (state unchanged) if the grammar does not allow it."""
        return bool(self._m.accept_token(int(token_id)))

    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was accepted."""
        return bool(self._m.is_terminated())

    def is_completed(self) -> bool:
        return bool(self._m.is_completed())

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def reset(self) -> None:
        self._m.reset()


class GrammarCache:
    """Compiles constraints for one tokenizer (and one logits width) and hands out Matchers."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None, prefer_special_tokens: bool = True, max_threads: int = 2) -> None:
        self.tokenizer = tokenizer
        self.vocab_size: int = int(vocab_size or tokenizer.vocab_size)
        if self.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
        self.prefer_special_tokens = prefer_special_tokens
        visible = {tokenizer.special[s]: s for s in GRAMMAR_VISIBLE_SPECIALS if s in tokenizer.special}
        vocab: list[bytes] = []
        by_bytes: dict[bytes, int] = {}
        for i in range(tokenizer.vocab_size):
            if _is_special(tokenizer, i):
                # Empty strings are how xgrammar marks tokens a grammar can never produce.
                vocab.append(PRIVATE_CODES[visible[i]].encode() if i in visible else b"")
            else:
                b = tokenizer.token_bytes(i)
                vocab.append(b)
                by_bytes.setdefault(b, i)
        stops = list(getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id])
        self._info = xgr.TokenizerInfo(vocab, vocab_size=self.vocab_size, stop_token_ids=stops)
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=max_threads)
        # For each visible marker: the ordinary tokens that spell a prefix of it (masked when it is allowed).
        self.special_spellings: dict[int, torch.Tensor] = {}
        for sid, text in visible.items():
            lit = PRIVATE_CODES[text].encode()
            ids = sorted({by_bytes[lit[:k]] for k in range(1, len(lit) + 1) if lit[:k] in by_bytes})
            self.special_spellings[sid] = torch.tensor(ids, dtype=torch.long)
        self._compiled: dict[tuple[str, str], xgr.CompiledGrammar] = {}

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        key = (constraint.kind, constraint.spec)
        hit = self._compiled.get(key)
        if hit is not None:
            return hit
        try:
            if constraint.kind == "json_schema":
                compiled = self._compiler.compile_json_schema(constraint.spec, any_whitespace=False)
            elif constraint.kind == "json":
                compiled = self._compiler.compile_json_schema("{}", any_whitespace=False)
            elif constraint.kind == "ebnf":
                compiled = self._compiler.compile_grammar(_to_private(constraint.spec))
            else:
                raise ConstraintError(f"unknown constraint kind {constraint.kind!r}: expected json_schema, json or ebnf")
        except ConstraintError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError with the C++ reason
            raise ConstraintError(f"cannot compile {constraint.kind} constraint: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from e
        self._compiled[key] = compiled
        return compiled

    def matcher(self, constraint: Constraint) -> Matcher:
        return Matcher(self, self.compile(constraint))


def check_json_schema(schema: Any, what: str = "schema") -> None:
    """Raise ConstraintError naming `what` if xgrammar cannot turn the schema into a grammar."""
    if not isinstance(schema, dict):
        raise ConstraintError(f"{what} must be a JSON object, got {type(schema).__name__}")
    try:
        xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise ConstraintError(f"{what} is not a valid JSON schema: {msg[-1] if msg else e}") from e


_LITERAL_OR_CLASS = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')


def _rename_rule(ebnf: str, old: str, new: str) -> str:
    """Rename rule `old` to `new` everywhere outside string literals and character classes."""
    word = re.compile(rf"(?<![A-Za-z0-9_\-]){re.escape(old)}(?![A-Za-z0-9_\-])")
    out, pos = [], 0
    for m in _LITERAL_OR_CLASS.finditer(ebnf):
        out.append(word.sub(new, ebnf[pos : m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(word.sub(new, ebnf[pos:]))
    return "".join(out)


def _ebnf_str(s: str) -> str:
    return json.dumps(s)  # EBNF string literals use JSON-style escapes


def tool_call_grammar(tools: list[dict[str, Any]], mode: str | dict[str, Any] = "required", parallel: bool = True) -> Constraint:
    """An EBNF constraint forcing a Kimi tool-call section with arguments valid for the tool's schema.

    mode "required": one or more calls (exactly one when parallel is False), each to any of `tools`;
    "auto": free text, optionally followed by such a section (the model still chooses whether to call,
    but whatever call it starts is well-formed: a small model's broken JSON never reaches the caller);
    a function name (or OpenAI's {"type": "function", "function": {"name": ...}}): exactly one call
    to that tool.
    """
    if not tools:
        raise ConstraintError("tool_choice needs at least one tool in `tools`")
    fns = [normalize_tool(t)["function"] for t in tools]
    if isinstance(mode, dict):
        name = (mode.get("function") or {}).get("name") if isinstance(mode.get("function"), dict) else mode.get("name")
        if not name:
            raise ConstraintError(f"tool_choice object must name a function: {mode!r}")
        mode = str(name)
    if mode in ("required", "auto"):
        chosen, repeat = fns, parallel
    else:
        chosen = [f for f in fns if f["name"] == mode]
        if not chosen:
            raise ConstraintError(f"tool_choice names function {mode!r}, which is not among the tools {[f['name'] for f in fns]}")
        repeat = False
    calls = []
    for f in chosen:
        check_json_schema(f["parameters"], f"parameters of tool {f['name']!r}")
        head = xgr.Grammar.from_ebnf(
            f"root ::= {_ebnf_str(CALL_BEGIN + 'functions.' + f['name'] + ':')} [0-9]{{1,4}} {_ebnf_str(ARG_BEGIN)}"
        )
        args = xgr.Grammar.from_json_schema(json.dumps(f["parameters"]), any_whitespace=False)
        tail = xgr.Grammar.from_ebnf(f"root ::= {_ebnf_str(CALL_END)}")
        calls.append(xgr.Grammar.concat(head, args, tail))
    one_call = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    body = _rename_rule(str(one_call), "root", "tool_call")
    reps = "tool_call+" if repeat else "tool_call"
    section = f"{_ebnf_str(SECTION_BEGIN)} {reps} {_ebnf_str(SECTION_END)}"
    if mode == "auto":
        # Text never holds a marker (markers are \x1f codes inside xgrammar), so a call can only
        # start through the section rule, whose arguments follow the tool's schema.
        think = f"{_ebnf_str('<think>')} auto_text {_ebnf_str('</think>')}"
        spec = (f"{body}\nauto_text ::= [^\\x1f]*\nauto_think ::= {think}\nauto_section ::= {section}\n"
                "root ::= auto_think? auto_text auto_section?\n")
    else:
        spec = f"{body}\nroot ::= {section}\n"
    return Constraint(kind="ebnf", spec=spec)
