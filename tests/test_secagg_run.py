"""Simulated SecAgg+ (``fedlora simulate --secagg``, :class:`fedlora.flower.secagg.SecAggAggregator`).

The aggregator runs Flower's own client-side quantisation (``flwr``'s ``quantize``) and the
workflow's dequantisation of the modular sum; the masks cancel exactly, so they are left out.
A round must equal the method's plain rule (:func:`fedlora.aggregate`) on the same uploads up
to the quantisation: each entry of the sum is off by less than ``tol = n·Δ``
(:func:`fedlora.flower.secagg.tolerance`), so a mean ``(S + D·ref)/D`` by at most
``tol·(1 + |ref| + |mean|) / (D − tol)``; every index below is covered by a client of weight 1,
so ``D ≥ 1``.
"""

from __future__ import annotations

import math

import pytest
import torch

import fedlora
from fedlora.methods import ClientOptions
from fedlora.rounds import Reply, Server

pytest.importorskip("flwr")
secagg = pytest.importorskip("fedlora.flower.secagg")
from fedlora.cli import main  # noqa: E402

R, NODES = 4, 4
LORA = {"l0": (5, 7), "l1": (3, 4)}
RAVAN = {"r0": (4, 3)}  # (heads, rank per head)
BUDGETS = {  # the last client covers every index (rank R / every head) with weight 1
    "prelort": [{"rank": 1}, {"rank": 2}, {"rank": 3}, {"rank": R}],
    "hetlora": [{"rank": 1}, {"rank": 2}, {"rank": 3}, {"rank": R}],
    "ravan": [{"heads": 1}, {"heads": 2}, {"heads": 3}, {"heads": 4}],
}
EXAMPLES = [3.0, 7.0, 5.0, 10.0]
OPTIONS = {"hetlora": {"weighting": "data"}}


