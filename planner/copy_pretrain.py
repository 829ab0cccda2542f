"""Copy warm-up: teach a fresh policy in-context copying before SFT.

    python -m planner.copy_pretrain --tokenizer-from DIR --out checkpoints/copy --steps 600 --seed 0
    python -m planner.sft ... --init-from checkpoints/copy ...

Two row formats. Short rows (default) are `[BOS] x1..xk <|im_middle|> x1..xk` with random non-special
tokens of the policy's vocabulary, k varying per batch; the loss is on the second copy only. Long rows
(`--length L`, `recall_batch`) are L random tokens in which spans repeat earlier spans at random places
and distances; the loss is on the repeats. Why: a held-out WideGeo task is answered by copying names
and numbers from search results, and on the real traces a small model learns that copy skill late, if
at all (docs/policy.md). Spans of varying length mean the copy source is not at a fixed offset, so only
content matching (an induction mechanism) solves the task.

Status (docs/policy.md, "Runs so far"): on short rows, starting from 100 distinct tokens and widening
(`--distinct 100 1600`) with the unembedding initialised from the embedding, the mechanism forms in a
phase change around step 700 (accuracy 0.85 by step 1000). But it works only near the start of a
sequence: after a 100-token prefix its accuracy drops from 0.78 to 0.00, so it never helped on the
traces, where copies happen hundreds of positions in. 200 steps of long rows (`--length 1024`) from a
model that has it carry it to every position (0.79-0.97 up to position 1,000;
`python -m planner.probe --copy-positions`). The output is a
checkpoint with the tokenizer files, ready for `planner.sft --init-from`.
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
RECALL_MIN_K, RECALL_MAX_K = 4, 24  # repeat lengths in long rows: names and numbers are 1-8 tokens


def text_token_ids(tok: Any) -> torch.Tensor:
    """Ids that copy spans draw from: BPE ranks below the special tokens, minus the first 32 (control bytes)."""
    return torch.arange(32, min(tok.special.values()))


def copy_batch(gen: torch.Generator, batch: int, k: int, pool: torch.Tensor, bos: int, sep: int) -> torch.Tensor:
    """[batch, 2k+2] ids: BOS, k tokens drawn at random from `pool`, SEP, the same k tokens."""
    x = pool[torch.randint(0, len(pool), (batch, k), generator=gen)]
    col = torch.full((batch, 1), 0, dtype=torch.long)
    return torch.cat([col + bos, x, col + sep, x], 1)


def recall_batch(gen: torch.Generator, batch: int, length: int, pool: torch.Tensor, bos: int,
                 min_k: int = MIN_K, max_k: int = MAX_K, copy_frac: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch, length] ids, [batch, length] target mask): random tokens from `pool` in which, at
    random places, a span of k (min_k..max_k) tokens repeats a span from anywhere earlier in the row,
    until about `copy_frac` of the row is repeats. The mask marks the repeated tokens after each
    repeat's first (which cannot be predicted).

    Why long rows: the short copy rows teach an induction mechanism that works only near the start of a
    sequence and at distances below ~50 (measured: accuracy 0.78 at position 0, 0.00 after a 100-token
    prefix), while a sub-agent copies names from results hundreds to thousands of positions in."""
    rows, masks = [], []
    for _ in range(batch):
        ids = [bos]
        mask = [0]
        while len(ids) < length:
            # Fresh runs and repeats have the same mean length, so `copy_frac` is the chance of a repeat.
            take_copy = len(ids) > max_k + 1 and float(torch.rand((), generator=gen)) < copy_frac
            if take_copy:
                k = int(torch.randint(min_k, max_k + 1, (1,), generator=gen))
                start = int(torch.randint(1, len(ids) - k + 1, (1,), generator=gen))
                span = ids[start:start + k]
                ids += span
                mask += [0] + [1] * (len(span) - 1)
            else:
                n = int(torch.randint(min_k, max_k + 1, (1,), generator=gen))  # a run of fresh tokens
                ids += pool[torch.randint(0, len(pool), (n,), generator=gen)].tolist()
                mask += [0] * n
        rows.append(ids[:length])
        masks.append(mask[:length])
    return torch.tensor(rows), torch.tensor(masks)


