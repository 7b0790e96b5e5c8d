"""Row segments of a batched op call, validated and planned ONCE per batch (no host sync per call).

A batched forward serves many adapter slots in one call: rows ``offsets[t]:offsets[t+1]`` of the
flattened input form segment ``t`` and use slot ``slots[t]`` (DESIGN §3). Validating that
description (bounds, order, slot range) reads its values, a device-to-host sync on CUDA, and
planning it for the kernels (which segments each row tile overlaps, which adapter slot each
per-tile partial gradient belongs to) costs a dozen tiny device launches. Both are per BATCH, not
per layer: :class:`RowSegments` does them once, holds the device tensors, and caches the tile
tables per tile size, so every adapter layer of a model reuses them (as vLLM's LoRA kernel
metadata). The ops take it as ``segments=``; called without segments they use the one-segment
fast path, which launches nothing but the kernels.

The layer-level plan (items of ``[batch, seq, d]`` inputs, rank masks) is
:class:`fedlora.layers.segments.SegmentPlan`, which builds one ``RowSegments`` per row count.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from fedlora_kernels._dispatch import check_tensor, values_unavailable

__all__ = ["RowSegments"]

_INT = (torch.int32, torch.int64)


def _host_ints(name: str, values: object) -> list[int] | None:
    """``values`` as a list of Python ints (None when a tensor's values cannot be read)."""
    if isinstance(values, torch.Tensor):
        check_tensor(name, values, ndim=1, dtypes=_INT)
        if values_unavailable(values):
            return None
        return [int(v) for v in values.tolist()]  # one sync for a device tensor, at build time
    if isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must hold ints, got {type(v).__name__} {v!r}")
            out.append(int(v))
        return out
    raise TypeError(
        f"{name} must be a 1-D int tensor or a list of ints, got {type(values).__name__}"
    )


class RowSegments:
    """A validated segment description over ``num_rows`` rows, with its kernel tables.

    Args:
        offsets: ``[S+1]`` ints (tensor on any device, or a list): segment ``t`` is rows
            ``offsets[t]:offsets[t+1]``; must start at 0, never decrease, and end at the number
            of rows. ``None``: one segment over ``num_rows`` rows.
        slots: ``[S]`` ints, the adapter slot of each segment (several segments may share one).
            ``None``: slot ``t`` for segment ``t``, or slot 0 throughout when ``one_slot``.
        num_rows: the number of rows (required when ``offsets`` is None; checked otherwise).
        device: where the tables live (default: ``offsets``' device, else CPU).
        one_slot: ``slots=None`` means slot 0 for every segment (an op with one adapter slot).

    Values are read once here (a host copy of device offsets: one sync per batch, none for lists
    or CPU tensors); meta / fake tensors, whose values are unknown, are kept unchecked. After
    construction nothing syncs: the device tensors are built once, the tile tables once per tile
    size (:meth:`tiles`, :meth:`owner`), and ``max_slot`` is a host int the ops compare with
    their number of slots.
    """

    def __init__(
        self,
        offsets: torch.Tensor | Sequence[int] | None = None,
        slots: torch.Tensor | Sequence[int] | None = None,
        *,
        num_rows: int | None = None,
        device: torch.device | str | None = None,
        one_slot: bool = False,
    ) -> None:
        if device is None:
            device = offsets.device if isinstance(offsets, torch.Tensor) else torch.device("cpu")
        self.device = torch.device(device)
        self._tiles: dict[int, torch.Tensor] = {}
        self._owners: dict[tuple[int, int], torch.Tensor] = {}
        self._offsets_t: torch.Tensor | None = None
        self._slots_t: torch.Tensor | None = None
        if offsets is None:
            if num_rows is None:
                raise ValueError("num_rows is required when offsets is None")
            offs: list[int] | None = [0, int(num_rows)]
            if slots is not None and isinstance(slots, torch.Tensor) and slots.numel() != 1:
                raise ValueError(
                    "seg_offsets is required when seg_adapter has more than one segment"
                )
        else:
            offs = _host_ints("seg_offsets", offsets)
            if offs is None:  # traced / meta: the tensors themselves, unchecked
                self._unchecked(offsets, slots, num_rows, one_slot)
                return
        if len(offs) < 2:
            raise ValueError(f"seg_offsets must have at least 2 entries ([S+1]), got {offs}")
        num_segs = len(offs) - 1
        if slots is None:
            sl = [0] * num_segs if one_slot else list(range(num_segs))
        else:
            sl = _host_ints("seg_adapter", slots)
            if sl is None:
                self._unchecked(offsets, slots, num_rows, one_slot)
                return
            if len(sl) != num_segs:
                raise ValueError(f"seg_adapter must have shape [{num_segs}], got [{len(sl)}]")
        rows = offs[-1] if num_rows is None else int(num_rows)
        if offs[0] != 0 or offs[-1] != rows:
            raise ValueError(
                f"seg_offsets must start at 0 and end at the number of rows {rows}, got {offs}"
            )
        if any(b < a for a, b in itertools.pairwise(offs)):
            raise ValueError(f"seg_offsets must be non-decreasing, got {offs}")
        if sl and min(sl) < 0:
            raise ValueError(f"seg_adapter entries must be >= 0, got {sl}")
        self.checked = True
        self.num_rows = rows
        self.num_segs = num_segs
        self.offsets_list, self.slots_list = offs, sl
        self.max_slot = max(sl) if sl else 0
        used = [c for c, a, b in zip(sl, offs, offs[1:], strict=False) if b > a]
        #: one slot serves every row: the kernels' fast path (no tables, nothing to plan)
        self.single = len(set(used)) <= 1
        self.slot0 = used[0] if used else (sl[0] if sl else 0)

    def _unchecked(self, offsets, slots, num_rows, one_slot) -> None:
        self.checked = False
        self.num_segs = offsets.numel() - 1
        self.num_rows = num_rows
        self.offsets_list = self.slots_list = None
        self.max_slot = -1  # unknown
        self.single = False
        self.slot0 = 0
        self._offsets_t = offsets.to(device=self.device, dtype=torch.int64)
        if slots is None:
            slots = torch.arange(self.num_segs, device=self.device)
            if one_slot:
                slots = torch.zeros_like(slots)
        self._slots_t = slots.to(device=self.device, dtype=torch.int64)

    # ------------------------------------------------------------------ checks at op time
    def check(self, num_rows: int, num_slots: int) -> None:
        """``ValueError`` unless these segments cover ``num_rows`` rows and use slots below
        ``num_slots`` (host ints only: no sync)."""
        if self.num_rows is not None and self.num_rows != num_rows:
            raise ValueError(
                f"seg_offsets must start at 0 and end at the number of rows {num_rows}, "
                f"got segments over {self.num_rows} rows"
            )
        if self.max_slot >= num_slots:
            raise ValueError(
                f"seg_adapter entries must lie in [0, {num_slots}) (the number of adapter "
                f"slots), got {self.slots_list}"
            )

    # ------------------------------------------------------------------ device tensors
    @property
    def offsets(self) -> torch.Tensor:
        """int64 ``[S+1]`` on the device (built on first use, then reused)."""
        if self._offsets_t is None:
            self._offsets_t = torch.tensor(self.offsets_list, dtype=torch.int64, device=self.device)
        return self._offsets_t

    @property
    def slots(self) -> torch.Tensor:
        """int64 ``[S]`` on the device (built on first use, then reused)."""
        if self._slots_t is None:
            self._slots_t = torch.tensor(self.slots_list, dtype=torch.int64, device=self.device)
        return self._slots_t

    def scaled(self, factor: int, *, num_rows: int | None = None) -> RowSegments:
        """The same segments over ``factor`` times as many rows (``[batch, seq, d]`` inputs:
        offsets count sequences, the kernels count rows). ``num_rows`` is for segments whose
        values are unknown (meta / traced): the rows they cover."""
        if not self.checked:
            out = RowSegments.__new__(RowSegments)
            out.device, out._tiles, out._owners = self.device, {}, {}
            offsets = self._offsets_t * factor if factor != 1 else self._offsets_t
            out._unchecked(offsets, self._slots_t, num_rows, False)
            return out
        if factor == 1:
            return self
        return RowSegments(
            [o * factor for o in self.offsets_list],
            self.slots_list,
            num_rows=self.num_rows * factor,
            device=self.device,
        )

    # ------------------------------------------------------------------ kernel tables
    def tiles(self, block: int) -> torch.Tensor:
        """int32 ``[3, T]`` for row tiles of ``block`` rows (``T = ceil(N / block)``): the first
        and last segment each tile overlaps and the index of its first (tile, segment) pair.

        Partial gradients are written one per pair (every partial has one owner, so sums stay
        deterministic); there are at most ``T + S - 1`` pairs. Built on the device (no sync) the
        first time a tile size is asked for, then cached.
        """
        table = self._tiles.get(block)
        if table is None:
            table = self._tiles[block] = _tile_table(self.offsets, self.num_rows, block)
        return table

    def num_pairs(self, block: int) -> int:
        """Upper bound on the (tile, segment) pairs of :meth:`tiles` (a host int)."""
        return max(1, -(-self.num_rows // block)) + self.num_segs - 1

    def owner(self, block: int, num_slots: int) -> torch.Tensor:
        """float32 ``[num_slots, P]``: 1 where (tile, segment) pair ``p`` of :meth:`tiles`
        belongs to slot ``c``; ``owner @ partials`` sums the partials per slot in a fixed order."""
        key = (block, num_slots)
        own = self._owners.get(key)
        if own is None:
            slots = _pair_slots(self.tiles(block), self.slots, self.num_pairs(block))
            ids = torch.arange(num_slots, device=self.device)
            own = self._owners[key] = (slots[None, :] == ids[:, None]).to(torch.float32)
        return own

    def row_slots(self) -> torch.Tensor:
        """Slot of every row, int64 ``[N]`` (cached)."""
        rs = self._tiles.get(-1)
        if rs is None:
            rows = torch.arange(self.num_rows, device=self.device)
            seg = torch.searchsorted(self.offsets[1:].contiguous(), rows, right=True)
            rs = self._tiles[-1] = self.slots[seg.clamp_max(self.num_segs - 1)]
        return rs


def _tile_table(offsets: torch.Tensor, num_rows: int, block: int) -> torch.Tensor:
    device = offsets.device
    num_segs = offsets.numel() - 1
    num_tiles = max(1, -(-num_rows // block))
    starts = torch.arange(num_tiles, device=device, dtype=torch.int64) * block
    ends = torch.clamp(starts + block, max=max(num_rows, 1)) - 1
    seg_ends = offsets[1:].contiguous()
    lo = torch.searchsorted(seg_ends, starts, right=True).clamp_max(num_segs - 1)
    hi = torch.searchsorted(seg_ends, ends, right=True).clamp_max(num_segs - 1)
    counts = hi - lo + 1
    pair_start = torch.cumsum(counts, 0) - counts
    return torch.stack([lo, hi, pair_start]).to(torch.int32).contiguous()


def _pair_slots(table: torch.Tensor, slots: torch.Tensor, max_pairs: int) -> torch.Tensor:
    """Adapter slot of every (tile, segment) pair of ``table``, ``-1`` for unused pair rows."""
    lo, hi, pair_start = table.to(torch.int64)
    device = slots.device
    counts = hi - lo + 1
    pair_ids = torch.arange(max_pairs, device=device)
    block_of = torch.searchsorted((pair_start + counts).contiguous(), pair_ids, right=True)
    valid = block_of < lo.numel()
    block_of = block_of.clamp_max(lo.numel() - 1)
    seg_of = (lo[block_of] + (pair_ids - pair_start[block_of])).clamp(0, slots.numel() - 1)
    return torch.where(valid, slots[seg_of], torch.full_like(pair_ids, -1))


def row_segments(
    segments: RowSegments | None,
    seg_offsets: torch.Tensor | None,
    seg_adapter: torch.Tensor | None,
    num_rows: int,
    num_slots: int,
    device: torch.device,
) -> RowSegments:
    """The segments of an op call: the plan the caller built once (``segments``), or one built
    now from ``seg_offsets`` / ``seg_adapter`` (reads their values: a sync for device tensors, so
    hot loops pass a plan), or the one-segment plan (slot 0, nothing to read or launch).
    ``ValueError`` / ``TypeError`` naming the argument when they do not fit the call."""
    if segments is not None:
        if seg_offsets is not None or seg_adapter is not None:
            raise ValueError("give either segments or seg_offsets/seg_adapter, not both")
        if not isinstance(segments, RowSegments):
            raise TypeError(
                f"segments must be a fedlora_kernels.RowSegments, got {type(segments).__name__}"
            )
        if segments.device.type != device.type:
            raise ValueError(f"segments live on {segments.device} but the tensors are on {device}")
        segs = segments
    elif seg_offsets is None and seg_adapter is None:
        return RowSegments(None, num_rows=num_rows, device=device, one_slot=True)
    else:
        if isinstance(seg_offsets, torch.Tensor):
            check_tensor("seg_offsets", seg_offsets, ndim=1, dtypes=_INT)
        if isinstance(seg_adapter, torch.Tensor):
            check_tensor("seg_adapter", seg_adapter, ndim=1, dtypes=_INT)
        if seg_adapter is None and num_slots != 1 and isinstance(seg_offsets, torch.Tensor):
            num_segs = seg_offsets.numel() - 1
            if num_segs != num_slots:
                raise ValueError(
                    f"seg_adapter is required when there are {num_slots} adapter slots and "
                    f"{num_segs} segments"
                )
        segs = RowSegments(
            seg_offsets, seg_adapter, num_rows=num_rows, device=device, one_slot=num_slots == 1
        )
    segs.check(num_rows, num_slots)
    return segs
