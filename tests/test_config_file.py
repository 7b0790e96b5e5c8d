"""Configuration files: ``--config run.toml``, ``--print-config`` and the run folder's
config.toml (fedlora.simulate.config_file and the CLI's plumbing)."""

from __future__ import annotations

import dataclasses
import math
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.cli import _config, _parse, build_parser, main
from fedlora.simulate.config import SimConfig
from fedlora.simulate.config_file import config_toml, toml_dumps, toml_value


def resolved(argv: list[str]) -> SimConfig:
    """The SimConfig ``fedlora simulate argv`` would run, without running it."""
    args = _parse(build_parser(), ["simulate", *argv])
    return _config(args, args.method)


def write(tmp_path, text: str, name: str = "run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(capsys, argv: list[str], *words: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


# ------------------------------------------------------------------------- reading a file


def test_file_values_are_used_with_both_spellings(tmp_path):
    f = write(
        tmp_path,
        'task = "sft"\nlocal-steps = 3\nbatch_size = 5\nlr = 2e-4\nrounds = 7\n'
        'target-modules = ["q_proj", "v_proj"]\nsystem-prompt = "Be brief."\n'
        'data-columns = { instruction = "question", output = "answer" }\n'
        "dirichlet-alpha = inf\nclients-per-round = 2\nno-progress = true\n",
    )
    cfg = resolved(["--config", str(f)])
    assert (cfg.task, cfg.local_steps, cfg.batch_size, cfg.rounds) == ("sft", 3, 5, 7)
    assert cfg.lr == 2e-4 and math.isinf(cfg.dirichlet_alpha)
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.system_prompt == "Be brief."
    assert cfg.data_columns == {"instruction": "question", "output": "answer"}
    assert cfg.clients_per_round == 2
    # untouched options keep their defaults
    assert cfg.rank == SimConfig().rank and cfg.seed == SimConfig().seed


def test_the_command_line_overrides_the_file_even_with_the_default_value(tmp_path):
    f = write(tmp_path, "rounds = 7\nlocal-steps = 3\nseed = 4\nengine = 'sequential'\n")
    default = SimConfig()
    # --rounds 5 is argparse's default: typed on the command line, it still wins over the file
    cfg = resolved(["--config", str(f), "--rounds", str(default.rounds), "--seed=9"])
    assert cfg.rounds == default.rounds and cfg.seed == 9
    assert cfg.local_steps == 3 and cfg.engine == "sequential"  # from the file
    # the order of --config among the options does not matter
    assert resolved(["--seed", "9", "--rounds", "5", "--config", str(f)]) == cfg


def test_without_a_file_the_defaults_are_unchanged():
    assert resolved([]) == SimConfig().validate()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("rounds = [1\n", ("--config", "is not valid TOML")),
        ("local-stpes = 4\n", ("unknown key 'local-stpes'", "--print-config")),
        ("[simulate]\nrounds = 2\n", ("unknown key 'simulate'", "table")),
        ('rounds = "5"\n', ("rounds must be an integer", "str")),
        ("rounds = 2.5\n", ("rounds must be an integer",)),
        ("lr = true\n", ("lr must be a number",)),
        ("no-progress = 1\n", ("no-progress must be true or false",)),
        ("task = 3\n", ("task must be a string",)),
        ('task = "bogus"\n', ("task must be one of classify, sft",)),
        ("local-steps = 2\nlocal_steps = 3\n", ("'local_steps' and 'local-steps'",)),
        ("config = 'other.toml'\n", ("unknown key 'config'",)),
        ("target-modules = [1.5, true]\n", ("target-modules must be a string or an array",)),
        ("data-columns = { instruction = 3 }\n", ("data-columns.instruction must be a string",)),
        ("rounds = 0\n", ("--rounds must be a positive integer",)),  # SimConfig's own check
    ],
)
def test_bad_files_are_one_line_errors_naming_the_key(tmp_path, capsys, text, words):
    f = write(tmp_path, text)
    out = tmp_path / "out"
    refused(capsys, ["simulate", "--config", str(f), "--out", str(out)], *words)
    assert not out.exists()


