"""Client-level DP and simulated secure aggregation in ``fedlora simulate`` / ``fedlora compare``
(:mod:`fedlora.privacy`, :mod:`fedlora.flower.secagg`).

Everything the simulator needs for ``--dp-clip C --dp-noise z`` (or ``--dp-epsilon ε``), kept
here so that the config, the CLI and the engine each call it in one delimited place:

- :func:`add_options`: the CLI flags (their ``dest`` are the :class:`SimConfig` field names);
- :func:`check`: validation from :meth:`SimConfig.validate` (one-line :class:`ConfigError`:
  non-positive clip / noise, δ outside (0, 1), a target ε no noise level reaches in the run's
  rounds, a method or method option that DP refuses, dp-accounting missing);
- :func:`aggregator`: the :class:`fedlora.privacy.PrivateAggregator` the engine hands to
  :class:`fedlora.rounds.Server` (``dp=``), with the accountant at the real sampling rate
  ``q = clients_per_round / clients`` and the population's public budgets;
- :func:`clip_uploads`: every client's :func:`fedlora.privacy.clip_update` after training;
- :func:`row_fields` / :func:`progress`: ε (and the rejected count) for metrics.json/csv and the
  progress line;
- ``--secagg``: every round aggregated as Flower's SecAgg+ would
  (:class:`fedlora.flower.secagg.SecAggAggregator`: the fixed layout, flwr's quantisation, the
  modular sum), with or without DP; refused in one line for the methods that need each
  client's own factors.

The accountant assumes Poisson sampling; the simulator samples exactly ``clients_per_round``
clients per round (the usual approximation at ``q = m / N``). The noise is seeded by
``(seed, round)`` so a simulation is reproducible; torch's generator is not a cryptographic
one (a deployment must seed it from a secure source). ``dp_clip_fraction`` is not privatised
and is kept out of the reports.
"""

from __future__ import annotations

import argparse
import functools
import math
from typing import Any

from fedlora.simulate.errors import ConfigError

#: the SimConfig fields of DP and their defaults (DP is off while ``dp_clip`` is None)
DP_FIELDS: dict[str, Any] = {
    "dp_clip": None,
    "dp_noise": None,
    "dp_epsilon": None,
    "dp_delta": 1e-5,
    "dp_weights": "uniform",
    "dp_weight_cap": None,
    "dp_denominator": "expected",
    "dp_accountant": "rdp",
}
#: the SimConfig fields of simulated secure aggregation (SecAggPlusWorkflow's defaults)
SECAGG_FIELDS: dict[str, Any] = {
    "secagg": False,
    "secagg_clipping_range": 8.0,
    "secagg_quantization_range": 2**22,
}
#: what a round row carries for DP (``dp_clip_fraction`` is left out: not privatised) and SecAgg
ROW_FIELDS = (
    "epsilon",
    "dp_noise_multiplier",
    "dp_rejected",
    "secagg_rejected",
    "secagg_clipped_entries",
)


def add_options(p: argparse.ArgumentParser) -> None:
    """The DP flags of ``fedlora simulate`` and ``fedlora compare``."""
    from fedlora.privacy import ACCOUNTANTS, DENOMINATORS, WEIGHTS

    g = p.add_argument_group("client-level differential privacy (fedlora.privacy)")
    g.add_argument(
        "--dp-clip",
        type=float,
        default=None,
        help="clip norm C of each client's joint update; turns DP on (needs --dp-noise or "
        "--dp-epsilon)",
    )
    g.add_argument("--dp-noise", type=float, default=None, help="noise multiplier z (std z·C)")
    g.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="target ε after --rounds rounds (the noise multiplier is computed)",
    )
    g.add_argument("--dp-delta", type=float, default=DP_FIELDS["dp_delta"], help="δ in (0, 1)")
    g.add_argument(
        "--dp-weights",
        default=DP_FIELDS["dp_weights"],
        choices=list(WEIGHTS),
        help="client weights: uniform, or capped (min(n_k, --dp-weight-cap) / cap)",
    )
    g.add_argument("--dp-weight-cap", type=float, default=None, help="example count of weight 1")
    g.add_argument(
        "--dp-denominator",
        default=DP_FIELDS["dp_denominator"],
        choices=list(DENOMINATORS),
        help="expected (population expectation, default) or sampled (the sampled clients' "
        "public counts)",
    )
    g.add_argument(
        "--dp-accountant",
        default=DP_FIELDS["dp_accountant"],
        choices=list(ACCOUNTANTS),
        help="dp-accounting's accountant of ε: rdp (Rényi DP) or pld (privacy loss distributions)",
    )

    s = p.add_argument_group("secure aggregation, simulated (fedlora.flower.secagg)")
    s.add_argument(
        "--secagg",
        action="store_true",
        help="aggregate every round as Flower's SecAgg+ would: fixed layout, quantisation, "
        "modular sum (fedit, ffa, prelort, hetlora --hetlora-weighting data, ravan)",
    )
    s.add_argument(
        "--secagg-clipping-range",
        type=float,
        default=SECAGG_FIELDS["secagg_clipping_range"],
        help="SecAggPlusWorkflow's clipping_range: entries are clipped to it before quantising",
    )
    s.add_argument(
        "--secagg-quantization-range",
        type=int,
        default=SECAGG_FIELDS["secagg_quantization_range"],
        help="SecAggPlusWorkflow's quantization_range (integer levels of [-range, range])",
    )


