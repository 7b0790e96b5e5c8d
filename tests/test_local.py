"""fedlora.local: one client's local work for any method, checked against independent formulas."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import fedlora
from fedlora import methods
from fedlora.local import LocalClient, client_seed, sample_batches, train_slots
from fedlora.methods import Budget, ClientOptions

D_IN, D_HID, D_OUT, R = 13, 11, 5, 4


def _model(method: str, **options) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))
    return fedlora.inject(base, method, target_modules=["0", "2"], rank=R, **options)


def _batches(n: int, size: int = 7, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, D_IN, generator=g), torch.randn(size, D_OUT, generator=g))
        for _ in range(n)
    ]


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _random_download(model: nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g) * 0.3
        for k, v in fedlora.get_adapter_state_dict(model).items()
    }


def _budget(rank: int = R, heads: int = 4, components: int = R, steps: int = 1) -> Budget:
    return Budget(rank=rank, heads=heads, components=components, steps=steps)


def test_one_step_equals_adamw_on_an_independent_lora_formula():
    """FedIT, one step: the upload is download − lr·g/(|g|+eps) (AdamW's first step, no decay),
    g the gradient of the loss of y = W x + b + (alpha/R)·B A x written out in plain torch."""
    model = _model("fedit", alpha=8.0)
    download = _random_download(model)
    (batch,) = _batches(1)
    lr, eps = 1e-2, 1e-8
    client = LocalClient("fedit", model, loss=mse, lr=lr)
    result = client.train(download, _budget(), [batch], seed=0)

    params = {k: v.clone().double().requires_grad_(True) for k, v in download.items()}
    x, y = batch[0].double(), batch[1].double()
    lin0, lin2 = model[0].base_layer, model[2].base_layer
    scale = 8.0 / R

    def layer(h, lin, path):
        A, B = params[f"{path}.lora_A.weight"], params[f"{path}.lora_B.weight"]
        return h @ lin.weight.double().T + lin.bias.double() + scale * (h @ A.T) @ B.T

    out = layer(torch.tanh(layer(x, lin0, "0")), lin2, "2")
    ((out - y) ** 2).mean().backward()
    for k, p in params.items():
        g = p.grad
        want = p.detach() - lr * g / (g.abs() + eps)
        torch.testing.assert_close(result.state[k].double(), want, atol=1e-6, rtol=1e-5)
    assert result.num_examples == 7
    assert result.metrics["steps"] == 1.0 and result.metrics["train_loss"] > 0


@pytest.mark.parametrize("name", methods.names())
def test_every_method_is_deterministic_given_the_seed(name):
    """Two fresh clients with the same download, budget, batches and seed upload the same bits;
    another seed changes what a seeded method chooses but never breaks the upload."""
    opts = {"heads": 4} if methods.get(name).layer == "ravan" else {}

    def run(seed):
        model = _model(name, **opts)
        download = fedlora.get_adapter_state_dict(model)
        budget = _budget(rank=R, heads=2, components=2, steps=3)
        side_opts = ClientOptions(rank=R, heads=4, head_score="random")
        client = LocalClient(name, model, loss=mse, lr=1e-2, options=side_opts)
        return client.train(download, budget, _batches(5), seed=seed)

    a, b = run(client_seed(0, 1, 2)), run(client_seed(0, 1, 2))
    assert a.state.keys() == b.state.keys() and a.meta == b.meta
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k
        assert torch.isfinite(a.state[k]).all()


def test_callable_loss_equals_segment_loss_under_nested_truncations():
    """PreLort trains every batch under several truncations at once: the callable-loss path (one
    forward per truncation) gives the segment path's result (one forward for all)."""

    class Seg:
        def cat(self, batches):
            return (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))

        def segment_losses(self, model, batch, offsets):
            out = model(batch[0])
            return [
                ((out[a:b] - batch[1][a:b]) ** 2).mean() for a, b in itertools.pairwise(offsets)
            ]

    class Batch(tuple):
        def __len__(self):
            return self[0].shape[0]

        def to(self, device):
            return self

    batches = _batches(3)
    budget = _budget(rank=R, steps=3)
    results = []
    for loss, data in ((mse, batches), (Seg(), [Batch(b) for b in batches])):
        model = _model("prelort")
        side = methods.get("prelort").client(ClientOptions(rank=R), [budget, _budget(rank=2)])
        side.setup(model)
        client = LocalClient("prelort", model, loss=loss, lr=1e-2, side=side)
        assert side.truncations(budget) == [2, 4]
        results.append(client.train(_random_download(model), budget, data, seed=5))
    for k in results[0].state:
        torch.testing.assert_close(results[0].state[k], results[1].state[k], atol=1e-6, rtol=1e-5)


