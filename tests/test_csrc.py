"""libfedlora (csrc/) through ctypes: every C function against fedlora_kernels.reference.

Tolerances come from the numerics: the masked mean and the AdamW moments follow the reference's
float32 operation order and are compared bitwise; the AdamW parameter differs only through
``sqrt`` (the C library's is correctly rounded, torch's vectorised float32 sqrt on some CPUs is
not), so it is bounded by that one rounding; the forwards (a BLAS matmul in the reference, fixed
order dot products here) are bounded against a float64 oracle by ``depth · eps · Σ|terms|``.
The bad-argument tests check that every refusal comes with a status code and a message and that
no output was written. The example server under csrc/examples/ is compiled and run at the end.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora_kernels import _clib, reference

ROOT = Path(__file__).resolve().parents[1]
EPS32 = torch.finfo(torch.float32).eps

LIB = _clib.library()
_COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
if LIB is None:
    if _COMPILER is None:  # an install without a compiler: the library is optional there
        pytest.skip("libfedlora is not built (no C++ compiler)", allow_module_level=True)
    raise RuntimeError(
        f"libfedlora is not available although a compiler is ({_COMPILER}): reinstall with "
        "pip install -e . to build it"
    )

OK, NULL, SIZE, VALUE, UNSUPPORTED, OVERLAP = 0, 1, 2, 3, 4, 5
F32, BF16 = 0, 1


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def last_error() -> str:
    return LIB.fedlora_last_error().decode()


def poisoned(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equal to the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = torch.int16 if a.element_size() == 2 else torch.int32
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def test_version_and_errors():
    assert LIB.fedlora_version().decode() == "0.1.0"
    assert LIB.fedlora_abi_version() == _clib.ABI_VERSION
    assert LIB.fedlora_default_num_threads() >= 1
    assert LIB.fedlora_last_error().decode() == ""
    assert (ROOT / "csrc" / "include" / "fedlora.h").read_text().count("FEDLORA_ABI_VERSION 1")


# ------------------------------------------------------------------------------------------------
# masked weighted mean
# ------------------------------------------------------------------------------------------------


def _ragged(shape, rank_dim, ranks, dtype=torch.float32, gen=None):
    out = []
    for r in ranks:
        s = list(shape)
        s[rank_dim] = r
        out.append(torch.randn(s, generator=gen).to(dtype))
    return out


def _layout(shape, rank_dim):
    outer = math.prod(shape[:rank_dim])
    inner = math.prod(shape[rank_dim + 1 :])
    return outer, shape[rank_dim], inner


def c_mean(tensors, weights, mask, *, rank_dim, fallback, rank, full_shape, out_dtype, threads=0):
    """``fedlora_masked_weighted_mean`` (the C library forms the coefficients itself)."""
    outer, _, inner = _layout(full_shape, rank_dim)
    C = len(tensors)
    ptrs = (ctypes.c_void_p * max(C, 1))(*[t.data_ptr() for t in tensors])
    ranks = (ctypes.c_int64 * max(C, 1))(*[t.shape[rank_dim] for t in tensors])
    w = weights.to(torch.float64).contiguous()
    m = None if mask is None else mask.to(torch.float64).contiguous()
    out = poisoned(full_shape, out_dtype)
    in_dtype = _clib.DTYPES[tensors[0].dtype] if tensors else F32
    status = LIB.fedlora_masked_weighted_mean(
        C, ptrs, ranks, in_dtype, outer, rank, inner, ptr(w), ptr(m), ptr(fallback), ptr(out),
        _clib.DTYPES[out_dtype], threads,
    )  # fmt: skip
    assert status == OK, last_error()
    return out


CASES = [
    # shape of the full tensor, rank_dim, client ranks
    ((7, 37), 0, [7, 3, 5, 0, 7]),  # A [R, d_in], ragged (one client of rank 0)
    ((37, 7), 1, [7, 3, 5, 1, 7]),  # B [d_out, R]
    ((3, 5, 4), 1, [5, 2, 5]),  # rank in the middle of a 3-D tensor
    ((1, 1), 0, [1, 1]),
    ((16, 4100), 0, [16, 9, 16, 12]),  # more than one 4096-element tile per row
    ((5000, 3), 1, [3, 2, 1]),  # many rows per tile, tiles cutting rows
]


@pytest.mark.parametrize("shape,rank_dim,ranks", CASES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "column_empty"])
def test_masked_combine_is_bitwise_reference(shape, rank_dim, ranks, mask_kind):
    """With the reference's coefficients, the C sum is the reference's, bit for bit; with its own
    coefficients (fedlora_masked_weighted_mean), at most one float32 rounding of each
    coefficient away."""
    gen = torch.Generator().manual_seed(sum(shape) + len(ranks))
    R = shape[rank_dim]
    C = len(ranks)
    tensors = _ragged(shape, rank_dim, ranks, gen=gen)
    weights = torch.rand(C, generator=gen, dtype=torch.float64) * 100 + 1
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(C, R, generator=gen) > 0.4
    elif mask_kind == "float":  # any non-negative multiplier of the weight
        mask = torch.rand(C, R, generator=gen, dtype=torch.float64) * 3
    elif mask_kind == "column_empty":
        mask = torch.ones(C, R)
        mask[:, R // 2] = 0  # nobody contributes there: the fallback
    for fallback in (torch.randn(shape, generator=gen), None):
        exp = reference.masked_weighted_mean(
            tensors, weights, mask, rank_dim=rank_dim, fallback=fallback, rank=R,
            dtype=torch.float32,
        )  # fmt: skip
        coef, has = reference.masked_mean_coefficients(weights, mask, ranks, R)
        outer, _, inner = _layout(shape, rank_dim)
        got = poisoned(shape)
        _clib.masked_combine(
            tensors, ranks, coef, has, got, outer=outer, rank=R, inner=inner, fallback=fallback
        )
        assert same_bits(got, exp)

        own = c_mean(
            tensors, weights, mask, rank_dim=rank_dim, fallback=fallback, rank=R,
            full_shape=shape, out_dtype=torch.float32,
        )  # fmt: skip
        # the coefficients: float64 sums in another order, rounded to float32 (<= 1 ulp apart)
        bound = _coefficient_bound(tensors, coef, rank_dim, shape)
        assert torch.all((own - exp).abs() <= bound)


def _coefficient_bound(tensors, coef, rank_dim, shape):
    """``2 eps · Σ_k coef_kj |X_k|`` (+ the smallest normal): what one float32 rounding of each
    coefficient (and the sum's own rounding of the changed terms) can move the result."""
    acc = torch.zeros(shape, dtype=torch.float64)
    view = [1] * len(shape)
    view[rank_dim] = -1
    for k, x in enumerate(tensors):
        r = x.shape[rank_dim]
        acc.narrow(rank_dim, 0, r).add_(x.double().abs() * coef[k, :r].double().view(view))
    return 2 * EPS32 * acc + torch.finfo(torch.float32).tiny


def test_masked_mean_coefficients_match_reference():
    gen = torch.Generator().manual_seed(1)
    C, R = 9, 6
    ranks = [6, 2, 0, 6, 3, 6, 1, 5, 6]
    for weights in (
        torch.rand(C, generator=gen, dtype=torch.float64),
        torch.tensor(
            [1e308, 1e-300, 3.0, 1e308, 0.0, 1e-300, 7.0, 1e200, 1e308], dtype=torch.float64
        ),
    ):
        mask = (torch.rand(C, R, generator=gen) > 0.3).double() * 2.5
        coef = torch.empty(C, R)
        has = torch.empty(R, dtype=torch.uint8)
        ranks_arr = (ctypes.c_int64 * C)(*ranks)
        status = LIB.fedlora_masked_mean_coefficients(
            C, R, ranks_arr, ptr(weights), ptr(mask), ptr(coef), ptr(has)
        )
        assert status == OK, last_error()
        exp_coef, exp_has = reference.masked_mean_coefficients(weights, mask, ranks, R)
        assert torch.equal(has.bool(), exp_has)
        ulp = torch.finfo(torch.float32).eps * exp_coef.abs()
        assert torch.all((coef - exp_coef).abs() <= ulp)
        assert torch.all(coef.sum(0)[exp_has].sub(1).abs() <= C * EPS32)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_masked_mean_bfloat16(in_dtype, out_dtype):
    """bf16 clients are widened exactly; the float32 sum is rounded to bf16 like torch's .to()."""
    gen = torch.Generator().manual_seed(2)
    shape, ranks = (37, 9), [9, 4, 9]
    tensors = _ragged(shape, 1, ranks, dtype=in_dtype, gen=gen)
    weights = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    fallback = torch.randn(shape, generator=gen).to(out_dtype)
    exp = reference.masked_weighted_mean(
        tensors, weights, None, rank_dim=1, fallback=fallback, rank=9, dtype=out_dtype
    )
    coef, has = reference.masked_mean_coefficients(weights, None, ranks, 9)
    got = poisoned(shape, out_dtype)
    _clib.masked_combine(
        tensors, ranks, coef, has, got, outer=37, rank=9, inner=1, fallback=fallback
    )
    assert same_bits(got, exp)


def test_masked_mean_extreme_values_and_weights_stay_finite():
    """Finite inputs near the float32 maximum and weights 1e308 / 1e-300: finite, the
    reference's numbers (the convex combination cannot overflow)."""
    big = torch.finfo(torch.float32).max
    x = [torch.full((4, 3), big * 0.9), torch.full((4, 3), big * 0.8), torch.full((4, 2), -big)]
    weights = torch.tensor([1e308, 1e308, 1e-300], dtype=torch.float64)
    got = c_mean(
        x, weights, None, rank_dim=1, fallback=None, rank=3, full_shape=(4, 3),
        out_dtype=torch.float32,
    )  # fmt: skip
    exp = reference.masked_weighted_mean(
        x, weights, None, rank_dim=1, fallback=None, rank=3, dtype=torch.float32
    )
    assert torch.isfinite(got).all()
    assert same_bits(got, exp)


def test_masked_mean_nan_handling():
    """A NaN where a client's coefficient is 0 (masked out, zero weight) does not propagate;
    a NaN a client contributes reaches exactly its own element, as in the reference."""
    gen = torch.Generator().manual_seed(3)
    x = [torch.randn(5, 8, generator=gen) for _ in range(3)]
    x[1][2, 3] = float("nan")  # client 1's component 2 is masked out
    x[2][:, :] = float("nan")  # client 2 has weight 0
    x[0][4, 7] = float("nan")  # contributed
    mask = torch.ones(3, 5)
    mask[1, 2] = 0
    weights = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    got = c_mean(
        x, weights, mask, rank_dim=0, fallback=None, rank=5, full_shape=(5, 8),
        out_dtype=torch.float32,
    )  # fmt: skip
    exp = reference.masked_weighted_mean(
        x, weights, mask, rank_dim=0, fallback=None, rank=5, dtype=torch.float32
    )
    assert same_bits(got, exp)
    assert torch.isnan(got).sum() == 1 and torch.isnan(got[4, 7])


def test_masked_mean_thread_count_determinism():
    gen = torch.Generator().manual_seed(4)
    shape, ranks = (64, 3000), [64, 17, 64, 33, 50]
    tensors = _ragged(shape, 0, ranks, gen=gen)
    weights = torch.rand(5, generator=gen, dtype=torch.float64)
    outs = [
        c_mean(
            tensors,
            weights,
            None,
            rank_dim=0,
            fallback=None,
            rank=64,
            full_shape=shape,
            out_dtype=torch.float32,
            threads=t,
        )
        for t in (1, 2, 3, 7, 16)
    ]
    assert all(same_bits(o, outs[0]) for o in outs[1:])


def test_masked_mean_in_place_on_fallback():
    """out may be the fallback itself (an in-place update of the global state)."""
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(6, 10, generator=gen)
    x = [torch.randn(4, 10, generator=gen), torch.randn(2, 10, generator=gen)]
    w = torch.tensor([1.0, 1.0], dtype=torch.float64)
    exp = reference.masked_weighted_mean(
        x, w, None, rank_dim=0, fallback=g, rank=6, dtype=torch.float32
    )
    coef, has = reference.masked_mean_coefficients(w, None, [4, 2], 6)
    _clib.masked_combine(x, [4, 2], coef, has, g, outer=1, rank=6, inner=10, fallback=g)
    assert same_bits(g, exp)


def test_masked_mean_bad_arguments_write_nothing():
    """Every refusal: a status code, a message naming the problem, the output untouched."""
    x = [torch.randn(4, 6), torch.randn(2, 6)]
    ptrs = (ctypes.c_void_p * 2)(*[t.data_ptr() for t in x])
    ranks = (ctypes.c_int64 * 2)(4, 2)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = poisoned((4, 6))

    def call(C=2, p=ptrs, rk=ranks, in_dtype=F32, outer=1, rank=4, inner=6, weights=w, mask=None,
             fallback=None, o=out, out_dtype=F32):  # fmt: skip
        return LIB.fedlora_masked_weighted_mean(
            C, p, rk, in_dtype, outer, rank, inner, ptr(weights), ptr(mask), ptr(fallback),
            ptr(o) if isinstance(o, torch.Tensor) else o, out_dtype, 0,
        )  # fmt: skip

    nan_w = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    neg_w = torch.tensor([1.0, -1.0], dtype=torch.float64)
    inf_w = torch.tensor([math.inf, 1.0], dtype=torch.float64)
    bad_mask = torch.ones(2, 4, dtype=torch.float64)
    bad_mask[1, 3] = float("nan")
    null_ptrs = (ctypes.c_void_p * 2)(x[0].data_ptr(), None)
    too_big = (ctypes.c_int64 * 2)(4, 5)
    negative = (ctypes.c_int64 * 2)(4, -1)
    cases = [
        (dict(o=None), NULL, "out"),
        (dict(p=None), NULL, "tensors"),
        (dict(p=null_ptrs), NULL, "tensors[1]"),
        (dict(rk=None), NULL, "ranks"),
        (dict(weights=None), NULL, "weights"),
        (dict(C=-1), SIZE, "num_clients"),
        (dict(outer=0), SIZE, "outer"),
        (dict(rank=-3), SIZE, "rank"),
        (dict(inner=0), SIZE, "inner"),
        (dict(rk=too_big), SIZE, "ranks[1]"),
        (dict(rk=negative), SIZE, "ranks[1]"),
        (dict(C=0), SIZE, "fallback"),
        (dict(weights=nan_w), VALUE, "weights[1]"),
        (dict(weights=neg_w), VALUE, "weights[1]"),
        (dict(weights=inf_w), VALUE, "weights[0]"),
        (dict(mask=bad_mask), VALUE, "mask[1, 3]"),
        (dict(in_dtype=7), UNSUPPORTED, "in_dtype"),
        (dict(out_dtype=-1), UNSUPPORTED, "out_dtype"),
        (dict(o=x[0].data_ptr()), OVERLAP, "tensors[0]"),
    ]
    for kwargs, code, word in cases:
        status = call(**kwargs)
        assert status == code, (kwargs, status, last_error())
        assert word in last_error(), (kwargs, last_error())
        assert torch.isnan(out).all(), kwargs
    assert same_bits(x[0], x[0].clone())  # (the overlap case refused before writing)
    assert call() == OK and last_error() == ""


def test_masked_combine_refuses_bad_coefficients():
    x = [torch.randn(3, 5)]
    out = poisoned((3, 5))
    has = torch.ones(3, dtype=torch.uint8)
    for bad in (float("nan"), -0.5, math.inf):
        coef = torch.tensor([[0.5, bad, 1.0]])
        with pytest.raises(_clib.CLibError, match=r"coef\[0, 1\]"):
            _clib.masked_combine(x, [3], coef, has, out, outer=1, rank=3, inner=5)
        assert torch.isnan(out).all()


# ------------------------------------------------------------------------------------------------
# masked AdamW
# ------------------------------------------------------------------------------------------------

HP = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)


