"""The local training loop's passes, memory options and knobs (issue 19 item 3, issue 22 items
4 and 6): pass layouts and engines give bitwise-equal numbers on CPU, gradient checkpointing
engages and changes nothing but rounding, schedules / clipping / accumulation / dropout follow
their definitions, and steps.csv, curves.png and TensorBoard record the per-step losses."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from fedlora.cli import main
from fedlora.local import (
    LocalClient,
    TrainOptions,
    decoder_blocks,
    lr_factors,
)
from fedlora.simulate import SimConfig, run
from fedlora.simulate.config import ConfigError


def bert(tiny_bert_dir, **kw) -> SimConfig:
    base = dict(
        clients=3, rounds=2, local_steps=2, batch_size=4, max_length=16, max_test=24, rank=4,
        heads=2, lr=1e-2, model=tiny_bert_dir, target_modules=["query", "value", "dense"],
    )  # fmt: skip
    base.update(kw)
    return SimConfig(**base)


def llm(tiny_llm_dir, **kw) -> SimConfig:
    base = dict(
        task="sft", model=tiny_llm_dir, clients=3, rounds=2, local_steps=2, batch_size=4,
        max_length=48, max_test=8, max_generate=2, max_new_tokens=4, rank=4, lr=1e-2,
        max_train_per_client=16,
    )  # fmt: skip
    base.update(kw)
    return SimConfig(**base)


def _equal_runs(a, b) -> None:
    """The same numbers, bitwise: every global tensor and every metric of every round."""
    assert a.global_state.keys() == b.global_state.keys()
    for k in a.global_state:
        assert torch.equal(a.global_state[k], b.global_state[k]), k
    for ra, rb in zip(a.rounds, b.rounds, strict=True):
        for key, value in ra.items():
            if key in ("seconds",):
                continue
            other = rb[key]
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(other), key
            else:
                assert value == other, key


def _close_states(a, b, rel) -> None:
    for k in a:
        scale = float(a[k].abs().max()) + 1e-8
        assert float((a[k] - b[k]).abs().max()) <= rel * scale, k


# ------------------------------------------------------------------------------------- passes
KNOBS = dict(
    lr_scheduler="cosine", warmup_steps=1, max_grad_norm=0.05, grad_accum=2, lora_dropout=0.1
)  # fmt: skip


@pytest.mark.parametrize(
    "method,budgets,knobs",
    [("fedit", "uniform", {}), ("prelort", "rank=1,2,4", {}), ("hafl", "components=1,2,4", {}),
     ("ravan", "heads=1,2", {}), ("hetlora", "rank=1,2,4;steps=2,3", KNOBS),
     ("prelort", "rank=1,2,4", KNOBS)],
    ids=["fedit", "prelort", "hafl", "ravan", "hetlora-knobs", "prelort-knobs"],
)  # fmt: skip
def test_batched_equals_sequential_bitwise_on_cpu(tiny_bert_dir, method, budgets, knobs):
    """On CPU every client segment is its own pass through the ops the sequential engine runs,
    and gradients, clipping, schedules and AdamW are per slot: the engines agree bit for bit,
    with every knob on (heterogeneous steps: per-client schedules differ within a step)."""
    kw = dict(method=method, budgets=budgets, **knobs)
    seq = run(bert(tiny_bert_dir, engine="sequential", **kw), progress=False)
    bat = run(bert(tiny_bert_dir, engine="batched", **kw), progress=False)
    _equal_runs(seq, bat)


def test_pass_budgets_give_identical_numbers_sft(tiny_llm_dir):
    """SFT on a tiny LLaMA: the automatic budget (CPU: one client per pass), a budget of one
    token (every segment alone, the same ops) and the sequential engine: bitwise equal. A budget
    that joins clients into shared forwards (GPU's layout) agrees up to summation order."""
    auto = run(llm(tiny_llm_dir, budgets="rank=2,4", method="hetlora"), progress=False)
    one = run(
        llm(tiny_llm_dir, budgets="rank=2,4", method="hetlora", max_tokens_per_pass=1),
        progress=False,
    )
    seq = run(
        llm(tiny_llm_dir, budgets="rank=2,4", method="hetlora", engine="sequential"),
        progress=False,
    )
    _equal_runs(auto, one)
    _equal_runs(auto, seq)
    joined = run(
        llm(tiny_llm_dir, budgets="rank=2,4", method="hetlora", max_tokens_per_pass=10**6),
        progress=False,
    )
    _close_states(auto.global_state, joined.global_state, rel=1e-3)
    for ra, rj in zip(auto.rounds, joined.rounds, strict=True):
        assert ra["train_loss"] == pytest.approx(rj["train_loss"], rel=1e-4)


def test_passes_split_a_step_and_accumulate(tiny_llm_dir, monkeypatch):
    """A budget of two clients' tokens runs a three-client step in two passes (counted), each
    client's gradient added before one optimizer step; numbers agree with one joined pass up to
    summation order."""
    import fedlora.local as local_mod

    calls, sizes = [], []
    real = local_mod._run_pass

    def spy(model, loss, units, *a, **k):
        calls.append([u.slot for u in units])
        sizes.append([local_mod._size(u.part, True) for u in units])
        return real(model, loss, units, *a, **k)

    monkeypatch.setattr(local_mod, "_run_pass", spy)
    whole = run(
        llm(tiny_llm_dir, rounds=1, local_steps=1, max_tokens_per_pass=10**6), progress=False
    )
    assert calls == [[0, 1, 2]]
    (r0, w0), (r1, w1), _ = sizes[0]
    calls.clear()
    budget = (r0 + r1) * max(w0, w1)  # clients 0 and 1 fit, client 2 does not
    split = run(
        llm(tiny_llm_dir, rounds=1, local_steps=1, max_tokens_per_pass=budget), progress=False
    )
    assert calls == [[0, 1], [2]]
    _close_states(whole.global_state, split.global_state, rel=1e-3)


def test_gradient_checkpointing_engages_and_agrees(tiny_llm_dir, monkeypatch):
    """With --gradient-checkpointing every decoder block runs twice per training forward (the
    recomputation in the backward pass), and the run's numbers agree with the plain run up to
    rounding (the recomputed forward is the same ops)."""
    plain = run(llm(tiny_llm_dir, rounds=1), progress=False)
    from transformers.models.llama import modeling_llama

    counts = {"n": 0}

    real = modeling_llama.LlamaMLP.forward

    def counted(self, x):
        if torch.is_grad_enabled():
            counts["n"] += 1
        return real(self, x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    run(llm(tiny_llm_dir, rounds=1), progress=False)
    without = counts["n"]
    counts["n"] = 0
    ckpt = run(llm(tiny_llm_dir, rounds=1, gradient_checkpointing=True), progress=False)
    assert without > 0 and counts["n"] == 2 * without
    _close_states(plain.global_state, ckpt.global_state, rel=1e-4)
    for a, b in zip(plain.rounds, ckpt.rounds, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_decoder_blocks_finds_the_layers(tiny_llm_dir):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    assert decoder_blocks(lm) == list(lm.model.layers)


# ------------------------------------------------------------------------------------- knobs
@pytest.mark.parametrize("name", ["linear", "cosine", "constant", "polynomial"])
@pytest.mark.parametrize("steps,warmup", [(7, 2), (5, 0), (1, 0)])
def test_lr_factors_follow_transformers_scheduler(name, steps, warmup):
    """The per-step learning rates are what a real AdamW sees under transformers' scheduler
    (constant with warmup is constant_with_warmup)."""
    from transformers import get_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-3)
    real = name if not (name == "constant" and warmup) else "constant_with_warmup"
    sched = get_scheduler(real, opt, num_warmup_steps=warmup, num_training_steps=steps)
    want = []
    for _ in range(steps):
        want.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(1)
        opt.step()
        sched.step()
    got = lr_factors(TrainOptions(lr_scheduler=name, warmup_steps=warmup), steps, 3e-3)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    ratio = lr_factors(TrainOptions(lr_scheduler=name, warmup_ratio=0.3), steps, 3e-3)
    assert len(ratio) == steps


def test_slot_clipping_equals_torch_clip_grad_norm():
    """Each slot's gradient is clipped by its own norm as clip_grad_norm_ clips that slot's
    tensors alone; an unlisted slot is untouched."""
    from fedlora.layers.lora import LoRALinear
    from fedlora.optim import SlotAdamW

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(5, 3), rank=2, alpha=2.0, num_clients=3)
    opt = SlotAdamW(layer, lr=1e-2)
    grads = {n: torch.randn_like(p) * 3 for n, p in layer.named_parameters() if p.requires_grad}
    for n, p in layer.named_parameters():
        if p.requires_grad:
            p.grad = grads[n].clone()
    norms = opt.clip_grad_norm_(0.5, torch.tensor([True, True, False]))
    for c in (0, 1):
        copies = [torch.nn.Parameter(g[c].clone()) for g in grads.values()]
        for q, g in zip(copies, grads.values(), strict=True):
            q.grad = g[c].clone()
        want = torch.nn.utils.clip_grad_norm_(copies, 0.5)
        assert float(norms[c]) == pytest.approx(float(want), rel=1e-6)
        for (_n, p), q in zip(
            [(n, p) for n, p in layer.named_parameters() if p.requires_grad], copies, strict=True
        ):
            torch.testing.assert_close(p.grad[c], q.grad, rtol=1e-6, atol=0)
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad[2], grads[n][2])


