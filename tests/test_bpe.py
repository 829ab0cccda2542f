"""model_shards.bpe: a trained vocabulary loads as Kimi's tokenizer format and round-trips text."""

from __future__ import annotations

import json

import pytest

from model_shards.bpe import pretokenize_counts, train_bpe, write_tokenizer_dir
from model_shards.chat_template import encode_chat
from model_shards.tokenizer import KIMI_SPECIAL_TOKENS, TiktokenTokenizer, load_tokenizer

TEXTS = [
    "Capital of Peru: Lima. Population of Peru: 29,381,884.",
    "Capital of Chile: Santiago. Population of Chile: 18,729,160.",
    "| country | capital |\n|---|---|\n| Peru | Lima |\n| Chile | Santiago |",
] * 30


def test_merges_follow_pair_frequency_and_stop_at_min_frequency():
    ranks = train_bpe(TEXTS, n_merges=500, min_frequency=30)
    assert [ranks[bytes([b])] for b in range(256)] == list(range(256))
    merged = sorted((r, t) for t, r in ranks.items() if r >= 256)
    assert merged, "frequent pairs must be merged"
    # Every learnt token occurs at least min_frequency times as a substring of some pre-token.
    counts = pretokenize_counts(TEXTS)
    for _, tok in merged:
        assert sum(n * w.count(tok) for w, n in counts.items()) >= 30, tok
    # "Capital" occurs 60 times: it becomes one token; a word seen 30 times only via rarer pairs does not grow past that.
    assert b"Capital" in ranks and b" Santiago" in ranks
    # Fewer merges when the threshold rises; the same input gives the same vocabulary.
    assert len(train_bpe(TEXTS, 500, min_frequency=61)) < len(ranks)
    assert train_bpe(TEXTS, 500, min_frequency=30) == ranks
    assert len(train_bpe(TEXTS, 5, min_frequency=1)) == 256 + 5


def test_written_directory_loads_as_kimi_tokenizer_and_round_trips(tmp_path):
    ranks = train_bpe(TEXTS, n_merges=200, min_frequency=5)
    d = write_tokenizer_dir(ranks, tmp_path / "tok")
    tok = load_tokenizer(d)
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.vocab_size == len(ranks) + 256  # Kimi's reserved special range follows the ranks
    assert tok.special["<|im_end|>"] == len(ranks) + KIMI_SPECIAL_TOKENS.index("<|im_end|>") == tok.eos_id
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert {e["content"] for e in cfg["added_tokens_decoder"].values()} == set(KIMI_SPECIAL_TOKENS)
    for text in [*TEXTS[:3], "Nouakchott ünïcode 中文 😀 <|im_end|> plain"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # Trained text is compressed well; a special string in user text stays plain text.
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode()) / 3
    assert tok.special["<|im_end|>"] not in tok.encode("<|im_end|>")
    ids = encode_chat(tok, [{"role": "user", "content": "Capital of Peru?"}], add_generation_prompt=True)
    assert tok.special["<|im_user|>"] in ids and tok.decode(ids).endswith("<|im_middle|>")


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="n_merges"):
        train_bpe(TEXTS, -1)
    with pytest.raises(ValueError, match="min_frequency"):
        train_bpe(TEXTS, 3, min_frequency=0)
    with pytest.raises(ValueError, match="ranks"):
        write_tokenizer_dir({b"a": 0, b"b": 2}, tmp_path / "bad")
