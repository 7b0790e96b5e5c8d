"""Utility under client-level DP (fedlora.privacy) on a synthetic federated task, per method.

A library-level round loop (the methods' own client sides on an injected one-layer model; the
``fedlora simulate`` / ``fedlora.rounds`` integration of DP is pending, issue 23): N clients with
non-IID linear-regression data ``y = (W0 + ΔW*) x + noise`` (``ΔW*`` of rank 4, each client's
inputs shifted by its own mean), a frozen ``W0`` and a rank-4 adapter (Ravan: 4 heads of rank 2)
learning ``ΔW*``. Each round samples ``m`` of the ``N`` clients (``q = m/N``); clients have
heterogeneous budgets (ranks 1/2/4, heads 1/2/4) for the methods that read them. Non-private
rounds use :func:`fedlora.aggregate` with example-count weights; DP rounds clip each update
(:func:`fedlora.privacy.clip_update`) and aggregate with :func:`fedlora.privacy.private_aggregate`
at the noise multiplier that reaches the target ε after all rounds (RDP accountant, δ = 1e-5,
``expected`` denominators from the population's budgets).

Reported: the test MSE after the last round relative to the MSE of the initial (zero-update)
adapter, lower is better (1.0 = learned nothing). Usage::

    python bench/privacy_utility.py [--rounds 20 --clients 500 --per-round 50]
        [--eps 1 4 8] [--methods fedit ffa ...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

try:
    import fedlora
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_api"))
    import fedlora

from fedlora import privacy
from fedlora.methods import Budget, ClientOptions, get

D, RANK, HEADS, HEAD_RANK, STEPS = 16, 4, 4, 2, 5
METHODS = ("fedit", "ffa", "hetlora", "prelort", "flexlora", "ravan", "hafl")
OPTIONS = {"hetlora": {"weighting": "data"}}  # aggregate options (both runs)
CLIENT_OPTIONS = {"ravan": {"head_score": "random"}, "hafl": {"hafl_mode": "truncate"}}


def make_task(clients: int, per_client: int, seed: int) -> dict:
    """The population's data: ``W0``, ``ΔW*`` and per client ``(x, y)``; a held-out test set."""
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(D, D, generator=gen) / math.sqrt(D)
    target = torch.randn(D, RANK, generator=gen) @ torch.randn(RANK, D, generator=gen) / D
    data = []
    for _ in range(clients):
        shift = torch.randn(D, generator=gen)
        x = torch.randn(per_client, D, generator=gen) + shift
        y = x @ (W0 + target).T + 0.1 * torch.randn(per_client, D, generator=gen)
        data.append((x, y))
    xt = torch.randn(2000, D, generator=gen) + torch.randn(2000, D, generator=gen)
    return {"W0": W0, "data": data, "test": (xt, xt @ (W0 + target).T)}


def budgets_for(clients: int) -> list[Budget]:
    """Heterogeneous budgets, cycling: rank 1/2/4, heads 1/2/4 (equal-rank methods ignore them)."""
    levels = [(1, 1), (2, 2), (4, 4)]
    return [
        Budget(rank=r, heads=h, components=r, steps=STEPS)
        for r, h in (levels[i % 3] for i in range(clients))
    ]


def run(
    method: str,
    eps: float | None,
    task: dict,
    *,
    rounds: int,
    per_round: int,
    clip: float,
    lr: float,
    seed: int = 0,
    noise_multiplier: float | None = None,
    track_epsilon: bool = True,
) -> dict:
    """One federated run; ``eps=None`` is the non-private baseline, unless ``noise_multiplier``
    is given (then DP at that ``z``, whatever ε it spends). ``track_epsilon``: ε after every
    round through a :class:`fedlora.privacy.PrivacyAccountant` (else once, at the end). Returns
    the metrics."""
    data, budgets = task["data"], budgets_for(len(task["data"]))
    n_clients = len(data)
    q = per_round / n_clients
    impl = get(method)
    equal = impl.ranks == "equal" and method != "ravan"
    if equal:
        budgets = [Budget(rank=RANK, heads=HEADS, components=RANK, steps=STEPS) for _ in budgets]
    copts = ClientOptions(
        rank=HEAD_RANK if method == "ravan" else RANK, heads=HEADS, **CLIENT_OPTIONS.get(method, {})
    )
    side = impl.client(copts, budgets)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(D, D, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(task["W0"])
    fedlora.inject(model, method, target_modules=["0"], seed=seed, **side.layer_options())
    side.setup(model)
    state = fedlora.get_adapter_state_dict(model)
    xt, yt = task["test"]

    def test_mse(st):
        fedlora.set_adapter_state_dict(model, st)
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(xt), yt))

    start = test_mse(state)
    dp = acc = pop = None
    if noise_multiplier is not None:
        dp = privacy.DPConfig(clip=clip, noise_multiplier=noise_multiplier, delta=1e-5)
    elif eps is not None:
        dp = privacy.DPConfig(clip=clip, target_epsilon=eps, delta=1e-5).resolved(rounds, q)
    if dp is not None:
        acc = privacy.PrivacyAccountant.for_config(dp, q) if track_epsilon else None
        pop = privacy.Population(budgets, q)
    sampler = torch.Generator().manual_seed(seed + 1)
    noise = torch.Generator().manual_seed(seed + 2)
    rejected = 0
    for rnd in range(rounds):
        side.start_round(model, rnd)
        chosen = torch.randperm(n_clients, generator=sampler)[:per_round].tolist()
        downs, ups, metas, weights = [], [], [], []
        for k in chosen:
            b = budgets[k]
            down = side.download(state, b)
            side.prepare(model, 0, down, b, seed=rnd * n_clients + k)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
            x, y = data[k]
            for _ in range(b.steps):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                side.after_backward(model, [0])
                opt.step()
            up, meta = side.upload(model, 0, b)
            if dp is not None:
                up, meta, _ = privacy.clip_update(
                    method, down, up, meta, dp.clip, global_state=state
                )
            downs.append(down), ups.append(up), metas.append(meta), weights.append(len(x))
        if dp is None:
            state, m = fedlora.aggregate(
                method, state, ups, weights, metas, **OPTIONS.get(method, {})
            )
        else:
            state, m = privacy.private_aggregate(
                method,
                state,
                downs,
                ups,
                metas,
                [budgets[k] for k in chosen],
                dp,
                noise,
                population=pop,
                options={**OPTIONS.get(method, {}), **CLIENT_OPTIONS.get(method, {})},
                accountant=acc,
            )
            rejected += m["dp_rejected"]
        side.after_aggregate(m)
    final = test_mse(state)
    return {
        "method": method,
        "epsilon": None
        if dp is None
        else acc.epsilon
        if acc is not None
        else privacy.epsilon(rounds, q, dp.noise_multiplier, dp.delta),
        "target_epsilon": eps,
        "noise_multiplier": dp.noise_multiplier if dp is not None else None,
        "relative_mse": final / start,
        "rejected": rejected,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--per-client", type=int, default=20)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--clip", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = make_task(args.clients, args.per_client, args.seed)
    rows = []
    for method in args.methods:
        for eps in [None, *args.eps]:
            t = time.perf_counter()
            row = run(
                method,
                eps,
                task,
                rounds=args.rounds,
                per_round=args.per_round,
                clip=args.clip,
                lr=args.lr,
                seed=args.seed,
            )
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
