"""Structured decoding: random logits sampled under xgrammar masks always give valid output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from model_shards.chat_template import parse_assistant
from model_shards.engine_api import Constraint, SamplingParams
from model_shards.sampling import make_generator, sample
from model_shards.structured import ConstraintError, GrammarCache, Matcher, tool_call_grammar
from model_shards.tokenizer import ByteTokenizer, TiktokenTokenizer, write_tiktoken_model

TOK = ByteTokenizer()

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["lead", "helper"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role"],
}

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]


@pytest.fixture(scope="module")
def cache() -> GrammarCache:
    return GrammarCache(TOK)


def run_random(m: Matcher, seed: int, bias: dict[int, float] | None = None, max_steps: int = 3000) -> list[int]:
    """Sample random logits under the matcher's mask until it terminates; return the tokens (stop excluded)."""
    g = make_generator(seed)
    row = torch.zeros(1, TOK.vocab_size, dtype=torch.bool)
    ids: list[int] = []
    for _ in range(max_steps):
        m.fill_allowed(row[0])
        logits = torch.randn(1, TOK.vocab_size, generator=g)
        for t, b in (bias or {}).items():
            logits[0, t] += b  # keeps random strings short; the mask alone decides validity
        tok, _ = sample(logits, [SamplingParams()], [g], row)
        t = int(tok[0])
        assert m.accept(t), f"sampled token {t} that the mask allowed but the matcher rejected"
        if m.is_terminated():
            assert t in TOK.stop_ids
            return ids
        ids.append(t)
    raise AssertionError(f"grammar did not terminate in {max_steps} steps: {TOK.decode(ids)[:200]!r}")


def check_person(obj: Any) -> None:
    assert isinstance(obj, dict) and {"name", "age", "role"} <= set(obj) <= set(PERSON["properties"])
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int) and not isinstance(obj["age"], bool)
    assert obj["role"] in ("lead", "helper")
    assert all(isinstance(t, str) for t in obj.get("tags", []))
    assert isinstance(obj.get("active", True), bool)


def test_json_schema_random_sampling_always_validates(cache: GrammarCache) -> None:
    c = Constraint(kind="json_schema", spec=json.dumps(PERSON))
    quote = ord('"')
    for seed in range(20):
        text = TOK.decode(run_random(cache.matcher(c), seed, {quote: 6.0}))
        check_person(json.loads(text))  # strict json: no control characters, valid UTF-8


def test_free_json_random_sampling_parses(cache: GrammarCache) -> None:
    c = Constraint(kind="json")
    bias = {ord(ch): 3.0 for ch in '"]}0'}
    for seed in range(10):
        json.loads(TOK.decode(run_random(cache.matcher(c), seed, bias)))


def test_ebnf_grammar(cache: GrammarCache) -> None:
    c = Constraint(kind="ebnf", spec='root ::= ("yes" | "no") " " [0-9] [0-9]')
    outs = {TOK.decode(run_random(cache.matcher(c), s)) for s in range(15)}
    assert all(o[:3] in ("yes", "no ") and o[-2:].isdigit() for o in outs)
    assert len(outs) > 3


def test_mask_excludes_invisible_specials_and_stop_until_complete(cache: GrammarCache) -> None:
    m = cache.matcher(Constraint(kind="json_schema", spec=json.dumps({"type": "object"})))
    row = torch.ones(600, dtype=torch.bool)  # logits wider than the tokenizer: padding must be cleared
    m.fill_allowed(row)
    assert row.nonzero().flatten().tolist() == [ord("{")]
    assert not m.accept(ord("x"))  # rejected, state unchanged
    for ch in "{}":
        assert m.accept(ord(ch))
    m.fill_allowed(row)
    assert set(row.nonzero().flatten().tolist()) <= set(TOK.stop_ids) and row[TOK.eos_id]
    assert m.accept(TOK.eos_id) and m.is_terminated()


@pytest.mark.parametrize("seed", range(8))
def test_required_tool_call_grammar_yields_valid_calls(cache: GrammarCache, seed: int) -> None:
    m = cache.matcher(tool_call_grammar(TOOLS, "required"))
    ids = run_random(m, seed, {ord('"'): 6.0})
    # Markers come out as the real special tokens, never spelled byte by byte.
    assert ids[0] == TOK.special["<|tool_calls_section_begin|>"]
    assert ids[-1] == TOK.special["<|tool_calls_section_end|>"]
    content, _, calls = parse_assistant(TOK.decode(ids))
    assert content == "" and len(calls) >= 1
    for call in calls:
        args = json.loads(call["arguments"])
        if call["name"] == "get_weather":
            assert isinstance(args["city"], str) and isinstance(args["days"], int) and set(args) == {"city", "days"}
        else:
            assert call["name"] == "search" and set(args) == {"query"} and isinstance(args["query"], str)


