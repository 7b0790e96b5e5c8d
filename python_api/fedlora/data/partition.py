"""Split a training set over federated clients: non-IID label-Dirichlet and IID partitions.

`dirichlet_partition` is the usual non-IID benchmark split (Hsu et al. 2019; the one FedML,
Flower Datasets and most federated LoRA papers use): for every class, a share vector over the K
clients is drawn from Dirichlet(alpha, ..., alpha) and the class's examples are dealt out in those
shares. Small alpha (0.1) gives each client a few dominant classes; large alpha approaches IID.

Both functions return, per client, a sorted list of indices into the label sequence they were
given; every index appears exactly once. They depend only on their arguments (numpy's PCG64
generator seeded with `seed`), never on global random state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _check_labels(labels: Sequence[int]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels must not be empty")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)):
            if np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise ValueError("labels must be integers, got non-integral floats")
        else:
            raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"labels must be >= 0, got {int(arr.min())}")
    return arr.astype(np.int64)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _to_lists(parts: list[list[int]] | list[np.ndarray]) -> list[list[int]]:
    return [sorted(int(i) for i in p) for p in parts]


def iid_partition(
    labels: Sequence[int] | int,
    num_clients: int,
    *,
    seed: int,
) -> list[list[int]]:
    """Split examples over clients uniformly at random, with sizes differing by at most one.

    Args:
        labels: the training labels (then every class is spread evenly over the clients as
            well: a stratified IID split), or just the number of examples.
        num_clients: number of clients K (at most the number of examples).
        seed: random seed.

    Returns:
        K sorted lists of example indices, together covering ``range(n)`` exactly once.
    """
    num_clients = _check_int("num_clients", num_clients, 1)
    seed = _check_int("seed", seed, 0)
    if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool):
        n = _check_int("labels (number of examples)", labels, 1)
        y = np.zeros(n, dtype=np.int64)
    else:
        y = _check_labels(labels)  # type: ignore[arg-type]
        n = y.size
    if num_clients > n:
        raise ValueError(f"num_clients ({num_clients}) is larger than the number of examples {n}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    # Deal each class out in random order; every class starts at the currently smallest clients,
    # so both the class shares and the total sizes stay within one of each other.
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        order = np.lexsort((rng.permutation(num_clients), sizes))  # smallest first, random ties
        for j, i in enumerate(idx):
            k = int(order[j % num_clients])
            parts[k].append(int(i))
            sizes[k] += 1
    return _to_lists(parts)


def dirichlet_partition(
    labels: Sequence[int],
    num_clients: int,
    alpha: float,
    *,
    seed: int,
    min_size: int = 2,
    max_tries: int = 100,
) -> list[list[int]]:
    """Non-IID split: each class is shared over the clients by a Dirichlet(alpha) draw.

    Args:
        labels: the training labels (ints >= 0), one per example.
        num_clients: number of clients K.
        alpha: Dirichlet concentration (> 0). Smaller means more label skew; ``math.inf`` gives
            the stratified IID split of `iid_partition`.
        seed: random seed; the same arguments always give the same partition.
        min_size: every client gets at least this many examples. Draws are repeated (up to
            `max_tries`) until this holds; if it still does not, the last draw is repaired by
            moving examples from the largest clients (of their most common class) to the
            smallest, which keeps the skew as far as possible.
        max_tries: number of Dirichlet draws before repairing.

    Returns:
        K sorted lists of example indices, together covering ``range(len(labels))`` exactly once.
    """
    y = _check_labels(labels)
    num_clients = _check_int("num_clients", num_clients, 1)
    seed = _check_int("seed", seed, 0)
    min_size = _check_int("min_size", min_size, 0)
    max_tries = _check_int("max_tries", max_tries, 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    alpha = float(alpha)
    if math.isnan(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be > 0 (or math.inf for IID), got {alpha}")
    n = y.size
    if num_clients * min_size > n:
        raise ValueError(
            f"num_clients * min_size ({num_clients} * {min_size}) is larger than the number of "
            f"examples ({n})"
        )
    if num_clients > n:
        raise ValueError(f"num_clients ({num_clients}) is larger than the number of examples {n}")
    if math.isinf(alpha):
        return iid_partition(y.tolist(), num_clients, seed=seed)

    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    parts: list[list[int]] = []
    for _ in range(max_tries):
        parts = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.size).round().astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return _to_lists(parts)
    return _to_lists(_repair(parts, y, min_size))


def _repair(parts: list[list[int]], y: np.ndarray, min_size: int) -> list[list[int]]:
    """Move examples to clients below `min_size` from the largest client, deterministically."""
    parts = [sorted(p) for p in parts]
    while True:
        sizes = [len(p) for p in parts]
        small = min(range(len(parts)), key=lambda k: (sizes[k], k))
        if sizes[small] >= min_size:
            return parts
        donor = max(range(len(parts)), key=lambda k: (sizes[k], -k))
        donor_labels = y[parts[donor]]
        values, counts = np.unique(donor_labels, return_counts=True)
        common = values[np.argmax(counts)]  # the donor's most common class (smallest on ties)
        pos = int(np.flatnonzero(donor_labels == common)[-1])
        parts[small].append(parts[donor].pop(pos))


def client_label_counts(
    labels: Sequence[int], parts: Sequence[Sequence[int]], num_classes: int | None = None
) -> list[list[int]]:
    """Per client, the number of its examples in each class (a K x C table, for reports)."""
    y = _check_labels(labels)
    c = int(y.max()) + 1 if num_classes is None else _check_int("num_classes", num_classes, 1)
    if int(y.max()) >= c:
        raise ValueError(f"num_classes ({c}) must exceed the largest label ({int(y.max())})")
    return [np.bincount(y[list(p)], minlength=c).tolist() for p in parts]
