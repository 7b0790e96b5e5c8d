"""ctypes loader and thin wrappers for libfedlora, the C++ CPU kernels under ``csrc/`` (DESIGN §9).

The library is built by the package's own build (scikit-build-core + CMake) and installed as
``fedlora_kernels/_lib/libfedlora.so`` (``.dylib`` / ``fedlora.dll`` elsewhere). It is optional:
without a compiler the package installs without it, :func:`library` returns ``None`` and the ops
use their torch implementations; :func:`warn_unavailable` says so once per process, at the
first call that would have used it.

Where the library is looked for, in order: the file named by ``FEDLORA_LIBRARY`` (a library
built with ``cmake -S csrc -B build``, say); ``_lib/`` beside this file; the files the installed
distribution records (an editable install keeps its build products in site-packages while the
Python sources stay in the checkout).

The wrappers take CPU tensors that the caller has validated (dtypes, shapes, contiguity) and
raise :class:`CLibError` with the library's message when it refuses its arguments.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "ABI_VERSION",
    "CLibError",
    "available",
    "library",
    "library_path",
    "masked_adamw",
    "masked_combine",
    "masked_lora_forward",
    "multihead_forward",
    "unavailable_reason",
    "warn_unavailable",
]

#: the ABI this module was written against (``FEDLORA_ABI_VERSION`` in ``fedlora.h``)
ABI_VERSION = 1
#: ``fedlora_dtype`` codes of the torch dtypes the library reads
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
TENSOR_STEP = 1  # FEDLORA_ADAMW_TENSOR_STEP

_i64, _f64, _int = ctypes.c_int64, ctypes.c_double, ctypes.c_int
_ptr = ctypes.c_void_p
_lock = threading.Lock()
_state: dict[str, object] = {}


class CLibError(RuntimeError):
    """A libfedlora call returned an error status; ``status`` is the code, the text its message."""

    def __init__(self, function: str, status: int, message: str) -> None:
        super().__init__(f"{function} failed (status {status}): {message}")
        self.status = status


class _AdamWConfig(ctypes.Structure):
    _fields_ = [
        ("lr", _f64),
        ("beta1", _f64),
        ("beta2", _f64),
        ("eps", _f64),
        ("weight_decay", _f64),
        ("importance_beta1", _f64),
        ("importance_beta2", _f64),
        ("flags", _int),
    ]


# "restype: argtypes" of every function used, in fedlora.h's order
_SIGNATURES = {
    "fedlora_version": "str:",
    "fedlora_abi_version": "int:",
    "fedlora_last_error": "str:",
    "fedlora_default_num_threads": "int:",
    "fedlora_masked_mean_coefficients": "int: i64 i64 ptr ptr ptr ptr ptr",
    "fedlora_masked_combine": "int: i64 ptr ptr int i64 i64 i64 ptr ptr ptr ptr int int",
    "fedlora_masked_weighted_mean": "int: i64 ptr ptr int i64 i64 i64 ptr ptr ptr ptr int int",
    "fedlora_masked_adamw": "int: ptr ptr int ptr ptr ptr ptr ptr i64 i64 i64 int ptr cfg int",
    "fedlora_masked_lora_forward": (
        "int: ptr i64 i64 ptr ptr i64 i64 i64 f64 ptr ptr ptr i64 ptr int"
    ),
    "fedlora_multihead_forward": (
        "int: ptr i64 i64 ptr ptr ptr ptr i64 i64 i64 i64 f64 ptr ptr i64 ptr int"
    ),
}
_CTYPES = {
    "int": _int,
    "i64": _i64,
    "f64": _f64,
    "ptr": _ptr,
    "str": ctypes.c_char_p,
    "cfg": ctypes.POINTER(_AdamWConfig),
}


def _file_name() -> str:
    if sys.platform == "win32":
        return "fedlora.dll"
    return "libfedlora.dylib" if sys.platform == "darwin" else "libfedlora.so"


def _candidates() -> list[Path]:
    name = _file_name()
    found = [Path(__file__).resolve().parent / "_lib" / name]
    try:  # an editable install: the build products live in site-packages, recorded in RECORD
        from importlib.metadata import distributions

        # every installation of the name (a stale egg-info on sys.path may come first)
        for dist in distributions(name="fedlora-kernels"):
            found += [Path(str(f.locate())) for f in dist.files or [] if f.name == name]
    except (OSError, ValueError):
        pass
    return found


def library_path() -> Path | None:
    """The library file that :func:`library` loads (``None`` when there is none)."""
    explicit = os.environ.get("FEDLORA_LIBRARY")
    if explicit:
        return Path(explicit)
    return next((p for p in _candidates() if p.is_file()), None)


def _load() -> ctypes.CDLL | None:
    path = library_path()
    if path is None:
        _state["why"] = f"{_file_name()} was not built (no C++ compiler at install time?)"
        return None
    try:
        lib = ctypes.CDLL(str(path))
        for fn, signature in _SIGNATURES.items():
            restype, argtypes = signature.split(":")
            f = getattr(lib, fn)
            f.restype = _CTYPES[restype]
            f.argtypes = [_CTYPES[a] for a in argtypes.split()]
    except (OSError, AttributeError) as e:
        _state["why"] = f"{path} could not be loaded: {e}"
        return None
    abi = lib.fedlora_abi_version()
    if abi != ABI_VERSION:
        _state["why"] = f"{path} has ABI version {abi}, this package needs {ABI_VERSION}"
        return None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded libfedlora (loaded on first call), or ``None`` when it is unavailable."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """True when libfedlora is built and loads."""
    return library() is not None


def unavailable_reason() -> str:
    """Why :func:`library` returned ``None`` (empty when it loaded)."""
    library()
    return str(_state.get("why", ""))


def warn_unavailable(op: str) -> None:
    """Warn (once per process) that ``op`` runs on torch because the library is absent."""
    if _state.get("warned"):
        return
    _state["warned"] = True
    warnings.warn(
        f"fedlora_kernels: the C library libfedlora is unavailable ({_state.get('why')}); "
        f"{op} and the other CPU ops use their torch implementations. Reinstall with a C++17 "
        "compiler and CMake to build it, or set FEDLORA_BACKEND=torch to silence this warning.",
        RuntimeWarning,
        stacklevel=4,  # warn_unavailable <- resolve_backend <- the op <- its caller
    )


def _threads(num_threads: int | None) -> int:
    return int(num_threads) if num_threads is not None else torch.get_num_threads()


def _check(lib: ctypes.CDLL, fn: str, status: int) -> None:
    if status != 0:
        raise CLibError(fn, status, lib.fedlora_last_error().decode(errors="replace"))


def _need() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"libfedlora is unavailable: {_state.get('why')}")
    return lib


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def masked_combine(
    tensors: Sequence[torch.Tensor],
    ranks: Sequence[int],
    coef: torch.Tensor,
    has: torch.Tensor,
    out: torch.Tensor,
    *,
    outer: int,
    rank: int,
    inner: int,
    fallback: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """``out = Σ_k coef[k, j] X_k`` where ``has[j]``, else ``fallback`` (or 0): the reference's
    convex-combination sum (``fedlora_masked_combine``). ``tensors`` contiguous CPU float32 or
    bfloat16 ``[outer, r_k, inner]`` (one dtype); ``coef`` float32 ``[C, rank]``; ``has`` uint8 or
    bool ``[rank]``; ``out`` (and ``fallback``) contiguous ``[outer, rank, inner]`` of one dtype.
    Returns ``out``."""
    lib = _need()
    num = len(tensors)
    ptrs = (_ptr * max(num, 1))(*[t.data_ptr() if t.numel() else None for t in tensors])
    rank_arr = (_i64 * max(num, 1))(*[int(r) for r in ranks])
    in_dtype = DTYPES[tensors[0].dtype] if num else 0
    coef = coef.to(torch.float32).contiguous()
    has8 = has.to(torch.uint8).contiguous()
    status = lib.fedlora_masked_combine(
        num, ptrs, rank_arr, in_dtype, outer, rank, inner, coef.data_ptr(), has8.data_ptr(),
        _addr(fallback), out.data_ptr(), DTYPES[out.dtype], _threads(num_threads),
    )  # fmt: skip
    _check(lib, "fedlora_masked_combine", status)
    return out


def masked_adamw(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor,
    steps: Sequence[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    rank_dim: int,
    tensor_step: bool,
    importance: tuple[torch.Tensor, torch.Tensor, float, float] | None = None,
    num_threads: int | None = None,
) -> None:
    """One masked AdamW step in place (``fedlora_masked_adamw``): ``param``, moments (and
    ``importance`` ema/unc) contiguous float32 ``[C, M, K]``, ``grad`` contiguous float32 or
    bfloat16 of that shape, ``mask`` ``[C, R]`` (0/1), ``steps`` ``C`` step numbers;
    ``tensor_step`` selects torch's arithmetic for a per-slot step tensor."""
    lib = _need()
    slots, rows, cols = param.shape
    mask8 = (mask != 0).to(torch.uint8).contiguous()
    steps_arr = (_f64 * slots)(*[float(s) for s in steps])
    ema = unc = None
    ib1 = ib2 = 0.0
    if importance is not None:
        ema, unc, ib1, ib2 = importance
    cfg = _AdamWConfig(
        lr, beta1, beta2, eps, weight_decay, ib1, ib2, TENSOR_STEP if tensor_step else 0
    )
    status = lib.fedlora_masked_adamw(
        param.data_ptr(), grad.data_ptr(), DTYPES[grad.dtype], exp_avg.data_ptr(),
        exp_avg_sq.data_ptr(), _addr(ema), _addr(unc), mask8.data_ptr(), slots, rows, cols,
        rank_dim, steps_arr, ctypes.byref(cfg), _threads(num_threads),
    )  # fmt: skip
    _check(lib, "fedlora_masked_adamw", status)


