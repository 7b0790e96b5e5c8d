"""Federated LoRA-family methods: one module per method, client side and server rule.

Server rules (called through :func:`fedlora.aggregate`, which validates the inputs first):
``fedit``, ``ffa``, ``hetlora``, ``flexlora``, ``flora``, ``fedex``, ``ravan``, ``hafl``,
``prelort``, ``florana``. Each module's ``aggregate(global_state, client_states, weights, metas,
**options)`` returns ``(new_global_state, extra_metrics)``; its docstring states the rule, the
options and what it reads from ``metas``. Modules are imported on first use.
"""
