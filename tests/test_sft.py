"""SFT trainer on the `tiny` preset: the loss falls, the checkpoint loads back with identical logits,
and a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import pytest
import torch

from model_shards.checkpoint import load_checkpoint
from model_shards.config import ModelConfig
from model_shards.model import KimiK2ForCausalLM
from model_shards.tokenizer import ByteTokenizer
from planner.envs import get_env
import planner.sft
from planner.sft import (
    DATA_FILE,
    LOG_FILE,
    POLICY_FILE,
    STATE_FILE,
    SFTConfig,
    SFTData,
    build_data,
    collate,
    lr_at,
    make_batches,
    masked_lm_loss,
    _argv_of,
    parse_args,
    resolve_device,
    train,
)
from planner.traces import encode_conversation, synthesize

SUFFIX = 320  # keep examples short so that CPU steps are quick; the suffix holds assistant tokens


@pytest.fixture(scope="module")
def data() -> SFTData:
    env = get_env("widegeo")
    traces, report = synthesize(env, env.tasks("train", 4, seed=11))
    tok = ByteTokenizer()
    examples = [encode_conversation(c, tok) for tr in traces for c in tr.conversations if c.kind in ("orchestrator_plan", "subagent")]
    short = [replace(e, ids=e.ids[-SUFFIX:], mask=e.mask[-SUFFIX:]) for e in examples]
    short = [e for e in short if sum(e.mask) > 20]
    assert len(short) >= 8
    return SFTData(train=short[:-3], eval=short[-3:], report={"train": report.as_dict()})


def _cfg(out, steps: int) -> SFTConfig:
    return SFTConfig(preset="tiny", out=str(out), steps=steps, seed=3, batch_tokens=4 * SUFFIX, lr=1e-2, warmup=1,
                     eval_every=3, save_every=100, threads=2)


def test_loss_falls_and_checkpoint_round_trips(tmp_path, data):
    out = tmp_path / "run"
    res = train(_cfg(out, 6), data=data)
    assert res.steps == 6
    assert res.last_loss < res.first_loss
    assert [s for s, _ in res.eval_losses] == [3, 6]
    assert res.eval_losses[-1][1] < res.eval_losses[0][1]
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert log[0]["event"] == "start" and [r["step"] for r in log[1:]] == [1, 2, 3, 4, 5, 6]
    assert "eval_loss" in log[3] and "eval_loss" in log[6]
    assert all(0.0 <= log[i]["eval_accuracy"] <= 1.0 for i in (3, 6))
    policy = json.loads((out / POLICY_FILE).read_text())
    assert policy["tokenizer"] == "byte:512" and policy["step"] == 6
    assert policy["command"].startswith("python -m planner.sft --preset tiny")

    # The HF checkpoint holds exactly the trained weights: same logits as the training state.
    trained = KimiK2ForCausalLM(ModelConfig.preset("tiny"), dtype=torch.float32)
    trained.load_state_dict(torch.load(out / STATE_FILE, weights_only=False)["model"])
    _, loaded = load_checkpoint(out)
    ids = torch.tensor([data.eval[0].ids])
    with torch.no_grad():
        assert torch.equal(trained.forward_logits(ids), loaded.forward_logits(ids))
        fresh = KimiK2ForCausalLM(ModelConfig.preset("tiny"), dtype=torch.float32)
        assert not torch.equal(fresh.forward_logits(ids), loaded.forward_logits(ids))


def test_resume_matches_an_uninterrupted_run(tmp_path, data):
    whole = train(_cfg(tmp_path / "whole", 4), data=data)
    train(_cfg(tmp_path / "split", 2), data=data)
    # A run killed after the last save has logged steps that resuming runs again: they are dropped.
    with (tmp_path / "split" / LOG_FILE).open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    resumed = train(_cfg(tmp_path / "split", 4), resume=True, data=data)
    assert resumed.steps == 4 and resumed.last_loss == whole.last_loss
    steps = [json.loads(line).get("step") for line in (tmp_path / "split" / LOG_FILE).read_text().splitlines()]
    assert steps == [None, 1, 2, 3, 4]
    a = torch.load(tmp_path / "whole" / STATE_FILE, weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / STATE_FILE, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="different configuration"):
        train(_cfg(tmp_path / "split", 5).model_copy(update={"lr": 0.5}), resume=True, data=data)
    # --stop-after ends a run early on the full run's schedule; resuming it gives the same weights.
    stopped = train(_cfg(tmp_path / "stopped", 4), data=data, stop_after=1)
    assert stopped.steps == 1 and torch.load(tmp_path / "stopped" / STATE_FILE, weights_only=False)["step"] == 1
    with pytest.raises(ValueError, match="--stop-after must be >= 1"):
        train(_cfg(tmp_path / "never", 4), data=data, stop_after=0)
    assert train(_cfg(tmp_path / "stopped", 4), resume=True, data=data).last_loss == whole.last_loss
    # A state written before an option existed resumes when the option is at its default.
    state = torch.load(tmp_path / "stopped" / STATE_FILE, weights_only=False)
    del state["config"]["copy_mix_length"]
    torch.save(state, tmp_path / "stopped" / STATE_FILE)
    assert train(_cfg(tmp_path / "stopped", 5), resume=True, data=data).steps == 5


def test_masked_loss_ignores_unmasked_targets():
    torch.manual_seed(0)
    model = KimiK2ForCausalLM(ModelConfig.preset("tiny"), dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 12))
    mask = torch.zeros(1, 12)
    mask[0, 8:] = 1
    loss, n = masked_lm_loss(model, ids, mask)
    assert n == 4
    # Only targets 8..11 (predicted from positions 7..10) count.
    with torch.no_grad():
        logits = model.forward_logits(ids)[0]
    expected = torch.nn.functional.cross_entropy(logits[7:11], ids[0, 8:12])
    assert torch.isclose(loss.detach(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="no assistant tokens"):
        masked_lm_loss(model, ids, torch.zeros(1, 12))


def test_schedule_batches_and_cli(tmp_path, data):
    cfg = SFTConfig(out=str(tmp_path), steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    batches = make_batches(data.train, 3 * SUFFIX, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(data.train)))
    assert all(len(b) * max(len(data.train[i]) for i in b) <= 3 * SUFFIX for b in batches)
    assert batches == make_batches(data.train, 3 * SUFFIX, seed=1, epoch=0)
    assert batches != make_batches(data.train, 3 * SUFFIX, seed=1, epoch=1)
    ids, mask, valid = collate([data.train[0], data.train[1]], pad_id=270)
    assert ids.shape == mask.shape == valid.shape and mask.sum() == sum(data.train[0].mask) + sum(data.train[1].mask)
    assert valid.sum() == len(data.train[0]) + len(data.train[1])
    parsed, resume, stop = parse_args(["--preset", "tiny", "--out", str(tmp_path), "--steps", "7", "--kinds", "subagent",
                                       "--resume", "--stop-after", "3"])
    assert parsed.steps == 7 and parsed.kinds == ["subagent"] and resume and stop == 3
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--kinds", "bogus"])
    # The recorded command (policy.json) parses back to the same config, boolean flags included.
    fake = parse_args(["--out", str(tmp_path), "--fake-entity-copies", "2", "--fake-only", "--fake-names", "places"])[0]
    assert fake.fake_only and fake.fake_names == "places"
    assert parse_args(_argv_of(fake))[0] == fake and parse_args(_argv_of(cfg))[0].fake_only is False


def test_fake_only_trains_on_renamed_copies_alone(tmp_path):
    base = dict(preset="tiny", out=str(tmp_path), train_tasks=3, eval_tasks=2, data_seed=4, kinds=["orchestrator_plan"])
    plain, tok = build_data(SFTConfig(**base), 4096)
    fake, _ = build_data(SFTConfig(**base, fake_entity_copies=2, fake_only=True, fake_names="places"), 4096)
    assert all(e.task_id.endswith("#fake") for e in fake.train) and len(fake.train) == 2 * len(plain.train)
    assert fake.eval == plain.eval and len(fake.eval_fake) == len(plain.eval)  # real and renamed held-out sets
    text = "".join(tok.decode(e.ids) for e in fake.train)
    prompts = [t.prompt for t in get_env("widegeo").tasks("train", 3, 4)]
    assert all(p in "".join(tok.decode(e.ids) for e in plain.train) for p in prompts)
    assert not any(p in text for p in prompts)  # no real train task is left in the training data
    with pytest.raises(ValueError, match="--fake-only needs --fake-entity-copies"):
        build_data(SFTConfig(**base, fake_only=True), 4096)


def test_bfloat16_save_halves_the_checkpoint_and_keeps_the_model(tmp_path, data):
    from planner.sft import save_policy

    torch.manual_seed(0)
    mcfg = ModelConfig.preset("tiny")
    model = KimiK2ForCausalLM(mcfg, dtype=torch.float32)
    for dtype in ("float32", "bfloat16"):
        cfg = SFTConfig(preset="tiny", out=str(tmp_path / dtype), save_dtype=dtype)
        save_policy(model, mcfg, cfg, tmp_path / dtype, step=0, data_report={}, eval_loss=None)
    size = {d: sum(p.stat().st_size for p in (tmp_path / d).glob("*.safetensors")) for d in ("float32", "bfloat16")}
    assert size["bfloat16"] < 0.6 * size["float32"]
    cfg16, loaded = load_checkpoint(tmp_path / "bfloat16")
    assert cfg16.torch_dtype == "bfloat16"
    ids = torch.tensor([data.eval[0].ids[:64]])
    with torch.no_grad():
        ref = model.forward_logits(ids)
        got = loaded.float().forward_logits(ids)
    assert torch.allclose(ref, got, atol=0.1, rtol=0.05)


def test_bpe_run_trains_its_vocabulary_on_train_traces_and_ships_it(tmp_path):
    from model_shards.serve import default_tokenizer
    from model_shards.tokenizer import TiktokenTokenizer, load_tokenizer

    out = tmp_path / "bpe"
    cfg = SFTConfig(preset="tiny", out=str(out), steps=1, seed=0, batch_tokens=2048, max_len=1024, lr=1e-3,
                    warmup=0, train_tasks=8, eval_tasks=1, data_seed=5, kinds=["orchestrator_plan"],
                    tokenizer="bpe:400", context_loss_weight=0.1, threads=2)
    res = train(cfg)
    assert res.steps == 1
    tok = load_tokenizer(out)
    assert isinstance(tok, TiktokenTokenizer) and default_tokenizer(str(out)) == str(out)
    policy = json.loads((out / POLICY_FILE).read_text())
    assert policy["tokenizer"] == "." and policy["data"]["tokenizer"]["spec"] == "bpe:400"
    mcfg, _ = load_checkpoint(out)
    # The embedding covers the trained vocabulary (rounded up to 64), not the preset's byte vocabulary.
    assert mcfg.vocab_size >= tok.vocab_size and mcfg.vocab_size % 64 == 0 and mcfg.vocab_size != 512
    # The vocabulary compresses the traces it was trained on (8 tasks, merges seen >= 20 times).
    from planner.prompts import PLAN_MODE_PROMPT
    assert len(tok.encode(PLAN_MODE_PROMPT)) < 0.9 * len(PLAN_MODE_PROMPT.encode())
    with pytest.raises(ValueError, match="bpe:MERGES"):
        train(cfg.model_copy(update={"tokenizer": "bpe:many", "out": str(tmp_path / "bad")}))

    # A second run starts from this checkpoint (weights and vocabulary) and adds fake-entity copies.
    ft = tmp_path / "ft"
    ft_cfg = cfg.model_copy(update={"out": str(ft), "init_from": str(out), "fake_entity_copies": 1,
                                    "tokenizer": "byte:512", "lr": 1e-9, "steps": 1, "eval_tasks": 4})
    data_ft, _ = build_data(ft_cfg, 1024, tmp_path / "unused")
    assert sum(e.task_id.endswith("#fake") for e in data_ft.train) == sum(not e.task_id.endswith("#fake") for e in data_ft.train)
    # The held-out set gets a renamed twin, scored separately (recall cannot predict it).
    assert data_ft.eval and len(data_ft.eval_fake) == len(data_ft.eval) and all(e.task_id.endswith("#fake") for e in data_ft.eval_fake)
    assert [e.ids for e in data_ft.eval_fake] != [e.ids for e in data_ft.eval]
    train(ft_cfg, data=data_ft)
    last = json.loads((ft / LOG_FILE).read_text().splitlines()[-1])
    assert {"eval_loss", "eval_fake_loss", "eval_fake_accuracy"} <= last.keys()
    assert load_tokenizer(ft).vocab_size == tok.vocab_size and json.loads((ft / POLICY_FILE).read_text())["tokenizer"] == "."
    _, before = load_checkpoint(out)
    _, after = load_checkpoint(ft)
    ids = torch.tensor([data_ft.train[0].ids[:64]])
    with torch.no_grad():  # lr ~ 0: the fine-tune starts exactly at the initial checkpoint's weights
        assert torch.allclose(before.forward_logits(ids), after.forward_logits(ids), atol=1e-3)


def test_context_loss_weight_adds_the_read_tokens(data):
    torch.manual_seed(0)
    model = KimiK2ForCausalLM(ModelConfig.preset("tiny"), dtype=torch.float32)
    ids, mask, valid = collate(data.train[:2], pad_id=270)
    with torch.no_grad():
        plain, n = masked_lm_loss(model, ids, mask)
        weighted, n2 = masked_lm_loss(model, ids, mask, 0.1, valid)
        ctx_only, _ = masked_lm_loss(model, ids, mask, 1.0, valid)
    assert n == n2 and weighted > plain and ctx_only > weighted


def test_eval_accuracy_counts_argmax_hits_on_assistant_tokens(data):
    from planner.sft import evaluate_detail

    torch.manual_seed(0)
    model = KimiK2ForCausalLM(ModelConfig.preset("tiny"), dtype=torch.float32)
    loss, acc = evaluate_detail(model, data.eval, 4 * SUFFIX, 270)
    hits = total = 0
    with torch.no_grad():
        for e in data.eval:  # one example at a time: the batched figure must agree
            ids = torch.tensor([e.ids])
            pred = model.forward_logits(ids)[0, :-1].argmax(-1)
            m = torch.tensor(e.mask[1:], dtype=torch.bool)
            hits += int((pred[m] == ids[0, 1:][m]).sum())
            total += int(m.sum())
    assert acc == pytest.approx(hits / total) and loss > 0


def test_copy_mix_adds_a_copy_loss_that_resumes_identically(tmp_path, data):
    cfg = _cfg(tmp_path / "mix", 3).model_copy(update={"copy_mix_weight": 0.5, "copy_mix_batch": 4})
    mixed = train(cfg, data=data)
    plain = train(_cfg(tmp_path / "plain", 3), data=data)
    log = [json.loads(line) for line in (tmp_path / "mix" / LOG_FILE).read_text().splitlines()][1:]
    assert all(r["copy_loss"] > 0 and 0.0 <= r["copy_accuracy"] <= 1.0 for r in log)
    # The copy batches change the update: the SFT loss of the first step is the same, later ones differ.
    first_plain = json.loads((tmp_path / "plain" / LOG_FILE).read_text().splitlines()[1])
    assert log[0]["loss"] == first_plain["loss"] and mixed.last_loss != plain.last_loss
    # Copy batches come from (seed, step): a resumed run repeats them exactly.
    train(cfg.model_copy(update={"out": str(tmp_path / "split"), "steps": 2}), data=data)
    resumed = train(cfg.model_copy(update={"out": str(tmp_path / "split")}), resume=True, data=data)
    assert resumed.last_loss == mixed.last_loss
    again = [json.loads(line) for line in (tmp_path / "split" / LOG_FILE).read_text().splitlines()][1:]
    assert [r["copy_loss"] for r in again] == [r["copy_loss"] for r in log]


def test_copy_mix_with_long_rows(tmp_path, data):
    short = _cfg(tmp_path / "short", 2).model_copy(update={"copy_mix_weight": 0.5, "copy_mix_batch": 2})
    long_ = short.model_copy(update={"out": str(tmp_path / "long"), "copy_mix_length": 96})
    train(short, data=data)
    train(long_, data=data)
    logs = [[json.loads(line) for line in (tmp_path / d / LOG_FILE).read_text().splitlines()][1:] for d in ("short", "long")]
    assert all(r["copy_loss"] > 0 for log in logs for r in log)
    assert [r["copy_loss"] for r in logs[0]] != [r["copy_loss"] for r in logs[1]]  # other rows, other loss
    assert parse_args(_argv_of(long_))[0].copy_mix_length == 96


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")
    cfg, _, _ = parse_args(["--out", "x", "--device", "cpu", "--synth-workers", "3"])
    assert cfg.device == "cpu" and cfg.synth_workers == 3
    # Where it ran and how many processes built the data are not part of the recipe.
    assert "--synth-workers" not in _argv_of(cfg) and "--device" in _argv_of(cfg)


def test_encoded_data_is_built_once_and_reused_where_the_recipe_matches(tmp_path, monkeypatch):
    # The tiny model reads 1,024 byte tokens: a short plan prompt keeps these plan conversations inside.
    monkeypatch.setattr("planner.traces.PLAN_MODE_PROMPT", "Reply with a JSON plan.")
    cfg = SFTConfig(preset="tiny", out=str(tmp_path / "a"), steps=2, train_tasks=2, eval_tasks=1, data_seed=4,
                    kinds=["orchestrator_plan"], batch_tokens=2048, threads=2)
    train(cfg, stop_after=1)
    built = tmp_path / "a" / DATA_FILE
    assert built.is_file()
    # Carried elsewhere (another output directory, another machine): --build-data-only finds it done.
    carried = tmp_path / "carried.xz"
    carried.write_bytes(built.read_bytes())

    def no_synthesis(*a, **k):
        raise AssertionError("the data was synthesized again")

    with monkeypatch.context() as m:
        m.setattr(planner.sft, "build_data", no_synthesis)
        assert train(cfg, resume=True).steps == 2
        other_dir = cfg.model_copy(update={"out": str(tmp_path / "b"), "data_file": str(carried), "lr": 1e-3})
        assert train(other_dir, stop_after=1).steps == 1
        assert planner.sft.main(["--preset", "tiny", "--out", str(tmp_path / "c"), "--train-tasks", "2", "--eval-tasks", "1",
                                 "--data-seed", "4", "--kinds", "orchestrator_plan", "--data-file", str(carried),
                                 "--build-data-only"]) == 0
        assert not (tmp_path / "c" / STATE_FILE).exists()  # built (found) the data, trained nothing
        # Another recipe does not take the file: it builds its own data.
        with pytest.raises(AssertionError, match="synthesized again"):
            train(other_dir.model_copy(update={"data_seed": 5}), stop_after=1)
    # The stored data is the data: a run on the file equals a run that built it.
    fresh = train(cfg.model_copy(update={"out": str(tmp_path / "d")}), stop_after=1)
    reused = train(cfg.model_copy(update={"out": str(tmp_path / "e"), "data_file": str(carried)}), stop_after=1)
    assert fresh.last_loss == reused.last_loss
    (tmp_path / "junk.xz").write_bytes(b"not data")
    with pytest.raises(ValueError, match="is not an SFT data file"):
        train(cfg.model_copy(update={"data_file": str(tmp_path / "junk.xz")}))


def test_ctrl_c_stops_between_steps_and_saves_a_resumable_state(tmp_path, data, monkeypatch):
    whole = train(_cfg(tmp_path / "whole", 4), data=data)
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_then_ctrl_c(self, *a, **k):
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of step 3
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_ctrl_c)
    cut = train(_cfg(tmp_path / "cut", 4), data=data)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert cut.interrupted and cut.steps == 3
    assert torch.load(tmp_path / "cut" / STATE_FILE, weights_only=False)["step"] == 3
    events = [json.loads(line) for line in (tmp_path / "cut" / LOG_FILE).read_text().splitlines()]
    assert events[-1] == {"event": "interrupted", "step": 3}
    resumed = train(_cfg(tmp_path / "cut", 4), resume=True, data=data)
    assert not resumed.interrupted and resumed.last_loss == whole.last_loss


def test_data_file_round_trips_wide_vocabularies(tmp_path):
    from planner.sft_data import load_data, save_data
    from planner.traces import EncodedExample

    examples = [EncodedExample("subagent", "t1", [1, 70_000, 5], [0, 1, 1]), EncodedExample("aggregate", "t2", [9], [1])]
    save_data(tmp_path / "d.xz", {"k": 1}, {"train": examples}, {"n": 2})
    assert load_data(tmp_path / "d.xz", {"k": 1}) == ({"train": examples}, {"n": 2})
    assert load_data(tmp_path / "d.xz", {"k": 2}) is None
    assert load_data(tmp_path / "missing.xz", {"k": 1}) is None


def test_spaced_names_and_fake_languages_are_part_of_the_data_recipe(tmp_path):
    cfg, _, _ = parse_args(["--out", str(tmp_path), "--fake-entity-copies", "1", "--spaced-names", "--fake-languages"])
    assert cfg.spaced_names and cfg.fake_languages and parse_args(_argv_of(cfg))[0] == cfg
    plain = cfg.model_copy(update={"spaced_names": False, "fake_languages": False})
    assert planner.sft.data_key(cfg) != planner.sft.data_key(plain)
    with pytest.raises(ValueError, match="--fake-languages needs --fake-entity-copies"):
        build_data(SFTConfig(preset="tiny", out=str(tmp_path), train_tasks=1, eval_tasks=0, fake_languages=True), 4096)


def test_twin_names_are_part_of_the_data_recipe_and_need_place_names(tmp_path):
    cfg, _, _ = parse_args(["--out", str(tmp_path), "--fake-entity-copies", "1", "--fake-names", "places+countries",
                            "--twin-names", "0.3"])
    assert cfg.twin_names == 0.3 and parse_args(_argv_of(cfg))[0] == cfg
    assert planner.sft.data_key(cfg) != planner.sft.data_key(cfg.model_copy(update={"twin_names": 0.0}))
    with pytest.raises(ValueError, match="set fake_names to 'places'"):
        parse_args(["--out", str(tmp_path), "--fake-entity-copies", "1", "--twin-names", "0.3"])
    with pytest.raises(ValueError, match="less than 1"):
        parse_args(["--out", str(tmp_path), "--fake-names", "places", "--twin-names", "1"])
    words = parse_args(["--out", str(tmp_path), "--fake-entity-copies", "1", "--fake-names", "places",
                        "--word-names", "0.2"])[0]
    assert words.word_names == 0.2 and parse_args(_argv_of(words))[0] == words
    assert planner.sft.data_key(words) != planner.sft.data_key(words.model_copy(update={"word_names": 0.0}))
    with pytest.raises(ValueError, match="word_names draws real train-split place names"):
        parse_args(["--out", str(tmp_path), "--fake-entity-copies", "1", "--word-names", "0.2"])
    with pytest.raises(ValueError, match="--twin-names needs --fake-entity-copies"):
        build_data(SFTConfig(preset="tiny", out=str(tmp_path), train_tasks=1, eval_tasks=0, fake_names="places",
                             twin_names=0.2), 4096)


def test_repeat_draws_the_examples_of_a_kind_more_often_and_bad_values_are_named():
    from planner.sft import _parse, repeated
    from planner.traces import EncodedExample

    exs = [EncodedExample(kind=k, task_id=str(i), ids=[1, 2], mask=[0, 1]) for i, k in
           enumerate(["subagent", "orchestrator_plan", "subagent"])]
    out = repeated(exs, {"orchestrator_plan": 3})
    assert [e.task_id for e in out] == ["0", "1", "1", "1", "2"]
    assert repeated(exs, {}) == exs
    cfg, *_ = _parse(["--out", "x", "--repeat", "orchestrator_plan=4"])
    assert cfg.repeat == {"orchestrator_plan": 4}
    assert "--repeat orchestrator_plan=4" in " ".join(_argv_of(cfg))
    with pytest.raises(SystemExit):
        _parse(["--out", "x", "--repeat", "plans=4"])
    with pytest.raises(ValueError, match="counts >= 1"):
        SFTConfig(out="x", repeat={"subagent": 0})


def test_serial_plans_cap_every_fan_out_of_a_share_of_the_tasks_and_are_part_of_the_recipe(tmp_path):
    from planner.plan_schema import parse_plan
    from planner.sft import serial_plan_copy
    from planner.traces import Conversation

    plan = ('{"agents": [{"name": "lister", "task": "List them.", "depends_on": []}, {"name": "filler", '
            '"task": "Look them up.", "depends_on": [1], "for_each": 3}, {"name": "cities", "task": '
            '"Cities ranked {start} to {end}.", "depends_on": [], "for_range": "all the 30 by 10"}], "aggregate": "concat"}')
    convs = [Conversation("orchestrator_plan", f"widegeo-train-{i:04d}", "t",
                          [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": plan}]) for i in range(400)]
    serial = [serial_plan_copy(c, 0.75) for c in convs]
    capped = [s for s in serial if s.messages[-1]["content"] != plan]
    assert 0.65 < len(capped) / len(convs) < 0.85  # about the share asked for
    _, filler, cities = parse_plan(capped[0].messages[-1]["content"]).subagents
    assert filler.for_each.max_parallel == 1 and cities.for_range.max_parallel == 1
    assert capped[0].messages[:2] == convs[0].messages[:2]
    # The same task always gets the same form; other kinds and share 0 are left alone.
    assert [serial_plan_copy(c, 0.75).messages for c in convs] == [s.messages for s in serial]
    assert all(serial_plan_copy(c, 0.0) is c for c in convs)
    sub = Conversation("subagent", "widegeo-train-0001", "t", convs[1].messages)
    assert serial_plan_copy(sub, 1.0) is sub
    cfg, _, _ = parse_args(["--out", str(tmp_path), "--serial-plans", "0.75"])
    assert cfg.serial_plans == 0.75 and parse_args(_argv_of(cfg))[0] == cfg
    assert planner.sft.data_key(cfg) != planner.sft.data_key(cfg.model_copy(update={"serial_plans": 0.0}))