def test_batches_cycle_a_list_and_refuse_a_short_iterator():
    model = _model("fedit")
    client = LocalClient("fedit", model, loss=mse, lr=1e-3)
    dl = fedlora.get_adapter_state_dict(model)
    one = _batches(1)
    r = client.train(dl, _budget(steps=3), one, seed=0)  # a list is cycled
    assert r.metrics["steps"] == 3.0 and r.num_examples == 21
    with pytest.raises(ValueError, match="batches: the iterator ran out after 1"):
        client.train(dl, _budget(steps=3), iter(one), seed=0)


def _unchanged(model, before):
    after = {k: v for k, v in model.state_dict().items()}
    return all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "case, match",
    [
        ("rank", "budget.rank = 8 exceeds"),
        ("components", "budget.components = 8 exceeds"),
        ("missing", "download does not match the model's adapters: it lacks"),
        ("shape", r"download\['0.lora_A.weight'\] has shape"),
        ("nan", "NaN or inf"),
        ("empty", "batches yielded nothing"),
        ("steps", "budget.steps must be a positive int"),
    ],
)
def test_bad_input_is_refused_before_the_model_is_touched(case, match):
    name = "hafl" if case == "components" else "hetlora"
    model = _model(name)
    before = copy.deepcopy(model.state_dict())
    client = LocalClient(name, model, loss=mse, lr=1e-3)
    dl = fedlora.get_adapter_state_dict(model)
    budget, batches = _budget(), _batches(1)
    if case == "rank":
        budget = _budget(rank=8)
    elif case == "components":
        budget = _budget(components=8)
    elif case == "missing":
        dl.pop("0.lora_A.weight")
    elif case == "shape":
        dl["0.lora_A.weight"] = torch.zeros(R, D_IN + 1)
    elif case == "nan":
        dl["2.lora_B.weight"] = torch.full_like(dl["2.lora_B.weight"], float("nan"))
    elif case == "empty":
        batches = []
    elif case == "steps":
        budget = Budget(rank=R, heads=1, components=R, steps=0)
    with pytest.raises(ValueError, match=match):
        client.train(dl, budget, batches, seed=0)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    "loss, match",
    [
        (lambda m, b: (m(b[0]) - b[1]) ** 2, "loss must return a scalar"),
        (lambda m, b: torch.tensor(1.0), "loss must depend on the adapters"),
        (lambda m, b: mse(m, b) * float("nan"), "NaN or inf"),
        (lambda m, b: 3.0, "loss must return a torch.Tensor"),
    ],
)
def test_bad_losses_are_named(loss, match):
    model = _model("fedit")
    before = copy.deepcopy({k: v for k, v in fedlora.get_adapter_state_dict(model).items()})
    client = LocalClient("fedit", model, loss=loss, lr=1e-3)
    with pytest.raises((ValueError, TypeError), match=match):
        client.train(before, _budget(), _batches(1), seed=0)
    after = fedlora.get_adapter_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no optimizer step was taken


def test_constructor_checks():
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        LocalClient("fedit", _model("fedit"), loss=mse, lr=0.0)
    with pytest.raises(ValueError, match="no adapter layers"):
        LocalClient("fedit", nn.Linear(3, 3), loss=mse, lr=1e-3)
    with pytest.raises(ValueError, match=r"method must be one of|unknown method"):
        LocalClient("nope", _model("fedit"), loss=mse, lr=1e-3)


def test_sample_batches_is_the_simulator_rule():
    """The one batch rule: seeded by (seed, round, client), cycled, independent of call order."""
    a = sample_batches(list(range(10, 20)), 4, 5, seed=3, round_idx=2, client=1)
    assert len(a) == 5 and all(len(b) == 4 for b in a)
    assert sorted({i for b in a for i in b}) == list(
        range(10, 20)
    )  # 20 draws over 10 items: all of them
    assert a == sample_batches(list(range(10, 20)), 4, 5, seed=3, round_idx=2, client=1)
    assert a != sample_batches(list(range(10, 20)), 4, 5, seed=3, round_idx=2, client=2)
    from fedlora.simulate import engine

    assert engine.client_batches(list(range(10, 20)), 4, 5, 3, 2, 1) == a


def test_train_slots_gives_each_slot_its_own_gradient():
    """Two clients in two slots of one model in one pass: each upload equals the one it gets
    alone (one slot), so the batched engine is many independent clients."""
    budget = _budget(steps=2)
    data = [_batches(2, seed=7), _batches(2, size=3, seed=8)]

    def alone(i):
        model = _model("fedit")
        return LocalClient("fedit", model, loss=mse, lr=1e-2).train(
            _random_download(model), budget, data[i], seed=i
        )

    model = _model("fedit", num_clients=2)
    side = methods.get("fedit").client(ClientOptions(rank=R), [budget, budget])
    side.setup(model)
    one = _model("fedit")
    jobs = [fedlora.local.Job(i, budget, _random_download(one), data[i], i, 0) for i in range(2)]
    together = train_slots(model, side, jobs, mse, lr=1e-2)
    for i in range(2):
        single = alone(i)
        for k in single.state:
            torch.testing.assert_close(together[i].state[k], single.state[k], atol=1e-6, rtol=1e-5)
