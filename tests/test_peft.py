"""PEFT integration with the real libraries: fedlora layers as PEFT custom LoRA modules.

Models: the embedded all-MiniLM-L6-v2 (``fedlora.models.load_encoder``, offline) and a tiny random
``LlamaForCausalLM`` built from a config; plus small ``nn.Sequential`` models for layer-level
checks and ``torch.compile``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from numerics import assert_as_accurate, float64_oracle  # noqa: E402
from peft import (  # noqa: E402
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora.layer import LoraLayer  # noqa: E402

import fedlora  # noqa: E402
from fedlora import peft as fp  # noqa: E402
from fedlora.methods import prefix  # noqa: E402

BERT_TARGETS = ["query", "value"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def minilm():
    """The embedded encoder and a fixed tokenised batch (skips without the model wheel)."""
    try:
        from fedlora.models import load_encoder

        model, tok = load_encoder()
    except ImportError as err:
        pytest.skip(str(err))
    batch = tok(
        ["the email header parser", "asyncio event loops schedule callbacks"],
        return_tensors="pt",
        padding=True,
    )
    return model, dict(batch)


@pytest.fixture(scope="module")
def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}


def out_of(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def cfg(targets, r=4, alpha=8, **kwargs):
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **kwargs)


def randomize(model, seed=0):
    """Give every trainable adapter tensor random values (so B is not zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def tiny_model(d_in=12, d_out=10):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, d_out))


# ------------------------------------------------------------------------------------- register
@pytest.mark.parametrize(
    ("method", "options"), [("fedit", {}), ("ravan", {"heads": 2})], ids=["lora", "ravan"]
)
def test_register_builds_fedlora_layers_in_peft(minilm, method, options):
    model, batch = minilm
    config = fp.register(cfg(BERT_TARGETS), method, **options)
    pm = get_peft_model(copy.deepcopy(model), config)
    q = pm.base_model.model.encoder.layer[0].attention.self.query
    want = fp.PeftRavanLinear if method == "ravan" else fp.PeftLoRALinear
    assert isinstance(q, want) and isinstance(q, LoraLayer)
    assert type(pm.base_model.model.encoder.layer[0].attention.self.key) is nn.Linear
    # a fresh adapter is the identity: the output equals the base model's
    torch.testing.assert_close(out_of(pm, batch), out_of(model, batch), atol=0, rtol=0)
    trainable = {
        part
        for n, p in pm.named_parameters()
        if p.requires_grad
        for part in n.split(".")
        if part.startswith("lora_")
    }
    assert trainable == ({"lora_H", "lora_s"} if method == "ravan" else {"lora_A", "lora_B"})


def test_lora_state_dicts_move_between_fedlora_and_peft_layers(minilm):
    """Same keys and shapes as PEFT's own LoRA layer, and the same function, both ways."""
    model, batch = minilm
    ours = get_peft_model(copy.deepcopy(model), fp.register(cfg(BERT_TARGETS), "fedit"))
    theirs = get_peft_model(copy.deepcopy(model), cfg(BERT_TARGETS))
    randomize(ours, seed=1)
    sd_ours = get_peft_model_state_dict(ours)
    sd_theirs = get_peft_model_state_dict(theirs)
    assert {k: v.shape for k, v in sd_ours.items()} == {k: v.shape for k, v in sd_theirs.items()}
    assert len(sd_ours) == 6 * 2 * 2
    res = set_peft_model_state_dict(theirs, sd_ours)
    assert not res.unexpected_keys
    # two float32 evaluations of one function: bounded by float32 rounding (tests/numerics.py)
    oracle = float64_oracle(theirs, batch)
    assert_as_accurate(out_of(ours, batch), out_of(theirs, batch), oracle)
    # and back: PEFT's random adapter into ours
    randomize(theirs, seed=2)
    res = set_peft_model_state_dict(ours, get_peft_model_state_dict(theirs))
    assert not res.unexpected_keys
    oracle = float64_oracle(theirs, batch)
    assert_as_accurate(out_of(ours, batch), out_of(theirs, batch), oracle)
    assert (out_of(ours, batch) - out_of(model, batch)).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("method", "peft_options", "layer_options"),
    [
        ("fedit", {"seed": 3}, {"rank": 4, "alpha": 8.0}),
        ("ffa", {"seed": 3, "init": "gaussian"}, {"rank": 4, "alpha": 8.0, "init": "gaussian"}),
        ("ravan", {"seed": 3, "heads": 2}, {"rank": 4, "heads": 2, "scale": 2.0}),
    ],
)
def test_peft_path_equals_fedlora_inject(tiny_llama, method, peft_options, layer_options):
    """register(...) and fedlora.inject(...) with the same seed give the same adapters: the
    same initial state dict (after the key prefix) and the same function for any state."""
    model, batch = tiny_llama
    pm = get_peft_model(
        copy.deepcopy(model), fp.register(cfg(LLAMA_TARGETS), method, **peft_options)
    )
    injected = fedlora.inject(copy.deepcopy(model), method, LLAMA_TARGETS, seed=3, **layer_options)
    ours = fedlora.get_adapter_state_dict(injected)
    theirs = fp.from_peft_state_dict(get_peft_model_state_dict(pm))
    assert set(theirs) == set(ours)
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], atol=0, rtol=0, msg=k)
    # a random fedlora state (e.g. an aggregation result) loaded into both
    gen = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in ours.items()}
    fedlora.set_adapter_state_dict(injected, state)
    res = set_peft_model_state_dict(pm, fp.to_peft_state_dict(state))
    assert not res.unexpected_keys
    oracle = float64_oracle(pm, batch)
    assert_as_accurate(out_of(injected, batch), out_of(pm, batch), oracle)


