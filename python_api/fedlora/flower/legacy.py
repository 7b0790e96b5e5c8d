"""``FedLoRALegacyStrategy``: the pre-Message-API adapter (``flwr.server.strategy.FedAvg``).

Importing this module imports flwr; :mod:`fedlora.flower` imports it on first access to
:class:`FedLoRALegacyStrategy`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedlora.flower._rounds import RoundCore, decode_fit_results
from fedlora.flower.codec import META_KEY, _flwr_error, ndarrays_to_state, state_to_ndarrays

try:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg
except ImportError as e:  # pragma: no cover - fedlora.flower reports it on access
    raise _flwr_error() from e

__all__ = ["FedLoRALegacyStrategy"]


class FedLoRALegacyStrategy(RoundCore, FedAvg):
    """Pre-Message-API adapter: ``flwr.server.strategy.FedAvg`` whose ``aggregate_fit`` calls
    :func:`fedlora.aggregate`.

    Parameters travel as NDArrays in the fixed order ``keys`` (e.g.
    ``list(get_peft_model_state_dict(model))``); clients convert with
    :func:`~fedlora.flower.state_to_ndarrays` / :func:`~fedlora.flower.ndarrays_to_state`. The
    weight is ``FitRes.num_examples``; a client meta travels JSON-encoded in
    ``FitRes.metrics[meta_key]``. Bad updates are left out and reported in the returned metrics
    (``num_rejected`` and ``rejected``, a JSON list of ``[cid, reason]``). Replies go through the
    same round path as :class:`~fedlora.flower.FedLoRAStrategy` (:mod:`fedlora.flower._rounds`).
    """

    def __init__(
        self,
        method: str,
        keys: Sequence[str],
        *,
        initial_state: Mapping[str, torch.Tensor] | None = None,
        aggregate_fn: Callable[..., tuple[dict, dict]] | None = None,
        aggregate_options: Mapping[str, Any] | None = None,
        meta_key: str = META_KEY,
        **kwargs: Any,
    ) -> None:
        if isinstance(keys, str) or not isinstance(keys, Sequence) or not keys:
            raise ValueError(f"keys must be a non-empty list of state-dict keys, got {keys!r}")
        self.keys = list(keys)
        self._init_core(method, initial_state, aggregate_fn, aggregate_options, meta_key)
        if self.global_state is not None and "initial_parameters" not in kwargs:
            arrays = state_to_ndarrays(self.global_state, self.keys)
            kwargs["initial_parameters"] = ndarrays_to_parameters(arrays)
        super().__init__(**kwargs)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        """Record the global state the clients receive, then FedAvg's configuration."""
        self.global_state = ndarrays_to_state(parameters_to_ndarrays(parameters), self.keys)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]
    ) -> tuple[Any | None, dict[str, Any]]:
        """``fedlora.aggregate`` over the fit results; failures count as rejected."""
        if failures and not self.accept_failures:
            return None, {"aggregation_failed": 1, "num_rejected": len(failures)}
        clients = decode_fit_results(results, failures, self.keys, self.meta_key)
        result = self.finish_round(server_round, clients)
        metrics: dict[str, Any] = {
            k: v for k, v in result.scalar_metrics().items() if not isinstance(v, list)
        }
        metrics["rejected"] = json.dumps([[str(c), why] for c, why in result.rejected])
        if result.state is None:
            return None, metrics
        return ndarrays_to_parameters(state_to_ndarrays(self.global_state, self.keys)), metrics
