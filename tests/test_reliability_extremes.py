"""Extreme but finite input, malformed global states and tensors without values (issue 20).

- Ravan's server rule is overflow-safe like the others: uploads with ``s`` and ``H`` of 1e20 to
  3e38 (``s·H`` up to 9e76, past float32) give a finite global whose effective cores ``s·H``
  equal the float64 weighted mean;
- a malformed global state (a 1-D ``lora_A``, a non-square ``lora_H``, a ``lora_s`` of the wrong
  length) is a ``ValueError`` naming ``global_state``, not every client rejected;
- tensors on the ``meta`` device (no values) are refused with a clear error where values are
  read: ``aggregate``, ``Aggregator``, ``set_adapter_state_dict``, a layer given an input on
  another device than its adapter (a meta layer on meta input still propagates shapes, as the
  ops do).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedlora
from fedlora.aggregation import Aggregator, aggregate
from fedlora.state_dict import get_adapter_state_dict, set_adapter_state_dict

PATHS = ("enc.0.q", "enc.1.v")
HEADS, r = 3, 2


def ravan_state(seed: int, h_value: float | None = None, s_value: float | None = None):
    """A Ravan state; ``h_value``/``s_value`` set the first layer's ``H``/``s`` magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, p in enumerate(PATHS):
        H = torch.randn(HEADS, r, r, generator=gen)
        s = torch.rand(HEADS, generator=gen) + 0.5
        if h_value is not None and i == 0:
            H = H.sign() * h_value
        if s_value is not None and i == 0:
            s = torch.full((HEADS,), s_value)
        out[f"{p}.lora_H"], out[f"{p}.lora_s"] = H, s
    return out


def effective(state, path):
    return state[f"{path}.lora_H"].double() * state[f"{path}.lora_s"].double()[:, None, None]


@pytest.mark.parametrize("value", [1e20, 1e30, 3e38])
def test_ravan_huge_factors_give_a_finite_global(value):
    g = ravan_state(0)
    clients = [ravan_state(1, value, value), ravan_state(2, value, -value / 3), ravan_state(3)]
    weights = [1.0, 2.0, 5.0]
    new, m = aggregate("ravan", g, clients, weights)
    assert m["rejected"] == []
    for key, t in new.items():
        assert bool(torch.isfinite(t).all()), key
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    for p in PATHS:
        want = sum(wk * effective(c, p) for wk, c in zip(w, clients, strict=True))
        torch.testing.assert_close(effective(new, p), want, rtol=2e-6, atol=0)
    assert torch.equal(new[f"{PATHS[0]}.lora_s"] > 1, torch.ones(HEADS, dtype=torch.bool))
    assert torch.equal(new[f"{PATHS[1]}.lora_s"], torch.ones(HEADS))  # a moderate layer


def test_ravan_huge_compact_upload_of_some_heads():
    """A client uploading only head 1 (compact ``[1, r, r]``) at 3e38 · 3e38: head 1's core is
    the weighted mean of the trained uploads, the others keep the global's (Ravan's rule), and
    everything is finite."""
    g = ravan_state(0)
    big = {}
    for p in PATHS:
        big[f"{p}.lora_H"] = torch.full((1, r, r), 3e38)
        big[f"{p}.lora_s"] = torch.full((1,), 3e38)
    other = ravan_state(5)
    new, m = aggregate("ravan", g, [big, other], [1.0, 1.0],
                       [{"heads": {p: [1] for p in PATHS}}, {}])  # fmt: skip
    assert m["rejected"] == []
    for key, t in new.items():
        assert bool(torch.isfinite(t).all()), key
    for p in PATHS:
        eff = effective(new, p)
        want1 = 0.5 * 9e76 + 0.5 * effective(other, p)[1]
        torch.testing.assert_close(eff[1], want1.to(torch.float64), rtol=2e-6, atol=0)
        for i in (0, 2):  # only `other` trained them
            torch.testing.assert_close(eff[i], effective(other, p)[i], rtol=2e-6, atol=1e-6)


def test_ravan_moderate_factors_keep_unit_scales():
    g, clients = ravan_state(0), [ravan_state(1), ravan_state(2)]
    new, _ = aggregate("ravan", g, clients, [1.0, 1.0])
    for p in PATHS:
        assert torch.equal(new[f"{p}.lora_s"], torch.ones(HEADS))


