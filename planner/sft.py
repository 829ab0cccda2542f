"""Supervised training of the built-in policy on synthesised WideGeo traces (planner.traces).

    python -m planner.sft --preset small --out checkpoints/small-policy --steps 2000 --seed 0

Deterministic on CPU for a given seed: model init, data order and batches derive from it. The loss
is next-token cross-entropy on assistant tokens only. AdamW with linear warm-up then cosine decay;
every `eval_every` steps the mean loss on held-out train-split tasks (other seed, no shared prompt)
is logged. Output: an HF-format checkpoint (model_shards.checkpoint.save_checkpoint), `policy.json`
(tokenizer, chat format, the training config and data report), `train_log.jsonl`, and
`train_state.pt` (optimizer and step) so that `--resume` continues the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import shutil
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model_shards.checkpoint import load_checkpoint, save_checkpoint
from model_shards.config import ModelConfig
from model_shards.model import KimiK2ForCausalLM
from model_shards.tokenizer import load_tokenizer
from model_shards.bpe import TOKENIZER_FILES, train_bpe, write_tokenizer_dir
from model_shards.chat_template import render_segments
from planner.copy_pretrain import (MAX_K, MIN_K, RECALL_MAX_K, RECALL_MIN_K, copy_batch, copy_loss, recall_batch,
                                   recall_loss, text_token_ids)
from planner.augment import FAKE_NAME_KINDS, FakeNames, fake_entity_copy, task_entities
from planner.plan_schema import with_parallel
from planner.sft_data import load_data, save_data, tokenizer_fingerprint
from planner.traces import (KINDS, TRACE_VERSION, Conversation, EncodedExample, encode_conversation, length_stats,
                            synthesize)

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
POLICY_FILE = "policy.json"
DATA_FILE = "data.xz"  # the run's encoded data (planner.sft_data), reused when the recipe matches


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = "small"
    out: str
    steps: int = Field(1000, ge=1)
    seed: int = 0
    batch_tokens: int = Field(16384, ge=64, description="token budget of one batch, padding included")
    max_len: int | None = Field(None, ge=16, description="longest example kept (default: the model's context)")
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    train_tasks: int = Field(400, ge=1)
    eval_tasks: int = Field(40, ge=0)
    data_seed: int = 0
    kinds: list[str] = Field(default_factory=lambda: list(KINDS))
    # Each training example of these kinds appears N times per epoch: plan conversations are ~7 % of
    # the examples and ~3 % of the target tokens, so a new plan form is otherwise seen a few hundred
    # times in a few hundred steps. Does not change the data file, only how often an example is drawn.
    repeat: dict[str, int] = Field(default_factory=dict)
    eval_every: int = Field(100, ge=1)
    save_every: int = Field(500, ge=1)
    tokenizer: str = Field("byte:512", description='"byte:VOCAB", a tokenizer directory, or "bpe:MERGES" '
                           "(train a BPE vocabulary on this run's training traces and ship it with the checkpoint)")
    # Weight of next-token loss on text the model reads (prompts, tool results); 0 = assistant tokens only.
    # A little of it teaches the document structure, which the copy-from-results skill rests on.
    context_loss_weight: float = Field(0.0, ge=0, le=1)
    # Extra copies of every training conversation with its entities renamed (planner.augment): a
    # memorised fact cannot predict them, so they teach copying from the search results.
    fake_entity_copies: int = Field(0, ge=0, le=8)
    # How fake names are made (planner.augment.fake_name): "places" draws real train-split city names,
    # which cannot be guessed; "syllables" ones have a learnable shape the model starts inventing;
    # "places+countries" also draws train-split country and currency names (a third of the time), so
    # their tokens are written as copy targets (docs/policy.md, "Session 9").
    fake_names: FakeNames = "syllables"
    # The share of fake names that end like one given earlier in the conversation ("Nigeria" after
    # "Liberia", planner.augment.twin_name): a copy that matches only a list's last few tokens then
    # loses loss, as it lost 11 of Africa's countries in stage 23.
    twin_names: float = Field(0.0, ge=0, lt=1)
    # The share of the other fake names that start with a word of a train-split name ("Republic
    # Lelystad", planner.augment.word_name): the policy's BPE made such words single tokens that no
    # fake name put first, and stage 25 could not copy "Republic of the Congo".
    word_names: float = Field(0.0, ge=0, lt=1)
    # Train on the renamed copies only: a real train-split name in the training data is one the model
    # can recall instead of copy, and that habit is what fails on held-out countries.
    fake_only: bool = False
    # Traces in which every name a sub-agent copies follows a space, as in its sources (list answers
    # get a label, queries put the name after a word: planner.traces.LIST_LABEL, lookup_queries).
    spaced_names: bool = False
    # Rename the language of a language task too, in the fake copies.
    fake_languages: bool = False
    # The share of tasks (chosen by a hash of the task id) whose plans run every fan-out's copies one
    # at a time ("parallel": 1): the serial start that PARL trains to parallelize (docs/PARL.md).
    serial_plans: float = Field(0.0, ge=0, le=1)
    # Start from this checkpoint's weights (fresh optimizer) instead of a random init; its tokenizer
    # directory is then the run's tokenizer.
    init_from: str | None = None
    # Each step also trains `copy_mix_weight` × the copy warm-up loss (planner.copy_pretrain) on
    # `copy_mix_batch` random spans of the vocabulary: SFT on traces alone lets a warm-up's copy
    # skill fade before the traces need it. 0 = off.
    copy_mix_weight: float = Field(0.0, ge=0)
    copy_mix_batch: int = Field(32, ge=1)
    # 0: the short rows `BOS x1..xk SEP x1..xk`; L: rows of L tokens with repeats at random places and
    # distances (copy_pretrain.recall_batch), the copying a sub-agent does hundreds of positions in.
    copy_mix_length: int = Field(0, ge=0)
    # The shipped checkpoint's dtype: bfloat16 halves it (the small preset is ~73 MB in float32).
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = Field(None, ge=1)
    # Where the model trains: "auto" is CUDA when torch sees a GPU, else the CPU. Batches are built on
    # the CPU either way; on CUDA matmuls run in TF32.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Processes that synthesize the traces (the same traces whatever the number; search dominates).
    synth_workers: int = Field(1, ge=1)
    # Where the encoded data is kept (default OUT/data.xz): built once, reused by any run whose
    # recipe gives the same data (planner.sft_data), e.g. built here and carried to a GPU machine.
    data_file: str | None = None

    @field_validator("repeat")
    @classmethod
    def _repeat_kinds(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [f"{k}={n}" for k, n in v.items() if k not in KINDS or n < 1]
        if bad:
            raise ValueError(f"repeat {bad}: kinds must be among {list(KINDS)} and counts >= 1")
        return v

    @model_validator(mode="after")
    def _shaped_names_need_place_names(self) -> SFTConfig:
        # Checked here, not after minutes of trace synthesis.
        for name in ("twin_names", "word_names"):
            if getattr(self, name) and self.fake_names == "syllables":
                raise ValueError(f"{name} draws real train-split place names: set fake_names to 'places' "
                                 "or 'places+countries'")
        return self


@dataclass
class SFTData:
    train: list[EncodedExample]
    eval: list[EncodedExample]
    report: dict[str, Any]
    # The held-out conversations with their entities renamed (only with --fake-entity-copies): the
    # plain held-out set names train-split countries, which a model can recall; these it must copy.
    eval_fake: list[EncodedExample] = dataclasses.field(default_factory=list)


BUCKET_WINDOW = 256
BPE_MIN_FREQUENCY = 20  # every BPE token occurs this often in the training traces


def resolve_tokenizer(cfg: SFTConfig, train_convs: list[Conversation], out: Path) -> tuple[Any, dict[str, Any]]:
    """The run's tokenizer; for "bpe:MERGES" it is trained on the training conversations only (never
    on held-out text, so no token exists whose embedding the model never saw) and written to `out`."""
    if cfg.init_from:
        return load_tokenizer(cfg.init_from), {"spec": cfg.init_from, "from": "init_from checkpoint"}
    if not cfg.tokenizer.startswith("bpe:"):
        return load_tokenizer(cfg.tokenizer), {"spec": cfg.tokenizer}
    try:
        merges = int(cfg.tokenizer.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"tokenizer {cfg.tokenizer!r}: expected bpe:MERGES with an integer") from None
    texts = (text for conv in train_convs
             for text, control in render_segments(conv.messages, conv.tools, add_generation_prompt=False) if not control)
    ranks = train_bpe(texts, merges, min_frequency=BPE_MIN_FREQUENCY)
    write_tokenizer_dir(ranks, out)
    return load_tokenizer(out), {"spec": cfg.tokenizer, "merges_learnt": len(ranks) - 256,
                                 "min_frequency": BPE_MIN_FREQUENCY}


def build_data(cfg: SFTConfig, max_len: int, out_dir: Path | None = None) -> tuple[SFTData, Any]:
    """Synthesises and encodes train and held-out eval examples (dropping ones longer than max_len);
    returns them with the tokenizer (trained into `out_dir` for "bpe:MERGES")."""
    from planner.envs import get_env

    bad = [k for k in cfg.kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown conversation kinds {bad}; choose from {list(KINDS)}")
    env = get_env("widegeo")
    train_tasks = env.tasks("train", cfg.train_tasks, cfg.data_seed)
    seen = {t.prompt for t in train_tasks}
    # Held-out tasks: another seed of the train split, minus any prompt the training set has.
    eval_tasks = [t for t in env.tasks("train", cfg.eval_tasks, cfg.data_seed + 1_000_003) if t.prompt not in seen]
    synthesized = {name: synthesize(env, tasks, workers=cfg.synth_workers, spaced_names=cfg.spaced_names)
                   for name, tasks in (("train", train_tasks), ("eval", eval_tasks))}
    train_convs = [c for tr in synthesized["train"][0] for c in tr.conversations if c.kind in cfg.kinds]
    tok, tok_report = resolve_tokenizer(cfg, train_convs, out_dir or Path(cfg.out))
    if cfg.fake_entity_copies:
        traces = synthesized["train"][0]
        for tr in traces:
            entities = task_entities(tr, cfg.fake_languages)
            fakes = [fake_entity_copy(c, entities, f"{cfg.seed}/{c.task_id}/{i}/{k}", cfg.fake_names,
                                      cfg.twin_names, cfg.word_names)
                     for i, c in enumerate(list(tr.conversations)) if c.kind in cfg.kinds
                     for k in range(cfg.fake_entity_copies)]
            tr.conversations = fakes if cfg.fake_only else tr.conversations + fakes
        eval_fake = [encode_conversation(fake_entity_copy(c, task_entities(tr, cfg.fake_languages),
                                                          f"eval/{c.task_id}/{i}", cfg.fake_names, cfg.twin_names,
                                                          cfg.word_names), tok)
                     for tr in synthesized["eval"][0] for i, c in enumerate(tr.conversations) if c.kind in cfg.kinds]
    elif needs := [flag for flag, on in (("--fake-only", cfg.fake_only), ("--fake-languages", cfg.fake_languages),
                                          ("--twin-names", cfg.twin_names), ("--word-names", cfg.word_names)) if on]:
        raise ValueError(f"{needs[0]} needs --fake-entity-copies >= 1 (it acts on the renamed copies)")
    else:
        eval_fake = []
    if cfg.serial_plans:
        for name in ("train", "eval"):
            for tr in synthesized[name][0]:
                tr.conversations = [serial_plan_copy(c, cfg.serial_plans) for c in tr.conversations]
    out: dict[str, list[EncodedExample]] = {}
    report: dict[str, Any] = {"tokenizer": tok_report}
    for name in ("train", "eval"):
        traces, rep = synthesized[name]
        enc = [encode_conversation(c, tok) for tr in traces for c in tr.conversations if c.kind in cfg.kinds]
        kept = [e for e in enc if len(e) <= max_len]
        report[name] = {**rep.as_dict(), "lengths_all": length_stats(enc), "kept_by_kind": dict(
            sorted({k: sum(1 for e in kept if e.kind == k) for k in cfg.kinds}.items())),
            "too_long": len(enc) - len(kept), "examples": len(kept), "target_tokens": sum(sum(e.mask) for e in kept)}
        out[name] = kept
    if not out["train"]:
        raise ValueError(f"no training example fits max_len={max_len}; raise --max-len or change --kinds")
    return SFTData(out["train"], out["eval"], report, [e for e in eval_fake if len(e) <= max_len]), tok


def serial_plan_copy(conv: Conversation, share: float) -> Conversation:
    """A plan conversation whose plan runs each fan-out's copies one at a time, for `share` of the
    tasks (a hash of the task id decides, so every copy of a task agrees); other conversations as given."""
    if conv.kind != "orchestrator_plan" or zlib.crc32(f"serial/{conv.task_id}".encode()) % 10_000 >= share * 10_000:
        return conv
    *head, last = conv.messages
    return dataclasses.replace(conv, messages=[*head, {**last, "content": with_parallel(last["content"], 1)}])


def make_batches(examples: list[EncodedExample], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each batch of one epoch: a seeded shuffle, sorted by length within windows of
    BUCKET_WINDOW examples (so a batch holds similar lengths and pads little), greedy packing under
    the token budget (batch size × its longest example, so padding counts), then the batches shuffled."""
    rng = random.Random(f"sft/{seed}/{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    order = [i for w in range(0, len(order), BUCKET_WINDOW)
             for i in sorted(order[w : w + BUCKET_WINDOW], key=lambda j: len(examples[j]))]
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = len(examples[i])
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def repeated(examples: list[EncodedExample], repeat: dict[str, int]) -> list[EncodedExample]:
    """`examples` with each one of a kind in `repeat` present that many times (the rest once)."""
    return [e for e in examples for _ in range(repeat.get(e.kind, 1))]


