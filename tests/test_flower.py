"""Flower integration on real flwr objects (no mocks).

Messages go through :class:`fedlora.flower.LocalGrid`, a real ``flwr`` ``Grid`` that runs a real
``ClientApp`` in this process, so every reply is a Flower ``Message`` built by the client side
exactly as in a deployment. ``flwr run`` itself needs Ray (``flwr[simulation]``); the example's
ServerApp/ClientApp are run here through the same ``LocalGrid`` instead.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

import fedlora  # noqa: E402
from fedlora import flower as ff  # noqa: E402
from fedlora.methods import prefix  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
R, D_IN, D_OUT = 4, 6, 5
PATHS = ("enc.0.q", "enc.1.v")


def lora_state(rank: int = R, *, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random LoRA factors for two layers plus a classifier head (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path in PATHS:
        out[f"{path}.lora_A.weight"] = torch.randn(rank, D_IN, generator=gen).to(dtype)
        out[f"{path}.lora_B.weight"] = torch.randn(D_OUT, rank, generator=gen).to(dtype)
    out["classifier.weight"] = torch.randn(3, D_OUT, generator=gen).to(dtype)
    return out


def ravan_state(heads: int = 3, r: int = 2, *, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path in PATHS:
        out[f"{path}.lora_H"] = torch.randn(heads, r, r, generator=gen)
        out[f"{path}.lora_s"] = torch.ones(heads)
    return out


def scripted_app(uploads: dict[int, tuple]) -> ClientApp:
    """A ClientApp whose node ``i`` (partition id) replies with ``uploads[i] = (state, weight,
    meta)``; a state given as an Exception is raised instead (an error reply)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        state, weight, meta = uploads[int(context.node_config["partition-id"])]
        if isinstance(state, Exception):
            raise state
        if callable(state):
            return state(msg)
        return ff.train_reply(msg, state, weight, meta=meta, metrics={"train_loss": 1.0})

    return app


def run_round(strategy, global_state, uploads, *, server_round=1):
    """configure_train -> the ClientApp on every node -> aggregate_train; returns
    ``(new_state | None, metrics, replies)``."""
    grid = ff.LocalGrid(scripted_app(uploads), len(uploads))
    messages = strategy.configure_train(
        server_round, ff.to_arrayrecord(global_state), ConfigRecord(), grid
    )
    replies = grid.send_and_receive(messages)
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return (None if arrays is None else ff.from_arrayrecord(arrays)), metrics, replies


def node_of(partition: int) -> int:
    return partition + 1  # LocalGrid's node ids


def strategy(method: str, n: int, **kwargs):
    return ff.FedLoRAStrategy(
        method, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n, **kwargs
    )


def assert_state_close(got, want, atol=1e-6):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k].float(), atol=atol, rtol=1e-5, msg=k)


# ------------------------------------------------------------------------------------- aggregate_train
@pytest.mark.parametrize("method", ["fedit", "hetlora", "flexlora", "ravan"])
def test_aggregate_train_equals_fedlora_aggregate(method):
    n = 3
    if method == "ravan":
        g = ravan_state()
        clients = [ravan_state(seed=10 + k) for k in range(n)]
        metas = [{"heads": {PATHS[0]: [k % 3], PATHS[1]: [0, 1]}} for k in range(n)]
    else:
        g = lora_state()
        ranks = [2, 4, 3] if method in ("hetlora", "flexlora") else [R] * n
        clients = [prefix.truncate(lora_state(seed=10 + k), r) for k, r in enumerate(ranks)]
        metas = [{"rank": r} if method != "fedit" else {} for r in ranks]
    weights = [10, 30, 20]
    uploads = {k: (clients[k], weights[k], metas[k]) for k in range(n)}
    st = strategy(method, n, aggregate_options={"error": True})  # the error only when asked
    got, metrics, replies = run_round(st, g, uploads)
    # the expected result on the same dicts, in ascending node id (the strategy sums the
    # replies in that order, whatever order they arrived in)
    order = sorted(int(m.metadata.src_node_id) - 1 for m in replies)
    want, want_metrics = fedlora.aggregate(
        method,
        g,
        [clients[k] for k in order],
        [weights[k] for k in order],
        [metas[k] for k in order],
        error=True,
    )
    assert_state_close(got, want)
    assert metrics["clients_used"] == n and metrics["num_rejected"] == 0
    assert metrics["aggregation_failed"] == 0
    assert math.isclose(
        metrics["aggregation_error"], want_metrics["aggregation_error"], rel_tol=1e-6
    )
    assert sorted(metrics["used"]) == [node_of(k) for k in range(n)]
    assert math.isclose(metrics["train_loss"], 1.0)  # the clients' own metrics are aggregated too
    assert_state_close(st.global_state, want)  # kept on the strategy for the next round


