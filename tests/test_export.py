"""``fedlora export`` and ``fedlora simulate --init-adapter`` (issue 19; fedlora.export).

Every registered method runs one tiny round on a random LLaMA (`fedlora.testing`); its
checkpoint's tensors are then replaced by random ones (a trained adapter after one tiny round is
almost zero, and a wrong scale or a forgotten merged base would hide in it), exported as a PEFT
folder and as a merged transformers folder, and loaded by plain PEFT / transformers in ONE
subprocess that never imports fedlora. Its logits must be as accurate as fedlora's own float32
model against a float64 oracle (the base in float64 plus ``ΔW`` computed from the layer's own
tensors by the formula of DESIGN §2, independently of the export code): the tolerance comes
from the float32 rounding of the same function on this machine (`numerics.assert_as_accurate`),
and the adapter's effect on the logits is checked to be far above it, so the test can fail.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from numerics import assert_as_accurate
from torch import nn

from fedlora import keys
from fedlora.cli import main
from fedlora.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MERGED_BASE_DIR,
    PEFT_PREFIX,
    build_run_model,
    export_run,
    peft_adapter_state,
    read_run,
)
from fedlora.methods import get as get_method
from fedlora.methods import names
from fedlora.simulate import SimConfig, run
from fedlora.simulate.config import ConfigError
from fedlora.simulate.outputs import CKPT, read_checkpoint, write_checkpoint
from fedlora.state_dict import adapter_layers, get_adapter_state_dict

pytest.importorskip("transformers")
pytest.importorskip("peft")

METHODS = names()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sft_cfg(model: str, method: str, **kw) -> SimConfig:
    """About half a second on 2 CPU cores: 3 clients, 1 round of 2 steps, no generation."""
    base = dict(
        task="sft", model=model, method=method, clients=3, rounds=1, local_steps=2,
        batch_size=3, max_length=48, max_test=6, max_generate=0, max_new_tokens=3, rank=4,
        heads=2, lr=5e-2, device="cpu", dtype="float32", budgets="hetero",
    )  # fmt: skip
    base.update(kw)
    return SimConfig(**base)


def quiet_run(cfg: SimConfig, out=None):
    return run(cfg, out, progress=False, log=lambda line: None, plot=False)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    from fedlora.testing import random_causal_lm

    return str(random_causal_lm(tmp_path_factory.mktemp("tiny-llama") / "model"))


def _randomize_checkpoint(out: Path, seed: int) -> None:
    """Replace every tensor of the run's checkpoint by a random one of the same shape (Ravan's
    ``s`` near 1, the changed bases perturbed), keeping its metadata: a checkpoint a long run
    could have written, whose adapter moves the logits far more than rounding does."""
    tensors, meta = read_checkpoint(out / CKPT)
    gen = torch.Generator().manual_seed(seed)
    new = {}
    for k, v in tensors.items():
        noise = torch.randn(v.shape, generator=gen)
        if k.endswith(keys.S_SUFFIX):
            new[k] = 1.0 + 0.5 * noise
        elif k.endswith(".base_layer.weight"):
            new[k] = v + 0.2 * noise
        elif k.endswith(keys.A_SUFFIX):
            new[k] = 0.5 * noise
        else:
            new[k] = 0.5 * noise
    cfg = SimConfig.from_json(meta["config"])
    write_checkpoint(out, cfg, meta["rounds"], new, meta["initial"], meta["resolved"])


def _delta64(layer: nn.Module) -> torch.Tensor:
    """``ΔW`` of slot 0 in float64 from the layer's tensors (DESIGN §2), not from the exporter."""
    if hasattr(layer, "lora_H"):
        A, B = layer.lora_A.double(), layer.lora_B.double()
        H, s = layer.lora_H[0].double(), layer.lora_s[0].double()
        return layer.scale * sum(s[i] * B[i] @ H[i] @ A[i] for i in range(layer.heads))
    mask = layer.rank_mask[0].double()
    A, B = layer.lora_A[0].double(), layer.lora_B[0].double()
    return layer.scale * (B * mask) @ A


