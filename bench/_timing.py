"""What every benchmark script in ``bench/`` shares: timers, rotated inputs, case timing, results.

- timers: :func:`do_bench_ms` (GPU: median of ``triton.testing.do_bench``, which flushes L2
  between runs, with the input set rotating over ``ROTATE`` copies so a large L2 cannot flatter
  memory-bound work) and :func:`wall_ms` (one call, wall clock: CPU dry runs of the GPU scripts);
- :func:`time_cases`: forward and forward+backward of several implementations of one function,
  the first being the floor, as the rows the GPU suites report;
- :func:`copy_gbps`: the device's copy bandwidth, the ceiling bandwidth rows are compared with;
- suites: :func:`load_suites` resolves ``"module:function"`` specs and keeps the import errors
  (reported, never dropped), :func:`skip_reason` says why a GPU suite cannot run here;
- results: :func:`environment` (date, versions, device), :func:`device_slug`,
  :func:`results_path`, :func:`write_results` (``bench/results/<slug>.json``);
- the CPU pytest-benchmark files: :func:`peft_lora_baseline`, :func:`benchmark_mode`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import itertools
import json
import platform
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
ROTATE = 8

Timer = Callable[[Callable[[int], object]], float]
Suite = Callable[["RunConfig"], list[dict]]


# ------------------------------------------------------------------------------------- timers
def do_bench_ms(fn: Callable[[int], object]) -> float:
    """Median milliseconds of ``fn(i)`` (``triton.testing.do_bench``), ``i`` cycling over the
    ``ROTATE`` input sets."""
    import triton.testing

    counter = itertools.count()
    return float(
        triton.testing.do_bench(
            lambda: fn(next(counter) % ROTATE), warmup=25, rep=200, return_mode="median"
        )
    )


def wall_ms(fn: Callable[[int], object]) -> float:
    """Wall-clock milliseconds of one call ``fn(0)``: checks a script on CPU, measures nothing."""
    t0 = time.perf_counter()
    fn(0)
    return (time.perf_counter() - t0) * 1e3


def peak_mib(fn: Callable[[int], object], device: str) -> float | None:
    """Peak CUDA memory above the starting point during one call of ``fn(0)``, in MiB (None
    off CUDA)."""
    if not str(device).startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(0)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a suite runs: ``quick`` (a few shapes), ``dry_run`` (tiny shapes, float32, one call
    per timing: on the GPU where there is one, else on the CPU with the torch backend), the
    timer, device, dtype and the ops' ``backend`` (None: by device)."""

    quick: bool = False
    dry_run: bool = False
    timer: Timer = do_bench_ms
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    backend: str | None = None

    @classmethod
    def for_args(cls, *, quick: bool, dry_run: bool) -> RunConfig:
        if dry_run:
            cuda = torch.cuda.is_available()
            device, backend = ("cuda", None) if cuda else ("cpu", "torch")
            return cls(quick, True, wall_ms, device, torch.float32, backend)
        return cls(quick=quick)


def rotated(make: Callable[[], torch.Tensor], n: int = ROTATE) -> list[torch.Tensor]:
    """``n`` independent input sets ``make()`` for the rotation of :func:`do_bench_ms`."""
    return [make() for _ in range(n)]


def time_cases(
    cases: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    xs: Sequence[torch.Tensor],
    gs: Sequence[torch.Tensor],
    run: RunConfig,
    params: Iterable[torch.Tensor] = (),
) -> list[dict]:
    """Forward and forward+backward of every case on the rotated inputs ``xs`` (which require
    grad) with output gradients ``gs``; the first case is the floor the ratios divide by.

    Gradients (of ``xs`` and ``params``) are reset after every backward, so no case pays for
    accumulating into an earlier call's. One dict per case: ``impl``, ``fwd_ms``,
    ``fwdbwd_ms``, ``peak_mib``, ``fwd_x_floor``, ``fwdbwd_x_floor``.
    """
    params = list(params)
    rows: list[dict] = []
    for name, f in cases.items():
        fwd = run.timer(lambda i, f=f: f(xs[i].detach()))

        def fb(i: int, f=f) -> None:
            f(xs[i]).backward(gs[i])
            for t in (xs[i], *params):
                t.grad = None

        fwdbwd = run.timer(fb)
        floor = rows[0] if rows else {"fwd_ms": fwd, "fwdbwd_ms": fwdbwd}
        rows.append(
            dict(
                impl=name,
                fwd_ms=fwd,
                fwdbwd_ms=fwdbwd,
                peak_mib=peak_mib(fb, run.device),
                fwd_x_floor=fwd / floor["fwd_ms"],
                fwdbwd_x_floor=fwdbwd / floor["fwdbwd_ms"],
            )
        )
    return rows


