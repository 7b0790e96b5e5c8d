"""Outputs of a run: the checkpoint, the reports (metrics.json/csv, curves.png, samples.jsonl)
and the checks of the output directory.

Every file is written atomically (a temp file beside it, fsync'd, renamed over it), so a run killed
at any instant leaves the previous round's files or this round's, never a mix, and no temp file
that the next run does not clean up. A write that fails (a full disk, a quota, a read-only file
system, a file-size limit) is one :class:`OutputWriteError` line: its temp file is removed and the
file it would have replaced, the last complete checkpoint included, is unchanged.

An output directory is used by one run at a time: :func:`lock_out_dir` holds an advisory lock
(``fcntl.flock``) on ``<out>/.fedlora.lock`` for the run's life; the kernel drops it when the
process ends, however it ends, so a killed run never blocks a resume.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from fedlora.simulate.config import ConfigError, SimConfig

#: The checkpoint: ONE safetensors file (the global adapter state, plus the frozen base weights
#: FLoRA / FedEx-LoRA changed) whose header metadata holds, under ``CKPT_META_KEY``, the JSON of
#: ``{"format", "config", "config_fingerprint", "rounds", "initial", "resolved"}`` (``resolved``:
#: :func:`run_record`, what ``fedlora export`` needs) and, under ``CKPT_DIGEST_KEY``, a
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
_COMPARE_OUTPUTS = ("results.md", "results.json", "config.toml")
_PLOT_HINT = "pip install 'fedlora-kernels[plot]'"


#: The advisory lock file inside ``--out`` (see :func:`lock_out_dir`).
LOCK_NAME = ".fedlora.lock"
#: The temp files safetensors' own ``save_file`` writes beside its target (``.tmp`` and six
#: letters or digits); an older fedlora that used it could leave one when killed mid-write.
_LIBRARY_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")
#: errno values of a write that found no room: a full file system, a quota, a read-only file
#: system, a file-size limit (RLIMIT_FSIZE)
NO_ROOM = frozenset(
    e
    for e in (
        errno.ENOSPC,
        getattr(errno, "EDQUOT", None),
        errno.EROFS,
        errno.EFBIG,
    )
    if e is not None
)


class OutputWriteError(ConfigError):
    """An output file could not be written (one line; the CLI exits with code 2). The file it
    would have replaced is unchanged and no temp file is left."""


def _why(err: BaseException) -> str:
    """``strerror (ENAME)`` of an OSError, else its first line."""
    if isinstance(err, OSError) and err.errno is not None:
        name = errno.errorcode.get(err.errno, str(err.errno))
        return f"{err.strerror or os.strerror(err.errno)} ({name})"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _write_error(path: Path, err: BaseException) -> OutputWriteError:
    hint = ""
    if isinstance(err, OSError) and err.errno in NO_ROOM:
        hint = (
            "; nothing was half-written and the last complete checkpoint is intact: make room, "
            "then continue with --resume"
        )
    return OutputWriteError(f"cannot write {str(path)!r}: {_why(err)}{hint}")


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


def probe_writable(out: Path, reserve: int | None = None) -> None:
    """Create ``out`` (and its parents) and a probe file in it, then remove the probe: the output
    directory is writable before any training. The probe is allocated ``reserve`` bytes
    (``posix_fallocate``; default: the size of the checkpoint already in ``out``, which the next
    one replaces beside it), so a resume on a full disk, over a quota or under a file-size limit
    fails now, in one line, instead of after a round of training. On failure the directories it
    created are removed again and a :class:`ConfigError` says why."""
    _check_out_path(out)
    if reserve is None:
        try:
            reserve = (out / CKPT).stat().st_size if (out / CKPT).is_file() else 0
        except OSError:
            reserve = 0
    created = [d for d in (out, *out.parents) if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".{_PROBE}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_all(fd, b"fedlora")
            if reserve > 0 and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(fd, 0, reserve + (1 << 16))
                except OSError as err:
                    if err.errno in NO_ROOM:
                        raise
                    # (EOPNOTSUPP, EINVAL: a file system without fallocate; the write will tell)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except (OSError, ValueError) as err:  # ValueError: an embedded NUL byte
        for d in created:  # deepest first
            with contextlib.suppress(OSError, ValueError):
                d.rmdir()
        if isinstance(err, OSError) and err.errno in NO_ROOM and reserve > 0:
            raise _out_error(
                out,
                f"no room for the next checkpoint ({reserve} bytes beside the current one: "
                f"{_why(err)}); the checkpoint is intact: make room, then continue with --resume",
            ) from None
        why = getattr(err, "strerror", None) or str(err)
        raise _out_error(out, f"not writable ({why})") from None


_F = TypeVar("_F", bound=Callable[..., Any])


@contextlib.contextmanager
def lock_out_dir(out: Path | None) -> Iterator[None]:
    """Hold ``out`` for this process: an exclusive ``fcntl.flock`` on ``<out>/.fedlora.lock``
    (``out`` and its parents are created as needed), released and the lock file removed on exit.

    A second run on the same ``out`` (another process) is refused at once with a one-line
    :class:`ConfigError` naming the holder's pid. The kernel drops the lock when its process
    ends, however it ends, so a stale lock file from a killed run never blocks a ``--resume``.
    If the body raises, the directories created here are removed again when they are empty
    (a refused run writes nothing). ``out`` None: no lock. Where ``fcntl`` does not exist
    (Windows), nothing is locked.
    """
    if out is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    out = Path(out)
    _check_out_path(out)
    created = [d for d in (out, *out.parents) if not d.exists()]
    path = out / LOCK_NAME

    def undo() -> None:
        for d in created:  # deepest first; only empty ones
            with contextlib.suppress(OSError, ValueError):
                d.rmdir()

    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except (OSError, ValueError) as err:
            undo()
            why = getattr(err, "strerror", None) or str(err)
            raise _out_error(out, f"not writable ({why})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                pid = os.pread(fd, 32, 0).decode().strip()
                holder = f" (pid {int(pid)})" if pid else ""
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                undo()
                raise _out_error(
                    out,
                    f"is in use by another fedlora run{holder}; wait for it to end or choose "
                    "another directory",
                ) from None
            undo()
            raise _out_error(out, f"cannot be locked ({_why(err)})") from None
        # the holder before us may have removed the file between our open and our lock: then
        # we hold a lock on a deleted file, and must lock the one now at that path instead
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    with contextlib.suppress(OSError):  # the holder's pid, for the message above (best effort)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding the lock (see the samestat check)
        os.close(fd)
        if failed:
            undo()


def locks_out_dir(fn: _F) -> _F:
    """Decorate a ``run(cfg, out_dir=None, ...)``: the call holds :func:`lock_out_dir` on its
    ``out_dir`` (when it names a usable directory; bad values are left to ``run`` to refuse)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out_dir = args[1] if len(args) > 1 else kwargs.get("out_dir")
        out = None
        if out_dir is not None and str(out_dir).strip():
            out = Path(out_dir).expanduser()
            try:
                _check_out_path(out)
            except ConfigError:
                out = None  # run() refuses it with its own message
        with lock_out_dir(out):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _is_own_temp(name: str) -> bool:
    return name.endswith(_TMP_SUFFIX) and any(
        name.startswith(f".{n}.") for n in (*OUTPUT_NAMES, *_COMPARE_OUTPUTS, _PROBE)
    )


