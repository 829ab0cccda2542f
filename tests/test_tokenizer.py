"""ByteTokenizer, TiktokenTokenizer (Kimi's file format, with a BPE trained here) and StreamDecoder."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from model_shards.engine_api import Tokenizer
from model_shards.tokenizer import (
    KIMI_SPECIAL_TOKENS,
    ByteTokenizer,
    StreamDecoder,
    TiktokenTokenizer,
    load_tokenizer,
    write_tiktoken_model,
)

CORPUS = (
    "the capital of france is paris. the capital of japan is tokyo. the population of paris is large. "
    "agents search the table and the orchestrator assigns the tasks to the agents in parallel. "
) * 4


def train_bpe(text: str, merges: int) -> dict[bytes, int]:
    """A tiny byte-level BPE: repeatedly merge the most frequent adjacent pair within words."""
    ranks = {bytes([i]): i for i in range(256)}
    words = [[bytes([b]) for b in (" " + w).encode()] for w in text.split()]
    for _ in range(merges):
        pairs = Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
        if not pairs:
            break
        (a, b), _count = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                else:
                    i += 1
    return ranks


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kimi_tok")
    ranks = train_bpe(CORPUS, 60)
    write_tiktoken_model(ranks, d / "tiktoken.model")
    n = len(ranks)
    # Kimi's layout: special ids right after the BPE ranks, named in added_tokens_decoder.
    names = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
             "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
             "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<think>", "</think>"]
    added = {str(n + i): {"content": s, "special": True} for i, s in enumerate(names)}
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added, "eos_token": "[EOS]"}))
    return d


def test_byte_tokenizer_layout_and_roundtrip() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 512
    assert tok.special["<|im_end|>"] == 256 + KIMI_SPECIAL_TOKENS.index("<|im_end|>")
    assert tok.eos_id == tok.special["<|im_end|>"]
    text = "héllo 世界 🚀"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.token_bytes(tok.special["<think>"]) == b"<think>"


def test_byte_tokenizer_special_only_when_allowed() -> None:
    tok = ByteTokenizer()
    text = "a<|im_end|>b<think>"
    plain = tok.encode(text)
    assert all(i < 256 for i in plain)
    special = tok.encode(text, allow_special=True)
    assert special == [ord("a"), tok.special["<|im_end|>"], ord("b"), tok.special["<think>"]]
    assert tok.decode(special) == text


def test_byte_tokenizer_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(vocab_size=100)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ByteTokenizer().token_bytes(512)


def test_tiktoken_from_dir_encodes_with_merges(kimi_dir: Path) -> None:
    tok = TiktokenTokenizer.from_dir(kimi_dir)
    assert isinstance(tok, Tokenizer)
    text = "the capital of france is paris."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were used
    assert any(i >= 256 for i in ids)
    # Kimi's regex handles CJK, digits and contractions; everything round-trips byte-exactly.
    for s in ["東京は日本の首都です", "I'm 12345 agents!\n\n  x", "émigré\tcafé"]:
        assert tok.decode(tok.encode(s)) == s


def test_tiktoken_specials_and_reserved(kimi_dir: Path) -> None:
    tok = TiktokenTokenizer.from_dir(kimi_dir)
    n_ranks = sum(1 for line in (kimi_dir / "tiktoken.model").read_text().splitlines() if line.strip())
    assert tok.special["[BOS]"] == n_ranks
    assert tok.eos_id == tok.special["<|im_end|>"]
    assert tok.vocab_size == n_ranks + 256  # named specials + reserved placeholders fill Kimi's 256 ids
    assert tok.special[f"<|reserved_token_{n_ranks + 255}|>"] == n_ranks + 255
    text = "<|im_user|>user<|im_middle|>hi<|im_end|>"
    allowed = tok.encode(text, allow_special=True)
    assert allowed[0] == tok.special["<|im_user|>"] and allowed[-1] == tok.eos_id
    plain = tok.encode(text)
    assert tok.eos_id not in plain and tok.decode(plain) == text
    assert tok.token_bytes(tok.special["<think>"]) == b"<think>"


def test_tiktoken_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        TiktokenTokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_text("QQ== 0 extra\n")
    with pytest.raises(ValueError, match="tiktoken.model:1"):
        TiktokenTokenizer.from_dir(tmp_path)


def test_load_tokenizer(kimi_dir: Path) -> None:
    assert load_tokenizer("byte").vocab_size == 512
    assert load_tokenizer("byte:300").vocab_size == 300
    assert isinstance(load_tokenizer(kimi_dir), TiktokenTokenizer)


def test_stream_decoder_holds_partial_utf8() -> None:
    tok = ByteTokenizer()
    dec = StreamDecoder(tok)
    ids = tok.encode("a世b")  # 世 is three bytes
    pieces = [dec.push(i) for i in ids]
    assert pieces == ["a", "", "", "世", "b"]
    assert dec.flush() == ""
    dec2 = StreamDecoder(tok)
    dec2.push(0xE4)
    assert dec2.flush() == "\ufffd"  # a cut-off character is replaced, not dropped silently


def _with_never_encode(src: Path, dst: Path, never: object) -> Path:
    dst.mkdir()
    (dst / "tiktoken.model").write_text((src / "tiktoken.model").read_text())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, "never_encode": never}))
    return dst


def test_never_encode_spells_with_smaller_pieces_and_still_decodes(kimi_dir: Path, tmp_path: Path) -> None:
    full = TiktokenTokenizer.from_dir(kimi_dir)
    word = " capital"
    (whole,) = full.encode(word)  # one merged token in the full vocabulary
    pruned = TiktokenTokenizer.from_dir(_with_never_encode(kimi_dir, tmp_path / "pruned", [whole]))
    assert pruned.never_encode == {whole}
    text = "the capital of france is paris."
    ids = pruned.encode(text)
    assert whole not in ids and len(ids) > len(full.encode(text))
    assert pruned.decode(ids) == text
    assert pruned.decode([whole]) == word  # the id still decodes (a model may still write it)
    assert pruned.vocab_size == full.vocab_size  # ids do not move
    # text without the token is encoded exactly as before
    assert pruned.encode("the population of tokyo") == full.encode("the population of tokyo")


def test_never_encode_rejects_bad_values(kimi_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="never_encode"):
        TiktokenTokenizer.from_dir(_with_never_encode(kimi_dir, tmp_path / "a", ["x"]))
    with pytest.raises(ValueError, match="never_encode"):
        TiktokenTokenizer.from_dir(_with_never_encode(kimi_dir, tmp_path / "b", [10**6]))
    with pytest.raises(ValueError, match="single-byte"):
        TiktokenTokenizer.from_dir(_with_never_encode(kimi_dir, tmp_path / "c", [ord("a")]))
