"""fedlora.rounds: the server's bookkeeping (sampling, downloads, hand-back, refusals)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedlora
from fedlora import methods
from fedlora.local import LocalClient
from fedlora.methods import Budget, ClientOptions
from fedlora.rounds import Reply, Server, sample_clients, upload_over_budget
from fedlora.seeding import key

R, D = 4, 6


def _lora_state(rank: int = R, seed: int = 0, paths=("a", "b")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in paths:
        out[f"{p}.lora_A.weight"] = torch.randn(rank, D, generator=g)
        out[f"{p}.lora_B.weight"] = torch.randn(D, rank, generator=g)
    return out


def test_sample_clients_is_seeded_and_matches_the_simulator():
    from fedlora.simulate import SimConfig, engine

    cfg = SimConfig(clients=9, clients_per_round=4, seed=5)
    for r in range(6):
        got = sample_clients(5, r, range(9), 4)
        assert got == sorted(got) and len(set(got)) == 4
        assert got == engine.sample_clients(cfg, r)
        assert got == sample_clients(5, r, range(9), 4)
    assert len({tuple(sample_clients(5, r, range(9), 4)) for r in range(6)}) > 1
    assert sample_clients(5, 0, ["x", "y"], None) == ["x", "y"]
    with pytest.raises(ValueError, match="per_round"):
        sample_clients(0, 0, range(5), 0)


def test_replies_the_server_did_not_ask_for_are_refused_and_named():
    """Asked 0, 1, 2: a reply from 3, a second reply from 1 and an error reply are left out;
    the new global is FedIT's weighted mean of exactly the first replies of 0 and 1."""
    g0 = _lora_state(seed=0)
    server = Server("fedit", g0, options=ClientOptions(rank=R))
    downloads = server.configure(0, [0, 1, 2])
    assert set(downloads) == {0, 1, 2}
    ups = [_lora_state(seed=s) for s in (10, 11, 12, 13)]
    outcome = server.aggregate(
        0,
        [
            Reply(0, ups[0], 1.0, {}),
            Reply(1, ups[1], 3.0, {}),
            Reply(3, ups[2], 5.0, {}),
            Reply(1, ups[3], 5.0, {}),
            Reply(2, None, None, None, "error reply: boom"),
        ],
    )
    assert dict(outcome.rejected) == {
        3: "not asked to train this round",
        1: "a second reply this round",
        2: "error reply: boom",
    }
    assert outcome.used == [0, 1]
    for k in g0:
        torch.testing.assert_close(outcome.state[k], 0.25 * ups[0][k] + 0.75 * ups[1][k])
    assert server.global_state is not g0 and torch.equal(server.global_state[k], outcome.state[k])


def test_a_round_where_every_client_failed_says_so_and_keeps_the_global():
    g0 = _lora_state()
    server = Server("fedit", g0, options=ClientOptions(rank=R))
    server.configure(0, [0, 1])
    bad = {k: torch.full_like(v, float("nan")) for k, v in g0.items()}
    outcome = server.aggregate(0, [Reply(0, bad, 1.0, {}), Reply(1, None, None, None, "timeout")])
    assert outcome.state is None
    assert outcome.error == "round 1: every client update was rejected"
    assert [c for c, _ in outcome.rejected] == [1, 0]
    assert all(torch.equal(server.global_state[k], g0[k]) for k in g0)
    server.configure(1, [0])
    assert server.aggregate(1, []).error == "round 2: no client replied"


@pytest.mark.parametrize(
    "method, budget, state, meta, why",
    [
        ("hetlora", {"rank": 2}, _lora_state(rank=4), {}, "has rank 4 above the client's budget 2"),
        ("hafl", {"components": 1}, None, {"updated": {"a": [0, 2]}}, "lists 2 components"),
        ("ravan", {"heads": 1}, {}, {"heads": {"a": [0, 3]}}, "lists 2 heads"),
    ],
)
def test_uploads_above_the_budget_are_refused(method, budget, state, meta, why):
    options = ClientOptions(rank=R, heads=4)
    b = fedlora.rounds.full_budget(options, budget)
    got = upload_over_budget(methods.get(method), state or {}, meta, b)
    assert got is not None and why in got
    within = {**budget}
    within = fedlora.rounds.full_budget(options, {k: 4 for k in within})
    assert upload_over_budget(methods.get(method), state or {}, meta, within) is None


