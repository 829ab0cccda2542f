"""sample(): greedy, seeds, top-k / top-p nucleus, allowed masks and the behaviour logprob."""

from __future__ import annotations

import pytest
import torch

from model_shards.engine_api import SamplingParams
from model_shards.sampling import make_generator, sample


def test_greedy_is_argmax_with_unscaled_logprob() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    tokens, lps = sample(logits, [SamplingParams(temperature=0.0)] * 5)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(lps, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1))


def test_same_seed_same_tokens_different_seed_differs() -> None:
    logits = torch.zeros(1, 1000)  # uniform: every draw is pure randomness
    def run(seed: int) -> list[int]:
        g = make_generator(seed)
        return [int(sample(logits, [SamplingParams(seed=seed)], [g])[0][0]) for _ in range(20)]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_seeded_row_is_independent_of_batch_neighbours() -> None:
    logits = torch.randn(3, 200)
    p = SamplingParams(temperature=1.0)
    alone = sample(logits[1:2], [p], [make_generator(5)])[0]
    batched = sample(logits, [p, p, p], [None, make_generator(5), make_generator(99)])[0]
    assert int(batched[1]) == int(alone[0])


def test_top_k_never_leaves_the_k_best() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    k = 5
    best = logits.topk(k, dim=-1).indices
    g = [make_generator(i) for i in range(4)]
    for _ in range(60):
        tokens, _ = sample(logits, [SamplingParams(temperature=2.0, top_k=k)] * 4, g)
        assert all(int(tokens[r]) in best[r].tolist() for r in range(4))


def test_top_p_never_leaves_the_nucleus_and_keeps_top_token() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = make_generator(0)
    seen = set()
    for _ in range(300):
        t, _ = sample(logits, [SamplingParams(top_p=0.8)], [g])
        seen.add(int(t[0]))
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are outside the nucleus
    for _ in range(50):  # a tiny top_p still keeps the single best token
        assert int(sample(logits, [SamplingParams(top_p=0.01)], [g])[0][0]) == 0


def test_logprob_is_before_truncation_and_uses_temperature() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    t = 0.7
    tokens, lps = sample(logits, [SamplingParams(temperature=t, top_k=1)], [make_generator(3)])
    assert int(tokens[0]) == 0
    expected = torch.log_softmax(logits / t, -1)[0, 0]
    assert float(lps[0]) == pytest.approx(float(expected), abs=1e-6)
    assert float(lps[0]) < 0  # not the truncated distribution's log(1) = 0


def test_mask_is_respected() -> None:
    logits = torch.randn(2, 64)
    logits[:, 0] = 100.0  # the mask must win over a dominant token
    allowed = torch.zeros(2, 64, dtype=torch.bool)
    allowed[0, [3, 9]] = True
    allowed[1, 40:50] = True
    g = [make_generator(1), make_generator(2)]
    for _ in range(100):
        tokens, _ = sample(logits, [SamplingParams(), SamplingParams(temperature=0.0)], g, allowed)
        assert int(tokens[0]) in (3, 9)
        assert 40 <= int(tokens[1]) < 50
    assert int(tokens[1]) == int(logits[1, 40:50].argmax()) + 40


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="2 SamplingParams for 3 rows"):
        sample(torch.zeros(3, 5), [SamplingParams()] * 2)
    with pytest.raises(ValueError, match=r"rows \[1\] have no allowed token"):
        allowed = torch.ones(2, 5, dtype=torch.bool)
        allowed[1] = False
        sample(torch.zeros(2, 5), [SamplingParams()] * 2, None, allowed)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