def enabled(cfg: Any) -> bool:
    """Whether ``cfg`` runs under client-level DP."""
    return getattr(cfg, "dp_clip", None) is not None


def sample_rate(cfg: Any) -> float:
    """``q = clients_per_round / clients`` (1 when every client joins every round)."""
    per_round = cfg.clients_per_round or cfg.clients
    return min(per_round, cfg.clients) / cfg.clients


def _options(cfg: Any) -> dict[str, Any]:
    """The options :func:`fedlora.privacy.check_dp_compatible` reads (a method-owned
    ``weighting`` when the config has one)."""
    opts: dict[str, Any] = {"head_score": cfg.head_score, "hafl_mode": cfg.hafl_mode}
    try:  # the method's own options (--hetlora-weighting, --prelort-aggregation, ...)
        values = cfg.option_values()
    except (ConfigError, ValueError):
        values = {}  # a bad option is reported by the config's own check
    opts.update({k: v for k, v in values.items() if k not in opts})
    weighting = getattr(cfg, "weighting", None) or values.get("hetlora_weighting")
    if weighting is not None:
        opts["weighting"] = weighting
    return opts


@functools.lru_cache(maxsize=64)
def _noise_for(target: float, rounds: int, q: float, delta: float, accountant: str) -> float:
    from fedlora.privacy import noise_for_epsilon

    return noise_for_epsilon(target, rounds, q, delta, accountant=accountant)


def dp_config(cfg: Any) -> Any:
    """The resolved :class:`fedlora.privacy.DPConfig` of ``cfg`` (noise multiplier set), or
    None without DP. Raises :class:`ConfigError` (one line) for bad settings."""
    if not enabled(cfg):
        given = [n for n in ("dp_noise", "dp_epsilon", "dp_weight_cap") if getattr(cfg, n, None)]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} needs --dp-clip (DP is off)")
        return None
    try:
        from fedlora import privacy
    except ImportError as err:  # pragma: no cover - dp-accounting is imported lazily
        raise ConfigError(f"--dp-clip: {err}") from None
    for name in ("dp_clip", "dp_noise", "dp_epsilon", "dp_delta", "dp_weight_cap"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"--{name.replace('_', '-')} must be a number, got {v!r}")
    if cfg.dp_noise is None and cfg.dp_epsilon is None:
        raise ConfigError("--dp-clip needs --dp-noise z or --dp-epsilon ε")
    if cfg.dp_noise is not None and cfg.dp_epsilon is not None:
        raise ConfigError("give one of --dp-noise and --dp-epsilon, not both")
    for name in ("dp_clip", "dp_noise", "dp_epsilon"):
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ConfigError(
                f"--{name.replace('_', '-')} must be a positive finite number, got {v}"
            )
    if not 0 < cfg.dp_delta < 1:
        raise ConfigError(f"--dp-delta must be in (0, 1), got {cfg.dp_delta}")
    try:
        privacy.check_dp_compatible(cfg.method, _options(cfg))
        dp = privacy.DPConfig(
            clip=float(cfg.dp_clip),
            noise_multiplier=None if cfg.dp_noise is None else float(cfg.dp_noise),
            target_epsilon=None if cfg.dp_epsilon is None else float(cfg.dp_epsilon),
            delta=float(cfg.dp_delta),
            weights=cfg.dp_weights,
            weight_cap=None if cfg.dp_weight_cap is None else float(cfg.dp_weight_cap),
            denominator=cfg.dp_denominator,
            accountant=cfg.dp_accountant,
        )
        if dp.target_epsilon is not None:
            import dataclasses

            z = _noise_for(dp.target_epsilon, cfg.rounds, sample_rate(cfg), dp.delta, dp.accountant)
            dp = dataclasses.replace(dp, noise_multiplier=z, target_epsilon=None)
    except ImportError as err:
        raise ConfigError(f"--dp-clip: {err}") from None
    except ValueError as err:
        flag = "--dp-epsilon" if "target_epsilon" in str(err) else "--dp-clip"
        hint = " (--hetlora-weighting data)" if "weighting=" in str(err) else ""
        raise ConfigError(f"{flag}: {' '.join(str(err).split())}{hint}") from None
    return dp


def check(cfg: Any) -> None:
    """:meth:`SimConfig.validate`'s DP and SecAgg part (before anything is trained or written)."""
    dp = dp_config(cfg)
    check_secagg(cfg, dp)