def test_over_budget_reply_is_rejected_while_the_others_aggregate():
    g0 = _lora_state()
    server = Server(
        "hetlora", g0, options=ClientOptions(rank=R), budgets={0: {"rank": 2}, 1: {"rank": 4}}
    )
    d = server.configure(0, [0, 1])
    assert d[0].state["a.lora_A.weight"].shape[0] == 2  # rank-2 prefix download
    outcome = server.aggregate(
        0, [Reply(0, _lora_state(rank=4, seed=1), 1.0, {}), Reply(1, _lora_state(seed=2), 1.0, {})]
    )
    assert outcome.used == [1]
    assert outcome.rejected[0][0] == 0 and outcome.rejected[0][1].startswith("over budget")


def test_flora_round_options_follow_the_seed_rule():
    server = Server("flora", _lora_state(), options=ClientOptions(rank=R), seed=7)
    want = methods.get("flora").round_options(key(7, 3, 13))
    assert server.round_options(3) == want


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_hafl_truncation_hand_back_places_a_fresh_clients_components():
    """After a round whose averaged scores rank components 2 and 3 highest, a rank-2 client's
    download holds global components [2, 3], and a client side built fresh for the round (as a
    Flower ClientApp is) uploads them with indices [2, 3] because the hand-back told it."""
    options = ClientOptions(rank=R, hafl_mode="truncate")
    g = _lora_state()
    server = Server("hafl", g, options=options, budgets={0: {"rank": 2}})
    d0 = server.configure(0, [0])[0]
    assert (
        torch.equal(d0.state["a.lora_A.weight"], g["a.lora_A.weight"][:2]) and d0.handback is None
    )
    scores = {"a": [0.1, 0.2, 0.9, 0.8], "b": [0.5, 0.1, 0.7, 0.2]}
    server.restore(g, {"scores": scores})  # as after a round (or when a run resumes)
    d1 = server.configure(1, [0])[0]
    assert torch.equal(d1.state["a.lora_A.weight"], g["a.lora_A.weight"][[2, 3]])
    assert torch.equal(d1.state["b.lora_B.weight"], g["b.lora_B.weight"][:, [0, 2]])
    assert d1.handback.keys() == {"scores"}  # float32 scores, as JSON-able lists
    assert all(d1.handback["scores"][p] == pytest.approx(v) for p, v in scores.items())

    torch.manual_seed(0)
    model = fedlora.inject(_Two(), "hafl", target_modules=["a", "b"], rank=R)
    client = LocalClient(
        "hafl", model, loss=lambda m, x: m(x).pow(2).mean(), lr=1e-3, options=options
    )
    result = client.train(
        d1.state, d1.budget, [torch.randn(3, D)], seed=d1.seed, handback=d1.handback
    )
    assert result.meta["indices"] == {"a": [2, 3], "b": [0, 2]}
    outcome = server.aggregate(1, [Reply(0, result.state, 1.0, result.meta)])
    assert outcome.used == [0]
    # components 0 and 1 of "a" were not trained by anyone: unchanged
    assert torch.equal(outcome.state["a.lora_A.weight"][:2], g["a.lora_A.weight"][:2])


def test_server_checks_its_arguments():
    with pytest.raises(TypeError, match="options must be a ClientOptions"):
        Server("fedit", _lora_state(), options={"rank": 4})
    with pytest.raises(ValueError, match="global_state must be a non-empty dict"):
        Server("fedit", {}, options=ClientOptions())
    with pytest.raises(TypeError, match="budget of client 0"):
        Server("fedit", _lora_state(), options=ClientOptions(rank=R), budgets={0: 3})
    server = Server("fedit", _lora_state(), options=ClientOptions(rank=R), budgets=lambda c: 3)
    with pytest.raises(TypeError, match="budget of client 0"):
        server.budget(0)
    server = Server("fedit", _lora_state(), options=ClientOptions(rank=R), budgets={0: {"rank": 2}})
    assert server.budget(1) == Budget(rank=R, heads=4, components=R, steps=1)
