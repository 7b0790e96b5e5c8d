"""Client-level differential privacy for every registered method (DP-FedAvg, DESIGN §11).

The mechanism, per round:

1. **Client** (:func:`clip_update`): the update of exactly what its method aggregates, as a
   delta from its download (B only for FFA-LoRA; ``s·H`` of the trained heads for Ravan; the
   rank prefix for HetLoRA / PreLort / FlexLoRA / HAFL truncation; A, B and other keys for
   FedIT), clipped JOINTLY (one L2 norm over every key) to ``C``. The server clips again
   (:func:`private_aggregate`): the guarantee never rests on the client.
2. **Server** (:func:`private_aggregate`): the clipped deltas are placed into the global's layout,
   multiplied by bounded weights ``w_k ∈ (0, 1]`` and summed; Gaussian noise of std ``z·C`` is
   added to every coordinate of the SUM (one client changes the weighted sum by at most ``C`` in
   L2, so this is the Gaussian mechanism with noise multiplier ``z``); the noised sum is divided
   per index (segment / head / component) by a denominator that does not depend on any client's
   data; the method's post-processing (FlexLoRA's SVD) runs on the noised result only.
3. **Accounting** (:func:`epsilon`, :class:`PrivacyAccountant`): the Poisson-subsampled Gaussian
   at the real sampling rate ``q = clients_per_round / clients``, composed over rounds, by
   Google's ``dp-accounting`` (RDP accountant by default, PLD optional).

Weights (``DPConfig.weights``): ``"uniform"`` (default) ``w_k = 1``; ``"capped"``
``w_k = min(n_k, cap) / cap`` from the clients' example counts ``n_k``, treated as public metadata
like the budgets. Either way ``w_k ≤ 1``, so the sensitivity of the sum is ``C`` and the noise std
stays ``z·C`` (the cap is the unit the noise is scaled to).

Denominators (``DPConfig.denominator``), per index ``j`` of a key:

- ``"expected"`` (default): ``q · Σ_c w_c · P(client c covers j)`` over the whole population,
  from its public budgets (PreLort segment ``j``: the clients whose rank is ``> j``; Ravan head
  ``i``: the probability that client ``c``'s public head choice trains ``i``). It does not depend
  on who was sampled, so the result is the Gaussian mechanism followed by post-processing, the
  setting the Poisson-subsampled accountant analyses (McMahan et al. 2018's fixed-denominator
  estimator). An index whose expected count is 0 keeps the global's value.
- ``"sampled"``: ``Σ_k w_k · [client k covers j]`` over the SAMPLED clients, from their public
  budgets / public head choices. Less variance, but the count reveals how many sampled clients
  cover ``j``: it is the usual convention when the participating set is treated as public
  (fixed-size sampling); the accountant's amplification by subsampling is then an approximation.

A client whose update is non-finite (or malformed) is rejected: its delta is not used, it is
counted in ``metrics["dp_rejected"]``, and it STILL counts in the denominators and the accountant
(dropping it would make a denominator depend on its data). The per-method semantics are data in
:data:`DP_SEMANTICS` and enforced by :func:`check_dp_compatible`.

Accounting assumes Poisson sampling (each client joins a round independently with probability
``q``); a loop that samples exactly ``m`` clients uses it as the usual approximation at
``q = m / N``.

``fedlora simulate --dp-*`` (:mod:`fedlora.simulate.privacy_run`), ``fedlora.rounds.Server(dp=
PrivateAggregator(...))``, ``fedlora.local.LocalClient.train(..., dp_clip=C)`` and SecAgg+ over
Flower (:mod:`fedlora.flower.secagg`) use this module. By hand, a round loop does, before training: ``check_dp_compatible(method, options)`` (refuse with
exit 2), ``dp = DPConfig(...).resolved(rounds, q)``, ``acc = PrivacyAccountant.for_config(dp, q)``,
``pop = Population(all_budgets, q)``; each round: every client ``clip_update`` after its upload;
the server ``private_aggregate(method, global, downloads, uploads, metas, budgets, dp, gen,
population=pop, options=options, accountant=acc)`` instead of :func:`fedlora.aggregate`, then the
method's ``after_aggregate`` with the returned metrics (``metrics["epsilon"]``: ε so far).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedlora.keys import A_SUFFIX, B_SUFFIX, H_SUFFIX, S_SUFFIX, a_key, b_key, lora_paths
from fedlora.methods import Budget, ClientOptions, ClientRejected
from fedlora.methods import get as get_method

__all__ = [
    "DP_SEMANTICS",
    "ClientDelta",
    "DPConfig",
    "MethodDP",
    "Population",
    "PrivacyAccountant",
    "PrivateAggregator",
    "bounded_weights",
    "check_dp_compatible",
    "client_delta",
    "clip_delta",
    "clip_update",
    "combine_sums",
    "epsilon",
    "hetlora_weighting",
    "method_option",
    "noise_for_epsilon",
    "private_aggregate",
    "public_denominators",
    "ravan_head_probabilities",
]

State = Mapping[str, torch.Tensor]
Status = Literal["compatible", "restricted", "post-processing", "refused"]


# ------------------------------------------------------------------------------------------------
# per-method semantics (data)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodDP:
    """What client-level DP means for one method.

    Attributes:
        status: ``"compatible"`` (runs as it is), ``"restricted"`` (runs under the restriction
            named), ``"post-processing"`` (its server step runs on the noised aggregate only,
            which changes what it computes) or ``"refused"``.
        clipped: what each client's clipped delta holds.
        denominator: what each index is divided by.
        restriction: the condition under which it runs ('' if none).
        reason: why (the formula that makes it safe or unsafe).
    """

    status: Status
    clipped: str
    denominator: str
    restriction: str
    reason: str


DP_SEMANTICS: dict[str, MethodDP] = {
    "fedit": MethodDP(
        "compatible",
        "ΔA, ΔB (and other keys) of every layer",
        "Σ w over the clients (every client covers every entry)",
        "",
        "A_g = Σ p_k A_k, B_g = Σ p_k B_k are means of per-client vectors: noised sums / public "
        "counts. Noise enters B·A twice (the product of two noised factors).",
    ),
    "ffa": MethodDP(
        "compatible",
        "ΔB (and other keys); A is frozen and public (shared seed)",
        "Σ w over the clients",
        "",
        "B_g = Σ p_k B_k is linear and A is public, so the noise enters ΔW = B·A once "
        "(the reason FFA-LoRA freezes A).",
    ),
    "hetlora": MethodDP(
        "restricted",
        "the rank-r_k prefix of ΔA, ΔB (zero-padded to R), other keys",
        "Σ w over all clients (zero padding); the old value is scaled by the public coverage",
        "weighting='data' (the bounded DP weights replace p_k); weighting='sparsity' is refused",
        "the sparsity weight ‖B_k A_k‖_F is computed from the client's own update: an unbounded, "
        "data-dependent weight that no clipping bounds. With public weights the zero-padded mean "
        "A[j] = (cov_j·A_ref[j] + Σ_k w_k ΔA_k[j]) / Σ w is a noised sum over public counts.",
    ),
    "prelort": MethodDP(
        "compatible",
        "the rank-r_k prefix of ΔA, ΔB, other keys",
        "segment j: Σ w over the clients whose PUBLIC rank r_k > j",
        "",
        "the segment-wise mean is a sum over the clients covering j divided by their count, "
        "which the public budgets determine.",
    ),
    "flexlora": MethodDP(
        "post-processing",
        "the rank-r_k prefix of ΔA, ΔB (in the downloaded SVD basis), other keys",
        "segment j: Σ w over the clients whose public rank r_k > j; then the SVD",
        "the server's SVD runs on the product of the noised factor means, not on Σ p_k B_k A_k",
        "Σ p_k B_k A_k needs each client's own factors (a bilinear, not a linear, function of "
        "the uploads), which a noised sum cannot give; FlexLoRA's re-factorisation of the noised "
        "global (best rank-R balanced factors, then each client's best rank-r_k) is "
        "post-processing and keeps its heterogeneous-rank hand-out.",
    ),
    "flora": MethodDP(
        "refused",
        "",
        "",
        "",
        "stacking sends every client's own factors B_k, p_k A_k into the merged global: the "
        "aggregate is not a sum, so no clipping and noising of a sum can protect it.",
    ),
    "fedex": MethodDP(
        "refused",
        "",
        "",
        "",
        "the residual Σ p_k B_k A_k − B_g A_g folded into the base needs each client's own "
        "product; from the noised sums alone it is 0 and FedEx-LoRA is FedIT (use fedit); a "
        "private residual would need a dense d_out×d_in noised sum per layer.",
    ),
    "florana": MethodDP(
        "refused",
        "",
        "",
        "",
        "the fit of α_u, β_u targets Σ p_u B_u A_u and weighs each client's ΔA_u, ΔB_u "
        "separately: it needs per-client factors; on the noised sums alone α = β = 1, which is "
        "FedIT (use fedit).",
    ),
    "ravan": MethodDP(
        "restricted",
        "Δ(s·H) of the trained heads (compact upload: lora_H [K, r, r] + meta heads)",
        "head i: Σ w·P(client's public head choice trains i)",
        "head_score 'random' or 'weight'; 'gradient' is refused",
        "'gradient' chooses the heads by ‖∂L/∂H_i‖ on the client's own batch: which heads it "
        "trains (and so each head's count) reveals its data. 'random' is a seeded choice and "
        "'weight' ranks ‖s_i H_i‖ of the DOWNLOADED global (already private: post-processing) "
        "with seeded tie-breaking, so the choice, its probabilities and the per-head "
        "denominators are public.",
    ),
    "hafl": MethodDP(
        "restricted",
        "the components of ΔA, ΔB the client holds (the rank-r_k prefix), other keys",
        "component j: Σ w over the clients whose public rank r_k > j",
        "hafl_mode='truncate' with no uploaded scores (components = the public prefix); "
        "hafl_mode='freeze' is refused",
        "in freezing mode a client trains its top-m_k components by importance |w·∂L/∂w| on its "
        "own data: the component set (and each component's count of updaters) reveals the data, "
        "and the uploaded importance scores are raw data statistics. Truncation mode without "
        "scores hands every client the public prefix r_k, so counts are public; the scores are "
        "stripped (they would need their own private aggregation).",
    ),
}
"""The per-method DP table (the README's "Privacy" table is generated from the same facts)."""

_PREFIX = ("hetlora", "prelort", "flexlora", "hafl")


def _option(options: Any, name: str, default: Any) -> Any:
    if options is None:
        return default
    if isinstance(options, ClientOptions):
        return getattr(options, name, default)
    if isinstance(options, Mapping):
        return options.get(name, default)
    raise TypeError(f"options must be a mapping or a ClientOptions, got {type(options).__name__}")


def method_option(options: Mapping[str, Any] | ClientOptions | None, name: str) -> Any:
    """The method option ``name`` in ``options`` (a mapping holding it, or a ClientOptions /
    mapping with ``method_options``), else the owning method's default."""
    from fedlora.methods import option_owners

    given = options.get(name) if isinstance(options, Mapping) else None
    own = _option(options, "method_options", None)
    if given is None and isinstance(own, Mapping):
        given = own.get(name)
    return option_owners()[name][0].default if given is None else given


def hetlora_weighting(options: Mapping[str, Any] | ClientOptions | None) -> str:
    """HetLoRA's aggregation weighting in ``options`` (``weighting``, or the method option
    ``hetlora_weighting`` of a ClientOptions / simulate config); missing: the method's default
    (``sparsity``, the paper's), never silently ``data``."""
    given = _option(options, "weighting", None)
    if given is None:
        own = _option(options, "method_options", None) or {}
        if isinstance(own, Mapping):
            given = own.get("hetlora_weighting")
    if given is None and isinstance(options, Mapping):
        given = options.get("hetlora_weighting")
    return (
        str(given)
        if given is not None
        else get_method("hetlora").option("hetlora_weighting").default
    )


def check_dp_compatible(
    method: str, options: Mapping[str, Any] | ClientOptions | None = None
) -> MethodDP:
    """The :data:`DP_SEMANTICS` entry of ``method`` if it can run under client-level DP with
    ``options`` (client options such as ``head_score`` / ``hafl_mode``, or aggregate options such
    as ``weighting``; missing ones take the method's defaults), else a one-line ``ValueError``
    naming the method, the option and the reason."""
    impl = get_method(method)
    entry = DP_SEMANTICS.get(impl.name)
    if entry is None:
        raise ValueError(
            f"method {impl.name!r} declares no DP semantics (fedlora.privacy.DP_SEMANTICS): "
            "refused under DP"
        )
    if entry.status == "refused":
        raise ValueError(f"DP with method {impl.name!r} is refused: {entry.reason}")
    if impl.name == "prelort" and method_option(options, "prelort_aggregation") != "segment":
        raise ValueError(
            "DP with prelort needs prelort_aggregation='segment': the public denominators are "
            "the segment-wise ones (--prelort-aggregation segment)"
        )
    if impl.name == "hetlora" and method_option(options, "hetlora_prune"):
        raise ValueError(
            "DP with hetlora refuses hetlora_prune: pruning is decided from the client's own "
            "data and moves its rank off the public budget the denominators rest on"
        )
    if impl.name == "hetlora" and hetlora_weighting(options) != "data":
        raise ValueError(
            "DP with hetlora needs weighting='data': the sparsity weight ‖B_k A_k‖ is computed "
            "from the client's own update (data-dependent, unbounded)"
        )
    if impl.name == "ravan":
        score = _option(options, "head_score", ClientOptions.head_score)
        if score not in ("random", "weight"):
            raise ValueError(
                f"DP with ravan needs head_score 'random' or 'weight', got {score!r}: the "
                "gradient score picks heads from the client's own data, so the trained heads leak"
            )
    if impl.name == "hafl":
        mode = _option(options, "hafl_mode", ClientOptions.hafl_mode)
        if mode != "truncate":
            raise ValueError(
                f"DP with hafl needs hafl_mode='truncate', got {mode!r}: freezing mode picks the "
                "trained components by importance on the client's own data (data-dependent counts)"
            )
    return entry


# ------------------------------------------------------------------------------------------------
# configuration and accounting
# ------------------------------------------------------------------------------------------------

WEIGHTS = ("uniform", "capped")
DENOMINATORS = ("expected", "sampled")
ACCOUNTANTS = ("rdp", "pld")


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _check_delta(delta: Any) -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_rate(sample_rate: Any) -> float:
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, numbers.Real)
        or not 0 < sample_rate <= 1
    ):
        raise ValueError(
            f"sample_rate must be in (0, 1] (clients_per_round / clients), got {sample_rate!r}"
        )
    return float(sample_rate)


