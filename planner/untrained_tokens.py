"""Find the BPE tokens a trained policy never learnt to write, and optionally make its tokenizer
stop producing them.

The built-in policy's BPE vocabulary was learnt in stage 1 on traces that named real train-split
countries, so " Fiji" or " Greece" became single tokens. From stage 5 on, every entity of the
training data is renamed, so those tokens stopped being written, and the policy cannot copy them
(asked about Fiji, it wrote "kara"). Held-out country names were never merged (they were not in the
BPE's text) and are spelled with small, well-trained pieces, which is why held-out tasks work and
train-split ones do not.

This module lists the tokens that spell an entity name and (almost) never occur in the policy's own
training data, and can write them to the checkpoint's tokenizer_config.json under `never_encode`
(model_shards.tokenizer), so the encoder spells such text with the pieces they were merged from. A
token some kept token is built from is kept, so the training data's own spelling stays as it was
(`encoding_changes` counts what moved). Measured on the shipped policy (docs/policy.md, "Session
9"): it fixes some train-split names but respells words held-out tasks rely on and lowers the
held-out score, so the shipped checkpoint does not use it; it is a diagnostic and an experiment.

    python -m planner.untrained_tokens --checkpoint planner/builtin_policy --dry-run
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from model_shards.tokenizer import NEVER_ENCODE_KEY, TiktokenTokenizer

DEFAULT_MIN_COUNT = 1  # a token written fewer times than this in the training data was never learnt
DEFAULT_MAX_CONTEXT = 1_000  # a token read this often stays (documents' own words: " Peso", " Pound")


def merge_path(token: bytes, ranks: Mapping[bytes, int]) -> set[bytes]:
    """Every token byte-pair encoding creates on its way to `token` (itself included), by rank order."""
    parts = [token[i:i + 1] for i in range(len(token))]
    made = set()
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 62))
        merged = parts[best] + parts[best + 1]
        if merged not in ranks:
            break  # `token` is not reachable by merges (tiktoken never produces it); nothing more to keep
        parts[best:best + 2] = [merged]
        made.add(merged)
    return made


def _one_character(token: bytes) -> bool:
    """A byte, one multi-byte character ("é") or a part of one: its pieces would be bytes, no better
    learnt than it."""
    try:
        return len(token.decode("utf-8")) <= 1
    except UnicodeDecodeError:
        return True


def untrained_token_ids(tok: TiktokenTokenizer, target_counts: Mapping[int, int], context_counts: Mapping[int, int],
                        names: Iterable[str], *, min_count: int, max_context: int) -> list[int]:
    """BPE ids of `tok` that spell one of `names` and that the policy wrote fewer than `min_count` times
    in its training data (as a target: a token it never had to write is one it cannot copy), unless it
    read them at least `max_context` times (a document word such as " Area": changing how the
    documents are spelled would cost more) or another kept token is merged through them. Repeated until
    the names' new spellings hold no such token. Single bytes and single characters are always kept."""
    names = list(names)
    ranks = tok.mergeable_ranks
    removed: set[int] = set()
    for _ in range(20):  # each round can only expose the pieces of what the last one removed
        pruned = TiktokenTokenizer(ranks, tok.special, eos_id=tok.eos_id, never_encode=removed)
        cand = {i for n in names for text in (n, " " + n) for i in pruned.encode(text)} | removed
        keep = {t for t, r in ranks.items()
                if _one_character(t) or r not in cand or target_counts.get(r, 0) >= min_count
                or context_counts.get(r, 0) >= max_context}
        for t in list(keep):
            keep |= merge_path(t, ranks)
        now = {r for t, r in ranks.items() if t not in keep}
        if now == removed:
            break
        removed = now
    return sorted(removed)