def test_nan_client_rejected_reported_and_excluded():
    g = lora_state()
    clients = [lora_state(seed=s) for s in (1, 2, 3)]
    clients[1]["enc.1.v.lora_B.weight"][2, 1] = float("nan")
    uploads = {k: (clients[k], 10 * (k + 1), {}) for k in range(3)}
    st = strategy("fedit", 3)
    got, metrics, _ = run_round(st, g, uploads)
    want, _ = fedlora.aggregate("fedit", g, [clients[0], clients[2]], [10, 30])
    assert_state_close(got, want)
    assert metrics["rejected"] == [node_of(1)] and metrics["num_rejected"] == 1
    assert metrics["clients_used"] == 2
    ((nid, why),) = st.last_rejections
    assert nid == node_of(1) and "enc.1.v.lora_B.weight" in why and "NaN" in why
    assert all(torch.isfinite(v).all() for v in got.values())


def test_malformed_replies_are_rejected_not_raised():
    g = lora_state()
    good = lora_state(seed=1)

    def no_weight(msg):
        content = RecordDict(
            {"arrays": ff.to_arrayrecord(good), "metrics": MetricRecord({"loss": 1.0})}
        )
        return Message(content=content, reply_to=msg)

    def two_arrays(msg):
        content = RecordDict(
            {
                "a": ff.to_arrayrecord(good),
                "b": ff.to_arrayrecord(good),
                "metrics": MetricRecord({"num-examples": 5}),
            }
        )
        return Message(content=content, reply_to=msg)

    def bad_meta(msg):
        reply = ff.train_reply(msg, good, 5)
        reply.content[ff.META_KEY] = ConfigRecord({"x": "{oops", "fedlora.json-keys": ["x"]})
        return reply

    extra = dict(good, **{"enc.9.k.lora_A.weight": torch.ones(R, D_IN)})
    uploads = {
        0: (good, 10, {}),
        1: (RuntimeError("client crashed"), 0, {}),
        2: (no_weight, 0, {}),
        3: (two_arrays, 0, {}),
        4: (bad_meta, 0, {}),
        5: (extra, 10, {}),  # unexpected key: rejected by fedlora.aggregate
        6: (lora_state(seed=7), -3, {}),  # negative weight: refused by train_reply (error reply)
    }
    st = strategy("fedit", len(uploads))
    got, metrics, _ = run_round(st, g, uploads)
    want, _ = fedlora.aggregate("fedit", g, [good], [10])
    assert_state_close(got, want)
    assert sorted(metrics["rejected"]) == [node_of(k) for k in range(1, 7)]
    reasons = dict(st.last_rejections)
    assert "client crashed" in reasons[node_of(1)]
    assert "num-examples" in reasons[node_of(2)]
    assert "one ArrayRecord" in reasons[node_of(3)]
    assert "JSON" in reasons[node_of(4)]
    assert "enc.9.k.lora_A.weight" in reasons[node_of(5)]
    assert "num_examples" in reasons[node_of(6)]


def test_all_rejected_keeps_global_state_and_loop_runs():
    g = lora_state()
    bad = lora_state(seed=1)
    bad["classifier.weight"][0, 0] = float("inf")
    uploads = {0: (bad, 1, {}), 1: (RuntimeError("boom"), 1, {})}
    st = strategy("fedit", 2)
    got, metrics, _ = run_round(st, g, uploads)
    assert got is None
    assert metrics["aggregation_failed"] == 1 and metrics["num_rejected"] == 2
    assert_state_close(st.global_state, g)
    # the whole server loop keeps going and reports every round
    result = st.start(
        grid=ff.LocalGrid(scripted_app(uploads), 2),
        initial_arrays=ff.to_arrayrecord(g),
        num_rounds=2,
    )
    assert set(result.train_metrics_clientapp) == {1, 2}
    assert all(m["clients_total"] == 2 for m in result.train_metrics_clientapp.values())
    assert len(result.arrays) == 0  # no round produced new arrays
    assert_state_close(st.global_state, g)


def test_aggregation_exception_is_reported():
    def broken(method, global_state, states, weights, metas):
        raise ValueError("rule exploded")

    uploads = {0: (lora_state(seed=1), 1, {}), 1: (lora_state(seed=2), 1, {})}
    st = strategy("fedit", 2, aggregate_fn=broken)
    got, metrics, _ = run_round(st, lora_state(), uploads)
    assert got is None and metrics["aggregation_failed"] == 1


def test_no_global_state_is_reported_not_raised():
    st = strategy("fedit", 2)
    grid = ff.LocalGrid(scripted_app({0: (lora_state(), 1, {}), 1: (lora_state(), 1, {})}), 2)
    probe = ff.FedLoRAStrategy("fedit", min_train_nodes=2, min_available_nodes=2)
    replies = grid.send_and_receive(
        probe.configure_train(1, ff.to_arrayrecord(lora_state()), ConfigRecord(), grid)
    )
    arrays, metrics = st.aggregate_train(1, replies)
    assert arrays is None and metrics["aggregation_failed"] == 1


