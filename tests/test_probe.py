"""planner.probe: a checkpoint's first sub-agent turn on held-out tasks, in one process."""

from __future__ import annotations

import pytest

from planner.envs import get_env
from planner.envs.widegeo import task_subject
from model_shards.tokenizer import ByteTokenizer
from planner.probe import ProbeResult, fact_token_mask, main, probe, teacher_forced


def test_probe_runs_the_engine_and_checks_the_subject(tiny_ckpt: str, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = get_env("widegeo").eval_set()
    assert task_subject(tasks[5]) == "Botswana" and "Botswana" in tasks[5].prompt
    (res,) = probe(tiny_ckpt, [5], max_tokens=6)
    assert res.task_id == tasks[5].id and res.subject == "Botswana" and res.turn  # the engine generated
    assert res.copied_subject == ("Botswana" in res.turn)
    assert ProbeResult("t", "Botswana", "search Botswana cities").copied_subject
    assert main(["--checkpoint", tiny_ckpt, "--tasks", "99"]) == 2
    assert "outside the eval set" in capsys.readouterr().err


def test_fact_tokens_are_the_ones_inside_names_and_grouped_numbers() -> None:
    tok = ByteTokenizer()
    text = "| Gaborone | 208,411 | BWP 12 |"
    ids = tok.encode(text)
    mask = fact_token_mask(tok, ids, ["Gaborone"])
    marked = "".join(ch for ch, m in zip(text, mask) if m)  # byte tokens: one per character here
    assert marked == "Gaborone208,411"  # the bare "12" is not a fact, the grouped number is


def test_teacher_forced_scores_the_held_out_oracle_traces(tiny_ckpt: str, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny model reads 1,024 byte tokens: a short plan prompt keeps these plan conversations inside.
    monkeypatch.setattr("planner.traces.PLAN_MODE_PROMPT", "Reply with a JSON plan.")
    (score,) = teacher_forced(tiny_ckpt, ["orchestrator_plan"], [25, 29])
    assert score.kind == "orchestrator_plan" and score.conversations >= 1
    # A random tiny model: loss near ln(vocab), accuracy near chance, and some facts to copy.
    assert 4.0 < score.loss < 9.0 and 0.0 <= score.accuracy < 0.2 and score.fact_tokens > 0
    assert 0 < score.first_tokens < score.fact_tokens and 0.0 <= score.first_accuracy <= 1.0
    assert main(["--checkpoint", tiny_ckpt, "--teacher-forced", "--kinds", "orchestrator_plan", "--tasks", "25"]) == 0
    out = capsys.readouterr().out
    assert "orchestrator_plan" in out and "fact acc" in out and "first acc" in out


def test_copy_positions_reports_each_setting(tiny_ckpt: str, capsys: pytest.CaptureFixture[str]) -> None:
    from planner.probe import copy_at_positions

    res = copy_at_positions(tiny_ckpt, ((0, 0), (50, 20)), rows=2, k=6)
    assert [(p, g) for p, g, _ in res] == [(0, 0), (50, 20)] and all(0.0 <= a <= 1.0 for *_, a in res)
    # A random model does not copy: scoring the copy against itself (a wrong offset) would give 1.0.
    assert all(a < 0.5 for *_, a in res)
    assert main(["--checkpoint", tiny_ckpt, "--copy-positions"]) == 0
    assert "copy acc" in capsys.readouterr().out


def test_a_checkpoint_is_scored_on_the_trace_form_it_was_trained_on(tmp_path):
    import json as _json

    from planner.probe import trained_spaced

    assert not trained_spaced(str(tmp_path))  # no policy.json: the plain form
    (tmp_path / "policy.json").write_text(_json.dumps({"config": {"spaced_names": True}}))
    assert trained_spaced(str(tmp_path))
    (tmp_path / "policy.json").write_text(_json.dumps({"config": {"spaced_names": False}}))
    assert not trained_spaced(str(tmp_path))