# ------------------------------------------------------------------------------------- merge / save
@pytest.mark.parametrize(
    ("method", "options"), [("fedit", {}), ("ravan", {"heads": 3})], ids=["lora", "ravan"]
)
def test_merge_and_unload_equals_unmerged_llama(tiny_llama, method, options):
    model, batch = tiny_llama
    config = fp.register(cfg(LLAMA_TARGETS, init_lora_weights=False), method, **options)
    pm = get_peft_model(copy.deepcopy(model), config)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, LoraLayer) and type(layer).__module__ == "fedlora.peft"
    before = out_of(pm, batch)
    assert (before - out_of(model, batch)).abs().max() > 1e-4  # the adapter does something
    oracle = float64_oracle(pm, batch)
    base = out_of(model, batch)
    # merge / unmerge in place: the same function up to float32 rounding (tests/numerics.py)
    pm.merge_adapter()
    assert_as_accurate(out_of(pm, batch), before, oracle, what="merged")
    pm.unmerge_adapter()
    assert_as_accurate(out_of(pm, batch), before, oracle, what="unmerged again")
    with pm.disable_adapter():
        # unmerging restores the base weights up to the rounding of (W + dW) - dW
        assert_as_accurate(out_of(pm, batch), base, float64_oracle(model, batch), what="disabled")
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert_as_accurate(out_of(merged, batch), before, oracle, what="merge_and_unload")


@pytest.mark.parametrize(
    ("method", "options"), [("fedit", {}), ("ravan", {"heads": 2})], ids=["lora", "ravan"]
)
def test_bf16_base_model(tiny_llama, method, options):
    """A bf16 model: PEFT keeps the adapters in fp32, the output stays bf16, gradients reach
    the adapters, the state dict is fp32 and merging agrees to bf16 precision."""
    model, batch = tiny_llama
    config = fp.register(cfg(LLAMA_TARGETS, init_lora_weights=False), method, **options)
    pm = get_peft_model(copy.deepcopy(model).to(torch.bfloat16), config)
    out = out_of(pm, batch)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = [p.grad for n, p in pm.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(v.dtype == torch.float32 for v in get_peft_model_state_dict(pm).values())
    merged = pm.merge_and_unload(safe_merge=True)
    torch.testing.assert_close(out_of(merged, batch), out, atol=2e-2, rtol=2e-2)


def test_merge_and_unload_equals_unmerged_minilm(minilm):
    model, batch = minilm
    pm = get_peft_model(copy.deepcopy(model), fp.register(cfg(BERT_TARGETS), "ravan", heads=2))
    randomize(pm, seed=4)
    before = out_of(pm, batch)
    oracle = float64_oracle(pm, batch)
    merged = pm.merge_and_unload()
    # 6 layers of float32 rounding, which differs between BLAS builds: bound it by the
    # float32 model's own error against float64 (tests/numerics.py), not by a fixed atol
    assert_as_accurate(out_of(merged, batch), before, oracle)


@pytest.mark.parametrize(
    ("method", "options"),
    [("fedit", {"seed": 1}), ("ravan", {"heads": 2, "seed": 1, "init": "gaussian"})],
    ids=["lora", "ravan"],
)
def test_save_pretrained_from_pretrained_round_trip(tiny_llama, tmp_path, method, options):
    model, batch = tiny_llama
    pm = get_peft_model(copy.deepcopy(model), fp.register(cfg(LLAMA_TARGETS), method, **options))
    randomize(pm, seed=6)
    want = out_of(pm, batch)
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    # the custom mapping is not saved: register again on the loaded config
    config = fp.register(LoraConfig.from_pretrained(tmp_path), method, **options)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path, config=config)
    assert isinstance(loaded.base_model.model.model.layers[1].self_attn.v_proj, LoraLayer)
    torch.testing.assert_close(out_of(loaded, batch), want, atol=1e-6, rtol=1e-6)
    saved = get_peft_model_state_dict(loaded)
    for k, v in get_peft_model_state_dict(pm).items():
        torch.testing.assert_close(saved[k], v, atol=0, rtol=0)
    if method == "ravan":  # only the cores travel; the bases are derived, never saved
        assert all(k.endswith((".lora_H", ".lora_s")) for k in saved)


