"""Reliability contract of the ops and layers (DESIGN §7): bad input gets a named error.

One test per failure class, parametrized over the entry points and the bad values: non-0/1
masks, coerced selections, impossible Ravan bases, wrong forward inputs, state dicts that do not
fit, meta tensors (shape propagation, no value reads), bad scalars and sizes, and the overflow of
a weighted mean of finite values near the float32 maximum.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from conftest import BACKENDS
from torch import nn

import fedlora
import fedlora_kernels as fk
from fedlora.layers.head import SlottedLinear
from fedlora.layers.ravan import ravan_bases

EPS32 = torch.finfo(torch.float32).eps
H_, R_, D_IN, D_OUT = 2, 3, 5, 4


def mh_args(n=6, slots=1):
    """Random multi-head inputs (never zeros)."""
    return dict(
        x=torch.randn(n, D_IN),
        A=torch.randn(H_, R_, D_IN),
        B=torch.randn(H_, D_OUT, R_),
        H=torch.randn(slots, H_, R_, R_),
        s=torch.randn(slots, H_) + 2.0,
    )


def adamw_args(rank=R_):
    p = torch.randn(rank, D_IN)
    return dict(
        param=p,
        grad=torch.randn_like(p),
        exp_avg=torch.randn_like(p),
        exp_avg_sq=torch.rand_like(p),
        lr=1e-3,
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=0.01,
        step=3,
    )


# ------------------------------------------------------------------------ non-0/1 masks
def _mask_call(op, mask):
    if op == "multihead_lora.head_mask":
        a = mh_args()
        return fk.multihead_lora(**a, head_mask=mask.expand(1, H_))
    if op == "masked_lora.rank_mask":
        return fk.masked_lora(
            torch.randn(6, D_IN), torch.randn(2, D_IN), torch.randn(D_OUT, 2), rank_mask=mask
        )
    if op == "masked_lora.grad_mask":
        return fk.masked_lora(
            torch.randn(6, D_IN), torch.randn(2, D_IN), torch.randn(D_OUT, 2), grad_mask=mask
        )
    a = adamw_args(rank=2)
    return fk.masked_adamw_(
        a.pop("param"), a.pop("grad"), a.pop("exp_avg"), a.pop("exp_avg_sq"), mask, **a
    )


@pytest.mark.parametrize("bad", [2.0, -1.0, 0.5, float("nan")], ids=["2", "-1", "0.5", "nan"])
@pytest.mark.parametrize(
    "op",
    [
        "multihead_lora.head_mask",
        "masked_lora.rank_mask",
        "masked_lora.grad_mask",
        "masked_adamw_.mask",
    ],
)
def test_masks_must_be_zero_or_one(op, bad):
    name = op.split(".")[1]
    with pytest.raises(ValueError, match=rf"{name} must contain only 0 and 1"):
        _mask_call(op, torch.tensor([1.0, bad]))
    _mask_call(op, torch.tensor([1.0, 0.0]))  # a valid mask of the same dtype is accepted


# ------------------------------------------------------------------------ coerced selections
def _lora():
    return fedlora.LoRALinear(nn.Linear(D_IN, D_OUT), rank=4)


def _ravan():
    return fedlora.RavanLinear(nn.Linear(D_IN, D_OUT), heads=3, rank=2)


SELECTIONS = [
    (lambda: _lora().set_rank(2.5), TypeError, "rank must be an int"),
    (lambda: _lora().set_rank(True), TypeError, "rank must be an int"),
    (lambda: _lora().set_rank([0, 1]), TypeError, "rank must be an int"),
    (lambda: _lora().set_trainable([0.9]), TypeError, "components must hold int"),
    (lambda: _lora().set_trainable(True), TypeError, "components must be"),
    (lambda: _lora().set_trainable([True]), TypeError, "components must hold int"),
    (lambda: _lora().set_trainable(torch.tensor([0.9])), TypeError, "components must hold"),
    (lambda: _lora().set_trainable("01"), TypeError, "components must be"),
    (lambda: _lora().set_trainable([-1]), ValueError, r"components: component indices"),
    (lambda: _ravan().set_trainable_heads([0.9]), TypeError, "heads must hold int"),
    (lambda: _ravan().set_trainable_heads([True]), TypeError, "heads must hold int"),
    (lambda: _ravan().set_trainable_heads(1), TypeError, "heads must be a list"),
    (lambda: _ravan().set_trainable_heads(torch.tensor([1.0])), TypeError, "heads must hold"),
    (lambda: _ravan().set_trainable_heads(torch.ones(2, dtype=torch.bool)), ValueError, "heads"),
]


@pytest.mark.parametrize(
    "call,exc,match", SELECTIONS, ids=[f"sel{i}" for i in range(len(SELECTIONS))]
)
def test_selections_are_never_coerced(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_valid_selections_still_work():
    layer = _lora()
    layer.set_rank(2)
    assert layer.rank_mask[0].tolist() == [True, True, False, False]
    layer.set_trainable(torch.tensor([True, False, False, True]))
    assert layer.grad_mask[0].tolist() == [True, False, False, True]
    rv = _ravan()
    rv.set_trainable_heads(torch.tensor([2]))
    assert rv.trainable_heads() == [2]


# ------------------------------------------------------------------------ Ravan bases
@pytest.mark.parametrize("d_in,d_out,heads,rank", [(10, 7, 4, 8), (10, 7, 2, 8), (5, 9, 1, 6)])
def test_orthogonal_ravan_bases_need_rank_at_most_min_dim(d_in, d_out, heads, rank):
    with pytest.raises(ValueError, match=rf"rank={rank} is larger than min\(d_in={d_in}"):
        fedlora.RavanLinear(nn.Linear(d_in, d_out), heads=heads, rank=rank)
    with pytest.raises(ValueError, match="init='gaussian'"):
        ravan_bases(d_in, d_out, heads, rank)
    # Gaussian bases exist for any sizes, and the layer then works
    layer = fedlora.RavanLinear(nn.Linear(d_in, d_out), heads=heads, rank=rank, init="gaussian")
    assert layer(torch.randn(3, d_in)).shape == (3, d_out)
    # heads * rank above the dimensions is fine as long as each head fits
    ok = min(d_in, d_out)
    layer = fedlora.RavanLinear(nn.Linear(d_in, d_out), heads=heads + 1, rank=ok)
    assert layer(torch.randn(3, d_in)).shape == (3, d_out)


# ------------------------------------------------------------------------ wrong inputs
def _op_input(kind, x):
    if kind == "masked_lora":
        return fk.masked_lora(x, torch.randn(2, D_IN), torch.randn(D_OUT, 2))
    a = mh_args()
    a["x"] = x
    return fk.multihead_lora(**a)


INPUTS = [
    (torch.randn(3, D_IN + 1), ValueError, "must have"),
    (torch.randn(3, D_IN, dtype=torch.float64), TypeError, "dtype"),
    (torch.ones(3, D_IN, dtype=torch.int64), TypeError, "dtype|floating"),
    (torch.randn(3, D_IN, dtype=torch.bfloat16), TypeError, "dtype"),
    ([[1.0] * D_IN], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("x,exc,match", INPUTS, ids=["d_in", "f64", "int", "bf16", "list"])
@pytest.mark.parametrize("kind", ["LoRALinear", "RavanLinear", "masked_lora", "multihead_lora"])
def test_wrong_input_is_named(kind, x, exc, match):
    if kind == "LoRALinear":
        call, name = (lambda: _lora()(x)), "input x"
    elif kind == "RavanLinear":
        call, name = (lambda: _ravan()(x)), "input x"
    else:
        call, name = (lambda: _op_input(kind, x)), "(x|A)"
    with pytest.raises(exc, match=f"{name}.*({match})"):
        call()


# ------------------------------------------------------------------------ state dicts
def _states():
    lora, ravan, head = _lora(), _ravan(), SlottedLinear(nn.Linear(D_IN, D_OUT))
    return [
        (lora, lora.adapter_state()),
        (ravan, ravan.adapter_state()),
        (head, head.adapter_state()),
    ]


@pytest.mark.parametrize("layer_idx", [0, 1, 2], ids=["lora", "ravan", "head"])
@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape", "not_tensor"])
def test_adapter_state_that_does_not_fit_is_a_named_value_error(layer_idx, fault):
    layer, state = _states()[layer_idx]
    state = {k: v.clone() for k, v in state.items()}
    first = sorted(state)[0]
    if fault == "missing":
        del state[first]
        exc, match = ValueError, rf"missing key\(s\) \['{first}'\]"
    elif fault == "unexpected":
        state["lora_Z"] = torch.zeros(1)
        exc, match = ValueError, r"unexpected key\(s\) \['lora_Z'\]"
    elif fault == "shape":
        state[first] = torch.zeros(7, 7, 7)
        exc, match = ValueError, f"{first}.*shape"
    else:
        state[first] = state[first].tolist()
        exc, match = TypeError, f"{first}.*torch.Tensor"
    with pytest.raises(exc, match=match) as info:
        layer.load_adapter_state(state)
    if fault in ("missing", "unexpected"):
        assert isinstance(info.value, KeyError)  # still caught by ``except KeyError``


def test_set_adapter_state_dict_names_missing_and_unused_keys():
    model = nn.Sequential(nn.Linear(D_IN, D_OUT))
    fedlora.inject(model, "fedit", target_modules=["0"], rank=2)
    state = fedlora.get_adapter_state_dict(model)
    with pytest.raises(ValueError, match=r"no entries for adapter layer '0'.*0\.lora_A\.weight"):
        fedlora.set_adapter_state_dict(model, {})
    with pytest.raises(ValueError, match=r"keys the model does not use: \['1\.lora_A\.weight'\]"):
        fedlora.set_adapter_state_dict(model, {**state, "1.lora_A.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="state must be a dict"):
        fedlora.set_adapter_state_dict(model, [state])


# ------------------------------------------------------------------------ meta tensors
def _meta(**tensors):
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


META_CASES = {
    "multihead_lora": lambda: fk.multihead_lora(
        **_meta(**mh_args(slots=2)),
        head_mask=torch.ones(2, H_, device="meta"),
        seg_offsets=torch.tensor([0, 2, 6], device="meta"),
        seg_adapter=torch.tensor([1, 0], device="meta"),
    ),
    "masked_lora": lambda: fk.masked_lora(
        *_meta(
            x=torch.randn(6, D_IN), A=torch.randn(2, 3, D_IN), B=torch.randn(2, D_OUT, 3)
        ).values(),
        rank_mask=torch.ones(2, 3, device="meta"),
        grad_mask=torch.ones(2, 3, device="meta"),
        seg_offsets=torch.tensor([0, 2, 6], device="meta"),
        seg_adapter=torch.tensor([1, 0], device="meta"),
    ),
    "masked_weighted_mean": lambda: fk.masked_weighted_mean(
        [torch.randn(3, D_IN, device="meta"), torch.randn(2, D_IN, device="meta")],
        torch.ones(2, device="meta"),
        torch.ones(2, 3, device="meta"),
    ),
    "masked_adamw_": lambda: fk.masked_adamw_(
        *_meta(**{k: v for k, v in adamw_args().items() if isinstance(v, torch.Tensor)}).values(),
        torch.ones(R_, device="meta"),
        lr=1e-3,
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=0.0,
        step=torch.ones((), device="meta"),
    ),
    "LoRALinear": lambda: _meta_layer(fedlora.LoRALinear, rank=3),
    "RavanLinear": lambda: _meta_layer(fedlora.RavanLinear, heads=2, rank=2),
}
META_SHAPES = {
    "multihead_lora": (6, D_OUT),
    "masked_lora": (6, D_OUT),
    "masked_weighted_mean": (3, D_IN),
    "masked_adamw_": None,
    "LoRALinear": (2, 3, D_OUT),
    "RavanLinear": (2, 3, D_OUT),
}


def _meta_layer(cls, **options):
    with torch.device("meta"):
        layer = cls(nn.Linear(D_IN, D_OUT), num_clients=2, **options)
        layer.set_segments(torch.tensor([0, 1, 2]), torch.tensor([1, 0]))
        return layer(torch.randn(2, 3, D_IN))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(META_CASES))
def test_meta_tensors_propagate_shapes(op, backend, monkeypatch):
    """Meta tensors (torch.compile's fake tensors, deferred init) give output shapes; no value is
    read (that raises on meta), and forcing Triton still takes the pure-torch path on meta."""
    monkeypatch.setenv("FEDLORA_BACKEND", backend)
    out = META_CASES[op]()
    if META_SHAPES[op] is None:
        assert out is None
    else:
        assert out.device.type == "meta" and tuple(out.shape) == META_SHAPES[op]


# ------------------------------------------------------------------------ scalars and sizes
def _adamw_with(**change):
    a = {**adamw_args(), **change}
    return fk.masked_adamw_(
        a.pop("param"), a.pop("grad"), a.pop("exp_avg"), a.pop("exp_avg_sq"), torch.ones(R_), **a
    )


def _aliased():
    p = torch.randn(R_, D_IN)
    return _adamw_with(param=p, exp_avg=p)


def _segments_empty():
    _lora().set_segments(torch.tensor([], dtype=torch.int64))


def _base_out_list():
    return fk.multihead_lora(**mh_args(), base_out=[[0.0] * D_OUT] * 6)


HOSTILE = [
    (lambda: fedlora.LoRALinear(nn.Linear(D_IN, D_OUT), alpha=float("nan")), ValueError, "alpha"),
    (lambda: fedlora.LoRALinear(nn.Linear(D_IN, D_OUT), alpha="16"), TypeError, "alpha"),
    (lambda: fedlora.LoRALinear(nn.Linear(D_IN, D_OUT), seed=1.5), TypeError, "seed"),
    (lambda: fedlora.LoRALinear(nn.Linear(D_IN, D_OUT), rank=True), ValueError, "rank"),
    (lambda: fedlora.LoRALinear(nn.Linear(0, D_OUT)), ValueError, "in_features"),
    (
        lambda: fedlora.RavanLinear(nn.Linear(D_IN, D_OUT), rank=2, scale=float("inf")),
        ValueError,
        "scale",
    ),
    (lambda: fedlora.RavanLinear(nn.Linear(D_IN, D_OUT), rank=2, seed="0"), TypeError, "seed"),
    (lambda: ravan_bases(D_IN, 0, 2, 2), ValueError, "d_out"),
    (_segments_empty, ValueError, "seg_offsets"),
    (_base_out_list, TypeError, "base_out"),
    (lambda: _adamw_with(step=torch.tensor(float("nan"))), ValueError, "step"),
    (lambda: _adamw_with(step=torch.tensor(1.5)), ValueError, "step"),
    (_aliased, ValueError, "param and exp_avg share memory"),
    (lambda: fk.masked_weighted_mean([torch.ones(2)] * 2, [True, 1.0]), TypeError, r"weights\[0\]"),
]


@pytest.mark.parametrize("call,exc,match", HOSTILE, ids=[f"arg{i}" for i in range(len(HOSTILE))])
def test_bad_scalars_and_sizes_are_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------ overflow
def exact_mean(tensors, weights):
    """Exact rational Σ w_k X_k / Σ w_k per element (no rounding, no overflow), as float64."""
    ws = [Fraction(float(w)) for w in weights]
    flat = [t.double().flatten().tolist() for t in tensors]
    total = sum(ws)
    out = [
        float(sum(w * Fraction(v[i]) for w, v in zip(ws, flat, strict=True)) / total)
        for i in range(len(flat[0]))
    ]
    return torch.tensor(out, dtype=torch.float64).view(tensors[0].shape)


OVERFLOW_CASES = {
    "near_fp32_max": (3e38, [1.0, 2.0, 0.5, 3.0], torch.float32),
    "near_fp32_max_negative": (-3.3e38, [1.0, 1.0, 1.0], torch.float32),
    "huge_weights": (1.0, [1e308, 5e307, 1e308], torch.float64),
    "tiny_weights": (1.0, [1e-300, 3e-300], torch.float64),
    "huge_values_huge_weights": (3e38, [1e308, 1e308], torch.float64),
    "mixed_scale_weights": (2.0, [1e300, 1e-300, 1.0], torch.float64),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OVERFLOW_CASES))
def test_weighted_mean_of_finite_values_is_finite_and_exact(case, backend):
    level, weights, wdtype = OVERFLOW_CASES[case]
    C = len(weights)
    xs = [(level * (1 - 0.1 * torch.rand(4, 9))).float() for _ in range(C)]
    w = torch.tensor(weights, dtype=wdtype)
    got = fk.masked_weighted_mean(xs, w, backend=backend)
    exp = exact_mean(xs, weights)
    assert torch.isfinite(got).all()
    # a convex combination of C float32 values: C roundings of the products and C of the sums,
    # each at most eps/2 of max|x| (plus the coefficients' own rounding)
    bound = 4 * EPS32 * C * max(float(x.abs().max()) for x in xs)
    torch.testing.assert_close(got.double(), exp, atol=bound, rtol=0)


def test_list_weights_keep_float64_range():
    xs = [torch.full((3,), 2.0), torch.full((3,), 4.0)]
    got = fk.masked_weighted_mean(xs, [1e-300, 3e-300])
    torch.testing.assert_close(got, torch.full((3,), 3.5))