def _check_rounds(rounds: Any) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    return int(rounds)


@dataclass(frozen=True)
class DPConfig:
    """Client-level DP settings.

    Attributes:
        clip: the L2 clip norm ``C`` of each client's joint update (> 0).
        noise_multiplier: ``z``: the noise std on the sums is ``z·C`` (> 0). Give it, or
            ``target_epsilon`` (then :meth:`resolved` computes ``z`` for the run).
        target_epsilon: the ε to reach after the run's rounds at ``delta``.
        delta: δ in (0, 1).
        weights: ``"uniform"`` (``w_k = 1``) or ``"capped"`` (``w_k = min(n_k, weight_cap) /
            weight_cap`` from example counts; needs ``weight_cap``).
        weight_cap: the example count at which a client's weight reaches 1 (capped weights).
        denominator: ``"expected"`` (population expectation, default) or ``"sampled"``; see the
            module docstring.
        accountant: ``"rdp"`` (default) or ``"pld"`` (dp-accounting's PLD accountant: tighter,
            slower).
    """

    clip: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    weights: str = "uniform"
    weight_cap: float | None = None
    denominator: str = "expected"
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        _positive(self.clip, "clip")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None:
            _positive(self.noise_multiplier, "noise_multiplier")
        if self.target_epsilon is not None:
            _positive(self.target_epsilon, "target_epsilon")
        _check_delta(self.delta)
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.weights == "capped":
            if self.weight_cap is None:
                raise ValueError("weight_cap is required with weights='capped'")
            _positive(self.weight_cap, "weight_cap")
        elif self.weight_cap is not None:
            raise ValueError("weight_cap applies only to weights='capped'")
        if self.denominator not in DENOMINATORS:
            raise ValueError(f"denominator must be one of {DENOMINATORS}, got {self.denominator!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")

    def resolved(self, rounds: int, sample_rate: float) -> DPConfig:
        """This config with ``noise_multiplier`` set: as given, or the smallest ``z`` whose ε
        after ``rounds`` rounds at ``sample_rate`` is ``target_epsilon`` (:func:`noise_for_epsilon`;
        one-line ``ValueError`` if no noise level reaches it)."""
        if self.noise_multiplier is not None:
            return self
        z = noise_for_epsilon(
            float(self.target_epsilon),  # type: ignore[arg-type]
            rounds,
            sample_rate,
            self.delta,
            accountant=self.accountant,
        )
        return dataclasses.replace(self, noise_multiplier=z, target_epsilon=None)


