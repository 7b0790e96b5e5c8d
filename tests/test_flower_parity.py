"""A method gives the same numbers through ``fedlora simulate``, ``fedlora.local`` and Flower.

Three ways to run the same 2 rounds of 2 clients on a tiny random LLaMA (instruction tuning,
the ``sft`` task), same seed:

1. ``fedlora.simulate.run`` with the sequential engine (one shared model, clients in turn);
2. a hand-written loop over the public layer, as any FL framework would write it: a
   :class:`fedlora.rounds.Server` and, per client and round, a fresh model from
   :func:`fedlora.simulate.setup_run` trained by :class:`fedlora.local.LocalClient`;
3. the Flower example's ServerApp and ClientApp (``examples/flower``) through
   :class:`fedlora.flower.LocalGrid` (real Flower messages, records and codecs).

The final global states are compared with ``torch.equal``: every path draws the same batches
(:func:`fedlora.local.sample_batches`), the same seeds (:func:`fedlora.local.client_seed`), runs
the same hooks in the same order and sums the clients in the same order (float32 on the wire
loses nothing: the adapters are float32). FLoRA and FedEx-LoRA fold the server's merges into the
frozen base: the simulator adds each round's ``B_t A_t`` to its shared base in turn, a fresh
Flower client adds the accumulated ``[B_1 B_2][A_1; A_2]`` in one product, so their effective
weights agree up to float32 rounding of one extra sum per element: ``rtol = 8 eps(float32)``
plus ``atol = 8 eps · max|W|`` (a few ulps of the largest weight).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("transformers")

import fedlora
from fedlora import rounds
from fedlora.local import LocalClient, client_seed, sample_batches
from fedlora.simulate import setup_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flower"

#: method -> extra run config (budgets: node 0 and node 1, as fallback and as node config)
CASES = {
    "fedit": {},
    "prelort": {"client-ranks": "2,4"},
    "ravan": {"rank": 2, "heads": 2, "client-heads": "1,2"},
    "hafl": {"hafl-mode": "truncate", "client-ranks": "2,4"},
    "flora": {},
    "fedex": {},
}
NODES = {
    "prelort": [{"budget-rank": 2}, {"budget-rank": 4}],
    "ravan": [{"budget-heads": 1}, {"budget-heads": 2}],
    "hafl": [{"budget-rank": 2}, {"budget-rank": 4}],
}
BASE_SUFFIX = ".base_layer.weight"


def _example():
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    from fedlora_flower import local, task

    return local, task


def run_config(method: str, model_path: str, **extra) -> dict:
    local, _ = _example()
    return local.run_config(
        {
            "task": "sft",
            "method": method,
            "model-path": model_path,
            "num-server-rounds": 2,
            "rank": 4,
            "local-steps": 2,
            "batch-size": 4,
            "max-length": 48,
            "max-train-per-client": 12,
            "max-test": 4,
            "max-generate": 0,
            **CASES[method],
            **extra,
        }
    )


def sim_cfg(config: dict):
    _, task = _example()
    cfg = task.sim_config(config, 2)
    return dataclasses.replace(cfg, rounds=2, engine="sequential")


# ------------------------------------------------------------------------------------- the paths
def via_simulate(cfg, out: Path) -> tuple[dict, dict]:
    """``fedlora simulate --engine sequential``: the final global state, and the frozen base
    weights the run changed (FLoRA, FedEx-LoRA; from its checkpoint)."""
    from fedlora.simulate.outputs import CKPT, read_checkpoint

    result = fedlora.simulate.run(cfg, out, progress=False, log=lambda line: None, plot=False)
    tensors, _ = read_checkpoint(out / CKPT)
    return result.global_state, {k: v for k, v in tensors.items() if k.endswith(BASE_SUFFIX)}


def via_local(cfg) -> dict:
    """The public layer as an FL framework drives it: Server + LocalClient on fresh models."""
    import copy

    s = setup_run(cfg, log=lambda line: None, num_slots=1)
    budgets = dict(enumerate(s.budgets))
    server = rounds.Server(
        cfg.method,
        fedlora.get_adapter_state_dict(s.model, slot=0),
        options=cfg.client_options(),
        budgets=budgets,
        seed=cfg.seed,
        error=True,
    )
    for r in range(cfg.rounds):
        downloads = server.configure(r, server.sample(r, range(cfg.clients)))
        replies = []
        for k, d in downloads.items():
            model = copy.deepcopy(s.model)
            side = s.method.client(cfg.client_options(), s.budgets)
            side.setup(model)
            client = LocalClient(cfg.method, model, loss=s.task, lr=cfg.lr, side=side)
            steps = side.pre_steps(d.budget) + d.budget.steps
            batches = sample_batches(s.parts[k], cfg.batch_size, steps, cfg.seed, r, k)
            res = client.train(
                d.state,
                d.budget,
                [s.train.take(b) for b in batches],
                seed=client_seed(cfg.seed, r, k),
                round_idx=r,
                client=k,
                num_examples=int(s.weights[k]),
                handback=d.handback,
            )
            replies.append(rounds.Reply(k, res.state, res.num_examples, res.meta))
        previous = server.global_state
        out = server.aggregate(r, replies)
        assert out.state is not None, out.error
        if s.method.changes_base:
            server.global_state = rounds.accumulate_base_merges(previous, out.state)
    return server.global_state


def via_flower(config: dict, method: str, tmp_path: Path) -> dict:
    local, _ = _example()
    path = tmp_path / f"{method}.pt"
    local.run(2, {**config, "result-file": str(path)}, node_configs=NODES.get(method))
    saved = torch.load(path, weights_only=False)
    for rnd in (1, 2):
        metrics = saved["train_metrics"][rnd]
        assert metrics["clients_used"] == 2 and metrics["num_rejected"] == 0, metrics
    return saved["global_state"]


def effective_bases(model_or_cfg, state: dict) -> dict[str, torch.Tensor]:
    """The frozen base weights after ``state``'s merges are folded into a fresh model."""
    import copy

    model = copy.deepcopy(model_or_cfg)
    fedlora.apply_base_merges(model, dict(state))
    return {
        f"{p}{BASE_SUFFIX}": m.base_layer.weight.detach().clone()
        for p, m in fedlora.adapter_layers(model)
    }