def _is_library_temp(entry: Path) -> bool:
    """A safetensors temp file (``.tmpXXXXXX`` holding a safetensors header) a killed write of
    an older fedlora left: the name pattern and the format's first bytes (a little-endian
    header length, then ``{``)."""
    if not _LIBRARY_TEMP.fullmatch(entry.name) or not entry.is_file():
        return False
    try:
        with open(entry, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


def clean_stale_temps(out: Path) -> list[str]:
    """Remove the temp files a killed run left in ``out`` (ours, and safetensors' own
    ``.tmpXXXXXX``); return their names."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in out.iterdir():
            if (_is_own_temp(entry.name) and entry.is_file()) or _is_library_temp(entry):
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


#: Version of the ``resolved`` record (:func:`run_record`) in the checkpoint header.
RECORD_VERSION = 1
#: What ``--model`` None / ``smollm2`` is, for ``base_model_name_or_path`` comparisons.
EMBEDDED_LLM_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def run_record(cfg: SimConfig, model: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint must say for its model to be rebuilt without the config's defaults
    (``fedlora export``): the resolved model (``model``: the spec to load it again, ``model_path``:
    the local transformers folder it was read from, or None when the embedded model could not be
    cached), the resolved ``target_modules`` (the config's, or the module names the model family's
    default adapted), the adapter layer kind, rank, heads, alpha and per-layer scale, the frozen
    base's dtype, and the fedlora version that wrote it."""
    import fedlora
    from fedlora.methods import get as get_method
    from fedlora.state_dict import adapter_layers

    layers = list(adapter_layers(model))
    names: list[str] = []
    for path, _ in layers:
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in names:
            names.append(leaf)
    spec: str | None = cfg.model
    path: str | None = None
    alias: str | None = None
    if cfg.task == "sft" and spec in (None, "smollm2"):
        spec, alias = "smollm2", EMBEDDED_LLM_NAME
        with contextlib.suppress(ImportError, OSError):
            from fedlora.models import llm_cache_path

            cached = llm_cache_path()
            path = str(cached) if cached.is_dir() else None
    elif cfg.task == "classify" and spec is None:
        with contextlib.suppress(ImportError, OSError):
            from fedlora.models import default_model_path

            path = str(Path(default_model_path()).resolve())
        spec = path
    else:
        path = str(Path(os.path.expanduser(str(spec))).resolve())
    first = layers[0][1] if layers else None
    base = getattr(first, "base_layer", None)
    return {
        "version": RECORD_VERSION,
        "fedlora": fedlora.__version__,
        "task": cfg.task,
        "method": cfg.method,
        "layer": get_method(cfg.method).layer,
        "changes_base": bool(get_method(cfg.method).changes_base),
        "model": spec,
        "model_path": path,
        "model_alias": alias,
        "target_modules": list(cfg.target_modules) if cfg.target_modules else names,
        "adapted_modules": len(layers),
        "rank": cfg.rank,
        "heads": cfg.heads,
        "alpha": cfg.alpha,
        "scale": float(first.scale) if first is not None else None,
        "dtype": str(base.weight.dtype).removeprefix("torch.") if base is not None else None,
        "seed": cfg.seed,
    }


def write_checkpoint(
    out: Path,
    cfg: SimConfig,
    rounds: list[dict],
    state: dict[str, torch.Tensor],
    initial: dict[str, Any] | None = None,
    resolved: dict[str, Any] | None = None,
) -> None:
    """Write the whole checkpoint (tensors and metadata, with ``initial``, the evaluation before
    round 1, and ``resolved``, :func:`run_record`) as one atomically replaced file."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta_text = json.dumps(
        {
            "format": CKPT_FORMAT,
            "config": cfg.to_json(),
            "config_fingerprint": cfg.fingerprint(),
            "rounds": rounds,
            "initial": initial,
            "resolved": resolved,
        }
    )
    header = {CKPT_META_KEY: meta_text, CKPT_DIGEST_KEY: _tensor_digest(tensors, meta_text)}
    # serialised in memory and written by _atomic_write_bytes: safetensors' save_file would
    # write its own temp file, which a kill leaves behind and a full disk half-fills
    _atomic_write_bytes(out / CKPT, save(tensors, metadata=header))


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
    for name, t in sorted(tensors.items()):
        # adapters are float32; a checkpointed frozen base (FLoRA, FedEx-LoRA) is the model's dtype
        if not t.is_floating_point():
            raise corrupt(f"tensor {name!r} has dtype {t.dtype}, not a floating-point one")
        if not name.endswith(".base_layer.weight") and t.dtype != torch.float32:
            raise corrupt(f"adapter tensor {name!r} has dtype {t.dtype}, not torch.float32")
        if not bool(torch.isfinite(t).all()):
            raise corrupt(f"tensor {name!r} holds NaN or infinite values")
    return tensors, meta


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_records(path: Path, cfg: SimConfig, meta: dict[str, Any]) -> None:
    """Every round record of a checkpoint's metadata (and its ``initial`` evaluation, when
    present) holds every metric the task writes and every training column, as numbers: a
    record without them would resume into a metrics row without values. One-line
    :class:`ConfigError` otherwise."""
    from fedlora.simulate.tasks import get_task

    columns = get_task(cfg.task).columns
    initial = meta.get("initial")
    records = [("initial", initial, columns)] if initial is not None else []
    records += [(f"round {r.get('round')}", r, (*columns, *TRAIN_COLUMNS)) for r in meta["rounds"]]
    for label, record, need in records:
        if not isinstance(record, dict):
            problem = f"its {label} record is not a mapping"
        else:
            missing = [c for c in need if not _is_number(record.get(c))]
            if not missing:
                continue
            problem = f"its {label} record has no numeric {missing[0]!r}"
        raise ConfigError(
            f"checkpoint {str(path)!r} is incomplete ({problem}); start over in an empty --out"
        )


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
    try:
        check_records(path, cfg, meta)
    except ConfigError as err:
        raise ConfigError(f"--resume: {err}") from None
    initial = meta.get("initial")
    return state, meta["rounds"], initial if isinstance(initial, dict) else None


def _fsync(path: Path) -> None:
    """fsync a directory, where the system allows it (best effort: some cannot open one)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written (a file-size limit or a nearly full disk can
    make a write short; the next one then raises the error)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - a regular file never writes 0 bytes without an error
            raise OSError(errno.EIO, "write returned 0")
        view = view[n:]


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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file next to it (mode 0o666 minus the
    umask), written whole, fsync'd (a delayed ENOSPC surfaces here, not after the rename), then
    renamed over ``path``. On any failure the temp file is removed and ``path`` is unchanged; an
    OSError (full disk, quota, read-only file system, file-size limit, ...) becomes one
    :class:`OutputWriteError` line."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise _write_error(path, err) from None
        raise
    _fsync(path.parent)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp)`` (a writer that needs a file name), with the
    guarantees of :func:`_atomic_write_bytes`: the result is read back into memory and written
    by it, so a failure anywhere leaves no temp file and ``path`` unchanged."""
    scratch = path.parent / f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
    try:
        try:
            write(str(scratch))
            data = scratch.read_bytes()
        finally:
            with contextlib.suppress(OSError):
                scratch.unlink()
    except OSError as err:
        raise _write_error(path, err) from None
    _atomic_write_bytes(path, data)


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
    """config.toml (the resolved configuration, readable back with ``--config``),
    metrics.json (with ``data``: how the splits were encoded, e.g. the SFT truncation
    counts), metrics.csv (round 0 = ``initial``, the model before training, when
    given), samples.jsonl (the answers of tasks that generate) and, with ``plot``, curves.png;
    each written atomically."""
    from fedlora.simulate.config_file import CONFIG_TOML, config_toml
    from fedlora.simulate.tasks import get_task

    task = get_task(cfg.task)
    _atomic_write_bytes(out / CONFIG_TOML, config_toml(cfg).encode())
    _atomic_write_bytes(
        out / "metrics.json",
        json.dumps(
            {"config": cfg.to_json(), "data": data, "initial": initial, "rounds": rounds},
            indent=1,
            default=str,
        ).encode(),
    )
    cols = ["round", *task.columns, *TRAIN_COLUMNS]
    cols += ["epsilon"] if any("epsilon" in r for r in rounds) else []  # --- DP: ε so far
    rows = ([{"round": 0, **initial}] if initial else []) + list(rounds)
    lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    _atomic_write_bytes(out / "metrics.csv", ("\n".join(lines) + "\n").encode())
    samples = [
        json.dumps({"round": r["round"], **s}, ensure_ascii=False)
        for r in rows
        for s in r.get("samples", ())
    ]
    if samples:
        _atomic_write_bytes(out / "samples.jsonl", ("\n".join(samples) + "\n").encode())
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
    resolved: dict[str, Any] | None = None,
) -> None:
    """The checkpoint first (the source of truth a resume reads; ``resolved``: its
    :func:`run_record`), then the reports derived from it; every file is written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(out, cfg, rounds, global_state, initial, resolved)
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
        _atomic_write_bytes(path, figure_png(fig))
    finally:
        plt.close(fig)


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (rendered in memory; the caller writes them)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
