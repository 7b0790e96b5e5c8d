"""Tests for fedlora.data.instructions: the built-in offline instruction sets and user files."""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import re
import subprocess
import sys

import pytest

from fedlora.data import (
    ARITHMETIC_CATEGORIES,
    InstructionDataset,
    build_arithmetic,
    build_stdlib_qa,
    dirichlet_partition,
    files,
    load_instruction_file,
    load_instructions,
    to_chat_messages,
)
from fedlora.data import instructions as instr

# ------------------------------------------------------------------------------ arithmetic


def _solve(ex) -> int:
    """Recompute an arithmetic example's answer from its text alone (an independent oracle)."""
    cat, text, inp = ex["category"], ex["instruction"], ex["input"]
    nums = [int(n) for n in re.findall(r"\d+", text + " " + inp)]
    if cat in ("addition", "subtraction", "multiplication", "division", "two_step"):
        expr = re.fullmatch(r"What is ([\d+\-*/() ]+)\?", text).group(1)
        value = eval(expr, {"__builtins__": {}}, {})  # digits and + - * / ( ) only
        assert value == int(value)
        return int(value)
    if cat == "comparison":
        a, b = (int(n) for n in re.fullmatch(r"(\d+) or (\d+)", inp).groups())
        return max(a, b) if "larger" in text else min(a, b)
    if cat == "sequence":
        terms = [int(t) for t in inp.split(", ")]
        steps = {b - a for a, b in itertools.pairwise(terms)}
        assert len(steps) == 1, inp
        return terms[-1] + steps.pop()
    assert cat == "word_problem"
    a, b = nums
    if "more" in text:
        return a + b
    if "away" in text:
        return a - b
    if "in each" in text:
        return a * b
    assert "equally" in text
    assert a % b == 0
    return a // b


def test_arithmetic_answers_are_exact():
    ds = build_arithmetic(per_category=150, seed=3)
    for ex in ds:
        assert ex["output"] == str(_solve(ex)), ex


def test_arithmetic_is_deterministic_and_seeded():
    a = build_arithmetic(per_category=50, seed=1)
    b = build_arithmetic(per_category=50, seed=1)
    c = build_arithmetic(per_category=50, seed=2)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict()["examples"] != c.to_dict()["examples"]


def test_arithmetic_categories_nonempty_split_disjoint_dedup():
    ds = build_arithmetic(per_category=100)
    assert ds.category_names == ARITHMETIC_CATEGORIES
    assert len(ds) == 100 * len(ARITHMETIC_CATEGORIES)
    for split in ("train", "test"):
        counts = ds.category_counts(split)
        assert all(n > 0 for n in counts.values()), (split, counts)
    prompts = [(ex["instruction"], ex["input"]) for ex in ds]
    assert len(set(prompts)) == len(prompts)
    train = {(ex["instruction"], ex["input"]) for ex in ds.train}
    test = {(ex["instruction"], ex["input"]) for ex in ds.test}
    assert train and test and not train & test
    assert 0.1 < len(test) / len(ds) < 0.3


def test_split_is_a_property_of_the_prompt_not_the_seed():
    a, b = build_arithmetic(per_category=200, seed=0), build_arithmetic(per_category=200, seed=7)
    split_a = {(ex["instruction"], ex["input"]): s for ex, s in zip(a, a.splits, strict=True)}
    common = 0
    for ex, s in zip(b, b.splits, strict=True):
        key = (ex["instruction"], ex["input"])
        if key in split_a:
            common += 1
            assert split_a[key] == s
    assert common > 0


def test_arithmetic_bad_arguments():
    with pytest.raises(ValueError, match="per_category"):
        build_arithmetic(per_category=0)
    with pytest.raises(ValueError, match="categories"):
        build_arithmetic(categories=["addition", "poetry"])
    with pytest.raises(ValueError, match="test_fraction"):
        build_arithmetic(test_fraction=1.0)


# ------------------------------------------------------------------------------- stdlib_qa


@pytest.fixture(scope="module")
def stdlib_qa():
    return build_stdlib_qa(use_cache=False)


def _resolve(qualname: str):
    """Import the longest importable module prefix of a dotted name and getattr the rest."""
    parts = qualname.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for p in parts[k:]:
            obj = getattr(obj, p)
        return obj
    raise AssertionError(qualname)