def assert_equal_states(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: keys differ {sorted(set(got) ^ set(want))[:4]}"
    for k in want:
        assert torch.equal(got[k].float(), want[k].float()), f"{what}: {k} differs"


# ------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("method", ["fedit", "prelort", "ravan", "hafl"])
def test_same_global_state_bitwise(tiny_llm_dir, method, tmp_path):
    config = run_config(method, tiny_llm_dir)
    cfg = sim_cfg(config)
    sim, _ = via_simulate(cfg, tmp_path / "sim")
    local = via_local(cfg)
    flower = via_flower(config, method, tmp_path)
    initial = fedlora.get_adapter_state_dict(setup_run(cfg, log=lambda x: None, num_slots=1).model)
    assert any(not torch.equal(sim[k], initial[k]) for k in sim), "nothing trained"
    assert_equal_states(local, sim, "fedlora.local vs simulate")
    assert_equal_states(flower, sim, "Flower vs simulate")


@pytest.mark.parametrize("method", ["flora", "fedex"])
def test_base_merging_methods_agree_to_rounding(tiny_llm_dir, method, tmp_path):
    config = run_config(method, tiny_llm_dir)
    cfg = sim_cfg(config)
    sim, sim_bases = via_simulate(cfg, tmp_path / "sim")
    pristine = setup_run(cfg, log=lambda x: None, num_slots=1).model
    eps = torch.finfo(torch.float32).eps
    for what, state in (
        ("fedlora.local", via_local(cfg)),
        ("Flower", via_flower(config, method, tmp_path)),
    ):
        bases = effective_bases(pristine, state)
        assert set(bases) == set(sim_bases)
        moved = False
        for k, want in sim_bases.items():
            scale = float(want.abs().max())
            torch.testing.assert_close(
                bases[k], want, rtol=8 * eps, atol=8 * eps * scale, msg=f"{what}: {k}"
            )
            moved |= not torch.equal(want, effective_bases(pristine, {})[k])
        assert moved, "no base weight changed"
        adapters = {k: v for k, v in state.items() if k in sim}
        assert_equal_states(adapters, sim, f"{what} adapters")


def test_hafl_truncation_round2_download_follows_the_server_scores(
    tiny_llm_dir, tmp_path, monkeypatch
):
    """HAFL truncation over Flower: the round-2 download of each node and the indices of its
    round-2 upload equal the simulator's (the server's averaged scores, not the prefix)."""
    config = run_config("hafl", tiny_llm_dir)
    cfg = sim_cfg(config)
    downloads: dict[str, dict] = {"sim": {}, "flower": {}}
    uploads: dict[str, dict] = {"sim": {}, "flower": {}}
    where = {"now": "sim"}
    real_configure, real_aggregate = rounds.Server.configure, rounds.Server.aggregate

    def configure(self, round_idx, clients):
        out = real_configure(self, round_idx, clients)
        for order, (_c, d) in enumerate(sorted(out.items())):
            downloads[where["now"]][(round_idx, order)] = d.state
        return out

    def aggregate(self, round_idx, replies):
        for order, reply in enumerate(sorted(replies, key=lambda r: r.client)):
            uploads[where["now"]][(round_idx, order)] = reply.meta
        return real_aggregate(self, round_idx, replies)

    monkeypatch.setattr(rounds.Server, "configure", configure)
    monkeypatch.setattr(rounds.Server, "aggregate", aggregate)
    via_simulate(cfg, tmp_path / "sim")
    where["now"] = "flower"
    via_flower(config, "hafl", tmp_path)
    for key, want in downloads["sim"].items():
        assert_equal_states(downloads["flower"][key], want, f"download {key}")
    # round 2 follows the scores: node 0 (rank 2) holds the top 2 components, not [0, 1]
    round2 = uploads["flower"][(1, 0)]["indices"]
    assert round2 == uploads["sim"][(1, 0)]["indices"]
    assert any(idx != [0, 1] for idx in round2.values()), round2
    assert uploads["flower"][(0, 0)]["indices"] == uploads["sim"][(0, 0)]["indices"]


def test_training_knobs_and_method_options_reach_the_flower_client(tiny_llm_dir, tmp_path):
    """Run-config training knobs and method options (a cosine schedule with warmup, gradient
    accumulation and clipping, PreLort's sampled truncation) give the Flower run exactly the
    simulator's global state, which differs from the run without them (they took effect)."""
    knobs = {"lr-scheduler": "cosine", "warmup-steps": 1, "grad-accum": 2, "max-grad-norm": 0.5,
             "prelort-training": "sampled"}  # fmt: skip
    config = run_config("prelort", tiny_llm_dir, **knobs)
    cfg = sim_cfg(config)
    assert cfg.grad_accum == 2 and cfg.option_values()["prelort_training"] == "sampled"
    sim, _ = via_simulate(cfg, tmp_path / "sim")
    plain, _ = via_simulate(sim_cfg(run_config("prelort", tiny_llm_dir)), tmp_path / "plain")
    assert any(not torch.equal(sim[k], plain[k]) for k in sim), "the knobs changed nothing"
    assert_equal_states(via_flower(config, "prelort", tmp_path), sim, "Flower vs simulate")
