"""fedlora.flower.secagg: the fixed per-round layout for SecAgg+ (pack / sum / unpack).

The reference is the method's own plain rule (:func:`fedlora.aggregate`) on the same uploads.
The exact sum reproduces it up to float64 rounding (1e-9 relative); through Flower's own
quantisation arithmetic (``flwr.common.secure_aggregation.quantization``, exactly as
``secaggplus_mod`` and ``SecAggPlusWorkflow`` apply it) each entry of the sum is off by less
than ``n·Δ`` (:func:`fedlora.flower.secagg.tolerance`), which bounds the error of each mean.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedlora
from fedlora.methods import prefix as prefix_mod

secagg = pytest.importorskip("fedlora.flower.secagg")

LORA = {"l0": (5, 7), "l1": (3, 4)}
R = 6
RAVAN = {"r0": (4, 3), "r1": (4, 2)}  # heads, r
RANKS = [2, 6, 4, 1]
HEADS = [1, 4, 2, 3]
NUM = [30.0, 10.0, 25.0, 5.0]


def global_state(method, gen):
    g = {"head.weight": torch.randn(2, 3, generator=gen)}
    if method == "ravan":
        for p, (h, r) in RAVAN.items():
            g[f"{p}.lora_H"] = torch.randn(h, r, r, generator=gen)
            g[f"{p}.lora_s"] = torch.ones(h)
        return g
    for p, (o, i) in LORA.items():
        g[f"{p}.lora_A.weight"] = torch.randn(R, i, generator=gen)
        g[f"{p}.lora_B.weight"] = torch.randn(o, R, generator=gen)
    return g


def clients(method, g, gen, scale=0.5):
    """Per client ``(download, upload, meta)`` with heterogeneous ranks / heads."""
    out = []
    for k in range(len(NUM)):
        r = RANKS[k] if method in ("prelort", "hetlora") else R
        down = prefix_mod.truncate(dict(g), r) if r < R else {k2: v.clone() for k2, v in g.items()}
        meta = {}
        if method == "ravan":
            up = {"head.weight": down["head.weight"] + scale * torch.randn(2, 3, generator=gen)}
            meta["heads"] = {}
            for p, (h, rr) in RAVAN.items():
                heads = sorted(torch.randperm(h, generator=gen)[: HEADS[k]].tolist())
                up[f"{p}.lora_H"] = down[f"{p}.lora_H"][heads] + scale * torch.randn(
                    len(heads), rr, rr, generator=gen
                )
                meta["heads"][p] = heads
        else:
            up = {k2: v + scale * torch.randn(v.shape, generator=gen) for k2, v in down.items()}
            if method == "ffa":
                up = {k2: v for k2, v in up.items() if not k2.endswith(".lora_A.weight")}
                for p in LORA:  # FFA-LoRA's plain rule reads the frozen A from each upload
                    up[f"{p}.lora_A.weight"] = down[f"{p}.lora_A.weight"]
        if method in ("prelort", "hetlora"):
            meta["rank"] = r
        out.append((down, up, meta))
    return out


def plain(method, g, cl):
    opts = {"weighting": "data"} if method == "hetlora" else {}
    new, _ = fedlora.aggregate(method, g, [u for _, u, _ in cl], NUM, [m for *_, m in cl], **opts)
    return new


def weights():
    return [n / max(NUM) for n in NUM]


@pytest.mark.parametrize("method", secagg.SECAGG_METHODS)
def test_unpacked_sum_is_the_plain_aggregation(method):
    gen = torch.Generator().manual_seed(1)
    g = global_state(method, gen)
    cl = clients(method, g, gen)
    layout = secagg.Layout(method, g, {"weighting": "data"})
    vecs = [layout.pack(d, u, m, weight=w) for (d, u, m), w in zip(cl, weights(), strict=True)]
    assert len({v.size for v in vecs}) == 1  # one length for every rank / head choice
    new, metrics = layout.unpack(np.sum(vecs, axis=0))
    want = plain(method, g, cl)
    assert metrics["secagg_rejected"] == 0
    for k, v in want.items():
        if method == "ravan" and k.endswith(".lora_H"):  # compare s·H (Ravan folds s)
            s = want.get(k[: -len("H")] + "s")
            v = v * s[:, None, None] if s is not None else v
        torch.testing.assert_close(new[k].double(), v.double(), rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", ["prelort", "ravan"])
def test_the_sum_through_flowers_quantisation_is_within_the_derived_bound(method):
    """Flower's arithmetic: every client's vector (num_examples = max_weight: ratio 1)
    quantised stochastically, the integer sum modulo 2^32, dequantised with the workflow's
    offset ``-(n-1)·c`` and divided by n; times n gives the sum, off by < n·Δ per entry."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    c, T, mod = 8.0, 2**22, 2**32
    gen = torch.Generator().manual_seed(2)
    g = global_state(method, gen)
    cl = clients(method, g, gen)
    layout = secagg.Layout(method, g)
    vecs = [layout.pack(d, u, m, weight=w) for (d, u, m), w in zip(cl, weights(), strict=True)]
    n = len(vecs)
    assert max(float(np.abs(v).max()) for v in vecs) < c  # nothing is clipped by the workflow
    q = sum(quantize([v], c, T)[0].astype(np.int64) for v in vecs) % mod
    mean = dequantize([q], c, T)[0] - (n - 1) * c
    mean = mean / n  # the workflow's inv_dq_total_ratio with n ratios of 1
    summed = secagg.sum_from_workflow_mean([mean], n)
    exact = np.sum(vecs, axis=0)
    tol = secagg.tolerance(n, c, T)
    assert np.abs(summed - exact).max() < tol
    assert np.abs(summed - exact).max() > 0  # the quantisation did act
    new, _ = layout.unpack(summed)
    ref, _ = layout.unpack(exact)
    # each mean is ref + S/D with |ΔS|, |ΔD| < tol: |Δ(S/D)| ≤ tol·(1 + |S/D|) / (D − tol)
    for s in layout.slots:
        counts = exact[s.count_offset : s.count_offset + s.counts]
        d_min = float(counts[counts > 0].min())
        ratio = float((ref[s.key].double() - layout.reference[s.key]).abs().max())
        bound = tol * (1 + ratio) / (d_min - tol) + 1e-6  # + float32 storage of the state
        got = ref[s.key].double() - new[s.key].double()
        if method == "ravan" and s.key.endswith(".lora_H"):
            got = got.reshape(-1)
        assert float(got.abs().max()) <= bound, s.key


