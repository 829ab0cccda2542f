"""Probe a policy checkpoint on held-out WideGeo tasks, in one process, in seconds.

    python -m planner.probe --checkpoint checkpoints/sft3 --tasks 5 18 --max-tokens 120
    python -m planner.probe --checkpoint checkpoints/sft3 --teacher-forced
    python -m planner.probe --checkpoint checkpoints/sft3 --copy-positions

Copy positions (`--copy-positions`): accuracy of copying a random 20-token span (after its first
token) when the span starts after a prefix of P random tokens and the copy follows a gap of G: an
induction mechanism that only works near the start of a sequence fails at large P or G.

Teacher-forced (`--teacher-forced`): the oracle traces of the held-out eval set's tasks (the real
search results a perfect swarm would see; built for measurement only, never trained on) scored token
by token: per conversation kind the loss and accuracy on assistant tokens, and the accuracy on *fact*
tokens, the assistant tokens inside a name of the task's entities or a digit-grouped number. Those are
the tokens a policy must copy from its context, since no held-out fact was in training: a model that
recalls instead of copying scores well on train-split tasks and poorly here.

For each task of the fixed eval set: the sub-agent prompt the built-in policy was trained on, the
task, the `search` tool; greedy decoding on this project's engine (no Ray, one process) under the
same tool-call grammar the swarm uses. It prints the task's subject and the first turn, and whether
the subject was copied into the turn: the cheapest sign that a checkpoint copies from its context
(a held-out country was never in training), seconds where `swarm eval` takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model_shards.chat_template import encode_chat
from model_shards.checkpoint import load_checkpoint
from model_shards.tokenizer import load_tokenizer
from model_shards.engine import build_engine
from model_shards.engine_api import GenerationRequest, SamplingParams
from model_shards.model import KimiK2ForCausalLM
from model_shards.model_runner import RunnerSpec
from model_shards.structured import tool_call_grammar
from planner.augment import GROUPED_NUMBER, task_entities
from planner.copy_pretrain import text_token_ids
from planner.builtin import checkpoint_tokenizer
from planner.envs import get_env
from planner.envs.widegeo import task_subject
from planner.prompts import SUBAGENT_SYSTEM_PROMPT
from planner.traces import encode_conversation, synthesize
from workers.tools import make_search_tool


@dataclass
class KindScore:
    kind: str
    conversations: int
    loss: float
    accuracy: float
    fact_tokens: int
    fact_accuracy: float
    # The first token of each fact (name or number) against the rest: an induction mechanism copies the
    # rest once the first is right; the first needs the model to know *which* fact comes next.
    first_tokens: int = 0
    first_accuracy: float = 0.0


def fact_token_mask(tokenizer: Any, ids: list[int], names: list[str]) -> list[bool]:
    """True for tokens whose bytes overlap an occurrence of one of `names` or of a digit-grouped number."""
    pieces = [tokenizer.token_bytes(i) for i in ids]
    text = b"".join(pieces)
    covered = bytearray(len(text))
    patterns = [re.escape(n.encode()) for n in names if n] + [GROUPED_NUMBER.pattern.encode()]
    for m in re.finditer(b"|".join(patterns), text):
        covered[m.start():m.end()] = b"\x01" * (m.end() - m.start())
    out, pos = [], 0
    for piece in pieces:
        out.append(any(covered[pos:pos + len(piece)]))
        pos += len(piece)
    return out


@dataclass
class _Tally:
    conversations: int = 0
    loss: float = 0.0
    hits: int = 0
    tokens: int = 0
    fact_hits: int = 0
    facts: int = 0
    first_hits: int = 0
    firsts: int = 0

    def score(self, kind: str) -> KindScore:
        return KindScore(kind, self.conversations, self.loss / max(1, self.tokens), self.hits / max(1, self.tokens),
                         self.facts, self.fact_hits / max(1, self.facts), self.firsts,
                         self.first_hits / max(1, self.firsts))


def _load(checkpoint: str) -> tuple[Any, Any, KimiK2ForCausalLM]:
    """(tokenizer, model config, model in eval mode, float32) of a policy checkpoint."""
    tok = load_tokenizer(checkpoint_tokenizer(checkpoint))
    mcfg, model = load_checkpoint(checkpoint, dtype=torch.float32)
    model.eval()
    return tok, mcfg, model


def trained_spaced(checkpoint: str) -> bool:
    """Whether the checkpoint was trained on spaced-name traces (its policy.json config says so): it is
    scored on traces of the form it was trained to write."""
    try:
        config = json.loads((Path(checkpoint) / "policy.json").read_text()).get("config", {})
    except (OSError, ValueError):
        return False
    return bool(config.get("spaced_names"))


@torch.no_grad()
def teacher_forced(checkpoint: str, kinds: list[str] | None = None,
                   task_indices: list[int] | None = None) -> list[KindScore]:
    """Per-kind scores of `checkpoint` on the oracle traces of the held-out eval set (see module doc);
    `task_indices` picks tasks of the set (default: all). Conversations longer than the model's context
    are left out."""
    env = get_env("widegeo")
    tasks = env.eval_set()
    traces, _ = synthesize(env, [tasks[i] for i in task_indices] if task_indices else tasks, allow_test=True,
                           spaced_names=trained_spaced(checkpoint))
    tok, mcfg, model = _load(checkpoint)
    tallies: dict[str, _Tally] = {}
    for tr in traces:
        names = task_entities(tr)
        for conv in tr.conversations:
            if kinds and conv.kind not in kinds:
                continue
            ex = encode_conversation(conv, tok)
            if len(ex) > mcfg.max_position_embeddings:
                continue
            ids = torch.tensor([ex.ids])
            logits = model.forward_logits(ids)[0, :-1]
            targets = ids[0, 1:]
            loss = F.cross_entropy(logits, targets, reduction="none")
            hit = logits.argmax(-1) == targets
            mask = torch.tensor(ex.mask[1:], dtype=torch.bool)
            fact_all = torch.tensor(fact_token_mask(tok, ex.ids, names))
            facts = fact_all[1:] & mask
            firsts = facts & ~fact_all[:-1]  # a fact token whose previous token is not part of a fact
            t = tallies.setdefault(conv.kind, _Tally())
            t.conversations += 1
            t.loss += float(loss[mask].sum())
            t.hits += int(hit[mask].sum())
            t.tokens += int(mask.sum())
            t.fact_hits += int(hit[facts].sum())
            t.facts += int(facts.sum())
            t.first_hits += int(hit[firsts].sum())
            t.firsts += int(firsts.sum())
    return [t.score(k) for k, t in sorted(tallies.items())]


COPY_POSITIONS = ((0, 0), (100, 0), (400, 0), (1000, 0), (0, 100), (0, 400), (300, 300))


@torch.no_grad()
def copy_at_positions(checkpoint: str, positions: tuple[tuple[int, int], ...] = COPY_POSITIONS, rows: int = 8,
                      k: int = 20, seed: int = 1) -> list[tuple[int, int, float]]:
    """(prefix, gap, accuracy) per setting: rows `BOS prefix x1..xk gap SEP x1..xk` of random tokens,
    accuracy on the copy's tokens after its first."""
    tok, _, model = _load(checkpoint)
    pool = text_token_ids(tok)
    gen = torch.Generator().manual_seed(seed)
    bos, sep = tok.special["[BOS]"], tok.special["<|im_middle|>"]
    out = []
    for prefix, gap in positions:
        rand = [pool[torch.randint(0, len(pool), (rows, n), generator=gen)] for n in (prefix, k, gap)]
        ids = torch.cat([torch.full((rows, 1), bos), rand[0], rand[1], rand[2], torch.full((rows, 1), sep), rand[1]], 1)
        logits = model.forward_logits(ids)[:, :-1]
        first = ids.shape[1] - k  # position of the copy's first token; it predicts the second onwards
        hits = logits[:, first:].argmax(-1) == ids[:, first + 1:]
        out.append((prefix, gap, float(hits.float().mean())))
    return out


