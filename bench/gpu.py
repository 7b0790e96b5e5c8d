"""GPU benchmarks (DESIGN §8): our kernels beside the floor and the tools users would pick instead.

Protocol: bf16; median of ``triton.testing.do_bench`` (which flushes L2 between runs) over a
rotation of 8 input sets so a 50 MB L2 cannot flatter memory-bound work; one run measures every
baseline. Rows report milliseconds, overhead % over bare ``F.linear`` (the floor) and peak memory.
Results go to ``bench/results/<device>.json`` with the date, versions and device name.

    python bench/gpu.py                 # everything
    python bench/gpu.py --quick         # a few shapes, to check the script
    python bench/gpu.py --only multihead
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT.parent / "python_api"))

import fedlora_kernels as fk  # noqa: E402

ROTATE = 8


def bench_ms(fn: Callable[[int], object]) -> float:
    """Median milliseconds of ``fn(i)``, ``i`` cycling over the rotated input sets."""
    import triton.testing

    counter = itertools.count()
    return float(
        triton.testing.do_bench(
            lambda: fn(next(counter) % ROTATE), warmup=25, rep=200, return_mode="median"
        )
    )


def peak_mib(fn: Callable[[int], object]) -> float:
    """Peak CUDA memory allocated during one call of ``fn(0)``, in MiB above the baseline."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(0)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def multihead_rows(quick: bool) -> list[dict]:
    """Base + multi-head adapter, forward and forward+backward, against F.linear and eager torch."""
    dev, dt = "cuda", torch.bfloat16
    shapes = [
        (n, d_in, d_out) for n in (256, 2048, 8192) for d_in, d_out in ((4096, 4096), (4096, 14336))
    ]
    configs = [(1, 16), (4, 16), (8, 16), (4, 4), (1, 64)]  # (heads, r): R = h·r ∈ {16, 64, 128}
    if quick:
        shapes, configs = [(8192, 4096, 4096)], [(4, 16)]
    rows = []
    for (n, d_in, d_out), (h, r) in itertools.product(shapes, configs):
        W = torch.randn(d_out, d_in, device=dev, dtype=dt) / d_in**0.5
        A = torch.randn(h, r, d_in, device=dev, dtype=dt) / d_in**0.5
        B = torch.randn(h, d_out, r, device=dev, dtype=dt) / r**0.5
        H = torch.randn(1, h, r, r, device=dev, requires_grad=True)
        s = torch.ones(1, h, device=dev, requires_grad=True)
        xs = [torch.randn(n, d_in, device=dev, dtype=dt, requires_grad=True) for _ in range(ROTATE)]
        gs = [torch.randn(n, d_out, device=dev, dtype=dt) for _ in range(ROTATE)]
        a_cat = A.reshape(h * r, d_in)
        b_cat = B.permute(1, 0, 2).reshape(d_out, h * r)

        def ours(x):
            return fk.multihead_lora(x, A, B, H, s, scale=0.5, base_out=F.linear(x, W))

        def ours_unfused(x):
            return F.linear(x, W) + fk.multihead_lora(x, A, B, H, s, scale=0.5)

        def eager(x):
            # what a user writes in plain PyTorch: shrink, per-head core, expand, scale, add
            S = (x @ a_cat.T).view(n, h, r)
            T = torch.einsum("nhk,hjk->nhj", S, H[0].to(dt)) * s[0].to(dt)[None, :, None]
            return F.linear(x, W) + (T.reshape(n, h * r) @ b_cat.T) * 0.5

        cases = {
            "F.linear": lambda x: F.linear(x, W),
            "eager torch": eager,
            "fedlora (separate add)": ours_unfused,
            "fedlora": ours,
        }
        floor_f = floor_fb = None
        for name, f in cases.items():
            fwd = bench_ms(lambda i, f=f: f(xs[i].detach()))

            def fb(i, f=f):
                y = f(xs[i])
                y.backward(gs[i])

            fwdbwd = bench_ms(fb)
            mem = peak_mib(fb)
            if name == "F.linear":
                floor_f, floor_fb = fwd, fwdbwd
            rows.append(
                dict(
                    bench="multihead_lora",
                    impl=name,
                    N=n,
                    d_in=d_in,
                    d_out=d_out,
                    heads=h,
                    r=r,
                    fwd_ms=fwd,
                    fwdbwd_ms=fwdbwd,
                    peak_mib=mem,
                    fwd_x_floor=fwd / floor_f,
                    fwdbwd_x_floor=fwdbwd / floor_fb,
                    fwd_tflops=2 * n * d_in * d_out / fwd / 1e9,
                )
            )
            print(_fmt(rows[-1]), flush=True)
    return rows


def masked_mean_rows(quick: bool) -> list[dict]:
    """masked_weighted_mean bandwidth against a device copy of the same bytes."""
    dev = "cuda"
    out = []
    for clients, numel in ((10, 8 << 20), (100, 8 << 20)) if not quick else ((100, 8 << 20),):
        xs = [torch.randn(64, numel // 64, device=dev) for _ in range(clients)]
        w = torch.rand(clients, device=dev)
        mask = (torch.rand(clients, 64, device=dev) > 0.3).float()
        ms = bench_ms(lambda i: fk.masked_weighted_mean(xs, w, mask, rank_dim=0))
        src = torch.empty(clients * numel, device=dev)
        dst = torch.empty_like(src)
        copy_ms = bench_ms(lambda i: dst.copy_(src))
        moved = (clients + 1) * numel * 4
        row = dict(
            bench="masked_weighted_mean",
            clients=clients,
            numel=numel,
            ms=ms,
            gbps=moved / ms / 1e6,
            copy_gbps=2 * clients * numel * 4 / copy_ms / 1e6,
        )
        row["x_copy_bw"] = row["gbps"] / row["copy_gbps"]
        print(_fmt(row), flush=True)
        out.append(row)
    return out


def _fmt(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


SUITES: dict[str, Callable[[bool], list[dict]]] = {
    "multihead": multihead_rows,
    "masked_mean": masked_mean_rows,
}


def _load_extra_suites() -> None:
    try:
        from gpu_masked import bench_masked  # written beside this file
    except ImportError:
        return
    SUITES["masked"] = lambda quick: bench_masked(quick=quick)


def main() -> None:
    _load_extra_suites()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one shape per suite")
    parser.add_argument(
        "--only", choices=sorted(SUITES), action="append", help="run only these suites"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/<device>.json)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device")
    import triton

    device = torch.cuda.get_device_name()
    results = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "protocol": f"bf16, median of triton.testing.do_bench over {ROTATE} rotated input sets",
        "rows": [],
    }
    for name in args.only or list(SUITES):
        print(f"== {name}", flush=True)
        try:
            results["rows"] += SUITES[name](args.quick)
        except Exception as exc:  # keep the other suites' numbers if one fails
            print(f"suite {name} failed: {exc!r}", flush=True)
            results.setdefault("failures", {})[name] = repr(exc)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    out = args.out or ROOT / "results" / f"{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