def test_training_step_updates_only_adapters(tiny_llama):
    model, batch = tiny_llama
    pm = get_peft_model(copy.deepcopy(model), fp.register(cfg(LLAMA_TARGETS), "ravan", heads=2))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    layer.set_trainable_heads([1])
    assert layer.trainable_heads() == [1]
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    out = pm(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grad_h = layer.lora_H["default"].grad
    assert grad_h[1].abs().sum() > 0 and grad_h[0].abs().sum() == 0  # head 0 not trained
    torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1).step()
    for n, p in pm.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    with pytest.raises(ValueError, match="heads"):
        layer.set_trainable_heads([5])


def test_second_adapter_and_delete(tiny_llama):
    model, batch = tiny_llama
    pm = get_peft_model(copy.deepcopy(model), fp.register(cfg(LLAMA_TARGETS), "fedit"))
    randomize(pm, seed=7)
    first = out_of(pm, batch)
    pm.add_adapter("other", fp.register(cfg(LLAMA_TARGETS, r=2), "fedit"))
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert set(q.lora_A) == {"default", "other"} and q.lora_A["other"].weight.shape[0] == 2
    pm.set_adapter("other")
    torch.testing.assert_close(out_of(pm, batch), out_of(model, batch), atol=1e-6, rtol=0)
    pm.set_adapter("default")
    pm.delete_adapter("other")
    assert set(q.lora_A) == {"default"}
    torch.testing.assert_close(out_of(pm, batch), first, atol=1e-6, rtol=0)


def test_gpt2_conv1d_targets():
    """transformers' Conv1D (GPT-2, weights stored transposed) is registered too."""
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=50)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    batch = {"input_ids": torch.randint(0, 50, (2, 5))}
    config_ = fp.register(cfg(["c_attn", "c_proj"], init_lora_weights=False), "fedit")
    pm = get_peft_model(copy.deepcopy(model), config_)
    assert isinstance(pm.base_model.model.transformer.h[0].attn.c_attn, fp.PeftLoRALinear)
    before = out_of(pm, batch)
    assert (before - out_of(model, batch)).abs().max() > 1e-4
    oracle = float64_oracle(pm, batch)
    merged = pm.merge_and_unload()
    assert_as_accurate(out_of(merged, batch), before, oracle)


# ------------------------------------------------------------------------------------- scaling
def test_global_rank_conversion_matches_peft_scaling():
    """A fedlora rank-r prefix (scale alpha/R_global) equals PEFT's rank-r layer (alpha/r) after
    to_peft_state_dict(global_rank=R), and scale_rank=R keeps fedlora's convention in PEFT."""
    R, r, alpha = 8, 3, 16.0
    x = torch.randn(5, 12)
    ours = fedlora.inject(tiny_model(), "hetlora", ["0"], rank=R, alpha=alpha)
    gen = torch.Generator().manual_seed(2)
    full = {
        k: torch.randn(v.shape, generator=gen)
        for k, v in fedlora.get_adapter_state_dict(ours).items()
    }
    state = prefix.truncate(full, r)
    fedlora.set_adapter_state_dict(ours, state)  # loads the prefix: rank r, scale alpha / R
    want = ours(x)
    plain = inject_adapter_in_model(cfg(["0"], r=r, alpha=alpha), tiny_model())
    set_peft_model_state_dict(plain, fp.to_peft_state_dict(state, prefix="", global_rank=R))
    torch.testing.assert_close(plain(x), want, atol=1e-5, rtol=1e-5)
    back = fp.from_peft_state_dict(get_peft_model_state_dict(plain), prefix="", global_rank=R)
    for k in state:
        torch.testing.assert_close(back[k], state[k], atol=1e-6, rtol=1e-6)
    fixed = fp.register(cfg(["0"], r=r, alpha=alpha), "hetlora", scale_rank=R)
    registered = inject_adapter_in_model(fixed, tiny_model())
    set_peft_model_state_dict(registered, fp.to_peft_state_dict(state, prefix=""))
    torch.testing.assert_close(registered(x), want, atol=1e-5, rtol=1e-5)
    rs = inject_adapter_in_model(
        fp.register(cfg(["0"], r=4, use_rslora=True), "fedit"), tiny_model()
    )
    assert rs[0].scaling["default"] == pytest.approx(8 / 2.0)


