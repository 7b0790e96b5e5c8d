"""Configuration files (``--config run.toml``) for ``fedlora simulate`` and ``fedlora compare``.

A configuration file is TOML (read with the standard library's :mod:`tomllib`) whose top-level
keys are the command's long options without the dashes, spelled as on the command line
(``local-steps = 4``) or with underscores (``local_steps = 4``)::

    task = "sft"
    data = "train.jsonl"
    rounds = 3
    local-steps = 4
    lr = 2e-4
    target-modules = ["q_proj", "v_proj"]      # or "q_proj,v_proj", as on the command line
    data-columns = { instruction = "question", output = "answer" }
    system-prompt = "You are a helpful assistant."

The command line overrides the file (an option typed on the command line wins, whatever its
value); the file overrides the built-in defaults. Values have the option's type: integers for
counts, numbers for rates, ``true``/``false`` for switches, strings otherwise; options that take
a comma list on the command line (``target-modules``, ``methods``, ``seeds``, ``lr-grid``) also
take a TOML array, and ``data-columns`` an inline table. An unknown key, a key given twice
(``local-steps`` and ``local_steps``), a value of the wrong type, a value outside an option's
choices and a file that is not TOML are one-line :class:`ConfigError` naming the key.

`toml_dumps` writes the small TOML subset these files need (strings, numbers, booleans,
arrays, inline tables; None as a commented line), used by ``--print-config`` and for the
``config.toml`` every run writes into its folder (`config_toml`: the resolved
:class:`SimConfig`, which ``--config`` reads back into the same configuration).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import textwrap
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedlora.simulate.config import ConfigError, SimConfig

#: Options that never come from a file (they are about the file itself, or print help).
NOT_IN_FILES = frozenset({"help", "config", "print_config"})
#: Options whose command-line value is a comma list; a file may give a TOML array instead.
LIST_OPTIONS = frozenset({"target_modules", "methods", "seeds", "lr_grid", "data_columns"})
#: Options whose command-line value is ``key=value,...``; a file may give an inline table.
TABLE_OPTIONS = frozenset({"data_columns"})
#: The file a run writes into its folder: its resolved configuration.
CONFIG_TOML = "config.toml"

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


# ------------------------------------------------------------------------------- reading


def read_toml(path: str | Path) -> dict[str, Any]:
    """The table of a TOML file; one-line :class:`ConfigError` naming ``--config`` when it
    cannot be read or is not TOML."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"--config {str(path)!r} is a folder, expected a TOML file") from None
    except FileNotFoundError:
        raise ConfigError(f"--config {str(path)!r} does not exist") from None
    except OSError as err:
        raise ConfigError(f"--config {str(path)!r}: cannot read it ({err.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"--config {str(path)!r} is not UTF-8 text (expected TOML)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {str(path)!r} is not valid TOML ({err})") from None


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options a file may set: ``{name: action}`` for every long option but
    `NOT_IN_FILES`, ``name`` the long option's spelling with underscores (``local_steps``; a
    method option's flag, e.g. ``prelort_training``, whatever its destination)."""
    actions = {}
    for action in parser._actions:  # argparse offers no public listing
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs:
            continue
        if action.dest in NOT_IN_FILES or action.dest == argparse.SUPPRESS:
            continue
        actions[longs[0][2:].replace("-", "_")] = action
    return actions


def _is_list(action: argparse.Action) -> bool:
    """Options whose command-line value is a comma list (a file may give an array)."""
    return action.dest in LIST_OPTIONS or action.metavar == "N,N,..."


def _key_name(dest: str) -> str:
    return dest.replace("_", "-")


def _type_name(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "true or false"
    if action.type is int:
        return "an integer"
    if action.type is float:
        return "a number"
    if action.dest in TABLE_OPTIONS:
        return "a string 'key=column,...' or a table"
    if _is_list(action):
        return "a string or an array"
    return "a string"


def _scalar_text(value: Any) -> str | None:
    """A list item as the command line would spell it (None when it is not a scalar)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    return value if isinstance(value, str) else repr(value)


def file_value(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """``value`` from a file converted to what argparse would have stored for ``action``;
    :class:`ConfigError` naming ``key`` when its type is wrong."""
    dest = action.dest

    def wrong() -> ConfigError:
        return ConfigError(
            f"{where}: {key} must be {_type_name(action)}, got {type(value).__name__} {value!r}"
        )

    if action.nargs == 0:  # store_true switches
        if not isinstance(value, bool):
            raise wrong()
        return value
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        out: Any = value
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        out = float(value)
    elif dest in TABLE_OPTIONS and isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(v, str):
                raise ConfigError(f"{where}: {key}.{k} must be a string (a column name), got {v!r}")
            items.append(f"{k}={v}")
        out = ",".join(items)
    elif action.nargs == "?" and action.const == "true" and isinstance(value, bool):
        out = "true" if value else "false"  # a method's on/off option
    elif _is_list(action) and isinstance(value, list):
        texts = [_scalar_text(v) for v in value]
        if any(t is None for t in texts):
            raise wrong()
        out = ",".join(str(t) for t in texts)
    elif dest == "seeds" and isinstance(value, int) and not isinstance(value, bool):
        out = str(value)  # a count, as on the command line
    elif isinstance(value, str):
        out = value
    else:
        raise wrong()
    if action.choices is not None and out not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise ConfigError(f"{where}: {key} must be one of {choices}; got {value!r}")
    return out


def file_defaults(
    values: Mapping[str, Any], parser: argparse.ArgumentParser, where: str
) -> dict[str, Any]:
    """``{dest: value}`` for the keys of a configuration file, checked against ``parser``'s
    options (unknown keys, keys given twice, wrong types: :class:`ConfigError` naming the key)."""
    actions = option_actions(parser)
    out: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        action = actions.get(name)
        if action is None:
            hint = (
                "; it is a table, but options are top-level keys"
                if isinstance(value, Mapping)
                else ""
            )
            raise ConfigError(
                f"{where}: unknown key {key!r}{hint} (keys are the long options of "
                f"`{parser.prog}`, e.g. local-steps; see {parser.prog} --print-config)"
            )
        dest = action.dest
        if dest in seen:
            raise ConfigError(f"{where}: {key!r} and {seen[dest]!r} set the same option")
        seen[dest] = key
        out[dest] = file_value(action, key, value, where)
    return out


# ------------------------------------------------------------------------------- writing


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_value(key)


def toml_value(value: Any) -> str:
    """One TOML value: str, bool, int, float (inf and nan too), list or mapping of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        # a JSON string is a TOML basic string, but for DEL, which TOML wants escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def toml_dumps(
    items: Iterable[tuple[str, Any]] | Mapping[str, Any],
    *,
    comments: Mapping[str, str] | None = None,
    header: str | None = None,
) -> str:
    """Flat TOML text of ``items`` (key, value): one ``key = value`` line each, a None value
    as a commented ``# key = `` line, an optional ``# comment`` line above each key and a
    ``# header`` at the top."""
    pairs = items.items() if isinstance(items, Mapping) else items
    lines = [f"# {line}".rstrip() for line in header.splitlines()] + [""] if header else []
    for key, value in pairs:
        note = (comments or {}).get(key)
        if note:
            lines += [f"# {line}" for line in textwrap.wrap(" ".join(note.split()), 94)]
        if value is None:
            lines.append(f"# {_toml_key(key)} =")
        else:
            lines.append(f"{_toml_key(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def config_toml(cfg: SimConfig) -> str:
    """The resolved configuration of a run as TOML, readable back with ``--config`` (keys
    spelled as the command's long options; None fields commented out)."""
    from fedlora.methods import option_owners

    owners = option_owners()
    items = [
        (_key_name(f.name), getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
        if f.name != "method_options"
        # a method option kept as a config field (heads, hafl-mode...): only for its methods
        and (f.name not in owners or cfg.method in owners[f.name][1])
    ]
    for name, value in sorted(cfg.method_options.items()):  # each under its own flag
        flag = owners[name][0].flag if name in owners else f"--{_key_name(name)}"
        items.append((flag[2:], list(value) if isinstance(value, tuple) else value))
    return toml_dumps(
        items,
        header="The resolved configuration of this run (fedlora simulate --config this-file "
        "runs it again).",
    )


def _help_text(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        try:
            text = text % {"default": action.default, "prog": "", "dest": action.dest}
        except (KeyError, ValueError, TypeError):
            pass
    return text


def print_config_text(
    parser: argparse.ArgumentParser, values: Mapping[str, Any], header: str
) -> str:
    """A complete configuration file for ``parser``'s command: every option with its value in
    ``values`` (the defaults, or the resolved options), its help text as a comment, None
    values commented out."""
    items, comments = [], {}
    for name, action in option_actions(parser).items():
        key, dest = _key_name(name), action.dest
        value = values.get(dest, action.default)
        if dest in TABLE_OPTIONS and isinstance(value, str):
            value = _table(value)
        items.append((key, value))
        comments[key] = _help_text(action)
    return toml_dumps(items, comments=comments, header=header)


def _table(text: str) -> dict[str, str] | str:
    """``"a=b,c=d"`` as a table (the text itself when it does not parse)."""
    out = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep:
            return text
        out[k.strip()] = v.strip()
    return out
