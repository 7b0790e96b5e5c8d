"""QLoRA (issue 22 item 5): a 4-/8-bit frozen base through bitsandbytes under every method's
adapters, on CPU where bitsandbytes has a CPU backend (0.47+), on CUDA in the GPU-marked test."""

from __future__ import annotations

import pytest
import torch

from fedlora.cli import main
from fedlora.simulate import SimConfig, run
from fedlora.simulate.config import METHODS, ConfigError

bnb = pytest.importorskip("bitsandbytes")
from fedlora import quantize  # noqa: E402

#: NF4 maps a value to one of the two levels around it (bitsandbytes' CPU quantizer does not
#: always take the nearer one); the widest gap between levels is 0.304 of the block's absmax
#: (-1 to -0.696), and the 8-bit double-quantised absmax adds < 1 %
NF4_BOUND = 0.31
#: LLM.int8(): rows scaled to [-127, 127] and rounded: half a step of the row's absmax
INT8_BOUND = 0.5 / 127 + 1e-3


def _cpu_backend(bits: str) -> None:
    try:
        quantize.check_backend(bits, "cpu", torch.float32)
    except ValueError as err:
        pytest.skip(str(err))


def llm(tiny_llm_dir, **kw) -> SimConfig:
    base = dict(
        task="sft", model=tiny_llm_dir, clients=2, rounds=1, local_steps=1, batch_size=4,
        max_length=48, max_test=4, max_generate=1, max_new_tokens=2, rank=4, heads=2, lr=1e-2,
        max_train_per_client=8, budgets="hetero",
    )  # fmt: skip
    base.update(kw)
    return SimConfig(**base)


@pytest.mark.parametrize("bits,bound", [("4bit", NF4_BOUND), ("8bit", INT8_BOUND)])
def test_quantized_linear_roundtrip_within_the_format_bound(bits, bound):
    _cpu_backend(bits)
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = quantize._quantized(lin, bits, torch.float32, torch.device("cpu"))
    assert isinstance(q, torch.nn.Linear) and quantize.is_quantized(q)
    w = quantize.dense_weight(q)
    assert bool(((w - lin.weight).abs() <= bound * _scale(lin.weight, bits) + 1e-6).all())
    x = torch.randn(7, 96)
    torch.testing.assert_close(q(x), x @ w.T + lin.bias, rtol=2e-2, atol=2e-2)
    target = lin.weight.detach() + 0.01
    quantize.set_dense_weight(q, target)
    w2 = quantize.dense_weight(q)
    assert bool(((w2 - target).abs() <= bound * _scale(target, bits) + 1e-6).all())


def _scale(w: torch.Tensor, bits: str) -> torch.Tensor:
    """Each element's quantization scale: the absmax of its 64-element block of the flattened
    weight (NF4), of its row (LLM.int8())."""
    w = w.detach().abs()
    if bits == "8bit":
        return w.amax(1, keepdim=True).expand_as(w)
    blocks = w.flatten().reshape(-1, 64)
    return blocks.amax(1, keepdim=True).expand_as(blocks).reshape(w.shape)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_a_4bit_base(tiny_llm_dir, method):
    """Every method's adapters train on a 4-bit base (the decoder's linear layers are
    bitsandbytes ones under the adapters); the loss is finite and the adapters move."""
    _cpu_backend("4bit")
    result = run(llm(tiny_llm_dir, method=method, quantize="4bit"), progress=False)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.rounds)
    assert result.global_state


def test_8bit_base_and_merging_methods(tiny_llm_dir, tmp_path):
    """8-bit base with FLoRA (merges every round into the quantized base, checkpointed dense and
    requantized on resume): the resumed run continues to the numbers of the straight one."""
    _cpu_backend("8bit")
    straight = run(llm(tiny_llm_dir, method="flora", quantize="8bit", rounds=2), progress=False)
    run(
        llm(tiny_llm_dir, method="flora", quantize="8bit", rounds=1), tmp_path / "r", progress=False
    )
    resumed = run(
        llm(tiny_llm_dir, method="flora", quantize="8bit", rounds=2),
        tmp_path / "r",
        resume=True,
        progress=False,
    )
    assert resumed.rounds[-1]["train_loss"] == pytest.approx(
        straight.rounds[-1]["train_loss"], rel=1e-3
    )


def test_the_model_is_quantized_under_the_adapters(tiny_llm_dir):
    _cpu_backend("4bit")
    from fedlora.layers._base import AdapterLayer
    from fedlora.models import load_causal_lm
    from fedlora.simulate.setup import _quantized_model

    cfg = llm(tiny_llm_dir, quantize="4bit")
    lm, _ = _quantized_model(cfg, load_causal_lm(tiny_llm_dir), lambda s: None)
    linears = [m for m in lm.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert not quantize.is_quantized(lm.lm_head)
    from fedlora.simulate.tasks import get_task

    rule = __import__("fedlora").methods.get("fedit").client(cfg.client_options(), [])
    model, _ = get_task("sft").build_model(cfg, None, 1, rule, (lm, _))
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert layers and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)


@pytest.mark.parametrize(
    "argv,words",
    [(["--quantize", "3bit"], "--quantize must be one of"),
     (["--task", "classify", "--quantize", "4bit"], "only a causal-LM task (--task sft)")],
)  # fmt: skip
def test_bad_quantize_exits_2(tmp_path, capsys, argv, words):
    code = main(["simulate", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_missing_bitsandbytes_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(ConfigError, match="bitsandbytes package is not installed"):
        SimConfig(task="sft", quantize="4bit").validate()


def test_a_missing_backend_is_refused_before_the_model_loads(tiny_llm_dir, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(quantize, "_quantized", broken)
    with pytest.raises(ConfigError, match=r"--quantize 4bit: bitsandbytes .* no working 4bit"):
        run(llm(tiny_llm_dir, quantize="4bit"), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_on_cuda(tiny_llm_dir, bits):
    result = run(llm(tiny_llm_dir, quantize=bits, device="cuda", dtype="bfloat16"), progress=False)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.rounds)