def _accounting():
    try:
        import dp_accounting
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "fedlora.privacy's accounting needs dp-accounting: pip install 'fedlora-kernels[privacy]'"
        ) from None
    return dp_accounting


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """The RDP accountant logs a warning for each fractional order whose series does not
    converge (it then drops that order, a valid, slightly looser bound); keep them out of logs."""
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _event(rounds: int, sample_rate: float, noise_multiplier: float):
    dpa = _accounting()
    step = dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(noise_multiplier))
    return dpa.SelfComposedDpEvent(step, rounds)


def _fresh(accountant: str):
    dpa = _accounting()
    if accountant == "rdp":
        return dpa.rdp.RdpAccountant()
    if accountant == "pld":
        return dpa.pld.PLDAccountant()
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def epsilon(
    rounds: int,
    sample_rate: float,
    noise_multiplier: float,
    delta: float,
    *,
    accountant: str = "rdp",
) -> float:
    """ε after ``rounds`` rounds of the Poisson-subsampled Gaussian mechanism (sampling rate
    ``sample_rate`` = clients per round / clients, noise multiplier ``z``) at ``delta``, from
    dp-accounting's RDP (default) or PLD accountant. 0 for 0 rounds."""
    rounds = _check_rounds(rounds)
    sample_rate = _check_rate(sample_rate)
    z = _positive(noise_multiplier, "noise_multiplier")
    delta = _check_delta(delta)
    if rounds == 0:
        return 0.0
    acc = _fresh(accountant)
    with _quiet_absl():
        acc.compose(_event(rounds, sample_rate, z))
        return float(acc.get_epsilon(delta))


#: the noise multipliers :func:`noise_for_epsilon` searches between
NOISE_RANGE = (1e-2, 1e3)


def noise_for_epsilon(
    target_epsilon: float,
    rounds: int,
    sample_rate: float,
    delta: float,
    *,
    accountant: str = "rdp",
    tol: float = 1e-4,
) -> float:
    """The smallest noise multiplier (within ``tol``) whose :func:`epsilon` after ``rounds``
    rounds is at most ``target_epsilon``: dp-accounting's ``calibrate_dp_mechanism`` (Brent's
    method) over :data:`NOISE_RANGE`. One-line ``ValueError`` if even ``z = 1000`` does not
    reach the target (too small an ε for that δ and that many rounds)."""
    target = _positive(target_epsilon, "target_epsilon")
    rounds = _check_rounds(rounds)
    sample_rate = _check_rate(sample_rate)
    delta = _check_delta(delta)
    if rounds == 0:
        raise ValueError("target_epsilon needs rounds >= 1 (no round spends any privacy)")
    lo, hi = NOISE_RANGE
    best = epsilon(rounds, sample_rate, hi, delta, accountant=accountant)
    if best > target:
        raise ValueError(
            f"target_epsilon {target:g} is unreachable in {rounds} rounds at sample rate "
            f"{sample_rate:g} and delta {delta:g}: even noise multiplier {hi:g} gives ε = {best:.4g}"
        )
    if epsilon(rounds, sample_rate, lo, delta, accountant=accountant) <= target:
        return lo
    dpa = _accounting()
    with _quiet_absl():
        z = dpa.calibrate_dp_mechanism(
            lambda: _fresh(accountant),
            lambda z: _event(rounds, sample_rate, z),
            target,
            delta,
            dpa.ExplicitBracketInterval(lo, hi),
            tol=tol,
        )
    return float(z)


