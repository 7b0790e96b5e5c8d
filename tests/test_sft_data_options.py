"""``--task sft`` data options of issue 22 on a tiny random LLaMA: ``--system-prompt`` (in
training, in evaluation, in samples.jsonl), ``--data-columns`` / ``--data-split`` on user files
and Hugging Face datasets, ``--data reasoning_gym:...`` scored by the tasks' verifiers, the
warning for data without categories, and the bad-input refusals (one line, exit code 2, before
anything loads or is written)."""

from __future__ import annotations

import json

import pytest

from fedlora.cli import main
from fedlora.data import to_chat_messages
from fedlora.simulate import SimConfig
from fedlora.simulate import engine as engine_mod
from fedlora.simulate.tasks import sft
from fedlora.simulate.tasks.sft import encode_examples, render

transformers = pytest.importorskip("transformers")

TINY = ["--clients", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "2",
        "--max-length", "64", "--max-test", "4", "--max-generate", "2",
        "--max-new-tokens", "2", "--rank", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
SYSTEM = "You answer with digits only."


def _chat_ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def test_system_prompt_goes_through_the_chat_template(tiny_llm_dir):
    from fedlora.models import load_causal_lm

    _, tok = load_causal_lm(tiny_llm_dir)
    plain = {"instruction": "What is 2 + 3?", "input": "", "output": "5", "category": "a"}
    own = {**plain, "messages": [{"role": "system", "content": "Own."},
                                 {"role": "user", "content": "What is 2 + 3?"}]}  # fmt: skip
    batch, prompts, _, _ = encode_examples(tok, [plain, own], [0, 0], 64, system=SYSTEM)
    with_sys = to_chat_messages(plain, system=SYSTEM, include_response=False)
    assert with_sys[0] == {"role": "system", "content": SYSTEM}
    assert prompts[0] == _chat_ids(tok, with_sys, add_generation_prompt=True)
    # an example with its own system turn keeps it
    assert prompts[1] == _chat_ids(
        tok, to_chat_messages(own, include_response=False), add_generation_prompt=True
    )
    # the system prompt changes what the model is trained on, not the response labels
    base, base_prompts, _, _ = encode_examples(tok, [plain], [0], 64)
    assert len(prompts[0]) > len(base_prompts[0])
    resp = batch.labels[0][batch.labels[0] != -100].tolist()
    assert resp == base.labels[0][base.labels[0] != -100].tolist()
    assert SYSTEM in render(tok, plain, SYSTEM)[0] and SYSTEM not in render(tok, plain)[0]


def test_plain_prompt_without_chat_template_keeps_the_system_text():
    class Tok:
        chat_template = None
        bos_token = "<s>"
        eos_token = "</s>"

    prompt, response = render(Tok(), {"instruction": "Hi?", "input": "", "output": "Yo"}, SYSTEM)
    assert prompt == f"<s>{SYSTEM}\n\n### Instruction:\nHi?\n\n### Response:\n"
    assert response == "Yo</s>"


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("training started before the bad input was refused")

    monkeypatch.setattr(engine_mod, "train_group", refuse)


def _rows(n: int, **extra) -> list[dict]:
    return [
        {"question": f"What is {i} + 1?", "answer": str(i + 1), "topic": f"t{i % 2}", **extra}
        for i in range(n)
    ]


def test_cli_run_with_a_config_file_mapped_columns_and_system_prompt(
    tiny_llm_dir, tmp_path, capsys
):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(24)))
    conf = tmp_path / "run.toml"
    conf.write_text(
        f'task = "sft"\nmodel = "{tiny_llm_dir}"\ndata = "{data}"\n'
        f'system-prompt = "{SYSTEM}"\n'
        'data-columns = { instruction = "question", output = "answer", category = "topic" }\n'
    )
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(conf), "--out", str(out), *TINY]) == 0
    assert "warning" not in capsys.readouterr().err
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(SYSTEM in s["prompt"] for s in samples)
    assert all(s["prompt"].endswith("<|im_start|>assistant\n") for s in samples)
    assert all(s["question"] in s["prompt"] and SYSTEM not in s["question"] for s in samples)
    cfg = SimConfig.from_json(json.loads((out / "metrics.json").read_text())["config"])
    assert cfg.system_prompt == SYSTEM and cfg.data_columns["category"] == "topic"
    # the run folder's config.toml runs the same configuration again
    again = tmp_path / "again"
    argv = ["simulate", "--config", str(out / "config.toml"), "--out", str(again), *TINY]
    assert main(argv) == 0
    assert (again / "metrics.csv").read_text() != ""
    one = json.loads((again / "metrics.json").read_text())["config"]
    assert one == json.loads((out / "metrics.json").read_text())["config"]


