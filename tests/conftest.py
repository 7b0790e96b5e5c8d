"""Shared test set-up.

Without a CUDA device the Triton kernels are checked in the Triton interpreter: the variable must be
set before any kernel module is imported, so it is set here, at the top of the first file pytest
loads.
"""

from __future__ import annotations

import os

import pytest
import torch

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
