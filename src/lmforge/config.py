"""Recipes: YAML + `key.path=value` overrides -> a tree of typed dataclasses.

Every stage declares its recipe as a small tree of dataclasses (defaults live only there) and
calls :func:`load`. Parsing is strict: unknown keys (with a "did you mean" suggestion), values of
the wrong type and cross-field rules (each dataclass may define ``problems() -> list[str]``) are
all collected and raised together as one :class:`ConfigError`, which the CLI prints as plain lines
on stderr with exit code 2.

Field help comes from ``field(metadata={"help": ...})`` and is shown by ``lmforge <stage> --help``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class UserError(Exception):
    """A mistake in the user's input: printed as one-line messages, exit code 2, no traceback."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(UserError):
    """One or more problems in a recipe (all of them, not just the first)."""


def help_field(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with a help text. Mutable defaults are given as a factory."""
    if default is not dataclasses.MISSING and isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def nested(cls: type) -> Any:
    """A sub-section field (e.g. ``optim: OptimConfig = nested(OptimConfig)``)."""
    return dataclasses.field(default_factory=cls)


# --------------------------------------------------------------------------------------------
# Common top-level keys of every stage's recipe


@dataclasses.dataclass
class RunConfig:
    """Keys every stage's recipe has at the top level."""

    stage: str = help_field("", help="Which stage this recipe is for (pretrain, data, finetune, ...).")
    output_dir: str = help_field("", help="Where the run writes everything (required).")
    seed: int = help_field(42, help="Seed for Python, NumPy and torch RNGs; same seed on CPU = same run.")
    resume: str = help_field(
        "none", help="'none', 'auto' (continue from the newest checkpoint in output_dir) or a checkpoint path."
    )
    overwrite: bool = help_field(False, help="Allow writing into a non-empty output_dir (its contents are deleted).")

    def problems(self) -> list[str]:
        out = []
        if not self.output_dir or self.output_dir in ("None", "null"):
            out.append("output_dir: required; set it in the recipe or pass output_dir=PATH")
        elif Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            out.append(f"output_dir: '{self.output_dir}' is a file, not a folder; choose another output_dir")
        if not 0 <= self.seed < 2**32:
            out.append(f"seed: {self.seed} is outside 0 .. 2**32-1 (what NumPy and torch accept); choose a smaller seed")
        if self.resume not in ("none", "auto") and not Path(self.resume).is_dir():
            out.append(f"resume: '{self.resume}' is neither 'none', 'auto' nor an existing checkpoint folder")
        return out


# --------------------------------------------------------------------------------------------
# Type coercion


def field_defaults(cls: type) -> dict[str, Any]:
    """{field name: default} of a dataclass (factories called)."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


def only_for(obj: Any, choice: str, readers: dict[str, tuple[str, ...]], what: str) -> list[str]:
    """Problems for keys set away from their default although the current ``choice`` does not read them.

    ``readers`` maps a key to the choices that read it; a key set for another choice is an error, not a
    silent no-op: "power: only read by schedule polynomial, not 'cosine'; remove it"."""
    defaults = field_defaults(type(obj))
    return [f"{key}: only read by {what} {' / '.join(users)}, not '{choice}'; remove it"
            for key, users in readers.items() if choice not in users and getattr(obj, key) != defaults[key]]


def missing_files(key: str, patterns: list[str]) -> list[str]:
    """One problem per file pattern (a path or a glob) that matches nothing."""
    import glob

    return [f"{key}: '{p}' matches no file; check the path (relative to where you run lmforge)"
            for p in patterns if not glob.glob(p)]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Bad(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Return ``value`` converted to ``tp``; raise _Bad with a message when it cannot be."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, problems)
            except _Bad:
                continue
        raise _Bad(f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise _Bad(f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}")
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if isinstance(value, str):  # `key=a,b,c` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, key, problems) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Bad(f"expected a mapping, got {value!r}")
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, v_tp, key, problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Bad(f"expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key + ".", problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise _Bad(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise _Bad(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise _Bad(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise _Bad(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _Bad(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise _Bad(f"expected a string, got {value!r}")
        return str(value)
    raise _Bad(f"unsupported field type {tp!r}")  # a bug in a schema, not the user's fault


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _build(cls: type, raw: dict, prefix: str, problems: list[str]) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key{_suggest(str(key), cls, prefix)}")
            continue
        try:
            kwargs[key] = _coerce(value, hints[key], prefix + key, problems)
        except _Bad as e:
            problems.append(f"{prefix}{key}: {e}")
    for name, f in fields.items():
        if name in kwargs:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, prefix + name + ".", problems)
            else:
                problems.append(f"{prefix}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable when a required key was missing (already reported)
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {e}")
        return None


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key path of a schema (used for suggestions and --help)."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            out.extend(all_keys(tp, prefix + f.name + "."))
    return out


_current_root: list[type] = []  # the schema being parsed by from_dict (for cross-section hints)


def _suggest(key: str, cls: type, prefix: str) -> str:
    local = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, local, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    root = _current_root[-1] if _current_root else None
    if root is not None:  # a key put in the wrong section: look across the whole schema
        full = all_keys(root)
        leaf = [k for k in full if k.rsplit(".", 1)[-1] == key]
        if leaf:
            return f"; did you mean '{leaf[0]}'?"
    return f"; valid keys here: {', '.join(local)}"


def _walk_problems(obj: Any, prefix: str, problems: list[str]) -> None:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _walk_problems(child, prefix + f.name + ".", problems)
    check = getattr(obj, "problems", None)
    if callable(check):
        for p in check():
            problems.append(prefix + p)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.learning_rate=3e-4' -> (['optim', 'learning_rate'], '3e-4' parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.path=value (e.g. optim.learning_rate=3e-4)")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key '{key}' appears twice in one mapping (lines {seen[key]} and {line}); "
                                    "keep one, since YAML would silently use the last")
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: recipe file not found; check the path (recipes live under recipes/)")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)  # safe_load, duplicates refused
    except _DuplicateKey as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text; save the recipe as UTF-8") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of keys at the top level")
    return data


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return raw


T = typing.TypeVar("T")


def from_dict(cls: type[T], raw: dict, source: str = "recipe") -> T:
    """Build and validate ``cls`` from a plain mapping; raise ConfigError with every problem."""
    problems: list[str] = []
    _current_root.append(cls)
    try:
        cfg = _build(cls, raw, "", problems)
    finally:
        _current_root.pop()
    if cfg is not None:  # cross-field rules too, so every problem is reported in one go
        _walk_problems(cfg, "", problems)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return cfg


def load(cls: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """Load a recipe file (or nothing) plus overrides into ``cls``."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    cfg = from_dict(cls, raw, source=str(path) if path is not None else "overrides")
    expected = getattr(cls, "STAGE", None)
    if expected and getattr(cfg, "stage", "") not in ("", expected):
        raise ConfigError(
            f"{path}: stage: this recipe is for '{cfg.stage}', not '{expected}'; run `lmforge {cfg.stage} {path}`"
        )
    if expected and hasattr(cfg, "stage"):
        cfg.stage = expected
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved recipe (every key, defaults included) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def describe(cls: type, prefix: str = "") -> list[str]:
    """Lines of `key (type, default): help` for --help."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:")
            lines.extend(describe(tp, prefix + f.name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        help_text = f.metadata.get("help", "")
        lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {default!r}): {help_text}")
    return lines
