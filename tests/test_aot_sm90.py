"""GPU readiness without a GPU (DESIGN §3): every Triton kernel compiles for sm_90 (Hopper).

The Triton interpreter that checks the kernels' numerics on CPU accepts kernels the real compiler
rejects (shared-memory overflow, dot shapes, layouts). ``bench/aot_sm90.py`` compiles every kernel
ahead of time for ``GPUTarget("cuda", 90, 32)`` at every configuration its launcher chooses for
the benchmark shapes of DESIGN §8 (the launchers are replayed on meta tensors, so the configs are
theirs, not a copy), in every dtype case of the op table (``fedlora_kernels.ops.table``, mixed
dtypes included: a bf16 ``base_out`` with fp32 factors crashed the sm_90 compile before issue 18)
and both segment layouts. This test runs its ``--subset`` (one variant per kernel, tile config,
segment layout and pointer dtypes: the full set is ~700 variants) in a subprocess without
``TRITON_INTERPRET`` (conftest sets it for this process, and it takes effect when the kernel
modules are imported) and fails on any compile error or on a kernel that would not launch on an
H100/H200 for lack of shared memory. ``.ci/run`` compiles the same subset again under the GPU
machine's triton 3.6. Registers and spills are reported (``bench/results/aot-sm90.json``), not
asserted: they are performance signals and vary with the ptxas version. About a minute on 2
uncontended CPU cores.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = (
    "_multihead_triton",
    "_masked_lora_triton",
    "_masked_adamw_triton",
    "_masked_mean_triton",
    "_triton_utils",  # the fused variant's GEMM (FEDLORA_FUSED_GEMM=1)
)
#: sm_90's largest shared memory per block (227 KiB, opt-in)
SM90_MAX_SHARED = 227 * 1024


def _aot_supported() -> bool:
    """bench/aot_sm90.py specialises launches with the JIT's own binder (triton >= 3.9)."""
    from triton.runtime import jit

    return hasattr(jit, "create_function_from_signature") and hasattr(jit.JITFunction, "_pack_args")


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _aot_supported(), reason="needs triton >= 3.9 (JIT binder API)"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot-sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "aot_sm90.py"), "--subset", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert out.exists(), f"bench/aot_sm90.py wrote no report:\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90(report):
    proc, rep = report
    failed = [(v["kernel"], v["config"], v["error"][:800]) for v in rep["variants"] if "error" in v]
    assert not failed, f"{len(failed)} variants do not compile for sm_90: {failed[:3]}"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert rep["compiled"] > 0 and rep["failed"] == 0


def test_shared_memory_fits_sm90(report):
    _, rep = report
    over = [
        (v["kernel"], v["config"], v["shared_bytes"])
        for v in rep["variants"]
        if v["shared_bytes"] > SM90_MAX_SHARED
    ]
    assert not over, f"kernels needing more than 227 KiB of shared memory: {over}"


def test_every_kernel_and_shape_is_covered(report):
    """Every kernel of the ``_<op>_triton`` modules is compiled (a kernel the script's launcher
    replay misses fails here), each variant with its ptxas report."""
    _, rep = report
    kernels = set()
    for name in KERNEL_MODULES:
        mod = importlib.import_module(f"fedlora_kernels.ops.{name}")
        kernels |= {
            k for k, obj in vars(mod).items() if k.endswith("_kernel") and hasattr(obj, "fn")
        }
    assert kernels == set(rep["summary"]), (kernels, set(rep["summary"]))
    for v in rep["variants"]:
        assert v["shapes"] >= 1 and v["registers"] is not None and v["registers"] <= 255


def test_mixed_dtypes_and_both_segment_layouts_are_compiled(report):
    """The variants that crashed or did not exist before issue 18: a multi-head forward writing a
    bf16 output from fp32 factors (fp32 layer under autocast), the backward reading a bf16 dy
    against fp32 factors, and each row-tile kernel in both segment layouts."""
    _, rep = report
    by_kernel: dict[str, list] = {}
    for v in rep["variants"]:
        by_kernel.setdefault(v["kernel"], []).append(v)
    for kernel in ("_mh_fwd_kernel", "_mh_bwd_kernel", "_ml_fwd_kernel", "_ml_bwd_rows_kernel"):
        vs = by_kernel[kernel]
        assert {v["config"]["SINGLE"] for v in vs} == {True, False}, kernel
        assert any("fp32+base_bf16" in v["example_shape"] for v in vs), kernel
    assert any(v["config"].get("ADD_DX") for v in by_kernel["_mh_bwd_kernel"])
    assert any(v["config"].get("ADD_DX") for v in by_kernel["_ml_bwd_rows_kernel"])
    gemm = by_kernel["gemm_lora_kernel"]  # the fused variant, forward (bias) and backward
    assert {v["config"]["SINGLE"] for v in gemm} == {True, False}