def _segments(
    seg_offsets: torch.Tensor | None, seg_adapter: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    if seg_offsets is None:
        return None, None, 1
    off = seg_offsets.to(torch.int64).contiguous()
    ada = seg_adapter.to(torch.int64).contiguous()
    return off, ada, int(ada.numel())


def masked_lora_forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scale: float,
    rank_mask: torch.Tensor | None = None,
    seg_offsets: torch.Tensor | None = None,
    seg_adapter: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """``scale · ((x A_cᵀ) ⊙ m_t) B_cᵀ`` per row (``fedlora_masked_lora_forward``), float32:
    ``x`` ``[N, d_in]``, ``A`` ``[C, R, d_in]``, ``B`` ``[C, d_out, R]``, ``rank_mask``
    ``[S, R]``. Returns a new ``[N, d_out]`` tensor (no autograd)."""
    lib = _need()
    n, d_in = x.shape
    slots, rank, _ = A.shape
    d_out = B.shape[1]
    x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
    mk = None if rank_mask is None else rank_mask.to(torch.float32).contiguous()
    off, ada, segs = _segments(seg_offsets, seg_adapter)
    y = torch.empty(n, d_out, dtype=torch.float32)
    status = lib.fedlora_masked_lora_forward(
        x.data_ptr(), n, d_in, A.data_ptr(), B.data_ptr(), slots, rank, d_out, float(scale),
        _addr(mk), _addr(off), _addr(ada), segs, y.data_ptr(), _threads(num_threads),
    )  # fmt: skip
    _check(lib, "fedlora_masked_lora_forward", status)
    return y


def multihead_forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    H: torch.Tensor,
    s: torch.Tensor,
    *,
    scale: float,
    seg_offsets: torch.Tensor | None = None,
    seg_adapter: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """``scale · Σ_i s[c,i] ((x A_iᵀ) H[c,i]ᵀ) B_iᵀ`` per row (``fedlora_multihead_forward``),
    float32: ``A`` ``[h, r, d_in]``, ``B`` ``[h, d_out, r]``, ``H`` ``[C, h, r, r]``, ``s``
    ``[C, h]``. Returns a new ``[N, d_out]`` tensor (no autograd)."""
    lib = _need()
    n, d_in = x.shape
    heads, r, _ = A.shape
    d_out = B.shape[1]
    slots = H.shape[0]
    x, A, B, H, s = (t.contiguous() for t in (x, A, B, H, s))
    off, ada, segs = _segments(seg_offsets, seg_adapter)
    y = torch.empty(n, d_out, dtype=torch.float32)
    status = lib.fedlora_multihead_forward(
        x.data_ptr(), n, d_in, A.data_ptr(), B.data_ptr(), H.data_ptr(), s.data_ptr(), slots,
        heads, r, d_out, float(scale), _addr(off), _addr(ada), segs, y.data_ptr(),
        _threads(num_threads),
    )  # fmt: skip
    _check(lib, "fedlora_multihead_forward", status)
    return y
