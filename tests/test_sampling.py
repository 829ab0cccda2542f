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


def test_draws_at_evenly_spaced_uniforms_reproduce_the_distribution() -> None:
    """The token is where the row's uniform falls in its cumulative distribution: N evenly spaced draws
    give every token its share of N to within one (a wrong cumulative sum or offset would not)."""
    from model_shards.sampling import SampleSpec, sample_rows

    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, -3.0, 1.0]])
    temp, n = 0.7, 20_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    spec = SampleSpec.build(list(range(n)), [SamplingParams(temperature=temp)] * n, u)
    tokens, lps = sample_rows(logits.expand(n, -1), spec)
    want = torch.softmax(logits[0] / temp, -1).double() * n
    counts = torch.bincount(tokens, minlength=6).double()
    assert (counts - want).abs().max() <= 1.0, (counts, want)
    assert torch.allclose(lps, torch.log_softmax(logits[0] / temp, -1)[tokens])


def test_a_draw_next_to_one_never_picks_a_masked_or_truncated_token() -> None:
    from model_shards.sampling import SampleSpec, sample_rows

    logits = torch.zeros(2, 50)
    allowed = torch.zeros(2, 50, dtype=torch.bool)
    allowed[:, 10:20] = True
    u = torch.tensor([torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)),
                      0.0], dtype=torch.float64)
    spec = SampleSpec.build([0, 1], [SamplingParams(temperature=1.0)] * 2, u, allowed)
    tokens, _ = sample_rows(logits, spec)
    assert tokens.tolist() == [19, 10]  # the last and the first allowed token
    spec = SampleSpec.build([0, 1], [SamplingParams(temperature=1.0, top_k=3)] * 2, u)
    logits = torch.arange(50.0).repeat(2, 1)
    tokens, _ = sample_rows(logits, spec)
    assert set(tokens.tolist()) <= {47, 48, 49}
    # u * total can round up to total; u = 1 is that edge: still the last allowed token, never one past it
    spec = SampleSpec.build([0], [SamplingParams(temperature=1.0)], torch.ones(1, dtype=torch.float64), allowed[:1])
    assert sample_rows(torch.zeros(1, 50), spec)[0].tolist() == [19]


def test_sampling_spec_survives_pickling_with_its_mask() -> None:
    """A step's sampling settings travel to the shards: pickled (mask as bits), they come back equal."""
    import pickle

    from model_shards.sampling import SampleSpec

    allowed = torch.rand(3, 77) > 0.5
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=5), SamplingParams(top_p=0.9)]
    spec = SampleSpec.build([4, 0, 2], params, torch.rand(3, dtype=torch.float64), allowed)
    back = pickle.loads(pickle.dumps(spec))
    for name in ("rows", "temperature", "top_k", "top_p", "uniform", "allowed"):
        assert torch.equal(getattr(back, name), getattr(spec, name)), name
        assert getattr(back, name).dtype == getattr(spec, name).dtype, name
    assert pickle.loads(pickle.dumps(SampleSpec.build([1], params[:1], torch.zeros(1)))).allowed is None


def test_seeded_draws_depend_on_seed_and_index_only() -> None:
    from model_shards.sampling import seeded_uniform

    draws = [seeded_uniform(7, i) for i in range(50)]
    assert draws == [seeded_uniform(7, i) for i in range(50)]  # no hidden state: a resumed request redraws the same
    assert len(set(draws)) == 50 and all(0.0 <= d < 1.0 for d in draws)
    assert draws != [seeded_uniform(8, i) for i in range(50)]
    assert 0.35 < sum(draws) / 50 < 0.65