def test_a_file_that_is_not_a_file_or_not_utf8(tmp_path, capsys):
    refused(capsys, ["simulate", "--config", str(tmp_path / "none.toml")], "does not exist")
    refused(capsys, ["simulate", "--config", str(tmp_path)], "is a folder")
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"rounds = 2\n\xff\xfe\n")
    refused(capsys, ["simulate", "--config", str(bad)], "not UTF-8")


def test_compare_reads_its_own_options_from_the_file(tmp_path):
    f = write(
        tmp_path,
        'methods = ["fedit", "ffa"]\nseeds = [0, 1, 2]\nlr-grid = [1e-3, 3e-3, 1e-2, 3e-2]\n'
        'baseline = "fedit"\nval-fraction = 0.2\nrounds = 2\n',
    )
    args = _parse(build_parser(), ["compare", "--config", str(f), "--rounds", "3"])
    assert args.methods == "fedit,ffa" and args.seeds == "0,1,2"
    assert args.lr_grid == "0.001,0.003,0.01,0.03" and args.baseline == "fedit"
    assert args.val_fraction == 0.2 and args.rounds == 3
    # a count of seeds, as on the command line
    g = write(tmp_path, "methods = 'fedit'\nseeds = 3\n", "count.toml")
    assert _parse(build_parser(), ["compare", "--config", str(g)]).seeds == "3"


def test_compare_needs_methods_somewhere(tmp_path, capsys):
    refused(capsys, ["compare", "--out", str(tmp_path / "o")], "--methods is required")
    f = write(tmp_path, "method-s = 'fedit'\n")
    refused(capsys, ["compare", "--config", str(f)], "unknown key 'method-s'")


# ------------------------------------------------------------------------- --print-config


@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_print_config_is_a_complete_file_that_reads_back(tmp_path, capsys, command):
    assert main([command, "--print-config"]) == 0
    text = capsys.readouterr().out
    values = tomllib.loads(text)
    parser = build_parser()
    args = _parse(parser, [command])
    actions = [
        a
        for a in parser._subparsers._group_actions[0].choices[command]._actions
        if a.option_strings and a.dest not in ("help", "config", "print_config")
    ]
    # a key is the long option's spelling (a method option's flag, whatever its destination)
    key_of = {a.dest: next(o for o in a.option_strings if o.startswith("--"))[2:] for a in actions}
    dests = set(key_of)
    unset = {d for d in dests if getattr(args, d) is None}
    # every option is a key (None ones commented out: "# key =")
    assert set(values) == {key_of[d] for d in dests - unset}
    for d in unset:
        assert f"# {key_of[d]} =" in text
    dest_of = {k: d for d, k in key_of.items()}
    for k, v in values.items():
        assert v == getattr(args, dest_of[k]), k
    # fed back, it gives the defaults again
    f = write(tmp_path, text)
    again = _parse(build_parser(), [command, "--config", str(f)])
    assert {d: getattr(again, d) for d in dests} == {d: getattr(args, d) for d in dests}


def test_print_config_shows_the_resolved_options(tmp_path, capsys):
    f = write(tmp_path, "rounds = 9\nlocal-steps = 2\n")
    argv = ["simulate", "--config", str(f), "--local-steps", "6", "--print-config"]
    assert main(argv) == 0
    values = tomllib.loads(capsys.readouterr().out)
    assert values["rounds"] == 9 and values["local-steps"] == 6


# --------------------------------------------------------------------- the run's config.toml


def test_config_toml_reads_back_into_the_same_config(tmp_path):
    cfg = SimConfig(
        task="sft",
        rounds=3,
        lr=3e-4,
        dirichlet_alpha=math.inf,
        target_modules=["q_proj", "o_proj"],
        system_prompt='Say "yes".\n\tThen stop. \u00e9\x7f',
        data_columns={"instruction": "question", "output": "answer", "category": "topic"},
        max_train_per_client=7,
    ).validate()
    f = write(tmp_path, config_toml(cfg), "config.toml")
    assert resolved(["--config", str(f)]) == cfg
    assert resolved(["--config", str(f)]).fingerprint() == cfg.fingerprint()