def test_bf16_is_exported_as_float32():
    state = lora_state(dtype=torch.bfloat16)
    record = ff.to_arrayrecord(state)
    back = ff.from_arrayrecord(record)
    assert all(v.dtype == torch.float32 for v in back.values())
    assert_state_close(back, {k: v.float() for k, v in state.items()})
    # a bf16 client upload goes through train_reply and is aggregated
    g = lora_state()
    uploads = {0: (state, 1, {}), 1: (lora_state(seed=3), 1, {})}
    got, metrics, _ = run_round(strategy("fedit", 2), g, uploads)
    assert metrics["num_rejected"] == 0 and got is not None


# ------------------------------------------------------------------------------------- configure_train
def test_configure_train_sends_each_node_its_rank_prefix():
    g = lora_state()
    seen = {}

    def record(k):
        def reply(msg):
            state = ff.from_arrayrecord(msg.content["arrays"])
            seen[k] = (state, dict(msg.content["config"]))
            r = msg.content["config"].get("rank", R)
            return ff.train_reply(msg, state, 1, meta={"rank": r})

        return reply

    uploads = {k: (record(k), 1, {}) for k in range(3)}
    budgets = {node_of(0): {"rank": 1}, node_of(1): {"rank": 3}}  # node 2 has none: full rank
    st = strategy("hetlora", 3, budgets=budgets)
    run_round(st, g, uploads, server_round=4)
    for k, r in ((0, 1), (1, 3)):
        state, config = seen[k]
        assert config["rank"] == r and config["server-round"] == 4
        assert_state_close(state, prefix.truncate(g, r))
    state, config = seen[2]
    assert "rank" not in config
    assert_state_close(state, g)


def test_configure_train_budget_forms():
    g = lora_state()
    grid = ff.LocalGrid(scripted_app({k: (g, 1, {}) for k in range(3)}), 3)

    def shapes(st):
        msgs = st.configure_train(1, ff.to_arrayrecord(g), ConfigRecord({"lr": 0.1}), grid)
        out = {}
        for m in msgs:
            state = ff.from_arrayrecord(m.content["arrays"])
            out[m.metadata.dst_node_id] = (state["enc.0.q.lora_A.weight"].shape[0], m.content)
        return out

    # a list goes to the nodes in ascending node-id order (repeated when shorter)
    by_list = shapes(strategy("hetlora", 3, budgets=[{"rank": 1}, {"rank": 2}]))
    assert {nid: v[0] for nid, v in by_list.items()} == {1: 1, 2: 2, 3: 1}
    assert all(v[1]["config"]["lr"] == 0.1 for v in by_list.values())
    by_fn = shapes(strategy("prelort", 3, budgets=lambda nid: {"rank": nid, "heads": 2}))
    assert {nid: v[0] for nid, v in by_fn.items()} == {1: 1, 2: 2, 3: 3}
    assert all(v[1]["config"]["heads"] == 2 for v in by_fn.values())
    # FlexLoRA clients download the best rank-r factors of the global ΔW, not a prefix
    from fedlora.methods.flexlora import client_factors

    st = strategy("flexlora", 3, budgets={1: {"rank": 2}})
    msgs = st.configure_train(1, ff.to_arrayrecord(g), ConfigRecord(), grid)
    (msg,) = [m for m in msgs if m.metadata.dst_node_id == 1]
    assert_state_close(ff.from_arrayrecord(msg.content["arrays"]), client_factors(g, 2), atol=1e-5)
    # payload_fn overrides the download
    st = strategy(
        "fedit", 3, payload_fn=lambda nid, state, budget: {k: v * nid for k, v in state.items()}
    )
    for m in st.configure_train(1, ff.to_arrayrecord(g), ConfigRecord(), grid):
        nid = m.metadata.dst_node_id
        assert_state_close(
            ff.from_arrayrecord(m.content["arrays"]), {k: v * nid for k, v in g.items()}
        )
    # without budgets every node gets the same payload (FedAvg's behaviour)
    plain = shapes(strategy("fedit", 3))
    assert {v[0] for v in plain.values()} == {R}


def test_strategy_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        ff.FedLoRAStrategy("fedsgd")
    with pytest.raises(TypeError, match="budgets"):
        ff.FedLoRAStrategy("fedit", budgets=3)
    with pytest.raises(TypeError, match="payload_fn"):
        ff.FedLoRAStrategy("fedit", payload_fn="x")
    st = strategy("hetlora", 1, budgets={1: {"rank": {"nested": 1}}})
    grid = ff.LocalGrid(scripted_app({0: (lora_state(), 1, {})}), 1)
    with pytest.raises(TypeError, match="budget entry 'rank'"):
        st.configure_train(1, ff.to_arrayrecord(lora_state()), ConfigRecord(), grid)


