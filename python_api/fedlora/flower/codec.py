"""The wire format: state dicts, client metas and budgets as Flower records (no flwr at import).

- arrays: a state dict becomes one ``ArrayRecord`` of PEFT-style keys; tensors travel as float32
  (numpy and Flower cannot carry bfloat16): :func:`to_arrayrecord`, :func:`from_arrayrecord`.
- the legacy API's positional NDArrays: :func:`state_to_ndarrays`, :func:`ndarrays_to_state`.
- a client meta: a ``ConfigRecord`` named :data:`META_KEY`; values a ConfigRecord cannot hold
  (nested dicts, lists of lists, tensors, None) are JSON-encoded: :func:`encode_meta`,
  :func:`decode_meta`, :func:`meta_record`.
- a train reply (arrays, the weight, the meta, the budget the client trained under):
  :func:`train_reply`.

Only :func:`to_arrayrecord`, :func:`from_arrayrecord`, :func:`meta_record` and
:func:`train_reply` need flwr, and import it when called.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedlora.flower.budget import BUDGET_KEYS, check_budget

__all__ = [
    "BUDGET_KEY",
    "BUDGET_KEYS",
    "HANDBACK_KEY",
    "META_KEY",
    "decode_handback",
    "decode_meta",
    "encode_handback",
    "encode_meta",
    "from_arrayrecord",
    "meta_record",
    "ndarrays_to_state",
    "state_to_ndarrays",
    "to_arrayrecord",
    "to_float32",
    "train_reply",
]

#: Name of the ``ConfigRecord`` that carries a client's metadata in its train reply.
META_KEY = "fedlora-meta"
#: Name of the ``ConfigRecord`` of a train reply holding the budget the client trained under
#: (``rank``, ``heads``, ``components``, ``steps``; see :mod:`fedlora.flower.budget`).
BUDGET_KEY = "fedlora-budget"
#: Train-config entry holding the server's hand-back (:meth:`fedlora.rounds.Server.handback`:
#: HAFL truncation's averaged scores), JSON-encoded; the ClientApp gives it to
#: ``fedlora.local.LocalClient.train(handback=...)`` (:func:`decode_handback`).
HANDBACK_KEY = "fedlora-handback"
#: Entry of an encoded meta listing the keys whose values are JSON strings.
_JSON_KEYS = "fedlora.json-keys"


def _flwr_error() -> ImportError:
    return ImportError(
        "fedlora.flower needs Flower >= 1.21 (Message API): `pip install 'fedlora-kernels[flower]'` "
        "(or `pip install 'flwr>=1.21'`)"
    )


# ------------------------------------------------------------------------------------- tensors
def to_float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies; floating tensors (bf16, fp16, fp64) become float32."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of str -> Tensor, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state keys must be str, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        t = value.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        out[key] = t.contiguous().clone()
    return out


def _config_value_ok(value: Any) -> bool:
    scalar = (bool, int, float, str, bytes)
    if isinstance(value, scalar):
        return not isinstance(value, int) or isinstance(value, bool) or abs(value) < 2**63
    if isinstance(value, list) and value:
        kinds = {type(v) for v in value}
        return len(kinds) == 1 and kinds.pop() in scalar
    return False


def encode_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """A client meta as ``ConfigRecord`` content: scalars and flat lists stay as they are; other
    values (nested dicts/lists, tensors, None) are JSON-encoded and their keys listed under
    ``"fedlora.json-keys"``. Inverse: :func:`decode_meta`."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    out: dict[str, Any] = {}
    encoded: list[str] = []
    for key, value in meta.items():
        if not isinstance(key, str) or key == _JSON_KEYS:
            raise ValueError(f"meta keys must be str other than {_JSON_KEYS!r}, got {key!r}")
        if _config_value_ok(value):
            out[key] = value
        else:
            out[key] = json.dumps(_jsonable(value), sort_keys=True)
            encoded.append(key)
    if encoded:
        out[_JSON_KEYS] = encoded
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"meta value of type {type(value).__name__} cannot be JSON-encoded")