def _oracle_and_base(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 logits of the model with its adapters merged exactly, and of its base alone."""
    merged, base = copy.deepcopy(model), copy.deepcopy(model)
    for m, with_delta in ((merged, True), (base, False)):
        for path, layer in list(adapter_layers(m)):
            lin = layer.base_layer
            lin.double()
            if with_delta:
                with torch.no_grad():
                    lin.weight += _delta64(layer)
            parent_path, _, child = path.rpartition(".")
            setattr(m.get_submodule(parent_path), child, lin)
        m.double()
    with torch.no_grad():
        return merged(input_ids=ids).logits, base(input_ids=ids).logits


# a process that never imports fedlora: plain transformers + PEFT, as a user elsewhere would
LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    jobs = json.load(open(sys.argv[1]))
    ids = torch.tensor(jobs["ids"])
    for job in jobs["exports"]:
        if job["format"] == "peft":
            cfg = json.load(open(job["dir"] + "/adapter_config.json"))
            base = AutoModelForCausalLM.from_pretrained(
                cfg["base_model_name_or_path"], dtype=torch.float32, local_files_only=True
            )
            model = PeftModel.from_pretrained(base, job["dir"])
        else:
            model = AutoModelForCausalLM.from_pretrained(
                job["dir"], dtype=torch.float32, local_files_only=True
            )
        model.eval()
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, job["logits"])
    loaded = sorted(m for m in sys.modules if m == "fedlora" or m.startswith("fedlora"))
    assert not loaded, loaded
    print("ok", len(jobs["exports"]))
    """
)