def test_grad_accum_matches_one_batch(tiny_bert_dir):
    """Two micro-batches of 2 give the gradient of one batch of 4 (the classification loss is a
    mean over examples): the same training up to summation order."""
    one = run(bert(tiny_bert_dir, rounds=1), progress=False)
    two = run(bert(tiny_bert_dir, rounds=1, grad_accum=2), progress=False)
    _close_states(one.global_state, two.global_state, rel=1e-4)


def test_lora_dropout_is_on_the_adapter_input_and_seeded():
    """Dropout drops adapter inputs only (the base sees x), in training mode only, and the same
    seed gives the same mask."""
    from fedlora.layers.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 4), rank=2, alpha=2.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 6)
    layer.lora_dropout = 0.5
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.adapter_output(x))
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    want = layer.base_layer(x) + layer.adapter_output(x * mask)
    torch.testing.assert_close(y, want)
    torch.manual_seed(3)
    assert torch.equal(layer(x), y)


def test_lora_dropout_runs_are_deterministic_and_differ(tiny_bert_dir):
    a = run(bert(tiny_bert_dir, rounds=1, lora_dropout=0.3), progress=False)
    b = run(bert(tiny_bert_dir, rounds=1, lora_dropout=0.3), progress=False)
    c = run(bert(tiny_bert_dir, rounds=1), progress=False)
    _equal_runs(a, b)
    assert any(not torch.equal(a.global_state[k], c.global_state[k]) for k in a.global_state)