def initial(method: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    g = {"head.weight": torch.randn(2, 3, generator=gen)}
    if method == "ravan":
        for p, (h, r) in RAVAN.items():
            g[f"{p}.lora_H"] = torch.randn(h, r, r, generator=gen)
            g[f"{p}.lora_s"] = torch.rand(h, generator=gen) + 0.5
    else:
        for p, (o, i) in LORA.items():
            g[f"{p}.lora_A.weight"] = torch.randn(R, i, generator=gen)
            g[f"{p}.lora_B.weight"] = torch.randn(o, R, generator=gen)
    return g


def local_update(method: str, down: dict, budget: dict, seed: int) -> tuple[dict, dict]:
    """A seeded 'local training' step of size ~0.3 in the method's upload format."""
    gen = torch.Generator().manual_seed(seed)
    up = {"head.weight": down["head.weight"] + 0.3 * torch.randn(2, 3, generator=gen)}
    meta: dict = {}
    if method == "ravan":
        meta["heads"] = {}
        for p, (h, r) in RAVAN.items():
            heads = sorted(torch.randperm(h, generator=gen)[: budget["heads"]].tolist())
            folded = down[f"{p}.lora_H"] * down[f"{p}.lora_s"][:, None, None]
            noise = 0.3 * torch.randn(len(heads), r, r, generator=gen)
            up[f"{p}.lora_H"] = folded[heads] + noise
            meta["heads"][p] = heads
        return up, meta
    for k, v in down.items():
        if k != "head.weight":
            up[k] = v + 0.3 * torch.randn(v.shape, generator=gen)
    if method == "ffa":
        for p in LORA:
            up[f"{p}.lora_A.weight"] = down[f"{p}.lora_A.weight"]
    if method in BUDGETS:
        meta["rank"] = budget["rank"]
    return up, meta


def one_round(method: str, aggregator, *, poison: int | None = None):
    """A Server round with ``aggregator`` as its server step; the replies and downloads."""
    g0 = initial(method)
    budgets = dict(enumerate(BUDGETS.get(method, [{}] * NODES)))
    options = ClientOptions(rank=R, heads=4, head_score="random")
    server = Server(method, g0, options=options, budgets=budgets, dp=aggregator)
    downloads = server.configure(0, list(range(NODES)))
    replies = []
    for c in range(NODES):
        up, meta = local_update(method, dict(downloads[c].state), budgets[c], 100 + c)
        if c == poison:
            up = {k: torch.full_like(v, float("nan")) for k, v in up.items()}
        replies.append(Reply(c, up, EXAMPLES[c], meta))
    return g0, server.aggregate(0, replies), replies


def _check_close(method, g0, got, want, n):
    tol = secagg.tolerance(n)
    for k, w in want.items():
        ref, w = g0[k].double(), w.double()
        if method == "ravan" and k.endswith(".lora_H"):  # compare the folded s·H
            ref = ref * g0[k[: -len("H")] + "s"].double()[:, None, None]
            w = w * want[k[: -len("H")] + "s"].double()[:, None, None]
            g = got[k].double() * got[k[: -len("H")] + "s"].double()[:, None, None]
        else:
            g = got[k].double()
        big = float(ref.abs().max()) + float(w.abs().max())
        bound = tol * (1 + big) / (1 - tol) + 2**-23 * float(w.abs().max())
        err = float((g - w).abs().max())
        assert err <= bound, (k, err, bound)


@pytest.mark.parametrize("method", secagg.SECAGG_METHODS)
def test_a_secagg_round_equals_the_plain_rule_within_the_quantisation_bound(method):
    agg = secagg.SecAggAggregator(method, options=OPTIONS.get(method), max_examples=10.0, seed=3)
    g0, out, replies = one_round(method, agg)
    assert out.error is None and out.used == list(range(NODES))
    assert out.metrics["secagg_rejected"] == 0 and out.metrics["secagg_clipped_entries"] == 0
    assert out.metrics["secagg_weight"] == pytest.approx(sum(EXAMPLES) / 10.0, abs=1e-5)
    want, _ = fedlora.aggregate(
        method, g0, [r.state for r in replies], EXAMPLES, [r.meta for r in replies],
        **OPTIONS.get(method, {}),
    )  # fmt: skip
    _check_close(method, g0, out.state, want, NODES)
    # the quantisation really ran: the result is not bit-equal to the exact rule
    assert any(not torch.equal(out.state[k], want[k]) for k in want)


def test_a_non_finite_client_is_counted_and_the_others_aggregate():
    method = "prelort"
    agg = secagg.SecAggAggregator(method, max_examples=10.0, seed=3)
    g0, out, replies = one_round(method, agg, poison=1)
    assert out.metrics["secagg_rejected"] == 1 and out.used == [0, 2, 3]
    assert [c for c, _ in out.rejected] == [1] and "non-finite" in out.rejected[0][1]
    keep = [0, 2, 3]
    want, _ = fedlora.aggregate(
        method, g0, [replies[i].state for i in keep], [EXAMPLES[i] for i in keep],
        [replies[i].meta for i in keep],
    )  # fmt: skip
    _check_close(method, g0, out.state, want, NODES)


@pytest.mark.parametrize("method", ["prelort", "ravan", "fedit"])
def test_secagg_with_dp_equals_private_aggregate_within_the_quantisation_bound(method):
    """With DP (sampled denominators) the unmasked sum gets the same seeded noise as
    :func:`fedlora.privacy.private_aggregate`, and the accountant counts the round."""
    from fedlora import privacy
    from fedlora.seeding import key

    dp = privacy.DPConfig(clip=0.5, noise_multiplier=0.7, denominator="sampled")
    opts = {"head_score": "random"}
    agg = secagg.SecAggAggregator(method, options=opts, dp=dp, sample_rate=0.5, seed=5)
    g0, out, replies = one_round(method, agg)
    server = Server(
        method, g0, options=ClientOptions(rank=R, heads=4, head_score="random"),
        budgets=dict(enumerate(BUDGETS.get(method, [{}] * NODES))),
    )  # fmt: skip
    downloads = server.configure(0, list(range(NODES)))
    gen = torch.Generator().manual_seed(key(5, 0, privacy.NOISE_TAG))
    budgets = [server.budget(c) for c in range(NODES)]
    want, _ = privacy.private_aggregate(
        method, g0, [downloads[c].state for c in range(NODES)], [r.state for r in replies],
        [r.meta for r in replies], budgets, dp, gen, options=opts,
    )  # fmt: skip
    _check_close(method, g0, out.state, want, NODES)
    assert out.metrics["epsilon"] == pytest.approx(privacy.epsilon(1, 0.5, 0.7, dp.delta))


def test_the_aggregator_checks_its_arguments():
    with pytest.raises(ValueError, match="refused"):
        secagg.SecAggAggregator("flexlora")
    with pytest.raises(ValueError, match="weighting='data'"):
        secagg.SecAggAggregator("hetlora")  # the method's default weighting is sparsity
    with pytest.raises(ValueError, match="clipping_range"):
        secagg.SecAggAggregator("fedit", clipping_range=0.0)
    with pytest.raises(ValueError, match="modulus_range"):
        secagg.SecAggAggregator("fedit", quantization_range=2**32)
    from fedlora import privacy

    dp = privacy.DPConfig(clip=9.0, noise_multiplier=1.0, denominator="sampled")
    with pytest.raises(ValueError, match="exceeds clipping_range"):
        secagg.SecAggAggregator("fedit", dp=dp)
    agg = secagg.SecAggAggregator("fedit")
    with pytest.raises(ValueError, match="overflow"):
        agg.quantized_sum([torch.zeros(3).numpy()] * 1024, 0)


def _argv(tiny_bert_dir, out, *extra):
    return ["simulate", "--model", tiny_bert_dir, "--out", str(out), "--clients", "3",
            "--rounds", "1", "--local-steps", "1", "--batch-size", "4", "--max-length", "16",
            "--max-test", "8", "--rank", "2", "--target-modules", "query", "--no-progress",
            *extra]  # fmt: skip


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--method", "flexlora"], "refused: FlexLoRA's SVD"),
        (["--method", "florana"], "refused"),
        (["--method", "hafl"], "refused: HAFL"),
        (["--method", "hetlora"], "--hetlora-weighting data"),
        (["--method", "fedit", "--secagg-clipping-range", "-1"], "--secagg-clipping-range"),
        (["--method", "fedit", "--secagg-quantization-range", str(2**31 - 1)], "overflow"),
        (["--method", "fedit", "--secagg-quantization-range", str(2**31)], "[2, 2**31)"),
        (["--method", "fedit", "--dp-clip", "9", "--dp-noise", "1"], "exceeds"),
        (["--method", "prelort", "--prelort-aggregation", "zeropad"], "aggregation='segment'"),
        (
            ["--method", "hetlora", "--hetlora-weighting", "data", "--hetlora-prune"],
            "refuses hetlora_prune",
        ),
    ],
)
def test_cli_refuses_in_one_line_with_exit_2(tiny_bert_dir, tmp_path, capsys, extra, says):
    assert main(_argv(tiny_bert_dir, tmp_path, "--secagg", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err
    assert not (tmp_path / "metrics.json").exists()  # nothing trained or written


def test_cli_secagg_ranges_need_secagg(tiny_bert_dir, tmp_path, capsys):
    assert main(_argv(tiny_bert_dir, tmp_path, "--secagg-clipping-range", "4")) == 2
    assert "needs --secagg" in capsys.readouterr().err


def test_a_client_off_its_public_budget_or_without_examples(tmp_path):
    """Under SecAgg+DP an upload whose rank is not its public budget's is rejected (as by
    ``private_aggregate``); a client of capped weight 0 contributes nothing and is not
    rejected."""
    from fedlora import privacy
    from fedlora.methods import Budget

    method = "prelort"
    g0 = initial(method)
    layout = secagg.Layout(method, g0)
    down = {k: v if k == "head.weight" else (v[:1] if k.endswith("A.weight") else v[:, :1])
            for k, v in g0.items()}  # fmt: skip
    up, meta = local_update(method, down, {"rank": 1}, 7)
    layout.pack(down, up, meta)  # a rank-1 upload of a rank-1 download fits the layout
    with pytest.raises(ValueError, match="budget"):  # but not a client whose budget is rank 3
        layout.pack(down, up, meta, budget=Budget(rank=3, heads=1, components=3, steps=1))
    budgets = dict(enumerate(BUDGETS[method]))
    capped = privacy.DPConfig(clip=0.5, noise_multiplier=0.7, denominator="sampled",
                              weights="capped", weight_cap=5.0)  # fmt: skip
    agg = secagg.SecAggAggregator(method, dp=capped, seed=5)
    server = Server(method, g0, options=ClientOptions(rank=R), budgets=budgets, dp=agg)
    downloads = server.configure(0, list(range(NODES)))
    replies = []
    for c in range(NODES):
        up, meta = local_update(method, dict(downloads[c].state), budgets[c], 100 + c)
        replies.append(Reply(c, up, 0.0 if c == 0 else EXAMPLES[c], meta))
    out = server.aggregate(0, replies)
    assert out.rejected == [] and out.metrics["clients_used"] == NODES


def test_cli_secagg_round_matches_the_plain_round(tiny_bert_dir, tmp_path):
    """One round of ``--secagg`` and one plain round from the same seed train the same uploads,
    so the new globals differ by the quantisation only."""
    import json

    from safetensors.torch import load_file

    common = ["--method", "prelort", "--budgets", "rank=1,2"]
    assert main(_argv(tiny_bert_dir, tmp_path / "s", *common, "--secagg")) == 0
    assert main(_argv(tiny_bert_dir, tmp_path / "p", *common)) == 0
    rows = json.loads((tmp_path / "s" / "metrics.json").read_text())["rounds"]
    assert rows[0]["secagg_rejected"] == 0 and rows[0]["secagg_clipped_entries"] == 0
    a = load_file(tmp_path / "s" / "checkpoint.safetensors")
    b = load_file(tmp_path / "p" / "checkpoint.safetensors")
    # weights n_k / max n: the smallest client's weight bounds D from below
    n = json.loads((tmp_path / "p" / "metrics.json").read_text())["data"]["clients"]
    d_min = min(n) / max(n)
    tol = secagg.tolerance(3)
    # the round's reference: the initial global of the same seeded set-up
    from fedlora import get_adapter_state_dict
    from fedlora.simulate import SimConfig, setup_run

    cfg = SimConfig(model=tiny_bert_dir, clients=3, rounds=1, local_steps=1, batch_size=4,
                    max_length=16, max_test=8, rank=2, target_modules=["query"],
                    method="prelort", budgets="rank=1,2")  # fmt: skip
    g0 = get_adapter_state_dict(setup_run(cfg, log=lambda s: None, num_slots=1).model, slot=0)
    diffs = []
    for k, v in b.items():
        if not v.dtype.is_floating_point or k not in a:
            continue
        ref = float(g0[k].double().abs().max()) if k in g0 else float(v.double().abs().max())
        big = 1 + ref + float(v.double().abs().max())
        bound = tol * big / (d_min - tol) + 2**-23 * float(v.abs().max())
        diffs.append(float((a[k].double() - v.double()).abs().max()))
        assert diffs[-1] <= bound, (k, diffs[-1], bound)
    assert max(diffs) > 0 and math.isfinite(max(diffs))
