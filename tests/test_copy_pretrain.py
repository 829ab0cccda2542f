"""planner.copy_pretrain: the copy warm-up writes a checkpoint with the policy's tokenizer that
planner.sft --init-from can start from; its loss is on the second copy only."""

from __future__ import annotations

import json

import pytest
import torch

from model_shards.bpe import train_bpe, write_tokenizer_dir
from model_shards.checkpoint import load_checkpoint
from model_shards.config import ModelConfig
from model_shards.model import KimiK2ForCausalLM
from model_shards.tokenizer import load_tokenizer
from planner.copy_pretrain import copy_batch, copy_loss, main, recall_batch, recall_loss


def test_batches_repeat_their_tokens_and_the_loss_covers_only_the_copy():
    gen = torch.Generator().manual_seed(0)
    pool = torch.tensor([40, 41, 99])
    ids = copy_batch(gen, 4, 5, pool, bos=1, sep=2)
    assert ids.shape == (4, 12) and (ids[:, 0] == 1).all() and (ids[:, 6] == 2).all()
    assert torch.equal(ids[:, 1:6], ids[:, 7:]) and torch.isin(ids[:, 1:6], pool).all()
    torch.manual_seed(0)
    model = KimiK2ForCausalLM(ModelConfig.preset("tiny"), dtype=torch.float32)
    ids = copy_batch(gen, 4, 5, torch.arange(32, 300), bos=1, sep=2)
    loss, acc = copy_loss(model, ids, 5)
    # Changing the first copy's tokens changes the loss only through the context, never as targets:
    # a model that is perfect on the second half would score 1.0 whatever the first half predicts.
    logits = model.forward_logits(ids)[:, :-1]
    want = torch.nn.functional.cross_entropy(logits[:, 6:].reshape(-1, logits.shape[-1]), ids[:, 7:].reshape(-1))
    assert torch.allclose(loss, want) and 0.0 <= acc <= 1.0


def test_writes_a_checkpoint_sft_can_start_from(tmp_path):
    texts = ["Capital of Peru: Lima. Population of Peru: 29,381,884."] * 40
    tok_dir = write_tokenizer_dir(train_bpe(texts, 50, min_frequency=5), tmp_path / "tok")
    out = tmp_path / "copy"
    assert main(["--tokenizer-from", str(tok_dir), "--out", str(out), "--preset", "tiny", "--steps", "3",
                 "--batch", "4", "--min-k", "4", "--max-k", "6", "--distinct", "5", "20", "--threads", "2"]) == 0
    cfg, model = load_checkpoint(out)
    tok = load_tokenizer(out)
    assert cfg.vocab_size >= tok.vocab_size and cfg.vocab_size % 64 == 0
    log = [json.loads(line) for line in (out / "copy_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(4 <= r["k"] <= 6 for r in log)
    assert [r["distinct"] for r in log] == [5, 12, 20]  # the curriculum widens linearly
    assert json.loads((out / "policy.json").read_text())["tokenizer"] == "."

    # --init-from continues from a checkpoint's weights (lr ~ 0: they come back unchanged).
    again = tmp_path / "again"
    assert main(["--tokenizer-from", str(out), "--init-from", str(out), "--out", str(again), "--steps", "1",
                 "--batch", "2", "--min-k", "4", "--max-k", "4", "--lr", "1e-12", "--distinct", "5", "--threads", "2"]) == 0
    _, model2 = load_checkpoint(again)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_unembedding_starts_as_a_copy_of_the_embedding(tmp_path):
    texts = ["Capital of Peru: Lima. Population of Peru: 29,381,884."] * 40
    tok_dir = write_tokenizer_dir(train_bpe(texts, 50, min_frequency=5), tmp_path / "tok")
    args = ["--tokenizer-from", str(tok_dir), "--preset", "tiny", "--steps", "1", "--batch", "2", "--min-k", "4",
            "--max-k", "4", "--lr", "1e-12", "--threads", "2", "--distinct", "5"]
    assert main(args + ["--out", str(tmp_path / "embed")]) == 0
    assert main(args + ["--out", str(tmp_path / "random"), "--unembed-init", "random"]) == 0
    _, copied = load_checkpoint(tmp_path / "embed")
    _, fresh = load_checkpoint(tmp_path / "random")
    # A separate tensor (Kimi-K2 keeps lm_head untied) that starts equal; lr ~ 0 keeps it so.
    assert copied.lm_head.weight is not copied.model.embed_tokens.weight
    assert torch.allclose(copied.lm_head.weight, copied.model.embed_tokens.weight, atol=1e-6)
    assert not torch.allclose(fresh.lm_head.weight, fresh.model.embed_tokens.weight, atol=1e-3)


def test_recall_rows_repeat_earlier_spans_anywhere_and_the_mask_marks_them():
    gen = torch.Generator().manual_seed(3)
    ids, mask = recall_batch(gen, 6, 400, torch.arange(32, 3000), bos=1, min_k=4, max_k=12)
    assert ids.shape == mask.shape == (6, 400) and (ids[:, 0] == 1).all()
    assert 0.2 < float(mask.float().mean()) < 0.7  # about half of each row is repeats
    distances = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        j = 0
        while j < len(m):
            if not m[j]:
                j += 1
                continue
            end = j
            while end < len(m) and m[end]:
                end += 1
            span = row[j - 1:end]  # the repeat's unmasked first token, then its masked rest
            starts = [s for s in range(1, j - 1) if row[s:s + len(span)] == span]
            assert starts, "a masked run repeats an earlier span of the row"
            distances.append(j - 1 - starts[-1])
            j = end
    # Sources lie at many distances, far ones included: what the short rows never teach.
    assert max(distances) > 150 and min(distances) < 100
    torch.manual_seed(0)
    model = KimiK2ForCausalLM(ModelConfig.preset("tiny"), dtype=torch.float32)
    ids, mask = recall_batch(gen, 2, 100, torch.arange(32, 500), bos=1, min_k=4, max_k=12)  # the tiny vocabulary
    loss, acc = recall_loss(model, ids, mask)
    logits = model.forward_logits(ids)[:, :-1]
    m = mask[:, 1:].bool()
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits[m], ids[:, 1:][m])) and 0 <= acc <= 1


