"""planner.untrained_tokens: which BPE tokens a policy never learnt to write, and the closure that keeps
the training distribution's own spelling unchanged."""

from __future__ import annotations

from model_shards.tokenizer import TiktokenTokenizer
from planner.untrained_tokens import encoding_changes, merge_path, untrained_token_ids
from tests.test_tokenizer import CORPUS, train_bpe

SPECIALS = {"<|im_end|>": 10_000}
# The toy BPE splits on spaces only; without the periods its tokens are ones tiktoken's regex can produce.
WORDS = CORPUS.replace(".", "")


def _tok(never: set[int] | None = None) -> TiktokenTokenizer:
    return TiktokenTokenizer(train_bpe(WORDS, 80), SPECIALS, never_encode=never or ())


def test_merge_path_lists_every_intermediate_token() -> None:
    tok = _tok()
    ranks = tok.mergeable_ranks
    (whole,) = [t for t, r in ranks.items() if t == b" capital"]
    path = merge_path(whole, ranks)
    assert whole in path and all(t in ranks for t in path)
    assert all(len(t) > 1 for t in path)  # merges only, never the bytes themselves
    # byte-pair encoding the word alone with only these merges allowed yields the whole token
    allowed = {t: r for t, r in ranks.items() if len(t) == 1 or t in path}
    assert TiktokenTokenizer(allowed, SPECIALS).encode(" capital") == [ranks[whole]]


def test_untrained_tokens_are_the_rarely_written_pieces_of_names() -> None:
    tok = _tok()
    ranks = tok.mergeable_ranks
    names = ["paris", "tokyo", "france"]
    paris_ids = set(tok.encode(" paris")) | set(tok.encode("paris"))
    # The policy wrote every token often except those spelling " paris" / "paris"; it read " france" a lot.
    targets = {r: 100 for r in ranks.values() if r not in paris_ids}
    context = {i: 50_000 for i in tok.encode(" france")}
    removed = untrained_token_ids(tok, targets, context, names, min_count=20, max_context=10_000)
    assert ranks[b" paris"] in removed
    pruned = _tok(set(removed))
    by_id = {r: t for t, r in ranks.items()}
    kept_through = {t for r, t in by_id.items() if r not in removed for t in merge_path(t, ranks)}
    for text in (" paris", "paris"):
        for i in pruned.encode(text):
            # every piece the name is now spelled with was written often, is a byte, or builds a kept token
            assert targets.get(i, 0) >= 20 or len(by_id[i]) == 1 or by_id[i] in kept_through
    assert pruned.decode(pruned.encode(" paris")) == " paris"
    assert pruned.encode(" france") == tok.encode(" france")  # read often: kept even if rarely written
    # text that does not name paris is spelled exactly as before
    assert encoding_changes(tok, pruned, ["the capital of japan is tokyo", "agents search the table"]) == 0
    assert encoding_changes(tok, pruned, ["the population of paris is large"]) == 1


def test_nothing_is_removed_when_every_name_token_was_written() -> None:
    tok = _tok()
    targets = {r: 1_000 for r in tok.mergeable_ranks.values()}
    assert untrained_token_ids(tok, targets, {}, ["paris", "tokyo"], min_count=20, max_context=10_000) == []
