"""Ahead-of-time compile of every Triton kernel for sm_90 (Hopper), on a machine without a GPU.

GPU readiness without a GPU (DESIGN §3): the Triton interpreter accepts kernels the compiler
rejects (shared-memory overflow, dot shapes, layouts), so every kernel is compiled here for the
real target, ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, at every
configuration its launcher chooses for the benchmark shapes of DESIGN §8 (N ∈ {256, 2048, 8192},
d ∈ {4096, 4096→14336}, R ∈ {16, 64}, heads ∈ {1, 4, 8}, aggregation over C ∈ {10, 100}
clients), in bf16 and fp32.

The configurations are not listed here: each launcher of ``fedlora_kernels.ops._<op>_triton``
is called on ``meta`` tensors of the benchmark shapes inside
:func:`fedlora_kernels.ops._triton_utils.record_launches`, so it runs its own tile choice
(``row_tile_config``, ``reduce_config``, ``adamw_config``, ``mean_config``) and flag logic and
hands over the launches it would make, with no data and no device. Each launch is specialised
exactly as Triton's JIT would specialise it on a GPU (its own binder: argument types, 16-byte
alignment and divisibility, integer 1 as a constant), duplicates are merged, and the distinct
variants are compiled in parallel. ptxas' own report (``-v``) gives registers, spills and stack
per variant; the compiled metadata gives shared memory.

``--subset`` compiles one representative per (kernel, tile config, dtypes): the variant with the
largest padded rank and the most optional features on (the most registers), so the CI test
(``tests/test_aot_sm90.py``) stays short; the default is the full set, written to
``bench/results/aot-sm90.json``.

Run: ``python bench/aot_sm90.py [--subset] [--out PATH] [--jobs N] [--require-triton 3.6]``
(any machine with triton 3.6 or newer: CI compiles the subset under its own triton 3.9 through
``tests/test_aot_sm90.py`` and again under the GPU machine's triton 3.6, installed apart, in
``.ci/run``; ``TRITON_INTERPRET`` is ignored: this script compiles for the real target).

The variants come from the op table (:mod:`fedlora_kernels.ops.table`): every dtype case of each
op (mixed ones included: a bf16 ``base_out`` with fp32 factors), both segment layouts (the
one-segment fast path and the segmented loop), and the launchers' optional paths (``base_out``,
``base_weight`` with the in-place input-gradient add, rank masks, every gradient subset).
"""

from __future__ import annotations

import os
import sys
import tempfile

# compile for the real target even when the caller runs the test suite's interpreter, and with a
# private cache: a cache hit would skip ptxas and with it the register report
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedlora-aot-")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, made explicit

import argparse
import concurrent.futures as cf
import contextlib
import datetime as _dt
import functools
import importlib
import io
import itertools
import json
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from fedlora_kernels.ops import (
    _masked_adamw_triton,
    _masked_lora_triton,
    _masked_mean_triton,
    _multihead_triton,
    _triton_utils,
)
from fedlora_kernels.ops._triton_utils import Launch, record_launches
from fedlora_kernels.ops.table import OPS as TABLE
from fedlora_kernels.ops.table import DtypeCase

_CACHE = os.environ["TRITON_CACHE_DIR"]
TARGET = GPUTarget("cuda", 90, 32)
KERNEL_MODULES = (
    _multihead_triton, _masked_lora_triton, _masked_adamw_triton, _masked_mean_triton,
    _triton_utils,
)  # fmt: skip
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "aot-sm90.json"