def test_dp_and_secagg_together_clip_on_the_client_and_noise_the_sum():
    """Under DP the client clips jointly to C before packing; the server adds N(0, (z·C)²) to
    the sum and divides by the public counts: the same as fedlora.privacy.private_aggregate
    with 'sampled' denominators and the same noise draw."""
    from fedlora import privacy

    gen = torch.Generator().manual_seed(3)
    g = global_state("prelort", gen)
    cl = clients("prelort", g, gen, scale=2.0)
    layout = secagg.Layout("prelort", g)
    C, z = 0.7, 1.3
    vecs = [layout.pack(d, u, m, clip=C) for d, u, m in cl]
    for v in vecs:  # the packed delta has joint norm ≤ C
        assert np.linalg.norm(v[: layout.values_size]) <= C * (1 + 1e-12)
    new, _ = layout.unpack(
        np.sum(vecs, axis=0), noise_std=z * C, generator=torch.Generator().manual_seed(9)
    )
    dp = privacy.DPConfig(clip=C, noise_multiplier=z, denominator="sampled")
    budgets = [fedlora.methods.Budget(rank=r, heads=1, components=r, steps=1) for r in RANKS]
    want, _ = privacy.private_aggregate(
        "prelort", g, [d for d, _, _ in cl], [u for _, u, _ in cl], [m for *_, m in cl], budgets,
        dp, torch.Generator().manual_seed(9),
    )  # fmt: skip
    for k in want:
        torch.testing.assert_close(new[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


def test_a_non_finite_client_packs_zeros_and_is_counted():
    gen = torch.Generator().manual_seed(4)
    g = global_state("fedit", gen)
    cl = clients("fedit", g, gen)
    layout = secagg.Layout("fedit", g)
    d, u, m = cl[0]
    bad = {k: v.clone() for k, v in u.items()}
    bad["l0.lora_B.weight"][0, 0] = float("inf")
    v_bad = layout.pack(d, bad, m)
    assert v_bad[layout.rejected_index] == 1 and not v_bad[: layout.rejected_index].any()
    vecs = [v_bad] + [layout.pack(dd, uu, mm) for dd, uu, mm in cl[1:]]
    new, metrics = layout.unpack(np.sum(vecs, axis=0))
    assert metrics["secagg_rejected"] == 1 and metrics["secagg_weight"] == 3
    want, _ = fedlora.aggregate("fedit", g, [uu for _, uu, _ in cl[1:]], [1.0] * 3)
    for k in want:
        torch.testing.assert_close(new[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", sorted(secagg.SECAGG_REFUSED))
def test_methods_needing_per_client_factors_are_refused_in_one_line(method):
    with pytest.raises(ValueError, match="refused") as err:
        secagg.check_secagg(method)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="weighting='data'"):
        secagg.check_secagg("hetlora", {"weighting": "sparsity"})


def test_bad_input_names_the_argument():
    gen = torch.Generator().manual_seed(5)
    g = global_state("fedit", gen)
    layout = secagg.Layout("fedit", g)
    d, u, m = clients("fedit", g, gen)[0]
    with pytest.raises(ValueError, match="weight"):
        layout.pack(d, u, m, weight=0)
    with pytest.raises(ValueError, match="length"):
        layout.unpack(np.zeros(layout.size + 1))
    with pytest.raises(ValueError, match="num_results"):
        secagg.sum_from_workflow_mean([np.zeros(3)], 0)
