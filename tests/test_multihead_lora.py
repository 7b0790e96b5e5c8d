"""multihead_lora: Triton (interpreter or GPU) and the torch reference against a naive formula.

The oracle builds each slot's dense ΔW_c = scale · Σ_i s[c,i] B_i H[c,i] A_i in float64 and applies
it row by row per segment: a different algorithm from both implementations under test.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICES

import fedlora_kernels as fk
from fedlora_kernels.ops import _multihead_triton

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def naive(x, A, B, H, s, scale, offsets, adapter):
    """y per segment t with slot c: x_t ΔW_cᵀ, ΔW_c built densely (float64)."""
    outs = []
    for t in range(len(adapter)):
        c = int(adapter[t])
        dw = sum(s[c, i] * B[i] @ H[c, i] @ A[i] for i in range(A.shape[0])) * scale
        outs.append(x[int(offsets[t]) : int(offsets[t + 1])] @ dw.T)
    return torch.cat(outs)


def make(n, d_in, d_out, h, r, slots, dtype, device="cpu"):
    x = torch.randn(n, d_in, device=device).to(dtype)
    A = (torch.randn(h, r, d_in, device=device) / d_in**0.5).to(dtype)
    B = (torch.randn(h, d_out, r, device=device) / r**0.5).to(dtype)
    H = torch.randn(slots, h, r, r, device=device)
    s = torch.rand(slots, h, device=device) + 0.5
    return x, A, B, H, s


def check_against_naive(
    x, A, B, H, s, scale, offsets, adapter, backend, tol, head_mask=None, grad_out=None
):
    dtype = x.dtype
    xr, Hr, sr = (t.detach().clone().requires_grad_(True) for t in (x, H, s))
    y = fk.multihead_lora(
        xr,
        A,
        B,
        Hr,
        sr,
        scale=scale,
        seg_offsets=offsets,
        seg_adapter=adapter,
        head_mask=head_mask,
        backend=backend,
    )
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], B.shape[1])
    g = torch.randn_like(y) if grad_out is None else grad_out
    gx, gH, gs = torch.autograd.grad(y, (xr, Hr, sr), g)

    x64, H64, s64 = (t.detach().double().requires_grad_(True) for t in (x, H, s))
    n = x.shape[0]
    off = offsets if offsets is not None else torch.tensor([0, n])
    ad = adapter if adapter is not None else torch.zeros(len(off) - 1, dtype=torch.long)
    y64 = naive(x64, A.double(), B.double(), H64, s64, scale, off.cpu(), ad.cpu())
    ex, eH, es = torch.autograd.grad(y64, (x64, H64, s64), g.double())
    if head_mask is not None:
        eH = eH * head_mask.double()[..., None, None]
        es = es * head_mask.double()
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(gx.double(), ex, **tol)
    # parameter grads are sums over rows: compare relative to their magnitude
    for got, exp in ((gH, eH), (gs, es)):
        assert got.dtype == torch.float32
        err = (got.double() - exp).abs().max() / exp.abs().max().clamp_min(1e-6)
        assert err < tol["rtol"] * 5, f"relative error {err:.3g}"
    return y, gx, gH, gs


SHAPES = [
    # n, d_in, d_out, h, r
    (1, 16, 16, 1, 16),
    (37, 45, 29, 3, 5),
    (300, 33, 70, 8, 2),
    (64, 24, 40, 4, 8),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_single_slot_matches_naive(backend, shape, dtype):
    n, d_in, d_out, h, r = shape
    x, A, B, H, s = make(n, d_in, d_out, h, r, 1, dtype)
    check_against_naive(x, A, B, H, s, 0.75, None, None, backend, TOL[dtype])


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
    x, A, B, H, s = make(37, 45, 29, 3, 5, slots, torch.float32)
    off, ad = torch.tensor(offsets), torch.tensor(adapter)
    _, _, gH, gs = check_against_naive(x, A, B, H, s, 0.5, off, ad, backend, TOL[torch.float32])
    for c in range(slots):
        if c not in adapter:  # a slot no segment uses gets exactly zero gradient
            assert gH[c].abs().max() == 0 and gs[c].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_mask_zeroes_untrained_heads(backend):
    x, A, B, H, s = make(37, 20, 18, 4, 3, 2, torch.float32)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]])
    off, ad = torch.tensor([0, 20, 37]), torch.tensor([0, 1])
    _, _, gH, gs = check_against_naive(
        x, A, B, H, s, 1.0, off, ad, backend, TOL[torch.float32], head_mask=mask
    )
    frozen = mask == 0
    assert (gH[frozen] == 0).all() and (gs[frozen] == 0).all()
    assert (gH[~frozen].abs().sum(dim=(-1, -2)) > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_incoming_gradient(backend):
    """y.sum().backward() hands backward a stride-0 view; the kernel must honour strides."""
    x, A, B, H, s = make(37, 45, 29, 3, 5, 1, torch.float32)
    g = torch.ones(1, 1).expand(37, 29)
    assert g.stride() == (0, 0)
    check_against_naive(x, A, B, H, s, 1.0, None, None, backend, TOL[torch.float32], grad_out=g)
    xr = x.clone().requires_grad_(True)
    fk.multihead_lora(xr, A, B, H, s, backend=backend).sum().backward()
    xd = x.clone().requires_grad_(True)
    fk.multihead_lora(xd, A, B, H, s, backend="torch").sum().backward()
    torch.testing.assert_close(xr.grad, xd.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_batched_input(backend):
    """A transposed (non-contiguous) 3-D input gives the same result as its contiguous copy."""
    _, A, B, H, s = make(6, 21, 19, 2, 4, 1, torch.float32)
    base = torch.randn(21, 7, 6).permute(2, 1, 0)  # [6, 7, 21], non-contiguous
    assert not base.is_contiguous()
    y = fk.multihead_lora(base, A, B, H, s, scale=0.3, backend=backend)
    y_ref = fk.multihead_lora(base.contiguous(), A, B, H, s, scale=0.3, backend="torch")
    assert y.shape == (6, 7, 19)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_kernels_write_every_output_element(monkeypatch):
    """Outputs come from NaN-poisoned buffers: any element a kernel forgets to write shows up."""

    def poisoned(shape, *, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(_multihead_triton, "alloc_output", poisoned)
    x, A, B, H, s = make(37, 45, 29, 3, 5, 2, torch.float32)
    check_against_naive(
        x,
        A,
        B,
        H,
        s,
        1.0,
        torch.tensor([0, 17, 37]),
        torch.tensor([1, 0]),
        "triton",
        TOL[torch.float32],
    )


def test_frozen_bases_get_no_gradient():
    x, A, B, H, s = make(9, 16, 16, 2, 4, 1, torch.float32)
    A.requires_grad_(True)
    B.requires_grad_(True)
    Hr = H.clone().requires_grad_(True)
    for backend in BACKENDS:
        y = fk.multihead_lora(x, A, B, Hr, s, backend=backend)
        y.sum().backward()
        assert A.grad is None and B.grad is None


def test_initial_state_is_zero_adapter():
    """H = 0 (Ravan's initialisation) gives exactly zero output for any input."""
    x, A, B, _, s = make(37, 45, 29, 3, 5, 1, torch.float32)
    H = torch.zeros(1, 3, 5, 5)
    for backend in BACKENDS:
        assert fk.multihead_lora(x, A, B, H, s, backend=backend).abs().max() == 0


def test_empty_input():
    x, A, B, H, s = make(0, 16, 12, 2, 4, 1, torch.float32)
    for backend in BACKENDS:
        y = fk.multihead_lora(x.requires_grad_(True), A, B, H, s, backend=backend)
        assert y.shape == (0, 12)


def test_compile_fullgraph_cpu():
    x, A, B, H, s = make(37, 45, 29, 3, 5, 2, torch.float32)
    off, ad = torch.tensor([0, 11, 37]), torch.tensor([1, 0])
    Hr = H.clone().requires_grad_(True)

    def f(x, H, s):
        return fk.multihead_lora(
            x, A, B, H, s, scale=0.5, seg_offsets=off, seg_adapter=ad, backend="torch"
        )

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(x, Hr, s)
    y_eager = f(x, Hr, s)
    torch.testing.assert_close(y, y_eager)
    (g_c,) = torch.autograd.grad(y.square().sum(), Hr)
    (g_e,) = torch.autograd.grad(y_eager.square().sum(), Hr)
    torch.testing.assert_close(g_c, g_e)


@pytest.mark.parametrize("device", DEVICES)
def test_device_default_dispatch(device):
    """No backend given: CPU runs the reference, CUDA the Triton kernels; both agree."""
    x, A, B, H, s = make(300, 64, 48, 4, 8, 1, torch.float32, device)
    y = fk.multihead_lora(x, A, B, H, s, scale=2.0)
    y_ref = fk.multihead_lora(
        x.cpu(), A.cpu(), B.cpu(), H.cpu(), s.cpu(), scale=2.0, backend="torch"
    )
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [*SHAPES, (2837, 256, 320, 4, 16)], ids=str)
def test_gpu_matches_naive(dtype, shape):
    n, d_in, d_out, h, r = shape
    x, A, B, H, s = make(n, d_in, d_out, h, r, 3, dtype, "cuda")
    off = torch.tensor([0, n // 3, n // 3, n], device="cuda")
    ad = torch.tensor([2, 0, 2], device="cuda")
    check_against_naive(x, A, B, H, s, 0.5, off, ad, "triton", TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compile_fullgraph():
    x, A, B, H, s = make(257, 128, 96, 4, 8, 1, torch.bfloat16, "cuda")
    Hr = H.clone().requires_grad_(True)
    f = lambda x, H: fk.multihead_lora(x, A, B, H, s, scale=0.5)
    y = torch.compile(f, fullgraph=True)(x, Hr)
    torch.testing.assert_close(y, f(x, Hr))
    y.float().sum().backward()
    assert Hr.grad is not None and torch.isfinite(Hr.grad).all()


# ---------------------------------------------------------------------------------- bad input


def _good():
    return make(5, 8, 6, 2, 3, 2, torch.float32)


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (lambda a: a.update(x=torch.randn(5, 9)), ValueError, "x must have last dimension d_in=8"),
        (lambda a: a.update(A=torch.randn(2, 3)), ValueError, "A must be 3-D"),
        (lambda a: a.update(B=torch.randn(2, 6, 4)), ValueError, "B must have shape [2, *, 3]"),
        (lambda a: a.update(H=torch.randn(2, 2, 3, 4)), ValueError, "H must have shape"),
        (lambda a: a.update(s=torch.randn(1, 2)), ValueError, "s must have shape [2, 2]"),
        (lambda a: a.update(x=a["x"].double()), TypeError, "x must have dtype"),
        (lambda a: a.update(A=a["A"].bfloat16()), TypeError, "A must have the dtype of x"),
        (lambda a: a.update(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
        (lambda a: a.update(scale=float("nan")), ValueError, "scale must be finite"),
        (lambda a: a.update(head_mask=torch.ones(2, 3)), ValueError, "head_mask must have shape"),
        (
            lambda a: a.update(
                seg_offsets=torch.tensor([0, 3, 2, 5]), seg_adapter=torch.tensor([0, 1, 0])
            ),
            ValueError,
            "non-decreasing",
        ),
        (
            lambda a: a.update(
                seg_offsets=torch.tensor([0, 3, 4]), seg_adapter=torch.tensor([0, 1])
            ),
            ValueError,
            "end at the number of rows 5",
        ),
        (
            lambda a: a.update(
                seg_offsets=torch.tensor([0, 3, 5]), seg_adapter=torch.tensor([0, 2])
            ),
            ValueError,
            "seg_adapter entries must lie in [0, 2)",
        ),
        (
            lambda a: a.update(seg_offsets=torch.tensor([0, 3, 5]), seg_adapter=torch.tensor([0])),
            ValueError,
            "seg_adapter must have shape [2]",
        ),
        (
            lambda a: a.update(seg_offsets=torch.tensor([0.0, 5.0])),
            TypeError,
            "seg_offsets must have dtype",
        ),
        (lambda a: a.update(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(change, exc, words):
    x, A, B, H, s = _good()
    args = dict(x=x, A=A, B=B, H=H, s=s, seg_offsets=torch.tensor([0, 2, 5]))
    change(args)
    x, A, B, H, s = (args.pop(k) for k in ("x", "A", "B", "H", "s"))
    with pytest.raises(exc) as err:
        fk.multihead_lora(x, A, B, H, s, **args)
    assert words in str(err.value)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, A, B, H, s = make(5, 8, 6, 2, 3, 1, torch.float32)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        fk.multihead_lora(x, A, B, H, s, backend="triton")


def test_env_backend_override(monkeypatch):
    x, A, B, H, s = make(5, 8, 6, 2, 3, 1, torch.float32)
    monkeypatch.setenv("FEDLORA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.multihead_lora(x, A, B, H, s)
    monkeypatch.setenv("FEDLORA_BACKEND", "torch")
    assert fk.multihead_lora(x, A, B, H, s).shape == (5, 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_base_out_is_added_in_the_same_pass(backend, dtype):
    """base_out + adapter equals the sum done separately; its gradient to base_out is dy."""
    x, A, B, H, s = make(37, 45, 29, 3, 5, 2, dtype)
    off, ad = torch.tensor([0, 17, 37]), torch.tensor([1, 0])
    base = torch.randn(37, 29).to(dtype).requires_grad_(True)
    Hr = H.clone().requires_grad_(True)
    kw = dict(scale=0.5, seg_offsets=off, seg_adapter=ad, backend=backend)
    y = fk.multihead_lora(x, A, B, Hr, s, base_out=base, **kw)
    sep = base.detach().float() + fk.multihead_lora(x, A, B, H, s, **kw).float()
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), sep, **TOL[dtype])
    g = torch.randn_like(y)
    g_base, g_H = torch.autograd.grad(y, (base, Hr), g)
    assert torch.equal(g_base, g)
    (g_H_sep,) = torch.autograd.grad(fk.multihead_lora(x, A, B, Hr, s, **kw), Hr, g)
    torch.testing.assert_close(g_H, g_H_sep, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match=r"base_out must have shape \[37, 29\]"):
        fk.multihead_lora(x, A, B, H, s, base_out=torch.zeros(37, 28), **kw)