# the benchmark shapes of DESIGN §8
NS = (256, 2048, 8192)
DIMS = ((4096, 4096), (4096, 14336))
RANKS = (16, 64)
HEADS = (1, 4, 8)
CLIENTS = (10, 100)
#: multi-head (h, r): total rank h·r ∈ RANKS, and bench/gpu.py's r = 16 per head (h·r up to 128)
HEAD_RANKS = sorted({(h, R // h) for h in HEADS for R in RANKS} | {(h, 16) for h in HEADS})


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


#: segment layouts compiled: the one-segment fast path (no table: SINGLE) and a segmented
#: batch (3 segments over 2 slots, with its tile tables)
LAYOUTS = ("one-segment", "segments")
#: the dtype cases of the op table compiled at every benchmark shape; the others (mixed dtypes,
#: fp32 base outputs) at the shapes that choose every tile config (N = 256 and 8192)
FULL_CASES = ("fp32", "bf16", "bf16+base_bf16")
REDUCED_NS = (256, 8192)


def _plan(n: int, layout: str, blocks: tuple[int, ...], slots: int) -> dict[str, Any]:
    """Meta stand-ins for a RowSegments' tables: offsets, slots, one ``[3, T]`` table per row
    block and the ``[C, P]`` owner matrix of the last block (None for the one-segment path)."""
    if layout == "one-segment":
        return dict(offsets=None, adapter=None, tiles=[None] * len(blocks), owner=None)
    segs = 3
    tiles = [_meta(3, -(-n // b), dtype=torch.int32) for b in blocks]
    pairs = -(-n // blocks[-1]) + segs - 1
    return dict(
        offsets=_meta(segs + 1, dtype=torch.int64),
        adapter=_meta(segs, dtype=torch.int64),
        tiles=tiles,
        owner=_meta(slots, pairs),
    )


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _shapes(case: DtypeCase):
    ns = NS if case.name in FULL_CASES else REDUCED_NS
    return ns, DIMS


# ---------------------------------------------------------------- the launches, per op


def multihead_launches(case: DtypeCase) -> list[tuple[str, Launch]]:
    """Forward (alone, into ``base_out``, and owning the base GEMM: ``base_weight``) and backward
    (with and without the in-place input-gradient add) at every benchmark shape, one-segment and
    segmented, in the dtype case (``x``/factors, ``base_out``)."""
    out = []
    mh = _multihead_triton
    dt, bt = case.x, case.base
    ns, dims = _shapes(case)
    for n, (d_in, d_out), (h, r), layout in itertools.product(ns, dims, HEAD_RANKS, LAYOUTS):
        label = f"multihead N={n} d={d_in}->{d_out} h={h} r={r} {case.name} {layout}"
        fwd_cfg, bwd_cfg = mh.tile_configs(n, d_in, d_out, h * r)
        p = _plan(n, layout, (fwd_cfg["BM"], bwd_cfg["BM"]), 2)
        seg = (p["offsets"], p["adapter"], p["tiles"][0], p["tiles"][1], p["owner"], 0)
        bseg = (p["offsets"], p["adapter"], p["tiles"][1], p["owner"], 0)
        x = _meta(n, d_in, dtype=dt)
        A, B = _meta(h, r, d_in, dtype=dt), _meta(h, d_out, r, dtype=dt)
        H, s = _meta(2, h, r, r), _meta(2, h)
        S = _meta(n, h * r)
        with record_launches() as calls:
            if bt is None:
                mh._forward(x, A, B, H, s, *seg, None, 0.5)
                mh._backward_kernels(_meta(n, d_out, dtype=dt), S, A, B, H, s, *bseg, None, 0.5)
                W = _meta(d_out, d_in, dtype=dt)
                for fused in ("0", "1"):  # cuBLAS + in-place adds; the fused GEMM variant
                    with _env("FEDLORA_FUSED_GEMM", fused):
                        mh._forward(x, A, B, H, s, *seg, None, 0.5, None, W, _meta(d_out, dtype=dt))
                        mh._backward_kernels(
                            _meta(n, d_out, dtype=dt), S, A, B, H, s, *bseg, None, 0.5, dt, W
                        )
            else:
                mh._forward(x, A, B, H, s, *seg, None, 0.5, _meta(n, d_out, dtype=bt))
                mh._backward_kernels(_meta(n, d_out, dtype=bt), S, A, B, H, s, *bseg, None, 0.5, dt)
        out += [(label, c) for c in calls]
    return out


def masked_lora_launches(case: DtypeCase) -> list[tuple[str, Launch]]:
    """Forward with and without a rank mask (alone, into ``base_out``, owning the base GEMM);
    backward for every non-empty subset of the gradients (x, A, B) a caller can request, one-
    segment and segmented, in the dtype case."""
    out = []
    ml = _masked_lora_triton
    dt, bt = case.x, case.base
    ns, dims = _shapes(case)
    needs = [f for f in itertools.product((True, False), repeat=3) if any(f)]
    for n, (d_in, d_out), rank, use_rm, layout in itertools.product(
        ns, dims, RANKS, (False, True), LAYOUTS
    ):
        label = (
            f"masked_lora N={n} d={d_in}->{d_out} R={rank} rank_mask={use_rm} {case.name} {layout}"
        )
        rows_cfg, red_cfg = ml.tile_configs(n, d_in, d_out, rank)
        p = _plan(n, layout, (rows_cfg["BM"], red_cfg["CH"]), 2)
        seg = (p["offsets"], p["adapter"], p["tiles"][0], p["tiles"][1], p["owner"], 0)
        x = _meta(n, d_in, dtype=dt)
        A, B = _meta(2, rank, d_in, dtype=dt), _meta(2, d_out, rank, dtype=dt)
        segs = 1 if layout == "one-segment" else 3
        rm = _meta(segs, rank) if use_rm else None
        T = _meta(n, rank)
        dy = _meta(n, d_out, dtype=bt or dt)
        with record_launches() as calls:
            if bt is None:
                ml._forward(x, A, B, rm, None, *seg, 0.5)
                W = _meta(d_out, d_in, dtype=dt)
                for fused in ("0", "1"):  # cuBLAS + in-place adds; the fused GEMM variant
                    with _env("FEDLORA_FUSED_GEMM", fused):
                        ml._forward(x, A, B, rm, None, *seg, 0.5, None, W, _meta(d_out, dtype=dt))
                        ml._backward_kernels(
                            dy, x, T, A, B, rm, None, *seg, 0.5, True, True, True, W
                        )
            else:
                ml._forward(x, A, B, rm, None, *seg, 0.5, _meta(n, d_out, dtype=bt))
            for need in needs:
                ml._backward_kernels(dy, x, T, A, B, rm, None, *seg, 0.5, *need)
        out += [(label, c) for c in calls]
    return out


def masked_adamw_launches(case: DtypeCase) -> list[tuple[str, Launch]]:
    """The step on A ``[C, R, d_in]`` and B ``[C, d_out, R]`` factors, scalar and per-slot step
    numbers, with and without the importance update."""
    out = []
    dtype = case.x
    for c, rank, (d_in, d_out) in itertools.product(CLIENTS, RANKS, DIMS):
        for rank_dim, per_slot, imp in itertools.product((0, 1), (False, True), (False, True)):
            shape = (c, rank, d_in) if rank_dim == 0 else (c, d_out, rank)
            label = (
                f"masked_adamw_ C={c} {list(shape)} per_slot_step={per_slot} importance={imp} "
                f"{_dt_name(dtype)}"
            )
            p = [_meta(*shape, dtype=dtype) for _ in range(6)]
            steps = (_meta(c), _meta(c)) if per_slot else (None, None)
            with record_launches() as calls:
                _masked_adamw_triton._step(
                    p[0], p[1], p[2], p[3], _meta(c, rank, dtype=torch.int8),
                    p[4] if imp else None, p[5] if imp else None, *steps, c, rank_dim,
                    1e-3, 0.9, 0.999, 1e-8, 0.01, 1e-3, 1.0, 0.85, 0.85,
                )  # fmt: skip
            out += [(label, call) for call in calls]
    return out


def masked_mean_launches(case: DtypeCase) -> list[tuple[str, Launch]]:
    """The server reduction over C clients of A-like ``[R, d_in]`` (rank rows) and B-like
    ``[d_out, R]`` (rank columns) tensors, with and without a (float32) fallback."""
    out = []
    dtype = case.x
    mm = _masked_mean_triton
    for c, rank, (d_in, d_out), fb in itertools.product(CLIENTS, RANKS, DIMS, (False, True)):
        for rank_dim in (0, 1):
            label = (
                f"masked_mean C={c} R={rank} rank_dim={rank_dim} fallback={fb} {_dt_name(dtype)}"
            )
            shape = (rank, d_in) if rank_dim == 0 else (d_out, rank)
            views = [mm._as_3d(_meta(*shape, dtype=dtype), rank_dim) for _ in range(c)]
            fallback = mm._as_3d(_meta(*shape), rank_dim) if fb else None
            with record_launches() as calls:
                mm._launch(views, _meta(c, rank), _meta(rank), fallback, dtype)
            out += [(label, call) for call in calls]
    return out


#: the launch replay of each op of the table (fedlora_kernels.ops.table.OPS)
LAUNCHES = {
    "multihead_lora": multihead_launches,
    "masked_lora": masked_lora_launches,
    "masked_adamw_": masked_adamw_launches,
    "masked_weighted_mean": masked_mean_launches,
}


def _dt_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- specialisation, compile


def specialise(call: Launch) -> dict[str, Any]:
    """What Triton's JIT would compile for this launch on an sm_90 device: its own binder gives
    the signature, the constexprs (integer 1 included), the alignment attributes and options."""
    kernel: JITFunction = call.kernel
    backend = _backend()
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*call.args, **call.meta)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, dict(call.meta), bound, spec, opts
    )
    names = kernel.arg_names
    return dict(
        module=kernel.fn.__module__,
        kernel=kernel.__name__,
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        options=options.__dict__,
        config={names[k[0]]: v for k, v in sorted(constexprs.items()) if names[k[0]].isupper()}
        | {"num_warps": options.num_warps, "num_stages": options.num_stages},
        pointers={k: v for k, v in signature.items() if v.startswith("*")},
    )


@functools.cache
def _backend() -> Any:
    return make_backend(TARGET)


def variant_key(v: dict[str, Any]) -> str:
    return json.dumps(
        [v["kernel"], v["signature"], sorted(map(str, v["constexprs"].items())),
         sorted(map(str, v["attrs"].items())), v["config"]],
        sort_keys=True, default=str,
    )  # fmt: skip


_PTXAS_RE = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack_bytes": r"(\d+) bytes stack frame",
}


def compile_variant(v: dict[str, Any]) -> dict[str, Any]:
    """Compile one variant for sm_90; returns its resources or its error (never raises)."""
    from triton import knobs

    kernel = getattr(importlib.import_module(v["module"]), v["kernel"])
    src = ASTSource(
        fn=kernel, signature=v["signature"], constexprs=v["constexprs"], attrs=v["attrs"]
    )
    log = io.StringIO()
    start = time.perf_counter()
    try:
        has_knob = hasattr(knobs.nvidia, "dump_ptxas_log")
        if has_knob:
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v of the compile itself, printed
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=TARGET, options=v["options"])
    except Exception as err:
        return dict(error=f"{type(err).__name__}: {err}"[:4000], log=log.getvalue()[-4000:])
    seconds = time.perf_counter() - start
    text = log.getvalue() if has_knob else _rerun_ptxas(compiled.asm["ptx"])
    res: dict[str, Any] = {k: _first_int(p, text) for k, p in _PTXAS_RE.items()}
    res.update(
        shared_bytes=int(compiled.metadata.shared),
        compile_s=round(seconds, 2),
        wgmma="wgmma" in compiled.asm["ptx"],
    )
    return res


def _first_int(pattern: str, text: str) -> int | None:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else None


def _rerun_ptxas(ptx: str) -> str:
    """ptxas -v on the PTX (triton without the log knob): the wheel's ptxas-blackwell."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [str(tool), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(tmp) / "k.o")]
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stderr


# ---------------------------------------------------------------- selection, report


_FEATURES = (
    "ADD_BASE", "ADD_DX", "HAS_RM", "HAS_BIAS", "WRITE_DX", "WRITE_DS", "PER_SLOT", "HAS_IMP", "HAS_FB",
)  # fmt: skip
#: what makes a separate group in the subset: the tiles, and the segment layout (the one-segment
#: fast path and the segmented loop are different code)
_TILES = ("BM", "BK", "BN", "RB", "BD", "BLOCK", "num_warps", "num_stages", "SINGLE")


def representatives(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The subset rule: per (kernel, tile config, segment layout, pointer dtypes: every dtype
    case of the op table), the variant with the largest padded rank, then the most optional
    features on, i.e. the most register pressure."""
    best: dict[str, tuple[tuple, str]] = {}
    for key, v in variants.items():
        cfg = v["config"]
        group = json.dumps([v["kernel"], {t: cfg.get(t) for t in _TILES}, v["pointers"]])
        rank = cfg.get("RP", cfg.get("R", 0))
        score = (rank if isinstance(rank, int) else 0, sum(bool(cfg.get(f)) for f in _FEATURES))
        if group not in best or score > best[group][0]:
            best[group] = (score, key)
    return {key: variants[key] for _, key in best.values()}


def collect(subset: bool) -> dict[str, dict[str, Any]]:
    """Every distinct variant the launchers choose at the benchmark shapes, with the shapes that
    chose it."""
    variants: dict[str, dict[str, Any]] = {}
    for entry in TABLE:
        for label, call in itertools.chain.from_iterable(
            LAUNCHES[entry.name](case) for case in entry.dtypes
        ):
            v = specialise(call)
            key = variant_key(v)
            variants.setdefault(key, v).setdefault("chosen_by", []).append(label)
    return representatives(variants) if subset else variants


def run(subset: bool, jobs: int) -> dict[str, Any]:
    variants = collect(subset)
    start = time.perf_counter()
    with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(compile_variant, variants.values()))
    rows = []
    for v, res in zip(variants.values(), results, strict=True):
        rows.append(
            dict(
                kernel=v["kernel"],
                config=v["config"],
                dtypes=",".join(sorted({t[1:] for t in v["pointers"].values()})),
                **res,
                shapes=len(v["chosen_by"]),
                example_shape=v["chosen_by"][0],
            )
        )
    rows.sort(key=lambda r: (r["kernel"], json.dumps(r["config"], sort_keys=True)))
    return dict(
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        target="cuda sm_90 (GPUTarget('cuda', 90, 32)), ptxas of the triton wheel",
        triton=triton.__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        selection="subset: one per (kernel, tile config, dtypes), most registers"
        if subset
        else "full: every distinct variant the launchers choose at the benchmark shapes",
        shapes=dict(
            N=NS,
            d=DIMS,
            R=RANKS,
            heads_r=HEAD_RANKS,
            clients=CLIENTS,
            dtype_cases={e.name: [c.name for c in e.dtypes] for e in TABLE},
            full_cases=FULL_CASES,
            reduced_N=REDUCED_NS,
            layouts=LAYOUTS,
        ),
        compiled=len(rows),
        failed=sum("error" in r for r in rows),
        spilling=sum(bool(r.get("spill_stores")) for r in rows),
        compile_wall_s=round(time.perf_counter() - start, 1),
        summary=summarise(rows),
        variants=rows,
    )


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kernel: variants, failures, the worst registers / spills / shared memory."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = out.setdefault(
            r["kernel"],
            dict(variants=0, failed=0, max_registers=0, max_spill_stores=0, max_shared_bytes=0,
                 spilling=[]),
        )  # fmt: skip
        s["variants"] += 1
        if "error" in r:
            s["failed"] += 1
            continue
        s["max_registers"] = max(s["max_registers"], r["registers"] or 0)
        s["max_spill_stores"] = max(s["max_spill_stores"], r["spill_stores"] or 0)
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r["shared_bytes"])
        if r["spill_stores"]:
            s["spilling"].append(r["config"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subset", action="store_true", help="one variant per tile config")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile workers")
    parser.add_argument(
        "--require-triton",
        metavar="VERSION",
        help="fail unless this triton version (prefix, e.g. 3.6) is the one imported (CI's "
        "second compile, under the GPU machine's triton, must not silently use another)",
    )
    args = parser.parse_args(argv)
    if args.require_triton and not triton.__version__.startswith(args.require_triton):
        print(
            f"triton {triton.__version__} imported from {triton.__file__}, but "
            f"--require-triton {args.require_triton}",
            file=sys.stderr,
        )
        return 2
    try:
        report = run(args.subset, max(1, args.jobs))
    finally:
        shutil.rmtree(_CACHE, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    for name, s in report["summary"].items():
        print(
            f"{name:22s} variants={s['variants']:3d} failed={s['failed']} "
            f"max_regs={s['max_registers']} max_spill_stores={s['max_spill_stores']}B "
            f"max_shared={s['max_shared_bytes']}B"
        )
    for r in report["variants"]:
        if "error" in r:
            print(f"FAILED {r['kernel']} {r['config']}: {r['error'][:500]}", file=sys.stderr)
    print(f"{report['compiled']} variants in {report['compile_wall_s']} s -> {args.out}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
