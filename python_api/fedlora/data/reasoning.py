"""reasoning-gym task families as instruction data (``--data reasoning_gym:<task>[,<task>...]``).

`reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ (Apache-2.0, pure Python,
extra ``reasoning``: ``pip install 'fedlora-kernels[reasoning]'``) generates seeded problems of
about a hundred task families offline (``gsm_symbolic`` from GSM8K templates,
``basic_arithmetic``, ``chain_sum``, ``letter_counting``, ``word_sorting``, ...), each with a
verifier. `build_reasoning_gym` draws ``per_task`` problems of each named family
(``reasoning_gym.create_dataset(name, size=per_task, seed=seed)``): the instruction is the
problem's ``question``, the output its ``answer`` and the category the family, so a non-IID
(Dirichlet) partition gives clients different mixes of families (as FedLLM-Bench splits
clients by task). The data set's ``scorer`` is each family's own verifier
(``dataset.score_answer(answer, entry)``, 1.0 = correct), which the SFT task uses for its exact
match in place of string equality.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from .instructions import InstructionDataset, _check_common, _check_positive, _finish

#: ``--data`` values that start with this name reasoning-gym tasks.
REASONING_GYM_PREFIX = "reasoning_gym:"
#: Problems drawn per task family (before the train/test split).
DEFAULT_PER_TASK = 500
_HINT = "pip install 'fedlora-kernels[reasoning]'"


def _registry() -> dict[str, Any]:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as err:
        raise ImportError(
            f"{REASONING_GYM_PREFIX}... needs the reasoning-gym package: `{_HINT}` ({err})"
        ) from None
    return DATASETS


def reasoning_gym_tasks(spec: str) -> list[str]:
    """The task names of ``"reasoning_gym:a,b"``, checked against reasoning-gym's registry.

    Raises:
        ImportError: reasoning-gym is not installed (with the install hint).
        ValueError: (one line) no task named, a task named twice, or an unknown task (with the
            closest valid names and a few examples).
    """
    if not isinstance(spec, str) or not spec.startswith(REASONING_GYM_PREFIX):
        raise ValueError(f"expected {REASONING_GYM_PREFIX}<task>[,<task>...], got {spec!r}")
    names = [t.strip() for t in spec[len(REASONING_GYM_PREFIX) :].split(",") if t.strip()]
    if not names:
        raise ValueError(
            f"{spec!r} names no task; expected {REASONING_GYM_PREFIX}<task>[,<task>...], "
            "e.g. reasoning_gym:gsm_symbolic,chain_sum"
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{spec!r} names {dup[0]} more than once")
    known = _registry()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            examples = [n for n in ("gsm_symbolic", "basic_arithmetic", "chain_sum") if n in known]
            valid = ", ".join(dict.fromkeys([*close, *examples]))
            raise ValueError(
                f"unknown reasoning-gym task {name!r}; valid names include {valid} "
                f"({len(known)} in all: reasoning_gym.factory.DATASETS)"
            )
    return names


class _Verifier:
    """``scorer(answer, example)``: the family's ``score_answer`` on the entry the example came
    from (found by family and question)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], tuple[Any, dict[str, Any]]] = {}

    def add(self, family: str, dataset: Any, entry: dict[str, Any]) -> None:
        self.entries[(family, entry["question"])] = (dataset, entry)

    def __call__(self, answer: str, example: Mapping[str, Any]) -> float:
        found = self.entries.get((example["category"], example["instruction"]))
        if found is None:
            raise KeyError(f"no reasoning-gym entry for this {example['category']} example")
        dataset, entry = found
        return float(dataset.score_answer(answer, entry))


def build_reasoning_gym(
    spec: str,
    *,
    per_task: int = DEFAULT_PER_TASK,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> InstructionDataset:
    """``per_task`` problems of each task family in ``spec`` (``"reasoning_gym:a,b"``), one
    category per family, with each family's verifier as the data set's ``scorer``.

    Problems with an empty question or answer are left out; equal questions are kept once. The
    split is a stable hash of the question, so it does not move with ``seed``. Raises as
    `reasoning_gym_tasks` does.
    """
    _check_positive("per_task", per_task)
    _check_common(seed, test_fraction)
    names = reasoning_gym_tasks(spec)
    import reasoning_gym

    verifier = _Verifier()
    examples = []
    for family in names:
        dataset = reasoning_gym.create_dataset(family, size=per_task, seed=seed)
        for entry in dataset:
            question, answer = str(entry.get("question", "")), entry.get("answer")
            if not question.strip() or answer is None or not str(answer).strip():
                continue
            verifier.add(family, dataset, entry)
            examples.append(
                {
                    "instruction": question.strip(),
                    "input": "",
                    "output": str(answer).strip(),
                    "category": family,
                }
            )
    if not examples:
        raise ValueError(f"{spec!r}: the tasks generated no usable problem")
    version = getattr(reasoning_gym, "__version__", None)
    data = _finish(
        examples,
        names,
        test_fraction,
        seed,
        "reasoning_gym",
        {
            "source": "reasoning-gym",
            "version": version,
            "params": {"tasks": names, "per_task": per_task, "seed": seed},
            "categories": "from data",
        },
    )
    return InstructionDataset(
        examples=data.examples,
        splits=data.splits,
        category_names=data.category_names,
        name=data.name,
        info=data.info,
        scorer=verifier,
    )