def _adamw_state(shape, gen, grad_dtype=torch.float32):
    p = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen).to(grad_dtype)
    m = torch.randn(shape, generator=gen) * 0.1
    v = torch.rand(shape, generator=gen) * 0.01
    ema = torch.rand(shape, generator=gen)
    unc = torch.rand(shape, generator=gen)
    return p, g, m, v, ema, unc


def _param_bound(p_ref, m_ref, v_ref, step_size, bc2_sqrt):
    """The parameter moves by ``step_size · m / denom`` with ``denom = sqrt(v) / bc + eps``; a
    1-ulp difference in ``sqrt(v)`` (so ≤ 2 ulp in ``denom``) moves it by ``4 eps`` of that step,
    plus one rounding of the parameter itself."""
    denom = v_ref.double().sqrt() / bc2_sqrt + HP["eps"]
    update = step_size * m_ref.double().abs() / denom
    return 4 * EPS32 * update + EPS32 * p_ref.double().abs()


@pytest.mark.parametrize("rank_dim", [0, 1])
@pytest.mark.parametrize("step_kind", ["int", "tensor"])
@pytest.mark.parametrize("importance", [False, True])
@pytest.mark.parametrize("mask_kind", ["all", "half", "none", "random"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_masked_adamw_matches_reference(rank_dim, step_kind, importance, mask_kind, grad_dtype):
    gen = torch.Generator().manual_seed(11 + rank_dim)
    C, rows, cols = (3, 13, 37) if rank_dim == 0 else (3, 37, 13)
    R = rows if rank_dim == 0 else cols
    p, g, m, v, ema, unc = _adamw_state((C, rows, cols), gen, grad_dtype)
    mask = {
        "all": torch.ones(C, R, dtype=torch.bool),
        "half": torch.arange(R).expand(C, R) % 2 == 0,
        "none": torch.zeros(C, R, dtype=torch.bool),
        "random": torch.rand(C, R, generator=gen) > 0.5,
    }[mask_kind]
    steps = [1.0, 4.0, 17.0] if step_kind == "tensor" else [6.0] * C
    step = torch.tensor(steps) if step_kind == "tensor" else 6
    a = [t.clone() for t in (p, m, v, ema, unc)]
    b = [t.clone() for t in (p, m, v, ema, unc)]
    ref_imp = (a[3], a[4], 0.85, 0.7) if importance else None
    reference.masked_adamw_(
        a[0], g, a[1], a[2], mask, beta1=HP["beta1"], beta2=HP["beta2"], lr=HP["lr"],
        eps=HP["eps"], weight_decay=HP["weight_decay"], step=step, rank_dim=rank_dim,
        importance=ref_imp,
    )  # fmt: skip
    _clib.masked_adamw(
        b[0], g.contiguous(), b[1], b[2], mask, steps, **HP, rank_dim=rank_dim,
        tensor_step=step_kind == "tensor",
        importance=(b[3], b[4], 0.85, 0.7) if importance else None,
    )  # fmt: skip
    keep = (mask[:, :, None] if rank_dim == 0 else mask[:, None, :]).expand(C, rows, cols)
    for name, got, exp, old in zip(
        ("param", "m", "v", "ema", "unc"), b, a, (p, m, v, ema, unc), strict=True
    ):
        assert same_bits(got[~keep], old[~keep]), f"{name}: a masked element changed"
        if name != "param":
            assert same_bits(got, exp), f"{name} differs from the reference"
    ss = torch.tensor([HP["lr"] / (1 - HP["beta1"] ** s) for s in steps], dtype=torch.float64)
    bc = torch.tensor([(1 - HP["beta2"] ** s) ** 0.5 for s in steps], dtype=torch.float64)
    bound = _param_bound(a[0], a[1], a[2], ss.view(C, 1, 1), bc.view(C, 1, 1))
    assert torch.all((b[0] - a[0]).abs().double() <= bound)


def _correctly_rounded_sqrt(self: torch.Tensor) -> torch.Tensor:
    """float32 sqrt correctly rounded: through float64 (53 >= 2·24 + 2 bits, so rounding twice is
    innocuous for sqrt), whatever torch's own float32 sqrt does."""
    return torch.sqrt(self.double()).to(self.dtype)


def test_masked_adamw_is_the_reference_with_a_correctly_rounded_sqrt(monkeypatch):
    """Where the C masked AdamW and the torch backend differ, and by how much (issue 20).

    torch's float32 ``sqrt`` on an MKL build goes through MKL VML (``vsSqrt``, high-accuracy mode:
    within 1 ulp, not correctly rounded; about 0.7 % of random inputs are 1 ulp off), while the C
    library's ``std::sqrt`` is IEEE's correctly rounded one. So on many random layouts (3-D
    slots, both rank dims, number and per-slot steps, with and without importance, random masks):
    the C result equals, bitwise and in every element, the reference run with a correctly rounded
    sqrt; and against the plain reference the moments are bitwise equal and ``p`` equal wherever
    torch's sqrt of the new ``v`` is correctly rounded, within ``_param_bound`` elsewhere."""
    gen = torch.Generator().manual_seed(2020)
    hp = {k: HP[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")}
    differing = 0
    for _ in range(60):
        C, rows, cols = (int(torch.randint(1, n, (1,), generator=gen)) for n in (5, 40, 70))
        rank_dim = int(torch.randint(0, 2, (1,), generator=gen))
        tensor_step = bool(torch.randint(0, 2, (1,), generator=gen))
        importance = bool(torch.randint(0, 2, (1,), generator=gen))
        R = rows if rank_dim == 0 else cols
        state = _adamw_state((C, rows, cols), gen)
        mask = torch.rand(C, R, generator=gen) > float(torch.rand(1, generator=gen))
        steps = [float(torch.randint(1, 60, (1,), generator=gen)) for _ in range(C)]
        if not tensor_step:
            steps = [steps[0]] * C
        step = torch.tensor(steps) if tensor_step else int(steps[0])
        g = state[1]
        runs = {}
        for kind in ("torch", "exact", "c"):
            p, m, v, ema, unc = (t.clone() for t in (state[0], *state[2:]))
            imp = (ema, unc, 0.85, 0.7) if importance else None
            if kind == "c":
                _clib.masked_adamw(
                    p, g, m, v, mask, steps, **HP, rank_dim=rank_dim, tensor_step=tensor_step,
                    importance=imp,
                )  # fmt: skip
            else:
                with monkeypatch.context() as mp:
                    if kind == "exact":
                        mp.setattr(torch.Tensor, "sqrt", _correctly_rounded_sqrt)
                    reference.masked_adamw_(
                        p, g, m, v, mask, **hp, step=step, rank_dim=rank_dim, importance=imp
                    )
            runs[kind] = (p, m, v, ema, unc)
        layout = (C, rows, cols, rank_dim, tensor_step, importance)
        for got, exp in zip(runs["c"], runs["exact"], strict=True):
            assert same_bits(got, exp), layout
        for got, exp in zip(runs["c"][1:], runs["torch"][1:], strict=True):
            assert same_bits(got, exp), layout
        p_c, p_t, v_new = runs["c"][0], runs["torch"][0], runs["torch"][2]
        sqrt_exact = v_new.sqrt() == _correctly_rounded_sqrt(v_new)
        assert same_bits(p_c[sqrt_exact], p_t[sqrt_exact]), layout
        differing += int((p_c != p_t).sum())
        ss = torch.tensor([hp["lr"] / (1 - hp["beta1"] ** s) for s in steps], dtype=torch.float64)
        bc = torch.tensor([(1 - hp["beta2"] ** s) ** 0.5 for s in steps], dtype=torch.float64)
        bound = _param_bound(p_t, runs["torch"][1], v_new, ss.view(C, 1, 1), bc.view(C, 1, 1))
        assert torch.all((p_c - p_t).abs().double() <= bound), layout
    print(f"p differs in {differing} elements (torch's sqrt not correctly rounded there)")


def test_masked_adamw_masked_nan_gradient_is_not_read():
    gen = torch.Generator().manual_seed(12)
    p, g, m, v, _, _ = _adamw_state((1, 8, 16), gen)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, :4] = True
    g[0, 4:] = float("nan")
    q = p.clone()
    _clib.masked_adamw(q, g, m, v, mask, [3.0], **HP, rank_dim=0, tensor_step=False)
    assert torch.isfinite(q).all() and torch.isfinite(m).all() and torch.isfinite(v).all()
    assert same_bits(q[0, 4:], p[0, 4:])


def test_masked_adamw_thread_count_determinism():
    gen = torch.Generator().manual_seed(13)
    state = _adamw_state((4, 64, 1000), gen)
    mask = torch.rand(4, 64, generator=gen) > 0.5
    outs = []
    for threads in (1, 2, 5):
        p, g, m, v, ema, unc = (t.clone() for t in state)
        _clib.masked_adamw(
            p, g, m, v, mask, [1.0, 2.0, 3.0, 4.0], **HP, rank_dim=0, tensor_step=True,
            importance=(ema, unc, 0.85, 0.85), num_threads=threads,
        )  # fmt: skip
        outs.append((p, m, v, ema, unc))
    for other in outs[1:]:
        assert all(same_bits(x, y) for x, y in zip(outs[0], other, strict=True))


def test_masked_adamw_bad_arguments_write_nothing():
    gen = torch.Generator().manual_seed(14)
    p, g, m, v, ema, unc = _adamw_state((2, 4, 6), gen)
    mask = torch.ones(2, 4, dtype=torch.uint8)
    steps = (ctypes.c_double * 2)(1.0, 2.0)
    snapshot = [t.clone() for t in (p, m, v, ema, unc)]

    def call(param=p, grad=g, gd=F32, ea=m, eas=v, e=None, u=None, mk=mask, slots=2, rows=4,
             cols=6, rank_dim=0, st=steps, **cfg):  # fmt: skip
        conf = _clib._AdamWConfig(
            cfg.get("lr", 1e-3), cfg.get("beta1", 0.9), cfg.get("beta2", 0.999),
            cfg.get("eps", 1e-8), cfg.get("weight_decay", 0.0), cfg.get("ib1", 0.85),
            cfg.get("ib2", 0.85), cfg.get("flags", 0),
        )  # fmt: skip
        a = [
            x.data_ptr() if isinstance(x, torch.Tensor) else x
            for x in (param, grad, ea, eas, e, u, mk)
        ]
        return LIB.fedlora_masked_adamw(
            a[0], a[1], gd, a[2], a[3], a[4], a[5], a[6], slots, rows, cols, rank_dim, st,
            ctypes.byref(conf), 0,
        )  # fmt: skip

    bad_mask = mask.clone()
    bad_mask[1, 2] = 2
    cases = [
        (dict(param=None), NULL, "param"),
        (dict(grad=None), NULL, "grad"),
        (dict(mk=None), NULL, "mask"),
        (dict(st=None), NULL, "steps"),
        (dict(e=ema), NULL, "ema and unc"),
        (dict(slots=0), SIZE, "slots"),
        (dict(rows=-2), SIZE, "rows"),
        (dict(cols=0), SIZE, "cols"),
        (dict(rank_dim=2), VALUE, "rank_dim"),
        (dict(mk=bad_mask), VALUE, "mask[1, 2]"),
        (dict(st=(ctypes.c_double * 2)(1.0, 0.0)), VALUE, "steps[1]"),
        (dict(st=(ctypes.c_double * 2)(1.5, 2.0)), VALUE, "steps[0]"),
        (dict(st=(ctypes.c_double * 2)(math.nan, 2.0)), VALUE, "steps[0]"),
        (dict(lr=math.nan), VALUE, "lr"),
        (dict(lr=-1.0), VALUE, "lr"),
        (dict(beta1=1.0), VALUE, "beta1"),
        (dict(beta2=math.nan), VALUE, "beta2"),
        (dict(eps=-1e-8), VALUE, "eps"),
        (dict(weight_decay=math.inf), VALUE, "weight_decay"),
        (dict(e=ema, u=unc, ib2=1.5), VALUE, "importance_beta2"),
        (dict(flags=4), UNSUPPORTED, "flags"),
        (dict(gd=3), UNSUPPORTED, "grad_dtype"),
        (dict(ea=p), OVERLAP, "param and exp_avg"),
        (dict(grad=v), OVERLAP, "exp_avg_sq and grad"),
        (dict(e=ema, u=ema), OVERLAP, "ema and unc"),
    ]
    for kwargs, code, word in cases:
        status = call(**kwargs)
        assert status == code, (kwargs, status, last_error())
        assert word in last_error(), (kwargs, last_error())
        assert all(same_bits(x, y) for x, y in zip((p, m, v, ema, unc), snapshot, strict=True)), (
            kwargs
        )
    assert call() == OK and not same_bits(p, snapshot[0])


# ------------------------------------------------------------------------------------------------
# forwards
# ------------------------------------------------------------------------------------------------


def _forward_bound(terms_abs: torch.Tensor, depth: int) -> torch.Tensor:
    """``depth · eps · Σ|terms|`` (+ the smallest normal): the float32 rounding error of a sum
    of products of that depth, for either summation order."""
    return depth * EPS32 * terms_abs + torch.finfo(torch.float32).tiny


@pytest.mark.parametrize(
    "n,d_in,d_out,R,C", [(1, 37, 19, 5, 1), (9, 64, 33, 16, 3), (37, 130, 7, 3, 2)]
)
def test_masked_lora_forward_matches_reference(n, d_in, d_out, R, C):
    gen = torch.Generator().manual_seed(n + d_in)
    x = torch.randn(n, d_in, generator=gen)
    A = torch.randn(C, R, d_in, generator=gen)
    B = torch.randn(C, d_out, R, generator=gen)
    cuts = sorted(torch.randint(0, n + 1, (C,), generator=gen).tolist())
    off = torch.tensor([0, *cuts, n])
    ada = torch.tensor([t % C for t in range(C + 1)])
    if C == 1:
        off, ada = torch.tensor([0, n]), torch.tensor([0])
    S = off.numel() - 1
    rank_mask = (torch.rand(S, R, generator=gen) > 0.3).float()
    exp = reference.masked_lora(
        x, A, B, scale=0.5, rank_mask=rank_mask, grad_mask=None, seg_offsets=off, seg_adapter=ada
    )
    got = _clib.masked_lora_forward(
        x, A, B, scale=0.5, rank_mask=rank_mask, seg_offsets=off, seg_adapter=ada
    )
    # float64 oracle and the bound from the magnitudes
    slot = torch.repeat_interleave(ada, off.diff())
    seg = torch.repeat_interleave(torch.arange(S), off.diff())
    s64 = torch.einsum("nq,nrq->nr", x.double(), A.double()[slot]) * rank_mask.double()[seg]
    y64 = torch.einsum("nr,nor->no", s64 * 0.5, B.double()[slot])
    abs_s = torch.einsum("nq,nrq->nr", x.double().abs(), A.double().abs()[slot])
    abs_y = torch.einsum("nr,nor->no", abs_s * 0.5, B.double().abs()[slot])
    bound = _forward_bound(abs_y, d_in + R + 2)
    assert torch.all((got.double() - y64).abs() <= bound)
    assert torch.all((exp.double() - y64).abs() <= bound)
    # no segments given: one segment, slot 0
    one = _clib.masked_lora_forward(x, A[:1], B[:1], scale=0.5)
    ref1 = reference.masked_lora(
        x, A[:1], B[:1], scale=0.5, rank_mask=None, grad_mask=None,
        seg_offsets=torch.tensor([0, n]), seg_adapter=torch.tensor([0]),
    )  # fmt: skip
    torch.testing.assert_close(one, ref1, rtol=0, atol=float(bound.max()))


@pytest.mark.parametrize("n,d_in,d_out,h,r,C", [(1, 37, 19, 2, 3, 1), (8, 64, 48, 4, 8, 3)])
def test_multihead_forward_matches_reference(n, d_in, d_out, h, r, C):
    gen = torch.Generator().manual_seed(n * h)
    x = torch.randn(n, d_in, generator=gen)
    A = torch.randn(h, r, d_in, generator=gen)
    B = torch.randn(h, d_out, r, generator=gen)
    H = torch.randn(C, h, r, r, generator=gen)
    s = torch.randn(C, h, generator=gen)
    off = torch.tensor([0, n // 2, n]) if C > 1 else torch.tensor([0, n])
    ada = torch.tensor([C - 1, 0]) if C > 1 else torch.tensor([0])
    got = _clib.multihead_forward(x, A, B, H, s, scale=0.75, seg_offsets=off, seg_adapter=ada)
    exp = reference.multihead_lora(
        x, A, B, H, s, scale=0.75, seg_offsets=off, seg_adapter=ada, head_mask=None
    )
    slot = torch.repeat_interleave(ada, off.diff())

    def oracle(absolute: bool) -> torch.Tensor:
        f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
        S = torch.einsum("nq,hkq->nhk", f(x), f(A))
        T = torch.einsum("nhk,nhjk->nhj", S, f(H)[slot]) * f(s)[slot][:, :, None]
        return torch.einsum("nhj,hoj->no", T, f(B)) * 0.75

    bound = _forward_bound(oracle(True), d_in + r + h * r + 3)
    assert torch.all((got.double() - oracle(False)).abs() <= bound)
    assert torch.all((exp.double() - oracle(False)).abs() <= bound)


def test_forward_bad_arguments_write_nothing():
    x = torch.randn(4, 8)
    A, B = torch.randn(2, 3, 8), torch.randn(2, 5, 3)
    y = poisoned((4, 5))

    def call(xp=x, n=4, off=(0, 2, 4), ada=(0, 1), segs=2, mask=None, yp=y, scale=1.0):
        o = None if off is None else torch.tensor(off)
        a = None if ada is None else torch.tensor(ada)
        xp = xp.data_ptr() if isinstance(xp, torch.Tensor) else xp
        yp = yp.data_ptr() if isinstance(yp, torch.Tensor) else yp
        return LIB.fedlora_masked_lora_forward(
            xp, n, 8, ptr(A), ptr(B), 2, 3, 5, scale, ptr(mask), ptr(o), ptr(a), segs, yp, 0
        )

    cases = [
        (dict(xp=None), NULL, "x"),
        (dict(yp=None), NULL, "y"),
        (dict(n=0), SIZE, "n"),
        (dict(off=(0, 2, 3)), VALUE, "seg_offsets"),
        (dict(off=(0, 3, 2, 4), ada=(0, 1, 0), segs=3), VALUE, "non-decreasing"),
        (dict(ada=(0, 2)), VALUE, "seg_adapter[1]"),
        (dict(ada=None), NULL, "seg_adapter"),
        (dict(mask=torch.tensor([[1.0, 0.5, 1.0], [1.0, 1.0, 1.0]])), VALUE, "rank_mask"),
        (dict(scale=math.nan), VALUE, "scale"),
        (dict(yp=x), OVERLAP, "y overlaps"),
    ]
    for kwargs, code, word in cases:
        status = call(**kwargs)
        assert status == code, (kwargs, status, last_error())
        assert word in last_error(), (kwargs, last_error())
        assert torch.isnan(y).all(), kwargs
    assert call() == OK and torch.isfinite(y).all()


# ------------------------------------------------------------------------------------------------
# sizes that overflow, flags that are not 0/1 (issue 20)
# ------------------------------------------------------------------------------------------------

BIG = 2**40


def _forward_call(**over):
    x, A, B, y = torch.randn(4, 8), torch.randn(2, 3, 8), torch.randn(2, 5, 3), poisoned((4, 5))
    a = dict(n=4, d_in=8, slots=2, rank=3, d_out=5)
    a.update(over)
    status = LIB.fedlora_masked_lora_forward(
        ptr(x), a["n"], a["d_in"], ptr(A), ptr(B), a["slots"], a["rank"], a["d_out"], 1.0, None,
        ptr(torch.tensor([0, 2, 4])), ptr(torch.tensor([0, 1])), 2, ptr(y), 0,
    )  # fmt: skip
    return status, y


@pytest.mark.parametrize(
    "over",
    [
        dict(n=BIG, d_in=2**22),  # x: 2^62 floats, 2^64 bytes
        dict(n=BIG, d_out=2**22),  # y
        dict(rank=BIG, d_in=2**21),  # A: 2 * 2^61 floats
        dict(slots=2**61, rank=2),  # A's element count itself
    ],
)
def test_forward_sizes_that_overflow_are_too_big(over):
    """Sizes whose byte counts overflow int64 are refused as "too big" before anything else is
    computed from them (before: a misleading "y overlaps" / seg_offsets / out-of-memory)."""
    status, y = _forward_call(**over)
    assert status == SIZE, (status, last_error())
    assert "too big" in last_error()
    assert torch.isnan(y).all()
    H, s = torch.randn(2, 2, 3, 3), torch.ones(2, 2)
    x, A, B = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 5, 3)
    y = poisoned((4, 5))
    status = LIB.fedlora_multihead_forward(
        ptr(x), BIG, 2**22, ptr(A), ptr(B), ptr(H), ptr(s), 2, 2, 3, 5, 1.0, None, None, 1,
        ptr(y), 0,
    )  # fmt: skip
    assert status == SIZE and "too big" in last_error(), (status, last_error())
    assert torch.isnan(y).all()


def test_mean_and_adamw_sizes_that_overflow_are_too_big():
    x = [torch.randn(4, 6), torch.randn(2, 6)]
    ptrs = (ctypes.c_void_p * 2)(*[t.data_ptr() for t in x])
    ranks = (ctypes.c_int64 * 2)(4, 2)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = poisoned((4, 6))
    for outer, inner in ((2**61, 1), (2**59, 2), (1, 2**61)):
        status = LIB.fedlora_masked_weighted_mean(
            2, ptrs, ranks, F32, outer, 4, inner, ptr(w), None, None, ptr(out), F32, 0
        )
        assert status == SIZE and "too big" in last_error(), (outer, inner, last_error())
    assert torch.isnan(out).all()
    p = torch.randn(2, 4, 6)
    conf = _clib._AdamWConfig(1e-3, 0.9, 0.999, 1e-8, 0.0, 0.85, 0.85, 0)
    steps = (ctypes.c_double * 2)(1.0, 2.0)
    mask = torch.ones(2, 4, dtype=torch.uint8)
    before = p.clone()
    for rows, cols in ((2**30, 2**31), (2**31, 2**31)):
        status = LIB.fedlora_masked_adamw(
            ptr(p), ptr(p.clone()), F32, ptr(p.clone()), ptr(p.clone()), None, None, ptr(mask),
            2, rows, cols, 0, steps, ctypes.byref(conf), 0,
        )  # fmt: skip
        assert status == SIZE and "too big" in last_error(), (rows, cols, last_error())
    assert same_bits(p, before)


def test_array_spans_that_wrap_memory_are_too_big():
    """An array whose claimed end lies past the top of the address space is refused as "too big"
    instead of confusing the overlap checks (run in a child: before the check it read memory)."""
    code = f"""
import ctypes
lib = ctypes.CDLL({str(_clib.library_path())!r})
lib.fedlora_last_error.restype = ctypes.c_char_p
lib.fedlora_masked_lora_forward.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
    ctypes.c_double, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
    ctypes.c_void_p, ctypes.c_int]
y = (ctypes.c_float * 20)()
A = (ctypes.c_float * 48)()
B = (ctypes.c_float * 30)()
top = 2**64 - 64
st = lib.fedlora_masked_lora_forward(top, 4, 8, A, B, 2, 3, 5, 1.0, None, None, None, 1, y, 0)
print(st, lib.fedlora_last_error().decode())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, _, message = proc.stdout.strip().partition(" ")
    assert int(status) == SIZE and "too big" in message, proc.stdout


def test_flag_arrays_other_than_0_or_1_are_refused():
    """``has`` (masked_combine) and ``mask`` (masked_adamw) are 0/1 flags: any other byte is
    refused with FEDLORA_ERR_INVALID_VALUE, naming the entry, and nothing is written."""
    x = [torch.randn(3, 5)]
    coef = torch.tensor([[0.5, 1.0, 1.0]])
    for bad in (2, 255):
        out = poisoned((3, 5))
        has = torch.tensor([1, bad, 1], dtype=torch.uint8)
        with pytest.raises(_clib.CLibError, match=r"has\[1\] must be 0 or 1"):
            _clib.masked_combine(x, [3], coef, has, out, outer=1, rank=3, inner=5)
        assert torch.isnan(out).all()
        p = torch.randn(1, 3, 4)
        q = p.clone()
        mask = torch.tensor([[1, 0, bad]], dtype=torch.uint8)
        conf = _clib._AdamWConfig(1e-3, 0.9, 0.999, 1e-8, 0.0, 0.85, 0.85, 0)
        status = LIB.fedlora_masked_adamw(
            ptr(q), ptr(torch.randn(1, 3, 4)), F32, ptr(torch.zeros(1, 3, 4)),
            ptr(torch.zeros(1, 3, 4)), None, None, ptr(mask), 1, 3, 4, 0,
            (ctypes.c_double * 1)(1.0), ctypes.byref(conf), 0,
        )  # fmt: skip
        assert status == VALUE and "mask[0, 2]" in last_error()
        assert same_bits(q, p)


# ------------------------------------------------------------------------------------------------
# the loader
# ------------------------------------------------------------------------------------------------


def test_loader_without_library_warns_once(monkeypatch, tmp_path):
    monkeypatch.setattr(_clib, "_state", {})
    monkeypatch.setenv("FEDLORA_LIBRARY", str(tmp_path / "missing.so"))
    assert _clib.library() is None and not _clib.available()
    with pytest.warns(RuntimeWarning, match="libfedlora is unavailable"):
        _clib.warn_unavailable("masked_weighted_mean")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _clib.warn_unavailable("masked_adamw_")  # once per process
    with pytest.raises(RuntimeError, match="unavailable"):
        _clib.masked_lora_forward(
            torch.randn(1, 2), torch.randn(1, 1, 2), torch.randn(1, 2, 1), scale=1.0
        )


# ------------------------------------------------------------------------------------------------
# the example server (csrc/examples/aggregate_server.c) against fedlora.aggregate
# ------------------------------------------------------------------------------------------------


def write_round(directory: Path, global_state, client_states, weights, rank_dims) -> list[str]:
    """Write one round in the example's format (manifest.txt, global.bin, client<k>.bin);
    returns the tensor names in file order."""
    names = list(global_state)
    lines = [
        "fedlora-aggregate 1",
        f"clients {len(client_states)}",
        "weights " + " ".join(repr(float(w)) for w in weights),
        f"tensors {len(names)}",
    ]
    for name in names:
        g = global_state[name]
        rd = rank_dims[name]
        ranks = [cs[name].shape[rd] if rd >= 0 else 1 for cs in client_states]
        lines.append(" ".join(map(str, [name, rd, g.dim(), *g.shape, *ranks])))
    (directory / "manifest.txt").write_text("\n".join(lines) + "\n")

    def dump(state, path):
        with open(path, "wb") as f:
            for name in names:
                f.write(state[name].contiguous().numpy().astype("<f4").tobytes())

    dump(global_state, directory / "global.bin")
    for k, cs in enumerate(client_states):
        dump(cs, directory / f"client{k}.bin")
    return names


def _build_example(tmp_path: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler for the example program")
    lib = _clib.library_path()
    exe = tmp_path / "fedlora_aggregate"
    cmd = [
        cc, "-std=c99", "-O2", "-Wall", "-Werror", f"-I{ROOT / 'csrc' / 'include'}",
        str(ROOT / "csrc" / "examples" / "aggregate_server.c"), str(lib),
        f"-Wl,-rpath,{lib.parent}", "-o", str(exe),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def test_example_server_equals_fedlora_aggregate(tmp_path):
    """PreLort's round (ragged rank prefixes, uncovered indices kept) in C equals
    fedlora.aggregate("prelort") on the same clients."""
    import fedlora

    exe = _build_example(tmp_path)
    gen = torch.Generator().manual_seed(21)
    R, d = 8, 24
    paths = ["layer.0.q", "layer.0.v", "layer.1.q"]
    g = {}
    for p in paths:
        g[f"{p}.lora_A.weight"] = torch.randn(R, d, generator=gen)
        g[f"{p}.lora_B.weight"] = torch.randn(d + 5, R, generator=gen)
    g["classifier.weight"] = torch.randn(3, d, generator=gen)
    ranks = [8, 3, 5, 3]  # index 5..7 covered by one client, 3..4 by two
    clients = []
    for r in ranks:
        cs = {}
        for p in paths:
            cs[f"{p}.lora_A.weight"] = torch.randn(r, d, generator=gen)
            cs[f"{p}.lora_B.weight"] = torch.randn(d + 5, r, generator=gen)
        cs["classifier.weight"] = torch.randn(3, d, generator=gen)
        clients.append(cs)
    weights = [120.0, 80.0, 40.0, 7.0]
    rank_dims = {k: (0 if k.endswith("lora_A.weight") else 1 if "lora_B" in k else -1) for k in g}
    names = write_round(tmp_path, g, clients, weights, rank_dims)
    out_file = tmp_path / "result.bin"
    run = subprocess.run([str(exe), str(tmp_path), str(out_file)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    flat = torch.from_numpy(np.fromfile(out_file, dtype="<f4"))
    assert flat.numel() == sum(g[n].numel() for n in names)
    got = dict(zip(names, torch.split(flat, [g[n].numel() for n in names]), strict=True))

    expected, _ = fedlora.aggregate(
        "prelort", g, clients, weights, [{"rank": r} for r in ranks], strict=True
    )
    w = torch.tensor(weights, dtype=torch.float64)
    for name in names:
        exp = expected[name]
        mine = got[name].view(exp.shape)
        rd = rank_dims[name]
        cl = [cs[name] for cs in clients]
        if rd < 0:  # the plain weighted mean: same value, a different summation
            p_abs = sum(float(wk) * c.double().abs() for wk, c in zip(w / w.sum(), cl, strict=True))
            bound = (len(cl) + 2) * EPS32 * p_abs
        else:
            coef, _ = reference.masked_mean_coefficients(w, None, [c.shape[rd] for c in cl], R)
            bound = _coefficient_bound(cl, coef, rd, exp.shape)
        assert torch.all((mine - exp).abs() <= bound), name
    # an uncovered index keeps the global value; a lone contributor is taken whole
    a0 = "layer.0.q.lora_A.weight"
    assert torch.equal(got[a0].view(R, d)[5:], clients[0][a0][5:])


def test_example_server_reports_bad_input(tmp_path):
    exe = _build_example(tmp_path)
    g = {"x.lora_A.weight": torch.randn(2, 3)}
    c = [{"x.lora_A.weight": torch.randn(2, 3)}]
    write_round(tmp_path, g, c, [float("nan")], {"x.lora_A.weight": 0})
    run = subprocess.run(
        [str(exe), str(tmp_path), str(tmp_path / "o.bin")], capture_output=True, text=True
    )
    assert run.returncode == 1 and "weights[0]" in run.stderr


@pytest.mark.parametrize(
    "cols,on", [(300, slice(0, 150)), (300, slice(10, 290)), (16, slice(0, 8))]
)
def test_masked_adamw_column_spans(cols, on):
    """Both ways the library walks a column mask (long spans as runs, short ones as selected
    rows) leave the masked columns bitwise and equal the reference's moments bitwise."""
    gen = torch.Generator().manual_seed(cols)
    p, g, m, v, ema, unc = _adamw_state((2, 9, cols), gen)
    mask = torch.zeros(2, cols, dtype=torch.bool)
    mask[:, on] = True
    a = [t.clone() for t in (p, m, v, ema, unc)]
    b = [t.clone() for t in (p, m, v, ema, unc)]
    reference.masked_adamw_(
        a[0], g, a[1], a[2], mask, beta1=HP["beta1"], beta2=HP["beta2"], lr=HP["lr"],
        eps=HP["eps"], weight_decay=HP["weight_decay"], step=3, rank_dim=1,
        importance=(a[3], a[4], 0.85, 0.85),
    )  # fmt: skip
    _clib.masked_adamw(
        b[0], g, b[1], b[2], mask, [3.0, 3.0], **HP, rank_dim=1, tensor_step=False,
        importance=(b[3], b[4], 0.85, 0.85),
    )  # fmt: skip
    for got, exp in zip(b[1:], a[1:], strict=True):
        assert same_bits(got, exp)
    assert same_bits(b[0][:, :, ~mask[0]], p[:, :, ~mask[0]])
    ss = HP["lr"] / (1 - HP["beta1"] ** 3)
    bound = _param_bound(a[0], a[1], a[2], ss, (1 - HP["beta2"] ** 3) ** 0.5)
    assert torch.all((b[0] - a[0]).abs().double() <= bound)


# ------------------------------------------------------------------------------------------------
# the ops' CPU path (fedlora_kernels.masked_weighted_mean / masked_adamw_)
# ------------------------------------------------------------------------------------------------


def _forbid_c(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the C library was called")

    monkeypatch.setattr(_clib, "masked_combine", boom)
    monkeypatch.setattr(_clib, "masked_adamw", boom)


def test_ops_use_the_c_library_on_cpu(monkeypatch):
    """By default the CPU path of both ops is the C library, with the reference's numbers:
    the mean bitwise, the AdamW moments bitwise (the parameter within one sqrt rounding)."""
    import fedlora_kernels as fk

    monkeypatch.delenv("FEDLORA_BACKEND", raising=False)
    assert fk.resolve_backend(None, torch.device("cpu"), c_op="masked_adamw_") == "c"
    gen = torch.Generator().manual_seed(31)
    x = [torch.randn(33, r, generator=gen) for r in (8, 3, 6)]
    g = torch.randn(33, 8, generator=gen)
    mask = torch.rand(3, 8, generator=gen) > 0.3
    calls = []
    real = _clib.masked_combine
    monkeypatch.setattr(_clib, "masked_combine", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = fk.masked_weighted_mean(x, [3.0, 1.0, 2.0], mask, rank_dim=1, fallback=g)
    exp = fk.masked_weighted_mean(x, [3.0, 1.0, 2.0], mask, rank_dim=1, fallback=g, backend="torch")
    assert calls and same_bits(got, exp)
    forced = fk.masked_weighted_mean(x, [3.0, 1.0, 2.0], mask, rank_dim=1, fallback=g, backend="c")
    assert same_bits(forced, exp)

    p, gr, m, v, ema, unc = _adamw_state((2, 5, 40), gen)
    keep = torch.rand(2, 5, generator=gen) > 0.5
    a = [t.clone() for t in (p, m, v, ema, unc)]
    b = [t.clone() for t in (p, m, v, ema, unc)]
    kw = dict(lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"])
    kw["weight_decay"] = HP["weight_decay"]
    step = torch.tensor([2, 9])
    fk.masked_adamw_(a[0], gr, a[1], a[2], keep, step=step, importance=(a[3], a[4], 0.85, 0.85), backend="torch", **kw)  # fmt: skip
    fk.masked_adamw_(b[0], gr, b[1], b[2], keep, step=step, importance=(b[3], b[4], 0.85, 0.85), **kw)  # fmt: skip
    assert all(same_bits(x, y) for x, y in zip(a[1:], b[1:], strict=True))
    ss = torch.tensor([HP["lr"] / (1 - HP["beta1"] ** s) for s in (2, 9)], dtype=torch.float64)
    bc = torch.tensor([(1 - HP["beta2"] ** s) ** 0.5 for s in (2, 9)], dtype=torch.float64)
    bound = _param_bound(a[0], a[1], a[2], ss.view(2, 1, 1), bc.view(2, 1, 1))
    assert torch.all((b[0] - a[0]).abs().double() <= bound)


def test_backend_torch_forces_the_reference(monkeypatch):
    import fedlora_kernels as fk

    _forbid_c(monkeypatch)
    x = [torch.randn(4, 6), torch.randn(2, 6)]
    p, g, m, v, _, _ = _adamw_state((4, 6), torch.Generator().manual_seed(32))
    kw = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, step=1)
    monkeypatch.setenv("FEDLORA_BACKEND", "torch")
    fk.masked_weighted_mean(x, [1.0, 1.0], fallback=torch.zeros(4, 6))
    fk.masked_adamw_(p, g, m, v, torch.ones(4), **kw)
    monkeypatch.delenv("FEDLORA_BACKEND")
    fk.masked_weighted_mean(x, [1.0, 1.0], fallback=torch.zeros(4, 6), backend="torch")
    fk.masked_adamw_(p, g, m, v, torch.ones(4), backend="torch", **kw)
    # float16 has no C path: the reference, silently
    fk.masked_weighted_mean([t.half() for t in x], [1.0, 1.0])
    with pytest.raises(ValueError, match="backend='c' needs CPU tensors"):
        fk.resolve_backend("c", torch.device("cuda"), c_op="masked_adamw_")
    assert fk.resolve_backend("c", torch.device("cpu")) == "torch"  # an op without C: torch


def test_ops_without_the_library_warn_once_and_use_torch(monkeypatch, tmp_path):
    import warnings

    import fedlora_kernels as fk

    monkeypatch.delenv("FEDLORA_BACKEND", raising=False)
    monkeypatch.setattr(_clib, "_state", {})
    monkeypatch.setenv("FEDLORA_LIBRARY", str(tmp_path / "absent.so"))
    _forbid_c(monkeypatch)
    x = [torch.randn(4, 6), torch.randn(2, 6)]
    exp = reference.masked_weighted_mean(
        x, torch.tensor([1.0, 3.0], dtype=torch.float64), None, rank_dim=0, fallback=None,
        rank=4, dtype=torch.float32,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="libfedlora is unavailable") as record:
        got = fk.masked_weighted_mean(x, [1.0, 3.0])
    assert len(record) == 1 and same_bits(got, exp)
    p, g, m, v, _, _ = _adamw_state((4, 6), torch.Generator().manual_seed(33))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second op does not warn again
        fk.masked_adamw_(p, g, m, v, torch.ones(4), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, step=1)  # fmt: skip
    with pytest.raises(RuntimeError, match="backend='c' needs libfedlora"):
        fk.masked_weighted_mean(x, [1.0, 3.0], backend="c")