def test_local_client_takes_the_knobs(tiny_bert_dir):
    """LocalClient: knobs in the constructor, overridable per call; unknown or bad ones refused
    naming the knob."""
    from fedlora.simulate.tasks import get_task

    with pytest.raises(TypeError, match="unknown training option"):
        LocalClient("fedit", torch.nn.Linear(2, 2), loss=lambda m, b: b, lr=1.0, clip=1.0)
    with pytest.raises(ValueError, match="lr_scheduler"):
        LocalClient("fedit", torch.nn.Linear(2, 2), loss=lambda m, b: b, lr=1.0, lr_scheduler="x")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainOptions(grad_accum=0).check()
    with pytest.raises(ValueError, match="lora_dropout"):
        TrainOptions(lora_dropout=1.0).check()
    assert get_task("classify") is not None


# ------------------------------------------------------------------------------------- logs
def test_steps_csv_curves_and_eval_every(tiny_bert_dir, tmp_path, monkeypatch):
    """steps.csv: one line per client and local step, and the round mean per step, equal to
    the losses the clients trained on; curves.png has a train-loss panel; --eval-every 2 of 3
    rounds evaluates rounds 2 and 3 only."""
    import fedlora.simulate.outputs as outputs

    panels = []
    real = outputs.plot_curves
    monkeypatch.setattr(
        outputs, "plot_curves", lambda runs, path, p=(): panels.append(p) or real(runs, path, p)
    )
    cfg = bert(tiny_bert_dir, rounds=3, eval_every=2, budgets="steps=1,2,3")
    result = run(cfg, tmp_path / "run", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "steps.csv")))
    assert rows[0].keys() == {"round", "step", "client", "train_loss"}
    r1 = [r for r in rows if r["round"] == "1"]
    assert [(r["step"], r["client"]) for r in r1] == [
        ("1", "0"), ("1", "1"), ("1", "2"), ("1", "mean"), ("2", "1"), ("2", "2"), ("2", "mean"),
        ("3", "2"), ("3", "mean"),
    ]  # fmt: skip
    row1 = result.rounds[0]
    for r in r1:
        if r["client"] != "mean":
            assert float(r["train_loss"]) == row1["step_losses"][r["client"]][int(r["step"]) - 1]
    mean1 = [float(r["train_loss"]) for r in r1 if r["client"] == "mean"]
    assert mean1[0] == pytest.approx(sum(v[0] for v in row1["step_losses"].values()) / 3)
    # each client's last step loss is what the round's train_loss averages
    assert row1["train_loss"] == pytest.approx(sum(v[-1] for v in row1["step_losses"].values()) / 3)
    assert panels and panels[-1][-1] == outputs.TRAIN_LOSS_PANEL
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    acc = [r["test_accuracy"] for r in result.rounds]
    assert math.isnan(acc[0]) and not math.isnan(acc[1]) and not math.isnan(acc[2])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["rounds"][0]["step_losses"] == row1["step_losses"]