# ------------------------------------------------------------------------------------- legacy API
def test_legacy_aggregate_fit_matches_aggregate():
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.compat.grid_client_proxy import GridClientProxy

    g = lora_state()
    keys = list(g)
    clients = [prefix.truncate(lora_state(seed=s), r) for s, r in ((1, 2), (2, 4), (3, 3))]
    clients[2]["enc.0.q.lora_A.weight"][0, 0] = float("nan")
    weights = [5, 15, 10]
    st = ff.FedLoRALegacyStrategy("hetlora", keys, initial_state=g)
    grid = ff.LocalGrid(ClientApp(), 3)
    results = []
    for k, (state, w) in enumerate(zip(clients, weights, strict=True)):
        params = ndarrays_to_parameters(ff.state_to_ndarrays(state, keys))
        meta = json.dumps({"rank": int(state["enc.0.q.lora_A.weight"].shape[0])})
        fit = FitRes(Status(Code.OK, ""), params, w, {ff.META_KEY: meta})
        results.append((GridClientProxy(node_of(k), grid, 1), fit))
    # the initial parameters are the global state in the fixed key order
    init = ff.ndarrays_to_state(parameters_to_ndarrays(st.initialize_parameters(None)), keys)
    assert_state_close(init, g)
    params, metrics = st.aggregate_fit(1, results, [])
    got = ff.ndarrays_to_state(parameters_to_ndarrays(params), keys)
    want, _ = fedlora.aggregate("hetlora", g, clients[:2], weights[:2], [{"rank": 2}, {"rank": 4}])
    assert_state_close(got, want)
    assert metrics["num_rejected"] == 1 and metrics["clients_used"] == 2
    assert json.loads(metrics["rejected"])[0][0] == str(node_of(2))
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())
    # a round where every client fails changes nothing
    params, metrics = st.aggregate_fit(2, [], [RuntimeError("lost")])
    assert params is None and metrics["aggregation_failed"] == 1


# ------------------------------------------------------------------------------------- helpers
def test_meta_codec_round_trip():
    meta = {
        "rank": 4,
        "heads": {"enc.0.q": [0, 2], "enc.1.v": [1]},
        "scores": torch.tensor([0.5, 0.25]),
        "name": "x",
        "flags": [True, False],
        "none": None,
    }
    enc = ff.encode_meta(meta)
    ConfigRecord(enc)  # a valid ConfigRecord
    dec = ff.decode_meta(ConfigRecord(enc))
    assert dec["rank"] == 4 and dec["heads"] == meta["heads"] and dec["scores"] == [0.5, 0.25]
    assert dec["name"] == "x" and dec["flags"] == [True, False] and dec["none"] is None
    assert ff.decode_meta(None) == {} and ff.encode_meta(None) == {}
    with pytest.raises(ValueError, match="JSON"):
        ff.decode_meta({"x": "{", "fedlora.json-keys": ["x"]})
    with pytest.raises(TypeError, match="meta"):
        ff.encode_meta([1, 2])
    with pytest.raises(ValueError, match="meta keys"):
        ff.encode_meta({"fedlora.json-keys": 1})


def test_ndarray_codec_and_bad_input():
    g = lora_state()
    keys = sorted(g)
    arrays = ff.state_to_ndarrays(g, keys)
    assert [a.shape for a in arrays] == [tuple(g[k].shape) for k in keys]
    assert_state_close(ff.ndarrays_to_state(arrays, keys), g)
    with pytest.raises(ValueError, match="key order"):
        ff.ndarrays_to_state(arrays[:-1], keys)
    with pytest.raises(KeyError):
        ff.state_to_ndarrays(g, [*keys, "missing"])
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        ff.to_float32({"a": [1.0]})
    with pytest.raises(TypeError, match="ArrayRecord"):
        ff.from_arrayrecord({"a": torch.ones(1)})
    with pytest.raises(ValueError, match="dtype"):
        ff.to_arrayrecord(g, dtype=torch.bfloat16)
    # a model with adapter layers is read through get_adapter_state_dict
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, D_OUT))
    fedlora.inject(model, "fedit", target_modules=["0"], rank=2)
    record = ff.to_arrayrecord(model)
    assert isinstance(record, ArrayRecord) and set(record) == {"0.lora_A.weight", "0.lora_B.weight"}