def test_stdlib_qa_answers_come_from_the_docstrings(stdlib_qa):
    assert len(stdlib_qa) > 300
    for ex in stdlib_qa.examples[::7]:
        name = re.search(r"`([\w.]+)`", ex["instruction"]).group(1)
        assert name.split(".")[0] == ex["category"]
        doc = inspect.cleandoc(_resolve(name).__doc__)
        flat = re.sub(r"\s+", " ", doc).replace("``", "`")
        assert ex["output"].rstrip(".") in flat, (name, ex["output"])
        assert ex["input"] == ""


def test_stdlib_qa_categories_nonempty_and_split_disjoint(stdlib_qa):
    assert len(stdlib_qa.category_names) >= 5
    for split in ("train", "test"):
        assert all(n > 0 for n in stdlib_qa.category_counts(split).values())
    assert max(stdlib_qa.category_counts().values()) <= 200
    train = {ex["instruction"] for ex in stdlib_qa.train}
    test = {ex["instruction"] for ex in stdlib_qa.test}
    assert not train & test
    assert len(train) + len(test) == len(stdlib_qa)


def test_stdlib_qa_is_deterministic_across_processes(stdlib_qa):
    again = build_stdlib_qa(use_cache=False)
    assert again.to_dict() == stdlib_qa.to_dict()
    code = (
        "import json, sys; from fedlora.data import build_stdlib_qa; "
        "json.dump(build_stdlib_qa(use_cache=False).to_dict(), sys.stdout)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert json.loads(out) == stdlib_qa.to_dict()


def test_stdlib_qa_cache_is_read_back(tmp_path, monkeypatch):
    first = build_stdlib_qa(tmp_path, families=("json", "email"))
    assert list(tmp_path.glob("stdlib_qa-*.json"))

    def refuse(*a, **k):
        raise AssertionError("rebuilt instead of reading the cache")

    monkeypatch.setattr(instr, "_collect_qa", refuse)
    assert build_stdlib_qa(tmp_path, families=("json", "email")).to_dict() == first.to_dict()
    with pytest.raises(AssertionError, match="rebuilt"):  # other parameters: another cache file
        build_stdlib_qa(tmp_path, families=("json", "email"), seed=1)


def test_first_sentence_rules():
    assert instr._first_sentence("deque(x) --> deque\n\nA list-like sequence. More.", 300) == (
        "A list-like sequence."
    )
    assert instr._first_sentence("Serialize ``obj`` to JSON.\n\nDetails.", 300) == (
        "Serialize `obj` to JSON."
    )
    assert instr._first_sentence("Dictionary that remembers order", 300) == (
        "Dictionary that remembers order."
    )
    assert instr._first_sentence("Use e.g. this one. Then.", 300) == "Use e.g. this one."
    assert instr._first_sentence("x" * 400, 300) is None


# ------------------------------------------------------------- dataset object and chat form


def test_dataset_labels_partition_and_roundtrip():
    ds = build_arithmetic(per_category=40)
    train = ds.train
    assert [train.category_names[y] for y in train.labels] == [ex["category"] for ex in train]
    parts = dirichlet_partition(train.labels, 4, 0.5, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(len(train)))
    assert InstructionDataset.from_dict(json.loads(json.dumps(ds.to_dict()))) == ds
    with pytest.raises(TypeError):
        ds[0]["output"] = "x"  # read-only examples
    with pytest.raises(ValueError, match="empty output"):
        InstructionDataset(
            examples=[{"instruction": "q", "input": "", "output": " ", "category": "c"}],
            splits=["train"],
        )


def test_to_chat_messages_forms():
    ex = {"instruction": "Add.", "input": "2 and 3", "output": "5", "category": "a"}
    assert to_chat_messages(ex) == [
        {"role": "user", "content": "Add.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert to_chat_messages(ex, system="Be brief.", include_response=False) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add.\n\n2 and 3"},
    ]
    chat = dict(ex, messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert to_chat_messages(chat, system="ignored") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "5"},
    ]


def test_load_instructions_by_name_and_unknown(tmp_path):
    assert load_instructions("arithmetic").name == "arithmetic"
    assert load_instructions("stdlib_qa", cache_dir=tmp_path).name == "stdlib_qa"
    with pytest.raises(ValueError, match="unknown instruction data"):
        load_instructions("alpaca")