def test_long_rows_from_the_cli(tmp_path):
    texts = ["Capital of Peru: Lima. Population of Peru: 29,381,884."] * 40
    tok_dir = write_tokenizer_dir(train_bpe(texts, 50, min_frequency=5), tmp_path / "tok")
    out = tmp_path / "recall"
    args = ["--tokenizer-from", str(tok_dir), "--out", str(out), "--preset", "tiny", "--steps", "2", "--batch", "2",
            "--min-k", "4", "--max-k", "8", "--distinct", "20", "--threads", "2"]
    assert main(args + ["--length", "128"]) == 0
    assert len((out / "copy_log.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit, match="too short"):
        main(args + ["--length", "10"])


def test_kv_rows_ask_for_values_stated_earlier():
    from planner.copy_pretrain import kv_batch

    gen = torch.Generator().manual_seed(5)
    colon, stop = 7, 8
    ids, mask = kv_batch(gen, 3, 600, torch.arange(32, 3000), bos=1, colon=colon, stop=stop)
    assert ids.shape == mask.shape == (3, 600) and (ids[:, 0] == 1).all()
    for row, m in zip(ids.tolist(), mask.tolist()):
        first_q = m.index(1)
        stated: dict[tuple[int, ...], list[int]] = {}
        j = 1
        while j < first_q:  # the records: key tokens, ':', value tokens, '.'
            c = row.index(colon, j)
            e = row.index(stop, c)
            stated[tuple(row[j:c])] = row[c + 1:e]
            j = e + 1
        assert len(stated) >= 8
        answered = 0
        while j < len(row):  # the questions: the masked value is the stated one, first token included
            if colon not in row[j:] or stop not in row[row.index(colon, j):]:
                break  # the last question may be cut off
            c = row.index(colon, j)
            e = row.index(stop, c)
            assert row[c + 1:e] == stated[tuple(row[j:c])] and all(m[c + 1:e + 1]) and not any(m[j:c + 1])
            answered += 1
            j = e + 1
        assert answered >= 10


def test_kv_rows_from_the_cli(tmp_path):
    texts = ["Capital of Peru: Lima. Population of Peru: 29,381,884."] * 40
    tok_dir = write_tokenizer_dir(train_bpe(texts, 50, min_frequency=5), tmp_path / "tok")
    args = ["--tokenizer-from", str(tok_dir), "--out", str(tmp_path / "kv"), "--preset", "tiny", "--steps", "2",
            "--batch", "2", "--min-k", "4", "--max-k", "8", "--distinct", "20", "--threads", "2"]
    assert main(args + ["--length", "200", "--kv"]) == 0
    with pytest.raises(SystemExit, match="--kv needs --length"):
        main(args + ["--kv"])
