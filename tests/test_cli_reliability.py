"""The CLI's reliability contract (DESIGN §7): a bad configuration is refused before training
with one line on stderr and exit code 2, nothing written; a run killed at any instant resumes to
the same numbers; a corrupted checkpoint is one line and exit 2; outputs respect the umask and
leave no temp files; a missing matplotlib costs only curves.png."""

from __future__ import annotations

import builtins
import errno
import json
import os
import sys
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.simulate import SimConfig, run
from fedlora.simulate import engine as engine_mod
from fedlora.simulate.config import ConfigError

CKPT = "checkpoint.safetensors"
# the smallest run that still exercises every path: 2 clients, 1 local step, 8 test examples
TINY = ["--clients", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "4",
        "--max-length", "16", "--max-test", "8", "--rank", "2", "--no-progress"]  # fmt: skip


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def _assert_refused(code: int, err: str, words: str) -> None:
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err


def _tiny_cfg(model: str, **kw) -> SimConfig:
    base = dict(clients=2, rounds=3, local_steps=1, batch_size=4, max_length=16, max_test=8,
                rank=2, heads=2, lr=1e-2, model=model, target_modules=["query", "value"])  # fmt: skip
    base.update(kw)
    return SimConfig(**base)


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name)


# ----------------------------------------------------------------------- refused up front
@pytest.mark.parametrize(
    "argv,words",
    [
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--lr", "0"], "--lr must be in (0, 1]"),
        (["--weight-decay", "-1"], "--weight-decay must be in [0, 1]"),
        (["--alpha", "nan"], "--alpha must be a finite number"),
        (["--dirichlet-alpha", "nan"], "--dirichlet-alpha must be a finite number"),
        (["--seed", "-1"], "--seed must be an integer >= 0"),
        (["--max-test", "-1"], "--max-test must be an integer >= 0"),
        (["--max-length", "1"], "--max-length must be an integer >= 2"),
        (["--max-length", "65"], "exceeds the model's 64 positions"),
        (["--clients", "x"], "argument --clients: invalid int value"),
        (["--clients", "5000"], "--clients 5000"),
        (["--head-score", "best"], "argument --head-score: invalid choice"),
        (["--hafl-score-steps", "-1"], "--hafl-score-steps must be an integer >= 0"),
        (["--target-modules", "query,query"], "names query more than once"),
        (["--no-such-option"], "unrecognized arguments"),
    ],
)
def test_bad_numeric_and_choice_options(tiny_bert_dir, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    code, err = _cli(capsys, "simulate", "--model", tiny_bert_dir, "--out", str(out), *TINY, *argv)
    _assert_refused(code, err, words)
    assert not out.exists()


def test_python_api_raises_the_same_config_error(tiny_bert_dir, tmp_path):
    for bad in (dict(lr=float("inf")), dict(seed=-1), dict(max_test=-1), dict(lr="0.1")):
        with pytest.raises(ConfigError):
            run(_tiny_cfg(tiny_bert_dir, **bad), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec,words", [(";;", "empty spec"), ("", "empty spec"),
                                        ("rank=2;rank=4", "rank is given more than once"),
                                        ("rank=1,,2", "rank needs comma-separated")])  # fmt: skip
def test_bad_budgets(tiny_bert_dir, tmp_path, capsys, spec, words):
    out = tmp_path / "out"
    code, err = _cli(
        capsys, "simulate", "--model", tiny_bert_dir, "--out", str(out), *TINY, "--budgets", spec
    )
    _assert_refused(code, err, "--budgets: " + words)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "file", "empty_folder", "broken_config", "no_weights"])
