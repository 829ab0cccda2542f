"""planner.copy_pretrain: the copy warm-up writes a checkpoint with the policy's tokenizer that
planner.sft --init-from can start from; its loss is on the second copy only."""

from __future__ import annotations

import json

import torch

from model_shards.bpe import train_bpe, write_tokenizer_dir
from model_shards.checkpoint import load_checkpoint
from model_shards.config import ModelConfig
from model_shards.model import KimiK2ForCausalLM
from model_shards.tokenizer import load_tokenizer
from planner.copy_pretrain import copy_batch, copy_loss, main


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
