"""`TextDataset`: the in-memory text-classification data set every data source produces.

One object holds all examples of a data set with a per-example split tag ("train" or "test"), so
the partitioner and the training loop see one list of indices and the test split can never be
partitioned to clients by accident. It also holds the helpers for the stable, hash-based split
that the built-in data set and the file loader share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

SPLITS: tuple[str, ...] = ("train", "test")


def stable_unit(text: str, salt: str = "") -> float:
    """Map a string to a number in [0, 1) that is the same on every run, machine and Python.

    Unlike the built-in `hash()`, which is salted per process, this uses SHA-256, so it can be used
    for train/test splits and sampling orders that must be reproducible.
    """
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(text: str, test_fraction: float) -> str:
    """Return "test" for about `test_fraction` of all texts and "train" for the rest, by text hash.

    Equal texts always land in the same split, so duplicates cannot leak from train into test.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    return "test" if stable_unit(text, "fedlora-split") < test_fraction else "train"


class SplitViews:
    """The split views every data set of this package shares: its examples carry a ``splits``
    tag each ("train" or "test"), and ``subset`` (the class's own) builds a data set of chosen
    examples; ``indices``, ``select``, ``train`` and ``test`` follow from those two."""

    splits: Sequence[str]

    def subset(self, indices: Iterable[int]) -> Self:  # pragma: no cover - every class has one
        raise NotImplementedError

    def indices(self, split: str | None = None) -> list[int]:
        """Indices of the examples in `split` ("train" or "test"), or of all examples for None."""
        if split is None:
            return list(range(len(self.splits)))
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        return [i for i, s in enumerate(self.splits) if s == split]

    def select(self, split: str) -> Self:
        """The examples of one split as a data set of their own (class indices unchanged)."""
        return self.subset(self.indices(split))

    @property
    def train(self) -> Self:
        """The training split."""
        return self.select("train")

    @property
    def test(self) -> Self:
        """The test split."""
        return self.select("test")

    def split_summary(self, groups: str) -> str:
        """``"<name>: N examples (a train, b test), <groups>"``: the one-line description."""
        n_train = len(self.indices("train"))
        name = getattr(self, "name", "dataset")
        return f"{name}: {len(self.splits)} examples ({n_train} train, {len(self.splits) - n_train} test), {groups}"


@dataclass(frozen=True)
class TextDataset(SplitViews):
    """A labelled text data set with a train/test tag per example.

    Attributes:
        texts: the example texts.
        labels: the class index of each example, in ``range(len(label_names))``.
        label_names: the class names; ``label_names[labels[i]]`` names example ``i``'s class.
        splits: ``"train"`` or ``"test"`` for each example.
        name: a short name for logs and metrics (e.g. ``"stdlib_topics"`` or a file name).
        info: provenance (builder version, Python version, parameters, source file, ...).

    Sequences are stored as tuples, so a data set can be shared between clients without copies
    and without one client changing another's view.
    """

    texts: Sequence[str]
    labels: Sequence[int]
    label_names: Sequence[str]
    splits: Sequence[str]
    name: str = "dataset"
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        texts = tuple(self.texts)
        labels = tuple(int(y) for y in self.labels)
        label_names = tuple(str(n) for n in self.label_names)
        splits = tuple(self.splits)
        n = len(texts)
        if len(labels) != n or len(splits) != n:
            raise ValueError(
                f"TextDataset: texts, labels and splits must have the same length, got "
                f"{n}, {len(labels)} and {len(splits)}"
            )
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("TextDataset: every text must be a str")
        if len(set(label_names)) != len(label_names):
            raise ValueError(f"TextDataset: label_names must be unique, got {label_names}")
        bad = [y for y in labels if not 0 <= y < len(label_names)]
        if bad:
            raise ValueError(
                f"TextDataset: label {bad[0]} is outside range(len(label_names)) = "
                f"range({len(label_names)})"
            )
        bad_split = sorted(set(splits) - set(SPLITS))
        if bad_split:
            raise ValueError(f"TextDataset: splits must be one of {SPLITS}, got {bad_split}")
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", label_names)
        object.__setattr__(self, "splits", splits)
        object.__setattr__(self, "info", dict(self.info))

    def __len__(self) -> int:
        """Number of examples over both splits."""
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Number of classes (the classification head's output size)."""
        return len(self.label_names)

    def subset(self, indices: Iterable[int]) -> TextDataset:
        """A new data set with the given examples (in the given order) and the same classes."""
        idx = list(indices)
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            label_names=self.label_names,
            splits=[self.splits[i] for i in idx],
            name=self.name,
            info=self.info,
        )

    def class_counts(self, split: str | None = None) -> list[int]:
        """Number of examples per class, in the order of `label_names`, for one split or all."""
        counts = [0] * self.num_classes
        for i in self.indices(split):
            counts[self.labels[i]] += 1
        return counts

    def summary(self) -> str:
        """A one-line human-readable description (size, classes, split sizes)."""
        return self.split_summary(f"{self.num_classes} classes")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `from_dict` inverts it exactly."""
        return {
            "name": self.name,
            "info": dict(self.info),
            "label_names": list(self.label_names),
            "texts": list(self.texts),
            "labels": list(self.labels),
            "splits": list(self.splits),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextDataset:
        """Rebuild a data set from `to_dict` output (raises ValueError if it is malformed)."""
        try:
            return cls(
                texts=data["texts"],
                labels=data["labels"],
                label_names=data["label_names"],
                splits=data["splits"],
                name=data.get("name", "dataset"),
                info=data.get("info", {}),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a serialised TextDataset: {e!r}") from e