# ------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lora_dropout": 0.1}, "lora_dropout"),
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ],
)
def test_refused_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fp.register(cfg(["0"], **kwargs), "fedit")
    # also when the config is changed after registering (checked again when layers are built)
    config = fp.register(cfg(["0"]), "ravan")
    for key, value in kwargs.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=name):
        inject_adapter_in_model(config, tiny_model())


def test_bad_register_arguments():
    with pytest.raises(TypeError, match="lora_config"):
        fp.register({"r": 4}, "fedit")
    with pytest.raises(ValueError, match="method"):
        fp.register(cfg(["0"]), "fedsgd")
    with pytest.raises(TypeError, match="heads"):
        fp.register(cfg(["0"]), "fedit", heads=4)
    with pytest.raises(ValueError, match="heads"):
        fp.register(cfg(["0"]), "ravan", heads=0)
    with pytest.raises(ValueError, match="init"):
        fp.register(cfg(["0"]), "fedit", init="orthogonal")
    with pytest.raises(TypeError, match="seed"):
        fp.register(cfg(["0"]), "ravan", seed="0")
    with pytest.raises(ValueError, match="scale_rank"):
        fp.register(cfg(["0"]), "fedit", scale_rank=0)
    model = inject_adapter_in_model(fp.register(cfg(["0"]), "fedit"), tiny_model())
    with pytest.raises(ValueError, match="adapter_names"):
        model[0](torch.randn(2, 12), adapter_names=["default", "default"])


def test_old_peft_is_refused_with_a_pointer_to_inject():
    with pytest.raises(ImportError, match=r"fedlora\.inject"):
        fp.check_peft_version("0.11.1")
    with pytest.raises(ImportError, match=r"0\.6\.2"):
        fp.check_peft_version("0.6.2")  # FlowerTune's pinned peft
    fp.check_peft_version("0.12.0")
    fp.check_peft_version("0.12.0rc1")
    fp.check_peft_version(peft.__version__)
    assert fp.layer_class("fedit") is fp.layer_class("fedit", seed=0)  # cached per options


# ------------------------------------------------------------------------------------- torch.compile
def _layers():
    """Both layer kinds, as fedlora layers and as PEFT-facing layers, with random adapters."""
    out = {}
    base = nn.Linear(24, 20)
    out["LoRALinear"] = fedlora.LoRALinear(copy.deepcopy(base), rank=4)
    out["RavanLinear"] = fedlora.RavanLinear(copy.deepcopy(base), heads=2, rank=3)
    for name, method, options in (
        ("PeftLoRALinear", "fedit", {}),
        ("PeftRavanLinear", "ravan", {"heads": 2}),
    ):
        holder = nn.Sequential(copy.deepcopy(base))
        inject_adapter_in_model(fp.register(cfg(["0"], r=3), method, **options), holder)
        out[name] = holder[0]
    for layer in out.values():
        randomize(layer, seed=8)
    return out


@pytest.mark.parametrize("kind", ["LoRALinear", "RavanLinear", "PeftLoRALinear", "PeftRavanLinear"])
def test_compile_fullgraph_cpu(kind):
    torch._dynamo.reset()
    layer = _layers()[kind]
    x = torch.randn(3, 5, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = layer(x1)
    y_eager.square().sum().backward()
    grads_eager = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x2)
    y.square().sum().backward()
    torch.testing.assert_close(y, y_eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-6, rtol=1e-6)
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert len(grads) == len(grads_eager) > 0
    for g, ge in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, ge, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["LoRALinear", "RavanLinear", "PeftLoRALinear", "PeftRavanLinear"])
def test_compile_fullgraph_gpu(kind):
    """On CUDA the forward runs the Triton ops (triton_op), traced by the default inductor."""
    torch._dynamo.reset()
    layer = _layers()[kind].cuda()
    x = torch.randn(4, 33, 24, device="cuda")
    want = layer(x)
    y = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(y, want, atol=2e-3, rtol=2e-3)
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