def copy_gbps(numel: int, dtype: torch.dtype, run: RunConfig) -> float:
    """GB/s of a device copy of ``numel`` elements (read + write), the bandwidth ceiling."""
    src = torch.empty(numel, device=run.device, dtype=dtype)
    dst = torch.empty_like(src)
    ms = run.timer(lambda i: dst.copy_(src))
    return 2 * numel * src.element_size() / ms / 1e6


def fmt_row(row: Mapping[str, Any]) -> str:
    """One printed line per result row."""
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


# ------------------------------------------------------------------------------------- suites
def load_suites(
    specs: Mapping[str, Suite | str],
) -> tuple[dict[str, Suite], dict[str, str]]:
    """Resolve suites: a callable as it is, a ``"module:function"`` string by importing it.

    Returns ``(loaded, broken)``; ``broken`` maps a suite whose import failed to its traceback,
    for the caller to print and fail on (a suite must never vanish from a run unnoticed).
    """
    loaded: dict[str, Suite] = {}
    broken: dict[str, str] = {}
    for name, spec in specs.items():
        if callable(spec):
            loaded[name] = spec
            continue
        module, _, attr = spec.partition(":")
        try:
            loaded[name] = getattr(importlib.import_module(module), attr)
        except Exception:  # any import-time error of a suite: reported, not swallowed
            broken[name] = traceback.format_exc()
    return loaded, broken


def skip_reason(run: RunConfig) -> str | None:
    """Why the GPU suites cannot run with ``run`` here, or None."""
    if run.dry_run:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (python bench/gpu.py --dry-run checks the script on the CPU)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (timing uses triton.testing.do_bench)"
    return None


# ------------------------------------------------------------------------------------- results
def device_slug(name: str) -> str:
    """A file-name form of a device name: ``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def device_name(device: str) -> str:
    """The CUDA device's name, or ``cpu-<machine>-<threads>threads``."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def environment(device: str, **extra: Any) -> dict[str, Any]:
    """The header of a results file: date (UTC), device, versions, then ``extra``."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if str(device).startswith("cuda"):
        env["cuda"] = torch.version.cuda
    env["python"] = platform.python_version()
    return {**env, **extra}


def results_path(device: str, *, prefix: str = "", suffix: str = "") -> Path:
    """``bench/results/<prefix><device slug><suffix>.json``."""
    return RESULTS / f"{prefix}{device_slug(device)}{suffix}.json"


def write_results(results: Mapping[str, Any], path: Path | None = None) -> Path:
    """Write ``results`` as JSON to ``path`` (default :func:`results_path` of its device)."""
    path = Path(path) if path is not None else results_path(results["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path


# ------------------------------------------------------------------------------------- CPU suite
def peft_lora_baseline(
    W: torch.Tensor,
    rank: int,
    *,
    alpha: float = 16.0,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
) -> torch.nn.Module | None:
    """PEFT's own LoRA layer around a frozen bias-free base of weight ``W`` (``A``/``B``
    copied in when given), or None when peft (or the fedlora API package) is not installed."""
    try:
        from fedlora.peft_compat import peft_lora_linear
    except ImportError:
        return None
    try:
        import peft  # noqa: F401
    except ImportError:
        return None
    base = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    base.weight.data.copy_(W)
    base.weight.requires_grad_(False)
    layer = peft_lora_linear(base, r=rank, alpha=alpha)
    if A is not None:
        layer.lora_A["default"].weight.data.copy_(A.detach())
    if B is not None:
        layer.lora_B["default"].weight.data.copy_(B.detach())
    return layer


def benchmark_mode(benchmark: Any, f: Callable[[], torch.Tensor], mode: str, **pedantic: Any):
    """Time ``f`` with pytest-benchmark: ``mode="fwd"`` under ``no_grad``, ``"fwdbwd"`` with a
    backward of the sum; ``pedantic`` (``rounds=``, ``warmup_rounds=``) fixes the rounds."""
    fn = f if mode == "fwd" else (lambda: f().sum().backward())
    run = (lambda: benchmark.pedantic(fn, **pedantic)) if pedantic else (lambda: benchmark(fn))
    if mode == "fwd":
        with torch.no_grad():
            return run()
    return run()
