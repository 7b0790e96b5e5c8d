"""CPU benchmark of libfedlora (csrc/) against the torch composites of fedlora_kernels.reference.

    python -m pytest bench/test_bench_csrc.py --benchmark-only --benchmark-group-by=group -s

Groups (float32, the machine's torch thread count for both sides):

- ``masked mean C=100 MiniLM``: one server round over 100 clients of all-MiniLM-L6-v2 size
  (6 layers × query, key, value, attention-output dense, 384×384, r = 16: 48 LoRA factors), each
  factor one masked weighted mean with the global as fallback. ``torch`` is
  ``reference.masked_weighted_mean`` (per client: scale, select, add); ``C`` is the same
  coefficients (``reference.masked_mean_coefficients``) and ``fedlora_masked_combine``.
  ``... ragged`` gives the clients PreLort-style rank prefixes 4..16. Goal: C ≥ 2× faster.
- ``masked adamw A|B``: one step on 16 stacked slots of A ``[16, 16, 1024]`` (rank_dim 0) and B
  ``[16, 1024, 16]`` (rank_dim 1), every component on and half of them masked (alternate
  components), torch composite (``reference.masked_adamw_``) and C (``fedlora_masked_adamw``).
  Goal: C with half masked no slower than C with all on, and faster than torch.
- ``masked_lora fwd N=…`` / ``multihead fwd N=…``: the small-batch forwards (d = 1024, R = 16;
  4 heads × r 8), reference vs C, no autograd.

Every C row's result is checked against the torch row first. The last test prints the speed-ups
and writes ``bench/results/csrc-<device>.json`` (add the machine's load as its ``note``).
"""

from __future__ import annotations

import pytest
import torch
from _timing import device_name, environment, results_path, write_results

from fedlora_kernels import _clib, reference

pytestmark = pytest.mark.skipif(not _clib.available(), reason="libfedlora is not built")

CLIENTS = 100
MEDIANS: dict[str, dict[str, float]] = {}
HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def _record(benchmark, group: str, name: str) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        MEDIANS.setdefault(group, {})[name] = stats.stats.median * 1e3


# ------------------------------------------------------------------------------------------------
# masked weighted mean: a server round
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["equal", "ragged"])
def round_factors(request):
    """48 factors (A [16, 384] rank_dim 0, B [384, 16] rank_dim 1) × 100 clients."""
    gen = torch.Generator().manual_seed(0)
    ranks = [16] * CLIENTS if request.param == "equal" else [4 + k % 13 for k in range(CLIENTS)]
    weights = torch.tensor(
        [float(50 + (37 * k) % 200) for k in range(CLIENTS)], dtype=torch.float64
    )
    factors = []
    for _ in range(24):
        factors.append(
            (
                0,
                torch.randn(16, 384, generator=gen),
                [torch.randn(r, 384, generator=gen) for r in ranks],
            )
        )
        factors.append(
            (
                1,
                torch.randn(384, 16, generator=gen),
                [torch.randn(384, r, generator=gen) for r in ranks],
            )
        )
    return request.param, factors, weights, ranks


def torch_round(factors, weights, ranks):
    return [
        reference.masked_weighted_mean(
            xs, weights, None, rank_dim=rd, fallback=g, rank=16, dtype=torch.float32
        )
        for rd, g, xs in factors
    ]


def c_round(factors, weights, ranks):
    out = []
    for rd, g, xs in factors:
        coef, has = reference.masked_mean_coefficients(weights, None, ranks, 16)
        outer, inner = (1, g.shape[1]) if rd == 0 else (g.shape[0], 1)
        y = torch.empty_like(g)
        _clib.masked_combine(xs, ranks, coef, has, y, outer=outer, rank=16, inner=inner, fallback=g)
        out.append(y)
    return out


@pytest.mark.parametrize("impl", ["torch", "C"])
def test_masked_mean_round(benchmark, round_factors, impl):
    kind, factors, weights, ranks = round_factors
    group = f"masked mean C={CLIENTS} MiniLM" + (" ragged" if kind == "ragged" else "")
    benchmark.group = group
    fn = torch_round if impl == "torch" else c_round
    if impl == "C":
        ref = torch_round(factors, weights, ranks)
        assert all(
            torch.equal(a, b) for a, b in zip(c_round(factors, weights, ranks), ref, strict=True)
        )
    benchmark(fn, factors, weights, ranks)
    _record(benchmark, group, impl)


# ------------------------------------------------------------------------------------------------
# masked AdamW
# ------------------------------------------------------------------------------------------------

ADAMW = {"A": (0, (16, 16, 1024)), "B": (1, (16, 1024, 16))}


def _adamw_inputs(shape):
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)
    m = torch.randn(shape, generator=gen) * 0.1
    v = torch.rand(shape, generator=gen) * 0.01
    return p, g, m, v