class PrivacyAccountant:
    """ε so far for a run: call :meth:`step` once per round (every sampled round counts, even
    when every client was rejected), read :attr:`epsilon`."""

    def __init__(
        self, noise_multiplier: float, sample_rate: float, delta: float, *, accountant: str = "rdp"
    ) -> None:
        self.noise_multiplier = _positive(noise_multiplier, "noise_multiplier")
        self.sample_rate = _check_rate(sample_rate)
        self.delta = _check_delta(delta)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.accountant = accountant
        self.rounds = 0

    @classmethod
    def for_config(cls, dp: DPConfig, sample_rate: float) -> PrivacyAccountant:
        """An accountant for a resolved :class:`DPConfig` (noise multiplier set)."""
        if dp.noise_multiplier is None:
            raise ValueError("resolve the DPConfig first (dp.resolved(rounds, sample_rate))")
        return cls(dp.noise_multiplier, sample_rate, dp.delta, accountant=dp.accountant)

    def step(self, rounds: int = 1) -> None:
        """Count ``rounds`` more rounds."""
        self.rounds += _check_rounds(rounds)

    @property
    def epsilon(self) -> float:
        """ε after the rounds counted so far, at :attr:`delta`."""
        return epsilon(
            self.rounds,
            self.sample_rate,
            self.noise_multiplier,
            self.delta,
            accountant=self.accountant,
        )


# ------------------------------------------------------------------------------------------------
# the client's delta in the global's layout
# ------------------------------------------------------------------------------------------------


class _Rejected(Exception):
    pass


@dataclass
class ClientDelta:
    """One client's update in the global's layout (float64, zeros where it holds nothing) and the
    coverage: per key, a 1-D 0/1 tensor over the key's index dimension (rank / head), or None
    when the client covers the whole key."""

    values: dict[str, torch.Tensor]
    cover: dict[str, torch.Tensor | None]
    dims: dict[str, int]


def _f64(t: torch.Tensor) -> torch.Tensor:
    """The server's working copy: float64 on the CPU (adapter-sized tensors; one device for the
    sums, the noise and the public denominators, whatever device the states live on)."""
    return t.detach().to(device="cpu", dtype=torch.float64)


def _ravan_paths(state: State) -> list[str]:
    return [k[: -len(H_SUFFIX)] for k in state if k.endswith(H_SUFFIX)]


def _folded(state: State, path: str) -> torch.Tensor:
    H = _f64(state[path + H_SUFFIX])
    s = state.get(path + S_SUFFIX)
    return H if s is None else H * _f64(s)[:, None, None]


def _other_keys(method: str, global_state: State) -> list[str]:
    if method == "ravan":
        return [k for k in global_state if not k.endswith((H_SUFFIX, S_SUFFIX))]
    return [k for k in global_state if not k.endswith((A_SUFFIX, B_SUFFIX))]


def _tensor(state: State, key: str, who: str) -> torch.Tensor:
    t = state.get(key)
    if not isinstance(t, torch.Tensor):
        raise _Rejected(f"{who} has no tensor {key!r}")
    return t


def _rank_of(budget: Budget | None, held: int, key: str) -> int:
    if budget is not None and held != budget.rank:
        raise _Rejected(f"{key}: uploaded rank {held} != the public budget's rank {budget.rank}")
    return held


def client_delta(
    method: str,
    global_state: State,
    download: State,
    upload: State,
    meta: Mapping[str, Any] | None = None,
    budget: Budget | None = None,
) -> ClientDelta:
    """The update ``upload − download`` of exactly what ``method`` aggregates, placed in the
    global's layout (float64), with its coverage. ``budget`` (the client's PUBLIC budget), when
    given, must agree with the upload's rank. Raises ``ValueError`` for an upload that does not
    fit the method's layout."""
    try:
        return _client_delta(method, global_state, download, upload, meta or {}, budget)
    except _Rejected as exc:
        raise ValueError(str(exc)) from None


def _client_delta(
    method: str,
    g: State,
    download: State,
    upload: State,
    meta: Mapping[str, Any],
    budget: Budget | None,
) -> ClientDelta:
    values: dict[str, torch.Tensor] = {}
    cover: dict[str, torch.Tensor | None] = {}
    dims: dict[str, int] = {}
    for key in _other_keys(method, g):
        up = _f64(_tensor(upload, key, "upload"))
        down = _f64(_tensor(download, key, "download"))
        if up.shape != g[key].shape or down.shape != g[key].shape:
            raise _Rejected(f"{key}: shape {list(up.shape)} != global {list(g[key].shape)}")
        values[key] = up - down
        cover[key] = None
        dims[key] = 0
    if method == "ravan":
        heads_meta = meta.get("heads", {}) or {}
        if not isinstance(heads_meta, Mapping):
            raise _Rejected("meta 'heads' must be a {path: [head, ...]} dict")
        for path in _ravan_paths(g):
            key = path + H_SUFFIX
            ref = _folded(download, path)
            h = ref.shape[0]
            up = _folded(upload, path) if key in upload else None
            if up is None:
                raise _Rejected(f"upload has no {key!r}")
            heads = heads_meta.get(path)
            if heads is None:
                if up.shape[0] != h:
                    raise _Rejected(f"{key}: a compact upload needs meta 'heads' for {path!r}")
                heads = list(range(h))
            heads = [int(i) for i in heads]
            if len(set(heads)) != len(heads) or not all(0 <= i < h for i in heads):
                raise _Rejected(f"{key}: meta 'heads' must be distinct ints in [0, {h})")
            if budget is not None and len(heads) != budget.heads:
                raise _Rejected(
                    f"{key}: trained {len(heads)} heads, the public budget says {budget.heads}"
                )
            rows = up if up.shape[0] == len(heads) else up[heads] if up.shape[0] == h else None
            if rows is None or rows.shape[1:] != ref.shape[1:]:
                raise _Rejected(f"{key}: upload shape {list(up.shape)} does not match meta 'heads'")
            full = torch.zeros_like(ref)
            full[heads] = rows - ref[heads]
            mask = torch.zeros(h, dtype=torch.float64)
            mask[heads] = 1.0
            values[key], cover[key], dims[key] = full, mask, 0
        return ClientDelta(values, cover, dims)
    if method == "hafl":
        indices_meta = meta.get("indices", {}) or {}
        if not isinstance(indices_meta, Mapping):
            raise _Rejected("meta 'indices' must be a {path: [j, ...]} dict")
    for path in lora_paths(g):
        full_rank = g[a_key(path)].shape[0]
        pairs = [(b_key(path), 1)] if method == "ffa" else [(a_key(path), 0), (b_key(path), 1)]
        held = None
        for key, dim in pairs:
            up = _f64(_tensor(upload, key, "upload"))
            down = _f64(_tensor(download, key, "download"))
            if up.shape != down.shape or up.dim() != 2:
                raise _Rejected(
                    f"{key}: upload shape {list(up.shape)} != download {list(down.shape)}"
                )
            r = up.shape[dim]
            other = g[key].shape[1 - dim]
            if up.shape[1 - dim] != other or r > full_rank:
                raise _Rejected(
                    f"{key}: shape {list(up.shape)} does not fit global {list(g[key].shape)}"
                )
            if method not in _PREFIX and r != full_rank:
                raise _Rejected(f"{key}: rank {r} != the global rank {full_rank}")
            held = r if held is None else held
            if r != held:
                raise _Rejected(f"{key}: A and B of {path!r} have different ranks")
            if method in _PREFIX:
                _rank_of(budget, r, key)
            if method == "hafl":
                idx = indices_meta.get(path, list(range(r)))
                if [int(i) for i in idx] != list(range(r)):
                    raise _Rejected(
                        f"{key}: under DP a HAFL client holds the public prefix 0..{r - 1}, "
                        f"meta 'indices' says {list(idx)[:8]}"
                    )
            full = torch.zeros(g[key].shape, dtype=torch.float64)
            full.narrow(dim, 0, r).copy_(up - down)
            mask = torch.zeros(full_rank, dtype=torch.float64)
            mask[:r] = 1.0
            values[key], cover[key], dims[key] = full, mask, dim
        if method == "ffa":
            A = upload.get(a_key(path))
            if A is not None and not torch.equal(A, download[a_key(path)]):
                raise _Rejected(f"{a_key(path)}: differs from the frozen A (FFA-LoRA freezes A)")
    return ClientDelta(values, cover, dims)