def entity_names() -> set[str]:
    """Every name a WideGeo / DeepGeo task can ask the policy to copy: countries, capitals, cities,
    currencies, languages and continents."""
    from planner.envs.geodata import CONTINENT_NAMES, language_name, load_geodata

    data = load_geodata()
    names = set(CONTINENT_NAMES.values()) | {c.name for c in data.cities.values()}
    for c in data.countries.values():
        names |= {c.name, c.capital, c.currency_name, *(language_name(code) for code in c.languages)}
        names |= set(data.country_aliases(c.iso))
    return {n for n in names if n}




def encoding_changes(before: TiktokenTokenizer, after: TiktokenTokenizer, texts: Iterable[str]) -> int:
    """How many of `texts` the two tokenizers encode differently."""
    return sum(1 for t in texts if before.encode(t, allow_special=True) != after.encode(t, allow_special=True))


def training_texts_and_counts(checkpoint: Path, synth_workers: int
                              ) -> tuple[list[str], collections.Counter[int], collections.Counter[int]]:
    """Rebuild the checkpoint's own SFT data (policy.json's config); count each token as a target
    (written) and anywhere (read or written)."""
    from planner.sft import SFTConfig, build_data

    info = json.loads((checkpoint / "policy.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer comes from the checkpoint: nothing is written
        cfg = SFTConfig.model_validate({**info["config"], "init_from": str(checkpoint),
                                        "synth_workers": synth_workers, "out": tmp})
        data, tok = build_data(cfg, 1 << 30, Path(tmp))
    counts: collections.Counter[int] = collections.Counter()
    context: collections.Counter[int] = collections.Counter()
    for e in data.train:
        counts.update(i for i, m in zip(e.ids, e.mask) if m)
        context.update(e.ids)
    # The renamed held-out conversations are the training distribution (the plain ones name train-split
    # countries, which are exactly what should encode differently).
    texts = [tok.decode(e.ids) for e in data.eval_fake]
    return texts, counts, context


def write_never_encode(checkpoint: Path, ids: list[int]) -> None:
    path = checkpoint / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    cfg[NEVER_ENCODE_KEY] = ids
    path.write_text(json.dumps(cfg, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m planner.untrained_tokens", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a policy trained by planner.sft (has policy.json)")
    ap.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT,
                    help="tokens written fewer times than this in the training data are candidates")
    ap.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT,
                    help="... unless read at least this many times")
    ap.add_argument("--synth-workers", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="report, write nothing")
    args = ap.parse_args(argv)
    ck: Path = args.checkpoint
    if not (ck / "policy.json").is_file() or not (ck / "tiktoken.model").is_file():
        print(f"error: {ck} has no policy.json and tiktoken.model (not a planner.sft checkpoint with a BPE)",
              file=sys.stderr)
        return 2
    full = TiktokenTokenizer.from_dir(ck)
    if full.never_encode:  # the counts must come from the spelling the policy was trained with
        print(f"error: {ck}/tokenizer_config.json already has {NEVER_ENCODE_KEY}; remove it to recompute",
              file=sys.stderr)
        return 2
    texts, counts, context = training_texts_and_counts(ck, args.synth_workers)
    ids = untrained_token_ids(full, counts, context, entity_names(), min_count=args.min_count,
                              max_context=args.max_context)
    pruned = TiktokenTokenizer(full.mergeable_ranks, full.special, eos_id=full.eos_id, never_encode=ids)
    changed = encoding_changes(full, pruned, texts)
    names = [full.decode([i]) for i in ids[:40]]
    print(f"{len(ids)} of {len(full.mergeable_ranks) - 256} merged tokens spell entity names, were written fewer "
          f"than {args.min_count} time(s) and read fewer than {args.max_context} times in the training data, and "
          f"build no kept token; e.g. {names}")
    print(f"held-out training-distribution conversations encoded differently: {changed} of {len(texts)}")
    if not args.dry_run:
        write_never_encode(ck, ids)
        print(f"wrote {NEVER_ENCODE_KEY} ({len(ids)} ids) to {ck / 'tokenizer_config.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