def test_fedlora_flower_imports_without_flwr():
    code = (
        "import sys; sys.modules['flwr'] = None\n"
        "import fedlora, fedlora.flower as ff\n"
        "assert ff.decode_meta(ff.encode_meta({'a': {'b': 1}})) == {'a': {'b': 1}}\n"
        "try:\n    ff.FedLoRAStrategy\nexcept ImportError as e:\n    print('IMPORT-ERROR', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR" in out.stdout and "flwr" in out.stdout


# ------------------------------------------------------------------------------------- the example
def _example():
    sys.path.insert(0, str(ROOT / "examples" / "flower"))
    try:
        from fedlora_flower import local
    finally:
        sys.path.pop(0)
    return local


SMALL = {
    "num-server-rounds": 2,
    "local-steps": 2,
    "batch-size": 8,
    "max-length": 32,
    "max-train-per-client": 12,
    "max-test": 24,
    "lr": 0.01,
}


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "hetlora", "client-ranks": "2,4"},
        {"method": "ravan", "rank": 2, "heads": 3, "client-heads": "1,2"},
    ],
    ids=["hetlora", "ravan"],
)
def test_example_server_and_client_apps_run_two_rounds(tiny_bert_dir, overrides, capsys):
    """The example's ServerApp and ClientApp objects, two rounds, through LocalGrid (no Ray)."""
    local = _example()
    context = local.run(2, {**SMALL, "model-path": tiny_bert_dir, **overrides})
    accuracies = context.state["result"]["test_accuracy"]
    assert len(accuracies) == 3 and all(0.0 <= a <= 1.0 for a in accuracies)
    printed = capsys.readouterr().out
    assert "round 2:" in printed and "rejected 0" in printed


@pytest.mark.slow
def test_example_on_the_embedded_default_model(capsys):
    """The example as shipped: the embedded all-MiniLM-L6-v2, two rounds, two nodes."""
    pytest.importorskip("transformers")
    try:
        from fedlora.models import default_model_path

        default_model_path()
    except ImportError as err:
        pytest.skip(str(err))
    local = _example()
    overrides = {
        **SMALL,
        "local-steps": 1,
        "batch-size": 2,
        "max-length": 16,
        "max-test": 4,
        "max-train-per-client": 6,
    }
    context = local.run(2, overrides)
    assert len(context.state["result"]["test_accuracy"]) == 3
    assert "round 2:" in capsys.readouterr().out


def test_example_refuses_unknown_config():
    local = _example()
    with pytest.raises(ValueError, match="unknown run-config"):
        local.run_config({"num-rounds": 3})


# ------------------------------------------------------------------------------------- budgets
def test_budget_helpers_read_the_node_config():
    assert ff.node_budget({"partition-id": 0, "budget-rank": 4, "budget-heads": "2"}) == {
        "rank": 4,
        "heads": 2,
    }
    assert ff.node_budget({"partition-id": 0}) == {}
    # the node's own entries win over what the server sent
    assert ff.client_budget({"budget-rank": 2}, {"rank": 4, "heads": 3, "lr": 0.1}) == {
        "rank": 2,
        "heads": 3,
    }
    with pytest.raises(ValueError, match="budget-rank"):
        ff.node_budget({"budget-rank": 0})
    with pytest.raises(ValueError, match="unknown entries"):
        ff.check_budget({"rnak": 2})
    assert set(ff.NODE_CONFIG_KEYS.values()) == {
        "budget-rank",
        "budget-heads",
        "budget-components",
        "budget-steps",
    }