def test_data_without_categories_warns_once(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(6)))
    cfg = SimConfig(task="sft", data=str(data), data_columns={"instruction": "question",
                                                              "output": "answer"})  # fmt: skip
    sft.load_data(cfg.validate())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "no example has a category" in err[0]
    assert "size" in err[0]


def _refused(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_data_options_exit_2_before_anything_loads(
    tiny_llm_dir, tmp_path, capsys, monkeypatch, no_training
):
    from fedlora import models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_causal_lm", no_model)
    out = tmp_path / "out"
    base = ["simulate", "--task", "sft", "--model", tiny_llm_dir, "--out", str(out), *TINY]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(6)))
    cases = [
        (["--data-columns", "instruction"], "--data-columns: cannot parse 'instruction'"),
        (["--data-columns", "label=x"], "--data-columns: unknown field 'label'"),
        (["--data", str(data), "--data-columns", "instruction=q,output=answer"],
         "no column 'q' (for instruction)"),
        (["--data", str(data), "--data-split", "train"], "--data-split 'train' applies to "),
        (["--system-prompt", " "], "--system-prompt must be a non-empty string"),
    ]  # fmt: skip
    pytest.importorskip("reasoning_gym")
    cases.append(
        (["--data", "reasoning_gym:gsm_symbolik"], "unknown reasoning-gym task 'gsm_symbolik'")
    )
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(_rows(6)).save_to_disk(str(folder))
    capsys.readouterr()  # the library's progress bar
    cases.append(
        (
            ["--data", str(folder), "--data-columns", "instruction=question,output=reply"],
            "no column 'reply' (for output) named by --data-columns",
        )
    )
    for argv, words in cases:
        err = _refused(capsys, [*base, *argv])
        assert words in err, (argv, err)
        assert "--data" in err or "--system-prompt" in err
        assert not out.exists()
    err = _refused(capsys, ["simulate", "--system-prompt", "Hi"])  # task classify
    assert "--system-prompt applies to --task sft only" in err


def test_reasoning_gym_run_scores_with_the_verifier(tiny_llm_dir, tmp_path, monkeypatch):
    pytest.importorskip("reasoning_gym")
    calls = []
    real = sft.greedy_answers

    def answers_and_record(lm, tok, prompts, n):
        got = real(lm, tok, prompts, n)
        calls.append(len(got))
        return got

    monkeypatch.setattr(sft, "greedy_answers", answers_and_record)
    from fedlora.data import build_reasoning_gym
    from fedlora.simulate.tasks.scoring import score_answers

    seen = []
    real_score = score_answers

    def spy(preds, refs, **kw):
        seen.append(kw.get("scorer"))
        return real_score(preds, refs, **kw)

    monkeypatch.setattr("fedlora.simulate.tasks.scoring.score_answers", spy)
    cfg = SimConfig(task="sft", model=tiny_llm_dir, data="reasoning_gym:chain_sum,letter_counting",
                    clients=2, rounds=1, local_steps=1, batch_size=2, max_length=96,
                    max_test=4, max_generate=2, max_new_tokens=2, rank=2, device="cpu")  # fmt: skip
    res = engine_mod.run(cfg, progress=False, log=lambda s: None)
    assert calls and seen and all(s is not None for s in seen)
    assert 0.0 <= res.rounds[-1]["exact_match"] <= 1.0
    data = build_reasoning_gym("reasoning_gym:chain_sum,letter_counting")
    assert res.data["name"] == data.name
