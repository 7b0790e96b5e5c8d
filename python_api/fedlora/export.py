"""What a run trained, out of the project: PEFT LoRA folders and merged transformers models.

:func:`export_run` (``fedlora export RUN_DIR --out DIR [--format peft|merged]``) turns the
checkpoint of a finished or resumable ``fedlora simulate --task sft`` run into

- ``peft``: a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors`` with
  PEFT's key names ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``) that
  ``peft.PeftModel.from_pretrained(base, DIR)`` loads without fedlora, and that vLLM or any
  engine taking PEFT LoRA adapters serves;
- ``merged``: a transformers model folder (weights with the adapter folded in, config,
  tokenizer) that ``AutoModelForCausalLM.from_pretrained(DIR)`` loads.

How each method's global adapter becomes a PEFT LoRA (float32):

- **LoRA-form methods** (FedIT, FFA-LoRA, HetLoRA, FlexLoRA, HAFL, PreLort, FLoRA-NA): the global
  adapter at the global rank ``R`` as it is. fedlora's scale is ``alpha / R`` fixed per layer
  (DESIGN §2) and PEFT's is ``lora_alpha / r``: with ``r = R`` and ``lora_alpha = alpha`` they are
  the same number, so no factor is folded anywhere. The heterogeneous-rank methods export the
  full-rank global, not a client's prefix.
- **Ravan**: exactly, as a LoRA of rank ``h·r``: ``A' = [A_1; …; A_h]`` (the frozen bases),
  ``B' = [s_1 B_1 H_1, …, s_h B_h H_h]`` (computed in float64, stored float32) and
  ``lora_alpha = scale · h·r``, so PEFT's ``lora_alpha / r' = scale``, the layer's own.
- **FLoRA, FedEx-LoRA** (rounds merge into the frozen base): ``merged`` is the natural format. For
  ``peft`` the folder holds the last global adapter AND, in ``base_model/``, the base with the
  run's merges folded in (a transformers folder); ``adapter_config.json`` names that folder
  (absolute path) as ``base_model_name_or_path``. The adapter alone on the original base is
  NOT the trained model.

Layers whose rank or alpha differ from the most common one go to ``rank_pattern`` /
``alpha_pattern`` (full module paths). Everything is written in float32, rebuilt on the CPU from
the run's base model folder: a run whose frozen base ran in bfloat16 (``--dtype``, GPUs) answers
the same within bfloat16 rounding.

:func:`peft_adapter_state` is the way back (``fedlora simulate --init-adapter DIR``): a PEFT LoRA
folder as the initial global state of a run (see its docstring for what is converted and what is
refused).

Errors (a folder that is not a run, a checkpoint of another format version, an ``--out`` that is
not an empty or new folder or not writable, a format the run cannot give) are one-line
:class:`~fedlora.simulate.config.ConfigError` raised before anything is written; the output folder
is built beside ``--out`` and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlora import keys
from fedlora.simulate.config import ConfigError, SimConfig

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FORMATS",
    "MERGED_BASE_DIR",
    "PEFT_PREFIX",
    "RunCheckpoint",
    "build_run_model",
    "export_run",
    "peft_adapter",
    "peft_adapter_state",
    "read_peft_adapter",
    "read_run",
]

FORMATS = ("peft", "merged")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: what PEFT puts before a module path in a ``PeftModel``'s saved keys
PEFT_PREFIX = "base_model.model."
#: FLoRA / FedEx-LoRA ``--format peft``: the merged base beside the adapter
MERGED_BASE_DIR = "base_model"
_BASE_SUFFIX = ".base_layer.weight"
_TASK_TYPES = {"sft": "CAUSAL_LM"}


# ------------------------------------------------------------------------------------- the run
@dataclass
class RunCheckpoint:
    """A run's checkpoint, read and checked: its config, the ``resolved`` record (what the
    model was: :func:`fedlora.simulate.outputs.run_record`; None for checkpoints written before
    it existed), the global adapter state, the frozen base weights the run changed (FLoRA,
    FedEx-LoRA) and the number of rounds it holds."""

    folder: Path
    config: SimConfig
    record: dict[str, Any] | None
    state: dict[str, torch.Tensor]
    bases: dict[str, torch.Tensor] = field(default_factory=dict)
    rounds_done: int = 0

    @property
    def finished(self) -> bool:
        """Whether the run holds all the rounds its config asked for."""
        return self.rounds_done >= self.config.rounds


def _run_error(folder: Path, why: str) -> ConfigError:
    return ConfigError(f"RUN_DIR {str(folder)!r}: {why}")


def _checkpoint_format(path: Path) -> Any:
    """The ``format`` of a checkpoint's header metadata (None when unreadable)."""
    from safetensors import safe_open

    from fedlora.simulate.outputs import CKPT_META_KEY

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(CKPT_META_KEY, "{}")).get("format")
    except Exception:  # safetensors raises its own error type for every malformation
        return None


