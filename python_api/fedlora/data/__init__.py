"""Data for `fedlora simulate`: the offline default data set, file loading and client partitions.

- `build_stdlib_topics`: topic classification on the running Python's standard-library
  docstrings (built on the user's machine, cached, no network).
- `load_text_file`: a user's CSV/TSV/JSONL file of (text, label).
- `build_stdlib_qa`, `build_arithmetic`, `load_instruction_file`, `load_instructions`: instruction
  data for federated SFT (offline built-in sets, user files in the instruction/output, TRL
  prompt/completion, chat messages and ShareGPT forms), `to_chat_messages` for a chat
  template; `load_hf_dataset`: a local Hugging Face dataset (extra ``datasets``);
  `build_reasoning_gym`: reasoning-gym task families with their verifiers (extra ``reasoning``).
- `dirichlet_partition` / `iid_partition`: split the training examples over clients.
"""

from .dataset import SPLITS, TextDataset, hash_split, stable_unit
from .files import load_text_file
from .hf_datasets import HF_FORMATS, load_hf_dataset
from .instructions import (
    ARITHMETIC_CATEGORIES,
    BUILTIN_SETS,
    COLUMN_FIELDS,
    InstructionDataset,
    build_arithmetic,
    build_stdlib_qa,
    load_instruction_file,
    load_instructions,
    to_chat_messages,
)
from .partition import client_label_counts, dirichlet_partition, iid_partition
from .reasoning import REASONING_GYM_PREFIX, build_reasoning_gym, reasoning_gym_tasks
from .stdlib_topics import DEFAULT_FAMILIES, build_stdlib_topics, default_cache_dir

__all__ = [
    "ARITHMETIC_CATEGORIES",
    "BUILTIN_SETS",
    "COLUMN_FIELDS",
    "DEFAULT_FAMILIES",
    "HF_FORMATS",
    "REASONING_GYM_PREFIX",
    "SPLITS",
    "InstructionDataset",
    "TextDataset",
    "build_arithmetic",
    "build_reasoning_gym",
    "build_stdlib_qa",
    "build_stdlib_topics",
    "client_label_counts",
    "default_cache_dir",
    "dirichlet_partition",
    "hash_split",
    "iid_partition",
    "load_hf_dataset",
    "load_instruction_file",
    "load_instructions",
    "load_text_file",
    "reasoning_gym_tasks",
    "stable_unit",
    "to_chat_messages",
]