def _norm(values: Mapping[str, torch.Tensor]) -> float:
    """The joint L2 norm over every key (float64; inf/NaN propagate)."""
    sq = sum((float(v.square().sum()) for v in values.values()), 0.0)
    return math.sqrt(sq) if sq == sq else float("nan")


def clip_delta(
    values: Mapping[str, torch.Tensor], clip: float
) -> tuple[dict[str, torch.Tensor], float]:
    """``(values · min(1, clip / ‖values‖), ‖values‖)``: the joint L2 clip (one norm over every
    key), in float64. The norm is NaN/inf for a non-finite update (then nothing is scaled)."""
    clip = _positive(clip, "clip")
    norm = _norm(values)
    if not math.isfinite(norm) or norm <= clip:
        return {k: v.clone() for k, v in values.items()}, norm
    factor = clip / norm
    return {k: v * factor for k, v in values.items()}, norm


def clip_update(
    method: str,
    download: State,
    upload: State,
    meta: Mapping[str, Any] | None,
    clip_norm: float,
    *,
    global_state: State | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], float]:
    """The client's part: ``(clipped_upload, meta, pre-clip norm)``.

    ``clipped_upload`` has the upload's own layout (Ravan's compact ``lora_H`` rows, a prefix,
    FFA-LoRA without ``A``) and dtype: ``download + δ·min(1, C/‖δ‖)`` where ``δ`` is the update of
    what ``method`` aggregates, jointly clipped over every key. ``meta`` is the upload's meta
    with what DP must not send removed (HAFL's data-dependent ``scores``). ``global_state``
    only sets the layout the norm is taken in (default ``download``; the norm is the same in
    any layout, since what a client does not hold is zero). A non-finite update is returned unchanged with a NaN/inf norm: the server
    rejects it.
    """
    entry = DP_SEMANTICS.get(get_method(method).name)
    if entry is None or entry.status == "refused":
        check_dp_compatible(method)  # raises the one-line refusal
    g = download if global_state is None else global_state
    meta = dict(meta or {})
    meta.pop("scores", None)  # HAFL's importance scores are raw data statistics
    delta = client_delta(method, g, download, upload, meta)
    clipped, norm = clip_delta(delta.values, clip_norm)
    if not math.isfinite(norm):
        return dict(upload), meta, norm
    factor = 1.0 if norm <= clip_norm else clip_norm / norm
    out = dict(upload)
    if method == "ravan":
        heads_meta = meta.get("heads", {}) or {}
        for path in _ravan_paths(g):
            key = path + H_SUFFIX
            up_f = _folded(upload, path)
            down_f = _folded(download, path)
            h = down_f.shape[0]
            heads = [int(i) for i in heads_meta.get(path, range(h))]
            rows = up_f if up_f.shape[0] == len(heads) else up_f[heads]
            new_rows = down_f[heads] + (rows - down_f[heads]) * factor
            if up_f.shape[0] == len(heads):
                out[key] = new_rows.to(upload[key])
            else:
                full = up_f.clone()
                full[heads] = new_rows
                out[key] = full.to(upload[key])
            if path + S_SUFFIX in upload:
                out[path + S_SUFFIX] = torch.ones_like(upload[path + S_SUFFIX])
        for key in _other_keys(method, g):
            out[key] = (_f64(download[key]) + clipped[key]).to(upload[key])
        return out, meta, norm
    for key in upload:
        if key in clipped:
            d = delta.dims[key]
            r = upload[key].shape[d] if key.endswith((A_SUFFIX, B_SUFFIX)) else None
            part = clipped[key] if r is None else clipped[key].narrow(d, 0, r)
            out[key] = (_f64(download[key]) + part).to(upload[key])
    return out, meta, norm


# ------------------------------------------------------------------------------------------------
# the server: noised sums over public denominators
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Population:
    """What the server knows publicly about every client of the run (for
    ``denominator="expected"``): their budgets, the sampling rate ``q`` (clients per round /
    clients) and, for capped weights, their example counts."""

    budgets: Sequence[Budget]
    sample_rate: float
    num_examples: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("population budgets must not be empty")
        _check_rate(self.sample_rate)
        if self.num_examples is not None and len(self.num_examples) != len(self.budgets):
            raise ValueError(
                f"population num_examples has {len(self.num_examples)} entries, budgets "
                f"{len(self.budgets)}"
            )


def bounded_weights(
    dp: DPConfig, num_examples: Sequence[int] | None, n: int, what: str = "clients'"
) -> list[float]:
    """The clients' bounded weights under ``dp``: 1 each (``uniform``) or ``min(n_k, cap) / cap``
    (``capped``); ``ValueError`` naming ``what`` for missing or bad counts."""
    if dp.weights == "uniform":
        return [1.0] * n
    if num_examples is None or len(num_examples) != n:
        raise ValueError(f"weights='capped' needs {what} num_examples, one per client")
    cap = float(dp.weight_cap)  # type: ignore[arg-type]
    out = []
    for v in num_examples:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0:
            raise ValueError(f"{what} num_examples must be non-negative numbers, got {v!r}")
        out.append(min(float(v), cap) / cap)
    return out


