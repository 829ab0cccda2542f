"""bench/engine.py runs as documented (tiny shapes, so CI can afford it): the engine's greedy tokens equal
transformers' on the same checkpoint, full precision and INT4 (exact path, transformers on the
dequantized copy). The GPU form (`--device cuda`) is the same code with the device switched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra", [[], ["--int4", "--int4-exact"]], ids=["fp32", "int4-exact"])
def test_engine_bench_matches_transformers(tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "rows.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), "--preset", "tiny", "--layers", "2", "--experts", "4",
         "--batches", "1", "3", "--tp", "1", "--repeat", "1", "--prompt-len", "8", "--new-tokens", "6",
         "--threads", "1", "--json", str(out), *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(row["system"], row["batch"]) for row in rows] == [
        ("transformers generate", 1), ("model_shards engine", 1), ("transformers generate", 3), ("model_shards engine", 3)]
    for row in rows:
        assert "error" not in row, row
        assert row["decode_tps"] > 0 and row["ttft_s"] > 0 and row["peak_mb"] > 0
    assert [row["same_as_hf"] for row in rows if row["system"] == "model_shards engine"] == ["1/1", "3/3"]
    assert "tiny, 2 layers, 4 experts preset" in r.stdout


def test_engine_bench_rejects_bad_combinations() -> None:
    for args, message in ((["--int4-exact"], "--int4-exact needs --int4"),
                          (["--int4", "--dtype", "bfloat16"], "leave --dtype at float32"),
                          (["--layers", "0"], "--layers must be at least 1")):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "engine.py"), *args],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