def read_run(run_dir: str | os.PathLike[str]) -> RunCheckpoint:
    """Read the checkpoint of a finished or resumable ``fedlora simulate`` run.

    Raises:
        ConfigError: (one line) ``run_dir`` is not a folder, holds no checkpoint (not a run, or
            one stopped before its first round ended), holds a checkpoint of another format
            version or a corrupted one.
    """
    from fedlora.simulate.outputs import (
        CKPT,
        CKPT_FORMAT,
        LEGACY_CKPT_JSON,
        RECORD_VERSION,
        read_checkpoint,
    )

    folder = Path(os.path.expanduser(os.fspath(run_dir)))
    if not folder.is_dir():
        raise _run_error(folder, "is not a folder" if folder.exists() else "does not exist")
    path = folder / CKPT
    if (folder / LEGACY_CKPT_JSON).exists():
        raise _run_error(
            folder, f"holds a checkpoint of an older fedlora ({LEGACY_CKPT_JSON}); rerun it"
        )
    if not path.is_file():
        raise _run_error(
            folder,
            f"holds no {CKPT}: not a fedlora simulate run, or one stopped before its first "
            "round ended",
        )
    fmt = _checkpoint_format(path)
    if fmt is not None and fmt != CKPT_FORMAT:
        raise _run_error(
            folder,
            f"its checkpoint is of format {fmt!r}, written by another fedlora version (this one "
            f"reads format {CKPT_FORMAT})",
        )
    try:
        tensors, meta = read_checkpoint(path)
    except ConfigError as err:
        msg = str(err).split("; start over")[0]
        raise _run_error(folder, msg) from None
    from fedlora.methods import names

    try:
        config = SimConfig.from_json(meta.get("config") or {})
    except (TypeError, ValueError) as err:
        raise _run_error(folder, f"its checkpoint's config is not this version's ({err})") from None
    if config.method not in names():
        raise _run_error(
            folder,
            f"its method {config.method!r} is not one of this version's ({', '.join(names())})",
        )
    record = meta.get("resolved")
    if record is not None and (
        not isinstance(record, dict) or record.get("version") != RECORD_VERSION
    ):
        got = record.get("version") if isinstance(record, dict) else record
        raise _run_error(
            folder,
            f"its checkpoint's model record is of version {got!r}, written by another fedlora "
            f"version (this one reads {RECORD_VERSION})",
        )
    bases = {k: v for k, v in tensors.items() if k.endswith(_BASE_SUFFIX)}
    state = {k: v for k, v in tensors.items() if not k.endswith(_BASE_SUFFIX)}
    return RunCheckpoint(folder, config, record, state, bases, len(meta["rounds"]))


def _model_config(run: RunCheckpoint) -> SimConfig:
    """The run's config, set to rebuild its model on the CPU in float32 from the resolved model."""
    cfg = SimConfig.from_json(run.config.to_json())
    cfg.device, cfg.dtype = "cpu", "float32"
    record = run.record or {}
    path = record.get("model_path")
    if path is not None and not Path(path).is_dir() and record.get("model") == "smollm2":
        path = None  # the embedded model's cache was removed: load_causal_lm builds it again
    if path is not None:
        if not Path(path).is_dir():
            raise _run_error(run.folder, f"the run's base model folder {path!r} no longer exists")
        cfg.model = path
    elif record.get("model") is not None:
        cfg.model = record["model"]
    if record.get("target_modules"):
        cfg.target_modules = list(record["target_modules"])
    return cfg


