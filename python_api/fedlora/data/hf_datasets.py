"""Local Hugging Face datasets as instruction data (``--data folder-or-file``, extra ``datasets``).

Read offline through the ``datasets`` library (``pip install 'fedlora-kernels[datasets]'``):

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (``datasets.load_from_disk``);
- a ``.parquet``, ``.arrow`` or ``.json`` file, or a folder of such files (one format), through
  the library's packaged ``parquet`` / ``arrow`` / ``json`` loaders (``load_dataset(builder,
  data_files=...)``; nothing is downloaded: the loaders ship with the library, and
  ``HF_DATASETS_OFFLINE`` is set while they run). Their Arrow cache goes under ``cache_dir``
  (default: fedlora's cache folder, ``hf-datasets``).

Rows take the forms of :func:`fedlora.data.load_instruction_file` (instruction/output, TRL
prompt/completion, chat ``messages``, ShareGPT ``conversations``; optional ``category`` and
``split``), after the column mapping ``columns`` (``{"instruction": "question"}``), checked
against the dataset's columns before any row is read. Splits: ``split`` names one of the
dataset's splits (its examples are then split into train/test by the prompt hash, or by a
``split`` column); without it a dataset with a ``train`` split and a test-like one (``test``,
``validation``, ...) uses them as train and test, and a dataset of one split is hash-split.
Numbers in text columns (an integer answer, say) are read as their decimal text.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .files import _fail
from .instructions import (
    InstructionDataset,
    _check_common,
    _missing_columns,
    _record,
    check_columns,
    map_columns,
    records_to_dataset,
)

#: File suffixes read through the ``datasets`` library, and the packaged loader of each.
HF_FORMATS: dict[str, str] = {".parquet": "parquet", ".arrow": "arrow", ".json": "json"}
#: Split names that count as test data when a dataset has several splits.
TEST_SPLITS = ("test", "validation", "valid", "val", "dev", "eval")
_HINT = "pip install 'fedlora-kernels[datasets]'"
_TEXT_FIELDS = ("instruction", "input", "output", "prompt", "completion")


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"reading a Hugging Face dataset needs `{_HINT}` ({err})") from None
    return datasets


@contextlib.contextmanager
def _offline_quiet(datasets: Any) -> Iterator[None]:
    """Offline (the environment variable and the library's own flags, which it reads at
    import) and the progress bars off while the library reads."""
    old = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    flags = {
        k: getattr(datasets.config, k, None) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    }
    for k, v in flags.items():
        if v is not None:
            setattr(datasets.config, k, True)
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        for k, v in flags.items():
            if v is not None:
                setattr(datasets.config, k, v)
        if old is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = old
        if bars:
            datasets.utils.logging.enable_progress_bar()
        datasets.utils.logging.set_verbosity(verbosity)


def _open(path: Path, cache_dir: Path) -> dict[str, Any]:
    """``{split name: Dataset}`` of a save_to_disk folder, a data file or a folder of them."""
    datasets = _import_datasets()
    with _offline_quiet(datasets):
        if path.is_dir() and (
            (path / "dataset_dict.json").exists() or (path / "state.json").exists()
        ):
            try:
                obj = datasets.load_from_disk(str(path))
            except (OSError, ValueError) as err:
                raise _fail(path, f"cannot read the saved dataset ({str(err)[:200]})") from None
            return dict(obj) if isinstance(obj, datasets.DatasetDict) else {"train": obj}
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in HF_FORMATS)
            kinds = {HF_FORMATS[p.suffix.lower()] for p in files}
            if not files:
                raise _fail(
                    path,
                    "is a folder with neither a saved dataset (save_to_disk) nor "
                    f"{'/'.join(sorted(HF_FORMATS))} files",
                )
            if len(kinds) > 1:
                raise _fail(path, f"holds data files of several formats {sorted(kinds)}")
            builder, data_files = kinds.pop(), [str(p) for p in files]
        else:
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such data file")
            builder, data_files = HF_FORMATS[path.suffix.lower()], [str(path)]
        try:
            obj = datasets.load_dataset(builder, data_files=data_files, cache_dir=str(cache_dir))
        except Exception as err:  # the library's errors have no common base
            raise _fail(
                path, f"cannot read it as {builder} ({type(err).__name__}: {str(err)[:200]})"
            ) from None
        return dict(obj)


def _choose_splits(path: Path, splits: dict[str, Any], split: str | None) -> dict[str, Any]:
    """``{"train": ds, "test": ds}`` or ``{"": ds}`` (one split, to split by hash)."""
    names = list(splits)
    if split is not None:
        if split not in splits:
            raise _fail(path, f"has no split {split!r} (--data-split); its splits are {names}")
        return {"": splits[split]}
    if len(splits) == 1:
        return {"": splits[names[0]]}
    test = next((n for n in TEST_SPLITS if n in splits), None)
    if "train" in splits and test is not None:
        return {"train": splits["train"], "test": splits[test]}
    raise _fail(path, f"has the splits {names}; choose one with --data-split")


def _text_cells(row: dict[str, Any]) -> dict[str, Any]:
    """Integers and floats in text fields as their decimal text (a numeric answer column)."""
    for k in _TEXT_FIELDS:
        v = row.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            row[k] = str(v)
    return row


def load_hf_dataset(
    path: str | Path,
    *,
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
    test_fraction: float = 0.2,
    cache_dir: str | Path | None = None,
) -> InstructionDataset:
    """A local Hugging Face dataset as an `InstructionDataset` (see the module docstring).

    Raises:
        ImportError: the ``datasets`` package is missing (with the install hint).
        FileNotFoundError: ``path`` does not exist.
        ValueError: (one line naming the path) not a dataset, an unknown split, several splits
            and no ``split``, a mapped column the dataset lacks, a row that fits no form (the
            errors of `load_instruction_file`, naming the row), no examples.
    """
    from .stdlib_topics import default_cache_dir

    path = Path(path).expanduser()
    _check_common(0, test_fraction)
    columns = check_columns(columns)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file or folder")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "hf-datasets"
    chosen = _choose_splits(path, _open(path, cache), split)
    rows = []
    for tag, ds in chosen.items():
        _missing_columns(path, ds.column_names, columns, "")
        for i, row in enumerate(ds):
            where = f"{tag} row {i}" if tag else f"row {i}"
            obj = _text_cells(map_columns(row, columns))
            if tag:
                obj["split"] = tag
            ex, s = _record(path, obj, where)
            rows.append((ex, s, where))
    how = "from the dataset's splits" if "train" in chosen else None
    info: dict[str, Any] = {"source": str(path), "format": "hf-dataset"}
    if split is not None:
        info["data_split"] = split
    if how:
        info["split"] = how
    return records_to_dataset(
        path, rows, test_fraction=test_fraction, name=path.stem or path.name, info=info
    )
