"""masked_lora: Triton (interpreter or GPU) and the torch reference against a naive formula.

The oracle builds, per segment t with slot c, the dense ΔW_t = scale · B_c diag(m_t) A_c in float64
and applies it to the segment's rows: a different algorithm from both implementations under test.
Its autograd gradients, with the frozen components (grad_mask 0) zeroed, are the expected ones.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICES

import fedlora_kernels as fk
from fedlora_kernels.ops import _masked_lora_triton

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")


def naive(x, A, B, scale, offsets, adapter, rank_mask):
    """y per segment t with slot c: x_t ΔW_tᵀ, ΔW_t built densely (float64)."""
    rank = A.shape[1]
    outs = []
    for t in range(len(adapter)):
        c = int(adapter[t])
        m = rank_mask[t] if rank_mask is not None else torch.ones(rank, dtype=x.dtype)
        dw = scale * (B[c] * m[None, :]) @ A[c]
        outs.append(x[int(offsets[t]) : int(offsets[t + 1])] @ dw.T)
    return torch.cat(outs)


def make(n, d_in, d_out, rank, slots, dtype, device="cpu"):
    """Random inputs (never zeros); slots=None gives the 2-D single-adapter layout."""
    lead = () if slots is None else (slots,)
    x = torch.randn(n, d_in, device=device).to(dtype)
    A = (torch.randn(*lead, rank, d_in, device=device) / d_in**0.5).to(dtype)
    B = (torch.randn(*lead, d_out, rank, device=device) / rank**0.5).to(dtype)
    return x, A, B


def mask_of(kind, rows, rank, seed=0):
    """0/1 float mask [rows, rank] of a given kind."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ones":
        return torch.ones(rows, rank)
    if kind == "zeros":
        return torch.zeros(rows, rank)
    if kind == "prefix":  # PreLort / HetLoRA truncation: row i keeps its first r_i components
        r = (torch.arange(rows) * 5 + 3) % rank + 1
        return (torch.arange(rank)[None, :] < r[:, None]).float()
    if kind == "scattered":  # HAFL: an arbitrary subset, never all or none
        m = (torch.rand(rows, rank, generator=g) < 0.5).float()
        m[:, 0], m[:, -1] = 1.0, 0.0
        return m
    raise ValueError(kind)


def relerr(got, exp):
    return ((got.double() - exp).abs().max() / exp.abs().max().clamp_min(1e-6)).item()


def check_against_naive(
    x, A, B, scale, offsets, adapter, backend, tol, rank_mask=None, grad_mask=None, grad_out=None
):
    dtype = x.dtype
    xr, Ar, Br = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    y = fk.masked_lora(
        xr, Ar, Br, scale=scale, rank_mask=rank_mask, grad_mask=grad_mask, seg_offsets=offsets,
        seg_adapter=adapter, backend=backend,
    )  # fmt: skip
    d_out = B.shape[-2]
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], d_out)
    g = torch.randn_like(y) if grad_out is None else grad_out
    gx, gA, gB = torch.autograd.grad(y, (xr, Ar, Br), g)
    assert gA.dtype == A.dtype and gB.dtype == B.dtype and gx.dtype == dtype

    A3, B3 = (A, B) if A.dim() == 3 else (A[None], B[None])
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A3, B3))
    n = x.shape[0]
    off = offsets.cpu() if offsets is not None else torch.tensor([0, n])
    ad = adapter.cpu() if adapter is not None else torch.zeros(len(off) - 1, dtype=torch.long)
    rm = None if rank_mask is None else rank_mask.double().cpu().expand(len(ad), A.shape[-2])
    y64 = naive(x64, A64, B64, scale, off, ad, rm)
    ex, eA, eB = torch.autograd.grad(y64, (x64, A64, B64), g.double())
    if A.dim() == 2:
        eA, eB = eA[0], eB[0]
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(gx.double(), ex, **tol)
    if grad_mask is not None:
        keep = grad_mask.cpu().double().reshape(eA.shape[:-1])
        eA = eA * keep[..., :, None]
        eB = eB * keep[..., None, :]
        frozen = keep == 0
        # frozen components: exactly zero, not merely small
        assert (gA[frozen] == 0).all()
        assert (gB.transpose(-1, -2)[frozen] == 0).all()
    # parameter grads are sums over rows: compare relative to their magnitude
    for got, exp in ((gA, eA), (gB, eB)):
        assert relerr(got, exp) < tol["rtol"] * 5
    return y, gx, gA, gB