def test_bad_model_folder(tiny_bert_dir, tmp_path, capsys, kind):
    model = tmp_path / "model"
    if kind == "file":
        model.write_text("not a model")
    elif kind != "missing":
        model.mkdir()
    if kind == "broken_config":
        (model / "config.json").write_text("{not json")
    if kind == "no_weights":  # config and tokenizer, but no weights
        for f in Path(tiny_bert_dir).iterdir():
            if not f.name.endswith((".safetensors", ".bin")):
                (model / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    code, err = _cli(capsys, "simulate", "--model", str(model), "--out", str(out), *TINY)
    _assert_refused(code, err, "--model")
    assert not out.exists()


@pytest.mark.parametrize(
    "name,content,words",
    [
        ("long.csv", "text,label\n" + "a" * (30 << 20) + ",x\nb,y\n", "line 2 is longer than"),
        ("quoted.csv", 'text,label\n"' + ("b" * 999 + "\n") * 1100 + '",x\nc,y\n', "longer than"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": oops}\n', "line 2: not valid JSON"),
        ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "line 1: JSON nested too deeply"),
        ("latin1.csv", b"text,label\ncaf\xe9,a\nb,c\n", "line 2: not valid UTF-8"),
        ("utf16.csv", "text,label\nhi,a\n".encode("utf-16"), "UTF-16"),
        ("empty.csv", "", "the file is empty"),
        ("empty.jsonl", "\n\n", "no examples"),
    ],
)
def test_bad_data_files(tiny_bert_dir, tmp_path, capsys, name, content, words):
    data = tmp_path / name
    (data.write_bytes if isinstance(content, bytes) else data.write_text)(content)
    out = tmp_path / "out"
    code, err = _cli(
        capsys, "simulate", "--model", tiny_bert_dir, "--data", str(data), "--out", str(out), *TINY
    )
    _assert_refused(code, err, words)
    assert err.startswith("fedlora: error: --data") and not out.exists()


@pytest.mark.parametrize("kind", ["is_file", "under_file", "read_only", "empty_string"])
def test_bad_out_paths(tiny_bert_dir, tmp_path, capsys, monkeypatch, kind):
    target = tmp_path / "target"
    if kind == "is_file":
        target.write_text("mine")
        out, words = str(target), "is a file, not a directory"
    elif kind == "under_file":
        target.write_text("mine")
        out, words = str(target / "sub" / "run"), "is a file, not a directory"
    elif kind == "read_only":
        target.mkdir()
        target.chmod(0o555)
        if os.geteuid() == 0:  # root writes anywhere: make the kernel's refusal explicit
            real_open = os.open

            def refuse(path, *args, **kwargs):
                if str(path).startswith(str(target)):
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real_open(path, *args, **kwargs)

            monkeypatch.setattr(os, "open", refuse)
        out, words = str(target / "run"), "not writable (Permission denied)"
    else:
        out, words = "", "--out must name a directory"
    code, err = _cli(capsys, "simulate", "--model", tiny_bert_dir, "--out", out, *TINY)
    if target.is_dir():
        target.chmod(0o755)  # let pytest clean it up
    _assert_refused(code, err, words)
    if kind in ("is_file", "under_file"):
        assert target.read_text() == "mine"
    if kind == "read_only":
        assert list(target.iterdir()) == []  # the directory it tried is removed again


# ----------------------------------------------------------------------- checkpoint
def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped_byte":  # in the tensor data, after the header
        pos = len(data) - 9
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :])
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign":  # a valid safetensors file that is not our checkpoint
        import torch
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(path))


@pytest.mark.parametrize("how", ["truncated", "flipped_byte", "garbage", "empty", "foreign"])
def test_corrupted_checkpoint_on_resume(tiny_bert_dir, tmp_path, capsys, how):
    out = tmp_path / "run"
    args = ["simulate", "--model", tiny_bert_dir, "--out", str(out), *TINY]
    assert _cli(capsys, *args)[0] == 0
    _corrupt(out / CKPT, how)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = _cli(capsys, *args, "--resume", "--rounds", "2")
    _assert_refused(code, err, "is corrupted or truncated")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