def _step(impl, rank_dim, p, g, m, v, mask):
    if impl == "torch":
        reference.masked_adamw_(
            p, g, m, v, mask, beta1=HP["beta1"], beta2=HP["beta2"], lr=HP["lr"], eps=HP["eps"],
            weight_decay=HP["weight_decay"], step=5, rank_dim=rank_dim, importance=None,
        )  # fmt: skip
    else:
        _clib.masked_adamw(
            p, g, m, v, mask, [5.0] * p.shape[0], **HP, rank_dim=rank_dim, tensor_step=False
        )


@pytest.mark.parametrize("masked", ["all on", "half masked"])
@pytest.mark.parametrize("impl", ["torch", "C"])
@pytest.mark.parametrize("factor", list(ADAMW))
def test_masked_adamw(benchmark, factor, impl, masked):
    rank_dim, shape = ADAMW[factor]
    group = f"masked adamw {factor} {list(shape)}"
    benchmark.group = group
    rank = shape[1 + rank_dim]
    mask = torch.ones(shape[0], rank, dtype=torch.bool)
    if masked == "half masked":
        mask = torch.arange(rank).expand(shape[0], rank) % 2 == 0
    p, g, m, v = _adamw_inputs(shape)
    if impl == "C":  # the same step as the reference (moments bitwise; see tests/test_csrc.py)
        a = [t.clone() for t in (p, m, v)]
        b = [t.clone() for t in (p, m, v)]
        _step("torch", rank_dim, a[0], g, a[1], a[2], mask)
        _step("C", rank_dim, b[0], g, b[1], b[2], mask)
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-9)
    benchmark(_step, impl, rank_dim, p, g, m, v, mask)
    _record(benchmark, group, f"{impl} {masked}")


# ------------------------------------------------------------------------------------------------
# small-batch forwards
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "C"])
@pytest.mark.parametrize("n", [1, 8, 64])
def test_masked_lora_forward(benchmark, n, impl):
    group = f"masked_lora fwd N={n} d=1024 R=16"
    benchmark.group = group
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 1024, generator=gen)
    A, B = torch.randn(1, 16, 1024, generator=gen), torch.randn(1, 1024, 16, generator=gen)
    off, ada = torch.tensor([0, n]), torch.tensor([0])

    def ref():
        return reference.masked_lora(
            x, A, B, scale=1.0, rank_mask=None, grad_mask=None, seg_offsets=off, seg_adapter=ada
        )

    def c():
        return _clib.masked_lora_forward(x, A, B, scale=1.0)

    if impl == "C":
        torch.testing.assert_close(c(), ref(), rtol=1e-4, atol=1e-3)
    benchmark(ref if impl == "torch" else c)
    _record(benchmark, group, impl)


@pytest.mark.parametrize("impl", ["torch", "C"])
@pytest.mark.parametrize("n", [1, 8, 64])
def test_multihead_forward(benchmark, n, impl):
    group = f"multihead fwd N={n} d=1024 h=4 r=8"
    benchmark.group = group
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 1024, generator=gen)
    A, B = torch.randn(4, 8, 1024, generator=gen), torch.randn(4, 1024, 8, generator=gen)
    H, s = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, generator=gen)
    off, ada = torch.tensor([0, n]), torch.tensor([0])

    def ref():
        return reference.multihead_lora(
            x, A, B, H, s, scale=1.0, seg_offsets=off, seg_adapter=ada, head_mask=None
        )

    def c():
        return _clib.multihead_forward(x, A, B, H, s, scale=1.0)

    if impl == "C":
        torch.testing.assert_close(c(), ref(), rtol=1e-4, atol=1e-2)
    benchmark(ref if impl == "torch" else c)
    _record(benchmark, group, impl)


def test_summary(benchmark):
    """Speed-ups (C median / torch median) per group; writes bench/results/csrc-<device>.json
    when every benchmark above ran (takes ``benchmark`` so that --benchmark-only runs it)."""
    if not MEDIANS:
        pytest.skip("no benchmark ran (run with --benchmark-only)")
    rows = []
    for group, by_name in MEDIANS.items():
        for name, ms in by_name.items():
            torch_name = name.replace("C", "torch", 1) if name.startswith("C") else name
            base = by_name.get(torch_name)
            row = {"group": group, "name": name, "median_ms": round(ms, 4)}
            if base is not None:
                row["x_torch"] = round(ms / base, 3)  # < 1: faster than the torch composite
            rows.append(row)
            print(f"{group:40s} {name:18s} {ms:9.3f} ms  {row.get('x_torch', '')}")
    results = environment(
        "cpu",
        protocol="pytest-benchmark medians: python -m pytest bench/test_bench_csrc.py "
        "--benchmark-only; x_torch = median / the same row of the torch composite "
        "(fedlora_kernels.reference) in that group",
        rows=rows,
    )
    benchmark.extra_info.update({f"{r['group']} / {r['name']}": r["median_ms"] for r in rows})
    benchmark.pedantic(lambda: None, rounds=1)
    expected = 2 * 2 + 2 * 4 + 3 * 2 + 3 * 2
    if sum(len(v) for v in MEDIANS.values()) == expected:
        path = write_results(results, results_path(device_name("cpu"), prefix="csrc-"))
        print(f"wrote {path}")