def check_secagg(cfg: Any, dp: Any) -> None:
    """``--secagg``'s settings: a method whose aggregate is a (segment-wise) weighted mean, flwr
    installed, positive ranges, no overflow of the workflow's 2**32 modulus, and under DP a clip
    norm within the clipping range. One-line :class:`ConfigError` otherwise."""
    if not getattr(cfg, "secagg", False):
        changed = [
            n
            for n in ("secagg_clipping_range", "secagg_quantization_range")
            if getattr(cfg, n, SECAGG_FIELDS[n]) != SECAGG_FIELDS[n]
        ]
        if changed:
            raise ConfigError(f"--{changed[0].replace('_', '-')} needs --secagg (SecAgg is off)")
        return
    from fedlora.flower.secagg import check_secagg as refuse

    try:
        refuse(cfg.method, _options(cfg))
    except ValueError as err:
        flag = " (--hetlora-weighting data)" if "weighting=" in str(err) else ""
        raise ConfigError(f"--secagg: {err}{flag}") from None
    try:
        import flwr.common.secure_aggregation.quantization  # noqa: F401
    except ImportError:
        raise ConfigError(
            '--secagg needs Flower\'s quantisation: pip install "fedlora-kernels[flower]"'
        ) from None
    cr, qr = cfg.secagg_clipping_range, cfg.secagg_quantization_range
    if isinstance(cr, bool) or not isinstance(cr, (int, float)) or not (0 < cr < math.inf):
        raise ConfigError(f"--secagg-clipping-range must be a positive number, got {cr!r}")
    if isinstance(qr, bool) or not isinstance(qr, int) or not 2 <= qr < 2**31:
        raise ConfigError(
            f"--secagg-quantization-range must be an integer in [2, 2**31), got {qr!r}"
        )
    per_round = min(cfg.clients_per_round or cfg.clients, cfg.clients)
    if per_round * qr >= 2**32:
        raise ConfigError(
            f"--secagg: {per_round} clients per round x --secagg-quantization-range {qr} "
            "overflow the workflow's 2**32 modulus"
        )
    if dp is not None and dp.clip > cr:
        raise ConfigError(
            f"--dp-clip {dp.clip:g} exceeds --secagg-clipping-range {cr:g}: the workflow would "
            "clip entries of the clipped updates again"
        )


def aggregator(cfg: Any, budgets: list, num_examples: list[float], rounds_done: list[dict]) -> Any:
    """The server step for ``Server(dp=...)``: a :class:`fedlora.flower.secagg.SecAggAggregator`
    with ``--secagg`` (DP inside it when on), else the :class:`fedlora.privacy.PrivateAggregator`
    under DP, else None. ``rounds_done``: the rows of a resumed run (its accountant starts after
    them; a resumed run whose noise multiplier differs from the recorded one is refused)."""
    dp = dp_config(cfg)
    if dp is None and not getattr(cfg, "secagg", False):
        return None
    from fedlora.privacy import Population, PrivateAggregator

    recorded = {r.get("dp_noise_multiplier") for r in rounds_done} - {None}
    if recorded and any(not math.isclose(z, dp.noise_multiplier, rel_tol=1e-9) for z in recorded):
        raise ConfigError(
            f"--resume: the checkpointed rounds ran at noise multiplier {sorted(recorded)[0]:.6g}, "
            f"this run's is {dp.noise_multiplier:.6g} (a target --dp-epsilon depends on --rounds)"
        )
    q = sample_rate(cfg)
    counts = [int(n) for n in num_examples]
    population = (
        None
        if dp is None
        else Population(list(budgets), q, counts if dp.weights == "capped" else None)
    )
    if getattr(cfg, "secagg", False):
        from fedlora.flower.secagg import SecAggAggregator

        return SecAggAggregator(
            cfg.method,
            options=_options(cfg),
            max_examples=max(num_examples),
            dp=dp,
            sample_rate=q,
            population=population,
            seed=cfg.seed,
            rounds_done=len(rounds_done),
            clipping_range=float(cfg.secagg_clipping_range),
            quantization_range=int(cfg.secagg_quantization_range),
        )
    return PrivateAggregator(
        cfg.method,
        dp,
        sample_rate=q,
        population=population,
        options=_options(cfg),
        seed=cfg.seed,
        rounds_done=len(rounds_done),
    )


def clip_uploads(cfg: Any, downloads: list, uploads: list) -> list:
    """Each client's ``(state, meta)`` upload after :func:`fedlora.privacy.clip_update` against
    its download (the client's part of DP; the server clips again)."""
    if not enabled(cfg):
        return uploads
    from fedlora.privacy import clip_update

    out = []
    for down, (state, meta) in zip(downloads, uploads, strict=True):
        clipped, meta, _ = clip_update(cfg.method, down, state, meta, float(cfg.dp_clip))
        out.append((clipped, meta))
    return out


def row_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """The round row's DP entries (ε so far, the noise multiplier, rejected count)."""
    return {k: metrics[k] for k in ROW_FIELDS if k in metrics}


def progress(row: dict[str, Any]) -> str:
    """The progress line's DP part (``""`` without DP)."""
    text = f"  ε {row['epsilon']:.3g}" if "epsilon" in row else ""
    if row.get("secagg_rejected"):
        text += f"  secagg-rejected {row['secagg_rejected']}"
    return text