def test_tensorboard_logs_steps_rounds_and_samples(tiny_llm_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = llm(tiny_llm_dir, rounds=2, report_to="tensorboard")
    result = run(cfg, tmp_path / "run", progress=False)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "train/loss_step" in scalars and "round/rouge_l" in scalars
    assert {"train_client/0", "train_client/1", "train_client/2"} <= set(scalars)
    steps = acc.Scalars("train/loss_step")
    assert [e.step for e in steps] == [1, 2, 3, 4]  # 2 rounds of 2 local steps
    want = sum(v[0] for v in result.rounds[0]["step_losses"].values()) / 3
    assert steps[0].value == pytest.approx(want, rel=1e-6)
    assert [e.step for e in acc.Scalars("round/test_perplexity")] == [0, 1, 2]
    texts = acc.Tags()["tensors"]
    assert any("samples" in t for t in texts)


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "argv,words",
    [(["--lr-scheduler", "nope"], "--lr-scheduler"), (["--grad-accum", "3"], "--grad-accum 3"),
     (["--lora-dropout", "1"], "--lora-dropout"), (["--max-grad-norm", "0"], "--max-grad-norm"),
     (["--warmup-steps", "1", "--warmup-ratio", "0.1"], "--warmup-steps"),
     (["--eval-every", "0"], "--eval-every"), (["--report-to", "wandb"], "--report-to"),
     (["--max-tokens-per-pass", "-1"], "--max-tokens-per-pass"),
     (["--warmup-ratio", "2"], "--warmup-ratio")],
)  # fmt: skip
def test_bad_knobs_exit_2_with_one_line(tmp_path, capsys, argv, words):
    code = main(["simulate", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "o").exists()


def test_new_fields_at_defaults_keep_old_fingerprints():
    """A checkpoint written before the knobs existed (its config JSON lacks them) has the
    fingerprint of today's default config; memory and logging options never enter it."""
    import dataclasses

    new = {
        "lr_scheduler", "warmup_steps", "warmup_ratio", "max_grad_norm", "grad_accum",
        "lora_dropout", "max_tokens_per_pass", "gradient_checkpointing", "eval_every",
        "report_to",
    }  # fmt: skip
    cfg = SimConfig()
    old = {k: v for k, v in cfg.to_json().items() if k not in new}
    assert SimConfig.from_json(old).fingerprint() == cfg.fingerprint()
    for name in new:
        assert name not in json.loads(cfg.fingerprint())
    changed = dataclasses.replace(cfg, max_tokens_per_pass=512, gradient_checkpointing=True)
    assert changed.fingerprint() == cfg.fingerprint()
    assert dataclasses.replace(cfg, grad_accum=2).fingerprint() != cfg.fingerprint()
    with pytest.raises(ConfigError, match="--grad-accum 3 does not divide"):
        SimConfig(grad_accum=3).validate()