def batch_stream(examples: list[EncodedExample], batch_tokens: int, seed: int) -> Iterator[list[EncodedExample]]:
    epoch = 0
    while True:
        for b in make_batches(examples, batch_tokens, seed, epoch):
            yield [examples[i] for i in b]
        epoch += 1


def collate(batch: list[EncodedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L] ids (right-padded), [B, L] float assistant mask and [B, L] float 1-on-real-tokens mask."""
    longest = max(len(e) for e in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.float32)
    valid = torch.zeros((len(batch), longest), dtype=torch.float32)
    for r, e in enumerate(batch):
        ids[r, : len(e)] = torch.tensor(e.ids, dtype=torch.long)
        mask[r, : len(e)] = torch.tensor(e.mask, dtype=torch.float32)
        valid[r, : len(e)] = 1.0
    return ids, mask, valid


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU here (use --device cpu or auto)")
    return torch.device(name)


def masked_lm_loss(model: KimiK2ForCausalLM, ids: torch.Tensor, mask: torch.Tensor,
                   context_weight: float = 0.0, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over positions whose TARGET token is assistant-written, plus
    `context_weight` × the loss on the other real (non-padding, `valid`) targets; (loss, n targets)."""
    logits = model.forward_logits(ids)[:, :-1]
    targets = ids[:, 1:]
    weights = mask[:, 1:]
    n = int(weights.sum().item())
    if n == 0:
        raise ValueError("batch has no assistant tokens to learn")
    if context_weight and valid is not None:
        weights = weights + context_weight * valid[:, 1:] * (1 - weights)
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (losses * weights.reshape(-1)).sum() / n, n


def _copy_mix_loss(model: KimiK2ForCausalLM, tok: Any, cfg: SFTConfig, step: int,
                   device: torch.device) -> tuple[torch.Tensor, float]:
    """The copy warm-up's loss on a batch drawn from (seed, step) alone, so a resumed run sees the same batches."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    if cfg.copy_mix_length:
        ids, mask = recall_batch(gen, cfg.copy_mix_batch, cfg.copy_mix_length, text_token_ids(tok), tok.special["[BOS]"],
                                 RECALL_MIN_K, RECALL_MAX_K)
        return recall_loss(model, ids.to(device), mask.to(device))
    k = int(torch.randint(MIN_K, MAX_K + 1, (1,), generator=gen))
    ids = copy_batch(gen, cfg.copy_mix_batch, k, text_token_ids(tok), tok.special["[BOS]"], tok.special["<|im_middle|>"])
    return copy_loss(model, ids.to(device), k)


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate_detail(model: KimiK2ForCausalLM, examples: list[EncodedExample], batch_tokens: int,
                    pad_id: int) -> tuple[float, float] | None:
    """(mean loss, argmax accuracy) over the assistant tokens of `examples`. Accuracy shows the copy
    skill arriving: most answer tokens are copies of what the agent was shown."""
    if not examples:
        return None
    model.eval()
    device = next(model.parameters()).device
    total, hits, count = 0.0, 0.0, 0
    for b in make_batches(examples, batch_tokens, seed=0, epoch=0):
        ids, mask, _ = (t.to(device) for t in collate([examples[i] for i in b], pad_id))
        logits = model.forward_logits(ids)[:, :-1]
        targets, weights = ids[:, 1:], mask[:, 1:]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        total += float((losses * weights.reshape(-1)).sum())
        hits += float(((logits.argmax(-1) == targets).float() * weights).sum())
        count += int(weights.sum())
    model.train()
    return total / count, hits / count


def evaluate(model: KimiK2ForCausalLM, examples: list[EncodedExample], batch_tokens: int, pad_id: int) -> float | None:
    res = evaluate_detail(model, examples, batch_tokens, pad_id)
    return None if res is None else res[0]


_RUN_LENGTH_FIELDS = {"steps", "threads", "device", "synth_workers", "data_file"}  # a resumed run may change these


def _state_config(cfg: SFTConfig) -> dict[str, Any]:
    """The part of the config a resumed run must share with the saved one."""
    return cfg.model_dump(mode="json", exclude=_RUN_LENGTH_FIELDS)


# The config fields that decide the encoded data (with the tokenizer's identity, see data_key).
_DATA_FIELDS = ("preset", "max_len", "train_tasks", "eval_tasks", "data_seed", "kinds", "tokenizer",
                "fake_entity_copies", "fake_names", "fake_only", "seed", "spaced_names", "fake_languages",
                "twin_names", "word_names", "serial_plans")


def data_key(cfg: SFTConfig) -> dict[str, Any]:
    """What the encoded data is a function of: a data file built under the same key is the same data."""
    key = {k: v for k, v in cfg.model_dump(mode="json").items() if k in _DATA_FIELDS}
    key["tokenizer"] = tokenizer_fingerprint(cfg.init_from or cfg.tokenizer)
    key["trace_version"] = TRACE_VERSION
    return key


def _data_path(cfg: SFTConfig) -> Path:
    return Path(cfg.data_file) if cfg.data_file else Path(cfg.out) / DATA_FILE


def _load_data(cfg: SFTConfig) -> SFTData | None:
    found = load_data(_data_path(cfg), data_key(cfg))
    if found is None:
        return None
    splits, report = found
    return SFTData(splits["train"], splits["eval"], report, splits["eval_fake"])


def _save_data(cfg: SFTConfig, data: SFTData) -> None:
    save_data(_data_path(cfg), data_key(cfg), {"train": data.train, "eval": data.eval, "eval_fake": data.eval_fake},
              data.report)


def _max_len(cfg: SFTConfig, mcfg: ModelConfig) -> int:
    """The longest example kept: --max-len, else the model's context."""
    return cfg.max_len or mcfg.max_position_embeddings


def prepare_data(cfg: SFTConfig) -> Path:
    """Builds the run's data (unless its file already holds it) and writes it; returns the file."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if _load_data(cfg) is None:
        data, _ = build_data(cfg, _max_len(cfg, ModelConfig.preset(cfg.preset)), out)
        _save_data(cfg, data)
    return _data_path(cfg)


def _optimizer(model: KimiK2ForCausalLM, cfg: SFTConfig) -> torch.optim.AdamW:
    # No weight decay on norms (1-D weights), as usual for transformers.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def _log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def save_policy(model: KimiK2ForCausalLM, mcfg: ModelConfig, cfg: SFTConfig, out: Path, step: int,
                data_report: dict[str, Any], eval_loss: float | None) -> None:
    if cfg.save_dtype == "float32":
        save_checkpoint({k: v.cpu() for k, v in model.hf_state_dict().items()}, mcfg, out)
    else:
        state = {k: v.to("cpu", torch.bfloat16) if v.is_floating_point() and "e_score_correction_bias" not in k
                 else v.cpu() for k, v in model.hf_state_dict().items()}
        save_checkpoint(state, dataclasses.replace(mcfg, torch_dtype=cfg.save_dtype), out)
    (out / POLICY_FILE).write_text(json.dumps({
        # A trained BPE vocabulary lives next to the weights (tiktoken.model), as in Kimi's checkpoints.
        "tokenizer": "." if cfg.tokenizer.startswith("bpe:") or cfg.init_from else cfg.tokenizer,
        "chat_format": "kimi-k2 (model_shards.chat_template)",
        "step": step,
        "eval_loss": eval_loss,
        "command": "python -m planner.sft " + " ".join(_argv_of(cfg)),
        "config": cfg.model_dump(mode="json"),
        "data": data_report,
    }, indent=2))


def _argv_of(cfg: SFTConfig) -> list[str]:
    out = []
    for k, v in cfg.model_dump(mode="json").items():
        if v is None or k in ("threads", "synth_workers", "data_file"):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out += [flag] if v else []
        elif isinstance(v, dict):
            out += [flag, *(f"{k}={n}" for k, n in v.items())] if v else []
        else:
            out += [flag, *map(str, v)] if isinstance(v, list) else [flag, str(v)]
    return out


@dataclass
class SFTResult:
    out: Path
    steps: int
    first_loss: float
    last_loss: float
    eval_losses: list[tuple[int, float]]
    interrupted: bool = False


class _StopRequest:
    """Set by SIGINT while the training loop runs, so that the loop stops between steps: an interrupt
    inside a step could leave the weights one update ahead of the saved step count."""

    def __init__(self) -> None:
        self.requested = False

    def __bool__(self) -> bool:
        return self.requested

    @contextlib.contextmanager
    def on_sigint(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def handler(signum: int, frame: Any) -> None:
            self.requested = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def train(cfg: SFTConfig, resume: bool = False, data: SFTData | None = None, stop_after: int | None = None) -> SFTResult:
    """Runs (or resumes) one SFT run; returns where it wrote and the loss trajectory. `stop_after`
    ends it early at that step (saved, resumable: the schedule still runs to cfg.steps), so a run that
    was continued with other settings can be reproduced command by command."""
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {stop_after}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = ModelConfig.preset(cfg.preset)
    max_len = _max_len(cfg, mcfg)
    if data is None and not cfg.tokenizer.startswith("bpe:"):  # a BPE run trains its vocabulary from the traces
        data = _load_data(cfg)
    if data is None:
        data, tok = build_data(cfg, max_len, out)
        _save_data(cfg, data)
    else:  # the same tokenizer build_data would have chosen (resolve_tokenizer)
        tok = load_tokenizer(cfg.init_from or (out if cfg.tokenizer.startswith("bpe:") else cfg.tokenizer))
    model: KimiK2ForCausalLM | None = None
    if cfg.init_from:
        mcfg, model = load_checkpoint(cfg.init_from, dtype=torch.float32)
        if Path(cfg.init_from).resolve() != out.resolve():
            for name in TOKENIZER_FILES:  # the run ships the vocabulary it was trained with
                shutil.copy(Path(cfg.init_from) / name, out / name)
    elif cfg.tokenizer.startswith("bpe:"):
        # The embedding follows the trained vocabulary (rounded up to a multiple of 64 for the GEMMs).
        mcfg = dataclasses.replace(mcfg, vocab_size=-(-tok.vocab_size // 64) * 64)
    if tok.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer!r} has {tok.vocab_size} ids, more than the model's vocab_size {mcfg.vocab_size}")
    torch.manual_seed(cfg.seed)
    if model is None:
        model = KimiK2ForCausalLM(mcfg, dtype=torch.float32)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(device)
    model.train()
    opt = _optimizer(model, cfg)
    step = 0
    log_path = out / LOG_FILE
    state_path = out / STATE_FILE
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {out}")
        state = torch.load(state_path, weights_only=False, map_location=device)
        # Options added after a run started are compared at their defaults (the run did not use them).
        stored = {k: state["config"].get(k, SFTConfig.model_fields[k].get_default(call_default_factory=True))
                  for k in SFTConfig.model_fields if k not in _RUN_LENGTH_FIELDS}
        if stored != _state_config(cfg):
            raise ValueError(f"--resume: {state_path} was written with a different configuration")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"].cpu())
        if log_path.exists():  # steps logged after the last save were not kept: they run again
            lines = log_path.read_text().splitlines()
            log_path.write_text("".join(line + "\n" for line in lines if json.loads(line).get("step", 0) <= step))
    elif log_path.exists():
        log_path.unlink()
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    drawn = repeated(data.train, cfg.repeat)
    stream = batch_stream(drawn, cfg.batch_tokens, cfg.seed)
    for _ in range(step):  # the data order is a function of the step: skip what was trained
        next(stream)
    if step == 0:
        _log(log_path, {"event": "start", "examples": len(data.train), "drawn_per_epoch": len(drawn),
                        "eval_examples": len(data.eval),
                        "params": sum(p.numel() for p in model.parameters()), "data": data.report})
    first_loss = last_loss = float("nan")
    eval_losses: list[tuple[int, float]] = []
    eval_loss: float | None = None
    t0 = time.perf_counter()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)

    def save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "rng": torch.get_rng_state(), "config": _state_config(cfg)}, state_path)
        save_policy(model, mcfg, cfg, out, step, data.report, eval_loss)

    saved = step
    interrupted = _StopRequest()
    with interrupted.on_sigint():
        while step < end and not interrupted:
            batch = next(stream)
            ids, mask, valid = (t.to(device, non_blocking=True) for t in collate(batch, pad_id))
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, n = masked_lm_loss(model, ids, mask, cfg.context_loss_weight, valid)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            copy_rec = {}
            if cfg.copy_mix_weight:
                c_loss, c_acc = _copy_mix_loss(model, tok, cfg, step, device)
                (cfg.copy_mix_weight * c_loss).backward()
                copy_rec = {"copy_loss": round(float(c_loss.detach()), 4), "copy_accuracy": round(c_acc, 4)}
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            step += 1
            last_loss = float(loss.detach())
            if first_loss != first_loss:
                first_loss = last_loss
            rec: dict[str, Any] = {"step": step, "loss": round(last_loss, 5), "lr": lr, "grad_norm": round(gnorm, 4),
                                   "batch": len(batch), "target_tokens": n, **copy_rec,
                                   "elapsed_s": round(time.perf_counter() - t0, 2)}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                detail = evaluate_detail(model, data.eval, cfg.batch_tokens, pad_id)
                if detail is not None:
                    eval_loss = detail[0]
                    rec["eval_loss"] = round(eval_loss, 5)
                    rec["eval_accuracy"] = round(detail[1], 5)
                    eval_losses.append((step, eval_loss))
                fake = evaluate_detail(model, data.eval_fake, cfg.batch_tokens, pad_id)
                if fake is not None:
                    rec["eval_fake_loss"], rec["eval_fake_accuracy"] = round(fake[0], 5), round(fake[1], 5)
            _log(log_path, rec)
            if step % cfg.save_every == 0 or step == end:
                save()
                saved = step
    if interrupted:
        # Ctrl-C (or `timeout -s INT`) ends the run after the step in flight, keeping every step done.
        if step > saved:
            save()
        _log(log_path, {"event": "interrupted", "step": step})
        print(f"interrupted at step {step}; saved, continue with --resume", file=sys.stderr)
    return SFTResult(out, step, first_loss, last_loss, eval_losses, interrupted=bool(interrupted))


def parse_args(argv: list[str] | None = None) -> tuple[SFTConfig, bool, int | None]:
    """(config, --resume, --stop-after) of a command line."""
    cfg, resume, stop_after, _ = _parse(argv)
    return cfg, resume, stop_after


def _parse(argv: list[str] | None) -> tuple[SFTConfig, bool, int | None, bool]:
    p = argparse.ArgumentParser(prog="python -m planner.sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="model_shards ModelConfig preset: small or tiny")
    p.add_argument("--out", required=True, help="output directory (checkpoint, logs, train state)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--train-tasks", type=int, default=400)
    p.add_argument("--eval-tasks", type=int, default=40)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--repeat", nargs="*", default=[], metavar="KIND=N",
                   help="draw each training example of KIND N times per epoch (e.g. orchestrator_plan=4)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--tokenizer", default="byte:512", help='"byte:VOCAB", a tokenizer dir, or "bpe:MERGES" (trained on the traces)')
    p.add_argument("--context-loss-weight", type=float, default=0.0)
    p.add_argument("--fake-entity-copies", type=int, default=0, help="renamed-entity copies per conversation")
    p.add_argument("--fake-names", default="syllables", choices=list(FAKE_NAME_KINDS),
                   help="fake names: pronounceable syllables, real train-split city names drawn at random, or "
                        "those plus train-split country and currency names (places+countries)")
    p.add_argument("--twin-names", type=float, default=0.0, metavar="SHARE",
                   help="share of fake names that end like an earlier one (Nigeria after Liberia), so list "
                        "copies must match more than a short suffix (needs --fake-names places[+countries])")
    p.add_argument("--word-names", type=float, default=0.0, metavar="SHARE",
                   help="share of fake names that start with a word of a train-split name (Republic Lelystad), "
                        "so such words are copied at the start of a name (needs --fake-names places[+countries])")
    p.add_argument("--fake-only", action="store_true", help="train on the renamed copies only (no real train names)")
    p.add_argument("--fake-languages", action="store_true", help="rename a language task's language in the fake copies too")
    p.add_argument("--serial-plans", type=float, default=0.0, metavar="SHARE",
                   help="share of tasks whose plans run each fan-out's copies one at a time (the serial PARL start)")
    p.add_argument("--spaced-names", action="store_true",
                   help="traces where every copied name follows a space (labelled lists, name-last queries)")
    p.add_argument("--init-from", default=None, help="start from this checkpoint dir (weights and tokenizer)")
    p.add_argument("--copy-mix-weight", type=float, default=0.0, help="weight of a copy-task loss added every step (0 = off)")
    p.add_argument("--copy-mix-batch", type=int, default=32, help="rows in that copy batch")
    p.add_argument("--copy-mix-length", type=int, default=0,
                   help="0: short copy rows; L: L-token rows with repeats at random distances (copy_pretrain.recall_batch)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--synth-workers", type=int, default=1, help="processes synthesizing traces (same result)")
    p.add_argument("--data-file", default=None,
                   help="encoded data file (default OUT/data.xz): reused when its recipe matches, else built there")
    p.add_argument("--build-data-only", action="store_true",
                   help="build the data file and stop (to carry it to another machine)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when torch sees a GPU, else the CPU")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end at this step (saved and resumable; the lr schedule still runs to --steps)")
    a = vars(p.parse_args(argv))
    a["repeat"] = _parse_repeat(p, a["repeat"])
    build_only = a.pop("build_data_only")
    resume = a.pop("resume")
    stop_after = a.pop("stop_after")
    return SFTConfig(**a), resume, stop_after, build_only


def _parse_repeat(p: argparse.ArgumentParser, items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        kind, _, n = item.partition("=")
        if kind not in KINDS or not n.isdigit() or int(n) < 1:
            p.error(f"--repeat {item!r}: expected KIND=N with KIND one of {', '.join(KINDS)} and N >= 1")
        out[kind] = int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    cfg, resume, stop_after, build_only = _parse(argv)
    if build_only:
        path = prepare_data(cfg)
        print(json.dumps({"data_file": str(path), "bytes": path.stat().st_size}))
        return 0
    res = train(cfg, resume=resume, stop_after=stop_after)
    print(json.dumps({"out": str(res.out), "steps": res.steps, "first_loss": res.first_loss,
                      "last_loss": res.last_loss, "eval_losses": res.eval_losses, "interrupted": res.interrupted}))
    return 130 if res.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
