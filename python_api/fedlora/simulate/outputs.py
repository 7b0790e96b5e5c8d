"""Outputs of a run: the checkpoint, the reports (metrics.json/csv, curves.png, samples.jsonl)
and the checks of the output directory.

Every file is written atomically (a temp file beside it, fsync'd, renamed over it), so a run killed
at any instant leaves the previous round's files or this round's, never a mix, and no temp file
that the next run does not clean up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedlora.simulate.config import ConfigError, SimConfig

#: The checkpoint: ONE safetensors file (the global adapter state, plus the frozen base weights
#: FLoRA / FedEx-LoRA changed) whose header metadata holds, under ``CKPT_META_KEY``, the JSON of
#: ``{"format", "config", "config_fingerprint", "rounds"}`` and, under ``CKPT_DIGEST_KEY``, a
#: SHA-256 over every tensor (name, dtype, shape, bytes) and that JSON text. It is written to a
#: temp file in the same directory, fsync'd and renamed over the old one, so a kill at any instant
#: leaves either the previous round's checkpoint or this round's, never a mix.
CKPT = "checkpoint.safetensors"
CKPT_META_KEY = "fedlora_checkpoint"
CKPT_DIGEST_KEY = "fedlora_sha256"
CKPT_FORMAT = 2
#: The two-file checkpoint of format 1 (tensors and JSON replaced one after the other).
LEGACY_CKPT_JSON = "checkpoint.json"
REPORTS = ("metrics.json", "metrics.csv", "curves.png", "samples.jsonl", "steps.csv")
OUTPUT_NAMES = (CKPT, *REPORTS)
_PROBE = "fedlora-probe"
_TMP_SUFFIX = ".tmp"
#: Files whose temp copies (``.<name>.<random>.tmp``) are ours to clean up.
_COMPARE_OUTPUTS = ("results.md", "results.json")
_PLOT_HINT = "pip install 'fedlora-kernels[plot]'"


def _out_error(out: Path, problem: str) -> ConfigError:
    return ConfigError(f"--out {str(out)!r}: {problem}")


def _check_out_path(out: Path) -> None:
    """``out`` is, or can become, a directory: not a file, not under a file (read-only check)."""
    try:
        kinds = [(p, p.exists(), p.is_dir()) for p in (out, *out.parents)]
    except (OSError, ValueError) as err:  # embedded NUL byte, name too long, ...
        raise _out_error(out, getattr(err, "strerror", None) or str(err)) from None
    for path, exists, is_dir in kinds:
        if exists:
            if not is_dir:
                where = "" if path == out else f"{str(path)!r} "
                raise _out_error(out, f"{where}is a file, not a directory")
            return


def probe_writable(out: Path) -> None:
    """Create ``out`` (and its parents) and a probe file in it, then remove the probe: the output
    directory is writable before any training. On failure the directories it created are removed
    again and a :class:`ConfigError` says why."""
    _check_out_path(out)
    created = [d for d in (out, *out.parents) if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".{_PROBE}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, b"fedlora")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except (OSError, ValueError) as err:  # ValueError: an embedded NUL byte
        for d in created:  # deepest first
            with contextlib.suppress(OSError, ValueError):
                d.rmdir()
        why = getattr(err, "strerror", None) or str(err)
        raise _out_error(out, f"not writable ({why})") from None


def _is_own_temp(name: str) -> bool:
    return name.endswith(_TMP_SUFFIX) and any(
        name.startswith(f".{n}.") for n in (*OUTPUT_NAMES, *_COMPARE_OUTPUTS, _PROBE)
    )


def clean_stale_temps(out: Path) -> list[str]:
    """Remove the temp files a killed run of ours left in ``out``; return their names."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in out.iterdir():
            if _is_own_temp(entry.name) and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry.name)
    return removed


def _tensor_digest(tensors: dict[str, torch.Tensor], meta_text: str) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(meta_text.encode())
    return h.hexdigest()