# ------------------------------------------------------------------------------ user files


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_instruction_form(tmp_path):
    f = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Say hi", "output": "Hi", "category": "greet"},
            {"instruction": "Add", "input": "1 2", "output": "3", "category": "math"},
            "",
            {"instruction": "Sub", "input": None, "output": "0", "category": "math"},
        ],
    )
    ds = load_instruction_file(f, test_fraction=0.0)
    assert len(ds) == 3 and ds.category_names == ("greet", "math")
    assert ds[1]["input"] == "1 2" and ds[0]["input"] == "" and ds[2]["input"] == ""
    assert set(ds.splits) == {"train"}
    assert ds.info["forms"] == ["instruction"]


def test_jsonl_messages_form(tmp_path):
    msgs = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    f = _jsonl(tmp_path / "c.jsonl", [{"messages": msgs}, {"messages": msgs[1:3]}])
    ds = load_instruction_file(f)
    assert ds.category_names == ("all",)
    assert ds[0]["instruction"] == "2+2?" and ds[0]["output"] == "4"
    assert to_chat_messages(ds[0]) == msgs
    assert to_chat_messages(ds[1], include_response=False) == [msgs[1]]


def test_csv_both_forms_with_split(tmp_path):
    f = tmp_path / "d.csv"
    chat = json.dumps([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}])
    chat_cell = '"' + chat.replace('"', '""') + '"'
    f.write_text(
        "instruction,input,output,messages,split\n"
        "Say hi,,Hi,,train\n"
        'Add,"1, 2",3,,test\n'
        f",,,{chat_cell},train\n"
    )
    ds = load_instruction_file(f)
    assert ds.splits == ("train", "test", "train")
    assert ds[1]["input"] == "1, 2"
    assert ds[2]["output"] == "A" and ds[2]["instruction"] == "Q?"
    assert ds.info["forms"] == ["instruction", "messages"]


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


