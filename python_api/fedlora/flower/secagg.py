"""Secure aggregation of heterogeneous-rank LoRA updates: a fixed per-round layout (DESIGN §11).

Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the ClientApp)
sums integer vectors of the SAME length on every client: each client's ``FitRes`` arrays are
multiplied by its weight ratio, clipped to ``[-clipping_range, clipping_range]``, stochastically
quantised to ``[0, quantization_range)``, masked and summed; the server unmasks only the sum and
passes the weighted MEAN of the clients' arrays to ``Strategy.aggregate_fit``. Heterogeneous
ranks (PreLort's prefixes, Ravan's trained heads) do not fit that as they are, and zero-padding
alone would dilute PreLort's segment-wise mean. This module makes them fit:

- :class:`Layout` (one per round, from the global state): every key the method aggregates in
  the GLOBAL's shape (rank prefixes padded to the global rank ``R``, Ravan's ``s·H`` rows of
  every head), then a COVERAGE-COUNT vector: per rank index / head / whole key, the weight of
  the clients that cover it, then the total weight and a rejected-client count.
- :meth:`Layout.pack` (client): ``[w·δ (padded), w·coverage, w, rejected]`` where ``δ`` is the
  update of exactly what the method aggregates (:func:`fedlora.privacy.client_delta`, jointly
  clipped to ``clip`` under DP), ``w ∈ (0, 1]`` the client's bounded weight. A non-finite update
  packs zeros and ``rejected = 1`` (the server cannot reject what it never sees).
- :meth:`Layout.unpack` (server): from the SUM of the packed vectors, the per-index means
  ``ref + Σ w·δ_j / Σ w·cover_j`` (PreLort's segment-wise and Ravan's per-head averages,
  FedIT's / FFA-LoRA's weighted means, HetLoRA's zero-padded mean over the total weight)
  through :func:`fedlora.privacy.combine_sums`, with Gaussian noise of std ``z·C`` added to the
  sums under DP (DP and SecAgg together: the server sees only the sum, and publishes the noised
  result; the clipping must then be the client's, since nobody can clip an update they never
  see).

Every client sends its vector with ``num_examples = max_weight`` of the workflow (ratio 1, so
the workflow's mean is ``Σ_k v_k / n``), and the server multiplies the mean by the number of
results ``n`` to get the sum (:func:`sum_from_workflow_mean`).

Methods whose aggregate needs each client's own factors cannot run under SecAgg: FLoRA (stacks
them), FLoRA-NA (fits per-client coefficients), FlexLoRA (per-client products for its SVD),
FedEx-LoRA (per-client residuals). HAFL is refused as well (its components are placed by the
server's per-client choice and its scores are per-client statistics). :func:`check_secagg`
raises the one-line refusal.

Quantisation error (see :func:`tolerance`): stochastic rounding moves each client's entry by less
than one step ``Δ = 2·clipping_range / quantization_range``, so the sum of ``n`` clients is off by
less than ``n·Δ`` per entry, and the workflow's mean by less than ``Δ`` (then times ``n``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlora.keys import A_SUFFIX, B_SUFFIX, H_SUFFIX
from fedlora.methods import get as get_method

__all__ = [
    "SECAGG_METHODS",
    "SECAGG_REFUSED",
    "Layout",
    "SecAggAggregator",
    "check_secagg",
    "sum_from_workflow_mean",
    "tolerance",
]

#: the methods whose aggregate is a (segment-wise / per-head) weighted mean of the uploads
SECAGG_METHODS = ("fedit", "ffa", "prelort", "hetlora", "ravan")
#: the refused methods and why (one line each)
SECAGG_REFUSED = {
    "flora": "FLoRA stacks every client's own factors into the global (not a sum)",
    "florana": "FLoRA-NA fits per-client coefficients to each client's own factors",
    "flexlora": "FlexLoRA's SVD needs each client's own product B_k A_k (not a sum of factors)",
    "fedex": "FedEx-LoRA's residual needs each client's own product B_k A_k",
    "hafl": "HAFL's components are placed per client and its scores are per-client statistics",
}


def check_secagg(method: str, options: Mapping[str, Any] | None = None) -> str:
    """``method``'s registered name if it can run under secure aggregation, else a one-line
    ``ValueError`` with the reason. HetLoRA needs ``weighting='data'`` (the sparsity weight is
    normalised over the clients' own updates)."""
    name = get_method(method).name
    if name in SECAGG_REFUSED:
        raise ValueError(f"secure aggregation with {name!r} is refused: {SECAGG_REFUSED[name]}")
    if name not in SECAGG_METHODS:
        raise ValueError(f"secure aggregation with {name!r} is refused: no fixed layout for it")
    from fedlora.privacy import hetlora_weighting, method_option

    if name == "prelort" and method_option(options, "prelort_aggregation") != "segment":
        raise ValueError(
            "secure aggregation with prelort needs prelort_aggregation='segment': the layout "
            "computes the segment-wise mean (--prelort-aggregation segment)"
        )
    if name == "hetlora" and method_option(options, "hetlora_prune"):
        raise ValueError(
            "secure aggregation with hetlora refuses hetlora_prune: a pruned client's rank "
            "leaves its public budget, which the layout's coverage counts assume"
        )
    if name == "hetlora" and hetlora_weighting(options) != "data":
        raise ValueError(
            "secure aggregation with hetlora needs weighting='data': the sparsity weight is "
            "normalised over every client's own update"
        )
    return name


@dataclass(frozen=True)
class _Slot:
    key: str
    shape: tuple[int, ...]
    offset: int
    dim: int  # the index dimension of the coverage counts (-1: one count for the whole key)
    count_offset: int
    counts: int


class Layout:
    """The fixed layout of one round (see the module docstring).

    Args:
        method: a method of :data:`SECAGG_METHODS`.
        global_state: the round's global state (every client's download comes from it).
        options: the run's options (``weighting`` for HetLoRA).
    """

    def __init__(
        self,
        method: str,
        global_state: Mapping[str, torch.Tensor],
        options: Mapping[str, Any] | None = None,
    ) -> None:
        from fedlora import privacy

        self.method = check_secagg(method, options)
        if not isinstance(global_state, Mapping) or not global_state:
            raise ValueError("global_state must be a non-empty dict of tensors")
        self.global_state = dict(global_state)
        ref = privacy._reference(self.method, self.global_state, [], [])
        space = [k for k in privacy._other_keys(self.method, self.global_state)]
        if self.method == "ravan":
            space += [p + H_SUFFIX for p in privacy._ravan_paths(self.global_state)]
        else:
            for path in privacy.lora_paths(self.global_state):
                if self.method != "ffa":
                    space.append(path + A_SUFFIX)
                space.append(path + B_SUFFIX)
        slots, offset = [], 0
        for key in space:
            shape = tuple(ref[key].shape)
            if key.endswith(A_SUFFIX) or key.endswith(H_SUFFIX):
                dim = 0
            elif key.endswith(B_SUFFIX):
                dim = 1
            else:
                dim = -1
            slots.append([key, shape, offset, dim])
            offset += math.prod(shape)
        self.values_size = offset
        self.slots: list[_Slot] = []
        for key, shape, off, dim in slots:
            counts = shape[dim] if dim >= 0 else 1
            self.slots.append(_Slot(key, shape, off, dim, offset, counts))
            offset += counts
        self.total_index, self.rejected_index = offset, offset + 1
        self.size = offset + 2
        self.reference = {s.key: ref[s.key] for s in self.slots}

    # ------------------------------------------------------------------------------ client
    def pack(
        self,
        download: Mapping[str, torch.Tensor],
        upload: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any] | None = None,
        *,
        weight: float = 1.0,
        clip: float | None = None,
        budget: Any = None,
    ) -> np.ndarray:
        """One client's vector (float64, length :attr:`size`): ``[w·δ, w·coverage, w,
        rejected]``. ``weight``: the client's bounded weight in (0, 1] (e.g. ``min(n_k, cap) /
        cap``); ``clip``: the DP clip norm (None: no clipping); ``budget``: the client's PUBLIC
        budget (:class:`fedlora.methods.Budget`), which the upload's rank must match (as
        :func:`fedlora.privacy.private_aggregate` requires). A malformed upload (the method's
        own client check included) raises ``ValueError``; a non-finite one packs zeros with
        ``rejected = 1``."""
        from fedlora import privacy
        from fedlora.methods import ClientRejected

        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight!r}")
        meta = dict(meta or {})
        impl = get_method(self.method)
        if impl.check_client is not None:
            try:
                impl.check_client(self.global_state, upload, meta)
            except ClientRejected as exc:
                raise ValueError(str(exc)) from None
        delta = privacy.client_delta(self.method, self.global_state, download, upload, meta, budget)
        values = delta.values
        if clip is not None:
            values, norm = privacy.clip_delta(values, clip)
        else:
            norm = privacy._norm(values)
        out = np.zeros(self.size, dtype=np.float64)
        if not math.isfinite(norm):
            out[self.rejected_index] = 1.0
            return out
        for s in self.slots:
            v = values[s.key].reshape(-1).numpy()
            out[s.offset : s.offset + v.size] = weight * v
            cover = delta.cover.get(s.key)
            c = np.ones(s.counts) if cover is None else cover.numpy()
            out[s.count_offset : s.count_offset + s.counts] = weight * c
        out[self.total_index] = weight
        return out

    # ------------------------------------------------------------------------------ server
    def unpack(
        self,
        summed: np.ndarray | Sequence[float],
        *,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
        denominators: Mapping[str, torch.Tensor] | None = None,
        total: float | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The new global state from the SUM of the clients' packed vectors: per index,
        ``reference + (Σ w·δ + noise) / Σ w·cover`` (HetLoRA: the zero-padded mean over the
        total weight). ``noise_std``: DP's ``z·C`` (0 without DP); ``denominators`` /
        ``total``: public ones (DP's expected denominators) instead of the securely summed
        coverage counts. Returns ``(state, metrics)`` with ``secagg_weight`` (the summed
        total weight) and ``secagg_rejected`` (the summed rejected count)."""
        from fedlora import privacy

        v = np.asarray(summed, dtype=np.float64).reshape(-1)
        if v.size != self.size:
            raise ValueError(f"summed vector has length {v.size}, the layout {self.size}")
        if not np.isfinite(v).all():
            raise ValueError("summed vector is not finite")
        sums, den = {}, {}
        for s in self.slots:
            sums[s.key] = torch.from_numpy(
                v[s.offset : s.offset + math.prod(s.shape)].reshape(s.shape).copy()
            )
            c = torch.from_numpy(v[s.count_offset : s.count_offset + s.counts].copy())
            den[s.key] = c.reshape(()) if s.dim < 0 else c
        tot = float(v[self.total_index]) if total is None else float(total)
        if denominators is not None:
            den = {k: torch.as_tensor(d, dtype=torch.float64) for k, d in denominators.items()}
        state = privacy.combine_sums(
            self.method,
            self.global_state,
            self.reference,
            sums,
            den,
            tot,
            noise_std,
            generator,
            [s.key for s in self.slots],
        )
        metrics = {
            "secagg_weight": float(v[self.total_index]),
            "secagg_rejected": round(float(v[self.rejected_index])),
        }
        return state, metrics


def sum_from_workflow_mean(arrays: Sequence[np.ndarray], num_results: int) -> np.ndarray:
    """The SUM of the clients' packed vectors from what ``SecAggPlusWorkflow`` hands to
    ``Strategy.aggregate_fit`` (the mean over ``num_results`` clients, every client having sent
    ``num_examples = max_weight``)."""
    if isinstance(num_results, bool) or not isinstance(num_results, int) or num_results < 1:
        raise ValueError(f"num_results must be a positive int, got {num_results!r}")
    flat = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])
    return flat * num_results


def tolerance(
    num_clients: int, clipping_range: float = 8.0, quantization_range: int = 2**22
) -> float:
    """The bound on the error of each entry of the securely computed SUM: each client's entry
    is stochastically rounded to a step ``Δ = 2·clipping_range / quantization_range`` (error
    below ``Δ``), so ``n`` clients' sum is off by less than ``n·Δ``."""
    return num_clients * 2.0 * clipping_range / quantization_range


#: purpose tag of the stochastic quantisation's seed rule (:func:`fedlora.seeding.key`)
QUANT_TAG = 23


class SecAggAggregator:
    """A round of SecAgg+ in a simulation: the server step of :class:`fedlora.rounds.Server`
    (``Server(..., dp=aggregator)``, the hook DP's :class:`fedlora.privacy.PrivateAggregator`
    uses) for ``fedlora simulate --secagg``.

    Every screened reply is packed by :meth:`Layout.pack` (against the client's real download,
    clipped jointly to ``C`` under DP), then goes through the arithmetic of Flower's
    ``secaggplus_mod`` as it is: the weight ratio ``num_examples / max_weight`` (1 here: the
    weight is inside the vector), the clip to ``±clipping_range`` and the stochastic
    quantisation to ``[0, quantization_range)`` (``flwr``'s own ``quantize``), the sum modulo
    ``modulus_range``, and ``SecAggPlusWorkflow``'s dequantisation of the sum. The pairwise
    and private masks are left out: they cancel exactly in the modular sum, so the server's
    vector is the one it would unmask. :meth:`Layout.unpack` turns it into the new global (with
    DP: Gaussian noise of std ``z·C`` on the sums, public denominators, the accountant stepped).
    The result equals the method's plain rule within :func:`tolerance` per entry of the sum.

    Args:
        method: a method of :data:`SECAGG_METHODS` (:func:`check_secagg` runs here).
        options: the run's options (``weighting`` for HetLoRA; ``head_score`` under DP).
        max_examples: the example count of weight 1 without DP: client ``k`` packs with weight
            ``n_k / max_examples`` (the largest count of the population gives the plain rule's
            data weighting exactly). Ignored under DP (``dp.weights`` decides).
        dp: a :class:`fedlora.privacy.DPConfig` with its noise multiplier set, or None.
        sample_rate: ``q`` of the accountant (DP only).
        population: every client's public budget (DP's ``denominator="expected"``).
        seed: seeds the quantisation's rounding and DP's noise per round; None: OS entropy.
        rounds_done: rounds already counted by the accountant (a resumed run).
        clipping_range, quantization_range, modulus_range: ``SecAggPlusWorkflow``'s settings.
    """

    def __init__(
        self,
        method: str,
        *,
        options: Mapping[str, Any] | None = None,
        max_examples: float = 1.0,
        dp: Any = None,
        sample_rate: float = 1.0,
        population: Any = None,
        seed: int | None = None,
        rounds_done: int = 0,
        clipping_range: float = 8.0,
        quantization_range: int = 2**22,
        modulus_range: int = 2**32,
    ) -> None:
        from fedlora import privacy

        self.method = check_secagg(method, options)
        self.options = dict(options or {})
        if not (isinstance(clipping_range, (int, float)) and 0 < clipping_range < math.inf):
            raise ValueError(f"clipping_range must be a positive number, got {clipping_range!r}")
        for name, v in (
            ("quantization_range", quantization_range),
            ("modulus_range", modulus_range),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"{name} must be an int >= 2, got {v!r}")
        if modulus_range <= quantization_range:
            raise ValueError("modulus_range must be larger than quantization_range")
        if quantization_range >= 2**31:  # flwr's stochastic rounding casts to int32
            raise ValueError(f"quantization_range must be below 2**31, got {quantization_range}")
        if not (isinstance(max_examples, (int, float)) and max_examples > 0):
            raise ValueError(f"max_examples must be a positive number, got {max_examples!r}")
        self.clipping_range, self.quantization_range = float(clipping_range), quantization_range
        self.modulus_range, self.max_examples = modulus_range, float(max_examples)
        self.seed = None if seed is None else int(seed)
        self.dp, self.population, self.accountant = dp, population, None
        if dp is not None:
            privacy.check_dp_compatible(self.method, self.options)
            if dp.noise_multiplier is None:
                raise ValueError("dp.noise_multiplier is not set: use dp.resolved(rounds, q)")
            if dp.clip > clipping_range:
                raise ValueError(
                    f"the DP clip norm {dp.clip} exceeds clipping_range {clipping_range}: the "
                    "workflow would clip entries of clipped updates again"
                )
            if dp.denominator == "expected" and population is None:
                raise ValueError("denominator='expected' needs population= (every client's budget)")
            self.accountant = privacy.PrivacyAccountant.for_config(dp, sample_rate)
            self.accountant.step(rounds_done)

    @property
    def epsilon(self) -> float | None:
        """ε after the rounds counted so far (None without DP)."""
        return None if self.accountant is None else self.accountant.epsilon

    def _key(self, *parts: int) -> int:
        import secrets

        from fedlora.seeding import key

        return key(self.seed, *parts) if self.seed is not None else secrets.randbits(63)

    def skip(self, round_idx: int) -> dict[str, Any]:
        """A round in which no reply reached the aggregation (under DP it still counts)."""
        if self.accountant is None:
            return {"clients_used": 0}
        self.accountant.step()
        return {
            "epsilon": self.accountant.epsilon,
            "dp_rounds": self.accountant.rounds,
            "dp_noise_multiplier": float(self.dp.noise_multiplier),
            "clients_used": 0,
        }

    def quantized_sum(self, vectors: Sequence[np.ndarray], round_idx: int) -> np.ndarray:
        """The SUM of ``vectors`` as ``SecAggPlusWorkflow`` reconstructs it (see the class
        docstring): each vector clipped and stochastically quantised by ``flwr``'s
        ``quantize`` (rounding seeded per round and client), summed modulo ``modulus_range``,
        dequantised and shifted as the workflow does, times the number of vectors."""
        from flwr.common.secure_aggregation.quantization import dequantize, quantize

        n = len(vectors)
        if n * self.quantization_range >= self.modulus_range:
            raise ValueError(
                f"{n} clients x quantization_range {self.quantization_range} overflow "
                f"modulus_range {self.modulus_range}"
            )
        total = np.zeros(vectors[0].shape, dtype=np.int64)
        state = np.random.get_state()  # flwr's rounding draws from numpy's global generator
        try:
            for k, v in enumerate(vectors):
                np.random.seed(self._key(round_idx, k, QUANT_TAG) % 2**32)
                (q,) = quantize([v], self.clipping_range, self.quantization_range)
                total = (total + q.astype(np.int64)) % self.modulus_range
        finally:
            np.random.set_state(state)
        (mean,) = dequantize([total], self.clipping_range, self.quantization_range)
        mean = (mean - (n - 1) * self.clipping_range) / n  # the workflow's offset and ratio
        return sum_from_workflow_mean([mean], n)

    def aggregate(
        self, server: Any, round_idx: int, replies: Sequence[Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The round's new global state and metrics from ``server`` (after
        :meth:`~fedlora.rounds.Server.configure`) and its screened replies. A malformed upload
        is rejected by its client before packing (named in ``rejected``); a non-finite one is
        packed as zeros and counted in ``secagg_rejected`` (a real server only sees the count;
        the simulation also names the client in ``rejected`` for its bookkeeping)."""
        from fedlora import privacy

        g = server.global_state
        layout = Layout(self.method, g, self.options)
        budgets, downloads = server.sent(replies)
        clip = None if self.dp is None else float(self.dp.clip)
        if self.dp is None:
            weights = [min(1.0, float(r.weight or 0.0) / self.max_examples) for r in replies]
        else:
            counts = [r.weight if r.weight is not None else 0 for r in replies]
            weights = privacy.bounded_weights(self.dp, counts, len(replies), "sampled clients'")
        vectors: list[np.ndarray] = []
        rejected: list[dict[str, Any]] = []
        zero = 0
        clipped = 0
        for i, (r, b) in enumerate(zip(replies, budgets, strict=True)):
            w = weights[i]
            if w == 0:  # capped weights, no examples: contributes nothing (as under plain DP)
                zero += 1
                continue
            try:
                if not w > 0:
                    raise ValueError(f"weight {w} is not positive")
                vec = layout.pack(
                    downloads[i], r.state or {}, r.meta, weight=min(w, 1.0), clip=clip, budget=b
                )
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                rejected.append({"client": i, "reason": (str(exc).splitlines() or [""])[0][:200]})
                continue
            if vec[layout.rejected_index] > 0:
                rejected.append({"client": i, "reason": "non-finite update (packed as zeros)"})
            clipped += int((np.abs(vec) > self.clipping_range).sum())
            vectors.append(vec)
        if not vectors:
            return dict(g), {**self.skip(round_idx), "rejected": rejected}
        summed = self.quantized_sum(vectors, round_idx)
        std, gen, den, total = 0.0, None, None, None
        if self.dp is not None:
            std = float(self.dp.noise_multiplier) * float(self.dp.clip)
            gen = torch.Generator().manual_seed(self._key(round_idx, privacy.NOISE_TAG))
            head_score = self.options.get("head_score", "weight")
            # every sampled client counts, rejected or not (as in private_aggregate)
            _, den, total = privacy.public_denominators(
                self.method, g, self.dp, budgets, [r.meta for r in replies], weights,
                population=self.population, head_score=head_score,
            )  # fmt: skip
        new, metrics = layout.unpack(
            summed, noise_std=std, generator=gen, denominators=den, total=total
        )
        metrics["secagg_clients"] = len(vectors)
        metrics["secagg_clipped_entries"] = clipped
        metrics["rejected"] = rejected
        metrics["clients_used"] = len(vectors) + zero - metrics["secagg_rejected"]
        if self.accountant is not None:
            self.accountant.step()
            metrics["epsilon"] = self.accountant.epsilon
            metrics["dp_noise_multiplier"] = float(self.dp.noise_multiplier)
        return new, metrics