# ----------------------------------------------------------------------- malformed global
def lora_state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A.weight": torch.randn(2, 5, generator=gen),
        "m.lora_B.weight": torch.randn(4, 2, generator=gen),
    }


@pytest.mark.parametrize(
    "method,edit,words",
    [
        ("fedit", lambda g: g.update({"m.lora_A.weight": torch.randn(10)}),
         "global_state['m.lora_A.weight'] must be 2-D [R, d_in]"),
        ("fedit", lambda g: g.update({"m.lora_B.weight": torch.randn(2, 4, 2)}),
         "global_state['m.lora_B.weight'] must be 2-D [d_out, R]"),
        ("ravan", lambda g: g.update({f"{PATHS[0]}.lora_H": torch.randn(HEADS, 4)}),
         f"global_state['{PATHS[0]}.lora_H'] must be [heads, r, r]"),
        ("ravan", lambda g: g.update({f"{PATHS[0]}.lora_H": torch.randn(HEADS, 2, 3)}),
         "square cores"),
        ("ravan", lambda g: g.update({f"{PATHS[0]}.lora_s": torch.ones(HEADS + 1)}),
         f"global_state['{PATHS[0]}.lora_s'] must be [{HEADS}]"),
    ],
)  # fmt: skip
def test_malformed_global_state_is_a_value_error(method, edit, words):
    g = lora_state() if method == "fedit" else ravan_state(0)
    clients = [{k: v.clone() for k, v in g.items()} for _ in range(2)]
    edit(g)
    with pytest.raises(ValueError) as err:
        aggregate(method, g, clients, [1.0, 1.0])
    assert words in str(err.value)
    if method == "fedit":  # (Ravan does not stream)
        with pytest.raises(ValueError) as err:
            Aggregator(method, g)
        assert words in str(err.value)


# ----------------------------------------------------------------------- meta tensors
def test_meta_global_state_is_refused_by_name():
    g = lora_state()
    meta = {k: v.to("meta") for k, v in g.items()}
    for call in (lambda: aggregate("fedit", meta, [g], [1.0]), lambda: Aggregator("fedit", meta)):
        with pytest.raises(TypeError, match=r"global_state\['m.lora_A.weight'\] is on the 'meta'"):
            call()


def test_meta_client_is_rejected_and_named():
    g = lora_state()
    good = lora_state(1)
    meta = {k: v.to("meta") for k, v in lora_state(2).items()}
    new, m = aggregate("fedit", g, [good, meta], [1.0, 1.0])
    assert m["used"] == [0]
    ((rej,),) = [m["rejected"]]
    assert rej["client"] == 1 and "meta" in rej["reason"]
    agg = Aggregator("fedit", g)
    assert agg.add(good, 1.0) and not agg.add(meta, 1.0)
    streamed, _ = agg.result()
    for k in new:
        torch.testing.assert_close(streamed[k], new[k])


def test_set_adapter_state_dict_refuses_meta_tensors():
    model = nn.Sequential(fedlora.LoRALinear(nn.Linear(5, 4), rank=2))
    state = get_adapter_state_dict(model)
    key = sorted(state)[0]
    bad = dict(state, **{key: state[key].to("meta")})
    with pytest.raises(TypeError, match=rf"state\['{key}'\] is on the 'meta' device"):
        set_adapter_state_dict(model, bad)


@pytest.mark.parametrize("cls,options", [(fedlora.LoRALinear, {"rank": 2}),
                                         (fedlora.RavanLinear, {"heads": 2, "rank": 2})])  # fmt: skip
def test_layers_refuse_an_input_on_another_device(cls, options):
    layer = cls(nn.Linear(5, 4), **options)
    with pytest.raises(ValueError, match="input x is on meta but the adapter's weights are on cpu"):
        layer(torch.randn(3, 5, device="meta"))
    with torch.device("meta"):  # a meta layer is for shape propagation only
        meta_layer = cls(nn.Linear(5, 4), **options)
    with pytest.raises(ValueError, match="adapter's weights are on meta"):
        meta_layer(torch.randn(3, 5))
    assert meta_layer(torch.randn(3, 5, device="meta")).shape == (3, 4)