def ravan_head_probabilities(g: State, path: str, heads: int, score: str) -> torch.Tensor:
    """P(a client with budget ``heads`` trains head i) under a public head choice: ``random``:
    ``heads / h``; ``weight``: 1 above the ``heads``-th largest ``‖s_i H_i‖`` of the global, the
    tied heads share the remaining places uniformly (select_heads breaks ties by a seeded random
    order), 0 below. ``g`` is the global state, ``path`` a Ravan layer's module path."""
    if score not in ("random", "weight"):
        raise ValueError(f"score must be 'random' or 'weight' (public choices), got {score!r}")
    if path + H_SUFFIX not in g:
        raise ValueError(f"path {path!r} is not a Ravan layer of the global state")
    H = g[path + H_SUFFIX]
    h = H.shape[0]
    if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= h:
        raise ValueError(f"heads must be an int in [1, {h}], got {heads!r}")
    if score == "random":
        return torch.full((h,), heads / h, dtype=torch.float64)
    s = g.get(path + S_SUFFIX)
    core = (
        H.detach().float() if s is None else H.detach().float() * s.detach().float()[:, None, None]
    )
    scores = torch.linalg.matrix_norm(core).cpu()
    kth = torch.sort(scores, descending=True).values[heads - 1]
    above = scores > kth
    tied = scores == kth
    p = above.to(torch.float64)
    p[tied] = (heads - int(above.sum())) / int(tied.sum())
    return p


def _public_cover(
    method: str,
    g: State,
    budget: Budget,
    meta: Mapping[str, Any] | None,
    head_score: str,
    use_meta: bool,
) -> dict[str, torch.Tensor | None]:
    """Per key of the delta space: the probability (or, with ``use_meta``, the indicator from a
    public head choice) that the client covers each index; None = the whole key, surely."""
    cover: dict[str, torch.Tensor | None] = {k: None for k in _other_keys(method, g)}
    if method == "ravan":
        heads_meta = (meta or {}).get("heads") if use_meta else None
        for path in _ravan_paths(g):
            h = g[path + H_SUFFIX].shape[0]
            if not 1 <= budget.heads <= h:
                raise ValueError(f"public budget heads {budget.heads} outside [1, {h}]")
            chosen = heads_meta.get(path) if isinstance(heads_meta, Mapping) else None
            try:
                idx = [int(i) for i in chosen] if chosen is not None else None
            except (TypeError, ValueError):
                idx = None
            if (
                idx is not None
                and len(set(idx)) == len(idx) == budget.heads
                and all(0 <= i < h for i in idx)
            ):
                m = torch.zeros(h, dtype=torch.float64)
                m[idx] = 1.0
                cover[path + H_SUFFIX] = m
            else:
                cover[path + H_SUFFIX] = ravan_head_probabilities(g, path, budget.heads, head_score)
        return cover
    for path in lora_paths(g):
        R = g[a_key(path)].shape[0]
        r = budget.rank if method in _PREFIX else R
        if not 1 <= r <= R:
            raise ValueError(f"public budget rank {r} outside [1, {R}] for {path!r}")
        m = torch.zeros(R, dtype=torch.float64)
        m[:r] = 1.0
        keys = [b_key(path)] if method == "ffa" else [a_key(path), b_key(path)]
        for key in keys:
            cover[key] = m
    return cover