def build_run_model(run: RunCheckpoint | str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the run's model (CPU, float32, one adapter slot) with its global
    adapter loaded in slot 0 and the base weights the run changed restored: fedlora's own model
    of the checkpoint, the reference every export is compared with.

    Raises:
        ConfigError: (one line) the run is not an ``sft`` run, its base model is gone or does
            not match the checkpoint.
    """
    from fedlora.methods import get as get_method
    from fedlora.simulate.config import parse_budgets
    from fedlora.simulate.tasks import get_task
    from fedlora.state_dict import AdapterStateError, adapter_layers, set_adapter_state_dict

    if not isinstance(run, RunCheckpoint):
        run = read_run(run)
    if run.config.task not in _TASK_TYPES:
        raise _run_error(
            run.folder,
            f"a --task {run.config.task} run cannot be exported (its model is fedlora's "
            "encoder + classifier head, not a transformers model); export supports --task "
            f"{', '.join(_TASK_TYPES)}",
        )
    cfg = _model_config(run)
    rule = get_method(cfg.method).client(cfg.client_options(), parse_budgets(cfg))
    try:
        model, tokenizer = get_task(cfg.task).build_model(cfg, None, 1, rule)
    except ConfigError as err:
        raise _run_error(run.folder, f"cannot rebuild the run's model: {err}") from None
    layers = dict(adapter_layers(model))
    try:
        for key, value in run.bases.items():
            path = key[: -len(_BASE_SUFFIX)]
            if path not in layers:
                raise AdapterStateError(f"no adapter layer {path!r}")
            with torch.no_grad():
                layers[path].base_layer.weight.copy_(value)
        set_adapter_state_dict(model, run.state, slot=0)
    except (ValueError, RuntimeError) as err:
        raise _run_error(
            run.folder,
            f"the checkpoint does not match the rebuilt model ({str(err).splitlines()[0]}); "
            "was the model folder changed?",
        ) from None
    from fedlora.simulate.engine import set_segments

    set_segments(model, None, None)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------- to PEFT
def _layer_as_lora(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [r, d_in], B [d_out, r], scale)`` with ``ΔW = scale · B A`` exactly: the layer's
    slot-0 adapter as one plain LoRA (Ravan: rank ``h·r``, see the module docstring)."""
    from fedlora.layers.lora import LoRALinear
    from fedlora.layers.ravan import RavanLinear

    with torch.no_grad():
        if isinstance(layer, LoRALinear):
            keep = layer.rank_mask[0].bool().cpu()
            A, B = layer.lora_A[0].detach().cpu(), layer.lora_B[0].detach().cpu()
            if not bool(keep.all()):  # a truncated slot: the components it uses
                A, B = A[keep], B[:, keep]
            return A.float().clone(), B.float().clone(), float(layer.scale)
        if isinstance(layer, RavanLinear):
            h, r = layer.heads, layer.rank
            A = layer.lora_A.detach().cpu().double()  # [h, r, d_in]
            Bh = layer.lora_B.detach().cpu().double()  # [h, d_out, r]
            H = layer.lora_H[0].detach().cpu().double()  # [h, r, r]
            s = layer.lora_s[0].detach().cpu().double()  # [h]
            B = torch.cat([s[i] * (Bh[i] @ H[i]) for i in range(h)], dim=1)
            return A.reshape(h * r, -1).float(), B.float(), float(layer.scale)
    raise TypeError(f"cannot export an adapter layer of type {type(layer).__name__}")


def peft_adapter(
    model: nn.Module,
    *,
    base_model_name_or_path: str | None,
    target_modules: list[str],
    task_type: str = "CAUSAL_LM",
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)``: the slot-0 adapters of ``model`` as a PEFT LoRA folder's
    two files (``tensors`` keyed ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``,
    float32). ``lora_alpha / r`` of every layer equals its fedlora scale; layers whose rank or
    alpha differ from the most common go to ``rank_pattern`` / ``alpha_pattern``."""
    from fedlora.layers import is_conv1d
    from fedlora.state_dict import adapter_layers

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv1d = False
    for path, layer in adapter_layers(model):
        A, B, scale = _layer_as_lora(layer)
        tensors[PEFT_PREFIX + keys.a_key(path)] = A.contiguous()
        tensors[PEFT_PREFIX + keys.b_key(path)] = B.contiguous()
        ranks[path] = int(A.shape[0])
        alphas[path] = scale * A.shape[0]
        conv1d = conv1d or is_conv1d(layer.base_layer)
    if not tensors:
        raise ValueError("model has no adapter layers")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(target_modules),
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
    }
    return config, tensors


def _unwrap_adapters(model: nn.Module, merge: bool) -> None:
    """Replace every adapter layer by its base layer (with the slot-0 adapter merged into it
    when ``merge``): an ordinary transformers model again."""
    from fedlora.state_dict import adapter_layers

    for path, layer in list(adapter_layers(model)):
        if merge:
            layer.merge(0)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.base_layer)


def _save_transformers(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # stderr: our one line per export
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


# ------------------------------------------------------------------------------------- output
def _check_out(out: Path) -> list[Path]:
    """``out`` is a new or empty folder whose parent can be written; return the parent
    folders that must be created (the caller removes them again on failure)."""
    try:
        exists, is_dir = out.exists(), out.is_dir()
    except (OSError, ValueError) as err:
        raise ConfigError(f"--out {str(out)!r}: {err}") from None
    if exists and not is_dir:
        raise ConfigError(f"--out {str(out)!r} is a file, not a folder")
    if is_dir and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} is not empty; choose a new or empty folder")
    missing = [d for d in out.parents if not d.exists()]
    existing = next((d for d in out.parents if d.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(f"--out {str(out)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (is_dir and not os.access(out, os.W_OK)):
        raise ConfigError(f"--out {str(out)!r} is not writable")
    return missing


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    format: str = "peft",
    *,
    log: Callable[[str], None] = print,
) -> Path:
    """Export the global model of a ``fedlora simulate --task sft`` run (its last checkpointed
    round: a finished run, or a resumable one) to ``out``, a new or empty folder; return it.

    ``format``: ``"peft"`` (a PEFT LoRA folder; FLoRA / FedEx-LoRA add their merged base in
    ``base_model/``) or ``"merged"`` (a transformers model folder with the adapter folded in).
    See the module docstring for how each method converts.

    Raises:
        ConfigError: (one line, nothing written) see the module docstring.
    """
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
    if not str(out).strip():
        raise ConfigError("--out must name a folder, got ''")
    out = Path(os.path.expanduser(os.fspath(out))).absolute()
    run = read_run(run_dir)
    missing = _check_out(out)
    model, tokenizer = build_run_model(run)
    record = run.record or {}
    changes_base = bool(record.get("changes_base", bool(run.bases)))
    try:
        for d in reversed(missing):
            d.mkdir()
        tmp = Path(out.parent / f".{out.name}.export-{secrets.token_hex(4)}.tmp")
        tmp.mkdir()
    except OSError as err:
        for d in missing:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise ConfigError(f"--out {str(out)!r} is not writable ({err.strerror or err})") from None
    try:
        if format == "merged":
            _unwrap_adapters(model, merge=True)
            _save_transformers(model, tokenizer, tmp)
            what = "a transformers model folder (adapter merged)"
        else:
            targets = record.get("target_modules") or _leaf_names(model)
            base_path = record.get("model_path") or record.get("model_alias") or run.config.model
            if changes_base:
                base_path = str(out / MERGED_BASE_DIR)
            config, tensors = peft_adapter(
                model,
                base_model_name_or_path=base_path,
                target_modules=targets,
                task_type=_TASK_TYPES[run.config.task],
            )
            if changes_base:
                _unwrap_adapters(model, merge=False)
                _save_transformers(model, tokenizer, tmp / MERGED_BASE_DIR)
            _write_peft(tmp, config, tensors)
            what = f"a PEFT LoRA folder (r {config['r']}, lora_alpha {config['lora_alpha']:g})"
            if changes_base:
                what += f" with the run's merged base in {MERGED_BASE_DIR}/"
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in missing:
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(err, OSError):
            raise ConfigError(f"--out {str(out)!r}: {err.strerror or err}") from None
        raise
    state = "finished" if run.finished else "resumable, not finished"
    log(
        f"exported round {run.rounds_done}/{run.config.rounds} ({state}) of {run.config.method} "
        f"to {out}: {what}"
    )
    return out


def _leaf_names(model: nn.Module) -> list[str]:
    from fedlora.state_dict import adapter_layers

    names: list[str] = []
    for path, _ in adapter_layers(model):
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in names:
            names.append(leaf)
    return names


def _write_peft(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------- from PEFT
def read_peft_adapter(
    folder: str | os.PathLike[str], *, option: str = "--init-adapter"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of a PEFT LoRA folder (float32 tensors, keys as saved).

    Raises:
        ConfigError: (one line naming ``option``) not a folder, no ``adapter_config.json`` or
            ``adapter_model.safetensors``, unreadable files, not a LoRA adapter.
    """
    path = Path(os.path.expanduser(os.fspath(folder)))

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{option} {str(folder)!r}: {why}")

    if not path.is_dir():
        raise bad("is not a folder" if path.exists() else "does not exist")
    if not (path / ADAPTER_CONFIG).is_file():
        raise bad(f"has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    if not (path / ADAPTER_WEIGHTS).is_file():
        extra = (
            " (only safetensors weights are read)" if (path / "adapter_model.bin").exists() else ""
        )
        raise bad(f"has no {ADAPTER_WEIGHTS}{extra}")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise bad(f"cannot read {ADAPTER_CONFIG} ({err})") from None
    if not isinstance(config, dict):
        raise bad(f"{ADAPTER_CONFIG} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise bad(f"is a {config.get('peft_type')!r} adapter, not LORA")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except Exception as err:  # safetensors raises its own error type for every malformation
        raise bad(f"cannot read {ADAPTER_WEIGHTS} ({str(err).splitlines()[0]})") from None
    return config, {k: v.float() for k, v in tensors.items()}


def _pattern_value(pattern: dict[str, Any] | None, path: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of
    the module path (as a regular expression)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _same_base(config: dict[str, Any], cfg: SimConfig, record: dict[str, Any]) -> bool:
    want = config.get("base_model_name_or_path")
    if not want:
        return True
    names = {record.get("model_path"), record.get("model_alias"), record.get("model"), cfg.model}
    names.discard(None)
    if want in names:
        return True
    with contextlib.suppress(OSError, ValueError):
        resolved = str(Path(os.path.expanduser(want)).resolve())
        return any(
            str(Path(os.path.expanduser(str(n))).resolve()) == resolved
            for n in names
            if Path(os.path.expanduser(str(n))).exists()
        )
    return False


def peft_adapter_state(
    folder: str | os.PathLike[str],
    model: nn.Module,
    cfg: SimConfig,
    initial: dict[str, torch.Tensor],
    record: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """A PEFT LoRA folder as the global adapter state of ``model`` (fedlora's convention, float32):
    what ``fedlora simulate --init-adapter`` starts from.

    LoRA-form methods: a layer of PEFT rank ``r_k ≤ --rank`` (``rank_pattern`` honoured) and
    scaling ``σ_k = lora_alpha_k / r_k`` (``/ √r_k`` with ``use_rslora``) becomes the first ``r_k``
    components, ``B`` multiplied by ``σ_k / scale`` (fedlora's ``scale = alpha / R``), so the
    adapter is the same function; the other ``R - r_k`` components keep ``initial``'s ``A`` (the
    run's own initialisation) with ``B = 0``: they add nothing yet and train (zero ``A`` rows too
    would get zero gradients forever). Ravan: only an adapter in this run's frozen bases (what
    ``fedlora export`` writes for a Ravan run with the same ``--seed``, ``--heads``, ``--rank`` and
    model), converted exactly back (``H_i`` by least squares on ``B_i``, ``s_i = 1``); any other
    LoRA is refused, as a Ravan layer cannot represent it.

    Raises:
        ConfigError: (one line) the folder is not a PEFT LoRA adapter; it was trained on
            another base model, adapts other modules, has a rank above ``--rank``, or settings
            fedlora cannot train with (``lora_dropout`` > 0, ``bias`` other than ``"none"``,
            DoRA and other LoRA variants, ``modules_to_save``, ``layers_to_transform``).
    """
    from fedlora.layers.lora import LoRALinear
    from fedlora.layers.ravan import RavanLinear
    from fedlora.peft import check_config
    from fedlora.state_dict import adapter_layers

    name = str(folder)
    config, tensors = read_peft_adapter(folder)

    def bad(why: str) -> ConfigError:
        return ConfigError(f"--init-adapter {name!r}: {why}")

    try:
        check_config(None, **{k: v for k, v in config.items() if isinstance(k, str)})
    except ValueError as err:
        raise bad(str(err).split(";")[0]) from None
    if config.get("bias", "none") != "none":
        raise bad(
            f"bias={config['bias']!r}: fedlora trains no biases; only bias='none' starts a run"
        )
    for option in ("modules_to_save", "layers_to_transform"):
        if config.get(option):
            raise bad(f"{option}={config[option]!r} is not supported; only plain LoRA layers load")
    record = record or {}
    if not _same_base(config, cfg, record):
        ours = record.get("model_path") or record.get("model") or cfg.model
        raise bad(
            f"was trained on base model {config['base_model_name_or_path']!r}, this run's is "
            f"{ours!r}"
        )
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        path = keys.path_of(key.removeprefix(PEFT_PREFIX))
        if path is None or not keys.is_factor_key(key):
            raise bad(f"holds {key!r}, not a LoRA factor (lora_A.weight / lora_B.weight)")
        found.setdefault(path, {})[key.removeprefix(PEFT_PREFIX)[len(path) :]] = value
    layers = dict(adapter_layers(model))
    extra, absent = sorted(set(found) - set(layers)), sorted(set(layers) - set(found))
    if extra or absent:
        what = f"{len(extra)} module(s) this run does not adapt, e.g. {extra[0]!r}" if extra else ""
        if absent:
            what += (
                ", and " if what else ""
            ) + f"no adapter for {len(absent)} of this run's, e.g. {absent[0]!r}"
        raise bad(f"adapts other modules than --target-modules: {what}")
    use_rslora = bool(config.get("use_rslora"))
    state = dict(initial)
    for path, layer in layers.items():
        pair = found[path]
        if set(pair) != set(keys.LORA_SUFFIXES):
            raise bad(f"module {path!r} has {sorted(pair)}, not lora_A.weight and lora_B.weight")
        A, B = pair[keys.A_SUFFIX], pair[keys.B_SUFFIX]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise bad(
                f"module {path!r}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not pair"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise bad(f"module {path!r} holds NaN or inf")
        r_k = int(A.shape[0])
        if (A.shape[1], B.shape[0]) != (layer.in_features, layer.out_features):
            raise bad(
                f"module {path!r} is [{B.shape[0]} x {A.shape[1]}], this model's is "
                f"[{layer.out_features} x {layer.in_features}]"
            )
        r_cfg = _pattern_value(config.get("rank_pattern"), path, config.get("r", r_k))
        alpha_k = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", r_cfg))
        sigma = float(alpha_k) / (math.sqrt(r_k) if use_rslora else r_k)
        if isinstance(layer, LoRALinear):
            if r_k > layer.rank:
                raise bad(f"module {path!r} has rank {r_k}, above --rank {layer.rank}")
            A_new = initial[keys.a_key(path)].clone()
            B_new = torch.zeros_like(initial[keys.b_key(path)])
            A_new[:r_k] = A
            B_new[:, :r_k] = B.double().mul(sigma / layer.scale).float()
            state[keys.a_key(path)], state[keys.b_key(path)] = A_new, B_new
        elif isinstance(layer, RavanLinear):
            state.update(_ravan_from_lora(layer, path, A, B, sigma, bad))
        else:  # pragma: no cover - every layer kind is one of the two
            raise bad(f"module {path!r}: cannot load into {type(layer).__name__}")
    return {k: v.to(initial[k].device) if k in initial else v for k, v in state.items()}


def _ravan_from_lora(
    layer: nn.Module,
    path: str,
    A: torch.Tensor,
    B: torch.Tensor,
    sigma: float,
    bad: Callable[[str], ConfigError],
) -> dict[str, torch.Tensor]:
    """Ravan cores ``H_i`` (``s_i = 1``) with ``scale · Σ B_i H_i A_i = σ B A``, when ``A`` is
    this layer's stacked bases; otherwise a refusal."""
    h, r = layer.heads, layer.rank
    bases = layer.lora_A.detach().cpu().float().reshape(h * r, -1)
    # the bases are stored in the base's dtype: equal within its rounding
    tol = 4 * torch.finfo(layer.lora_A.dtype).eps * float(bases.abs().max())
    if tuple(A.shape) != tuple(bases.shape) or float((A - bases).abs().max()) > tol:
        raise bad(
            f"module {path!r}: a Ravan run starts only from an adapter in its own frozen bases "
            f"(a Ravan export with the same --seed, --heads {h}, --rank {r} and model); this one "
            f"is a rank-{A.shape[0]} LoRA with other A factors"
        )
    Bh = layer.lora_B.detach().cpu().double()  # [h, d_out, r]
    target = B.double() * (sigma / layer.scale)
    H = torch.empty(h, r, r, dtype=torch.float64)
    for i in range(h):
        part = target[:, i * r : (i + 1) * r]
        H[i] = torch.linalg.lstsq(Bh[i], part).solution
        err = float((Bh[i] @ H[i] - part).abs().max())
        if err > 1e-4 * max(float(part.abs().max()), 1e-30) + 1e-12:
            raise bad(f"module {path!r}: its B factors are not in this run's Ravan bases")
    return {keys.h_key(path): H.float(), keys.s_key(path): torch.ones(h)}