def decode_meta(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """Inverse of :func:`encode_meta` (``ValueError`` for a malformed JSON entry)."""
    if record is None:
        return {}
    out = dict(record.items())
    encoded = out.pop(_JSON_KEYS, [])
    if isinstance(encoded, str):
        encoded = [encoded]
    for key in encoded:
        if key not in out or not isinstance(out[key], str):
            raise ValueError(f"meta entry {key!r} is listed as JSON but holds no JSON string")
        try:
            out[key] = json.loads(out[key])
        except json.JSONDecodeError as e:
            raise ValueError(f"meta entry {key!r} is not valid JSON: {e}") from None
    return out


def encode_handback(handback: Mapping[str, Any] | None) -> str:
    """The server's hand-back (a JSON-able dict, or None) as the JSON string a train
    ``ConfigRecord`` carries under :data:`HANDBACK_KEY`. Inverse: :func:`decode_handback`."""
    if handback is not None and not isinstance(handback, Mapping):
        raise TypeError(f"handback must be a dict or None, got {type(handback).__name__}")
    return json.dumps(_jsonable(handback), sort_keys=True)


def decode_handback(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The hand-back of a train config (its :data:`HANDBACK_KEY` entry), or None when it has
    none; ``ValueError`` naming the entry when it is not a JSON object."""
    raw = (config or {}).get(HANDBACK_KEY)
    if raw is None:
        return None
    try:
        value = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except json.JSONDecodeError as e:
        raise ValueError(f"train config {HANDBACK_KEY!r} is not valid JSON: {e}") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(
            f"train config {HANDBACK_KEY!r} must encode a JSON object, got {type(value).__name__}"
        )
    return value


def state_to_ndarrays(
    state: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None
) -> list[np.ndarray]:
    """The values of ``state`` as float32 numpy arrays in the order of ``keys`` (default: the
    dict's order); the legacy Flower API carries parameters as such a positional list."""
    keys = list(state) if keys is None else list(keys)
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"state has no entries for keys {missing[:5]}")
    flat = to_float32({k: state[k] for k in keys})
    return [flat[k].numpy() for k in keys]


def ndarrays_to_state(arrays: Sequence[np.ndarray], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_to_ndarrays` (``ValueError`` when the counts differ)."""
    arrays = list(arrays)
    if len(arrays) != len(keys):
        raise ValueError(f"got {len(arrays)} arrays for {len(keys)} keys; the key order must match")
    out = {}
    for k, a in zip(keys, arrays, strict=True):
        t = torch.from_numpy(np.array(a, copy=True))
        out[k] = t.float() if t.is_floating_point() else t
    return out


def _weight_of(value: Any) -> tuple[float | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"weight must be a number, got {value!r}"
    if not math.isfinite(value) or value < 0:
        return None, f"weight must be finite and non-negative, got {value}"
    return float(value), None


# ------------------------------------------------------------------------------------- flwr helpers
def to_arrayrecord(state: Any, *, dtype: torch.dtype = torch.float32) -> Any:
    """A state dict (or a model with fedlora adapter layers) as a Flower ``ArrayRecord``.

    Floating tensors are cast to ``dtype`` (float32 by default: Flower serialises with numpy,
    which has no bfloat16). A model is read with :func:`fedlora.get_adapter_state_dict`.
    """
    try:
        from flwr.app import ArrayRecord
    except ImportError as e:
        raise _flwr_error() from e
    if isinstance(state, torch.nn.Module):
        from fedlora.state_dict import get_adapter_state_dict

        state = get_adapter_state_dict(state)
    if dtype not in (torch.float32, torch.float16, torch.float64):
        raise ValueError(f"dtype must be a numpy-compatible float dtype, got {dtype}")
    flat = {k: v.to(dtype) if v.is_floating_point() else v for k, v in to_float32(state).items()}
    return ArrayRecord(flat)


def from_arrayrecord(record: Any) -> dict[str, torch.Tensor]:
    """A Flower ``ArrayRecord`` as a flat ``dict[str, Tensor]`` (floating tensors in float32)."""
    try:
        from flwr.app import ArrayRecord
    except ImportError as e:
        raise _flwr_error() from e
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"record must be a flwr ArrayRecord, got {type(record).__name__}")
    return {key: _array_tensor(array) for key, array in record.items()}


def _npy_header_end(data: bytes) -> int:
    """Where the array data of ``.npy`` bytes starts (0 when they are not ``.npy``)."""
    if len(data) < 12 or data[:6] != b"\x93NUMPY":
        return 0
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    return 12 + int.from_bytes(data[8:12], "little")


@functools.lru_cache(maxsize=1024)
def _npy_layout(header: bytes) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """``(shape, dtype, data offset)`` of a ``.npy`` header, or None when the data cannot be
    read in place (Fortran order, non-native byte order, objects). Cached: every client of a
    round sends the same headers, and parsing one costs more than reading its data."""
    if not header:
        return None
    try:
        buf = io.BytesIO(header)
        version = np.lib.format.read_magic(buf)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(buf)
    except (ValueError, TypeError):
        return None
    if fortran or dtype.hasobject or not dtype.isnative:
        return None
    return tuple(shape), dtype, len(header)


def _array_tensor(array: Any) -> torch.Tensor:
    """One Flower ``Array`` as a tensor (floating point as float32), decoded with one copy.

    Flower stores an array as ``.npy`` bytes; ``Array.numpy()`` runs ``np.load`` on them, which
    costs more than the whole aggregation for 100 MiniLM-size clients. The header is parsed
    here and the data read in place (``np.frombuffer``), then copied once into a writable array
    (converting to float32 in the same pass); anything unusual (Fortran order, a non-native byte
    order, object dtypes, another serialisation) goes through ``Array.numpy()``.
    """
    arr = None
    if getattr(array, "stype", None) == "numpy.ndarray":
        data = array.data
        layout = _npy_layout(bytes(data[: _npy_header_end(data)]))
        if layout is not None:
            shape, dtype, offset = layout
            arr = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
            arr = arr.reshape(shape)
    if arr is None:  # native byte order, C order, 0-d arrays kept 0-d
        arr = array.numpy()
        arr = arr.astype(arr.dtype.newbyteorder("="), order="C")
    if np.issubdtype(arr.dtype, np.floating):
        return torch.from_numpy(arr.astype(np.float32, copy=True))
    return torch.from_numpy(arr.copy())


def meta_record(meta: Mapping[str, Any] | None) -> Any:
    """A client meta as the ``ConfigRecord`` a train reply carries under :data:`META_KEY`."""
    try:
        from flwr.app import ConfigRecord
    except ImportError as e:
        raise _flwr_error() from e
    return ConfigRecord(encode_meta(meta))


def train_reply(
    msg: Any,
    state: Any,
    num_examples: int | float,
    *,
    meta: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    budget: Mapping[str, int] | None = None,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str = "arrays",
) -> Any:
    """The reply a ClientApp returns from ``@app.train()``: the uploaded state (float32 arrays),
    a ``MetricRecord`` with ``weighted_by_key`` and ``metrics``, ``meta`` as a ConfigRecord
    (:data:`META_KEY`) and, when given, the ``budget`` the client trained under
    (:data:`BUDGET_KEY`; the strategy sends that node its budget's download from then on)."""
    try:
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    except ImportError as e:
        raise _flwr_error() from e
    _, why = _weight_of(num_examples)
    if why is not None:
        raise ValueError(f"num_examples: {why}")
    record = {weighted_by_key: num_examples, **dict(metrics or {})}
    content = RecordDict(
        {
            arrayrecord_key: to_arrayrecord(state),
            "metrics": MetricRecord(record),
            META_KEY: meta_record(meta),
        }
    )
    if budget is not None:
        content[BUDGET_KEY] = ConfigRecord(check_budget(budget, "budget"))
    return Message(content=content, reply_to=msg)
