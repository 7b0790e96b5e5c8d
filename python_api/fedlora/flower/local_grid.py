"""``LocalGrid``: a Flower ``Grid`` that runs a ``ClientApp`` in this process.

Importing this module imports flwr; :mod:`fedlora.flower` imports it on first access to
:class:`LocalGrid`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedlora.flower.codec import _flwr_error

try:
    from flwr.app import Context, Error, Message, RecordDict
    from flwr.serverapp import Grid
except ImportError as e:  # pragma: no cover - fedlora.flower reports it on access
    raise _flwr_error() from e

__all__ = ["LocalGrid"]


class LocalGrid(Grid):
    """A Flower ``Grid`` that runs a ``ClientApp`` in this process, one node after another.

    For tests, debugging and machines without Ray: ``strategy.start(grid=LocalGrid(app, 4),
    ...)`` or ``server_app(LocalGrid(client_app, 4), context)`` run real Flower messages
    through the real ``ClientApp`` dispatch, deterministically. Node ``i`` (id ``i + 1``)
    gets ``node_config = {"partition-id": i, "num-partitions": num_nodes}`` updated with
    ``node_configs[i]`` (e.g. ``{"budget-rank": 2}``, the keys a SuperNode's ``--node-config``
    sets, see :mod:`fedlora.flower.budget`) and keeps its ``Context`` across rounds.
    ``node_ids`` replaces the ids ``1..num_nodes`` (a deployment's are random 64-bit ints). A
    ``ClientApp`` exception becomes an error reply, as in a deployment. Messages are
    deep-copied on the way in and out, as the wire would.
    """

    def __init__(
        self,
        client_app: Any,
        num_nodes: int = 2,
        *,
        run_config: Mapping[str, Any] | None = None,
        run_id: int = 1,
        node_configs: Sequence[Mapping[str, Any]] | None = None,
        node_ids: Sequence[int] | None = None,
    ) -> None:
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
        if not callable(client_app):
            raise TypeError(f"client_app must be a ClientApp, got {type(client_app).__name__}")
        extra = [{} for _ in range(num_nodes)] if node_configs is None else list(node_configs)
        if len(extra) != num_nodes or not all(isinstance(c, Mapping) for c in extra):
            raise ValueError(f"node_configs must be {num_nodes} dicts, got {node_configs!r}")
        ids = list(range(1, num_nodes + 1)) if node_ids is None else list(node_ids)
        if len(set(ids)) != num_nodes or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in ids
        ):
            raise ValueError(
                f"node_ids must be {num_nodes} distinct positive ints, got {node_ids!r}"
            )
        self.client_app = client_app
        self._run = None
        self._replies: dict[str, Any] = {}
        self.contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes, **extra[i]},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, nid in enumerate(ids)
        }
        _ensure_task_identity(run_id)

    def set_run(self, run: Any) -> None:
        """Record the run (unused by the in-process delivery)."""
        self._run = run

    @property
    def run(self) -> Any:
        """The run set with :meth:`set_run` (None by default)."""
        return self._run

    def create_message(
        self,
        content: Any,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Any:
        """A new instruction message."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """Ids of the in-process nodes (``1..num_nodes`` unless ``node_ids`` was given)."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        """Deliver now; the returned ids index the stored replies."""
        ids = []
        for msg in messages:
            key = str(len(self._replies))
            self._replies[key] = self._deliver(msg)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        """The replies of pushed messages (each returned once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Any], *, timeout: float | None = None
    ) -> list[Any]:
        """Deliver every message and return the replies, in order."""
        return [self._deliver(msg) for msg in messages]

    def _deliver(self, msg: Any) -> Any:
        nid = msg.metadata.dst_node_id
        context = self.contexts.get(nid)
        if context is None:
            return Message(Error(code=0, reason=f"unknown node {nid}"), reply_to=msg)
        incoming = copy.deepcopy(msg)
        try:
            reply = self.client_app(incoming, context)
        except Exception as e:  # a client crash is an error reply, as on a real SuperNode
            return Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
        return copy.deepcopy(reply)


def _ensure_task_identity(run_id: int) -> None:
    """Messages need the process's task identity (set by Flower's runtimes); set it for an
    in-process run when no runtime did."""
    try:
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older flwr: messages need no task identity
        return
    try:
        TaskIdentity.run_id  # noqa: B018 - raises when unset
    except RuntimeError:
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1
