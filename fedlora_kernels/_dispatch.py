"""Backend selection and input validation shared by every op.

Every public op follows the same three steps (DESIGN §3):

1. validate its inputs with the helpers below (each raises ``ValueError``/``TypeError`` naming the
   argument, the shape or dtype expected and what it got);
2. pick a backend with :func:`resolve_backend`: CUDA tensors go to Triton, CPU tensors to the
   pure-PyTorch reference, or to the C library (``csrc/``, :mod:`fedlora_kernels._clib`) for
   the ops that have a faster C implementation there; ``backend=`` or ``FEDLORA_BACKEND``
   override (``"torch"`` forces the reference, ``"c"`` the C library);
3. call the Triton ``triton_op``, the C function, or the function in
   :mod:`fedlora_kernels.reference`.

With ``TRITON_INTERPRET=1`` the Triton kernels run on CPU tensors (slowly): that is how the tests
check the kernels on machines without a GPU.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from fedlora_kernels.segments import RowSegments

BACKENDS = ("triton", "torch", "c")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: dtypes a 0/1 mask may have (bool is the cheap one: it needs no value check)
MASK_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, device: torch.device, *, c_op: str | None = None) -> str:
    """Return ``"triton"``, ``"torch"`` or ``"c"`` for tensors on ``device``.

    Order: the explicit ``backend`` argument, then the ``FEDLORA_BACKEND`` environment variable,
    then the device (CUDA -> Triton; CPU -> the C library for an op with a C implementation,
    named by ``c_op``, when libfedlora is built, else torch, with one warning per process that
    the library is missing; anything else -> torch). Asking for Triton on CPU tensors is allowed
    only under the Triton interpreter; ``"c"`` needs CPU tensors and the library, and means the
    reference for an op without a C implementation.
    """
    choice = backend if backend is not None else os.environ.get("FEDLORA_BACKEND") or None
    if choice is None:
        if device.type == "cuda" and triton_available():
            return "triton"
        if c_op is not None and device.type == "cpu":
            from fedlora_kernels import _clib

            if _clib.available():
                return "c"
            _clib.warn_unavailable(c_op)
        return "torch"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {choice!r}")
    if choice != "torch" and device.type == "meta":
        # meta tensors have shapes but no data: only the pure-torch path can propagate them
        return "torch"
    if choice == "c":
        return _resolve_c(device, c_op)
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}); set "
                "TRITON_INTERPRET=1 before importing fedlora_kernels to run the kernels on CPU "
                "in the interpreter"
            )
    return choice


def _resolve_c(device: torch.device, c_op: str | None) -> str:
    """``backend="c"``: the C library on CPU tensors (the reference for ops without one)."""
    if device.type != "cpu":
        raise ValueError(f"backend='c' needs CPU tensors (got device {device})")
    if c_op is None:
        return "torch"
    from fedlora_kernels import _clib

    if not _clib.available():
        raise RuntimeError(
            f"backend='c' needs libfedlora, which is unavailable ({_clib.unavailable_reason()}); "
            "reinstall with a C++17 compiler and CMake"
        )
    return "c"


def values_unavailable(*tensors: torch.Tensor | None) -> bool:
    """True when the values of ``tensors`` cannot (or must not) be read on the host.

    That is while ``torch.compile`` traces (reading a value would break the graph), for ``meta``
    tensors (shapes only, used for shape propagation) and for fake tensors. Value checks (0/1
    masks, segment bounds, finite weights) are skipped then; shape and dtype checks still run.
    """
    if torch.compiler.is_compiling():
        return True
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "meta" or _is_fake(t):
            return True
    return False


def _is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - very old or very new torch
        return False
    return isinstance(t, FakeTensor)


def check_binary_mask(name: str, mask: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` unless every entry of ``mask`` is 0 or 1.

    NaN, negative, fractional and larger values are refused. The check reads the values (a device
    sync on CUDA), so it is skipped while ``torch.compile`` traces or when the values are not
    available (meta / fake tensors, see :func:`values_unavailable`), and for ``bool`` masks, which
    cannot hold anything else: hot loops on a GPU should keep their masks as ``bool``.
    """
    if mask.dtype == torch.bool or values_unavailable(mask):
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        example = mask[bad].flatten()[:4].tolist()
        raise ValueError(f"{name} must contain only 0 and 1, got values such as {example}")


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (``int``, numpy integer; not a ``bool``, not
    a float such as ``2.0``) ``>= minimum``; ``TypeError``/``ValueError`` naming ``name``
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
) -> torch.Tensor:
    """Check that ``t`` is a tensor with an allowed rank and dtype; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Check ``t.shape`` against ``expected`` (``None`` entries match any size)."""
    ok = t.dim() == len(expected) and all(
        e is None or s == e for s, e in zip(t.shape, expected, strict=True)
    )
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


