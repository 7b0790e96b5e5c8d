"""Tests for fedlora.data: the stdlib docstring data set, the file loader and the partitions."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedlora.data import (
    DEFAULT_FAMILIES,
    TextDataset,
    build_stdlib_topics,
    client_label_counts,
    default_cache_dir,
    dirichlet_partition,
    hash_split,
    iid_partition,
    load_text_file,
    stable_unit,
)
from fedlora.data.stdlib_topics import BUILDER_VERSION

REPO = Path(__file__).resolve().parents[1]


def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during a test that must be offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fedlora_cache")


@pytest.fixture(scope="session")
def stdlib_ds(stdlib_cache: Path) -> TextDataset:
    return build_stdlib_topics(stdlib_cache)


# --------------------------------------------------------------------------- stdlib data set


def test_stdlib_classes_and_balance(stdlib_ds: TextDataset) -> None:
    ds = stdlib_ds
    assert ds.name == "stdlib_topics"
    assert 8 <= ds.num_classes <= 12
    assert list(ds.label_names) == [f for f in DEFAULT_FAMILIES if f in ds.label_names]
    counts = ds.class_counts()
    assert sum(counts) == len(ds)
    assert all(50 <= c <= 200 for c in counts), counts
    for split in ("train", "test"):
        assert all(c > 0 for c in ds.class_counts(split)), (split, ds.class_counts(split))
    assert 0.1 < len(ds.indices("test")) / len(ds) < 0.3


def test_stdlib_texts_clean_unique_disjoint(stdlib_ds: TextDataset) -> None:
    ds = stdlib_ds
    assert len(set(ds.texts)) == len(ds.texts)
    assert all(t == t.strip() and len(t) >= 40 and "\n" not in t for t in ds.texts)
    assert all(len(t) <= 1000 for t in ds.texts)
    train = {ds.texts[i] for i in ds.indices("train")}
    test = {ds.texts[i] for i in ds.indices("test")}
    assert train and test and not train & test
    # the split is a pure function of the text
    assert all(ds.splits[i] == hash_split(t, 0.2) for i, t in enumerate(ds.texts))


def test_stdlib_cache_file_and_reuse(stdlib_ds: TextDataset, stdlib_cache: Path) -> None:
    files = list(stdlib_cache.glob("stdlib_topics-*.json"))
    assert len(files) == 1
    v = sys.version_info
    assert (
        f"{v.major}.{v.minor}.{v.micro}" in files[0].name
        and f"-v{BUILDER_VERSION}-" in files[0].name
    )
    assert not list(stdlib_cache.glob("*.tmp"))  # atomic write left no temp file
    mtime = files[0].stat().st_mtime_ns
    again = build_stdlib_topics(stdlib_cache)
    assert again == stdlib_ds
    assert files[0].stat().st_mtime_ns == mtime  # read, not rewritten


def test_stdlib_deterministic_in_process(stdlib_ds: TextDataset, tmp_path: Path) -> None:
    fresh = build_stdlib_topics(tmp_path, use_cache=True)
    assert fresh.to_dict() == stdlib_ds.to_dict()
    nocache = build_stdlib_topics(tmp_path / "unused", use_cache=False)
    assert nocache == stdlib_ds
    assert not (tmp_path / "unused").exists()


def test_stdlib_deterministic_across_processes(stdlib_cache: Path, tmp_path: Path) -> None:
    """A fresh interpreter with another hash seed builds byte-identical cache JSON."""
    (ref,) = stdlib_cache.glob("stdlib_topics-*.json")
    code = (
        "import sys; from fedlora.data import build_stdlib_topics; build_stdlib_topics(sys.argv[1])"
    )
    env = dict(
        os.environ,
        PYTHONHASHSEED="12345",
        PYTHONPATH=os.pathsep.join(
            [str(REPO / "python_api"), str(REPO), os.environ.get("PYTHONPATH", "")]
        ),
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, timeout=120)
    (other,) = tmp_path.glob("stdlib_topics-*.json")
    assert other.name == ref.name
    assert other.read_bytes() == ref.read_bytes()


def test_stdlib_no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _block_network(monkeypatch)
    with pytest.raises(OSError):
        socket.create_connection(("example.com", 80))
    ds = build_stdlib_topics(tmp_path, max_per_class=20)
    assert ds.class_counts() == [20] * ds.num_classes


def test_stdlib_cap_and_seed(stdlib_ds: TextDataset, tmp_path: Path) -> None:
    a = build_stdlib_topics(tmp_path, max_per_class=30, seed=0)
    b = build_stdlib_topics(tmp_path, max_per_class=30, seed=1)
    assert a.class_counts() == [30] * a.num_classes == b.class_counts()
    assert set(a.texts) != set(b.texts)  # the seed picks a different sample...
    ref = stdlib_ds
    full = {t: (s, y) for t, s, y in zip(ref.texts, ref.splits, ref.labels, strict=True)}
    for ds in (a, b):  # ...but a text's split and label never change
        for t, s, y in zip(ds.texts, ds.splits, ds.labels, strict=True):
            assert s == hash_split(t, 0.2)
            if t in full:
                assert full[t] == (s, y)
        assert ds.label_names == stdlib_ds.label_names
    assert len(list(tmp_path.glob("stdlib_topics-*.json"))) == 2  # parameters are in the key


def test_stdlib_custom_families_and_corrupt_cache(tmp_path: Path) -> None:
    ds = build_stdlib_topics(tmp_path, families=["json", "email"], max_per_class=10)
    assert ds.label_names == ("json", "email")
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    again = build_stdlib_topics(tmp_path, families=["json", "email"], max_per_class=10)
    assert again == ds
    json.loads(path.read_text())  # rewritten


def test_stdlib_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDLORA_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "fedlora"


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"max_per_class": 0}, "max_per_class"),
        ({"min_chars": 0}, "min_chars"),
        ({"max_chars": 5}, "max_chars"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"families": ["email"]}, "families"),
        ({"families": "email"}, "families"),
        ({"families": ["email", "tkinter"]}, "tkinter"),
        ({"families": ["email", "os.path"]}, "families"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_stdlib_bad_arguments(kwargs: dict, word: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=word):
        build_stdlib_topics(tmp_path, **kwargs)


# --------------------------------------------------------------------------- TextDataset


def test_text_dataset_roundtrip_and_validation() -> None:
    ds = TextDataset(["a", "b", "c"], [0, 1, 1], ["x", "y"], ["train", "test", "train"])
    assert len(ds) == 3 and ds.num_classes == 2
    assert ds.train.texts == ("a", "c") and ds.test.labels == (1,)
    assert ds.class_counts() == [1, 2] and ds.class_counts("train") == [1, 1]
    assert TextDataset.from_dict(json.loads(json.dumps(ds.to_dict()))) == ds
    with pytest.raises(ValueError, match="same length"):
        TextDataset(["a"], [0, 1], ["x", "y"], ["train"])
    with pytest.raises(ValueError, match="outside"):
        TextDataset(["a"], [2], ["x", "y"], ["train"])
    with pytest.raises(ValueError, match="splits"):
        TextDataset(["a"], [0], ["x", "y"], ["dev"])
    with pytest.raises(ValueError, match="unique"):
        TextDataset(["a"], [0], ["x", "x"], ["train"])
    with pytest.raises(ValueError, match="split"):
        ds.indices("valid")


def test_stable_unit_is_fixed() -> None:
    # Pinned to SHA-256 so the split cannot change between processes, machines or versions.
    expected = int(hashlib.sha256(b"\x00hello").hexdigest()[:16], 16) / 2**64
    assert stable_unit("hello") == expected == pytest.approx(0.53971, abs=1e-5)
    assert 0.0 <= stable_unit("") < 1.0
    assert stable_unit("a", "s1") != stable_unit("a", "s2")


# --------------------------------------------------------------------------- file loader


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_csv(tmp_path: Path) -> None:
    rows = [f'"text number {i}, with comma",{"pos" if i % 2 else "neg"}' for i in range(40)]
    rows.append('"multi\nline text",pos')
    p = _write(tmp_path / "d.csv", "text,label,extra\n" + "\n".join(rows) + "\n\n")
    ds = load_text_file(p)
    assert len(ds) == 41 and ds.label_names == ("neg", "pos") and ds.name == "d"
    assert ds.texts[0] == "text number 0, with comma" and ds.labels[0] == 0
    assert ds.texts[-1] == "multi\nline text"
    assert set(ds.splits) == {"train", "test"}
    assert all(s == hash_split(t, 0.2) for t, s in zip(ds.texts, ds.splits, strict=True))
    assert load_text_file(p, test_fraction=0.0).indices("test") == []


def test_load_csv_numeric_labels_sorted_numerically(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.csv", "label,text\n10,a\n2,b\n1,c\n")
    ds = load_text_file(p)
    assert ds.label_names == ("1", "2", "10")
    assert ds.labels == (2, 1, 0)


def test_load_tsv_with_bom(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.tsv", "\ufefftext\tlabel\nhello\ta\nworld\tb\n")
    assert load_text_file(p).texts == ("hello", "world")


def test_load_jsonl_with_split(tmp_path: Path) -> None:
    lines = [
        {"text": "alpha", "label": 0, "split": "train"},
        {"text": "beta", "label": 1, "split": "validation"},
        {"text": "gamma", "label": 1, "split": "train", "id": 7},
    ]
    p = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = load_text_file(p)
    assert ds.splits == ("train", "test", "train")
    assert ds.label_names == ("0", "1") and ds.labels == (0, 1, 1)
    assert ds.info["split"] == "from file"


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("m.csv", "text,category\na,x\nb,y\n", r"m\.csv.*missing column.*'label'"),
        ("m.csv", "sentence,label\na,x\nb,y\n", r"m\.csv.*missing column.*'text'"),
        ("one.csv", "text,label\na,x\nb,x\nc,x\n", r"one\.csv.*only one label"),
        ("e.csv", "", r"e\.csv.*empty"),
        ("e.csv", "\n\n", r"e\.csv.*empty"),
        ("h.csv", "text,label\n", r"h\.csv.*no examples"),
        ("t.csv", "text,label\n ,x\nb,y\n", r"t\.csv.*line 2.*empty text"),
        ("l.csv", "text,label\na,\nb,y\n", r"l\.csv.*line 2.*empty label"),
        ("s.csv", "text,label,split\na,x,train\nb,y,other\n", r"s\.csv.*line 3.*split"),
        ("r.csv", "text,label\na\nb,y\n", r"r\.csv.*line 2"),
        ("m.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', r"m\.jsonl.*line 2.*'label'"),
        ("one.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n', "only one"),
        ("e.jsonl", "", r"e\.jsonl.*no examples"),
        ("b.jsonl", '{"text": "a", "label": 1}\n{bad\n', r"b\.jsonl.*line 2.*JSON"),
        ("a.jsonl", '["a", 1]\n', r"a\.jsonl.*line 1.*object"),
        ("n.jsonl", '{"text": 3, "label": 1}\n', r"n\.jsonl.*text must be a string"),
        ("f.jsonl", '{"text": "a", "label": 1.5}\n', r"f\.jsonl.*label"),
        (
            "o.jsonl",
            '{"text": "a", "label": 0, "split": "test"}\n{"text": "b", "label": 1, '
            '"split": "test"}\n',
            r"o\.jsonl.*no example is in the train split",
        ),
        ("d.txt", "text,label\na,b\n", r"d\.txt.*unsupported"),
    ],
)
def test_load_file_errors(tmp_path: Path, name: str, content: str, match: str) -> None:
    p = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=match):
        load_text_file(p)


def test_load_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        load_text_file(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="test_fraction"):
        load_text_file(tmp_path / "nope.csv", test_fraction=1.5)


# --------------------------------------------------------------------------- partitions


def _labels(n_per_class: int = 100, classes: int = 10) -> list[int]:
    return [c for c in range(classes) for _ in range(n_per_class)]


def _check_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))
    assert all(p == sorted(p) for p in parts)


def _mean_entropy(labels: list[int], parts: list[list[int]]) -> float:
    ent = []
    for row in client_label_counts(labels, parts):
        q = np.asarray(row, dtype=float) / sum(row)
        ent.append(-sum(x * math.log(x) for x in q if x > 0))
    return float(np.mean(ent))


@pytest.mark.parametrize("alpha", [0.05, 0.5, 5.0, math.inf])
@pytest.mark.parametrize("num_clients", [1, 3, 10])
def test_dirichlet_covers_once_and_min_size(alpha: float, num_clients: int) -> None:
    labels = _labels()
    parts = dirichlet_partition(labels, num_clients, alpha, seed=3, min_size=10)
    assert len(parts) == num_clients
    _check_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_deterministic_per_seed() -> None:
    labels = _labels()
    a = dirichlet_partition(labels, 8, 0.3, seed=0)
    assert a == dirichlet_partition(np.asarray(labels), 8, 0.3, seed=0)
    assert a != dirichlet_partition(labels, 8, 0.3, seed=1)
    state = np.random.get_state()
    np.random.seed(999)  # global numpy state must not matter
    assert a == dirichlet_partition(labels, 8, 0.3, seed=0)
    np.random.set_state(state)


def test_dirichlet_smaller_alpha_more_skew() -> None:
    labels = _labels()
    ent = {
        a: np.mean(
            [_mean_entropy(labels, dirichlet_partition(labels, 10, a, seed=s)) for s in range(3)]
        )
        for a in (0.1, 1.0, 100.0)
    }
    assert ent[0.1] < ent[1.0] < ent[100.0] <= math.log(10) + 1e-9
    assert ent[100.0] > 0.9 * math.log(10)
    assert ent[0.1] < 0.5 * math.log(10)


def test_dirichlet_repair_when_draws_keep_failing() -> None:
    labels = _labels(5, 10)  # 50 examples over 10 clients, 5 each: only the repair can do it
    parts = dirichlet_partition(labels, 10, 0.01, seed=0, min_size=5, max_tries=2)
    _check_cover(parts, 50)
    assert [len(p) for p in parts] == [5] * 10
    assert parts == dirichlet_partition(labels, 10, 0.01, seed=0, min_size=5, max_tries=2)


def test_dirichlet_on_stdlib_train_split(stdlib_ds: TextDataset) -> None:
    train = stdlib_ds.indices("train")
    labels = [stdlib_ds.labels[i] for i in train]
    parts = dirichlet_partition(labels, 10, 0.5, seed=0, min_size=8)
    _check_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 8


def test_iid_partition() -> None:
    labels = _labels(23, 7)
    parts = iid_partition(labels, 6, seed=1)
    _check_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    counts = np.asarray(client_label_counts(labels, parts))
    assert (counts.max(axis=0) - counts.min(axis=0)).max() <= 1  # stratified
    assert parts == iid_partition(labels, 6, seed=1) != iid_partition(labels, 6, seed=2)
    plain = iid_partition(101, 4, seed=0)
    _check_cover(plain, 101)
    assert sorted(len(p) for p in plain) == [25, 25, 25, 26]
    assert dirichlet_partition(labels, 6, math.inf, seed=1) == parts


@pytest.mark.parametrize(
    "args, kwargs, word",
    [
        (([0, 1, 1], 0, 1.0), {}, "num_clients"),
        (([0, 1, 1], 2.0, 1.0), {}, "num_clients"),
        (([0, 1, 1], 2, 0.0), {}, "alpha"),
        (([0, 1, 1], 2, -1.0), {}, "alpha"),
        (([0, 1, 1], 2, math.nan), {}, "alpha"),
        (([0, 1, 1], 2, "1"), {}, "alpha"),
        (([], 2, 1.0), {}, "labels"),
        (([0, -1, 1], 2, 1.0), {}, "labels"),
        (([0.5, 1, 1], 2, 1.0), {}, "labels"),
        ((["a", "b"], 2, 1.0), {}, "labels"),
        (([[0, 1]], 2, 1.0), {}, "labels"),
        (([0, 1, 1], 2, 1.0), {"min_size": 2}, "min_size"),
        (([0, 1, 1], 2, 1.0), {"min_size": -1}, "min_size"),
        (([0, 1, 1], 4, 1.0), {"min_size": 0}, "num_clients"),
        (([0, 1, 1], 2, 1.0), {"seed": True}, "seed"),
        (([0, 1, 1], 2, 1.0), {"seed": -1}, "seed"),
    ],
)
def test_dirichlet_bad_arguments(args: tuple, kwargs: dict, word: str) -> None:
    kwargs.setdefault("seed", 0)
    with pytest.raises(ValueError, match=word):
        dirichlet_partition(*args, **kwargs)


def test_iid_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_clients"):
        iid_partition([0, 1], 3, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        iid_partition(5, 0, seed=0)
    with pytest.raises(ValueError, match="labels"):
        iid_partition(0, 1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        iid_partition(5, 2, seed="0")


def test_client_label_counts() -> None:
    assert client_label_counts([0, 1, 1, 2], [[0, 1], [2, 3]]) == [[1, 1, 0], [0, 1, 1]]
    assert client_label_counts([0, 1], [[0], [1]], num_classes=3) == [[1, 0, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match="num_classes"):
        client_label_counts([0, 3], [[0, 1]], num_classes=2)
    assert Counter(len(r) for r in client_label_counts(_labels(), [list(range(1000))])) == {10: 1}