def test_auto_tool_call_grammar_allows_text_or_text_then_well_formed_calls(cache: GrammarCache) -> None:
    m_text = cache.matcher(tool_call_grammar(TOOLS, "auto"))
    for ch in "| a | b |\n":  # a plain answer, then the stop token
        assert m_text.accept(ord(ch))
    assert m_text.accept(TOK.eos_id) and m_text.is_terminated()
    # A call may follow the text, but its arguments must match the tool's schema.
    m = cache.matcher(tool_call_grammar(TOOLS, "auto"))
    for t in [ord(c) for c in "ok "] + [TOK.special["<|tool_calls_section_begin|>"], TOK.special["<|tool_call_begin|>"]]:
        assert m.accept(t)
    for ch in "functions.search:0":
        assert m.accept(ord(ch))
    assert m.accept(TOK.special["<|tool_call_argument_begin|>"])
    for ch in '{"query": ':
        assert m.accept(ord(ch))
    assert not m.accept(ord("k"))  # `{"query": k` is broken JSON: refused
    seen_call = seen_text = 0
    for seed in range(12):  # random sampling under the mask: every output parses
        bias = {ord('"'): 4.0, TOK.eos_id: 1.0}
        if seed % 2:  # odd seeds lean towards opening a call section
            bias[TOK.special["<|tool_calls_section_begin|>"]] = 12.0
        ids = run_random(cache.matcher(tool_call_grammar(TOOLS, "auto")), seed, bias)
        content, _, calls = parse_assistant(TOK.decode(ids))
        for call in calls:
            args = json.loads(call["arguments"])
            assert call["name"] in ("get_weather", "search") and isinstance(args, dict)
        seen_call += bool(calls)
        seen_text += not calls
    assert seen_text and seen_call  # the model still chooses: plain answers and calls both occur


def test_named_tool_call_grammar_forces_that_tool(cache: GrammarCache) -> None:
    c = tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "search"}})
    for seed in range(5):
        _, _, calls = parse_assistant(TOK.decode(run_random(cache.matcher(c), seed, {ord('"'): 6.0})))
        assert len(calls) == 1 and calls[0]["name"] == "search"
        assert set(json.loads(calls[0]["arguments"])) == {"query"}


def test_constraint_errors_are_named(cache: GrammarCache) -> None:
    bad_tools = [{"type": "function", "function": {"name": "broken", "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}}}]
    with pytest.raises(ConstraintError, match="'broken'"):
        tool_call_grammar(bad_tools, "required")
    with pytest.raises(ConstraintError, match="'nope'"):
        tool_call_grammar(TOOLS, "nope")
    with pytest.raises(ConstraintError, match="at least one tool"):
        tool_call_grammar([], "required")
    with pytest.raises(ConstraintError, match="json_schema"):
        cache.matcher(Constraint(kind="json_schema", spec='{"type": "nonsense"}'))
    with pytest.raises(ConstraintError, match="ebnf"):
        cache.matcher(Constraint(kind="ebnf", spec="root ::= missing_rule"))
    with pytest.raises(ConstraintError, match="unknown constraint kind"):
        cache.matcher(Constraint(kind="yaml", spec=""))  # type: ignore[arg-type]


def test_compiled_grammars_are_cached(cache: GrammarCache) -> None:
    c = Constraint(kind="json_schema", spec=json.dumps(PERSON))
    assert cache.compile(c) is cache.compile(Constraint(kind="json_schema", spec=json.dumps(PERSON)))


def test_tiktoken_vocabulary_with_multibyte_tokens(tmp_path: Path) -> None:
    ranks = {bytes([i]): i for i in range(256)}
    for tok in [b"tr", b"ue", b"true", b'{"', b'":', b"<|"]:
        ranks[tok] = len(ranks)
    write_tiktoken_model(ranks, tmp_path / "tiktoken.model")
    n = len(ranks)
    names = ["<|im_end|>", "<|tool_calls_section_begin|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {str(n + i): {"content": s} for i, s in enumerate(names)}}))
    tok = TiktokenTokenizer.from_dir(tmp_path)
    gc = GrammarCache(tok)
    m = gc.matcher(Constraint(kind="ebnf", spec='root ::= "<|tool_calls_section_begin|>" "true"'))
    row = torch.zeros(tok.vocab_size, dtype=torch.bool)
    m.fill_allowed(row)
    # The special token is allowed, its spellings "<" and "<|" are not.
    assert row.nonzero().flatten().tolist() == [tok.special["<|tool_calls_section_begin|>"]]
    assert m.accept(tok.special["<|tool_calls_section_begin|>"])
    m.fill_allowed(row)
    assert {ranks[b"t"], ranks[b"tr"], ranks[b"true"]} == set(row.nonzero().flatten().tolist())