@pytest.mark.parametrize(
    "method, extra",
    [
        (
            "prelort",
            {"method_options": {"prelort_training": "sampled", "prelort_truncations": (2, 4)}},
        ),
        ("ravan", {"heads": 2, "head_score": "random"}),
        ("hafl", {"hafl_mode": "truncate", "hafl_score_steps": 0}),
    ],
)
def test_method_options_read_back_under_their_own_flags(tmp_path, method, extra):
    """A run's config.toml names each method option by its flag (prelort-training = ...) and
    leaves out the options its method does not take, so --config gives the same config."""
    cfg = SimConfig(method=method, rank=8, **extra).validate()
    text = config_toml(cfg)
    assert ("heads =" in text) == (method == "ravan")
    f = write(tmp_path, text, "config.toml")
    assert resolved(["--config", str(f)]) == cfg


def test_every_run_writes_its_resolved_config(tmp_path):
    from fedlora.simulate.outputs import write_reports

    cfg = SimConfig(rounds=2, clients=3, seed=5).validate()  # lr etc. resolved from the task
    write_reports(tmp_path, cfg, [], plot=False)
    text = (tmp_path / "config.toml").read_text()
    assert "lr = 0.005" in text and "# model =" in text
    assert resolved(["--config", str(tmp_path / "config.toml")]) == cfg


def test_new_fields_keep_old_checkpoints_resumable():
    """system_prompt, data_split and data_columns at their defaults leave the fingerprint as it
    was before they existed; set, they change it."""
    cfg = SimConfig(task="sft")
    data = json_of(cfg)
    assert not {"system_prompt", "data_split", "data_columns"} & set(data)
    changed = dataclasses.replace(cfg, system_prompt="Be brief.")
    assert changed.fingerprint() != cfg.fingerprint()


def json_of(cfg: SimConfig) -> dict:
    import json

    return json.loads(cfg.fingerprint())


# ---------------------------------------------------------------------------- the writer

_scalars = (
    st.text(max_size=30)
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        _scalars | st.lists(_scalars, max_size=4) | st.dictionaries(st.text(max_size=6), _scalars),
        max_size=6,
    )
)
def test_toml_writer_round_trips_through_tomllib(values):
    assert tomllib.loads(toml_dumps(values)) == values


def test_toml_writer_nan_none_and_comments():
    text = toml_dumps([("a", math.nan), ("b", None)], comments={"a": "first\nline"}, header="h")
    assert text.splitlines() == ["# h", "", "# first line", "a = nan", "# b ="]
    assert math.isnan(tomllib.loads(text)["a"])
    with pytest.raises(TypeError, match="cannot write"):
        toml_value(object())


def test_compare_passes_its_resolved_options_to_config_toml(tmp_path, monkeypatch):
    from fedlora.simulate import compare as compare_mod

    got = {}

    def fake_compare(configs, out, **kw):
        got.update(kw, configs=configs)
        return []

    monkeypatch.setattr(compare_mod, "compare", fake_compare)
    f = write(tmp_path, 'methods = ["fedit", "ffa"]\nseeds = [3, 4]\nrounds = 2\n')
    assert main(["compare", "--config", str(f), "--out", str(tmp_path / "o"), "--rank", "4"]) == 0
    values = tomllib.loads(got["config_text"])
    assert values["methods"] == "fedit,ffa" and values["seeds"] == "3,4"
    assert values["rounds"] == 2 and values["rank"] == 4
    assert [c.method for c in got["configs"]] == ["fedit", "ffa"]
    assert got["spec"].seeds == (3, 4)
    # read back, the written file gives the same options
    g = write(tmp_path, got["config_text"], "again.toml")
    again = _parse(build_parser(), ["compare", "--config", str(g)])
    assert (again.methods, again.seeds, again.rounds, again.rank) == ("fedit,ffa", "3,4", 2, 4)
