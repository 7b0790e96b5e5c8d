"""GPU readiness checked without a GPU (issue 18), and the checks a GPU run adds.

* every dtype case of the op table (:mod:`fedlora_kernels.ops.table`), mixed ones included (a bf16
  ``base_out`` with fp32 factors, as an fp32 layer under ``torch.autocast`` passes), through the
  Triton kernels (interpreter here, sm_90 on a GPU) against :mod:`fedlora_kernels.reference`;
* the segment plan: built once per batch, shared by every layer (:func:`fedlora.layers.route`),
  and the op path of a layer launches a constant, small number of torch ops however many
  segments the batch has, with no host sync (counted here with a dispatch mode; on a GPU the
  layers run under ``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from conftest import BACKENDS, DEVICES
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fedlora
import fedlora_kernels as fk
from fedlora.layers import SegmentPlan, route
from fedlora_kernels import reference
from fedlora_kernels.ops.table import ADAPTER_DTYPES, OPS

needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
HAS_CUDA = torch.cuda.is_available()


def _rel_tol(dtype: torch.dtype) -> float:
    """One rounding of the output to ``dtype`` (the kernels accumulate in float32): bf16 keeps
    8 bits (2^-8), float32 results differ from the float64 oracle by summation order only."""
    return 2.0**-7 if dtype == torch.bfloat16 else 1e-5


def _close(got: torch.Tensor, exp: torch.Tensor, dtype: torch.dtype) -> None:
    scale = exp.abs().max().clamp_min(1e-6)
    err = ((got.double() - exp.double()).abs().max() / scale).item()
    assert err <= 4 * _rel_tol(dtype), f"relative error {err:.3g} for {dtype}"


def _segments(n: int) -> tuple[list[int], list[int]]:
    return [0, n // 3, n // 3, n], [2, 0, 1]  # an empty segment, slots out of order


# ------------------------------------------------------------------ mixed dtypes, interpreter


@needs_triton
@pytest.mark.parametrize("case", ADAPTER_DTYPES, ids=lambda c: c.name)
@pytest.mark.parametrize("planned", [False, True], ids=["one-segment", "segments"])
@pytest.mark.parametrize("device", DEVICES)
def test_multihead_every_dtype_case_matches_reference(case, planned, device):
    n, d_in, d_out, h, r, C = 37, 24, 40, 2, 3, 3
    dev = torch.device(device)
    x = torch.randn(n, d_in, device=dev).to(case.x).requires_grad_(True)
    A = (torch.randn(h, r, d_in, device=dev) / d_in**0.5).to(case.x)
    B = (torch.randn(h, d_out, r, device=dev) / r**0.5).to(case.x)
    H = torch.randn(C, h, r, r, device=dev, requires_grad=True)
    s = (torch.rand(C, h, device=dev) + 0.5).requires_grad_(True)
    base = None
    if case.base:
        base = torch.randn(n, d_out, device=dev).to(case.base).requires_grad_(True)
    offs, slots = _segments(n) if planned else ([0, n], [1])
    segs = fk.RowSegments(offs, slots, device=dev)
    y = fk.multihead_lora(x, A, B, H, s, scale=0.5, base_out=base, segments=segs, backend="triton")
    assert y.dtype == (case.base or case.x)
    g = torch.randn_like(y)
    inputs = (x, H, s) + ((base,) if base is not None else ())
    got = torch.autograd.grad(y, inputs, g)
    assert got[0].dtype == case.x  # dx in x's dtype, even when dy comes in base_out's

    x64, H64, s64 = (t.detach().double().requires_grad_(True) for t in (x, H, s))
    y64 = reference.multihead_lora(
        x64, A.double(), B.double(), H64, s64, scale=0.5, seg_offsets=segs.offsets,
        seg_adapter=segs.slots, head_mask=None,
    )  # fmt: skip
    if base is not None:
        y64 = y64 + base.detach().double()
    _close(y, y64, y.dtype)
    exp = torch.autograd.grad(y64, (x64, H64, s64), g.double())
    for gt, ex in zip(got[:3], exp, strict=True):
        _close(gt, ex, case.x)
    if base is not None:
        assert torch.equal(got[3], g.to(base.dtype))


@needs_triton
@pytest.mark.parametrize("case", ADAPTER_DTYPES, ids=lambda c: c.name)
@pytest.mark.parametrize("planned", [False, True], ids=["one-segment", "segments"])
@pytest.mark.parametrize("device", DEVICES)
def test_masked_lora_every_dtype_case_matches_reference(case, planned, device):
    n, d_in, d_out, R, C = 37, 24, 40, 6, 3
    dev = torch.device(device)
    x = torch.randn(n, d_in, device=dev).to(case.x).requires_grad_(True)
    A = (torch.randn(C, R, d_in, device=dev) / d_in**0.5).to(case.x).requires_grad_(True)
    B = (torch.randn(C, d_out, R, device=dev) / R**0.5).to(case.x).requires_grad_(True)
    base = None
    if case.base:
        base = torch.randn(n, d_out, device=dev).to(case.base).requires_grad_(True)
    offs, slots = _segments(n) if planned else ([0, n], [1])
    segs = fk.RowSegments(offs, slots, device=dev)
    keep = torch.tensor([[6], [4], [2]][: len(slots)], device=dev)
    rank_mask = (torch.arange(R, device=dev)[None, :] < keep).float()
    y = fk.masked_lora(
        x, A, B, scale=0.5, rank_mask=rank_mask, base_out=base, segments=segs, backend="triton"
    )
    assert y.dtype == (case.base or case.x)
    g = torch.randn_like(y)
    inputs = (x, A, B) + ((base,) if base is not None else ())
    got = torch.autograd.grad(y, inputs, g)
    assert got[0].dtype == case.x

    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    y64 = reference.masked_lora(
        x64, A64, B64, scale=0.5, rank_mask=rank_mask, grad_mask=None, seg_offsets=segs.offsets,
        seg_adapter=segs.slots,
    )  # fmt: skip
    if base is not None:
        y64 = y64 + base.detach().double()
    _close(y, y64, y.dtype)
    exp = torch.autograd.grad(y64, (x64, A64, B64), g.double())
    for gt, ex in zip(got[:3], exp, strict=True):
        _close(gt, ex, case.x)
    if base is not None:
        assert torch.equal(got[3], g.to(base.dtype))


@needs_triton
@pytest.mark.parametrize("cls", [fedlora.LoRALinear, fedlora.RavanLinear])
def test_fp32_layer_under_autocast_matches_the_reference_path(cls, monkeypatch):
    """The case that crashed on sm_90: an fp32 layer under autocast(bf16) hands the op a bf16
    base output with fp32 factors. Triton (interpreter) and the torch path agree."""
    torch.manual_seed(0)
    layer = cls(nn.Linear(32, 24), num_clients=2, **_layer_kw(cls))
    _randomise(layer)
    x = torch.randn(3, 5, 32)
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FEDLORA_BACKEND", backend)
        route(layer, SegmentPlan([0, 1, 3], [1, 0]))
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xr)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        layer.zero_grad()
        out[backend] = (y.float(), xr.grad, grads)
    y_t, gx_t, gp_t = out["torch"]
    y_k, gx_k, gp_k = out["triton"]
    _close(y_k, y_t, torch.bfloat16)
    _close(gx_k, gx_t, torch.bfloat16)  # dy is bf16 on both paths
    for a, b in zip(gp_k, gp_t, strict=True):
        _close(a, b, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["multihead_lora", "masked_lora"])
@pytest.mark.parametrize("planned", [False, True], ids=["one-segment", "segments"])
@pytest.mark.parametrize("fused", ["0", "1"], ids=["cublas+in-place", "fused-gemm"])
def test_base_weight_computes_the_whole_layer(op, planned, backend, fused, monkeypatch):
    """With ``base_weight`` the op owns the base GEMM: ``x Wᵀ + b + adapter`` and the whole
    input gradient ``dy W + adapter's``, W and b frozen; either cuBLAS plus the kernels'
    in-place accumulation (default) or the fused variant (``FEDLORA_FUSED_GEMM=1``: the Triton
    GEMM with the expand in its epilogue, forward and backward)."""
    if backend == "torch" and fused == "1":
        pytest.skip("the fused variant is a Triton path")
    monkeypatch.setenv("FEDLORA_FUSED_GEMM", fused)
    n, d_in, d_out, C = 37, 24, 40, 3
    x = torch.randn(n, d_in, requires_grad=True)
    W, b = torch.randn(d_out, d_in) / d_in**0.5, torch.randn(d_out)
    offs, slots = _segments(n) if planned else ([0, n], [1])
    segs = fk.RowSegments(offs, slots)
    if op == "multihead_lora":
        A, B = torch.randn(2, 3, d_in) / 5, torch.randn(2, d_out, 3) / 2
        H = torch.randn(C, 2, 3, 3, requires_grad=True)
        s = (torch.rand(C, 2) + 0.5).requires_grad_(True)
        params = (H, s)

        def f(**kw):
            return fk.multihead_lora(x, A, B, H, s, scale=0.5, segments=segs, **kw)
    else:
        A = (torch.randn(C, 5, d_in) / 5).requires_grad_(True)
        B = (torch.randn(C, d_out, 5) / 2).requires_grad_(True)
        params = (A, B)

        def f(**kw):
            return fk.masked_lora(x, A, B, scale=0.5, segments=segs, **kw)

    y = f(base_weight=W, base_bias=b, backend=backend)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, *params), g)
    y_sep = torch.nn.functional.linear(x, W, b) + f(backend="torch")
    exp = torch.autograd.grad(y_sep, (x, *params), g)
    _close(y, y_sep, torch.float32)
    for a, e in zip(got, exp, strict=True):
        _close(a, e, torch.float32)
    with pytest.raises(ValueError, match=r"base_out .* or base_weight, not both"):
        f(base_weight=W, base_out=y.detach(), backend=backend)
    with pytest.raises(ValueError, match="base_weight must be frozen"):
        f(base_weight=W.clone().requires_grad_(True), backend=backend)
    with pytest.raises(ValueError, match=r"base_weight must have shape \[40, 24\]"):
        f(base_weight=W.T, backend=backend)


# ------------------------------------------------------------------------ the segment plan


def _layer_kw(cls):
    return dict(rank=4) if cls is fedlora.LoRALinear else dict(heads=2, rank=4)


def _randomise(layer):
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)


def _model(cls, slots=4):
    torch.manual_seed(0)
    model = nn.Sequential(
        cls(nn.Linear(32, 24), num_clients=slots, **_layer_kw(cls)),
        nn.GELU(),
        cls(nn.Linear(24, 16), num_clients=slots, **_layer_kw(cls)),
    )
    for m in model:
        _randomise(m)
    return model


@pytest.mark.parametrize("cls", [fedlora.LoRALinear, fedlora.RavanLinear])
@pytest.mark.parametrize("backend", BACKENDS)
def test_route_equals_set_segments_and_shares_one_plan(cls, backend, monkeypatch):
    monkeypatch.setenv("FEDLORA_BACKEND", backend)
    model = _model(cls)
    x = torch.randn(6, 5, 32)
    offs, slots = torch.tensor([0, 2, 2, 6]), torch.tensor([3, 1, 0])
    for m in (model[0], model[2]):
        m.set_segments(offs, slots)
    y_each = model(x)
    plan = SegmentPlan(offs, slots)
    route(model, plan)
    assert model[0].segment_plan is plan and model[2].segment_plan is plan
    y_plan = model(x)
    torch.testing.assert_close(y_plan, y_each, atol=1e-5, rtol=1e-5)
    # the two layers share the plan's kernel tables (planned once, for the first layer)
    assert model[0].row_segments(x) is model[2].row_segments(torch.randn(6, 5, 24))
    route(model, None)
    assert model[0].segment_plan is None and model[0].seg_offsets is None


def test_segment_plan_names_bad_input():
    with pytest.raises(ValueError, match="non-decreasing"):
        SegmentPlan([0, 3, 2])
    with pytest.raises(ValueError, match="start at 0"):
        SegmentPlan([1, 3])
    with pytest.raises(ValueError, match=r"seg_adapter must have shape \[2\]"):
        SegmentPlan([0, 1, 3], [0])
    with pytest.raises(TypeError, match="seg_offsets must hold ints"):
        SegmentPlan([0, 1.5])
    with pytest.raises(ValueError, match="rank_mask must have shape"):
        SegmentPlan([0, 1, 3], [0, 1], rank_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="plan must be a SegmentPlan"):
        route(nn.Sequential(), [0, 1])
    layer = fedlora.LoRALinear(nn.Linear(8, 8), rank=2, num_clients=2)
    route(layer, SegmentPlan([0, 1, 2], [0, 2]))
    with pytest.raises(ValueError, match=r"seg_adapter entries must lie in \[0, 2\)"):
        layer(torch.randn(2, 8))
    with pytest.raises(ValueError, match="whole number of items"):
        layer(torch.randn(3, 8))


class _CountOps(TorchDispatchMode):
    """Counts the torch ops dispatched, looking inside our triton_ops (their launchers run under
    the mode too), while :func:`record_launches` counts the kernel launches without running them."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        from fedlora_kernels.ops import _masked_lora_triton as ml
        from fedlora_kernels.ops import _multihead_triton as mh

        self.impls = {
            "fedlora.masked_lora_fwd": ml._forward,
            "fedlora.masked_lora_bwd": ml._backward_kernels,
            "fedlora.multihead_lora_fwd": mh._forward,
            "fedlora.multihead_lora_bwd": mh._backward_kernels,
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        impl = self.impls.get(name)
        if impl is not None:
            with self:
                return impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _count_layer_call(cls, num_segs, monkeypatch):
    from fedlora_kernels.ops._triton_utils import record_launches

    monkeypatch.setenv("FEDLORA_BACKEND", "triton")
    torch.manual_seed(0)
    layer = cls(nn.Linear(32, 24), num_clients=4, **_layer_kw(cls))
    x = torch.randn(48, 32, requires_grad=True)
    if num_segs:
        offs = torch.linspace(0, 48, num_segs + 1).long().tolist()
        route(layer, SegmentPlan(offs, [t % 4 for t in range(num_segs)]))
    with record_launches():  # warm: the plan's tables are built once per batch
        layer(x).sum().backward()
    with record_launches() as calls, _CountOps() as mode:
        layer(x).sum().backward()
    return mode.ops, len(calls)


@needs_triton
@pytest.mark.parametrize("cls", [fedlora.LoRALinear, fedlora.RavanLinear])
def test_layer_call_launches_a_constant_small_number_of_ops(cls, monkeypatch):
    """Forward + backward of one adapter layer: the same torch ops and kernel launches for 2, 5
    and 17 segments (no per-segment or per-call planning), none of them a host sync
    (``_local_scalar_dense``: ``.item()``/``int()`` of a device value) or a host-to-device copy
    (``lift_fresh``: ``torch.tensor(...)``). Measured at this commit: LoRALinear 50 torch ops
    (59 on the one-segment path) and 4 kernels, RavanLinear 40 (48) and 2, views and the base
    layer included; before the plan (issue 18) they were 181 and 120 with 5 host syncs per call.
    """
    counts = {s: _count_layer_call(cls, s, monkeypatch) for s in (0, 2, 5, 17)}
    ops = {s: sum(c.values()) for s, (c, _) in counts.items()}
    kernels = {s: k for s, (_, k) in counts.items()}
    assert ops[2] == ops[5] == ops[17], ops
    assert len(set(kernels.values())) == 1, kernels
    assert max(ops.values()) <= 80, ops
    for c, _ in counts.values():
        assert c["aten._local_scalar_dense"] == 0 and c["aten.lift_fresh"] == 0, c


def test_op_table_covers_every_kernel_module_and_bench_suite():
    import importlib.util

    names = {e.name for e in OPS}
    assert names == {"multihead_lora", "masked_lora", "masked_adamw_", "masked_weighted_mean"}
    for e in OPS:
        assert importlib.util.find_spec(f"fedlora_kernels.ops.{e.triton_module}") is not None
        assert callable(getattr(fk, e.name))
    spec = importlib.util.spec_from_file_location(
        "bench_gpu_table", os.path.join(os.path.dirname(__file__), "..", "bench", "gpu.py")
    )
    gpu_bench = importlib.util.module_from_spec(spec)
    import sys

    saved = list(sys.path)
    try:
        spec.loader.exec_module(gpu_bench)
    finally:
        sys.path[:] = saved
    assert {e.bench_suite for e in OPS} <= set(gpu_bench.SUITES)


# ------------------------------------------------------------------------------ on a GPU


LAYER_CASES = [c for c in ADAPTER_DTYPES if c.base in (None, c.x) or c.base == torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("cls", [fedlora.LoRALinear, fedlora.RavanLinear])
def test_gpu_layers_run_every_dtype_case_without_host_sync(cls, case):
    """On the GPU: a model of adapter layers routed by one plan runs forward and backward under
    ``set_sync_debug_mode("error")`` (any host sync raises) in every dtype case a layer can
    produce (fp32+base_bf16: an fp32 model under autocast), and matches the torch path. The
    ops' own tests below cover every case of the table."""
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    model = _model(cls).cuda()
    x = torch.randn(6, 5, 32, device="cuda")
    plan = SegmentPlan([0, 2, 2, 6], [3, 1, 0], device="cuda")  # host lists: no sync to build
    route(model, plan)
    results = {}
    for backend in ("torch", "triton"):
        os.environ["FEDLORA_BACKEND"] = backend
        try:
            m = model.to(case.x)
            xr = x.to(case.x).requires_grad_(True)
            ctx = (
                torch.autocast("cuda", dtype=case.base)
                if case.base is not None and case.base != case.x
                else torch.autocast("cuda", enabled=False)
            )
            m(xr)  # warm: kernels compiled, plan tables built
            torch.cuda.synchronize()
            if backend == "triton":
                torch.cuda.set_sync_debug_mode("error")
            try:
                with ctx:
                    y = m(xr)
                y.float().square().sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            results[backend] = (y.float().cpu(), xr.grad.float().cpu())
            m.zero_grad()
        finally:
            os.environ.pop("FEDLORA_BACKEND", None)
    dtype = case.base if case.base is not None and case.base != case.x else case.x
    for a, b in zip(results["triton"], results["torch"], strict=True):
        _close(a, b, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)


@pytest.mark.gpu
def test_gpu_optimizer_step_without_host_sync():
    """The other hot-path op, the masked AdamW step (bool mask, int step), syncs nothing."""
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    p, g, m, v = (torch.randn(4, 8, 64, device="cuda") for _ in range(4))
    v.abs_()
    mask = torch.rand(4, 8, device="cuda") > 0.5
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, step=3, rank_dim=0)
    fk.masked_adamw_(p, g, m, v, mask, **hp)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fk.masked_adamw_(p, g, m, v, mask, **hp)
    finally:
        torch.cuda.set_sync_debug_mode("default")