def write_checkpoint(
    out: Path,
    cfg: SimConfig,
    rounds: list[dict],
    state: dict[str, torch.Tensor],
    initial: dict[str, Any] | None = None,
) -> None:
    """Write the whole checkpoint (tensors and metadata, with ``initial``, the evaluation before
    round 1) as one atomically replaced file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta_text = json.dumps(
        {
            "format": CKPT_FORMAT,
            "config": cfg.to_json(),
            "config_fingerprint": cfg.fingerprint(),
            "rounds": rounds,
            "initial": initial,
        }
    )
    header = {CKPT_META_KEY: meta_text, CKPT_DIGEST_KEY: _tensor_digest(tensors, meta_text)}
    _atomic_write(out / CKPT, lambda p: save_file(tensors, p, metadata=header))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a checkpoint written by :func:`write_checkpoint`.

    Raises:
        ConfigError: (one line) the file is truncated, corrupted (digest mismatch), not a fedlora
            checkpoint, or of another format version.
    """
    from safetensors import safe_open

    def corrupt(why: str) -> ConfigError:
        return ConfigError(
            f"checkpoint {str(path)!r} is corrupted or truncated ({why}); start over in an "
            "empty --out"
        )

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error type for every malformation
        raise corrupt(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    meta_text, digest = header.get(CKPT_META_KEY), header.get(CKPT_DIGEST_KEY)
    if meta_text is None or digest is None:
        raise corrupt("no fedlora metadata in its header")
    if _tensor_digest(tensors, meta_text) != digest:
        raise corrupt("its SHA-256 digest does not match its contents")
    try:
        meta = json.loads(meta_text)
    except ValueError:
        raise corrupt("its metadata is not JSON") from None
    rounds = meta.get("rounds") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CKPT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise corrupt(f"format {got!r}, expected {CKPT_FORMAT}")
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise corrupt("its metadata has no list of rounds")
    if [r.get("round") for r in rounds] != list(range(1, len(rounds) + 1)):
        raise corrupt("its rounds are not numbered 1, 2, ...")
    return tensors, meta


def check_out_dir(
    out: Path, cfg: SimConfig, resume: bool
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any] | None] | None:
    """Refuse to mix runs; return ``(global_state, rounds, initial)`` to resume, or None to
    start fresh.

    Read-only: raises :class:`ConfigError` when ``out`` is a file or under one, holds another
    config's run, holds this run without ``resume``, holds an old two-file or a corrupted
    checkpoint, or holds another run's reports without a checkpoint.
    """
    _check_out_path(out)
    if (out / LEGACY_CKPT_JSON).exists():
        raise _out_error(
            out,
            f"holds a checkpoint in the old two-file format ({LEGACY_CKPT_JSON} + {CKPT}), "
            "which cannot be resumed safely; choose another directory",
        )
    path = out / CKPT
    if not path.exists():
        reports = [n for n in REPORTS if (out / n).exists()]
        if reports:
            raise _out_error(
                out,
                f"holds {reports[0]} of another run but no checkpoint; choose another directory",
            )
        if resume and not out.is_dir():
            raise ConfigError(f"--resume: {str(out)!r} holds no checkpoint to resume")
        return None  # resuming a run killed before its first checkpoint: start at round 1
    try:
        state, meta = read_checkpoint(path)
    except ConfigError as err:
        raise ConfigError(f"{'--resume' if resume else '--out'}: {err}") from None
    if meta.get("config_fingerprint") != cfg.fingerprint():
        raise _out_error(out, "holds a run of a different config; choose another directory")
    if not resume:
        raise _out_error(out, "already holds this run; pass --resume to continue it")
    initial = meta.get("initial")
    return state, meta["rounds"], initial if isinstance(initial, dict) else None


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # a directory cannot be opened on some systems
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by the
    classic set-and-restore."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp)``: a temp file next to it, given the mode a plain
    ``open`` would give (0o666 minus the umask: some writers create 0o600 files), fsync'd, then
    renamed over ``path``. On any failure the temp file is removed and ``path`` is unchanged."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def matplotlib_missing() -> str | None:
    """Why ``curves.png`` cannot be drawn (matplotlib does not import), or None if it can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        return str(err) or "matplotlib is not installed"
    return None


def check_plotting(plot: bool | None) -> bool:
    """Whether to draw curves: ``plot`` if given, otherwise whether matplotlib imports (with one
    warning on stderr when it does not: the metrics are the essential output)."""
    if plot is not None:
        return plot
    why = matplotlib_missing()
    if why is not None:
        print(
            f"fedlora: warning: curves.png is not written: matplotlib is unavailable ({why}); "
            f"`{_PLOT_HINT}` to get it",
            file=sys.stderr,
        )
    return why is None


#: columns of metrics.csv after the task's metrics
TRAIN_COLUMNS = (
    "train_loss",
    "aggregation_error",
    "bytes_up",
    "bytes_down",
    "clients_used",
    "seconds",
)


def write_reports(
    out: Path,
    cfg: SimConfig,
    rounds: list[dict],
    *,
    plot: bool = True,
    initial: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """metrics.json (with ``data``: how the splits were encoded, e.g. the SFT truncation
    counts), metrics.csv (round 0 = ``initial``, the model before training, when
    given), samples.jsonl (the answers of tasks that generate) and, with ``plot``, curves.png;
    each written atomically."""
    from fedlora.simulate.tasks import get_task

    task = get_task(cfg.task)
    _atomic_write(
        out / "metrics.json",
        lambda p: Path(p).write_text(
            json.dumps(
                {"config": cfg.to_json(), "data": data, "initial": initial, "rounds": rounds},
                indent=1,
                default=str,
            )
        ),
    )
    cols = ["round", *task.columns, *TRAIN_COLUMNS]
    rows = ([{"round": 0, **initial}] if initial else []) + list(rounds)
    lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    _atomic_write(out / "metrics.csv", lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    samples = [
        json.dumps({"round": r["round"], **s}, ensure_ascii=False)
        for r in rows
        for s in r.get("samples", ())
    ]
    if samples:
        _atomic_write(
            out / "samples.jsonl", lambda p: Path(p).write_text("\n".join(samples) + "\n")
        )
    if plot:
        plot_curves({cfg.method: rows}, out / "curves.png", (*task.panels, TRAIN_LOSS_PANEL))


def write_outputs(
    out: Path,
    cfg: SimConfig,
    rounds: list[dict],
    global_state: dict[str, torch.Tensor],
    *,
    plot: bool = True,
    initial: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """The checkpoint first (the source of truth a resume reads), then the reports derived from
    it; every file is written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(out, cfg, rounds, global_state, initial)
    write_reports(out, cfg, rounds, plot=plot, initial=initial, data=data)


#: curves.png's last panel: the round mean of the clients' training loss (steps.csv has each step)
TRAIN_LOSS_PANEL = (("train_loss", "train loss"),)
CLASSIFY_PANELS = ((("test_accuracy", "test accuracy"),), (("test_loss", "test loss"),))


def plot_curves(
    runs: dict[str, list[dict]],
    path: Path,
    panels: tuple[tuple[tuple[str, str], ...], ...] = CLASSIFY_PANELS,
) -> None:
    """Metrics per round, one axis per panel (each a group of ``(metric, label)``), one line
    per run and metric, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for name, rounds in runs.items():
            x = [r["round"] for r in rounds]
            for metric, label in panel:
                tag = name if len(panel) == 1 else f"{name}: {label}"
                ax.plot(x, [r.get(metric, float("nan")) for r in rounds], marker="o", label=tag)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        label = " / ".join(lbl for _, lbl in panel)
        ax.set(xlabel="round", ylabel=label, title=f"global {label}")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    try:
        _atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    finally:
        plt.close(fig)
