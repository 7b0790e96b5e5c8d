"""Outputs under stress (issue 20): full disks, file-size limits, digest-valid but wrong
checkpoints, library temp files, two runs on one ``--out``, a comparison's report, and the thread
policy of the tests themselves.

The full disk is simulated two ways: ``os.write`` raising ``ENOSPC`` / ``EDQUOT`` / ``EROFS`` /
``EFBIG`` for the files under ``--out`` (in process), and a real ``RLIMIT_FSIZE`` on a child
process (the kernel then fails the write with ``EFBIG``; Python ignores ``SIGXFSZ``). The lock is
tested with two real processes.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedlora.cli import main
from fedlora.simulate import outputs
from fedlora.simulate.config import ConfigError

CKPT = "checkpoint.safetensors"
TINY = ["--clients", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "4",
        "--max-length", "16", "--max-test", "8", "--rank", "2", "--no-progress"]  # fmt: skip


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def _one_line(code: int, err: str, *words: str) -> None:
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _temps(folder: Path) -> list[str]:
    if not folder.exists():  # a run that wrote nothing removes the --out it created
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name)


def _failing_write(monkeypatch, out: Path, code: int, after: int = 0) -> list[int]:
    """``os.write`` fails with ``code`` for files under ``out`` bigger than a probe's 7 bytes,
    after ``after`` such writes succeeded (a disk that fills up)."""
    real = os.write
    seen = [0]

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(str(out)) and len(data) > 16:
            seen[0] += 1
            if seen[0] > after:
                raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return seen


# ----------------------------------------------------------------------- full disk, in process
@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG], ids=errno.errorcode.get
)
def test_first_checkpoint_on_a_full_disk_is_one_line(tiny_bert_dir, tmp_path, capsys, monkeypatch,
                                                     code):  # fmt: skip
    out = tmp_path / "run"
    _failing_write(monkeypatch, out, code)
    rc, err = _cli(capsys, "simulate", "--model", tiny_bert_dir, "--out", str(out), *TINY)
    _one_line(rc, err, "cannot write", os.strerror(code), errno.errorcode[code])
    assert not (out / CKPT).exists() and _temps(out) == []


def test_a_disk_that_fills_up_keeps_the_last_checkpoint(tiny_bert_dir, tmp_path, capsys,
                                                        monkeypatch):  # fmt: skip
    """Round 1 is written whole (checkpoint + reports); round 2's checkpoint write hits ENOSPC:
    one line, exit 2, round 1's files unchanged and valid, no temp file; once there is room the
    run resumes to the end."""
    out = tmp_path / "run"
    args = ["simulate", "--model", tiny_bert_dir, "--out", str(out), *TINY, "--rounds", "2"]
    seen = _failing_write(monkeypatch, out, errno.ENOSPC, after=10**9)
    assert _cli(capsys, *args[:-2], "--rounds", "1")[0] == 0
    writes_per_round = seen[0]
    round1 = _listing(out)
    monkeypatch.undo()
    _failing_write(monkeypatch, out, errno.ENOSPC, after=0)
    rc, err = _cli(capsys, *args, "--resume")
    _one_line(rc, err, "No space left on device", "checkpoint is intact", "--resume")
    assert _listing(out) == round1 and _temps(out) == []
    monkeypatch.undo()
    assert writes_per_round >= 3  # checkpoint, metrics.json, metrics.csv (+ curves)
    assert _cli(capsys, *args, "--resume")[0] == 0
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and _temps(out) == []


# ----------------------------------------------------------------------- RLIMIT_FSIZE, a child
def _child(argv: list[str], fsize: int, timeout: float = 300) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    code = "import sys; from fedlora.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"},
    )


def test_file_size_limit_fresh_run_and_prompt_resume(tiny_bert_dir, tmp_path, capsys):
    """Under a real RLIMIT_FSIZE: a fresh run whose checkpoint does not fit fails at that write
    in one line (EFBIG) leaving nothing half-written; a resume whose next checkpoint cannot fit
    beside the current one fails BEFORE training (the probe reserves the checkpoint's size),
    in one line, with the checkpoint untouched."""
    fresh = tmp_path / "fresh"
    proc = _child(["simulate", "--model", tiny_bert_dir, "--out", str(fresh), *TINY], 4096)
    err = proc.stderr.strip()
    _one_line(proc.returncode, err, "File too large", "EFBIG")
    assert not (fresh / CKPT).exists() and _temps(fresh) == []

    out = tmp_path / "run"
    args = ["simulate", "--model", tiny_bert_dir, "--out", str(out), *TINY]
    assert _cli(capsys, *args)[0] == 0
    before = _listing(out)
    size = (out / CKPT).stat().st_size
    t0 = time.perf_counter()
    proc = _child([*args, "--resume", "--rounds", "3"], size // 2)
    err = proc.stderr.strip()
    _one_line(proc.returncode, err, "no room for the next checkpoint", "--resume")
    assert "round   2/3  acc" not in proc.stdout, proc.stdout  # no round was trained
    assert _listing(out) == before and _temps(out) == []
    assert time.perf_counter() - t0 < 120


# ----------------------------------------------------------------------- checkpoints
def _rewrite(path: Path, edit_tensors=None, edit_meta=None) -> None:
    """Rewrite a checkpoint with edited tensors / metadata and a VALID digest."""
    from safetensors.torch import save_file

    tensors, meta = outputs.read_checkpoint(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    text = json.dumps(meta)
    header = {
        outputs.CKPT_META_KEY: text,
        outputs.CKPT_DIGEST_KEY: outputs._tensor_digest(tensors, text),
    }
    save_file(tensors, str(path), metadata=header)


def _first(tensors):
    return sorted(tensors)[0]


def _nan(t):
    t[_first(t)] = torch.full_like(t[_first(t)], float("nan"))


def _int(t):
    t[_first(t)] = t[_first(t)].to(torch.int32)


def _inf(t):
    t[_first(t)] = t[_first(t)].clone().fill_(float("inf"))


def _no_metrics(m):
    del m["rounds"][0]["test_loss"]


def _no_train_loss(m):
    m["rounds"][0]["train_loss"] = "n/a"


def _bad_initial(m):
    m["initial"] = {"seconds": 1.0}


@pytest.mark.parametrize(
    "tensors,meta,words",
    [
        (_nan, None, "NaN or infinite"),
        (_inf, None, "NaN or infinite"),
        (_int, None, "torch.int32"),
        (None, _no_metrics, "no numeric 'test_loss'"),
        (None, _no_train_loss, "no numeric 'train_loss'"),
        (None, _bad_initial, "initial record has no numeric"),
    ],
    ids=["nan", "inf", "int32", "no-metrics", "bad-train-loss", "initial"],
)
def test_digest_valid_but_wrong_checkpoint_is_one_line(tiny_bert_dir, tmp_path, capsys, tensors,
                                                       meta, words):  # fmt: skip
    out = tmp_path / "run"
    args = ["simulate", "--model", tiny_bert_dir, "--out", str(out), *TINY]
    assert _cli(capsys, *args)[0] == 0
    _rewrite(out / CKPT, tensors, meta)
    before = _listing(out)
    rc, err = _cli(capsys, *args, "--resume", "--rounds", "2")
    _one_line(rc, err, "--resume", words)
    assert _listing(out) == before


def test_library_temp_files_are_cleaned_and_never_made(tiny_bert_dir, tmp_path, capsys,
                                                       monkeypatch):  # fmt: skip
    """safetensors' own save_file writes ``.tmpXXXXXX`` beside its target (a kill leaves it): the
    checkpoint is serialised in memory and written by our atomic write instead, and a resume
    removes such a file an older run left."""
    import safetensors.torch

    out = tmp_path / "run"
    args = ["simulate", "--model", tiny_bert_dir, "--out", str(out), *TINY]
    assert _cli(capsys, *args)[0] == 0
    (out / ".tmpAb12Cd").write_bytes((out / CKPT).read_bytes()[:200])  # a killed save_file
    (out / ".tmpnotes").write_text("a user's file")  # not that pattern: kept

    def no_save_file(*a, **k):
        raise AssertionError("save_file writes its own temp file")

    monkeypatch.setattr(safetensors.torch, "save_file", no_save_file)
    assert _cli(capsys, *args, "--resume", "--rounds", "2")[0] == 0
    assert not (out / ".tmpAb12Cd").exists() and (out / ".tmpnotes").exists()


# ----------------------------------------------------------------------- one run per --out
_HOLDER = """
import sys, time
from pathlib import Path
from fedlora.simulate.outputs import lock_out_dir
with lock_out_dir(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_out_in_use_by_a_live_run_is_refused(tiny_bert_dir, tmp_path, capsys):
    """Another process holds --out: simulate is refused in one line naming its pid, before
    anything is written; once that process is killed (SIGKILL: its lock file stays behind) the
    same command runs, and the lock file is gone afterwards."""
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        args = ["simulate", "--model", tiny_bert_dir, "--out", str(out), *TINY]
        rc, err = _cli(capsys, *args)
        _one_line(rc, err, "in use by another fedlora run", f"pid {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == [outputs.LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / outputs.LOCK_NAME).exists()  # stale: its process is gone
    assert _cli(capsys, *args)[0] == 0
    assert not (out / outputs.LOCK_NAME).exists() and (out / CKPT).exists()


def test_two_simulate_processes_on_one_out(tiny_bert_dir, tmp_path):
    """Two real `fedlora simulate` processes started at once on one --out (FedIT and HAFL):
    exactly one runs (exit 0), the other is refused in one line (exit 2), and the folder holds
    the winner's run."""
    out = tmp_path / "run"
    code = "import sys; from fedlora.cli import main; sys.exit(main(sys.argv[1:]))"
    procs = {}
    for m in ("fedit", "hafl"):
        argv = ["simulate", "--method", m, "--model", tiny_bert_dir, "--out", str(out), *TINY,
                "--rounds", "2"]  # fmt: skip
        procs[m] = subprocess.Popen(
            [sys.executable, "-c", code, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {m: (p.wait(timeout=300), p.stderr.read()) for m, p in procs.items()}
    codes = sorted(rc for rc, _ in results.values())
    assert codes == [0, 2], results
    loser = next(m for m, (rc, _) in results.items() if rc == 2)
    winner = next(m for m in results if m != loser)
    err = results[loser][1].strip()
    assert len(err.splitlines()) == 1 and "in use by another fedlora run" in err, err
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["config"]["method"] == winner and len(meta["rounds"]) == 2


def test_lock_removes_what_a_refused_run_created(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(ValueError, match="boom"), outputs.lock_out_dir(out):
        assert (out / outputs.LOCK_NAME).exists()
        raise ValueError("boom")
    assert not (tmp_path / "a").exists()
    with outputs.lock_out_dir(out):  # held by this process: a second holder is refused
        with pytest.raises(ConfigError, match="in use by another fedlora run"):
            with outputs.lock_out_dir(out):
                pass
    assert out.is_dir() and list(out.iterdir()) == []


# ----------------------------------------------------------------------- compare's report
COMMON = ["--clients", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "4",
          "--max-length", "16", "--max-test", "8", "--rank", "2", "--no-progress"]  # fmt: skip


def test_compare_never_overwrites_another_comparisons_report(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    first = ["compare", "--methods", "fedit", "--model", tiny_bert_dir, "--out", str(out), *COMMON]
    assert _cli(capsys, *first)[0] == 0
    report = _listing(out)
    other = ["compare", "--methods", "ffa", "--model", tiny_bert_dir, "--out", str(out), *COMMON]
    rc, err = _cli(capsys, *other)
    _one_line(rc, err, "holds the report of another comparison of other methods (fedit)")
    rc, err = _cli(capsys, *first, "--lr", "0.02")  # same methods, other settings
    _one_line(rc, err, "another comparison with other settings")
    assert _listing(out) == report and not (out / "ffa").exists()
    assert _cli(capsys, *first)[0] == 0  # the same comparison resumes (nothing left to run)
    (out / "results.json").unlink()
    rc, err = _cli(capsys, *first)
    _one_line(rc, err, "holds results.md of another comparison (no results.json)")


# ----------------------------------------------------------------------- SFT positions
def test_max_new_tokens_beyond_the_models_positions(tiny_qwen2_dir, tmp_path, capsys):
    from transformers import AutoConfig

    limit = AutoConfig.from_pretrained(tiny_qwen2_dir).max_position_embeddings
    out = tmp_path / "run"
    rc, err = _cli(capsys, "simulate", "--task", "sft", "--model", tiny_qwen2_dir, "--out",
                   str(out), *TINY, "--max-new-tokens", str(limit))  # fmt: skip
    _one_line(rc, err, f"--max-new-tokens {limit} exceeds the model's {limit} positions")
    assert not out.exists()


# ----------------------------------------------------------------------- thread policy
def test_tests_run_with_one_thread_unless_they_say_otherwise():
    """tests/conftest.py: one torch thread here, and OMP/MKL/libfedlora limited to one thread in
    the processes tests launch (FEDLORA_TEST_THREADS overrides the count)."""
    want = int(os.environ.get("FEDLORA_TEST_THREADS", "1"))
    assert torch.get_num_threads() == want
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FEDLORA_NUM_THREADS")
    code = f"import os; print(*(os.environ.get(n) for n in {names!r}))"  # torch reads OMP's
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.stdout.split() == [str(want)] * 3, child.stderr[-500:]


# ----------------------------------------------------------------------- model configs
def _broken_copy(src: str, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "task,changes,words",
    [
        ("classify", {"num_hidden_layers": -2}, "its config.json has num_hidden_layers = -2"),
        ("sft", {"num_hidden_layers": -2}, "its config.json has num_hidden_layers = -2"),
        ("sft", {"vocab_size": 0}, "its config.json has vocab_size = 0"),
        ("classify", {"hidden_size": "wide"}, "expected int, got str (value: 'wide')"),
        (
            "classify",
            {"model_type": "no-such-architecture"},
            "cannot read its config (The checkpoint you are trying to load has model type",
        ),
    ],
)
def test_model_config_transformers_rejects_is_one_line(tiny_bert_dir, tiny_llm_dir, tmp_path,
                                                       capsys, task, changes, words):  # fmt: skip
    """A config transformers rejects, or accepts but cannot build a model from (a negative layer
    count builds a model without layers), is one line naming the folder and the complaint,
    with no transformers output (before: 15 lines of a load report, then a wrong-cause error
    about --target-modules)."""
    src = tiny_bert_dir if task == "classify" else tiny_llm_dir
    model = _broken_copy(src, tmp_path / "model", **changes)
    out = tmp_path / "out"
    code = main(["simulate", "--task", task, "--model", str(model), "--out", str(out), *TINY])
    captured = capsys.readouterr()
    _one_line(code, captured.err.strip(), "--model", str(model), words)
    # stdout holds only fedlora's own "what it loads" lines (issue 19), no transformers output
    assert all(line.startswith("fedlora: ") for line in captured.out.splitlines())
    assert not out.exists()
