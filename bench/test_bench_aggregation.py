"""CPU benchmark of the server side (pytest-benchmark): ours beside what FL code usually does.

    python -m pytest bench/test_bench_aggregation.py --benchmark-only -s

- ``fedit C=100 MiniLM``: 100 clients' adapters of all-MiniLM-L6-v2 size (6 layers × query, key,
  value, attention-output dense, 384×384, r = 16, plus an 8-class head). Rows: the per-key Python
  loop over state dicts the way OpenFedLLM-style code averages them
  (``sum(client[key] * n_k / n for client)`` per key); Flower's own aggregations, on the
  payloads they take: ``aggregate_arrayrecords`` (Message API, a list of ``RecordDict`` replies)
  and the legacy numpy ``aggregate`` (a list of ``(ndarrays, num_examples)``);
  ``fedlora.aggregate("fedit")`` with its default arguments, the same starting from the Flower
  replies (decoded with ``fedlora.flower.from_arrayrecord``, as ``FedLoRAStrategy`` does), with
  the aggregation error (``error=True``), and the streaming ``Aggregator``. Goals: the default
  call ≥ 5× faster than ``aggregate_arrayrecords`` and than the loop, same numbers to fp32
  rounding.
- GPU only (skipped elsewhere): ``masked_weighted_mean`` bandwidth at C = 100 clients of 8 M
  parameters against the device's copy bandwidth. Goal: ≥ 80 %.
- ``flexlora d=…``: 4 clients of rank 16 on one ``d×d`` layer, global rank 16. Rows: FlexLoRA
  as usually written (form ``ΔW = Σ p_k B_k A_k`` densely, full SVD, truncate) and ours (QR of
  the stacked factors, SVD of the small core). Goal: ≥ 10× at d = 4096.

The last test prints the speed-ups and stores them in its ``extra_info`` (so they land in
``--benchmark-json``). Every implementation's output is checked against the baseline first.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation import Aggregator, aggregate

MODULES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
)
CLIENTS = 100
MEDIANS: dict[str, float] = {}


def _record(benchmark, name: str) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        MEDIANS[name] = stats.stats.median


def minilm_state(gen: torch.Generator, rank: int = 16) -> dict[str, torch.Tensor]:
    state = {}
    for layer in range(6):
        for m in MODULES:
            p = f"bert.encoder.layer.{layer}.{m}"
            state[f"{p}.lora_A.weight"] = torch.randn(rank, 384, generator=gen) / 20
            state[f"{p}.lora_B.weight"] = torch.randn(384, rank, generator=gen) / 20
    state["classifier.weight"] = torch.randn(8, 384, generator=gen)
    state["classifier.bias"] = torch.randn(8, generator=gen)
    return state


@pytest.fixture(scope="module")
def fedit_round():
    gen = torch.Generator().manual_seed(0)
    g = minilm_state(gen)
    clients = [minilm_state(gen) for _ in range(CLIENTS)]
    n_examples = [float(50 + (37 * k) % 200) for k in range(CLIENTS)]
    return g, clients, n_examples


def naive_fedavg(g, clients, n_examples):
    """Per-key loop over state dicts, as OpenFedLLM-style servers write it."""
    total = sum(n_examples)
    out = {}
    for key in g:
        out[key] = sum([clients[k][key] * n_examples[k] / total for k in range(len(clients))])
    return out


def streaming(g, clients, n_examples):
    agg = Aggregator("fedit", g)
    for state, n in zip(clients, n_examples, strict=True):
        agg.add(state, n)
    return agg.result()[0]


def flower_payloads(g, clients, n_examples):
    """The replies Flower's aggregations take: Message-API ``RecordDict``s and legacy
    ``(ndarrays, num_examples)`` pairs (built once, outside the timed region)."""
    from flwr.app import MetricRecord, RecordDict

    from fedlora.flower import to_arrayrecord

    keys = list(g)
    records = [
        RecordDict(
            {
                "arrays": to_arrayrecord(c),
                "metrics": MetricRecord({"num-examples": int(n)}),
            }
        )
        for c, n in zip(clients, n_examples, strict=True)
    ]
    legacy = [
        ([c[k].numpy() for k in keys], int(n)) for c, n in zip(clients, n_examples, strict=True)
    ]
    return keys, records, legacy


def flower_arrayrecords(payload):
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    keys, records, _ = payload
    out = aggregate_arrayrecords(records, "num-examples")
    return {k: torch.from_numpy(out[k].numpy()) for k in keys}


def flower_legacy(payload):
    from flwr.server.strategy.aggregate import aggregate as legacy_aggregate

    keys, _, legacy = payload
    return {k: torch.from_numpy(v) for k, v in zip(keys, legacy_aggregate(legacy), strict=True)}


def fedlora_from_records(payload, g):
    """What ``FedLoRAStrategy.aggregate_train`` does with the replies: decode, aggregate."""
    from fedlora.flower import from_arrayrecord

    _, records, _ = payload
    states = [from_arrayrecord(r["arrays"]) for r in records]
    weights = [float(r["metrics"]["num-examples"]) for r in records]
    return aggregate("fedit", g, states, weights)[0]


FEDIT_IMPLS = {
    "naive per-key loop": lambda g, c, w, fl: naive_fedavg(g, c, w),
    "flower aggregate_arrayrecords": lambda g, c, w, fl: flower_arrayrecords(fl),
    "flower legacy aggregate": lambda g, c, w, fl: flower_legacy(fl),
    "fedlora": lambda g, c, w, fl: aggregate("fedit", g, c, w)[0],
    "fedlora from flower replies": lambda g, c, w, fl: fedlora_from_records(fl, g),
    "fedlora + error": lambda g, c, w, fl: aggregate("fedit", g, c, w, error=True)[0],
    "fedlora streaming": lambda g, c, w, fl: streaming(g, c, w),
}


@pytest.fixture(scope="module")
def flower_round(fedit_round):
    pytest.importorskip("flwr")
    return flower_payloads(*fedit_round)


@pytest.mark.parametrize("impl", list(FEDIT_IMPLS))
def test_fedit_100_clients(benchmark, fedit_round, impl, request):
    g, clients, n = fedit_round
    fl = request.getfixturevalue("flower_round") if "flower" in impl else None
    f = FEDIT_IMPLS[impl]
    expect = naive_fedavg(g, clients, n)
    got = f(g, clients, n, fl)
    for key in g:  # the same numbers, to float32 rounding of a 100-term weighted sum
        torch.testing.assert_close(got[key], expect[key], atol=1e-5, rtol=1e-5)
    benchmark.group = "fedit C=100 MiniLM"
    if impl == "fedlora + error":  # a tenth of a second per call: a few rounds are enough
        benchmark.pedantic(f, args=(g, clients, n, fl), rounds=5, iterations=1)
    else:
        benchmark(f, g, clients, n, fl)
    _record(benchmark, f"fedit/{impl}")


def flex_round(d: int, rank: int = 16, clients: int = 4):
    gen = torch.Generator().manual_seed(1)

    def state():
        return {
            "layer.lora_A.weight": torch.randn(rank, d, generator=gen) / d**0.5,
            "layer.lora_B.weight": torch.randn(d, rank, generator=gen) / rank**0.5,
        }

    return state(), [state() for _ in range(clients)], [float(k + 1) for k in range(clients)]


def dense_flexlora(g, clients, weights):
    """FlexLoRA as usually written: dense ΔW, full SVD, balanced rank-R factors."""
    total = sum(weights)
    dw = sum(
        (w / total) * c["layer.lora_B.weight"] @ c["layer.lora_A.weight"]
        for c, w in zip(clients, weights, strict=True)
    )
    U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
    r = g["layer.lora_A.weight"].shape[0]
    root = S[:r].sqrt()
    return {"layer.lora_A.weight": root[:, None] * Vh[:r], "layer.lora_B.weight": U[:, :r] * root}


FLEX_IMPLS = {
    "dense SVD": dense_flexlora,
    "fedlora factored": lambda g, c, w: aggregate("flexlora", g, c, w, error=False)[0],
}


@pytest.mark.parametrize("impl", list(FLEX_IMPLS))
@pytest.mark.parametrize("d", [1024, 4096])
def test_flexlora(benchmark, d, impl):
    g, clients, w = flex_round(d)
    f = FLEX_IMPLS[impl]
    benchmark.group = f"flexlora d={d} C=4 r=16"
    if impl == "dense SVD":  # tens of seconds at d = 4096 on a small CPU
        out = benchmark.pedantic(
            f, args=(g, clients, w), rounds=1 if d >= 4096 else 3, iterations=1
        )
    else:
        out = benchmark(f, g, clients, w)
    ref = dense_flexlora(g, clients, w) if impl != "dense SVD" else out
    prod = out["layer.lora_B.weight"].double() @ out["layer.lora_A.weight"].double()
    exp = ref["layer.lora_B.weight"].double() @ ref["layer.lora_A.weight"].double()
    torch.testing.assert_close(prod, exp, atol=1e-4, rtol=1e-4)
    _record(benchmark, f"flexlora{d}/{impl}")


def test_masked_mean_bandwidth_gpu():
    """GPU: ``masked_weighted_mean`` over C = 100 clients of 8 M float32 parameters each, against
    the device's copy bandwidth (goal ≥ 80 %). Skipped without CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from triton.testing import do_bench

    import fedlora_kernels as fk

    C, rank, d = 100, 16, 2**19  # 16 × 2^19 = 8 M parameters per client, A-like [R, d] layout
    xs = [torch.randn(rank, d, device="cuda") for _ in range(C)]
    w = torch.rand(C, device="cuda") + 0.1
    got = fk.masked_weighted_mean(xs, w)
    ref = fk.masked_weighted_mean(xs, w, backend="torch")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    ms = do_bench(lambda: fk.masked_weighted_mean(xs, w), rep=200)
    moved = (C + 1) * rank * d * 4
    src = torch.randn(C * rank * d // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), rep=200)
    copy_bw = 2 * src.numel() * 4 / copy_ms / 1e6  # GB/s
    bw = moved / ms / 1e6
    print(
        f"\nmasked_weighted_mean C={C}: {bw:.0f} GB/s, copy {copy_bw:.0f} GB/s, {bw / copy_bw:.0%}"
    )
    MEDIANS["gpu/masked_mean GB/s"] = bw
    MEDIANS["gpu/copy GB/s"] = copy_bw


def test_report_speedups(benchmark):
    """Speed-ups over the baselines (needs the benchmarks above in the same run)."""
    pairs = {
        "fedit: flower aggregate_arrayrecords / fedlora": (
            "fedit/flower aggregate_arrayrecords",
            "fedit/fedlora",
        ),
        "fedit: flower aggregate_arrayrecords / fedlora from flower replies": (
            "fedit/flower aggregate_arrayrecords",
            "fedit/fedlora from flower replies",
        ),
        "fedit: flower legacy aggregate / fedlora": (
            "fedit/flower legacy aggregate",
            "fedit/fedlora",
        ),
        "fedit: naive loop / fedlora": ("fedit/naive per-key loop", "fedit/fedlora"),
        "fedit: naive loop / fedlora + error": (
            "fedit/naive per-key loop",
            "fedit/fedlora + error",
        ),
        "fedit: naive loop / streaming": ("fedit/naive per-key loop", "fedit/fedlora streaming"),
        "flexlora d=1024: dense / factored": (
            "flexlora1024/dense SVD",
            "flexlora1024/fedlora factored",
        ),
        "flexlora d=4096: dense / factored": (
            "flexlora4096/dense SVD",
            "flexlora4096/fedlora factored",
        ),
    }
    ratios = {
        name: MEDIANS[a] / MEDIANS[b]
        for name, (a, b) in pairs.items()
        if a in MEDIANS and b in MEDIANS
    }
    if not ratios:
        pytest.skip("run the benchmarks above in the same session (--benchmark-only)")
    benchmark.extra_info.update(ratios)
    benchmark.extra_info.update({f"median_s {k}": v for k, v in MEDIANS.items()})
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.1f}x")
    from _timing import device_name, environment, results_path, write_results

    results = environment(
        "cpu",
        protocol="pytest-benchmark medians (python -m pytest bench/test_bench_aggregation.py "
        "--benchmark-only --benchmark-min-rounds=5), one run, every baseline in it",
        median_ms={k: round(v * 1e3, 3) for k, v in MEDIANS.items() if not k.startswith("gpu")},
        speedups={k: round(v, 2) for k, v in ratios.items()},
    )
    path = write_results(results, results_path(device_name("cpu"), prefix="aggregation-"))
    print(f"wrote {path}")
    benchmark.group = "speed-ups"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
