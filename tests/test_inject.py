"""fedlora.inject and the state-dict contract on real Hugging Face model families."""

from __future__ import annotations

import pytest
import torch

import fedlora
from fedlora.layers.lora import LoRALinear
from fedlora.layers.ravan import RavanLinear

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama": (
        lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "qwen2": (
        lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)),
        ["q_proj", "v_proj"],
    ),
    "opt": (
        lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=64)),
        ["q_proj", "v_proj", "fc1", "fc2"],
    ),
    "gpt2": (
        lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        ["c_attn", "c_proj", "c_fc"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("method", ["ravan", "hafl"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_inject_keeps_function_and_round_trips(family, method):
    build, targets = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    opts = {"heads": 2, "rank": 4} if method == "ravan" else {"rank": 4}
    fedlora.inject(model, method, target_modules=targets, seed=1, **opts)
    layers = list(fedlora.adapter_layers(model))
    kind = RavanLinear if method == "ravan" else LoRALinear
    assert layers and all(isinstance(m, kind) for _, m in layers)
    assert all(any(p.endswith(t) for t in targets) for p, _ in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"lora_H", "lora_s"} if method == "ravan" else {"lora_A", "lora_B"})

    # train a little so B / H are non-zero, then the state dict moves the function exactly
    with torch.no_grad():
        for _, m in layers:
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
        trained = model(ids).logits
    state = fedlora.get_adapter_state_dict(model)
    assert all(v.dtype == torch.float32 for v in state.values())
    suffix = (".lora_H", ".lora_s") if method == "ravan" else (".lora_A.weight", ".lora_B.weight")
    assert all(k.endswith(suffix) for k in state)
    torch.manual_seed(0)
    fresh = fedlora.inject(build().eval(), method, target_modules=targets, seed=1, **opts)
    fedlora.set_adapter_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained, atol=1e-5, rtol=1e-5)


def test_inject_minilm_and_errors():
    from fedlora.models import load_encoder

    try:
        encoder, tok = load_encoder()
    except ImportError as err:
        pytest.skip(str(err))
    fedlora.inject(encoder, "fedit", target_modules=["query", "key", "value", "dense"], rank=4)
    paths = [p for p, _ in fedlora.adapter_layers(encoder)]
    # per layer: query, key, value, attention dense, intermediate, output dense; plus pooler.dense
    assert len(paths) == 6 * 6 + 1 and "pooler.dense" in paths
    with pytest.raises(ValueError, match="match no linear layer"):
        fedlora.inject(
            torch.nn.Sequential(torch.nn.Linear(3, 3)), "fedit", target_modules=["query"]
        )
    with pytest.raises(ValueError, match="method must be one of"):
        fedlora.inject(encoder, "lora++", target_modules=["query"])
    with pytest.raises(KeyError, match="keys the model does not use"):
        state = fedlora.get_adapter_state_dict(encoder)
        state["encoder.layer.0.attention.self.query.lora_Z"] = torch.zeros(1)
        fedlora.set_adapter_state_dict(encoder, state)
    assert tok is not None