SHAPES = [
    # n, d_in, d_out, rank
    (1, 16, 16, 16),
    (37, 45, 29, 5),
    (300, 33, 70, 12),
    (64, 24, 40, 40),  # two rank blocks in the reductions
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_single_adapter_matches_naive(backend, shape, dtype):
    """Plain LoRA in PEFT's 2-D layout: no masks, one segment."""
    n, d_in, d_out, rank = shape
    x, A, B = make(n, d_in, d_out, rank, None, dtype)
    check_against_naive(x, A, B, 0.75, None, None, backend, TOL[dtype])


KINDS = ["ones", "zeros", "prefix", "scattered"]


# every rank-mask kind with a scattered gradient mask, every gradient-mask kind with prefix ranks
MASK_PAIRS = sorted({(r, "scattered") for r in KINDS} | {("prefix", g) for g in KINDS})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank_kind,grad_kind", MASK_PAIRS, ids="-".join)
def test_mask_kinds(backend, rank_kind, grad_kind):
    """Every kind of rank mask (forward) and every kind of gradient mask (backward)."""
    x, A, B = make(37, 20, 18, 12, 2, torch.float32)
    off, ad = torch.tensor([0, 14, 37]), torch.tensor([1, 0])
    rm = mask_of(rank_kind, 2, 12, seed=1)
    gm = mask_of(grad_kind, 2, 12, seed=2)
    y, _, gA, gB = check_against_naive(
        x, A, B, 0.5, off, ad, backend, TOL[torch.float32], rank_mask=rm, grad_mask=gm
    )
    if rank_kind == "zeros":
        assert (y == 0).all()
    if grad_kind == "ones" and rank_kind != "zeros":
        assert (gA.abs().sum(-1) > 0).any() and (gB.abs().sum(-2) > 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "offsets,adapter,slots",
    [
        ([0, 10, 37], [1, 0], 2),  # two clients
        ([0, 10, 10, 37], [1, 0, 1], 2),  # an empty segment
        ([0, 5, 19, 20, 37], [2, 2, 0, 2], 3),  # shared slot, slot 1 unused
        ([0, 1, 2, 3, 37], [0, 1, 2, 3], 4),  # many segments inside one row tile
    ],
)
def test_segments_and_slots(backend, offsets, adapter, slots):
    x, A, B = make(37, 45, 29, 5, slots, torch.float32)
    off, ad = torch.tensor(offsets), torch.tensor(adapter)
    rm = mask_of("prefix", len(adapter), 5)
    gm = mask_of("scattered", slots, 5)
    _, _, gA, gB = check_against_naive(
        x, A, B, 0.5, off, ad, backend, TOL[torch.float32], rank_mask=rm, grad_mask=gm
    )
    for c in range(slots):
        if c not in adapter:  # a slot no segment uses gets exactly zero gradient
            assert gA[c].abs().max() == 0 and gB[c].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_truncations_share_one_slot(backend):
    """PreLort in one pass: the batch repeated under ranks {2, 4, 7} on one slot gives the sum of
    the three separately truncated calls, output and gradients."""
    x, A, B = make(13, 20, 18, 7, 1, torch.float32)
    ranks = [2, 4, 7]
    rm = torch.stack([(torch.arange(7) < r).float() for r in ranks])
    xs = x.repeat(3, 1)
    off = torch.tensor([0, 13, 26, 39])
    ad = torch.zeros(3, dtype=torch.long)
    Ar, Br = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    y = fk.masked_lora(
        xs, Ar, Br, rank_mask=rm, seg_offsets=off, seg_adapter=ad, scale=0.5, backend=backend
    )
    g = torch.randn_like(y)
    gA, gB = torch.autograd.grad(y, (Ar, Br), g)
    eA, eB = torch.zeros_like(A), torch.zeros_like(B)
    for t, r in enumerate(ranks):
        yt = fk.masked_lora(x, Ar[:, :r], Br[:, :, :r], scale=0.5, backend="torch")
        torch.testing.assert_close(y[13 * t : 13 * (t + 1)], yt, atol=1e-5, rtol=1e-5)
        a, b = torch.autograd.grad(yt, (Ar, Br), g[13 * t : 13 * (t + 1)])
        eA, eB = eA + a, eB + b
    torch.testing.assert_close(gA, eA, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gB, eB, atol=1e-4, rtol=1e-4)
    assert (gA[0, 4:] != 0).all()  # component 6 trains only through the rank-7 segment


@needs_triton
def test_frozen_component_work_is_skipped(monkeypatch):
    """The reduction kernels never write a partial of a frozen component: their buffers, filled
    with NaN here, keep NaN exactly at the frozen (slot, component) entries and nowhere else."""
    buffers = []

    def nan_partials(shape, *, device):
        buf = torch.full(shape, float("nan"), device=device)
        buffers.append(buf)
        return buf

    monkeypatch.setattr(_masked_lora_triton, "alloc_partials", nan_partials)
    x, A, B = make(37, 20, 18, 40, 2, torch.float32)
    off, ad = torch.tensor([0, 37]), torch.tensor([1])  # one segment, slot 1; slot 0 unused
    gm = mask_of("scattered", 2, 40, seed=3)
    gm[1, 35:] = 1
    rm = torch.ones(1, 40)
    rm[0, 35:] = 0  # trainable but truncated away everywhere: skipped like a frozen one
    Ar, Br = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    y = fk.masked_lora(
        x, Ar, Br, rank_mask=rm, grad_mask=gm, seg_offsets=off, seg_adapter=ad, backend="triton"
    )
    torch.autograd.grad(y, (Ar, Br), torch.randn_like(y))
    dB_part, dA_part = buffers  # [pairs, d_out, R] and [pairs, R, d_in]; one pair here
    trains = (gm[1] != 0) & (rm[0] != 0)
    assert 0 < trains.sum() < 40
    assert torch.isnan(dB_part[0][:, ~trains]).all() and torch.isfinite(dB_part[0][:, trains]).all()
    assert torch.isnan(dA_part[0][~trains]).all() and torch.isfinite(dA_part[0][trains]).all()

    buffers.clear()  # everything frozen: the reduction kernels write nothing at all
    y = fk.masked_lora(x, Ar, Br, grad_mask=torch.zeros(2, 40), backend="triton")
    torch.autograd.grad(y, (Ar, Br), torch.randn_like(y))
    assert len(buffers) == 2 and all(torch.isnan(b).all() for b in buffers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_incoming_gradient(backend):
    """y.sum().backward() hands backward a stride-0 view; the kernels must honour strides."""
    x, A, B = make(37, 45, 29, 5, 2, torch.float32)
    off, ad = torch.tensor([0, 20, 37]), torch.tensor([0, 1])
    g = torch.ones(1, 1).expand(37, 29)
    assert g.stride() == (0, 0)
    check_against_naive(x, A, B, 1.0, off, ad, backend, TOL[torch.float32], grad_out=g)
    grads = {}
    for be in (backend, "torch"):
        xr, Ar, Br = (t.clone().requires_grad_(True) for t in (x, A, B))
        fk.masked_lora(xr, Ar, Br, seg_offsets=off, seg_adapter=ad, backend=be).sum().backward()
        grads[be] = (xr.grad, Ar.grad, Br.grad)
    for a, b in zip(grads[backend], grads["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_batched_input(backend):
    """A transposed (non-contiguous) 3-D input gives the same output and gradients as its
    contiguous copy."""
    _, A, B = make(6, 21, 19, 4, None, torch.float32)
    base = torch.randn(21, 7, 6).permute(2, 1, 0)  # [6, 7, 21], non-contiguous
    assert not base.is_contiguous()
    out = {}
    for be, xin in ((backend, base), ("torch", base.contiguous())):
        xr, Ar = xin.detach().requires_grad_(True), A.clone().requires_grad_(True)
        y = fk.masked_lora(xr, Ar, B, scale=0.3, backend=be)
        gx, gA = torch.autograd.grad(y.square().sum(), (xr, Ar))
        out[be] = (y, gx, gA)
    assert out[backend][0].shape == (6, 7, 19)
    for a, b in zip(out[backend], out["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_triton
def test_kernels_write_every_output_element(monkeypatch):
    """Outputs and the saved intermediates come from NaN-poisoned buffers: any element a kernel
    forgets to write shows up."""

    def poisoned(shape, *, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(_masked_lora_triton, "alloc_output", poisoned)
    x, A, B = make(37, 45, 29, 12, 2, torch.float32)
    check_against_naive(
        x, A, B, 1.0, torch.tensor([0, 17, 37]), torch.tensor([1, 0]), "triton",
        TOL[torch.float32], rank_mask=mask_of("prefix", 2, 12), grad_mask=mask_of("scattered", 2, 12),
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["x", "A", "B", "AB"])
def test_only_requested_gradients(backend, which):
    """Any subset of x, A, B may require grad; each gradient matches the reference."""
    x, A, B = make(37, 20, 18, 6, 2, torch.float32)
    off, ad = torch.tensor([0, 9, 37]), torch.tensor([1, 1])
    gm = mask_of("scattered", 2, 6)
    g = torch.randn(37, 18)
    res = {}
    for be in (backend, "torch"):
        ins = {
            k: t.clone().requires_grad_(k in which) for k, t in zip("xAB", (x, A, B), strict=True)
        }
        y = fk.masked_lora(
            ins["x"], ins["A"], ins["B"], grad_mask=gm, seg_offsets=off, seg_adapter=ad,
            backend=be,
        )  # fmt: skip
        res[be] = torch.autograd.grad(y, [ins[k] for k in which], g)
    for a, b in zip(res[backend], res["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_triton
def test_backward_is_deterministic():
    """Same inputs, same gradients bit for bit (no atomics: fixed-order partial sums)."""
    x, A, B = make(150, 20, 24, 12, 3, torch.float32)
    off, ad = torch.tensor([0, 50, 51, 150]), torch.tensor([2, 0, 2])
    g = torch.randn(150, 24)
    runs = []
    for _ in range(2):
        Ar, Br = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
        y = fk.masked_lora(x, Ar, Br, seg_offsets=off, seg_adapter=ad, backend="triton")
        runs.append(torch.autograd.grad(y, (Ar, Br), g))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_zero_B_gives_zero_output():
    """B = 0 (PEFT's initialisation) gives exactly zero output for any input."""
    x, A, _ = make(37, 45, 29, 5, None, torch.float32)
    B = torch.zeros(29, 5)
    for backend in BACKENDS:
        assert fk.masked_lora(x, A, B, backend=backend).abs().max() == 0


def test_one_dimensional_masks_broadcast():
    """rank_mask [R] applies to every segment; grad_mask [R] is accepted for a 2-D adapter."""
    x, A, B = make(20, 16, 12, 6, None, torch.float32)
    off = torch.tensor([0, 7, 20])
    rm, gm = mask_of("prefix", 1, 6)[0], mask_of("scattered", 1, 6)[0]
    for backend in BACKENDS:
        Ar = A.clone().requires_grad_(True)
        y1 = fk.masked_lora(x, Ar, B, rank_mask=rm, grad_mask=gm, seg_offsets=off, backend=backend)
        y2 = fk.masked_lora(
            x, Ar, B, rank_mask=rm.expand(2, 6), grad_mask=gm[None], seg_offsets=off,
            backend=backend,
        )  # fmt: skip
        assert torch.equal(y1, y2)
        (g1,) = torch.autograd.grad(y1.sum(), Ar)
        assert (g1[gm == 0] == 0).all() and (g1[gm == 1] != 0).any()


def test_mask_dtypes_are_equivalent():
    """bool, int and float masks with the same 0/1 pattern give the same result."""
    x, A, B = make(20, 16, 12, 6, 1, torch.float32)
    rm = mask_of("scattered", 1, 6)
    ys = [
        fk.masked_lora(x, A, B, rank_mask=rm.to(dt), grad_mask=rm.to(dt), backend="torch")
        for dt in (torch.bool, torch.int64, torch.float32, torch.uint8)
    ]
    for y in ys[1:]:
        assert torch.equal(y, ys[0])


def test_empty_input():
    x, A, B = make(0, 16, 12, 4, 2, torch.float32)
    for backend in BACKENDS:
        Ar = A.clone().requires_grad_(True)
        y = fk.masked_lora(
            x.requires_grad_(True), Ar, B, seg_adapter=torch.tensor([1]), backend=backend
        )
        assert y.shape == (0, 12)
        (gA,) = torch.autograd.grad(y.sum(), Ar)
        assert (gA == 0).all()


def test_compile_fullgraph_cpu():
    x, A, B = make(37, 45, 29, 5, 2, torch.float32)
    off, ad = torch.tensor([0, 11, 37]), torch.tensor([1, 0])
    rm, gm = mask_of("prefix", 2, 5), mask_of("scattered", 2, 5)
    Ar, Br = A.clone().requires_grad_(True), B.clone().requires_grad_(True)

    def f(x, A, B):
        return fk.masked_lora(
            x, A, B, scale=0.5, rank_mask=rm, grad_mask=gm, seg_offsets=off, seg_adapter=ad,
            backend="torch",
        )  # fmt: skip

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(x, Ar, Br)
    y_eager = f(x, Ar, Br)
    torch.testing.assert_close(y, y_eager)
    g_c = torch.autograd.grad(y.square().sum(), (Ar, Br))
    g_e = torch.autograd.grad(y_eager.square().sum(), (Ar, Br))
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_device_default_dispatch(device):
    """No backend given: CPU runs the reference, CUDA the Triton kernels; both agree."""
    x, A, B = make(300, 64, 48, 16, 1, torch.float32, device)
    rm = torch.ones(1, 16, device=device)
    rm[0, 10:] = 0
    y = fk.masked_lora(x, A, B, scale=2.0, rank_mask=rm)
    y_ref = fk.masked_lora(
        x.cpu(), A.cpu(), B.cpu(), scale=2.0, rank_mask=rm.cpu(), backend="torch"
    )
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [*SHAPES, (2837, 256, 320, 64), (4097, 128, 96, 16)], ids=str)
def test_gpu_matches_naive(dtype, shape):
    n, d_in, d_out, rank = shape
    x, A, B = make(n, d_in, d_out, rank, 3, dtype, "cuda")
    off = torch.tensor([0, n // 3, n // 3, n], device="cuda")
    ad = torch.tensor([2, 0, 2], device="cuda")
    rm = mask_of("prefix", 3, rank).cuda()
    gm = mask_of("scattered", 3, rank).cuda()
    check_against_naive(x, A, B, 0.5, off, ad, "triton", TOL[dtype], rank_mask=rm, grad_mask=gm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compile_fullgraph():
    x, A, B = make(257, 128, 96, 16, 2, torch.bfloat16, "cuda")
    off, ad = torch.tensor([0, 100, 257], device="cuda"), torch.tensor([1, 0], device="cuda")
    gm = mask_of("scattered", 2, 16).cuda()
    Ar, Br = A.clone().requires_grad_(True), B.clone().requires_grad_(True)

    def f(x, A, B):
        return fk.masked_lora(x, A, B, scale=0.5, grad_mask=gm, seg_offsets=off, seg_adapter=ad)

    y = torch.compile(f, fullgraph=True)(x, Ar, Br)
    torch.testing.assert_close(y, f(x, Ar, Br))
    y.float().sum().backward()
    assert torch.isfinite(Ar.grad).all() and (Ar.grad[gm == 0] == 0).all()


# ---------------------------------------------------------------------------------- bad input


def _good():
    x, A, B = make(5, 8, 6, 3, 2, torch.float32)
    return dict(
        x=x, A=A, B=B, seg_offsets=torch.tensor([0, 2, 5]), seg_adapter=torch.tensor([1, 0])
    )


def _set(**kw):
    return lambda a: a.update(kw)


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (_set(x=torch.randn(5, 9)), ValueError, "x must have last dimension d_in=8"),
        (_set(A=torch.randn(2, 2, 3, 8)), ValueError, "A must be 2-D or 3-D"),
        (_set(B=torch.randn(6, 3)), ValueError, "A and B must both be 2-D"),
        (_set(B=torch.randn(2, 6, 4)), ValueError, "B must have shape [2, *, 3]"),
        (_set(B=torch.randn(3, 6, 3)), ValueError, "B must have shape [2, *, 3]"),
        (_set(A=torch.randn(2, 0, 8), B=torch.randn(2, 6, 0)), ValueError, "non-zero sizes"),
        (lambda a: a.update(x=a["x"].double()), TypeError, "x must have dtype"),
        (lambda a: a.update(B=a["B"].bfloat16()), TypeError, "B must have the dtype of x"),
        (_set(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
        (_set(scale=float("inf")), ValueError, "scale must be finite"),
        (_set(rank_mask=torch.ones(2, 4)), ValueError, "rank_mask must have shape [S=2, R=3]"),
        (_set(rank_mask=torch.ones(3, 3)), ValueError, "one row per segment"),
        (_set(rank_mask=torch.ones(4)), ValueError, "rank_mask must have shape [3]"),
        (_set(rank_mask=torch.full((2, 3), 0.5)), ValueError, "rank_mask must contain only 0 and 1"),
        (_set(rank_mask=torch.ones(2, 3, 1)), ValueError, "rank_mask must be 1-D or 2-D"),
        (_set(rank_mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "rank_mask must have dtype"),
        (_set(grad_mask=torch.ones(1, 3)), ValueError, "grad_mask must have shape [C=2, R=3]"),
        (_set(grad_mask=torch.ones(3)), ValueError, "grad_mask must have shape [C=2, R=3]"),
        (_set(grad_mask=torch.tensor([[1, 2, 0], [0, 1, 1]])), ValueError, "grad_mask must contain only 0 and 1"),
        (_set(grad_mask=torch.full((2, 3), float("nan"))), ValueError, "grad_mask must contain only 0 and 1"),
        (_set(seg_offsets=torch.tensor([0, 3, 2, 5]), seg_adapter=torch.tensor([0, 1, 0])), ValueError, "non-decreasing"),
        (_set(seg_offsets=torch.tensor([0, 3, 4])), ValueError, "end at the number of rows 5"),
        (_set(seg_adapter=torch.tensor([0, 2])), ValueError, "seg_adapter entries must lie in [0, 2)"),
        (_set(seg_adapter=torch.tensor([0])), ValueError, "seg_adapter must have shape [2]"),
        (_set(backend="cuda"), ValueError, "backend must be one of"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(change, exc, words):
    args = _good()
    change(args)
    x, A, B = (args.pop(k) for k in ("x", "A", "B"))
    with pytest.raises(exc) as err:
        fk.masked_lora(x, A, B, **args)
    assert words in str(err.value)


def test_bad_mask_single_adapter_grad_mask_1d():
    x, A, B = make(5, 8, 6, 3, None, torch.float32)
    with pytest.raises(ValueError, match=r"grad_mask must have shape \[3\]"):
        fk.masked_lora(x, A, B, grad_mask=torch.ones(4))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, A, B = make(5, 8, 6, 3, None, torch.float32)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        fk.masked_lora(x, A, B, backend="triton")