@pytest.fixture(scope="module")
def exports(tiny_lm, tmp_path_factory):
    """Every method: a randomized 1-round run exported both ways, the subprocess's logits of
    each export, and fedlora's own model of the run."""
    root = tmp_path_factory.mktemp("exports")
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(3))
    jobs, runs = [], {}
    for i, method in enumerate(METHODS):
        out = root / f"run-{method}"
        quiet_run(sft_cfg(tiny_lm, method), out)
        _randomize_checkpoint(out, seed=100 + i)
        for fmt in ("peft", "merged"):
            folder = export_run(out, root / f"{method}-{fmt}", fmt, log=lambda line: None)
            jobs.append(
                {"format": fmt, "dir": str(folder), "logits": str(root / f"{method}-{fmt}.pt")}
            )
        runs[method] = out
    spec = root / "jobs.json"
    spec.write_text(json.dumps({"ids": ids.tolist(), "exports": jobs}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, ids, runs


@pytest.mark.parametrize("fmt", ["peft", "merged"])
@pytest.mark.parametrize("method", METHODS)
def test_export_answers_as_fedlora_does(exports, method, fmt):
    root, ids, runs = exports
    model, _ = build_run_model(runs[method])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    oracle, base_only = _oracle_and_base(model, ids)
    got = torch.load(root / f"{method}-{fmt}.pt")
    assert got.shape == plain.shape
    assert_as_accurate(got, plain, oracle, what=f"{method} {fmt} export logits")
    # the adapter (and FLoRA's / FedEx's merged base) moves the logits far beyond rounding
    effect = float((oracle - base_only).abs().max())
    assert effect > 1e3 * float((plain.double() - oracle).abs().max()) + 1e-3, effect


@pytest.mark.parametrize("method", METHODS)
def test_peft_folder_layout(exports, method):
    root, _, runs = exports
    folder = root / f"{method}-peft"
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    from safetensors.torch import load_file

    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    rec = read_run(runs[method]).record
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["q_proj", "v_proj"] == rec["target_modules"]
    r = 2 * 4 if method == "ravan" else 4  # Ravan: heads x rank
    assert config["r"] == r and not config["rank_pattern"] and not config["alpha_pattern"]
    scale = 1.0 if method == "ravan" else 16.0 / 4
    assert config["lora_alpha"] / config["r"] == scale  # PEFT's scaling = fedlora's scale
    assert all(k.startswith(PEFT_PREFIX + "model.layers.") for k in tensors)
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert len(tensors) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    if get_method(method).changes_base:
        assert config["base_model_name_or_path"] == str(folder / MERGED_BASE_DIR)
        assert (folder / MERGED_BASE_DIR / "config.json").is_file()
    else:
        assert config["base_model_name_or_path"] == rec["model_path"]


def test_checkpoint_records_what_export_needs(tiny_lm, tmp_path):
    quiet_run(sft_cfg(tiny_lm, "ravan", target_modules=None), tmp_path / "r")
    rec = read_run(tmp_path / "r").record
    assert rec["model_path"] == str(Path(tiny_lm).resolve())
    assert rec["target_modules"] == ["q_proj", "v_proj"]  # resolved: the family default
    assert (rec["task"], rec["method"], rec["layer"]) == ("sft", "ravan", "ravan")
    assert (rec["rank"], rec["heads"], rec["alpha"], rec["scale"]) == (4, 2, 16.0, 1.0)
    assert rec["dtype"] == "float32" and rec["adapted_modules"] == 4


# ------------------------------------------------------------------------------ --init-adapter
@pytest.mark.parametrize("method", [m for m in METHODS if not get_method(m).changes_base])
def test_export_then_init_adapter_gives_the_same_global(tiny_lm, tmp_path, method):
    """The exported global, loaded by --init-adapter into a fresh run of the same config, is
    the same state (bitwise for LoRA, least-squares exact for Ravan) and evaluates the same."""
    cfg = sft_cfg(tiny_lm, method, rounds=2)
    first = quiet_run(cfg, tmp_path / "a")
    export_run(tmp_path / "a", tmp_path / "peft", log=lambda line: None)
    again = sft_cfg(tiny_lm, method, rounds=1, init_adapter=str(tmp_path / "peft"))
    from fedlora.simulate.tasks import get_task

    rule = get_method(method).client(again.client_options(), [])
    model, _ = get_task("sft").build_model(again, None, 1, rule)
    state = peft_adapter_state(again.init_adapter, model, again, get_adapter_state_dict(model))
    want = read_run(tmp_path / "a").state
    assert state.keys() == want.keys()
    for k in want:
        if method == "ravan":
            torch.testing.assert_close(state[k], want[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(state[k], want[k]), k
    second = quiet_run(again)
    for metric in ("test_loss", "test_perplexity"):
        assert second.initial[metric] == pytest.approx(first.rounds[-1][metric], rel=1e-5)


def test_init_adapter_from_a_lower_rank_peft_adapter(tiny_lm, tmp_path):
    """A PEFT adapter of rank 2 (lora_alpha 3, rslora off) in a --rank 4 run: the same function
    (PEFT's own forward in this process is the reference), the extra components trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    peft_model = get_peft_model(
        base,
        LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "peft")
    cfg = sft_cfg(tiny_lm, "fedit", init_adapter=str(tmp_path / "peft"))
    from fedlora.simulate.tasks import get_task

    rule = get_method("fedit").client(cfg.client_options(), [])
    model, _ = get_task("sft").build_model(cfg, None, 1, rule)
    initial = get_adapter_state_dict(model)
    state = peft_adapter_state(cfg.init_adapter, model, cfg, initial)
    from fedlora.state_dict import set_adapter_state_dict

    set_adapter_state_dict(model, state)
    ids = torch.randint(4, 60, (2, 7))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for path, _ in adapter_layers(model):
        A, B = state[keys.a_key(path)], state[keys.b_key(path)]
        assert torch.equal(A[2:], initial[keys.a_key(path)][2:])  # the run's own init
        assert not B[:, 2:].any() and A[2:].abs().sum() > 0  # adds nothing yet, trains


def _peft_folder(tiny_lm: str, folder: Path, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    options = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    options.update(config)
    get_peft_model(base, LoraConfig(**options)).save_pretrained(folder)
    return folder


def _edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    cfg.update(changes)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    "case, expect",
    [
        ("targets", "adapts other modules"),
        ("base", "trained on base model"),
        ("rank", "above --rank"),
        ("dropout", "lora_dropout"),
        ("bias", "bias="),
        ("ravan", "own frozen bases"),
        ("missing", "does not exist"),
        ("not-peft", "no adapter_config.json"),
    ],
)
def test_init_adapter_refuses_a_mismatching_adapter(tiny_lm, tmp_path, capsys, case, expect):
    folder = tmp_path / "peft"
    method = "fedit"
    if case == "targets":
        _peft_folder(tiny_lm, folder, target_modules=["k_proj", "v_proj"])
    elif case == "base":
        _edit_config(_peft_folder(tiny_lm, folder), base_model_name_or_path="other/model")
    elif case == "rank":
        _peft_folder(tiny_lm, folder, r=8)
    elif case == "dropout":
        _edit_config(_peft_folder(tiny_lm, folder), lora_dropout=0.1)
    elif case == "bias":
        _edit_config(_peft_folder(tiny_lm, folder), bias="all")
    elif case == "ravan":
        _peft_folder(tiny_lm, folder, r=4)
        method = "ravan"
    elif case == "not-peft":
        folder.mkdir()
    out = tmp_path / "out"
    argv = [
        "simulate", "--task", "sft", "--model", tiny_lm, "--method", method, "--clients", "3",
        "--rounds", "1", "--local-steps", "1", "--batch-size", "3", "--max-length", "48",
        "--max-test", "6", "--max-generate", "0", "--rank", "4",
        "--device", "cpu", "--no-progress", "--init-adapter", str(folder), "--out", str(out),
    ]  # fmt: skip
    argv += ["--heads", "2"] if method == "ravan" else []  # a Ravan option (method-owned)
    capsys.readouterr()  # what building the adapter folder printed is not the command's
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedlora: error: --init-adapter") and expect in err[-1], err
    assert len(err) == 1, err
    assert not out.exists()


# ------------------------------------------------------------------------------ bad export input
@pytest.fixture(scope="module")
def fedit_run(tiny_lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fedit") / "run"
    quiet_run(sft_cfg(tiny_lm, "fedit"), out)
    return out


def _other_version(folder: Path) -> Path:
    from safetensors.torch import save_file

    from fedlora.simulate.outputs import CKPT_DIGEST_KEY, CKPT_META_KEY

    folder.mkdir()
    meta = json.dumps({"format": 99, "config": {}, "rounds": []})
    save_file(
        {"x": torch.zeros(1)}, str(folder / CKPT), {CKPT_META_KEY: meta, CKPT_DIGEST_KEY: "0"}
    )
    return folder


@pytest.mark.parametrize(
    "case, expect",
    [
        ("empty-dir", "holds no checkpoint.safetensors"),
        ("missing", "does not exist"),
        ("other-version", "another fedlora version"),
        ("corrupted", "corrupted"),
        ("out-not-empty", "is not empty"),
        ("out-is-file", "is a file"),
        ("out-under-file", "is a file"),
        ("bad-format", "invalid choice"),
        ("classify", "cannot be exported"),
    ],
)
def test_export_refuses_bad_input(fedit_run, tmp_path, capsys, case, expect, request):
    run_dir, out, fmt = fedit_run, tmp_path / "out", "peft"
    if case == "empty-dir":
        run_dir = tmp_path / "empty"
        run_dir.mkdir()
    elif case == "missing":
        run_dir = tmp_path / "nothing"
    elif case == "other-version":
        run_dir = _other_version(tmp_path / "old")
    elif case == "corrupted":
        run_dir = tmp_path / "bad"
        run_dir.mkdir()
        (run_dir / CKPT).write_bytes((fedit_run / CKPT).read_bytes()[:-7])
    elif case == "out-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "out-is-file":
        out.write_text("a file")
    elif case == "out-under-file":
        (tmp_path / "f").write_text("a file")
        out = tmp_path / "f" / "out"
    elif case == "bad-format":
        fmt = "gguf"
    elif case == "classify":
        run_dir = tmp_path / "cls"
        cfg = SimConfig(model=request.getfixturevalue("tiny_bert_dir"), clients=2, rounds=1, local_steps=1, batch_size=2,
                        max_test=4, device="cpu")  # fmt: skip
        quiet_run(cfg, run_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    inside = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    assert main(["export", str(run_dir), "--out", str(out), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside
    if inside is not None:
        assert sorted(p.name for p in out.iterdir()) == inside


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_export_refuses_an_unwritable_out(fedit_run, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["export", str(fedit_run), "--out", str(locked / "out")]) == 2
        assert "not writable" in capsys.readouterr().err
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_export_into_an_empty_folder_and_of_a_resumable_run(tiny_lm, tmp_path):
    cfg = sft_cfg(tiny_lm, "fedit", rounds=1)
    quiet_run(cfg, tmp_path / "run")
    # the same run asked for 3 rounds and stopped after 1: resumable, exported as it is
    tensors, meta = read_checkpoint(tmp_path / "run" / CKPT)
    longer = sft_cfg(tiny_lm, "fedit", rounds=3)
    write_checkpoint(tmp_path / "run", longer, meta["rounds"], tensors, meta["initial"],
                     meta["resolved"])  # fmt: skip
    (tmp_path / "out").mkdir()
    lines = []
    export_run(tmp_path / "run", tmp_path / "out", "merged", log=lines.append)
    assert "round 1/3 (resumable, not finished)" in lines[0]
    assert (tmp_path / "out" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ConfigError, match="--format must be one of"):
        export_run(tmp_path / "run", tmp_path / "o2", "gguf")


@pytest.mark.slow
def test_smollm2_run_exports_to_a_peft_folder_plain_peft_loads(tmp_path):
    """The embedded SmolLM2: a 1-round run's PEFT export, loaded by plain PEFT on the cached base
    the adapter config names, answers as fedlora's model does."""
    from fedlora import models

    try:
        models.embedded_llm_gguf()
        models._require_gguf_loading()
    except ImportError as err:
        pytest.skip(f"embedded SmolLM2 unavailable: {err}")
    cfg = SimConfig(task="sft", clients=2, rounds=1, local_steps=1, batch_size=2, max_length=64,
                    max_test=2, max_generate=0, device="cpu", dtype="float32", lr=1e-2)  # fmt: skip
    quiet_run(cfg, tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "peft", log=lambda line: None)
    config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(models.llm_cache_path())
    ids = torch.randint(100, 5000, (1, 12), generator=torch.Generator().manual_seed(0))
    spec = tmp_path / "jobs.json"
    job = {"format": "peft", "dir": str(tmp_path / "peft"), "logits": str(tmp_path / "l.pt")}
    spec.write_text(json.dumps({"ids": ids.tolist(), "exports": [job]}))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", LOADER, str(spec)], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, _ = build_run_model(tmp_path / "run")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    oracle, base_only = _oracle_and_base(model, ids)
    assert_as_accurate(torch.load(tmp_path / "l.pt"), plain, oracle, what="SmolLM2 PEFT logits")
    assert float((oracle - base_only).abs().max()) > 1e-3
