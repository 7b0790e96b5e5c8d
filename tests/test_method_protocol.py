"""The method registry and protocol (DESIGN §4.1).

A toy method defined in this one file (a client side that freezes ``A`` and uploads ``B`` with a
meta flag, a server rule that averages ``B`` and checks the flag) is registered and run through
``fedlora.aggregate``, ``Aggregator``, ``fedlora simulate`` (both engines) and the Flower
strategy. Its algebra is FFA-LoRA's, so every result must equal the built-in ``ffa``'s: proof that
each caller drives the method's own hooks and nothing else.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fedlora
from fedlora import methods
from fedlora.methods import Budget, Client, Method
from fedlora.methods._common import ClientRejected, a_key, lora_paths, weighted_average


# ------------------------------------------------------------------------------ the toy method
class ToyClient(Client):
    """Freeze A for the whole run; upload B only, flagged."""

    def setup(self, model: nn.Module) -> None:
        for _, layer in fedlora.adapter_layers(model):
            layer.lora_A.requires_grad_(False)

    def upload(self, model: nn.Module, slot: int, budget: Budget):
        state, _ = super().upload(model, slot, budget)
        return {k: v for k, v in state.items() if not k.endswith(".lora_A.weight")}, {"toy": 1}


def toy_check(global_state, state, meta) -> None:
    if meta.get("toy") != 1:
        raise ClientRejected(None, "meta 'toy' must be 1")


def toy_aggregate(global_state, client_states, weights, metas):
    frozen = {a_key(p) for p in lora_paths(global_state)}
    keys = [k for k in global_state if k not in frozen]
    new = weighted_average(client_states, weights, keys, global_state)
    new.update({k: global_state[k].clone() for k in frozen})
    return {k: new[k] for k in global_state}, {"toy_rounds": 1}


TOY = Method(
    name="toy",
    layer="lora",
    ranks="equal",
    aggregate=toy_aggregate,
    client=ToyClient,
    check_client=toy_check,
    optional_suffixes=(".lora_A.weight",),
    summary="a test method: FFA-LoRA's algebra through the protocol",
)


@pytest.fixture
def toy():
    methods.register(TOY)
    yield TOY
    methods.unregister("toy")


def lora_state(seed=0, R=3, d_in=6, d_out=5):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for p in ("enc.0.q", "enc.1.v"):
        out[f"{p}.lora_A.weight"] = torch.randn(R, d_in, generator=gen)
        out[f"{p}.lora_B.weight"] = torch.randn(d_out, R, generator=gen)
    out["classifier.weight"] = torch.randn(3, d_out, generator=gen)
    return out


# ------------------------------------------------------------------------------ registry
def test_registry_lists_every_method_once_and_everything_derives_from_it(toy):
    from fedlora import aggregation, injection
    from fedlora.simulate import config

    assert methods.names()[: len(methods.BUILTIN)] == methods.BUILTIN
    assert methods.names()[-1] == "toy"
    assert aggregation.METHODS == methods.names() == config.METHODS
    assert set(injection.LORA_METHODS) | set(injection.RAVAN_METHODS) == set(methods.names())
    assert injection.RAVAN_METHODS == ("ravan",)
    assert set(aggregation.STREAMING_METHODS) == {"fedit", "ffa", "hetlora", "prelort", "hafl"}
    for name in methods.names():
        m = methods.get(name)
        assert m.name == name and methods._protocol.check_method(m) is m
    assert [n for n in methods.names() if methods.get(n).changes_base] == ["flora", "fedex"]


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"one of fedit, ffa, .*florana; got 'fedavg'"):
        methods.get("fedavg")
    with pytest.raises(ValueError, match="one of fedit"):
        fedlora.aggregate("fedavg", lora_state(), [lora_state(1)], [1.0])
    with pytest.raises(ValueError, match="one of fedit"):
        fedlora.inject(nn.Sequential(nn.Linear(4, 4)), "fedavg", ["0"])


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"layer": "conv"}, ValueError, "layer must be one of"),
        ({"ranks": "any"}, ValueError, "ranks must be one of"),
        ({"aggregate": None}, TypeError, "aggregate"),
        ({"client": object}, TypeError, "client must be a subclass"),
        ({"stream_add": lambda *a: None}, ValueError, "stream_add and stream_result"),
        ({"budget_fields": ("rank", "depth")}, ValueError, "budget_fields"),
        ({"name": "not a name"}, ValueError, "identifier"),
        ({"check_client": 3}, TypeError, "check_client must be callable"),
    ],
)
def test_a_method_breaking_the_protocol_fails_at_registration(change, error, match):
    with pytest.raises(error, match=match):
        methods.register(dataclasses.replace(TOY, **change))
    assert "toy" not in methods.names()
    with pytest.raises(TypeError, match=r"must be a fedlora\.methods\.Method"):
        methods.register({"name": "toy"})


def test_names_cannot_be_taken_twice(toy):
    with pytest.raises(ValueError, match="already registered"):
        methods.register(dataclasses.replace(TOY, summary="again"))
    with pytest.raises(ValueError, match="built-in"):
        methods.unregister("fedit")


# ------------------------------------------------------------------------------ the toy, end to end
def test_toy_method_through_aggregate_and_aggregator(toy):
    g = lora_state()
    clients = [{k: v for k, v in lora_state(s).items() if ".lora_A." not in k} for s in (1, 2, 3)]
    metas = [{"toy": 1}, {"toy": 0}, {"toy": 1}]
    new, m = fedlora.aggregate("toy", g, clients, [1.0, 2.0, 3.0], metas)
    want, _ = fedlora.aggregate("ffa", g, [clients[0], clients[2]], [1.0, 3.0])
    assert m["used"] == [0, 2] and m["rejected"][0]["reason"] == "meta 'toy' must be 1"
    assert m["toy_rounds"] == 1
    for k in want:
        assert torch.equal(new[k], want[k]), k
    with pytest.raises(ValueError, match="cannot stream"):
        fedlora.Aggregator("toy", g)


@pytest.mark.parametrize("engine", ["sequential", "batched"])
def test_toy_method_through_fedlora_simulate(toy, tiny_bert_dir, engine):
    from test_simulate import tiny

    from fedlora.simulate import run

    got = run(tiny(tiny_bert_dir, method="toy", engine=engine), progress=False)
    want = run(tiny(tiny_bert_dir, method="ffa", engine=engine), progress=False)
    for r_t, r_f in zip(got.rounds, want.rounds, strict=True):
        for key in ("test_accuracy", "test_loss", "train_loss", "bytes_up", "bytes_down"):
            assert r_t[key] == r_f[key], key
    for k in want.global_state:
        assert torch.equal(got.global_state[k], want.global_state[k]), k


def test_toy_method_through_the_flower_strategy(toy):
    pytest.importorskip("flwr")
    from test_flower import run_round, strategy

    g = lora_state()
    clients = [{k: v for k, v in lora_state(s).items() if ".lora_A." not in k} for s in (1, 2, 3)]
    uploads = {k: (clients[k], 10 * (k + 1), {"toy": 1 if k != 1 else 5}) for k in range(3)}
    st = strategy("toy", 3)
    got, metrics, replies = run_round(st, g, uploads)
    assert metrics["num_rejected"] == 1 and metrics["clients_used"] == 2
    order = [int(m.metadata.src_node_id) - 1 for m in replies]
    order = [k for k in order if k != 1]
    want, _ = fedlora.aggregate(
        "ffa", g, [clients[k] for k in order], [10 * (k + 1) for k in order]
    )
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)


def test_toy_method_through_the_peft_integration(toy):
    pytest.importorskip("peft")
    from fedlora import peft as fp

    assert issubclass(fp.layer_class("toy"), fp.PeftLoRALinear)
    with pytest.raises(ValueError, match="one of fedit"):
        fp.layer_class("fedavg")