BAD_JSONL = {
    "bad_json": (['{"instruction": "a", "output": '], "line 1: not valid JSON"),
    "not_object": (["[1, 2]"], "line 1: expected a JSON object, got list"),
    "neither_form": (
        [{"instruction": "a", "output": "b"}, {"question": "a", "answer": "b"}],
        "line 2: expected the keys instruction and output",
    ),
    "empty_output": ([{"instruction": "a", "output": "  "}], "line 1: empty output"),
    "empty_instruction": ([{"instruction": " ", "output": "b"}], "line 1: empty instruction"),
    "non_string_field": ([{"instruction": "a", "output": 3}], "line 1: output"),
    "messages_not_list": ([{"messages": "hi"}], "line 1: messages must be a non-empty list"),
    "message_without_role": (
        [{"messages": [{"content": "hi"}]}],
        r"line 1: messages\[0\] must be an object with 'role' and 'content'",
    ),
    "unknown_role": (
        [{"messages": _msgs(("human", "hi"), ("assistant", "yo"))}],
        r"line 1: messages\[0\]: role must be one of",
    ),
    "last_not_assistant": (
        [{"messages": _msgs(("user", "hi"))}],
        "line 1: the last message must be the assistant's response",
    ),
    "empty_response": (
        [{"messages": _msgs(("user", "hi"), ("assistant", ""))}],
        "line 1: empty response",
    ),
    "no_user_turn": (
        [{"messages": _msgs(("system", "s"), ("assistant", "a"))}],
        "line 1: no user message before the response",
    ),
    "both_forms": (
        [{"instruction": "a", "output": "b", "messages": _msgs(("user", "a"), ("assistant", "b"))}],
        "line 1: has both messages and instruction/output",
    ),
    "mixed_category": (
        [{"instruction": "a", "output": "b", "category": "x"}, {"instruction": "c", "output": "d"}],
        "line 2: no category while other examples have one",
    ),
    "mixed_split": (
        [{"instruction": "a", "output": "b", "split": "test"}, {"instruction": "c", "output": "d"}],
        "line 2: no split value while other examples have one",
    ),
    "bad_split": ([{"instruction": "a", "output": "b", "split": "x"}], "line 1: split must be"),
    "no_train": (
        [{"instruction": "a", "output": "b", "split": "test"}],
        "no example is in the train",
    ),
    "empty_file": ([""], "the file has no examples"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_files_one_line_errors(tmp_path, case):
    rows, message = BAD_JSONL[case]
    f = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message) as err:
        load_instruction_file(f)
    assert "\n" not in str(err.value)
    assert str(f) in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("text,label\nhi,1\n", "expected the columns instruction and output"),
        ("", "the file is empty"),
        ("instruction,output\na,b,c\n", "line 2: 3 field"),
        ('instruction,output\n"a,b\n', "malformed CSV|line 2: 1 field"),
        ("instruction,output\na,\n", "line 2: empty output"),
        ("messages\nnot json\n", "line 2: the messages field is not valid JSON"),
    ],
    ids=["no_columns", "empty", "field_count", "unterminated_quote", "empty_output", "bad_chat"],
)
def test_bad_csv_files_one_line_errors(tmp_path, text, message):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_instruction_file(f)
    assert "\n" not in str(err.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        load_instruction_file(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_instruction_file(tmp_path / "missing.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ValueError, match="is not a file"):
        load_instruction_file(tmp_path / "dir.jsonl")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        load_instruction_file(latin)


def test_line_over_the_cap_is_refused_early(tmp_path):
    f = tmp_path / "long.jsonl"
    f.write_text('{"instruction": "' + "x" * (files.MAX_LINE_CHARS + 10) + '", "output": "b"}')
    with pytest.raises(ValueError, match="line 1 is longer than 1048576 characters"):
        load_instruction_file(f)


# ---------------------------------------------------- TRL, ShareGPT, column mapping (issue 22)


def test_trl_prompt_completion_plain_and_conversational(tmp_path):
    conv_prompt = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]
    f = _jsonl(
        tmp_path / "trl.jsonl",
        [
            {"prompt": "Capital of France?", "completion": "Paris", "category": "geo"},
            {
                "prompt": conv_prompt,
                "completion": [{"role": "assistant", "content": "4"}],
                "category": "math",
            },
        ],
    )
    ds = load_instruction_file(f, test_fraction=0.0)
    assert ds[0]["instruction"] == "Capital of France?" and ds[0]["output"] == "Paris"
    assert "messages" not in ds[0]
    assert ds[1]["instruction"] == "2+2?" and ds[1]["output"] == "4"
    assert to_chat_messages(ds[1]) == [*conv_prompt, {"role": "assistant", "content": "4"}]
    assert ds.category_names == ("geo", "math")


def test_sharegpt_conversations(tmp_path):
    turns = [
        {"from": "system", "value": "You count."},
        {"from": "human", "value": "1, 2, ?"},
        {"from": "gpt", "value": "3"},
        {"from": "human", "value": "and then?"},
        {"from": "gpt", "value": "4"},
    ]
    f = _jsonl(tmp_path / "sg.jsonl", [{"conversations": turns}])
    ex = load_instruction_file(f, test_fraction=0.0)[0]
    assert (ex["instruction"], ex["output"]) == ("and then?", "4")
    roles = ["system", "user", "assistant", "user", "assistant"]
    assert to_chat_messages(ex) == [
        {"role": r, "content": t["value"]} for r, t in zip(roles, turns, strict=True)
    ]
    # CSV: the list as JSON text
    g = tmp_path / "sg.csv"
    cell = json.dumps(turns[1:3]).replace('"', '""')
    g.write_text(f'conversations,category\n"{cell}",count\n')
    ex = load_instruction_file(g, test_fraction=0.0)[0]
    assert (ex["instruction"], ex["output"], ex["category"]) == ("1, 2, ?", "3", "count")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"conversations": [{"from": "bot", "value": "x"}]}], r"conversations\[0\]: from must"),
        ([{"conversations": [{"value": "x"}]}], r"conversations\[0\] must be an object"),
        (
            [{"conversations": [{"from": "human", "value": "hi"}]}],
            "the last message must be the assistant's",
        ),
        ([{"prompt": "a", "completion": ["b"]}], "prompt and completion must both be strings"),
        (
            [{"prompt": [{"role": "user", "content": "a"}], "completion": []}],
            "completion must hold one assistant message",
        ),
        ([{"prompt": "a", "completion": " "}], "empty completion"),
        (
            [{"prompt": "a", "completion": "b", "instruction": "c", "output": "d"}],
            "has both prompt/completion and instruction/output",
        ),
    ],
    ids=[
        "bad_from",
        "no_from",
        "ends_with_human",
        "mixed_types",
        "two_completions",
        "empty",
        "two_forms",
    ],
)
def test_bad_trl_and_sharegpt_rows_one_line_errors(tmp_path, rows, message):
    f = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message) as err:
        load_instruction_file(f)
    assert "\n" not in str(err.value) and "line 1" in str(err.value)


