"""Small random causal LMs and tokenizers, built offline, for tests and speed benchmarks.

``fedlora simulate --task sft`` and its tests need a causal LM with a tokenizer and a chat
template; the speed benchmarks need SmolLM2-135M's *architecture* on machines that cannot carry
its weights (speed does not depend on the weights). `random_causal_lm` writes such a model as an
ordinary Hugging Face folder (``--model PATH`` loads it): random weights, and a word-level
tokenizer whose vocabulary is built from the given texts, with a ChatML chat template (the one
SmolLM2-Instruct and Qwen2 use). Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: ChatML, as SmolLM2-Instruct and Qwen2-Instruct render conversations
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<unk>", "<pad>", "<|im_start|>", "<|im_end|>")

#: SmolLM2-135M(-Instruct)'s architecture (its config.json; DESIGN §6.1)
SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
#: a model of the same family small enough for a test to train in a second
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
ARCHITECTURES = ("llama", "qwen2")
SIZES = {"tiny": TINY, "smollm2": SMOLLM2_135M}


def default_texts() -> list[str]:
    """Every prompt and answer of the built-in ``arithmetic`` instruction set."""
    from fedlora.data import build_arithmetic

    return [f"{ex['instruction']} {ex['input']} {ex['output']}" for ex in build_arithmetic()]


def word_tokenizer(texts: Iterable[str], *, chat_template: str = CHATML_TEMPLATE) -> Any:
    """A word-level fast tokenizer over the words and punctuation of ``texts`` (whitespace and
    punctuation split, as ``tokenizers``' ``Whitespace`` pre-tokenizer does), with ``<unk>``,
    ``<pad>`` and the ChatML tokens (``<|im_end|>`` is its EOS token) and ``chat_template``."""
    import transformers
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tmodels

    split = pre_tokenizers.Whitespace()
    words: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for text in texts:
        for word, _ in split.pre_tokenize_str(text):
            words.setdefault(word, len(words))
    core = Tokenizer(tmodels.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = split
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = chat_template
    return tok


def random_causal_lm(
    folder: str | os.PathLike[str],
    *,
    arch: str = "llama",
    size: str = "tiny",
    texts: Iterable[str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight causal LM and its tokenizer to ``folder``; return the folder.

    Args:
        arch: ``llama`` (SmolLM2's family) or ``qwen2``.
        size: ``tiny`` (2 layers, hidden 32: a test trains it in a second) or ``smollm2``
            (SmolLM2-135M's shape, 49,152-token embedding: for speed measurements).
        texts: the tokenizer's vocabulary source (default: the arithmetic set, `default_texts`).
        seed: the weights' seed.
    """
    import torch
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}; got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}; got {size!r}")
    tok = word_tokenizer(default_texts() if texts is None else texts)
    shape = dict(SIZES[size])
    shape["vocab_size"] = max(shape.get("vocab_size", 0), len(tok))
    config_cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    model_cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    config = config_cls(
        **shape,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    out = Path(folder)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
