"""masked_adamw_: the fused masked AdamW step against the real torch.optim.AdamW.

Because AdamW is elementwise, the unmasked elements of a masked step must follow exactly the
trajectory torch.optim.AdamW gives them on the whole tensor, while the masked elements of the
parameter and of both moment buffers must not change by a single bit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICES

import fedlora_kernels as fk
from fedlora_kernels import reference

HP = dict(lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)


def rank_mask(kind, slots, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "ones":
        m = torch.ones(slots, rank)
    elif kind == "zeros":
        m = torch.zeros(slots, rank)
    elif kind == "prefix":
        m = (torch.arange(rank)[None, :] < (torch.arange(slots)[:, None] + rank // 2)).float()
    else:  # scattered, never all or none
        m = (torch.rand(slots, rank, generator=g) < 0.5).float()
        m[:, 0], m[:, -1] = 1.0, 0.0
    return m


def keep_of(mask, rank_dim, shape):
    """Bool tensor of ``shape`` ([C, M, K]): True where the element's component is unmasked."""
    m = mask.bool().reshape(shape[0], -1)
    k = m[:, :, None] if rank_dim == 0 else m[:, None, :]
    return k.expand(shape)


def torch_adamw_trajectory(p0, grads, hp, prior_steps=0, prior_grads=()):
    """Parameter and moments after torch.optim.AdamW applies ``grads`` in order (after
    ``prior_grads``)."""
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                            weight_decay=hp["weight_decay"])  # fmt: skip
    for g in (*prior_grads, *grads):
        p.grad = g.clone()
        opt.step()
    st = opt.state[p]
    if not st:  # no step taken yet
        return p.detach(), torch.zeros_like(p0), torch.zeros_like(p0)
    return p.detach(), st["exp_avg"], st["exp_avg_sq"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank_dim,shape", [(0, (6, 37)), (1, (29, 6))], ids=["A", "B"])
@pytest.mark.parametrize("kind", ["ones", "zeros", "prefix", "scattered"])
def test_matches_torch_adamw_on_unmasked_part(backend, rank_dim, shape, kind):
    """Five masked steps with a fixed mask: the unmasked elements equal torch.optim.AdamW's, the
    masked ones (parameter and both moments) are bitwise unchanged, every unmasked one moved."""
    rank = shape[rank_dim]
    mask = rank_mask(kind, 1, rank)[0]
    p0 = torch.randn(shape)
    m0, v0 = torch.rand(shape) * 0.1, torch.rand(shape) * 0.01  # resumed, non-zero state
    grads = [torch.randn(shape) for _ in range(5)]
    p, m, v = p0.clone(), m0.clone(), v0.clone()
    for i, g in enumerate(grads):
        fk.masked_adamw_(p, g, m, v, mask, step=i + 1, rank_dim=rank_dim, backend=backend, **HP)

    # torch.optim.AdamW from the same resumed state
    q = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([q], **HP)
    p_ref, m_ref, v_ref = q.detach(), m0.clone(), v0.clone()
    opt.state[q] = {"step": torch.tensor(0.0), "exp_avg": m_ref, "exp_avg_sq": v_ref}
    for g in grads:
        q.grad = g.clone()
        opt.step()

    keep = keep_of(mask, rank_dim, (1, *shape))[0]
    exact = backend == "torch"  # the reference follows torch op for op: bitwise equal
    for got, exp, old in ((p, p_ref, p0), (m, m_ref, m0), (v, v_ref, v0)):
        assert torch.equal(got[~keep], old[~keep])
        if exact:
            assert torch.equal(got[keep], exp[keep])
        else:
            torch.testing.assert_close(got[keep], exp[keep], atol=1e-6, rtol=1e-5)
        assert (got[keep] != old[keep]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank_dim", [0, 1], ids=["A", "B"])
def test_batched_slots_with_their_own_step_numbers(backend, rank_dim):
    """[C, R, d] / [C, d, R] with a [C, R] mask and a per-slot step tensor: slot c's unmasked part
    equals torch.optim.AdamW's step number step[c] on that slot alone."""
    slots, rank, d = 3, 5, 19
    shape = (slots, rank, d) if rank_dim == 0 else (slots, d, rank)
    steps = torch.tensor([1, 4, 9])
    mask = rank_mask("scattered", slots, rank, seed=4)
    hist = [torch.randn(shape) for _ in range(8)]  # earlier gradients of each slot
    g = torch.randn(shape)
    p0 = torch.randn(shape)
    p, m, v = p0.clone(), torch.zeros(shape), torch.zeros(shape)
    expected = []
    for c in range(slots):
        prior = [h[c] for h in hist[: int(steps[c]) - 1]]
        before = torch_adamw_trajectory(p0[c], [], HP, prior_grads=prior)
        p[c], m[c], v[c] = before
        expected.append(torch_adamw_trajectory(p0[c], [g[c]], HP, prior_grads=prior))
    p_old, m_old, v_old = p.clone(), m.clone(), v.clone()
    fk.masked_adamw_(p, g, m, v, mask, step=steps, rank_dim=rank_dim, backend=backend, **HP)
    keep = keep_of(mask, rank_dim, shape)
    for c in range(slots):
        for got, exp in zip((p[c], m[c], v[c]), expected[c], strict=True):
            torch.testing.assert_close(got[keep[c]], exp[keep[c]], atol=1e-6, rtol=1e-5)
    for got, old in ((p, p_old), (m, m_old), (v, v_old)):
        assert torch.equal(got[~keep], old[~keep])


@pytest.mark.parametrize("backend", BACKENDS)
def test_importance_statistics(backend):
    """Ī and Ū follow their EMA formulas with I = |w·g| at the weight before the step; masked
    components keep them bitwise."""
    shape = (2, 6, 21)
    mask = rank_mask("scattered", 2, 6, seed=5)
    p0, g = torch.randn(shape), torch.randn(shape)
    ema0, unc0 = torch.rand(shape), torch.rand(shape)
    p, m, v = p0.clone(), torch.zeros(shape), torch.zeros(shape)
    ema, unc = ema0.clone(), unc0.clone()
    fk.masked_adamw_(
        p, g, m, v, mask, step=1, importance=(ema, unc, 0.85, 0.7), backend=backend, **HP
    )
    sens = (p0.double() * g.double()).abs()
    e_exp = 0.85 * ema0.double() + 0.15 * sens
    u_exp = 0.7 * unc0.double() + 0.3 * (sens - e_exp).abs()
    keep = keep_of(mask, 0, shape)
    torch.testing.assert_close(ema[keep].double(), e_exp[keep], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(unc[keep].double(), u_exp[keep], atol=1e-6, rtol=1e-6)
    assert torch.equal(ema[~keep], ema0[~keep]) and torch.equal(unc[~keep], unc0[~keep])
    # the step itself is unaffected by the statistics
    q, mq, vq = p0.clone(), torch.zeros(shape), torch.zeros(shape)
    fk.masked_adamw_(q, g, mq, vq, mask, step=1, backend=backend, **HP)
    assert torch.equal(p, q) and torch.equal(m, mq) and torch.equal(v, vq)


@pytest.mark.parametrize("backend", BACKENDS)
def test_importance_constant_sensitivity_converges(backend):
    """With a constant |w·g| (lr = 0 keeps w fixed), Ī → I and Ū → 0."""
    shape = (4, 9)
    mask = torch.ones(4)
    p, g = torch.randn(shape), torch.randn(shape)
    m, v = torch.zeros(shape), torch.zeros(shape)
    ema, unc = torch.zeros(shape), torch.zeros(shape)
    hp = dict(HP, lr=0.0)
    for step in range(1, 121):
        fk.masked_adamw_(
            p, g, m, v, mask, step=step, importance=(ema, unc, 0.85, 0.85), backend=backend, **hp
        )
    sens = (p * g).abs()
    torch.testing.assert_close(ema, sens, atol=1e-6, rtol=1e-6)
    assert unc.max() < 1e-6 * max(1.0, sens.max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "state_dtype", [torch.bfloat16, torch.float32], ids=["bf16state", "fp32state"]
)
def test_bf16_parameters(backend, state_dtype):
    """bf16 parameters (state in bf16 or fp32) match the float32 update rounded once, within
    bf16 resolution; masked elements stay bitwise."""
    shape = (2, 13, 6)
    mask = rank_mask("scattered", 2, 6, seed=6)
    p0 = torch.randn(shape).bfloat16()
    g = torch.randn(shape).bfloat16()
    m0, v0 = (torch.rand(shape) * 0.1).to(state_dtype), (torch.rand(shape) * 0.01).to(state_dtype)
    p, m, v = p0.clone(), m0.clone(), v0.clone()
    fk.masked_adamw_(p, g, m, v, mask, step=3, rank_dim=1, backend=backend, **HP)
    pf, mf, vf = p0.float().clone(), m0.float().clone(), v0.float().clone()
    reference.masked_adamw_(
        pf, g.float(), mf, vf, mask, lr=HP["lr"], beta1=0.9, beta2=0.999, eps=HP["eps"],
        weight_decay=HP["weight_decay"], step=3, rank_dim=1, importance=None,
    )  # fmt: skip
    keep = keep_of(mask, 1, shape)
    for got, exp, old in ((p, pf, p0), (m, mf, m0), (v, vf, v0)):
        assert got.dtype == old.dtype
        assert torch.equal(got[~keep], old[~keep])
        torch.testing.assert_close(got[keep].float(), exp[keep], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_and_reference_agree_other_hyperparameters(backend):
    """beta1 <= 0.5 (the other branch of torch's lerp), no weight decay, large eps; several
    blocks of elements; mask given as bool, int or float."""
    shape = (3, 40, 37)
    mask = rank_mask("prefix", 3, 40)
    p0, g = torch.randn(shape), torch.randn(shape)
    m0, v0 = torch.randn(shape) * 0.1, torch.rand(shape) * 0.01
    hp = dict(lr=0.1, betas=(0.3, 0.95), eps=1e-3, weight_decay=0.0)
    outs = []
    for mk, be in ((mask.bool(), backend), (mask.long(), "torch"), (mask, "torch")):
        p, m, v = p0.clone(), m0.clone(), v0.clone()
        fk.masked_adamw_(p, g, m, v, mk, step=torch.tensor([2, 2, 7]), backend=be, **hp)
        outs.append((p, m, v))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    q = p0[2].clone().requires_grad_(True)
    opt = torch.optim.AdamW([q], lr=0.1, betas=(0.3, 0.95), eps=1e-3, weight_decay=0.0)
    opt.state[q] = {
        "step": torch.tensor(6.0),
        "exp_avg": m0[2].clone(),
        "exp_avg_sq": v0[2].clone(),
    }
    q.grad = g[2].clone()
    opt.step()
    keep = keep_of(mask, 0, shape)[2]
    torch.testing.assert_close(outs[0][0][2][keep], q.detach()[keep], atol=1e-6, rtol=1e-5)


def test_step_forms_are_equivalent():
    """step as an int, a 0-d tensor and a [1] tensor give the same update (to float32 rounding:
    a tensor step's bias terms are formed on the tensor's device); mask [1, R] for 2-D."""
    shape = (5, 11)
    p0, g = torch.randn(shape), torch.randn(shape)
    mask = rank_mask("scattered", 1, 5)
    outs = []
    for step, mk in ((4, mask[0]), (torch.tensor(4), mask), (torch.tensor([4.0]), mask[0])):
        p, m, v = p0.clone(), torch.zeros(shape), torch.zeros(shape)
        fk.masked_adamw_(p, g, m, v, mk, step=step, backend="torch", **HP)
        outs.append(p)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-7, rtol=1e-6)
    assert not torch.equal(outs[0], p0)


def test_non_contiguous_grad_is_accepted():
    shape = (5, 11)
    p0 = torch.randn(shape)
    g = torch.randn(11, 5).T
    assert not g.is_contiguous()
    outs = []
    for be in BACKENDS:
        p, m, v = p0.clone(), torch.zeros(shape), torch.zeros(shape)
        fk.masked_adamw_(p, g, m, v, torch.ones(5), step=1, backend=be, **HP)
        outs.append(p)
    ref = torch_adamw_trajectory(p0, [g.contiguous()], HP)[0]
    for p in outs:
        torch.testing.assert_close(p, ref, atol=1e-6, rtol=1e-5)


def test_compile_fullgraph_cpu():
    shape = (2, 6, 9)
    mask = rank_mask("scattered", 2, 6)
    p0, g = torch.randn(shape), torch.randn(shape)

    def f(p, g, m, v, step):
        fk.masked_adamw_(p, g, m, v, mask, step=step, backend="torch", **HP)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [p0.clone(), torch.zeros(shape), torch.zeros(shape)]
    b = [p0.clone(), torch.zeros(shape), torch.zeros(shape)]
    steps = torch.tensor([1, 3])
    compiled(a[0], g, a[1], a[2], steps)
    f(b[0], g, b[1], b[2], steps)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_device_default_dispatch(device):
    shape = (4, 16, 33)
    mask = rank_mask("scattered", 4, 16).to(device)
    p0, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    fk.masked_adamw_(p, g, m, v, mask, step=2, **HP)
    q, mq, vq = p0.cpu(), torch.zeros(shape), torch.zeros(shape)
    fk.masked_adamw_(q, g.cpu(), mq, vq, mask.cpu(), step=2, backend="torch", **HP)
    torch.testing.assert_close(p.cpu(), q, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_matches_reference(dtype):
    shape = (8, 64, 4096)
    mask = rank_mask("scattered", 8, 64).cuda()
    p0 = torch.randn(shape, device="cuda").to(dtype)
    g = torch.randn(shape, device="cuda").to(dtype)
    ema0 = torch.rand(shape, device="cuda")
    res = []
    for be in ("triton", "torch"):
        p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        ema, unc = ema0.clone(), torch.zeros_like(ema0)
        fk.masked_adamw_(p, g, m, v, mask, step=torch.arange(1, 9, device="cuda"),
                         importance=(ema, unc, 0.85, 0.85), backend=be, **HP)  # fmt: skip
        res.append((p, m, v, ema, unc))
    keep = keep_of(mask.cpu(), 0, shape).cuda()
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert torch.equal(res[0][0][~keep], p0[~keep])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compile_fullgraph():
    shape = (2, 16, 64)
    mask = rank_mask("scattered", 2, 16).cuda()
    p0, g = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")

    def f(p, g, m, v):
        fk.masked_adamw_(p, g, m, v, mask, step=3, **HP)

    a = [p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)]
    b = [p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)]
    torch.compile(f, fullgraph=True)(a[0], g, a[1], a[2])
    f(b[0], g, b[1], b[2])
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------------------------- bad input


def _good():
    shape = (2, 4, 6)
    return dict(
        param=torch.randn(shape), grad=torch.randn(shape), exp_avg=torch.zeros(shape),
        exp_avg_sq=torch.zeros(shape), mask=torch.ones(2, 4), step=1, **HP,
    )  # fmt: skip


def _set(**kw):
    return lambda a: a.update(kw)


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (_set(param=torch.randn(4)), ValueError, "param must be 2-D or 3-D"),
        (_set(param=torch.randn(6, 4, 2).transpose(0, 2)), ValueError, "param must be contiguous"),
        (_set(param=torch.ones(2, 4, 6, dtype=torch.int64)), TypeError, "param must have dtype"),
        (_set(grad=torch.randn(2, 4, 5)), ValueError, "grad must have the shape of param"),
        (_set(exp_avg=torch.zeros(2, 4)), ValueError, "exp_avg must have the shape of param"),
        (_set(exp_avg_sq=torch.zeros(2, 6, 4).transpose(1, 2)), ValueError, "exp_avg_sq must be contiguous"),
        (_set(mask=torch.ones(2, 6)), ValueError, "mask must have shape [C=2, R=4]"),
        (_set(mask=torch.ones(4)), ValueError, "mask must have shape [C=2, R=4]"),
        (_set(mask=torch.ones(2, 6), rank_dim=0), ValueError, "rank_dim=0"),
        (_set(mask=torch.full((2, 4), 2.0)), ValueError, "mask must contain only 0 and 1"),
        (_set(rank_dim=2), ValueError, "rank_dim must be 0"),
        (_set(lr=-1.0), ValueError, "lr must be >= 0"),
        (_set(lr=float("nan")), ValueError, "lr must be finite"),
        (_set(betas=(0.9,)), ValueError, "betas must be a pair"),
        (_set(betas=(1.0, 0.999)), ValueError, "betas[0] must lie in [0, 1)"),
        (_set(betas=(0.9, -0.1)), ValueError, "betas[1] must lie in [0, 1)"),
        (_set(eps=-1e-8), ValueError, "eps must be >= 0"),
        (_set(weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
        (_set(step=0), ValueError, "step must be >= 1"),
        (_set(step=1.5), TypeError, "step must be an int or a tensor"),
        (_set(step=torch.tensor([1, 2, 3])), ValueError, "step must be an int or a tensor [C=2]"),
        (_set(step=torch.tensor([1, 0])), ValueError, "step must be >= 1"),
        (_set(importance=(torch.zeros(2, 4, 6), torch.zeros(2, 4, 6))), ValueError, "importance must be a tuple"),
        (_set(importance=(torch.zeros(2, 4, 6), torch.zeros(3), 0.85, 0.85)), ValueError, "importance[1] (unc) must have the shape"),
        (_set(importance=(torch.zeros(2, 4, 6), torch.zeros(2, 4, 6), 1.5, 0.85)), ValueError, "importance[2] (beta1) must lie in"),
        (_set(backend="gpu"), ValueError, "backend must be one of"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(change, exc, words):
    args = _good()
    change(args)
    pos = [args.pop(k) for k in ("param", "grad", "exp_avg", "exp_avg_sq", "mask")]
    with pytest.raises(exc) as err:
        fk.masked_adamw_(*pos, **args)
    assert words in str(err.value)


def test_bad_input_leaves_everything_untouched():
    """A rejected call changes nothing (validation happens before any write)."""
    args = _good()
    before = {k: args[k].clone() for k in ("param", "exp_avg", "exp_avg_sq")}
    args["mask"] = torch.full((2, 4), 0.5)
    pos = [args.pop(k) for k in ("param", "grad", "exp_avg", "exp_avg_sq", "mask")]
    with pytest.raises(ValueError):
        fk.masked_adamw_(*pos, **args)
    for t, k in zip((pos[0], pos[2], pos[3]), before, strict=True):
        assert torch.equal(t, before[k])
