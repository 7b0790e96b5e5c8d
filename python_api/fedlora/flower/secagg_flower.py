"""SecAgg+ over Flower for the methods of :data:`fedlora.flower.secagg.SECAGG_METHODS`.

Importing this module imports flwr. The server runs Flower's legacy workflow with
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` and :class:`SecAggStrategy`; every
ClientApp is built with ``mods=[secaggplus_mod]`` and its ``fit`` returns
:func:`secagg_fit_reply` (one packed vector, ``num_examples = max_weight``). Parameters travel
as NDArrays of the global state in the fixed order ``keys``.

Clipping: the workflow clips every entry to ``[-clipping_range, clipping_range]`` before
quantising. A packed vector's entries are a weight ≤ 1 times the delta and the coverage (≤ 1),
so with a joint clip ``C ≤ clipping_range`` (``clip=`` of :func:`secagg_fit_reply`, which DP
needs anyway) nothing is clipped by the workflow; without one, an entry of the delta beyond the
range would be silently clipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedlora.flower.codec import _flwr_error, ndarrays_to_state, state_to_ndarrays
from fedlora.flower.secagg import Layout, check_secagg, sum_from_workflow_mean

try:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg
except ImportError as e:  # pragma: no cover
    raise _flwr_error() from e

__all__ = ["SecAggStrategy", "secagg_fit_reply"]


class SecAggStrategy(FedAvg):
    """A legacy Flower strategy whose ``aggregate_fit`` receives ``SecAggPlusWorkflow``'s
    unmasked mean of the packed vectors and unpacks it (:meth:`Layout.unpack`) into the new
    global state: PreLort's segment-wise, Ravan's per-head and FedIT / FFA-LoRA / HetLoRA's
    weighted means, from sums the server only sees in aggregate.

    Args:
        method: a method of :data:`fedlora.flower.secagg.SECAGG_METHODS`.
        keys: the state-dict keys in the order the NDArrays travel.
        initial_state: the global state before round 1.
        options: the run's options (``weighting`` for HetLoRA).
        dp: a resolved :class:`fedlora.privacy.DPConfig`: Gaussian noise of std ``z·C`` added
            to the unmasked sum (the clients clip to ``C``); with ``accountant`` stepped every
            round (ε in the round's metrics).
        accountant: a :class:`fedlora.privacy.PrivacyAccountant`.
        seed: seeds the noise per round (None: OS entropy).
        **kwargs: FedAvg's (``min_fit_clients``, ``on_fit_config_fn``, ...).
    """

    def __init__(
        self,
        method: str,
        keys: Sequence[str],
        *,
        initial_state: Mapping[str, torch.Tensor],
        options: Mapping[str, Any] | None = None,
        dp: Any = None,
        accountant: Any = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.method = check_secagg(method, options)
        self.keys, self.options = list(keys), dict(options or {})
        self.global_state = {k: initial_state[k] for k in self.keys}
        self.dp, self.accountant, self.seed = dp, accountant, seed
        self.history: list[dict[str, torch.Tensor]] = [dict(self.global_state)]
        self.layout: Layout | None = None
        kwargs.setdefault(
            "initial_parameters",
            ndarrays_to_parameters(state_to_ndarrays(self.global_state, self.keys)),
        )
        super().__init__(**kwargs)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        """The round's layout from the global state the clients receive; FedAvg's sampling."""
        self.global_state = ndarrays_to_state(parameters_to_ndarrays(parameters), self.keys)
        self.layout = Layout(self.method, self.global_state, self.options)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]
    ) -> tuple[Any | None, dict[str, Any]]:
        """Unpack the securely summed vector (every result carries the workflow's mean)."""
        if not results or self.layout is None:
            if self.accountant is not None:
                self.accountant.step()
            return None, {"num_failures": len(failures)}
        arrays = parameters_to_ndarrays(results[0][1].parameters)
        summed = sum_from_workflow_mean(arrays, len(results))
        std, gen = 0.0, None
        if self.dp is not None:
            std = float(self.dp.noise_multiplier) * float(self.dp.clip)
            if self.seed is not None:
                from fedlora.privacy import NOISE_TAG
                from fedlora.seeding import key

                gen = torch.Generator().manual_seed(key(self.seed, server_round, NOISE_TAG))
        new, metrics = self.layout.unpack(summed, noise_std=std, generator=gen)
        if self.accountant is not None:
            self.accountant.step()
            metrics["epsilon"] = self.accountant.epsilon
        metrics["num_failures"] = len(failures)
        self.global_state = {k: new[k] for k in self.keys}
        self.history.append(dict(self.global_state))
        return ndarrays_to_parameters(state_to_ndarrays(self.global_state, self.keys)), metrics


def secagg_fit_reply(
    method: str,
    keys: Sequence[str],
    parameters: Sequence[np.ndarray],
    train: Callable[[dict[str, torch.Tensor]], tuple[Mapping[str, torch.Tensor], Mapping]],
    download: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    weight: float = 1.0,
    clip: float | None = None,
    max_weight: float = 1000.0,
    options: Mapping[str, Any] | None = None,
) -> tuple[list[np.ndarray], int, dict[str, Any]]:
    """A ``NumPyClient.fit`` reply for ``secaggplus_mod``: the global state from
    ``parameters``, the client's ``download`` of it (its rank prefix...), ``train(download) ->
    (upload, meta)``, then the packed vector of the round's :class:`Layout` (clipped jointly to
    ``clip`` under DP, times the client's bounded ``weight``), sent with ``num_examples =
    max_weight`` (the workflow's ``max_weight``: ratio 1, so the server gets the plain mean)."""
    g = ndarrays_to_state(list(parameters), list(keys))
    layout = Layout(method, g, options)
    down = download(g)
    upload, meta = train(down)
    vec = layout.pack(down, upload, meta, weight=weight, clip=clip)
    return [vec], int(max_weight), {}