def test_umask_respected_and_no_temp_files(tiny_bert_dir, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        args = ["simulate", "--model", tiny_bert_dir, "--out", str(out), *TINY]
        assert _cli(capsys, *args)[0] == 0
        stale = out / f".{CKPT}.deadbeef.tmp"  # what a kill mid-write leaves behind
        stale.write_bytes(b"partial")
        assert _cli(capsys, *args, "--resume", "--rounds", "2")[0] == 0
    finally:
        os.umask(old)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "checkpoint.safetensors",
        "config.toml",
        "curves.png",
        "metrics.csv",
        "metrics.json",
        "steps.csv",
    ]
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, (p.name, oct(p.stat().st_mode))
    assert json.loads((out / "metrics.json").read_text())["rounds"][-1]["round"] == 2


def test_runs_without_matplotlib(tiny_bert_dir, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "run"
    code, err = _cli(
        capsys, "simulate", "--model", tiny_bert_dir, "--out", str(out), *TINY, "--rounds", "2"
    )
    assert code == 0, err
    assert err.count("warning") == 1 and "curves.png is not written" in err, err
    assert sorted(p.name for p in out.iterdir()) == [
        CKPT,
        "config.toml",
        "metrics.csv",
        "metrics.json",
        "steps.csv",
    ]


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no ``except Exception`` handler swallows it."""


def test_killed_at_every_write_resumes_to_the_same_numbers(tiny_bert_dir, tmp_path, monkeypatch):
    """Kill the run at its k-th file replacement (each round replaces the checkpoint, then
    metrics.json and metrics.csv; curves are stubbed out to keep this fast), leaving half a temp
    file as a real kill would, then resume: the final metrics and state equal an uninterrupted
    run's exactly, the reports on disk are complete, and no temp file is left, for every k."""
    monkeypatch.setattr(engine_mod, "plot_curves", lambda runs, path: None)
    cfg = _tiny_cfg(tiny_bert_dir, method="flora")  # flora: base weights are checkpointed too
    full = run(cfg, tmp_path / "full", progress=False)
    want = [{key: v for key, v in r.items() if key != "seconds"} for r in full.rounds]
    real_replace = os.replace
    killed_at = []
    for k in range(1, 64):
        calls = 0

        def replace(src, dst, _k=k):
            nonlocal calls
            calls += 1
            if calls == _k:
                half = Path(src).read_bytes()[: Path(src).stat().st_size // 2]
                Path(dst).with_name(f".{Path(dst).name}.killed.tmp").write_bytes(half)
                raise _Killed
            return real_replace(src, dst)

        out = tmp_path / f"k{k}"
        monkeypatch.setattr(os, "replace", replace)
        try:
            run(cfg, out, progress=False)
        except _Killed:
            killed_at.append(k)
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        if calls < k:  # the run made fewer than k writes: every instant has been covered
            break
        resumed = run(cfg, out, resume=True, progress=False, log=lambda _: None)
        got = [{key: v for key, v in r.items() if key != "seconds"} for r in resumed.rounds]
        assert got == want, f"killed at write {k}"
        assert resumed.global_state.keys() == full.global_state.keys()
        for name, t in full.global_state.items():
            assert (resumed.global_state[name] == t).all(), (k, name)
        on_disk = json.loads((out / "metrics.json").read_text())["rounds"]
        assert [r["test_loss"] for r in on_disk] == [r["test_loss"] for r in full.rounds]
        assert _temp_files(out) == [], (k, _temp_files(out))
    assert len(killed_at) >= 3 * cfg.rounds  # checkpoint + two reports per round, at least


def test_checkpoint_is_one_self_checking_file(tiny_bert_dir, tmp_path):
    from safetensors import safe_open

    run(_tiny_cfg(tiny_bert_dir, rounds=1), tmp_path, progress=False, plot=False)
    assert not (tmp_path / "checkpoint.json").exists()
    with safe_open(str(tmp_path / CKPT), framework="pt") as f:
        meta = json.loads(f.metadata()[engine_mod.CKPT_META_KEY])
    assert meta["format"] == engine_mod.CKPT_FORMAT and len(meta["rounds"]) == 1
