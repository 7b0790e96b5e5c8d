"""Methods do what their papers say on models where the right answer is known (DESIGN §4).

HAFL: a tiny linear model whose target depends only on components 2 and 5 of a rank-6 adapter
(the adapter's input directions ``A[j]`` are orthonormal, the inputs whitened, the target
``W* = U[:, {2, 5}] A[{2, 5}]``). Importance-based selection must pick {2, 5}; an implementation
whose scores are all zero (``Ū = 0`` after one step, or ``|w·g| = 0`` with ``B = 0``) picks the
lowest indices {0, 1}. Components a client froze must keep their scores while it trains the
others, and HAFL truncation must hand a small client the components the server scored highest.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedlora
from fedlora.methods import Budget, ClientOptions, hafl
from fedlora.simulate.optim import SlotAdamW

D_IN, D_OUT, RANK, N = 10, 4, 6, 64
PLANTED = [2, 5]


def planted(seed: int = 0, *, b_scale: float = 0.0):
    """``(net, x, y)``: a one-layer LoRA net whose target needs only components 2 and 5.

    ``b_scale = 0``: the LoRA initialisation (B = 0, round 1); ``b_scale > 0``: every component
    already holds a small random B column (a later round)."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False))
    fedlora.inject(net, "hafl", target_modules=["0"], rank=RANK)
    layer = net[0]
    A = torch.linalg.qr(torch.randn(D_IN, RANK, generator=gen)).Q.T  # orthonormal rows [R, d_in]
    U = torch.zeros(D_OUT, RANK)
    U[:, PLANTED] = 3.0 * torch.randn(D_OUT, len(PLANTED), generator=gen)
    x = torch.linalg.qr(torch.randn(N, D_IN, generator=gen)).Q * N**0.5  # xᵀx / N = I
    y = x @ (U @ A).T
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A[0].copy_(A)
        layer.lora_B[0].copy_(b_scale * torch.randn(D_OUT, RANK, generator=gen))
    return net, x, y


def mse(net, x, y):
    return F.mse_loss(net(x), y)


@pytest.mark.parametrize("b_scale", [0.0, 0.1], ids=["round1_B0", "later_round"])
@pytest.mark.parametrize("score_steps", [1, 3])
def test_hafl_selects_the_planted_components(b_scale, score_steps):
    for seed in range(5):
        net, x, y = planted(seed, b_scale=b_scale)
        tracker = hafl.ImportanceTracker(net)
        for _ in range(score_steps):
            net.zero_grad()
            mse(net, x, y).backward()
            tracker.update()
        scores = tracker.component_scores()["0"]
        assert tracker.select(2) == {"0": PLANTED}, (seed, scores)
        others = [j for j in range(RANK) if j not in PLANTED]
        # B = 0: only the planted columns of ∂L/∂B are non-zero (whitened inputs, orthonormal
        # A). B ≠ 0: B's part separates by 10-100x, but A's part does not (|A ⊙ ∂L/∂A| couples
        # every B_j with the whole residual: A_j could be retrained to fit it), hence 1.2.
        margin = 1e3 if b_scale == 0 else 1.2
        assert float(scores[PLANTED].min()) > margin * float(scores[others].max()), scores


def test_round1_scores_are_gradient_magnitudes_of_b():
    """B = 0: every |w·g| is 0, so the first scoring step falls back to |g| (sticky for the
    round); A's gradient is 0 too (∝ B), so the score is B's gradient: with Ī = Ū = |g| after
    one step, S_j = mean_p g_B[p, j]²."""
    net, x, y = planted(0)
    tracker = hafl.ImportanceTracker(net)
    mse(net, x, y).backward()
    tracker.update()
    g = net[0].lora_B.grad[0]
    assert bool(tracker.by_gradient["0"][0]) and float(net[0].lora_A.grad.abs().max()) == 0
    torch.testing.assert_close(tracker.component_scores()["0"], g.square().mean(0))