#: device types the ops run on: CPU and CUDA compute; 'meta' propagates shapes only (values are
#: never read there, see :func:`values_unavailable`)
OP_DEVICES = ("cpu", "cuda", "meta")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Check that all given tensors live on one device of :data:`OP_DEVICES`; return it."""
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if first.type not in OP_DEVICES:
        name = next(iter(devices))
        raise ValueError(
            f"{name} is on the {first.type!r} device: the ops run on the CPU or CUDA (and "
            "propagate shapes on 'meta')"
        )
    for n, d in devices.items():
        if d != first:
            listing = ", ".join(f"{k}={v}" for k, v in devices.items())
            raise ValueError(f"all tensors must be on one device; {n} is on {d} ({listing})")
    return first


def check_finite_scalar(name: str, value: object) -> float:
    """Check that ``value`` is a real finite number; return it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_segment_offsets_arg(seg_offsets: object) -> int | None:
    """Check a layer's ``seg_offsets`` argument (int ``[S+1]`` tensor); return its last entry
    (the number of items it covers), or ``None`` when its values cannot be read (meta / fake
    tensors, tracing)."""
    check_tensor("seg_offsets", seg_offsets, ndim=1, dtypes=(torch.int32, torch.int64))
    if seg_offsets.numel() < 2:
        raise ValueError(
            f"seg_offsets must have at least 2 entries ([S+1]), got shape {list(seg_offsets.shape)}"
        )
    return None if values_unavailable(seg_offsets) else int(seg_offsets[-1])


def row_slots(offsets: torch.Tensor, adapter: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Slot index of every row, ``[num_rows]`` int64 (traceable: no data-dependent shapes)."""
    rows = torch.arange(num_rows, device=offsets.device)
    seg = torch.searchsorted(offsets[1:].contiguous(), rows, right=True)
    return adapter[seg.clamp_max(adapter.numel() - 1)]


class RowsInput(NamedTuple):
    """The row input of a segmented op, flattened: what ``_prepare_<op>`` of
    :mod:`fedlora_kernels.ops.multihead` and :mod:`fedlora_kernels.ops.masked_lora` share."""

    x2: torch.Tensor  # [N, d_in]
    lead: torch.Size  # x.shape[:-1]
    segs: RowSegments  # validated, planned once per batch (or the one-segment plan)


def check_rows_input(x: object) -> torch.Tensor:
    """``x`` ``[..., d_in]``: a float tensor with at least one dimension."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension [..., d_in], got shape {list(x.shape)}")
    return x


def check_factor_dtypes(x: torch.Tensor, **factors: torch.Tensor) -> None:
    """The adapter factors (frozen bases or LoRA factors) must have ``x``'s dtype."""
    for name, t in factors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")


def flatten_rows(
    x: torch.Tensor,
    d_in: int,
    seg_offsets: torch.Tensor | None,
    seg_adapter: torch.Tensor | None,
    num_slots: int,
    device: torch.device,
    segments: RowSegments | None = None,
) -> RowsInput:
    """``x`` as ``[N, d_in]`` rows with its segment plan (:func:`fedlora_kernels.segments.row_segments`)."""
    from fedlora_kernels.segments import row_segments

    x2 = x.reshape(-1, d_in)
    segs = row_segments(segments, seg_offsets, seg_adapter, x2.shape[0], num_slots, device)
    return RowsInput(x2, x.shape[:-1], segs)


def check_base_layer(
    x: torch.Tensor,
    d_in: int,
    d_out: int,
    base_out: torch.Tensor | None,
    base_weight: torch.Tensor | None,
    base_bias: torch.Tensor | None,
) -> None:
    """The base layer an adapter op may compute itself: ``base_weight`` ``[d_out, d_in]`` (frozen,
    ``x``'s dtype) and optional ``base_bias`` ``[d_out]``, never together with ``base_out``."""
    if base_weight is None:
        if base_bias is not None:
            raise ValueError("base_bias needs base_weight")
        return
    if base_out is not None:
        raise ValueError("give base_out (the base layer's output) or base_weight, not both")
    check_tensor("base_weight", base_weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape("base_weight", base_weight, [d_out, d_in])
    if base_weight.dtype != x.dtype:
        raise TypeError(
            f"base_weight must have the dtype of x ({x.dtype}), got {base_weight.dtype}"
        )
    if base_weight.requires_grad:
        raise ValueError(
            "base_weight must be frozen (requires_grad=False): the op gives it no gradient"
        )
    if base_bias is not None:
        check_tensor("base_bias", base_bias, ndim=1, dtypes=(x.dtype,))
        check_shape("base_bias", base_bias, [d_out])
        if base_bias.requires_grad:
            raise ValueError("base_bias must be frozen (requires_grad=False)")
