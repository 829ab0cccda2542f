"""Copy warm-up: teach a fresh policy in-context copying before SFT.

    python -m planner.copy_pretrain --tokenizer-from DIR --out checkpoints/copy --steps 600 --seed 0
    python -m planner.sft ... --init-from checkpoints/copy ...

Sequences are `[BOS] x1..xk <|im_middle|> x1..xk` with random non-special tokens of the policy's
vocabulary, k varying per batch; the loss is on the second copy only. Why: a held-out WideGeo task
is answered by copying names and numbers from search results, and on the real traces a small model
learns that copy skill late, if at all (docs/policy.md). Spans of varying length k mean the copy
source is not at a fixed offset, so only content matching (an induction mechanism) solves the task.
Status (docs/policy.md, "Runs so far"): drawing from all ~3,200 tokens, 500 steps of the `small`
preset stayed at chance; starting from 100 distinct tokens and widening (`--distinct 100 1600`) with
the unembedding initialised from the embedding, the mechanism forms in a phase change around step
700 and reaches accuracy 0.85 over 1,600 tokens by step 1000. The output is a checkpoint with the
tokenizer files, ready for `planner.sft --init-from`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model_shards.bpe import TOKENIZER_FILES
from model_shards.checkpoint import load_checkpoint, save_checkpoint
from model_shards.config import ModelConfig
from model_shards.model import KimiK2ForCausalLM
from model_shards.tokenizer import load_tokenizer


MIN_K, MAX_K = 8, 48  # default copy-span lengths


def text_token_ids(tok: Any) -> torch.Tensor:
    """Ids that copy spans draw from: BPE ranks below the special tokens, minus the first 32 (control bytes)."""
    return torch.arange(32, min(tok.special.values()))


def copy_batch(gen: torch.Generator, batch: int, k: int, pool: torch.Tensor, bos: int, sep: int) -> torch.Tensor:
    """[batch, 2k+2] ids: BOS, k tokens drawn at random from `pool`, SEP, the same k tokens."""
    x = pool[torch.randint(0, len(pool), (batch, k), generator=gen)]
    col = torch.full((batch, 1), 0, dtype=torch.long)
    return torch.cat([col + bos, x, col + sep, x], 1)


def copy_loss(model: KimiK2ForCausalLM, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Mean loss and argmax accuracy over the second copy's tokens."""
    logits = model.forward_logits(ids)[:, :-1]
    targets = ids[:, 1:]
    second = slice(k + 1, None)  # targets k+1.. are the copy (position k+1 predicts its first token)
    lg, tg = logits[:, second], targets[:, second]
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1))
    acc = float((lg.argmax(-1) == tg).float().mean())
    return loss, acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m planner.copy_pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer-from", required=True, help="dir with the policy's tiktoken.model (e.g. a stage-1 SFT output)")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--min-k", type=int, default=MIN_K)
    p.add_argument("--max-k", type=int, default=MAX_K)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--distinct", type=int, nargs="+", default=[100, 3000], metavar=("START", "END"),
                   help="how many distinct tokens a batch draws from: START, growing linearly to END by the last step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--init-from", default=None,
                   help="start from this checkpoint's weights (e.g. a stage-1 SFT policy) instead of a random init")
    p.add_argument("--unembed-init", choices=["random", "embed"], default="embed",
                   help="'embed': start lm_head as a copy of the input embedding (not tied)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not 1 <= a.min_k <= a.max_k:
        raise SystemExit(f"need 1 <= --min-k <= --max-k, got {a.min_k}, {a.max_k}")
    tok = load_tokenizer(a.tokenizer_from)
    pool = text_token_ids(tok)
    start, end = (a.distinct * 2)[:2] if len(a.distinct) == 1 else a.distinct[:2]
    if len(a.distinct) > 2 or not 2 <= start <= end <= len(pool):
        raise SystemExit(f"--distinct takes START [END] with 2 <= START <= END <= {len(pool)}, got {a.distinct}")
    cfg = ModelConfig.preset(a.preset)
    cfg = dataclasses.replace(cfg, vocab_size=-(-tok.vocab_size // 64) * 64)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    if a.init_from:
        cfg, model = load_checkpoint(a.init_from, dtype=torch.float32)
    else:
        model = KimiK2ForCausalLM(cfg, dtype=torch.float32)
    if a.unembed_init == "embed" and not a.init_from:
        # Copying a token means writing its unembedding from its embedding; starting the two equal
        # (a copy, not tied: the checkpoint keeps Kimi-K2's separate lm_head) gives that map for free.
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.train()
    decay = [q for q in model.parameters() if q.dim() >= 2]
    rest = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "copy_log.jsonl").open("w")
    t0 = time.perf_counter()
    # A fixed random order of the BPE ids: a curriculum over "distinct tokens" is not one over ranks.
    order = pool[torch.randperm(len(pool), generator=gen)]
    for step in range(1, a.steps + 1):
        k = int(torch.randint(a.min_k, a.max_k + 1, (1,), generator=gen))
        # Few distinct tokens first: the copy mechanism forms on them (docs/policy.md), then widens.
        n = start + (end - start) * (step - 1) // max(1, a.steps - 1)
        ids = copy_batch(gen, a.batch, k, order[:n], tok.special["[BOS]"], tok.special["<|im_middle|>"])
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, step / 20)
        loss, acc = copy_loss(model, ids, k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rec = {"step": step, "k": k, "distinct": n, "loss": round(float(loss.detach()), 4), "accuracy": round(acc, 4),
               "elapsed_s": round(time.perf_counter() - t0, 1)}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if step % 25 == 0 or step == a.steps:
            print(json.dumps(rec), flush=True)
    save_checkpoint(model, cfg, out)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(a.tokenizer_from) / name, out / name)
    (out / "policy.json").write_text(json.dumps({"tokenizer": ".", "stage": "copy warm-up",
                                                 "command": "python -m planner.copy_pretrain " + " ".join(argv or sys.argv[1:])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
