"""THE table of ops and the dtype variants each must handle (no Triton import: any tool can read it).

Three lists derive from it, so an op or a dtype combination added here is compiled, tested and
benchmarked without editing three files:

* ``bench/aot_sm90.py`` compiles every kernel of every op for sm_90 at every dtype case;
* the tests (``tests/test_gpu_readiness.py``) check every op, and every dtype case of the
  adapter ops in the interpreter against :mod:`fedlora_kernels.reference` (and on a GPU);
* ``bench/gpu.py`` runs, for each op, the suite named here.

The dtype cases of the adapter ops are the combinations their public functions accept: ``x`` and
the factors share one dtype (the layers cast the factors to ``x``'s), and ``base_out`` (the base
layer's output the adapter accumulates into) may have another: an fp32 layer under
``torch.autocast(bfloat16)`` gets a bf16 base output with fp32 factors. Every ``tl.dot`` casts both
of its operands to one dtype (the factors'), so each case compiles on sm_90.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class DtypeCase(NamedTuple):
    """One dtype combination of an adapter op call."""

    name: str
    x: torch.dtype  # x and the factors (A, B)
    base: torch.dtype | None  # base_out's dtype (None: no base_out)


F32, BF16 = torch.float32, torch.bfloat16

#: every dtype combination the adapter ops (multihead_lora, masked_lora) accept
ADAPTER_DTYPES: tuple[DtypeCase, ...] = (
    DtypeCase("fp32", F32, None),
    DtypeCase("bf16", BF16, None),
    DtypeCase("fp32+base_fp32", F32, F32),
    DtypeCase("bf16+base_bf16", BF16, BF16),
    DtypeCase("fp32+base_bf16", F32, BF16),  # an fp32 layer under torch.autocast(bfloat16)
    DtypeCase("bf16+base_fp32", BF16, F32),
)
#: the optimizer and aggregation ops: one dtype for all their tensors
PLAIN_DTYPES: tuple[DtypeCase, ...] = (DtypeCase("fp32", F32, None), DtypeCase("bf16", BF16, None))


class OpEntry(NamedTuple):
    """An op: its public name, its Triton module, its GPU bench suite and its dtype cases."""

    name: str
    triton_module: str  # under fedlora_kernels.ops
    bench_suite: str  # a key of bench/gpu.py's SUITES
    dtypes: tuple[DtypeCase, ...]


OPS: tuple[OpEntry, ...] = (
    OpEntry("multihead_lora", "_multihead_triton", "multihead", ADAPTER_DTYPES),
    OpEntry("masked_lora", "_masked_lora_triton", "masked", ADAPTER_DTYPES),
    OpEntry("masked_adamw_", "_masked_adamw_triton", "masked", PLAIN_DTYPES),
    OpEntry("masked_weighted_mean", "_masked_mean_triton", "masked_mean", PLAIN_DTYPES),
)


def op(name: str) -> OpEntry:
    """The entry of op ``name``; ``KeyError`` for an op not in the table."""
    for entry in OPS:
        if entry.name == name:
            return entry
    raise KeyError(f"no op {name!r} in fedlora_kernels.ops.table.OPS")
