"""Load a user's text-classification data set from a CSV or JSON Lines file (`--data`).

Formats:
    CSV / TSV: a header row with (at least) the columns ``text`` and ``label``.
    JSONL:     one JSON object per line with (at least) the keys ``text`` and ``label``.

An optional ``split`` column/key (``train`` or ``test``; ``validation``, ``valid``, ``val``,
``dev`` and ``eval`` count as test) chooses the split; without it about `test_fraction` of the
texts go to the test split, chosen by a stable hash of the text. Labels may be strings or
integers; classes are named by the label's string form and sorted (numerically when every label is
an integer, otherwise alphabetically), which fixes the class indices.

Limits: one line (and, in CSV, one field, which may span lines when quoted) holds at most
`MAX_LINE_CHARS` characters (1 MiB), so a file without line breaks fails at once with the line
number rather than being read whole into memory. Every problem (too long a line, a file that is
not UTF-8, a malformed JSON line or CSV record, an unreadable file) is a one-line `ValueError`
naming the file and the line.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dataset import TextDataset, hash_split

_TEST_SPLIT_NAMES = frozenset({"test", "validation", "valid", "val", "dev", "eval"})
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}

#: The longest line (and CSV field) accepted, in characters: 1 MiB, far above any text a
#: tokenizer keeps (it truncates to ``--max-length`` tokens) and far below memory trouble.
MAX_LINE_CHARS = 1 << 20


@dataclass
class _Row:
    text: str
    label: str
    split: str | None
    where: str  # "line N", for error messages


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


def _norm_split(path: Path, value: Any, where: str) -> str:
    s = str(value).strip().lower()
    if s == "train":
        return "train"
    if s in _TEST_SPLIT_NAMES:
        return "test"
    raise _fail(path, f"{where}: split must be 'train' or 'test', got {value!r}")


def _label_str(path: Path, value: Any, where: str) -> str:
    if isinstance(value, bool) or value is None:
        raise _fail(path, f"{where}: label must be a string or an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise _fail(path, f"{where}: label must be a string or an integer, got {value!r}")
        value = int(value)
    if not isinstance(value, (str, int)):
        raise _fail(path, f"{where}: label must be a string or an integer, got {value!r}")
    label = str(value).strip()
    if not label:
        raise _fail(path, f"{where}: empty label")
    return label


def _text_str(path: Path, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"{where}: text must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise _fail(path, f"{where}: empty text")
    return text


def _encoding_problem(path: Path) -> str:
    """Where (which line) and why ``path`` is not UTF-8: scanned in binary, chunk by chunk."""
    line = 1
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        head = f.read(2)
        if head in (b"\xff\xfe", b"\xfe\xff"):
            return "the file is UTF-16 encoded; save it as UTF-8"
        f.seek(0)
        while True:
            chunk = f.read(1 << 16)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                line += chunk[: max(e.start, 0)].count(b"\n")
                return f"line {line}: not valid UTF-8 ({e.reason}); save the file as UTF-8"
            if not chunk:
                return "not valid UTF-8; save the file as UTF-8"
            line += chunk.count(b"\n")


def _lines(path: Path, f: Any) -> Iterator[str]:
    """The lines of the open text file ``f``, refusing one longer than `MAX_LINE_CHARS` (without
    reading more than that of it) and turning a decoding error into a one-line `ValueError`."""
    lineno = 0
    while True:
        try:
            line = f.readline(MAX_LINE_CHARS + 1)
        except UnicodeDecodeError:
            raise _fail(path, _encoding_problem(path)) from None
        if not line:
            return
        lineno += 1
        if len(line) > MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
            raise _fail(
                path,
                f"line {lineno} is longer than {MAX_LINE_CHARS} characters, the limit for one "
                "line (is this a text data file with one example per line?)",
            )
        yield line


def _open_text(path: Path, newline: str | None) -> Any:
    try:
        return open(path, encoding="utf-8-sig", newline=newline)
    except OSError as e:
        raise _fail(path, f"cannot read the file ({e.strerror or e})") from None


@contextlib.contextmanager
def csv_reader(path: Path, delimiter: str) -> Iterator[Any]:
    """A ``csv.reader`` over ``path`` under the line and field limits (`MAX_LINE_CHARS`);
    malformed CSV inside the ``with`` block becomes a one-line ValueError naming the line.
    The process-wide field limit is restored on exit."""
    old_limit = csv.field_size_limit(MAX_LINE_CHARS)
    try:
        with _open_text(path, newline="") as f:
            reader = csv.reader(_lines(path, f), delimiter=delimiter)
            try:
                yield reader
            except csv.Error as e:
                problem = str(e)
                if "field larger than field limit" in problem:
                    problem = f"a field is longer than {MAX_LINE_CHARS} characters"
                raise _fail(path, f"line {reader.line_num}: malformed CSV ({problem})") from None
    finally:
        csv.field_size_limit(old_limit)


def _read_delimited(path: Path, text_col: str, label_col: str, delimiter: str) -> list[_Row]:
    with csv_reader(path, delimiter) as reader:
        return _delimited_rows(path, reader, text_col, label_col)


def _delimited_rows(path: Path, reader: Any, text_col: str, label_col: str) -> list[_Row]:
    header = next(reader, None)
    while header is not None and not any(h.strip() for h in header):
        header = next(reader, None)  # leading blank lines
    if header is None:
        raise _fail(path, "the file is empty (expected a header row with text and label)")
    names = [h.strip() for h in header]
    missing = [c for c in (text_col, label_col) if c not in names]
    if missing:
        raise _fail(
            path,
            f"missing column(s) {missing}; the header has {names[:20]} "
            f"(expected columns {text_col!r} and {label_col!r})",
        )
    ti, li = names.index(text_col), names.index(label_col)
    si = names.index("split") if "split" in names else None
    need = max(ti, li, si if si is not None else -1)
    rows = []
    for record in reader:
        if not record or not any(c.strip() for c in record):
            continue
        where = f"line {reader.line_num}"
        if len(record) <= need:
            raise _fail(path, f"{where}: {len(record)} field(s), expected {len(names)}")
        rows.append(
            _Row(
                text=_text_str(path, record[ti], where),
                label=_label_str(path, record[li], where),
                split=_norm_split(path, record[si], where) if si is not None else None,
                where=where,
            )
        )
    return rows


def json_objects(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """``(object, "line N")`` for every non-blank line of a JSONL file, each line a JSON
    object (the line cap applies); one-line ``ValueError`` naming the line otherwise."""
    with _open_text(path, newline=None) as f:
        for lineno, line in enumerate(_lines(path, f), start=1):
            if not line.strip():
                continue
            where = f"line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(
                    path, f"{where}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            except RecursionError:
                raise _fail(path, f"{where}: JSON nested too deeply") from None
            except ValueError as e:  # e.g. an integer of more than 4300 digits
                raise _fail(path, f"{where}: unreadable JSON ({str(e)[:200]})") from None
            if not isinstance(obj, dict):
                raise _fail(path, f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield obj, where


def _read_jsonl(path: Path, text_col: str, label_col: str) -> list[_Row]:
    rows = []
    for obj, where in json_objects(path):
        missing = [k for k in (text_col, label_col) if k not in obj]
        if missing:
            raise _fail(
                path,
                f"{where}: missing key(s) {missing}; the object has {sorted(obj)} "
                f"(expected keys {text_col!r} and {label_col!r})",
            )
        split = obj.get("split")
        rows.append(
            _Row(
                text=_text_str(path, obj[text_col], where),
                label=_label_str(path, obj[label_col], where),
                split=_norm_split(path, split, where) if split is not None else None,
                where=where,
            )
        )
    return rows


def _sorted_label_names(labels: set[str]) -> list[str]:
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def load_text_file(
    path: str | Path,
    *,
    test_fraction: float = 0.2,
    text_column: str = "text",
    label_column: str = "label",
) -> TextDataset:
    """Read a CSV/TSV/JSONL text-classification file into a `TextDataset`.

    Args:
        path: a ``.csv``, ``.tsv``, ``.jsonl`` or ``.ndjson`` file (UTF-8).
        test_fraction: share of texts put in the test split by text hash when the file has no
            ``split`` column; 0 keeps everything for training.
        text_column, label_column: the column (CSV) or key (JSONL) names.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: (one line, naming the file and the problem) unknown extension, not a
            file, unreadable, not UTF-8, empty file, a line or CSV field over `MAX_LINE_CHARS`,
            malformed CSV, missing column/key, empty text or label, bad JSON line, bad split
            value, fewer than two distinct labels, or no training example.
    """
    path = Path(path)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise _fail(path, f"unsupported file type {path.suffix!r}; use one of {sorted(_FORMATS)}")
    if not path.is_file():
        if path.exists():
            raise _fail(path, "is not a file")
        raise FileNotFoundError(f"{path}: no such data file")
    if fmt == "jsonl":
        rows = _read_jsonl(path, text_column, label_column)
    else:
        rows = _read_delimited(path, text_column, label_column, "," if fmt == "csv" else "\t")
    if not rows:
        raise _fail(path, "the file has no examples")
    label_names = _sorted_label_names({r.label for r in rows})
    if len(label_names) < 2:
        raise _fail(
            path,
            f"only one label ({label_names[0]!r}) in {len(rows)} example(s); "
            "classification needs at least two",
        )
    has_split = any(r.split is not None for r in rows)
    if has_split:
        unset = next((r for r in rows if r.split is None), None)
        if unset is not None:
            raise _fail(path, f"{unset.where}: no split value while other rows have one")
        splits = [r.split or "train" for r in rows]
    else:
        splits = [hash_split(r.text, test_fraction) for r in rows]
    if "train" not in splits:
        raise _fail(path, "no example is in the train split")
    index = {name: i for i, name in enumerate(label_names)}
    return TextDataset(
        texts=[r.text for r in rows],
        labels=[index[r.label] for r in rows],
        label_names=label_names,
        splits=splits,
        name=path.stem,
        info={
            "source": str(path),
            "format": fmt,
            "split": "from file" if has_split else f"hash, test_fraction={test_fraction}",
        },
    )