def declaring_app(seen: dict) -> ClientApp:
    """A ClientApp that records its download's rank and replies with it, declaring the budget of
    its node config."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        state = ff.from_arrayrecord(msg.content["arrays"])
        rank = prefix.state_rank(state)
        server_round = int(msg.content["config"]["server-round"])
        seen[(server_round, context.node_id)] = rank
        budget = ff.node_budget(context.node_config)
        return ff.train_reply(msg, state, 1, meta={"rank": rank}, budget=budget)

    return app


def test_declared_budgets_replace_the_positional_fallback():
    """Random node ids, positional budgets the wrong way round: round 1 follows the positional
    list, from round 2 on every node downloads the rank its node config declares."""
    seen: dict = {}
    ids = [9_876_543_210_123, 42]  # a deployment's ids are random; ascending order is 42 first
    grid = ff.LocalGrid(
        declaring_app(seen),
        2,
        node_configs=[{"budget-rank": 1}, {"budget-rank": 3}],
        node_ids=ids,
    )
    st = strategy("hetlora", 2, budgets=[{"rank": 2}, {"rank": 4}])
    st.start(grid=grid, initial_arrays=ff.to_arrayrecord(lora_state()), num_rounds=2)
    assert seen[(1, 42)] == 2 and seen[(1, ids[0])] == 4  # positional: ascending node id
    assert seen[(2, ids[0])] == 1 and seen[(2, 42)] == 3  # declared by the nodes
    assert st.declared_budgets == {ids[0]: {"rank": 1}, 42: {"rank": 3}}
    assert st.budget_of(42) == {"rank": 3}


def test_a_malformed_budget_record_rejects_only_that_reply():
    g = lora_state()

    def bad_budget(msg):
        reply = ff.train_reply(msg, g, 1)
        reply.content[ff.BUDGET_KEY] = ConfigRecord({"rank": -1})
        return reply

    uploads = {0: (g, 1, {}), 1: (bad_budget, 1, {})}
    st = strategy("fedit", 2)
    got, metrics, _ = run_round(st, g, uploads)
    assert got is not None and metrics["rejected"] == [node_of(1)]
    assert "fedlora-budget" in dict(st.last_rejections)[node_of(1)]
    assert st.declared_budgets == {}
    with pytest.raises(ValueError, match="rank"):
        ff.train_reply(
            Message(RecordDict(), dst_node_id=1, message_type="train"), g, 1, budget={"rank": 0}
        )


# ------------------------------------------------------------------------------------- every method
def _adapter_changed(method: str, initial: dict, final: dict) -> list[str]:
    """Keys of trained factors that moved away from their initial value (LoRA ``B``, Ravan
    ``H``, FLoRA's merged stack); empty when nothing trained."""
    if method == "flora":  # the adapter restarts every round; the training is in the merges
        return [k for k in final if k.endswith(".lora_merge_B") and final[k].abs().max() > 0]
    suffix = ".lora_H" if fedlora.methods.get(method).layer == "ravan" else ".lora_B.weight"
    return [
        k
        for k in final
        if k.endswith(suffix) and k in initial and not torch.equal(final[k], initial[k])
    ]


@pytest.mark.parametrize("method", fedlora.methods.names())
def test_every_method_trains_two_rounds_over_flower(tiny_bert_dir, method, tmp_path):
    """Each registered method, 2 rounds through FedLoRAStrategy + LocalGrid + the example's
    ClientApp (the method's own client side): every update used, and the adapters train
    (FlexLoRA's round-1 download used to be A = 0, B = 0 for every client)."""
    local = _example()
    from fedlora_flower.task import initial_state, sim_config

    overrides = {
        **SMALL,
        "model-path": tiny_bert_dir,
        "method": method,
        "rank": 4,
        "heads": 3,
        "result-file": str(tmp_path / "result.pt"),
    }
    if fedlora.methods.get(method).layer == "ravan":
        overrides.update(rank=2, **{"client-heads": "1,2"})
    nodes = [{"budget-rank": 2, "budget-components": 2}, {"budget-rank": 4}]
    local.run(2, overrides, node_configs=nodes)
    saved = torch.load(tmp_path / "result.pt", weights_only=False)
    for rnd in (1, 2):
        metrics = saved["train_metrics"][rnd]
        assert metrics["clients_used"] == 2 and metrics["num_rejected"] == 0, metrics
        assert math.isfinite(metrics["train_loss"])
    final = saved["global_state"]
    assert all(torch.isfinite(v).all() for v in final.values())
    initial = initial_state(sim_config(local.run_config(overrides), 2))
    assert _adapter_changed(method, initial, final), f"{method}: no adapter trained"
    assert saved["declared_budgets"] == {1: {"rank": 2, "components": 2}, 2: {"rank": 4}}


def test_run_config_carries_method_options_and_training_knobs(tiny_bert_dir):
    """Method options and training knobs are run-config keys, checked against the method:
    one the method does not take is refused naming it, an unknown key too."""
    local = _example()
    from fedlora_flower.task import sim_config

    base = {**SMALL, "model-path": tiny_bert_dir}
    cfg = sim_config(local.run_config({**base, "method": "hetlora", "hetlora-prune": True,
                                       "hetlora-prune-gamma": 0.5, "lr-scheduler": "cosine",
                                       "grad-accum": 2}), 2)  # fmt: skip
    values = cfg.option_values()
    assert values["hetlora_prune"] is True and values["hetlora_prune_gamma"] == 0.5
    assert cfg.lr_scheduler == "cosine" and cfg.grad_accum == 2
    assert cfg.label() == "hetlora (hetlora_prune=True, hetlora_prune_gamma=0.5)"
    with pytest.raises(ValueError, match="hetlora-prune"):
        sim_config(local.run_config({**base, "method": "fedit", "hetlora-prune": True}), 2)
    with pytest.raises(ValueError, match="unknown run-config key 'no-such-key'"):
        sim_config({**local.run_config(base), "no-such-key": 1}, 2)


def test_from_arrayrecord_reads_every_npy_layout_like_flower():
    """The in-place decoder equals Flower's own ``Array.numpy()`` for every layout it may get:
    C and Fortran order, big-endian, integer, 0-d and empty arrays (the unusual ones through
    the fallback)."""
    import numpy as np
    from flwr.app import Array

    arrays = {
        "c": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f64": np.linspace(0, 1, 6).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "big": np.arange(5, dtype=">f4"),
        "int": np.arange(4, dtype=np.int64),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    got = ff.from_arrayrecord(record)
    for k, v in arrays.items():
        want = torch.from_numpy(v.astype(v.dtype.newbyteorder("="), order="C"))
        want = want.float() if want.is_floating_point() else want
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
        got[k].add_(1)  # writable, owns its memory


# ------------------------------------------------------------------------------------- refusals
def _configured(st, g, uploads, num_nodes=None, server_round=1):
    """configure_train on a grid of ``num_nodes`` (default: every upload's node), then the
    replies of the nodes of ``uploads`` (asked or not); returns ``(grid, messages, replies)``."""
    n = num_nodes or len(uploads)
    grid = ff.LocalGrid(scripted_app(uploads), n)
    messages = list(st.configure_train(server_round, ff.to_arrayrecord(g), ConfigRecord(), grid))
    return grid, messages, grid.send_and_receive(messages)


def test_reply_from_a_node_not_asked_this_round_is_refused():
    g = lora_state()
    clients = {k: (lora_state(seed=k + 1), 10, {}) for k in range(3)}
    st = strategy("fedit", 2)
    _, _, replies = _configured(st, g, {0: clients[0], 1: clients[1]})
    # node 3 was never sent a train message this round: its reply is someone else's grid's
    other = strategy("fedit", 3)
    _, _, extra = _configured(other, g, clients)
    intruder = [m for m in extra if m.metadata.src_node_id == node_of(2)]
    arrays, metrics = st.aggregate_train(1, replies + intruder)
    want, _ = fedlora.aggregate("fedit", g, [clients[0][0], clients[1][0]], [10, 10])
    assert_state_close(ff.from_arrayrecord(arrays), want)
    assert metrics["rejected"] == [node_of(2)] and metrics["clients_used"] == 2
    assert "not asked" in dict(st.last_rejections)[node_of(2)]


def test_second_reply_of_a_node_is_refused():
    g = lora_state()
    uploads = {k: (lora_state(seed=k + 1), 10, {}) for k in range(2)}
    st = strategy("fedit", 2)
    _, _, replies = _configured(st, g, uploads)
    twice = [m for m in replies if m.metadata.src_node_id == node_of(1)]
    arrays, metrics = st.aggregate_train(1, replies + twice)
    want, _ = fedlora.aggregate("fedit", g, [uploads[0][0], uploads[1][0]], [10, 10])
    assert_state_close(ff.from_arrayrecord(arrays), want)  # counted once
    assert metrics["rejected"] == [node_of(1)] and metrics["clients_used"] == 2
    assert "second reply" in dict(st.last_rejections)[node_of(1)]


def test_upload_above_the_assigned_budget_is_refused():
    g = lora_state()
    # node 0 is assigned rank 2 but uploads rank 4; node 1 (rank 4) uploads rank 4
    uploads = {0: (lora_state(seed=1), 10, {"rank": R}), 1: (lora_state(seed=2), 10, {"rank": R})}
    st = strategy("hetlora", 2, budgets={node_of(0): {"rank": 2}})
    _, _, replies = _configured(st, g, uploads)
    arrays, metrics = st.aggregate_train(1, replies)
    want, _ = fedlora.aggregate("hetlora", g, [uploads[1][0]], [10], [{"rank": R}])
    assert_state_close(ff.from_arrayrecord(arrays), want)
    assert metrics["rejected"] == [node_of(0)]
    why = dict(st.last_rejections)[node_of(0)]
    assert "over budget" in why and "rank 4" in why and "budget 2" in why


def test_upload_above_the_declared_budget_is_refused():
    """A node that declared rank 1 is held to it from the next round on."""
    g = lora_state()
    seen: dict = {}
    st = strategy("hetlora", 2)
    grid = ff.LocalGrid(declaring_app(seen), 2, node_configs=[{"budget-rank": 1}, {}])
    # round 1: node 1 downloads (and uploads) the full rank, declaring rank 1 for later
    messages = st.configure_train(1, ff.to_arrayrecord(g), ConfigRecord(), grid)
    _, metrics = st.aggregate_train(1, grid.send_and_receive(messages))
    assert metrics["num_rejected"] == 0 and st.declared_budgets[node_of(0)] == {"rank": 1}
    # round 2: it is sent rank 1; a reply with rank R is refused, its rank-1 download is not
    messages = list(st.configure_train(2, ff.to_arrayrecord(st.global_state), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    assert seen[(2, node_of(0))] == 1
    big = ff.train_reply(
        next(m for m in messages if m.metadata.dst_node_id == node_of(0)),
        g,
        1,
        meta={"rank": R},
        budget={"rank": 1},
    )
    honest = [m for m in replies if m.metadata.src_node_id != node_of(0)]
    _, metrics = st.aggregate_train(2, [*honest, big])
    assert metrics["rejected"] == [node_of(0)]
    assert "budget 1" in dict(st.last_rejections)[node_of(0)]


def test_hafl_truncation_hands_back_the_scores_in_the_train_config():
    """Round 2's train config carries the server's averaged scores (JSON) and the download
    is the top components by them, not the rank prefix [0, 1]."""
    g = lora_state()
    meta = {
        "indices": {p: [0, 1, 2, 3] for p in PATHS},
        "scores": {p: [0.0, 1.0, 5.0, 9.0] for p in PATHS},
    }
    options = fedlora.methods.ClientOptions(rank=R, hafl_mode="truncate")
    st = strategy("hafl", 1, client_options=options)
    got, metrics, _ = run_round(st, g, {0: (g, 1, meta)})  # round 1: full rank
    assert metrics["num_rejected"] == 0 and got is not None
    first = _configured(st, got, {0: (g, 1, meta)}, server_round=1)[1]
    assert ff.HANDBACK_KEY in first[0].content["config"]  # from now on: the scores
    st.budgets = {node_of(0): {"rank": 2}}  # node 0 holds 2 components from round 2 on
    grid = ff.LocalGrid(scripted_app({0: (g, 1, meta)}), 1)
    messages = list(st.configure_train(2, ff.to_arrayrecord(got), ConfigRecord(), grid))
    config = messages[0].content["config"]
    assert ff.decode_handback(config)["scores"]["enc.0.q"] == [0.0, 1.0, 5.0, 9.0]
    state = ff.from_arrayrecord(messages[0].content["arrays"])
    for p in PATHS:
        want = got[f"{p}.lora_A.weight"][[2, 3]]
        torch.testing.assert_close(state[f"{p}.lora_A.weight"], want)
        assert not torch.equal(state[f"{p}.lora_A.weight"], got[f"{p}.lora_A.weight"][[0, 1]])
    with pytest.raises(ValueError, match="fedlora-handback"):
        ff.decode_handback({ff.HANDBACK_KEY: "{oops"})
    assert ff.decode_handback({}) is None


def test_every_client_failing_is_one_line_not_nan(tiny_llm_dir, capsys):
    """The LLM app, every ClientApp failing (a node config budget of 0): each round is
    reported in one line naming why, the global adapter is unchanged, no ``nan``."""
    local = _example()
    overrides = {
        "task": "sft",
        "model-path": tiny_llm_dir,
        "num-server-rounds": 1,
        "local-steps": 1,
        "batch-size": 2,
        "max-length": 48,
        "max-train-per-client": 4,
        "max-test": 2,
        "max-generate": 1,
        "max-new-tokens": 2,
    }
    local.run(2, overrides, node_configs=[{"budget-rank": 0}, {"budget-rank": 0}])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("round 1")]
    assert lines == ["round 1: no usable client reply (2 rejected); global adapter unchanged"]
    assert "nan" not in out


LLM_SMALL = {
    "task": "sft",
    "num-server-rounds": 2,
    "rank": 4,
    "local-steps": 2,
    "batch-size": 4,
    "max-length": 48,
    "max-train-per-client": 12,
    "max-test": 4,
    "max-generate": 2,
    "max-new-tokens": 4,
}


@pytest.mark.parametrize(
    "method,extra",
    [
        ("ffa", {}),
        ("hetlora", {"client-ranks": "2,4"}),
        ("flexlora", {"client-ranks": "2,4"}),
        ("florana", {}),
        ("hafl", {"hafl-mode": "freeze"}),
    ],
)
def test_llm_app_two_rounds(tiny_llm_dir, method, extra, tmp_path):
    """The LLM app (task sft) with the methods the parity tests (test_flower_parity.py) do not
    run: 2 rounds over Flower, every update used, ROUGE-L / exact match / perplexity on the
    server, the final adapter saved as safetensors."""
    local = _example()
    from safetensors.torch import load_file

    out = tmp_path / "out"
    overrides = {**LLM_SMALL, **extra, "method": method, "model-path": tiny_llm_dir}
    overrides["result-dir"] = str(out)
    nodes = [{"budget-rank": 2, "budget-components": 2}, {"budget-rank": 4}]
    context = local.run(2, overrides, node_configs=nodes)
    assert len(context.state["result"]["rouge_l"]) == 3
    report = json.loads((out / "metrics.json").read_text())
    for rnd in ("1", "2"):
        assert report["train"][rnd]["clients_used"] == 2, report["train"][rnd]
        assert report["train"][rnd]["num_rejected"] == 0
    assert {"rouge_l", "exact_match", "test_perplexity"} <= set(report["evaluate"][-1])
    adapter = load_file(str(out / "adapter.safetensors"))
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
