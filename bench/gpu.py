"""GPU benchmarks (DESIGN §8): our kernels beside the floor and the tools users would pick instead.

Protocol: bf16; median of ``triton.testing.do_bench`` (which flushes L2 between runs) over a
rotation of 8 input sets so a 50 MB L2 cannot flatter memory-bound work; one run measures every
baseline. Rows report milliseconds, overhead % over bare ``F.linear`` (the floor) and peak memory.
Results go to ``bench/results/<device>.json`` (or ``--out``) with the date, versions and device
name, rewritten after every row: a run cut short keeps every row measured before the cut.

    python bench/gpu.py                 # everything
    python bench/gpu.py --quick         # the goal shapes only (N=8192, d=4096, R=64): ~1 min
    python bench/gpu.py --only multihead
    python bench/gpu.py --list          # the suites and whether each imports
    python bench/gpu.py --dry-run       # every suite at tiny shapes (CPU without a GPU): a check

Exit status: 0 when every suite ran (or all were skipped for the reason printed, e.g. no CUDA
device); 1 when a suite failed to import or raised, with its traceback printed and recorded
under ``failures`` in the results.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT.parent / "python_api"))

from _rows import emit, sink  # noqa: E402
from _timing import (  # noqa: E402
    ROTATE,
    RunConfig,
    Suite,
    copy_gbps,
    environment,
    load_suites,
    rotated,
    skip_reason,
    time_cases,
    write_results,
)


def multihead_rows(run: RunConfig) -> list[dict]:
    """Base + multi-head adapter, forward and forward+backward, against F.linear and eager torch."""
    import fedlora_kernels as fk

    dev, dt = run.device, run.dtype
    shapes = [
        (n, d_in, d_out) for n in (256, 2048, 8192) for d_in, d_out in ((4096, 4096), (4096, 14336))
    ]
    configs = [(1, 16), (4, 16), (8, 16), (4, 4), (1, 64)]  # (heads, r): R = h·r ∈ {16, 64, 128}
    if run.quick:
        shapes, configs = [(8192, 4096, 4096)], [(4, 16)]
    if run.dry_run:
        shapes, configs = [(37, 24, 40)], [(2, 3)]
    rows = []
    for (n, d_in, d_out), (h, r) in itertools.product(shapes, configs):
        W = torch.randn(d_out, d_in, device=dev, dtype=dt) / d_in**0.5
        A = torch.randn(h, r, d_in, device=dev, dtype=dt) / d_in**0.5
        B = torch.randn(h, d_out, r, device=dev, dtype=dt) / r**0.5
        H = torch.randn(1, h, r, r, device=dev, requires_grad=True)
        s = torch.ones(1, h, device=dev, requires_grad=True)
        xs = rotated(lambda: torch.randn(n, d_in, device=dev, dtype=dt, requires_grad=True))
        gs = rotated(lambda: torch.randn(n, d_out, device=dev, dtype=dt))
        a_cat = A.reshape(h * r, d_in)
        b_cat = B.permute(1, 0, 2).reshape(d_out, h * r)
        kw = dict(scale=0.5, backend=run.backend)

        def eager(x):
            # what a user writes in plain PyTorch: shrink, per-head core, expand, scale, add
            S = (x @ a_cat.T).view(n, h, r)
            T = torch.einsum("nhk,hjk->nhj", S, H[0].to(dt)) * s[0].to(dt)[None, :, None]
            return F.linear(x, W) + (T.reshape(n, h * r) @ b_cat.T) * 0.5

        cases = {
            "F.linear": lambda x: F.linear(x, W),
            "eager torch": eager,
            "fedlora (separate add)": lambda x: (
                F.linear(x, W) + fk.multihead_lora(x, A, B, H, s, **kw)
            ),
            "fedlora (base_out)": lambda x: fk.multihead_lora(
                x, A, B, H, s, base_out=F.linear(x, W), **kw
            ),
            # the layers' path: the op owns the frozen base GEMM, adds in place both ways
            "fedlora": lambda x: fk.multihead_lora(x, A, B, H, s, base_weight=W, **kw),
        }
        shape = dict(N=n, d_in=d_in, d_out=d_out, heads=h, r=r)
        for case in time_cases(cases, xs, gs, run, params=(H, s)):
            row = {"bench": "multihead_lora", "impl": case.pop("impl"), **shape, **case}
            row["fwd_tflops"] = 2 * n * d_in * d_out / case["fwd_ms"] / 1e9
            rows.append(emit(row))
    return rows


def masked_mean_rows(run: RunConfig) -> list[dict]:
    """masked_weighted_mean bandwidth against a device copy of the same bytes."""
    import fedlora_kernels as fk

    dev = run.device
    sizes = ((10, 8 << 20), (100, 8 << 20))
    if run.quick:
        sizes = ((100, 8 << 20),)
    if run.dry_run:
        sizes = ((3, 64 * 5),)
    out = []
    for clients, numel in sizes:
        xs = [torch.randn(64, numel // 64, device=dev) for _ in range(clients)]
        w = torch.rand(clients, device=dev)
        mask = (torch.rand(clients, 64, device=dev) > 0.3).float()
        ms = run.timer(
            lambda i: fk.masked_weighted_mean(xs, w, mask, rank_dim=0, backend=run.backend)
        )
        moved = (clients + 1) * numel * 4
        row = dict(
            bench="masked_weighted_mean",
            clients=clients,
            numel=numel,
            ms=ms,
            gbps=moved / ms / 1e6,
            copy_gbps=copy_gbps(clients * numel, torch.float32, run),
        )
        row["x_copy_bw"] = row["gbps"] / row["copy_gbps"]
        out.append(emit(row))
    return out


#: Every suite: a function here, or ``"module:function"`` of a file beside this one (imported
#: when the run starts; a suite that fails to import fails the run).
#: In run order: the goal shapes' suites first (masked LoRA and its optimizer step, then the
#: multi-head adapter), the server's aggregation last.
SUITES: dict[str, Suite | str] = {
    "masked": "gpu_masked:suite",
    "multihead": multihead_rows,
    "masked_mean": masked_mean_rows,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/gpu.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="one shape per suite")
    parser.add_argument(
        "--only", choices=sorted(SUITES), action="append", help="run only these suites"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/<device>.json)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--list", action="store_true", help="list the suites, whether each imports, and exit"
    )
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="run every suite at tiny shapes, one call per timing (on the CPU with the torch "
        "backend where there is no GPU) to check the script; writes results only with --out",
    )
    return parser.parse_args(argv)


def _report_broken(broken: dict[str, str]) -> None:
    for name, tb in broken.items():
        print(f"suite {name} failed to import:\n{tb}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run and not torch.cuda.is_available():
        # the masked suite calls Triton launchers directly: on the CPU, in the interpreter, which
        # must be chosen before any kernel module is imported (DESIGN §3)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    suites, broken = load_suites({k: SUITES[k] for k in args.only or SUITES})
    _report_broken(broken)
    if args.list:
        for name in SUITES:
            status = "import error" if name in broken else "ok" if name in suites else "not chosen"
            print(f"{name}: {status}")
        return 1 if broken else 0
    run = RunConfig.for_args(quick=args.quick, dry_run=args.dry_run)
    reason = skip_reason(run)
    if reason is not None:
        for name in suites:
            print(f"suite {name} skipped: {reason}", flush=True)
        print("nothing measured; no results written", flush=True)
        return 1 if broken else 0
    results = environment(
        run.device,
        protocol=f"bf16, median of triton.testing.do_bench over {ROTATE} rotated input sets"
        if not run.dry_run
        else "dry run: tiny shapes, one call per timing (not a measurement)",
        rows=[],
    )
    failures = {name: tb.strip().splitlines()[-1] for name, tb in broken.items()}
    save = not (run.dry_run and args.out is None)
    torch.manual_seed(0)
    results["complete"] = False

    def save_now() -> None:
        if save:  # a run cut short by its time limit keeps every row written so far
            write_results({**results, "failures": failures} if failures else results, args.out)

    def on_row(row: dict) -> None:  # every row, as soon as it is measured
        results["rows"].append(row)
        save_now()

    with sink(on_row):
        for name, suite in suites.items():
            print(f"== {name}", flush=True)
            try:
                returned = suite(run)
                seen = {id(r) for r in results["rows"]}
                results["rows"] += [r for r in returned if id(r) not in seen]
            except KeyboardInterrupt:  # gpu_all.sh's time limit: keep what was measured
                print(f"suite {name} interrupted; its earlier rows are saved", file=sys.stderr)
                failures[name] = "interrupted (time limit)"
                break
            except Exception as exc:  # keep the other suites' numbers, then fail the run
                traceback.print_exc()
                print(f"suite {name} failed: {exc!r}", file=sys.stderr, flush=True)
                failures[name] = repr(exc)
            save_now()
        else:
            results["complete"] = True
    if failures:
        results["failures"] = failures
    if not save:
        print(f"dry run: {len(results['rows'])} rows; no results written (give --out)")
    else:
        print(f"wrote {write_results(results, args.out)}")
    if failures:
        print(f"FAILED suites: {sorted(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
