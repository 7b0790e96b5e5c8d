"""GPU benchmark of the masked-LoRA family (DESIGN §8), imported by ``bench/gpu.py``.

``suite(run)`` (a ``bench/_timing.RunConfig``) returns one dict per measured row:

* ``bench="masked_lora"``: per (N, R) at d_in = d_out = 4096, bf16, the base layer alone
  (``F.linear``, the floor), base + a PEFT-style eager adapter (``lora_B(lora_A(x)) * scale``),
  PEFT's own LoRA module (``peft.tuners.lora.Linear``, where peft is installed), base +
  ``fk.masked_lora`` added separately, and ``fk.masked_lora`` owning the base GEMM
  (``base_weight``: the layers' path) with every component trainable, and with half of them
  frozen by ``grad_mask`` (scattered, as HAFL picks them). Forward and forward+backward milliseconds, the
  ratios to the floor, peak memory, and for our two rows the time of the adapter backward alone
  (``bwd_ms``: dx, dA, dB) and of the adapter-parameter gradients alone (``grad_ms``: dA, dB).
  The issue-3 goals read directly off these rows: ``fwd_x_floor <= 1.10`` at N=8192, R=64, and
  ``grad_ms(half) / grad_ms(all) <= 0.60`` (reported as ``grad_x_all``).
* ``bench="masked_adamw_"``: the fused step on a stacked ``[C, R, d]`` factor with all and half of
  the components unmasked, as GB/s of the bytes the unmasked elements move, beside the GB/s of a
  device copy of the same size (``x_copy_bw`` is the goal's ratio, target >= 0.80) and the time of
  ``torch.optim.AdamW(fused=True)`` stepping the whole tensor.

Timing (``bench/_timing.py``): median of ``triton.testing.do_bench`` over a rotation of input
sets; ``python bench/gpu.py --dry-run`` runs this suite at tiny shapes (without a GPU on the CPU:
torch backend for the public ops, the Triton launchers of the backward-only rows in the
interpreter).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from _rows import emit
from _timing import RunConfig, copy_gbps, peft_lora_baseline, rotated, time_cases

import fedlora_kernels as fk


def _adapter_launchers() -> tuple[Callable, Callable] | None:
    """The Triton forward/backward launchers of ``masked_lora`` that the backward-only rows call
    directly (private names of ``fedlora_kernels``), or None, saying why, where they moved."""
    try:
        from fedlora_kernels.ops._masked_lora_triton import masked_lora_bwd, masked_lora_fwd
    except ImportError as exc:
        print(f"masked_lora rows without bwd_ms/grad_ms: {exc}", flush=True)
        return None
    return masked_lora_fwd, masked_lora_bwd


def _half_mask(slots: int, rank: int, device: str) -> torch.Tensor:
    """Exactly half of the components of every slot, scattered (a fixed random pick); bool, so
    the ops skip their syncing 0/1 value check."""
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(rank, generator=g)[: rank // 2] for _ in range(slots)])
    mask = torch.zeros(slots, rank, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.to(device)


def masked_lora_rows(ns: Sequence[int], d: int, ranks: Sequence[int], run: RunConfig) -> list[dict]:
    """Base + adapter at every (N, R): floor, PEFT-style eager, ours all-trainable, ours half-frozen."""
    device, dtype, backend = run.device, run.dtype, run.backend
    launchers = _adapter_launchers()
    rows = []
    for n, rank in itertools.product(ns, ranks):
        scale = 16.0 / rank
        W = torch.randn(d, d, device=device, dtype=dtype) / d**0.5
        A = (torch.randn(rank, d, device=device, dtype=dtype) / d**0.5).requires_grad_(True)
        B = (torch.randn(d, rank, device=device, dtype=dtype) / rank**0.5).requires_grad_(True)
        xs = rotated(lambda: torch.randn(n, d, device=device, dtype=dtype, requires_grad=True))
        gs = rotated(lambda: torch.randn(n, d, device=device, dtype=dtype))
        half = _half_mask(1, rank, device)

        def eager(x):
            # PEFT's Linear.forward with dropout 0: base(x) + lora_B(lora_A(x)) * scaling
            return F.linear(x, W) + F.linear(F.linear(x, A), B) * scale

        def ours(x, grad_mask=None):
            # the layers' path: the op owns the frozen base GEMM (base_weight), the adapter is
            # accumulated into its output and its input gradient into dy W, in place
            return fk.masked_lora(
                x, A, B, scale=scale, grad_mask=grad_mask, base_weight=W, backend=backend
            )

        peft_mod = peft_lora_baseline(W.float().cpu(), rank, alpha=16.0, A=A.cpu(), B=B.cpu())
        cases: dict[str, Callable] = {
            "F.linear": lambda x: F.linear(x, W),
            "peft-style eager": eager,
            "fedlora separate add": lambda x: (
                F.linear(x, W) + fk.masked_lora(x, A, B, scale=scale, backend=backend)
            ),
            "fedlora all-trainable": ours,
            "fedlora half-frozen": lambda x: ours(x, half),
        }
        params = [A, B]
        if peft_mod is not None:  # PEFT's own LoRA module (peft.tuners.lora.Linear), eager
            peft_mod = peft_mod.to(device=device, dtype=dtype)
            cases["peft LoRA module"] = peft_mod
            params += [p for p in peft_mod.parameters() if p.requires_grad]
        shape = dict(N=n, d_in=d, d_out=d, R=rank)
        new = []
        for case in time_cases(cases, xs, gs, run, params=params):
            name = case.pop("impl")
            row = {"bench": "masked_lora", "impl": name, **shape, **case}
            if name in ("fedlora all-trainable", "fedlora half-frozen") and launchers is not None:
                gm = None if name.endswith("all-trainable") else half.float()
                row.update(_backward_only(launchers, xs, gs, A, B, gm, scale, run))
            new.append(row)
        if launchers is not None:
            all_row = next(r for r in new if r["impl"] == "fedlora all-trainable")
            half_row = next(r for r in new if r["impl"] == "fedlora half-frozen")
            half_row["grad_x_all"] = half_row["grad_ms"] / all_row["grad_ms"]
            half_row["bwd_x_all"] = half_row["bwd_ms"] / all_row["bwd_ms"]
        for row in new:
            emit(row)
        rows += new
    return rows


def _backward_only(launchers, xs, gs, A, B, gm, scale, run: RunConfig) -> dict[str, float]:
    """The adapter backward alone (``bwd_ms``: dx, dA, dB; ``grad_ms``: dA, dB), from a saved
    forward (x, T) and the slot tables, through the Triton launchers."""
    fwd, bwd = launchers
    a3, b3 = A.detach()[None], B.detach()[None]
    one_segment = (None, None, None, None, None, 0)  # no table: the one-segment fast path
    saved = [fwd(x.detach(), a3, b3, None, gm, *one_segment, scale)[1] for x in xs]

    def backward(i: int, need_dx: bool):
        return bwd(
            gs[i], xs[i].detach(), saved[i], a3, b3, None, gm, *one_segment, scale,
            need_dx, True, True,
        )  # fmt: skip

    return {
        "bwd_ms": run.timer(lambda i: backward(i, True)),
        "grad_ms": run.timer(lambda i: backward(i, False)),
    }


def masked_adamw_rows(shapes: Sequence[tuple[int, int, int]], run: RunConfig) -> list[dict]:
    """Fused masked AdamW GB/s (all / half unmasked, fp32 and bf16) beside a device copy."""
    device, backend, timer = run.device, run.backend, run.timer
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    rows = []
    for (slots, rank, dim), dtype in itertools.product(shapes, (torch.float32, torch.bfloat16)):
        shape = (slots, rank, dim)
        numel = slots * rank * dim
        esize = torch.empty((), dtype=dtype).element_size()
        sets = rotated(lambda: [torch.randn(shape, device=device, dtype=dtype) for _ in range(4)])
        for s in sets:  # param, grad, exp_avg, exp_avg_sq
            s[3].abs_()
        ceiling = copy_gbps(numel * 7 // 2, dtype, run)

        p_t = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        p_t.grad = torch.randn_like(p_t)
        fused = device.startswith("cuda")
        opt = torch.optim.AdamW([p_t], **hp, fused=fused or None)
        torch_ms = timer(lambda i: opt.step())

        for label, mask in (
            ("all", torch.ones(slots, rank, device=device, dtype=torch.bool)),
            ("half", _half_mask(slots, rank, device)),
        ):
            frac = float(mask.float().mean())

            def step(i, mask=mask):
                p, g, m, v = sets[i]
                fk.masked_adamw_(p, g, m, v, mask, step=10, rank_dim=0, backend=backend, **hp)

            ms = timer(step)
            moved = 7 * numel * esize * frac  # read p, g, m, v; write p, m, v (unmasked only)
            row = dict(
                bench="masked_adamw_",
                impl=f"fedlora mask={label}",
                C=slots,
                R=rank,
                d=dim,
                dtype=str(dtype).removeprefix("torch."),
                ms=ms,
                gbps=moved / ms / 1e6,
                copy_gbps=ceiling,
                torch_adamw_ms=torch_ms,
            )
            row["x_copy_bw"] = row["gbps"] / ceiling
            rows.append(emit(row))
    return rows


def suite(run: RunConfig) -> list[dict]:
    """All rows of both benchmarks (see the module docstring); ``run.quick``: N=8192, R=64 only;
    ``run.dry_run``: tiny shapes."""
    ns, d, ranks = (256, 2048, 8192), 4096, (16, 64)
    adamw_shapes = ((16, 64, 4096), (64, 16, 4096))
    if run.quick:
        ns, ranks, adamw_shapes = (8192,), (64,), adamw_shapes[:1]
    if run.dry_run:
        ns, d, ranks, adamw_shapes = (37,), 24, (6,), ((2, 6, 24),)
    torch.manual_seed(0)
    return masked_lora_rows(ns, d, ranks, run) + masked_adamw_rows(adamw_shapes, run)


if __name__ == "__main__":
    raise SystemExit("run this suite through bench/gpu.py: python bench/gpu.py --only masked")