def kv_batch(gen: torch.Generator, batch: int, length: int, pool: torch.Tensor, bos: int, colon: int,
             stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch, length] ids, mask): key-value lookups at long range. A row first states records
    `attr entity : value .` (per row: 4 attributes and 8-24 entities of 1-3 random tokens, each entity's
    records together, values of 1-4 random tokens), then asks `attr entity :` for random earlier
    records; the mask marks the answered values and their `.`.

    Why: copying a span once its first token is written is induction (long rows teach it), but which
    value comes first needs a lookup by two keys, e.g. a sub-agent writing a capital into a table
    reads "Capital of Ethiopia: Addis Ababa" from a result. Measured on the held-out traces, sub-agents
    got 0.87 of fact tokens after the first right and 0.10 of the first ones (docs/policy.md). Here the
    question repeats the record's key exactly, which the stage-5 policy already answers (0.63 on its
    first batch); the traces' harder case, a question worded unlike the record, is not covered yet."""
    def draw(lo: int, hi: int) -> list[int]:
        return pool[torch.randint(0, len(pool), (int(torch.randint(lo, hi + 1, (1,), generator=gen)),),
                                  generator=gen)].tolist()

    rows, masks = [], []
    for _ in range(batch):
        attrs = [draw(1, 1) for _ in range(4)]
        entities = [draw(1, 3) for _ in range(int(torch.randint(8, 25, (1,), generator=gen)))]
        ids, mask, records = [bos], [0], []
        for ent in entities:
            for attr in attrs:
                if len(ids) >= length // 2:
                    break
                value = draw(1, 4)
                records.append((attr + ent + [colon], value))
                ids += attr + ent + [colon] + value + [stop]
                mask += [0] * (len(attr) + len(ent) + 2 + len(value))
        while len(ids) < length:
            key, value = records[int(torch.randint(0, len(records), (1,), generator=gen))]
            ids += key + value + [stop]
            mask += [0] * len(key) + [1] * (len(value) + 1)
        rows.append(ids[:length])
        masks.append(mask[:length])
    return torch.tensor(rows), torch.tensor(masks)


def recall_loss(model: KimiK2ForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean loss and argmax accuracy over the masked (repeated) tokens of a `recall_batch`."""
    logits = model.forward_logits(ids)[:, :-1]
    targets, m = ids[:, 1:], mask[:, 1:].bool()
    loss = F.cross_entropy(logits[m], targets[m])
    acc = float((logits[m].argmax(-1) == targets[m]).float().mean())
    return loss, acc


def _kv_marks(tok: Any) -> tuple[int, int]:
    """The ids of ":" and "." (single-byte BPE tokens) that separate a kv row's keys and values."""
    colon, stop = tok.encode(":"), tok.encode(".")
    if len(colon) != 1 or len(stop) != 1:
        raise ValueError("the tokenizer does not have ':' and '.' as single tokens")
    return colon[0], stop[0]


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
    p.add_argument("--length", type=int, default=0,
                   help="rows of this many tokens with repeats at random places and distances (recall_batch); "
                        "0 = short rows BOS x1..xk SEP x1..xk")
    p.add_argument("--kv", action="store_true",
                   help="with --length: key-value lookup rows (kv_batch) instead of repeated spans")
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
    if a.kv and not a.length:
        raise SystemExit("--kv needs --length (the rows' size)")
    if a.length and a.length < 2 * a.max_k + 2:
        raise SystemExit(f"--length {a.length} is too short for spans up to --max-k {a.max_k} (need >= {2 * a.max_k + 2})")
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
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, step / 20)
        if a.length and a.kv:
            ids, mask = kv_batch(gen, a.batch, a.length, order[:n], tok.special["[BOS]"], *_kv_marks(tok))
            loss, acc = recall_loss(model, ids, mask)
        elif a.length:
            ids, mask = recall_batch(gen, a.batch, a.length, order[:n], tok.special["[BOS]"], a.min_k, a.max_k)
            loss, acc = recall_loss(model, ids, mask)
        else:
            ids = copy_batch(gen, a.batch, k, order[:n], tok.special["[BOS]"], tok.special["<|im_middle|>"])
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
