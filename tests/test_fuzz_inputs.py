"""Property-based fuzz of the user-facing input surfaces (issue 20): the instruction and text
data files (``fedlora.data.load_instruction_file``, ``load_text_file``) and the CLI's option
parser with the config validation behind it (``fedlora.cli.main`` up to the point where a run
would start: ``run`` / ``compare`` are replaced by stubs that record the validated config).

Whatever the input, the answer is a result or one line: a ``ValueError`` /
``FileNotFoundError`` from the readers, exit code 2 with one line on stderr from the CLI, never
a traceback (any other exception fails the test).

Profiles: ``default`` (CI: a bounded number of examples) and ``thorough`` (run by hand:
``HYPOTHESIS_PROFILE=thorough pytest tests/test_fuzz_inputs.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import string
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedlora import cli  # noqa: E402
from fedlora.data import load_text_file  # noqa: E402
from fedlora.data.instructions import InstructionDataset, load_instruction_file  # noqa: E402
from fedlora.simulate import compare as compare_mod  # noqa: E402
from fedlora.simulate import engine  # noqa: E402

_PROFILES = {
    "default": settings(
        max_examples=120,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    ),
    "thorough": settings(
        max_examples=3000,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    ),
}
PROFILE = _PROFILES[os.environ.get("HYPOTHESIS_PROFILE", "default")]

# ----------------------------------------------------------------------------- data files
KEYS = ("instruction", "input", "output", "messages", "category", "split", "text", "label", "x")
ROLES = ("system", "user", "assistant", "tool", "", 3)
text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
scalars = st.one_of(text, st.integers(-3, 3), st.floats(allow_nan=True), st.none(), st.booleans())
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.one_of(text, scalars)}),
    st.dictionaries(st.sampled_from(("role", "content", "name")), scalars, max_size=3),
    scalars,
)
values = st.one_of(
    scalars,
    st.lists(message, max_size=4),
    st.sampled_from(("train", "test", "TRAIN", "val", "")),
    st.dictionaries(text, scalars, max_size=2),
)
record = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


def _jsonl(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(("record", "record", "record", "raw", "array", "blank")))
        if kind == "record":
            lines.append(json.dumps(draw(record), allow_nan=True))
        elif kind == "raw":
            lines.append(draw(text))
        elif kind == "array":
            lines.append(json.dumps(draw(st.lists(scalars, max_size=3)), allow_nan=True))
        else:
            lines.append("")
    return ("\n".join(lines) + draw(st.sampled_from(("", "\n", "\r\n")))).encode()


def _delimited(draw, sep: str) -> bytes:
    cols = draw(st.lists(st.sampled_from(KEYS), min_size=0, max_size=5))
    rows = [sep.join(cols)]
    for _ in range(draw(st.integers(0, 5))):
        cells = []
        for _ in range(draw(st.integers(0, len(cols) + 1))):
            v = draw(values)
            cell = v if isinstance(v, str) else json.dumps(v, allow_nan=True)
            if draw(st.booleans()):
                cell = '"' + cell.replace('"', '""') + '"'
            elif draw(st.integers(0, 9)) == 0:
                cell = '"' + cell  # an unterminated quote
            cells.append(cell)
        rows.append(sep.join(cells))
    return "\n".join(rows).encode()


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from((".jsonl", ".ndjson", ".csv", ".tsv", ".txt", ".JSONL")))
    kind = draw(st.sampled_from(("structured", "structured", "structured", "bytes")))
    if kind == "bytes":
        body = draw(st.binary(max_size=64))
    elif suffix.lower() in (".jsonl", ".ndjson"):
        body = _jsonl(draw)
    else:
        body = _delimited(draw, "\t" if suffix == ".tsv" else ",")
    if draw(st.integers(0, 19)) == 0:
        body = b"\xef\xbb\xbf" + body  # a BOM
    return suffix, body


def _one_line_error(err: BaseException) -> None:
    message = str(err)
    assert message.strip() and "\n" not in message, repr(message)


@PROFILE
@given(case=data_files())
def test_data_file_readers_answer_in_one_line(case):
    suffix, body = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(body)
        for read in (load_instruction_file, load_text_file):
            try:
                result = read(path)
            except (ValueError, FileNotFoundError) as err:
                _one_line_error(err)
                assert str(path) in str(err) or path.name in str(err), str(err)
            else:
                if read is load_instruction_file:
                    assert isinstance(result, InstructionDataset) and len(result.examples) > 0
                    assert "train" in result.splits


# ----------------------------------------------------------------------------- the CLI
def _option_names() -> dict[str, list[str]]:
    """Every option of each subcommand, read from the parser itself."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {
        name: sorted(s for a in p._actions for s in a.option_strings if s.startswith("--"))
        for name, p in sub.choices.items()
    }


OPTIONS = _option_names()
SPECIAL = ("nan", "inf", "-inf", "1e400", "-1", "0", "1", "2", "3", "0.5", "1e-3", "", " ", "x",
           "fedit", "ravan,hafl", "hetero", "uniform", "rank=2,4", "rank=;;", "steps=0",
           "heads=1,2;rank=2", "cpu", "cuda:7", "auto", "float32", "2,2", "1,-1", "--rounds",
           "\u00e9", "9" * 30)  # fmt: skip
word = st.one_of(st.sampled_from(SPECIAL), st.text(string.printable, max_size=8))


@st.composite
def argvs(draw) -> list[str]:
    command = draw(st.sampled_from(("simulate", "compare", "nope", "")))
    names = OPTIONS.get(command, OPTIONS["simulate"])
    argv = [command] if command else []
    for _ in range(draw(st.integers(0, 6))):
        option = draw(st.sampled_from(names))
        if option in ("--help", "-h"):
            continue
        argv.append(option)
        if draw(st.integers(0, 9)) > 0:
            argv.append(draw(word))
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(word))  # a stray positional
    return argv


class _Stopped(Exception):
    """Raised by the stubs: the arguments got as far as a run."""


def _stub_run(cfg, out_dir=None, **kwargs):
    from fedlora.simulate.config import parse_budgets

    cfg.validate()
    parse_budgets(cfg)  # the budget spec is part of what the CLI accepts
    raise _Stopped


def _stub_compare(configs, out, *, spec=None, **kwargs):
    for cfg in configs:
        cfg.validate()
    spec.check([c.method for c in configs])
    raise _Stopped


@PROFILE
@given(argv=argvs())
@example(argv=["simulate", "\r"])  # found by this fuzz: argparse echoed the \r (two lines)
@example(argv=["simulate", "--method", "fed\nit"])
@example(argv=["compare", "--methods", "fedit,\x00x", "--seeds", "1\r2"])
def test_cli_options_answer_in_one_line(argv):
    """Any command line: it reaches the run with a validated config, or exits 2 (or 0 for
    --help) with one line on stderr; no traceback."""
    err = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(err):
        with contextlib.redirect_stdout(io.StringIO()):
            runs = argv[:1] in (["simulate"], ["compare"])
            full = [*argv, "--out", str(Path(tmp) / "out")] if runs else argv
            saved = engine.run, compare_mod.compare
            engine.run, compare_mod.compare = _stub_run, _stub_compare
            try:
                code = cli.main(full)
            except _Stopped:
                return
            finally:
                engine.run, compare_mod.compare = saved
    message = err.getvalue().strip()
    assert code == 2, (argv, code, message)
    assert message and len(message.splitlines()) == 1 and "Traceback" not in message, message