def _view(t: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return t.view(shape)


def _reference(
    method: str, g: State, downloads: Sequence[State], used: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The values the deltas are relative to, in the global's layout (float64): the global,
    with the prefixes the (accepted) clients downloaded written in (FlexLoRA hands out SVD
    factors, not the global's own); downloads must agree where they overlap."""
    ref = {k: _f64(v).clone() for k, v in g.items()}
    if method == "ravan":
        for path in _ravan_paths(g):
            ref[path + H_SUFFIX] = _folded(g, path)
        return ref
    if method not in _PREFIX:
        return ref
    seen: dict[str, int] = {}
    for k in sorted(used, key=lambda k: -downloads[k][a_key(lora_paths(g)[0])].shape[0]):
        for path in lora_paths(g):
            for key, dim in ((a_key(path), 0), (b_key(path), 1)):
                d = _f64(downloads[k][key])
                r = d.shape[dim]
                done = seen.get(key, 0)
                if done and not torch.equal(
                    ref[key].narrow(dim, 0, min(r, done)), d.narrow(dim, 0, min(r, done))
                ):
                    raise ValueError(
                        f"downloads disagree on {key!r}: pass each client's download of this round"
                    )
                if r > done:
                    ref[key].narrow(dim, 0, r).copy_(d)
                    seen[key] = r
    return ref


def combine_sums(
    method: str,
    global_state: State,
    reference: Mapping[str, torch.Tensor],
    sums: Mapping[str, torch.Tensor],
    denominators: Mapping[str, torch.Tensor],
    total: float,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    keys: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The server's last step, shared by :func:`private_aggregate` and secure aggregation
    (:mod:`fedlora.flower.secagg`): Gaussian noise of std ``noise_std`` added to every
    coordinate of the weighted delta ``sums`` (0: none), division per index by
    ``denominators`` (per key a 0-d total or a 1-D per-index count; an index with count 0
    keeps the reference value), HetLoRA's zero-padded mean over ``total`` weight, Ravan's
    ``s`` reset to 1, FlexLoRA's SVD post-processing. ``reference``: the values the deltas are
    relative to, in the global's layout (float64; Ravan: ``s·H`` folded). Returns the new
    global state in ``global_state``'s dtypes and devices. ``keys``: the keys of the delta
    space (default: those of ``sums`` or ``denominators``); the noise is drawn in their sorted
    order."""
    name, g, ref = method, global_state, reference
    # the noise is drawn key by key in sorted key order: the same numbers whatever the order of
    # the state dict (a checkpointed global comes back in another order than the live one)
    space = sorted(keys if keys is not None else [k for k in ref if k in sums or k in denominators])
    new: dict[str, torch.Tensor] = {}
    std = float(noise_std)
    dims = {key: (1 if key.endswith(B_SUFFIX) else 0) for key in space}
    for key in space:
        shape = ref[key].shape
        s = sums.get(key, torch.zeros(shape, dtype=torch.float64))
        noised = (
            s + torch.randn(shape, generator=generator, dtype=torch.float64) * std if std else s
        )
        d = denominators.get(key, torch.zeros((), dtype=torch.float64))
        if name == "hetlora" and key.endswith((A_SUFFIX, B_SUFFIX)):
            # zero padding: (cov_j · ref[j] + noised sum[j]) / total weight
            if total > 0:
                share = _view(d / total, ref[key], dims[key])
                value = ref[key] * share + noised / total
            else:
                value = ref[key]
        elif d.dim() == 0:
            value = ref[key] + noised / d if float(d) > 0 else ref[key]
        else:
            dv = _view(d, ref[key], dims[key])
            value = torch.where(dv > 0, ref[key] + noised / torch.where(dv > 0, dv, 1.0), ref[key])
        new[key] = value
    out: dict[str, torch.Tensor] = {}
    for key, gv in g.items():
        if key in new:
            val = new[key]
            if name == "ravan" and key.endswith(H_SUFFIX):
                val = val.reshape(gv.shape)
            out[key] = val.to(dtype=gv.dtype, device=gv.device)
        elif name == "ravan" and key.endswith(S_SUFFIX):
            out[key] = torch.ones_like(gv)
        else:
            out[key] = gv.detach().clone()
    if name == "flexlora":
        from fedlora.methods.flexlora import balanced_factors, factored_svd

        for path in lora_paths(g):
            R = g[a_key(path)].shape[0]
            Bn, An = balanced_factors(*factored_svd(new[b_key(path)], new[a_key(path)]), R)
            out[a_key(path)] = An.to(dtype=g[a_key(path)].dtype, device=g[a_key(path)].device)
            out[b_key(path)] = Bn.to(dtype=g[b_key(path)].dtype, device=g[b_key(path)].device)
    return out


def public_denominators(
    method: str,
    global_state: State,
    dp: DPConfig,
    budgets: Sequence[Budget],
    metas: Sequence[Mapping[str, Any] | None],
    weights: Sequence[float],
    *,
    population: Population | None = None,
    head_score: str = ClientOptions.head_score,
) -> tuple[list[str], dict[str, torch.Tensor], float]:
    """The denominators of a DP round that depend on no client's data (module docstring):
    ``(keys, {key: per-index denominator}, total weight)``. ``dp.denominator == "sampled"``:
    the sampled clients' public coverage (``budgets``, ``metas``' public head choices) times
    their bounded ``weights``; ``"expected"``: ``q · Σ_c w_c · P(c covers j)`` over
    ``population``. Every sampled client counts, rejected or not. Used by
    :func:`private_aggregate` and by secure aggregation with DP
    (:class:`fedlora.flower.secagg.SecAggAggregator`)."""
    name, g, n = get_method(method).name, global_state, len(budgets)
    probe = _public_cover(name, g, budgets[0], None, head_score, False) if n else None
    space = (
        list(probe)
        if probe is not None
        else list(
            _public_cover(
                name, g, Budget(rank=1, heads=1, components=1, steps=1), None, head_score, False
            )
        )
    )
    den: dict[str, torch.Tensor] = {}
    total = 0.0
    if dp.denominator == "sampled":
        for k in range(n):
            cov = _public_cover(name, g, budgets[k], metas[k], head_score, True)
            total += weights[k]
            for key, c in cov.items():
                add = (
                    torch.ones((), dtype=torch.float64) * weights[k]
                    if c is None
                    else c * weights[k]
                )
                den[key] = den[key] + add if key in den else add
    else:
        if population is None:
            raise ValueError("denominator='expected' needs the population (its public budgets)")
        pw = bounded_weights(dp, population.num_examples, len(population.budgets), "population")
        q = population.sample_rate
        for b, wc in zip(population.budgets, pw, strict=True):
            cov = _public_cover(name, g, b, None, head_score, False)
            total += q * wc
            for key, c in cov.items():
                add = torch.ones((), dtype=torch.float64) * (q * wc) if c is None else c * (q * wc)
                den[key] = den[key] + add if key in den else add
    return space, den, total


def private_aggregate(
    method: str,
    global_state: State,
    downloads: Sequence[State],
    uploads: Sequence[State],
    metas: Sequence[Mapping[str, Any] | None] | None,
    budgets: Sequence[Budget],
    dp: DPConfig,
    generator: torch.Generator | None = None,
    *,
    num_examples: Sequence[int] | None = None,
    population: Population | None = None,
    options: Mapping[str, Any] | ClientOptions | None = None,
    accountant: PrivacyAccountant | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One round of DP-FedAvg with ``method``'s semantics (module docstring): the server's whole
    step, callable from any round loop.

    Args:
        method: a registered method name; :func:`check_dp_compatible` with ``options`` first.
        global_state: the global adapter state of this round (what the downloads came from).
        downloads, uploads, metas: per sampled client, what it downloaded, what it uploaded
            (clipped by :func:`clip_update` or not: the server clips again) and its meta.
        budgets: per sampled client, its PUBLIC budget (rank, heads...).
        dp: the settings; its noise multiplier must be set (:meth:`DPConfig.resolved`).
        generator: the noise's random source (a seeded CPU generator makes a simulation
            reproducible; None: one seeded from the OS's entropy. torch's generator is not a
            cryptographic one: for a deployment, seed it from a secure source every round).
        num_examples: per sampled client, its example count (``weights="capped"``).
        population: the public facts about every client (``denominator="expected"``).
        options: the run's client / aggregate options (``head_score``, ``hafl_mode``,
            ``weighting``).
        accountant: stepped once for this round (also when every client is rejected); its ε
            goes to ``metrics["epsilon"]``.

    Returns:
        ``(new_global_state, metrics)``: ``dp_clients``, ``dp_accepted``, ``dp_rejected`` (count)
        and ``dp_rejected_clients`` (``[{"client": k, "reason": ...}]``), ``dp_clip_fraction``
        (accepted clients whose norm exceeded ``C``), ``dp_noise_std`` (``z·C``),
        ``dp_noise_multiplier``, ``dp_clip``, ``dp_delta``, ``dp_denominators`` (``{key: [per
        index]}``), ``dp_sample_rate`` (with a population or an accountant), and ``epsilon``
        with ``dp_rounds`` when an accountant is given. The clip fraction is the share the
        SERVER had to clip (about 0 when clients ran :func:`clip_update`; tune ``C`` from the
        norms ``clip_update`` returns), and it is NOT privatised: keep it out of published
        results.
    """
    impl = get_method(method)
    name = impl.name
    check_dp_compatible(name, options)
    if not isinstance(dp, DPConfig):
        raise TypeError(f"dp must be a fedlora.privacy.DPConfig, got {type(dp).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if not all(isinstance(b, Budget) for b in budgets):
        raise TypeError("budgets must be fedlora.methods.Budget objects, one per sampled client")
    if population is not None and not isinstance(population, Population):
        raise TypeError(f"population must be a Population, got {type(population).__name__}")
    if dp.noise_multiplier is None:
        raise ValueError("dp.noise_multiplier is not set: use dp.resolved(rounds, sample_rate)")
    n = len(uploads)
    if len(downloads) != n or len(budgets) != n:
        raise ValueError(
            f"downloads ({len(downloads)}), uploads ({n}) and budgets ({len(budgets)}) must have "
            "one entry per sampled client"
        )
    metas_all = list(metas) if metas is not None else [None] * n
    if len(metas_all) != n:
        raise ValueError(f"metas has {len(metas_all)} entries for {n} clients")
    g = {k: v for k, v in global_state.items()}
    head_score = _option(options, "head_score", ClientOptions.head_score)
    clip, z = float(dp.clip), float(dp.noise_multiplier)
    if generator is None:
        import secrets

        generator = torch.Generator().manual_seed(secrets.randbits(63))

    w = bounded_weights(dp, num_examples, n, "sampled clients'")
    # --- clip every client's delta (the server never trusts a client's own clipping)
    rejected: list[dict[str, Any]] = []
    accepted: list[int] = []
    clipped_count = 0
    sums: dict[str, torch.Tensor] = {}
    for k in range(n):
        meta = dict(metas_all[k] or {})
        try:
            meta.pop("scores", None)  # HAFL's scores are never used under DP
            if impl.check_client is not None:
                impl.check_client(g, uploads[k], meta)
            delta = _client_delta(name, g, downloads[k], uploads[k], meta, budgets[k])
            values, norm = clip_delta(delta.values, clip)
            if not math.isfinite(norm):
                raise _Rejected("non-finite update (NaN/inf)")
        except (_Rejected, ClientRejected, ValueError, TypeError, KeyError, IndexError) as exc:
            rejected.append({"client": k, "reason": (str(exc).splitlines() or [""])[0][:200]})
            continue
        accepted.append(k)
        clipped_count += norm > clip
        for key, v in values.items():
            acc = sums.get(key)
            if acc is None:
                sums[key] = v * w[k]
            else:
                acc.add_(v, alpha=w[k])
    # --- public denominators (every sampled client counts, rejected or not)
    space, den, total = public_denominators(
        name, g, dp, budgets, metas_all, w, population=population, head_score=head_score
    )
    # --- noise on the sums, divide, post-process
    ref = _reference(name, g, downloads, accepted)
    std = z * clip
    out = combine_sums(name, g, ref, sums, den, total, std, generator, space)
    metrics: dict[str, Any] = {
        "dp_clients": n,
        "dp_accepted": len(accepted),
        "dp_rejected": len(rejected),
        "dp_rejected_clients": rejected,
        "dp_clip_fraction": clipped_count / len(accepted) if accepted else 0.0,
        "dp_noise_std": std,
        "dp_noise_multiplier": z,
        "dp_clip": clip,
        "dp_delta": dp.delta,
        "dp_denominators": {
            key: (d.reshape(-1).tolist() if d.dim() else [float(d)]) for key, d in den.items()
        },
    }
    if population is not None or accountant is not None:
        metrics["dp_sample_rate"] = (
            population.sample_rate if population is not None else accountant.sample_rate  # type: ignore[union-attr]
        )
    if accountant is not None:
        accountant.step()
        metrics["epsilon"] = accountant.epsilon
        metrics["dp_rounds"] = accountant.rounds
    return out, metrics


# ------------------------------------------------------------------------------------------------
# the server path of a round loop (fedlora.rounds.Server(dp=...))
# ------------------------------------------------------------------------------------------------

#: purpose tag of the noise generator's seed rule (:func:`fedlora.seeding.key`)
NOISE_TAG = 19


class PrivateAggregator:
    """The DP server step of :class:`fedlora.rounds.Server` (``Server(..., dp=aggregator)``):
    :func:`private_aggregate` on the round's screened replies with each client's real download
    and public budget, and one accountant for the whole run. Used by ``fedlora simulate``, the
    Flower strategy and any other loop over :class:`fedlora.rounds.Server`.

    Args:
        method: a registered method name (:func:`check_dp_compatible` with ``options`` runs here).
        dp: the settings; a target ε is resolved here for ``rounds`` rounds at ``sample_rate``.
        sample_rate: ``q = clients_per_round / clients`` (the accountant's Poisson rate).
        rounds: the run's rounds (only used to resolve a target ε).
        population: every client's public facts (``denominator="expected"``).
        options: the run's client / aggregate options (``head_score``, ``hafl_mode``,
            ``weighting``).
        seed: seeds the noise per round by ``(seed, round)`` (a reproducible simulation); None:
            fresh OS entropy every round (a deployment should use that).
        rounds_done: rounds already counted (a resumed run).
    """

    def __init__(
        self,
        method: str,
        dp: DPConfig,
        *,
        sample_rate: float,
        rounds: int | None = None,
        population: Population | None = None,
        options: Mapping[str, Any] | ClientOptions | None = None,
        seed: int | None = None,
        rounds_done: int = 0,
    ) -> None:
        self.method = get_method(method).name
        check_dp_compatible(self.method, options)
        if not isinstance(dp, DPConfig):
            raise TypeError(f"dp must be a fedlora.privacy.DPConfig, got {type(dp).__name__}")
        if dp.noise_multiplier is None:
            if rounds is None:
                raise ValueError("a target epsilon needs rounds= to resolve the noise multiplier")
            dp = dp.resolved(_check_rounds(rounds), sample_rate)
        if dp.denominator == "expected" and population is None:
            raise ValueError("denominator='expected' needs population= (every client's budget)")
        self.dp, self.population, self.options = dp, population, options
        self.seed = None if seed is None else int(seed)
        self.accountant = PrivacyAccountant.for_config(dp, sample_rate)
        self.accountant.step(rounds_done)

    @property
    def epsilon(self) -> float:
        """ε after the rounds counted so far."""
        return self.accountant.epsilon

    def _generator(self, round_idx: int) -> torch.Generator | None:
        if self.seed is None:
            return None
        from fedlora.seeding import key

        return torch.Generator().manual_seed(key(self.seed, round_idx, NOISE_TAG))

    def skip(self, round_idx: int) -> dict[str, Any]:
        """A round in which no reply reached the aggregation: it still counts (a sampled round
        spends privacy whatever its clients send). Returns the round's metrics."""
        self.accountant.step()
        return {
            "epsilon": self.accountant.epsilon,
            "dp_rounds": self.accountant.rounds,
            "dp_noise_multiplier": self.dp.noise_multiplier,
            "clients_used": 0,
        }

    def aggregate(
        self, server: Any, round_idx: int, replies: Sequence[Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The round's new global state and metrics from ``server`` (a
        :class:`fedlora.rounds.Server`, after :meth:`~fedlora.rounds.Server.configure`) and its
        screened replies: each client's download is recomputed from the server's global state
        and the client's budget (exactly what it was sent), the weights are the replies'
        ``weight`` (example counts; only ``weights="capped"`` reads them). The metrics carry
        ``rejected`` (``{"client": index into replies, "reason"}``) and ``clients_used`` as
        :func:`fedlora.aggregate`'s do, plus :func:`private_aggregate`'s ``dp_*`` and
        ``epsilon``."""
        g = server.global_state
        budgets, downloads = server.sent(replies)
        counts = [r.weight if r.weight is not None else 0 for r in replies]
        new, metrics = private_aggregate(
            self.method,
            g,
            downloads,
            [r.state or {} for r in replies],
            [r.meta for r in replies],
            budgets,
            self.dp,
            self._generator(round_idx),
            num_examples=counts if self.dp.weights == "capped" else None,
            population=self.population,
            options=self.options,
            accountant=self.accountant,
        )
        metrics["rejected"] = [dict(e) for e in metrics["dp_rejected_clients"]]
        metrics["clients_used"] = metrics["dp_accepted"]
        return new, metrics