@dataclass
class ProbeResult:
    task_id: str
    subject: str
    turn: str

    @property
    def copied_subject(self) -> bool:
        return self.subject in self.turn


def probe(checkpoint: str, task_indices: list[int], max_tokens: int = 120) -> list[ProbeResult]:
    env = get_env("widegeo")
    tasks = env.eval_set()
    bad = [i for i in task_indices if not 0 <= i < len(tasks)]
    if bad:
        raise ValueError(f"task indices {bad} are outside the eval set (0..{len(tasks) - 1})")
    engine = build_engine(RunnerSpec(checkpoint=checkpoint, num_slots=1, max_len=4096), 1,
                          tokenizer=checkpoint_tokenizer(checkpoint), use_ray=False)
    search = make_search_tool(str(env.corpus_path()))
    spec = search.spec().to_openai()

    async def run() -> list[ProbeResult]:
        out = []
        for i in task_indices:
            task = tasks[i]
            messages = [{"role": "system", "content": SUBAGENT_SYSTEM_PROMPT}, {"role": "user", "content": task.prompt}]
            req = GenerationRequest(f"probe-{i}", encode_chat(engine.tokenizer, messages, [spec]),
                                    SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                    tool_call_grammar([spec], "auto"))
            res = await engine.complete(req)
            out.append(ProbeResult(task.id, task_subject(task), res.text))
        await engine.close()
        return out

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m planner.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tasks", type=int, nargs="+", default=None,
                   help="indices into the WideGeo eval set (default: 5; with --teacher-forced: all)")
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--teacher-forced", action="store_true",
                   help="score the oracle traces of the held-out tasks token by token instead of generating")
    p.add_argument("--kinds", nargs="+", default=None, help="with --teacher-forced: only these conversation kinds")
    p.add_argument("--copy-positions", action="store_true",
                   help="measure in-context copying of random spans at several positions and distances")
    a = p.parse_args(argv)
    if a.copy_positions:
        print(f"{'prefix':>7}{'gap':>6}{'copy acc':>10}")
        for prefix, gap, acc in copy_at_positions(a.checkpoint):
            print(f"{prefix:>7}{gap:>6}{acc:>10.3f}")
        return 0
    if a.teacher_forced:
        print(f"{'kind':<20}{'convs':>6}{'loss':>8}{'acc':>7}{'fact tokens':>13}{'fact acc':>10}{'first acc':>11}")
        for k in teacher_forced(a.checkpoint, a.kinds, a.tasks):
            print(f"{k.kind:<20}{k.conversations:>6}{k.loss:>8.3f}{k.accuracy:>7.3f}{k.fact_tokens:>13}"
                  f"{k.fact_accuracy:>10.3f}{k.first_accuracy:>11.3f}")
        return 0
    try:
        results = probe(a.checkpoint, a.tasks or [5], a.max_tokens)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{r.task_id}  subject {r.subject!r}  copied: {'yes' if r.copied_subject else 'no'}")
        print("  " + r.turn.replace("\n", "\n  "))
    print(f"subject copied in {sum(r.copied_subject for r in results)}/{len(results)} first turns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