def test_column_mapping_for_jsonl_and_csv(tmp_path):
    cols = {"instruction": "question", "output": "answer", "category": "topic"}
    f = _jsonl(
        tmp_path / "q.jsonl",
        [{"question": "Q1?", "answer": "A1", "topic": "t1", "instruction": "ignored"}],
    )
    ex = load_instruction_file(f, test_fraction=0.0, columns=cols)[0]
    assert (ex["instruction"], ex["output"], ex["category"]) == ("Q1?", "A1", "t1")
    g = tmp_path / "q.csv"
    g.write_text("question,answer,topic\nQ2?,A2,t2\n")
    ex = load_instruction_file(g, test_fraction=0.0, columns=cols)[0]
    assert (ex["instruction"], ex["output"], ex["category"]) == ("Q2?", "A2", "t2")
    with pytest.raises(ValueError, match=r"no column 'q' \(for instruction\) named by --data-c"):
        load_instruction_file(g, columns={"output": "answer", "instruction": "q"})
    with pytest.raises(ValueError, match=r"line 1: no column 'x' \(for input\)"):
        load_instruction_file(f, columns={**cols, "input": "x"})
    with pytest.raises(ValueError, match="unknown field 'label'"):
        load_instruction_file(g, columns={"label": "topic"})


def test_files_without_categories_are_marked(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    assert load_instruction_file(f).info["categories"] == "none"
    g = _jsonl(tmp_path / "e.jsonl", [{"instruction": "a", "output": "b", "category": "x"}])
    assert load_instruction_file(g).info["categories"] == "from data"


# ---------------------------------------------------------- local Hugging Face datasets


@pytest.fixture
def hf_rows():
    return {
        "question": [f"What is {i} + {i}?" for i in range(12)],
        "answer": [2 * i for i in range(12)],  # integers: read as their text
        "topic": ["even" if i % 2 == 0 else "odd" for i in range(12)],
    }


HF_COLS = {"instruction": "question", "output": "answer", "category": "topic"}


@pytest.mark.parametrize("kind", ["parquet", "arrow", "json", "save_to_disk", "folder"])
def test_hf_dataset_formats(tmp_path, hf_rows, kind):
    datasets = pytest.importorskip("datasets")
    from fedlora.data import load_hf_dataset

    ds = datasets.Dataset.from_dict(hf_rows)
    if kind == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    elif kind == "json":
        path = tmp_path / "d.json"
        ds.to_json(str(path))
    elif kind == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    elif kind == "folder":
        path = tmp_path / "parts"
        path.mkdir()
        ds.select(range(6)).to_parquet(str(path / "a.parquet"))
        ds.select(range(6, 12)).to_parquet(str(path / "b.parquet"))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    data = load_instructions(path, columns=HF_COLS, cache_dir=tmp_path / "cache")
    got = sorted((ex["instruction"], ex["output"], ex["category"]) for ex in data)
    want = sorted(
        zip(hf_rows["question"], map(str, hf_rows["answer"]), hf_rows["topic"], strict=True)
    )
    assert got == want
    assert data.category_names == ("even", "odd") and data.info["categories"] == "from data"
    # direct call with the same result
    again = load_hf_dataset(path, columns=HF_COLS, cache_dir=tmp_path / "cache")
    assert again.to_dict() == data.to_dict()


def test_hf_dataset_dict_splits_and_data_split(tmp_path, hf_rows):
    datasets = pytest.importorskip("datasets")
    full = datasets.Dataset.from_dict(hf_rows)
    dd = datasets.DatasetDict(
        {"train": full.select(range(9)), "validation": full.select(range(9, 12))}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    data = load_instructions(tmp_path / "dd", columns=HF_COLS)
    assert data.splits.count("train") == 9 and data.splits.count("test") == 3
    assert {ex["instruction"] for ex in data.test} == set(hf_rows["question"][9:])
    one = load_instructions(tmp_path / "dd", split="validation", columns=HF_COLS)
    assert len(one) == 3 and one.info["data_split"] == "validation"
    with pytest.raises(ValueError, match=r"has no split 'dev' \(--data-split\); its splits are"):
        load_instructions(tmp_path / "dd", split="dev", columns=HF_COLS)
    three = datasets.DatasetDict({"a": full, "b": full, "c": full})
    three.save_to_disk(str(tmp_path / "three"))
    with pytest.raises(ValueError, match="choose one with --data-split"):
        load_instructions(tmp_path / "three", columns=HF_COLS)


def test_hf_dataset_bad_columns_one_line(tmp_path, hf_rows):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(hf_rows).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(ValueError, match=r"no column 'reply' \(for output\)") as err:
        load_instructions(tmp_path / "s", columns={"instruction": "question", "output": "reply"})
    assert "\n" not in str(err.value) and "'question', 'answer', 'topic'" in str(err.value)
    with pytest.raises(ValueError, match="expected the keys instruction and output"):
        load_instructions(tmp_path / "s")  # no mapping: no form fits
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither a saved dataset"):
        load_instructions(empty)


def test_data_split_and_columns_refused_for_generated_sets():
    with pytest.raises(ValueError, match="--data-split applies to files and datasets"):
        load_instructions("arithmetic", split="train")
    with pytest.raises(ValueError, match="--data-columns applies"):
        load_instructions("arithmetic", columns={"output": "x"})


# ------------------------------------------------------------------------ reasoning-gym


def test_reasoning_gym_families_are_categories_and_verifiers_score(tmp_path):
    pytest.importorskip("reasoning_gym")
    from fedlora.data import build_reasoning_gym

    spec = "reasoning_gym:gsm_symbolic,chain_sum,letter_counting"
    data = build_reasoning_gym(spec, per_task=15)
    assert data.category_names == ("gsm_symbolic", "chain_sum", "letter_counting")
    counts = data.category_counts()
    assert all(n > 0 for n in counts.values()) and sum(counts.values()) == len(data)
    assert set(data.splits) == {"train", "test"}
    # each example's own answer passes its family's verifier, a wrong one does not
    for ex in data.test:
        assert data.test.scorer(ex["output"], ex) == 1.0
        assert data.test.scorer(ex["output"] + "1", ex) < 1.0
    # seeded and stable
    again = build_reasoning_gym(spec, per_task=15)
    assert again.to_dict() == data.to_dict()
    assert build_reasoning_gym(spec, per_task=15, seed=1).to_dict() != data.to_dict()
    assert load_instructions("reasoning_gym:chain_sum").category_names == ("chain_sum",)


def test_reasoning_gym_scores_through_the_sft_scoring():
    pytest.importorskip("reasoning_gym")
    from fedlora.data import build_reasoning_gym
    from fedlora.simulate.tasks.scoring import score_answers

    test = build_reasoning_gym("reasoning_gym:chain_sum", per_task=10).test
    examples = list(test.examples)
    right = [ex["output"] for ex in examples]
    wrong = [f"{int(ex['output']) + 1}" for ex in examples]
    refs = right
    assert score_answers(right, refs, scorer=test.scorer, examples=examples)["exact_match"] == 1.0
    assert score_answers(wrong, refs, scorer=test.scorer, examples=examples)["exact_match"] == 0.0
    with pytest.raises(ValueError, match="a scorer needs the examples"):
        score_answers(right, refs, scorer=test.scorer)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("reasoning_gym:gsm_symbolik", "unknown reasoning-gym task 'gsm_symbolik'; valid names "
         "include gsm_symbolic"),
        ("reasoning_gym:", "names no task"),
        ("reasoning_gym:chain_sum,chain_sum", "names chain_sum more than once"),
    ],
)  # fmt: skip
def test_reasoning_gym_bad_specs(spec, message):
    pytest.importorskip("reasoning_gym")
    from fedlora.data import reasoning_gym_tasks

    with pytest.raises(ValueError, match=message):
        reasoning_gym_tasks(spec)


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    from fedlora.simulate.config import ConfigError, SimConfig

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    monkeypatch.setitem(sys.modules, "reasoning_gym.factory", None)
    with pytest.raises(ConfigError, match=r"fedlora-kernels\[reasoning\]"):
        SimConfig(task="sft", data="reasoning_gym:chain_sum").validate()
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"fedlora-kernels\[datasets\]"):
        load_instructions(tmp_path / "d.parquet")
