"""GPU benchmark of the masked-LoRA family (DESIGN §8), imported by ``bench/gpu.py``.

``bench_masked(quick)`` returns one dict per measured row:

* ``bench="masked_lora"``: per (N, R) at d_in = d_out = 4096, bf16, the base layer alone
  (``F.linear``, the floor), base + a PEFT-style eager adapter (``lora_B(lora_A(x)) * scale``),
  base + ``fk.masked_lora`` with every component trainable, and with half of them frozen by
  ``grad_mask`` (scattered, as HAFL picks them). Forward and forward+backward milliseconds, the
  ratios to the floor, peak memory, and for our two rows the time of the adapter backward alone
  (``bwd_ms``: dx, dA, dB) and of the adapter-parameter gradients alone (``grad_ms``: dA, dB).
  The issue-3 goals read directly off these rows: ``fwd_x_floor <= 1.10`` at N=8192, R=64, and
  ``grad_ms(half) / grad_ms(all) <= 0.60`` (reported as ``grad_x_all``).
* ``bench="masked_adamw_"``: the fused step on a stacked ``[C, R, d]`` factor with all and half of
  the components unmasked, as GB/s of the bytes the unmasked elements move, beside the GB/s of a
  device copy of the same size (``x_copy_bw`` is the goal's ratio, target >= 0.80) and the time of
  ``torch.optim.AdamW(fused=True)`` stepping the whole tensor.

Timing: median of ``triton.testing.do_bench`` over a rotation of input sets. ``timer``,
``device`` and ``backend`` exist so the script can be smoke-run on CPU under the Triton
interpreter with tiny shapes; on a GPU leave them at their defaults.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

import fedlora_kernels as fk

ROTATE = 8
Timer = Callable[[Callable[[int], object]], float]


def do_bench_ms(fn: Callable[[int], object]) -> float:
    """Median milliseconds of ``fn(i)`` with ``i`` cycling over the ``ROTATE`` input sets."""
    import triton.testing

    counter = itertools.count()
    return float(
        triton.testing.do_bench(
            lambda: fn(next(counter) % ROTATE), warmup=25, rep=200, return_mode="median"
        )
    )


def _peak_mib(fn: Callable[[int], object], device: str) -> float | None:
    """Peak CUDA memory above the starting point during one call of ``fn(0)``, in MiB."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(0)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _fmt(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _half_mask(slots: int, rank: int, device: str) -> torch.Tensor:
    """Exactly half of the components of every slot, scattered (a fixed random pick); bool, so
    the ops skip their syncing 0/1 value check."""
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(rank, generator=g)[: rank // 2] for _ in range(slots)])
    mask = torch.zeros(slots, rank, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.to(device)


def masked_lora_rows(
    ns: Sequence[int],
    d: int,
    ranks: Sequence[int],
    *,
    timer: Timer,
    device: str,
    dtype: torch.dtype,
    backend: str | None,
) -> list[dict]:
    """Base + adapter at every (N, R): floor, PEFT-style eager, ours all-trainable, ours half-frozen."""
    from fedlora_kernels.ops import _masked_lora_triton as impl

    rows = []
    for n, rank in itertools.product(ns, ranks):
        scale = 16.0 / rank
        W = torch.randn(d, d, device=device, dtype=dtype) / d**0.5
        A = (torch.randn(rank, d, device=device, dtype=dtype) / d**0.5).requires_grad_(True)
        B = (torch.randn(d, rank, device=device, dtype=dtype) / rank**0.5).requires_grad_(True)
        xs = [
            torch.randn(n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(ROTATE)
        ]
        gs = [torch.randn(n, d, device=device, dtype=dtype) for _ in range(ROTATE)]
        half = _half_mask(1, rank, device)

        def eager(x):
            # PEFT's Linear.forward with dropout 0: base(x) + lora_B(lora_A(x)) * scaling
            return F.linear(x, W) + F.linear(F.linear(x, A), B) * scale

        def ours(x, grad_mask=None):
            return F.linear(x, W) + fk.masked_lora(
                x, A, B, scale=scale, grad_mask=grad_mask, backend=backend
            )

        cases: dict[str, Callable] = {
            "F.linear": lambda x: F.linear(x, W),
            "peft-style eager": eager,
            "fedlora all-trainable": ours,
            "fedlora half-frozen": lambda x: ours(x, half),
        }
        floor_f = floor_fb = None
        for name, f in cases.items():
            fwd = timer(lambda i, f=f: f(xs[i].detach()))

            def fb(i, f=f):
                f(xs[i]).backward(gs[i])
                xs[i].grad = A.grad = B.grad = None

            fwdbwd = timer(fb)
            if name == "F.linear":
                floor_f, floor_fb = fwd, fwdbwd
            row = dict(
                bench="masked_lora",
                impl=name,
                N=n,
                d_in=d,
                d_out=d,
                R=rank,
                fwd_ms=fwd,
                fwdbwd_ms=fwdbwd,
                peak_mib=_peak_mib(fb, device),
                fwd_x_floor=fwd / floor_f,
                fwdbwd_x_floor=fwdbwd / floor_fb,
            )
            if name.startswith("fedlora"):
                # the adapter backward alone, from a saved forward (x, T) and the slot tables
                gm = None if name.endswith("all-trainable") else half.float()
                off = torch.tensor([0, n], device=device)
                ad = torch.zeros(1, dtype=torch.int64, device=device)
                a3, b3 = A.detach()[None], B.detach()[None]
                saved = [
                    impl.masked_lora_fwd(x.detach(), a3, b3, None, gm, off, ad, scale)[1]
                    for x in xs
                ]

                def bwd(i, need_dx, gm=gm, saved=saved):
                    return impl.masked_lora_bwd(
                        gs[i], xs[i].detach(), saved[i], a3, b3, None, gm, off, ad, scale,
                        need_dx, True, True,
                    )  # fmt: skip

                row["bwd_ms"] = timer(lambda i: bwd(i, True))
                row["grad_ms"] = timer(lambda i: bwd(i, False))
            rows.append(row)
        all_row = next(r for r in rows[-2:] if r["impl"] == "fedlora all-trainable")
        rows[-1]["grad_x_all"] = rows[-1]["grad_ms"] / all_row["grad_ms"]
        rows[-1]["bwd_x_all"] = rows[-1]["bwd_ms"] / all_row["bwd_ms"]
        for row in rows[-4:]:
            print(_fmt(row), flush=True)
    return rows


def masked_adamw_rows(
    shapes: Sequence[tuple[int, int, int]],
    *,
    timer: Timer,
    device: str,
    backend: str | None,
) -> list[dict]:
    """Fused masked AdamW GB/s (all / half unmasked, fp32 and bf16) beside a device copy."""
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    rows = []
    for (slots, rank, dim), dtype in itertools.product(shapes, (torch.float32, torch.bfloat16)):
        shape = (slots, rank, dim)
        numel = slots * rank * dim
        esize = torch.empty((), dtype=dtype).element_size()
        sets = [
            [torch.randn(shape, device=device, dtype=dtype) for _ in range(4)]
            for _ in range(ROTATE)
        ]  # param, grad, exp_avg, exp_avg_sq
        for s in sets:
            s[3].abs_()
        src = torch.empty(numel * 7 // 2, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        copy_ms = timer(lambda i: dst.copy_(src))
        copy_gbps = 2 * src.numel() * esize / copy_ms / 1e6

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
                copy_gbps=copy_gbps,
                torch_adamw_ms=torch_ms,
            )
            row["x_copy_bw"] = row["gbps"] / copy_gbps
            print(_fmt(row), flush=True)
            rows.append(row)
    return rows


def bench_masked(
    quick: bool = False,
    *,
    ns: Sequence[int] = (256, 2048, 8192),
    d: int = 4096,
    ranks: Sequence[int] = (16, 64),
    adamw_shapes: Sequence[tuple[int, int, int]] = ((16, 64, 4096), (64, 16, 4096)),
    timer: Timer | None = None,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
) -> list[dict]:
    """All rows of both benchmarks (see the module docstring); ``quick``: N=8192, R=64 only."""
    if quick:
        ns, ranks, adamw_shapes = (8192,), (64,), adamw_shapes[:1]
    timer = timer or do_bench_ms
    torch.manual_seed(0)
    rows = masked_lora_rows(ns, d, ranks, timer=timer, device=device, dtype=dtype, backend=backend)
    rows += masked_adamw_rows(adamw_shapes, timer=timer, device=device, backend=backend)
    return rows


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_masked.py needs a CUDA device (or call bench_masked yourself)")
    bench_masked()
