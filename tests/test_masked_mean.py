"""masked_weighted_mean: Triton (interpreter or GPU) and the torch reference against a naive formula.

The oracle zero-pads every client to the full rank and evaluates
``Σ_k w_k m_kj X_k[j] / Σ_k w_k m_kj`` element by element in float64 with an explicit
denominator test: a different algorithm from both implementations. The Triton kernel and the
reference share the coefficient matrix and sum clients in the same order, so under the interpreter
(no FMA) they must agree bitwise; on GPU to the last few ulps.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICES, HAS_CUDA

import fedlora_kernels as fk

needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def naive(tensors, weights, mask, rank_dim, fallback, rank):
    """float64 oracle: zero-pad, then the formula with an explicit zero-denominator branch."""
    C = len(tensors)
    padded = []
    for x in tensors:
        x = x.double().movedim(rank_dim, 0)
        pad = torch.zeros((rank - x.shape[0], *x.shape[1:]), dtype=torch.float64)
        padded.append(torch.cat([x, pad]))
    ranks = [x.shape[rank_dim] for x in tensors]
    out = torch.empty_like(padded[0]) if C else fallback.double().movedim(rank_dim, 0).clone()
    for j in range(rank):
        num = torch.zeros_like(padded[0][j]) if C else None
        den = 0.0
        for k in range(C):
            m = 1.0 if mask is None else float(mask[k, j])
            c = float(weights[k]) * m if j < ranks[k] else 0.0
            if c != 0.0:
                num = num + c * padded[k][j]
                den += c
        if den > 0:
            out[j] = num / den
        elif fallback is not None:
            out[j] = fallback.double().movedim(rank_dim, 0)[j]
        else:
            out[j] = 0.0
    return out.movedim(0, rank_dim)


def clients(shape, rank_dim, ranks, dtype, device="cpu"):
    """Random client tensors of ``shape`` with ``ranks[k]`` along ``rank_dim`` (never zeros)."""
    out = []
    for r in ranks:
        s = list(shape)
        s[rank_dim] = r
        out.append((torch.randn(s, device=device) + 0.1).to(dtype))
    return out


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN: an element the kernel forgets to write fails the test."""

    def alloc(shape, *, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    if "triton" in BACKENDS:  # the kernel's launcher lives in its own module
        from fedlora_kernels.ops import _masked_mean_triton

        monkeypatch.setattr(_masked_mean_triton, "alloc_output", alloc)


CASES = [
    # shape (full rank along rank_dim), rank_dim, client ranks, mask kind, fallback
    ((6, 37), 0, [6, 3, 5, 1], None, False),  # A-like, ragged, no mask
    ((29, 6), 1, [2, 6, 4], "zero_cols", True),  # B-like, all-zero mask columns -> fallback
    ((5, 7, 3), 1, [7, 2, 5, 7, 1], "random", True),  # rank in the middle of a 3-D tensor
    ((1, 3), 0, [1], None, False),  # one client, tiny
    ((4, 1, 9), -3, [4, 4], "random", False),  # negative rank_dim, equal ranks
    ((300, 8), 1, [8, 5, 8], "zero_cols", False),  # > one Triton block, zero columns -> 0
    ((9,), 0, [9, 4, 0], "random", True),  # 1-D (per-component scores), a rank-0 client
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_naive(backend, dtype, case, poisoned):
    shape, rank_dim, ranks, mask_kind, use_fb = case
    nd = len(shape)
    rank = shape[rank_dim]
    xs = clients(shape, rank_dim, ranks, dtype)
    C = len(ranks)
    w = torch.rand(C) + 0.05
    mask = None
    if mask_kind == "random":
        mask = (torch.rand(C, rank) < 0.6).float()
    elif mask_kind == "zero_cols":
        mask = (torch.rand(C, rank) < 0.7).float()
        mask[:, 0] = 0.0
        mask[:, rank // 2] = 0.0
    fb = torch.randn(shape) + 0.2 if use_fb else None
    if mask is None and not use_fb and ranks and max(ranks) < rank:
        pytest.skip("full rank must come from fallback or mask")
    got = fk.masked_weighted_mean(xs, w, mask, rank_dim=rank_dim, fallback=fb, backend=backend)
    exp = naive(xs, w, mask, rank_dim % nd, fb, rank)
    assert got.shape == torch.Size(shape)
    assert got.dtype == (torch.float32 if use_fb else dtype)
    tol = TOL[got.dtype] if got.dtype == torch.bfloat16 else dict(atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(got.double(), exp, **tol)
    if mask_kind == "zero_cols":
        sel = [slice(None)] * nd
        sel[rank_dim] = 0
        expect_col = fb[tuple(sel)] if use_fb else torch.zeros_like(got[tuple(sel)])
        assert torch.equal(got[tuple(sel)].float(), expect_col.float())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_triton_equals_reference(dtype, case, poisoned):
    shape, rank_dim, ranks, mask_kind, use_fb = case
    rank = shape[rank_dim]
    xs = clients(shape, rank_dim, ranks, dtype)
    w = torch.rand(len(ranks)) + 0.05
    mask = (torch.rand(len(ranks), rank) < 0.6).float() if mask_kind else None
    fb = (torch.randn(shape) + 0.2).to(dtype) if use_fb or max(ranks) < rank else None
    args = dict(rank_dim=rank_dim, fallback=fb)
    a = fk.masked_weighted_mean(xs, w, mask, backend="triton", **args)
    b = fk.masked_weighted_mean(xs, w, mask, backend="torch", **args)
    if HAS_CUDA:  # pragma: no cover - GPU runs may fuse multiply-adds
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_clients_in_place_with_any_strides(backend):
    """Transposed and sliced views are read through their strides (no contiguity assumed)."""
    base = [torch.randn(9, 11) for _ in range(3)]
    views = [base[0].T[:, :4], base[1].T[:, :7], base[2].T[:, 1:3]]  # [11, r_k], non-contiguous
    w = torch.tensor([0.5, 1.5, 2.0])
    got = fk.masked_weighted_mean(views, w, rank_dim=1, backend=backend)
    exp = naive([v.contiguous() for v in views], w, None, 1, None, 7)
    torch.testing.assert_close(got.double(), exp, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_out_values_are_never_read(backend):
    """A NaN where the coefficient is 0 (mask 0 or weight 0) does not reach the output."""
    xs = [torch.randn(5, 6) for _ in range(3)]
    xs[0][2, 3] = float("nan")  # masked out below
    xs[2][:] = float("inf")  # weight 0
    mask = torch.ones(3, 5)
    mask[0, 2] = 0.0
    w = torch.tensor([1.0, 2.0, 0.0])
    got = fk.masked_weighted_mean(xs, w, mask, backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[2], xs[1][2])  # only client 1 holds row 2
    torch.testing.assert_close(got[0], (xs[0][0] + 2 * xs[1][0]) / 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    xs = [torch.randn(16, 33) for _ in range(7)]
    w = torch.rand(7) + 0.1
    a = fk.masked_weighted_mean(xs, w, backend=backend)
    b = fk.masked_weighted_mean(xs, w, backend=backend)
    assert torch.equal(a, b)


def test_no_clients_returns_a_copy_of_the_fallback():
    fb = torch.randn(4, 3)
    out = fk.masked_weighted_mean([], torch.zeros(0), fallback=fb)
    assert torch.equal(out, fb) and out.data_ptr() != fb.data_ptr()


def test_all_zero_weights_give_the_fallback():
    fb = torch.randn(4, 3)
    out = fk.masked_weighted_mean([torch.randn(4, 3)], [0.0], fallback=fb)
    assert torch.equal(out, fb)


def test_list_weights_and_bool_mask():
    xs = [torch.randn(3, 2), torch.randn(3, 2)]
    mask = torch.tensor([[True, False, True], [True, True, False]])
    out = fk.masked_weighted_mean(xs, [1, 3], mask)
    torch.testing.assert_close(out[0], (xs[0][0] + 3 * xs[1][0]) / 4)
    torch.testing.assert_close(out[1], xs[1][1])
    torch.testing.assert_close(out[2], xs[0][2])


BAD = [
    (lambda x: dict(tensors=x[0]), TypeError, "tensors must be a list"),
    (lambda x: dict(tensors=[]), ValueError, "tensors is empty"),
    (lambda x: dict(tensors=[x[0], x[1].double()]), TypeError, r"tensors\[1\]"),
    (lambda x: dict(tensors=[x[0], torch.randn(4, 6)]), ValueError, r"tensors\[1\] must match"),
    (
        lambda x: dict(tensors=[x[0], torch.ones(4, 5, dtype=torch.int64)]),
        TypeError,
        r"tensors\[1\]",
    ),
    (lambda x: dict(weights=torch.ones(3)), ValueError, r"weights must have shape \[C=2\]"),
    (lambda x: dict(weights=torch.tensor([1.0, -1.0])), ValueError, "weights must be finite"),
    (lambda x: dict(weights=torch.tensor([1.0, float("nan")])), ValueError, "weights must be"),
    (lambda x: dict(weights=["a", 1]), TypeError, "weights"),
    (lambda x: dict(mask=torch.ones(3, 4)), ValueError, r"mask must have shape \[C=2, R=4\]"),
    (lambda x: dict(mask=torch.ones(2, 3)), ValueError, r"tensors\[0\] has rank 4 .* R=3"),
    (lambda x: dict(mask=torch.ones(2, 4, 1)), ValueError, "mask must be 2-D"),
    (lambda x: dict(mask=-torch.ones(2, 4)), ValueError, "mask must be finite and non-negative"),
    (lambda x: dict(fallback=torch.ones(4, 6)), ValueError, "fallback must have"),
    (lambda x: dict(fallback=torch.ones(2, 5)), ValueError, r"tensors\[0\] has rank 4"),
    (lambda x: dict(fallback=torch.ones(4, 5, dtype=torch.int32)), TypeError, "fallback"),
    (lambda x: dict(rank_dim=2), ValueError, "rank_dim must be"),
    (lambda x: dict(rank_dim=True), ValueError, "rank_dim must be"),
    (lambda x: dict(backend="cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("make_bad,exc,match", BAD)
def test_bad_input_names_the_argument(make_bad, exc, match):
    xs = [torch.randn(4, 5), torch.randn(3, 5)]
    kwargs = dict(tensors=xs, weights=torch.ones(2), mask=None)
    kwargs.update(make_bad(xs))
    t, w, m = kwargs.pop("tensors"), kwargs.pop("weights"), kwargs.pop("mask")
    with pytest.raises(exc, match=match):
        fk.masked_weighted_mean(t, w, m, **kwargs)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fk.masked_weighted_mean([torch.randn(2, 2)], [1.0], backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_device_dispatch_and_gpu(device):
    """CPU goes to the reference by default; on CUDA the default is the kernel (GPU-marked)."""
    xs = clients((16, 300), 0, [16, 9, 12], torch.bfloat16, device)
    w = torch.rand(3, device=device) + 0.1
    fb = torch.randn(16, 300, device=device)
    got = fk.masked_weighted_mean(xs, w, fallback=fb)
    exp = naive([x.cpu() for x in xs], w.cpu(), None, 0, fb.cpu(), 16)
    torch.testing.assert_close(got.cpu().double(), exp, atol=2e-6, rtol=2e-6)