def test_frozen_components_are_not_rescored_from_zero_gradients():
    net, x, y = planted(1, b_scale=0.1)
    tracker = hafl.ImportanceTracker(net)
    mse(net, x, y).backward()
    tracker.update()
    sel = tracker.select(2)["0"]
    frozen = [j for j in range(RANK) if j not in sel]
    before = tracker.component_scores()["0"].clone()
    ema_a = tracker.ema["0.A"][0][frozen].clone()
    unc_b = tracker.unc["0.B"][0][:, frozen].clone()
    opt = SlotAdamW(net, lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        mse(net, x, y).backward()
        assert float(net[0].lora_B.grad[0][:, frozen].abs().max()) == 0  # frozen: zero gradient
        tracker.update()
        opt.step(torch.ones(1, dtype=torch.bool))
    after = tracker.component_scores()["0"]
    assert torch.equal(after[frozen], before[frozen])  # bitwise: not re-scored
    assert torch.equal(tracker.ema["0.A"][0][frozen], ema_a)
    assert torch.equal(tracker.unc["0.B"][0][:, frozen], unc_b)
    assert not torch.equal(after[sel], before[sel])  # the trained ones keep being scored
    assert tracker.count["0"][0].tolist() == [6 if j in sel else 1 for j in range(RANK)]


def local_round(rule, net, state, budget, x, y, seed=0, lr=1e-2):
    """One client's round through the method's client side, as ``train_group`` drives it."""
    rule.start_round(net, 0)
    rule.prepare(net, 0, state, budget, seed)
    opt = SlotAdamW(net, lr=lr)
    pre = rule.pre_steps(budget)
    if pre == 0:
        rule.scoring_done(net, 0, budget, seed)
    for step in range(pre + budget.steps):
        opt.zero_grad()
        mse(net, x, y).backward()
        rule.after_backward(net, [0])
        if step >= pre:
            opt.step(torch.ones(1, dtype=torch.bool))
        if step + 1 == pre:
            rule.scoring_done(net, 0, budget, seed)
    return rule.upload(net, 0, budget)


@pytest.mark.parametrize("b_scale", [0.0, 0.1], ids=["round1_B0", "later_round"])
def test_hafl_client_trains_and_uploads_the_planted_components(b_scale):
    net, x, y = planted(0, b_scale=b_scale)
    rule = hafl.METHOD.client(ClientOptions(rank=RANK), [])
    rule.setup(net)
    g = fedlora.get_adapter_state_dict(net)
    state, meta = local_round(
        rule, net, rule.download(g, Budget(RANK, 1, 2, 3)), Budget(RANK, 1, 2, 3), x, y
    )
    assert meta["updated"] == {"0": PLANTED} == meta["indices"]
    assert list(state["0.lora_A.weight"].shape) == [2, D_IN]  # only the trained components travel


def test_hafl_truncation_gives_a_small_client_the_top_scored_components():
    """Round 1: no server scores, the rank-2 client gets the prefix {0, 1} and the rank-6 client
    scores every component; the server averages the scores; round 2: the rank-2 client gets
    the planted {2, 5}, written back to their indices by the server."""
    net, x, y = planted(0)
    options = ClientOptions(rank=RANK, hafl_mode="truncate")
    budgets = [Budget(RANK, 1, RANK, 3), Budget(2, 1, 2, 3)]
    rule = hafl.METHOD.client(options, budgets)
    rule.setup(net)
    g = fedlora.get_adapter_state_dict(net)
    server_options: dict = {}
    for round_idx, expect_small in enumerate(([0, 1], PLANTED)):
        ups = []
        for k, budget in enumerate(budgets):
            down = rule.download(g, budget)
            assert down["0.lora_A.weight"].shape[0] == budget.rank
            ups.append(local_round(rule, net, down, budget, x, y, seed=k))
        assert ups[1][1]["indices"] == {"0": expect_small}, round_idx
        assert ups[0][1]["indices"] == {"0": list(range(RANK))}
        new, metrics = fedlora.aggregate(
            "hafl", g, [s for s, _ in ups], [1.0, 1.0], [m for _, m in ups], **server_options
        )
        assert metrics["rejected"] == []
        # the small client's components are written back to their indices
        idx = ups[1][1]["indices"]["0"]
        A_small = ups[1][0]["0.lora_A.weight"]
        A_big = ups[0][0]["0.lora_A.weight"][idx]
        torch.testing.assert_close(new["0.lora_A.weight"][idx], (A_small + A_big) / 2)
        server_options = dict(rule.after_aggregate(metrics) or {})
        assert set(server_options) == {"prev_scores"}
        g = new
    top = torch.sort(-rule.server_scores["0"], stable=True).indices[:2]
    assert sorted(top.tolist()) == PLANTED
