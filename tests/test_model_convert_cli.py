"""`swarm model quantize` / `swarm model dequantize` on a real checkpoint directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from model_shards.checkpoint import list_checkpoint_files, load_checkpoint, save_checkpoint
from model_shards.config import ModelConfig
from model_shards.model import KimiK2ForCausalLM
from swarm.cli import app

IDS = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))


def test_quantize_then_dequantize_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    save_checkpoint(KimiK2ForCausalLM(cfg), cfg, tmp_path / "full")
    runner = CliRunner()

    r = runner.invoke(app, ["model", "quantize", str(tmp_path / "full"), str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'q'}" in r.output.replace("\n", "")
    q_cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert q_cfg["quantization_config"]["quant_method"] == "compressed-tensors"

    # DST must be new: an operator's existing directory is never written over.
    before = sorted(p.name for p in (tmp_path / "q").iterdir())
    r = runner.invoke(app, ["model", "quantize", str(tmp_path / "full"), str(tmp_path / "q")])
    assert r.exit_code == 2 and "not empty" in r.output
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == before
    r = runner.invoke(app, ["model", "quantize", str(tmp_path / "q"), str(tmp_path / "qq")])
    assert r.exit_code == 2 and "already an INT4 checkpoint" in r.output
    r = runner.invoke(app, ["model", "quantize", str(tmp_path / "nowhere"), str(tmp_path / "x")])
    assert r.exit_code == 2 and "no config.json" in r.output

    r = runner.invoke(app, ["model", "dequantize", str(tmp_path / "q"), str(tmp_path / "back"), "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    _, back = load_checkpoint(tmp_path / "back")
    _, q = load_checkpoint(tmp_path / "q")
    q.int4_exact = True
    with safe_open(str(list_checkpoint_files(tmp_path / "back")[0]), framework="pt") as f:
        assert f.get_slice("model.layers.1.mlp.experts.0.up_proj.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_dtype() == "F32"  # only experts were INT4
    with torch.no_grad():
        rel = (back.forward_logits(IDS) - q.forward_logits(IDS)).norm() / q.forward_logits(IDS).norm()
    assert rel.item() < 1e-2  # bf16 copies of the INT4 weights
    r = runner.invoke(app, ["model", "dequantize", str(tmp_path / "q"), str(tmp_path / "b2"), "--dtype", "int8"])
    assert r.exit_code == 2 and "--dtype" in r.output


def test_int4_exact_switch_reaches_the_model_and_is_refused_where_it_means_nothing(tmp_path) -> None:
    from model_shards.model_runner import RunnerSpec, build_model

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    save_checkpoint(KimiK2ForCausalLM(cfg), cfg, tmp_path / "full")
    runner = CliRunner()
    assert runner.invoke(app, ["model", "quantize", str(tmp_path / "full"), str(tmp_path / "q")]).exit_code == 0
    _, exact = build_model(RunnerSpec(checkpoint=str(tmp_path / "q"), num_slots=1, max_len=8, int4_exact=True))
    _, packed = build_model(RunnerSpec(checkpoint=str(tmp_path / "q"), num_slots=1, max_len=8))
    assert exact.int4_exact is True and packed.int4_exact is False
    with pytest.raises(ValueError, match="full-precision experts"):
        build_model(RunnerSpec(checkpoint=str(tmp_path / "full"), num_slots=1, max_len=8, int4_exact=True))
    with pytest.raises(ValueError, match="applies to INT4 checkpoints"):
        RunnerSpec(preset="tiny", int4_exact=True)
    r = runner.invoke(app, ["model", "serve", "--checkpoint", str(tmp_path / "full"), "--int4-exact", "--no-ray"])
    assert r.exit_code == 2 and "full-precision experts" in r.output
    r = runner.invoke(app, ["model", "serve", "--preset", "tiny", "--int4-exact", "--no-ray"])
    assert r.exit_code == 2 and "--int4-exact applies to INT4 checkpoints" in r.output
