"""Data for `fedlora simulate`: the offline default data set, file loading and client partitions.

- `build_stdlib_topics`: topic classification on the running Python's standard-library
  docstrings (built on the user's machine, cached, no network).
- `load_text_file`: a user's CSV/TSV/JSONL file of (text, label).
- `dirichlet_partition` / `iid_partition`: split the training examples over clients.
"""

from .dataset import SPLITS, TextDataset, hash_split, stable_unit
from .files import load_text_file
from .partition import client_label_counts, dirichlet_partition, iid_partition
from .stdlib_topics import DEFAULT_FAMILIES, build_stdlib_topics, default_cache_dir

__all__ = [
    "DEFAULT_FAMILIES",
    "SPLITS",
    "TextDataset",
    "build_stdlib_topics",
    "client_label_counts",
    "default_cache_dir",
    "dirichlet_partition",
    "hash_split",
    "iid_partition",
    "load_text_file",
    "stable_unit",
]
