"""planner.probe: a checkpoint's first sub-agent turn on held-out tasks, in one process."""

from __future__ import annotations

import pytest

from planner.envs import get_env
from planner.envs.widegeo import task_subject
from planner.probe import ProbeResult, main, probe


def test_probe_runs_the_engine_and_checks_the_subject(tiny_ckpt: str, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = get_env("widegeo").eval_set()
    assert task_subject(tasks[5]) == "Botswana" and "Botswana" in tasks[5].prompt
    (res,) = probe(tiny_ckpt, [5], max_tokens=6)
    assert res.task_id == tasks[5].id and res.subject == "Botswana" and res.turn  # the engine generated
    assert res.copied_subject == ("Botswana" in res.turn)
    assert ProbeResult("t", "Botswana", "search Botswana cities").copied_subject
    assert main(["--checkpoint", tiny_ckpt, "--tasks", "99"]) == 2
    assert "outside the eval set" in capsys.readouterr().err
