"""Client sides of HAFL (importance, freezing) and PreLort (nested truncation in one pass)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedlora
from fedlora.methods import hafl, prefix, prelort
from fedlora.simulate.optim import SlotAdamW


def lora_net(rank: int = 6, num_clients: int = 1) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 5))
    fedlora.inject(net, "hafl", target_modules=["0", "2"], rank=rank, num_clients=num_clients)
    with torch.no_grad():
        for _, layer in fedlora.adapter_layers(net):
            layer.lora_B.normal_(0, 0.1)  # non-zero B so A gets gradient too
    return net


def train_steps(net, tracker, steps, x, y, select_after=None, budget=None):
    opt = SlotAdamW(net, lr=1e-2, weight_decay=0.1)  # decay would move frozen parts if unmasked
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        tracker.update()
        opt.step(torch.ones(1, dtype=torch.bool))
        if select_after is not None and step + 1 == select_after:
            tracker.select(budget)


def test_freezing_mode_changes_exactly_the_top_m_components():
    net = lora_net()
    tracker = hafl.ImportanceTracker(net)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    # score on two batches with nothing trained (lr 0 is not needed: scoring is a separate phase)
    for _ in range(2):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        tracker.update()
    selection = tracker.select(2)
    before = {
        p: (m.lora_A.detach().clone(), m.lora_B.detach().clone())
        for p, m in fedlora.adapter_layers(net)
    }
    train_steps(net, tracker, 3, x, y)
    for path, layer in fedlora.adapter_layers(net):
        A0, B0 = before[path]
        changed = [
            j for j in range(layer.rank)
            if not (torch.equal(layer.lora_A[0, j], A0[0, j]) and torch.equal(layer.lora_B[0, :, j], B0[0, :, j]))
        ]  # fmt: skip
        assert changed == selection[path], (path, changed, selection[path])
        frozen = [j for j in range(layer.rank) if j not in selection[path]]
        assert torch.equal(layer.lora_A[0, frozen], A0[0, frozen])  # bitwise
        assert torch.equal(layer.lora_B[0][:, frozen], B0[0][:, frozen])


def test_selection_follows_component_scores():
    net = lora_net()
    tracker = hafl.ImportanceTracker(net)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    F.cross_entropy(net(x), y).backward()
    tracker.update()
    scores = tracker.component_scores()
    sel = tracker.select(3)
    for path, s in scores.items():
        # not trivially: one scoring step already ranks by importance (Ū starts at |I|, not 0),
        # so the scores are positive and distinct and the choice is theirs, not the index's
        assert bool((s > 0).all()) and len(set(s.tolist())) == len(s), (path, s)
        assert sel[path] == sorted(torch.argsort(-s)[:3].tolist())
    assert any(v != [0, 1, 2] for v in sel.values()), sel  # not the lowest indices everywhere
    # the score is the mean over B's column plus the mean over A's row, of Ī·Ū
    path, _ = next(iter(fedlora.adapter_layers(net)))
    ema_a, unc_a = tracker.ema[f"{path}.A"][0], tracker.unc[f"{path}.A"][0]
    ema_b, unc_b = tracker.ema[f"{path}.B"][0], tracker.unc[f"{path}.B"][0]
    expect = (ema_a * unc_a).mean(1) + (ema_b * unc_b).mean(0)
    torch.testing.assert_close(scores[path], expect)
    layer = dict(fedlora.adapter_layers(net))[path]
    sens_a = (layer.lora_A.detach() * layer.lora_A.grad)[0].abs()
    assert torch.equal(ema_a, sens_a) and torch.equal(unc_a, sens_a)  # first update: Ī = Ū = I


def test_ema_sanity_constant_sensitivity():
    """Constant |w·g|: Ī converges to I and Ū decays to 0."""
    net = lora_net()
    tracker = hafl.ImportanceTracker(net, beta1=0.85, beta2=0.85)
    layers = fedlora.adapter_layers(net)
    first = True
    for _ in range(60):
        for _, layer in fedlora.adapter_layers(net):
            layer.lora_A.grad = torch.full_like(layer.lora_A, 0.5)
            layer.lora_B.grad = torch.full_like(layer.lora_B, -2.0)
        if first:  # perturb the first reading so Ū starts non-zero
            for _, layer in fedlora.adapter_layers(net):
                layer.lora_A.grad = layer.lora_A.grad * 3
            first = False
        tracker.update()
    for path, layer in layers:
        I = (layer.lora_A.detach() * 0.5).abs()
        torch.testing.assert_close(tracker.ema[f"{path}.A"], I, atol=1e-3, rtol=1e-3)
        assert tracker.unc[f"{path}.A"].max() < 1e-3


def test_hafl_upload_and_truncation_mode_helpers():
    net = lora_net(rank=4)
    tracker = hafl.ImportanceTracker(net)
    sel = tracker.select(2)
    compact, cmeta = hafl.client_update(net, sel, tracker.component_scores())
    assert cmeta["updated"] == sel == cmeta["indices"]
    for p, idx in sel.items():  # only the updated components travel, with their indices
        assert compact[f"{p}.lora_A.weight"].shape[0] == len(idx) == len(cmeta["scores"][p])
    state, meta = hafl.client_update(net, sel, tracker.component_scores(), compact=False)
    assert meta["updated"] == sel and all(len(v) == 4 for v in meta["scores"].values())
    for p, idx in sel.items():
        torch.testing.assert_close(compact[f"{p}.lora_A.weight"], state[f"{p}.lora_A.weight"][idx])
        torch.testing.assert_close(
            compact[f"{p}.lora_B.weight"], state[f"{p}.lora_B.weight"][:, idx]
        )
    scores = {p: [0.1, 0.9, 0.5, 0.7] for p in sel}
    down, idx = hafl.truncation_download(state, scores, 2)
    assert all(v == [1, 3] for v in idx.values())
    assert prefix.state_rank(down) == 2
    for p in idx:
        torch.testing.assert_close(down[f"{p}.lora_A.weight"], state[f"{p}.lora_A.weight"][[1, 3]])
    with pytest.raises(ValueError, match=r"budget must be an int in \[1, 4\]"):
        tracker.select(0)


def test_truncation_set():
    assert prelort.truncation_set(8, [2, 4, 8, 16, 4]) == [2, 4, 8]
    assert prelort.truncation_set(2, [4, 8]) == [2]
    with pytest.raises(ValueError, match="rank must be a positive int"):
        prelort.truncation_set(0, [2])


def _truncated_loss(net, x, y, t):
    for _, layer in fedlora.adapter_layers(net):
        layer.set_rank(t)
    loss = F.cross_entropy(net(x), y)
    for _, layer in fedlora.adapter_layers(net):
        layer.set_rank(None)
    return loss


def test_nested_loss_in_one_pass_equals_mean_of_separate_truncations():
    net = lora_net(rank=6)
    x, y = torch.randn(7, 20), torch.randint(0, 5, (7,))
    ts = [2, 4, 6]
    params = [p for p in net.parameters() if p.requires_grad]
    separate = sum(_truncated_loss(net, x, y, t) for t in ts) / len(ts)
    g_sep = torch.autograd.grad(separate, params)

    off, ad, masks, owners = prelort.nested_segments([7], [0], [ts], 6)
    assert owners == [(0, 2), (0, 4), (0, 6)]
    for _, layer in fedlora.adapter_layers(net):
        layer.set_segments(off, ad, masks)
    logits = net(x.repeat(len(ts), 1))
    one_pass = sum(
        F.cross_entropy(logits[int(off[i]) : int(off[i + 1])], y) for i in range(len(ts))
    ) / len(ts)
    g_one = torch.autograd.grad(one_pass, params)
    torch.testing.assert_close(one_pass, separate)
    for a, b in zip(g_one, g_sep, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_single_truncation_equals_plain_lora_loss():
    net = lora_net(rank=6)
    x, y = torch.randn(9, 20), torch.randint(0, 5, (9,))
    plain = F.cross_entropy(net(x), y)
    off, ad, masks, _ = prelort.nested_segments([9], [0], [[6]], 6)
    for _, layer in fedlora.adapter_layers(net):
        layer.set_segments(off, ad, masks)
    torch.testing.assert_close(F.cross_entropy(net(x), y), plain)
    with pytest.raises(ValueError, match="truncations\\[0\\] is empty"):
        prelort.nested_segments([9], [0], [[]], 6)


def test_compact_and_full_hafl_uploads_aggregate_the_same():
    g = fedlora.get_adapter_state_dict(lora_net(rank=4))
    compact, full = [], []
    for seed, budget in ((1, 1), (2, 3)):
        torch.manual_seed(seed)
        net = lora_net(rank=4)
        with torch.no_grad():
            for _, layer in fedlora.adapter_layers(net):
                layer.lora_A.normal_()
                layer.lora_B.normal_()
        tracker = hafl.ImportanceTracker(net)
        F.cross_entropy(net(torch.randn(8, 20)), torch.randint(0, 5, (8,))).backward()
        tracker.update()
        sel = tracker.select(budget)
        compact.append(hafl.client_update(net, sel, tracker.component_scores()))
        full.append(hafl.client_update(net, sel, tracker.component_scores(), compact=False))
    new_c, m_c = fedlora.aggregate(
        "hafl", g, [s for s, _ in compact], [1.0, 3.0], [m for _, m in compact]
    )
    new_f, _ = fedlora.aggregate("hafl", g, [s for s, _ in full], [1.0, 3.0], [m for _, m in full])
    assert not m_c["rejected"]
    for k in new_f:
        torch.testing.assert_close(new_c[k], new_f[k])
    assert m_c["bytes_uploaded"] < sum(prefix.nbytes(s) for s, _ in full)


def test_hafl_error_counts_unsent_components_as_the_global():
    g = fedlora.get_adapter_state_dict(lora_net(rank=4))
    ups = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = lora_net(rank=4)
        with torch.no_grad():
            for _, layer in fedlora.adapter_layers(net):
                layer.lora_A.normal_()
                layer.lora_B.normal_()
        tracker = hafl.ImportanceTracker(net)
        sel = {p: [0, 1, 2, 3] for p, _ in fedlora.adapter_layers(net)}  # all components trained
        ups.append(hafl.client_update(net, sel, tracker.component_scores()))
    ss, ms = [s for s, _ in ups], [m for _, m in ups]
    _, m_full = fedlora.aggregate("hafl", g, ss, [1.0, 1.0], ms, error=True)
    _, m_fedit = fedlora.aggregate("fedit", g, ss, [1.0, 1.0], error=True)
    # every client trained every component: HAFL's per-component mean is FedIT's average
    assert m_full["aggregation_error"] == pytest.approx(m_fedit["aggregation_error"], rel=1e-6)
    assert m_full["aggregation_error"] > 0
