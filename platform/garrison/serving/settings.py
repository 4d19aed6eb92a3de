"""One typed builder: settings from YAML, checked against the annotated fields of their dataclasses.

The checks come from each field's type, so a new setting needs no check of its own:
- `int`: an integer (never a bool), a count or size, so >= 1 unless the field's metadata says `min`;
- `float`: a finite number, >= 0 unless `min` says otherwise; `bool`; `str`: non-empty text;
- `Path`: a path, relative to the config file's folder; `torch.dtype`: by name (float32, bfloat16, float16);
- `Literal[...]`: one of its values; `X | None`: X or null; `tuple[X, ...]`: a non-empty list of X;
- a dataclass: a mapping of its own settings, built the same way.
Field metadata may narrow this: `min`, `max`, `min_len` (lists), `ref` (a model reference: a path-like
value is made relative to the config file's folder, a bare name is left alone), `url` (shown with its
password hidden in every message).

Every problem is collected with its place (`config.models[1].groups[0].tp: must be an integer >= 1,
got '2'`). Rules that involve several settings (unique names, a listen address and TLS) are a class's
`relations(values)`, a static method that answers Problems placed relative to the object; it is given
every setting, with INVALID in place of one that failed its own check, and judges what it can, so a file
with many mistakes gets them all reported at once. `self_check(obj)` runs both kinds of check for a
dataclass's `__post_init__`, so a configuration built in code is held to the same rules.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

import torch

from garrison.model_refs import is_path_ref
from garrison.tenancy.store import redact_url
from garrison_workers.engine.config import MODEL_DTYPES
from garrison_workers.errors import GarrisonError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
INT_MAX = 2**63 - 1  # every integer setting ends up in C (torch, gRPC, SQL)


@dataclass(frozen=True, slots=True)
class Problem:
    place: str  # e.g. config.models[1].groups[0].tp
    message: str

    def __str__(self) -> str:
        return f"{self.place}: {self.message}" if self.place else self.message

    def under(self, prefix: str) -> Problem:
        return Problem(f"{prefix}.{self.place}" if self.place else prefix, self.message)

    def to_json(self) -> dict[str, str]:
        return {"place": self.place, "message": self.message}


class ConfigError(GarrisonError):
    """The serve configuration is invalid; `problems` holds every problem found, each with its place."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems) or (Problem("config", message),)

    @classmethod
    def listing(cls, problems: Sequence[Problem], what: str = "the configuration") -> ConfigError:
        shown = "\n  ".join(map(str, problems))
        return cls(f"{what} has {len(problems)} problem(s):\n  {shown}", problems)


class _Invalid:
    """Stands in for a setting that failed its own check (its problem is already recorded)."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()


def self_check(obj: Any) -> None:
    """For `__post_init__`: every field against its type, then the class's relations; ConfigError lists all."""
    problems = check_fields(obj)
    relations = getattr(type(obj), "relations", None)
    if not problems and relations is not None:
        problems = relations({f.name: getattr(obj, f.name) for f in fields(obj)})
    if problems:
        raise ConfigError.listing(problems)


def check_fields(obj: Any) -> list[Problem]:
    """Each field of a built dataclass checked against its annotation (construction in code, not YAML)."""
    hints = typing.get_type_hints(type(obj))
    return [Problem(f.name, problem) for f in fields(obj)
            if (problem := value_problem(getattr(obj, f.name), hints[f.name], f.metadata)) is not None]


def value_problem(value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> str | None:
    """What is wrong with `value` as a `hint` (None: nothing), as 'must be ..., got ...'."""
    if _fits(value, hint, meta):
        return None
    return f"must be {expectation(hint, meta)}, got {shown(value, meta)}"


def _fits(value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg, meta) for arg in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) >= meta.get("min_len", 1) and all(
            _fits(item, args[0], {}) for item in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and _in_range(value, meta, 1, INT_MAX)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and _in_range(value, meta, 0.0, None)
    if hint is str:
        return isinstance(value, str) and len(value) >= meta.get("min_len", 1)
    return isinstance(value, hint)


def _in_range(value: float, meta: typing.Mapping[str, Any], low: float, high: float | None) -> bool:
    low, high = meta.get("min", low), meta.get("max", high)
    return value >= low and (high is None or value <= high)


def dtype_names(meta: typing.Mapping[str, Any]) -> list[str]:
    """The names a dtype setting takes: its field's metadata `dtypes`, else a model's dtypes."""
    allowed = meta.get("dtypes", MODEL_DTYPES)
    return [name for name, dtype in DTYPES.items() if dtype in allowed]


def expectation(hint: Any, meta: typing.Mapping[str, Any]) -> str:
    """What a setting of this type must be, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(expectation(arg, meta) for arg in args)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return str(args[0]) if len(args) == 1 else "one of " + ", ".join(map(str, args))
    if origin is tuple:
        return "a non-empty list" if meta.get("min_len", 1) == 1 else f"a list of at least {meta['min_len']} items"
    if hint is int or hint is float:
        return ("an integer" if hint is int else "a finite number") + _range_words(hint, meta)
    names = {bool: "true or false", str: "non-empty text", Path: "a path",
             torch.dtype: "one of " + ", ".join(dtype_names(meta))}
    return names.get(hint) or ("a mapping of settings" if is_dataclass(hint) else hint.__name__)


def _range_words(hint: type, meta: typing.Mapping[str, Any]) -> str:
    low = meta.get("min", 1 if hint is int else 0)
    high = meta.get("max", INT_MAX if hint is int else None)
    if high is None or (hint is int and high == INT_MAX):
        return f" >= {low}"
    return f" from {low} to {high}"


def shown(value: Any, meta: typing.Mapping[str, Any] | None = None) -> str:
    """A value as a message shows it: YAML's words, never a password, never a page of text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, str) and meta and meta.get("url"):
        value = redact_url(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown setting (did you mean {close[0]}?)" if close else f"unknown setting; known: {', '.join(known)}"


class Builder:
    """Builds one dataclass tree from parsed YAML, collecting every problem instead of stopping at the first."""

    def __init__(self, base: Path) -> None:
        self.base = base  # relative paths in the file are relative to its folder
        self.problems: list[Problem] = []

    def build(self, cls: type, raw: Any, where: str) -> Any | None:
        if not isinstance(raw, dict):
            self.problems.append(Problem(where, f"must be {expectation(cls, {})}, got {shown(raw)}"))
            return None
        before = len(self.problems)
        known = {f.name: f for f in fields(cls) if f.init}
        for key in raw:
            if key not in known:
                self.problems.append(Problem(f"{where}.{key}", _unknown(str(key), sorted(known))))
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name in raw:
                values[name] = self.value(raw[name], hints[name], f.metadata, f"{where}.{name}")
            elif f.default is not MISSING or f.default_factory is not MISSING:
                values[name] = f.default if f.default is not MISSING else f.default_factory()
            else:
                self.problems.append(Problem(f"{where}.{name}", "is required"))
                values[name] = INVALID
        if len(self.problems) == before:
            return self._construct(cls, values, where)
        relations = getattr(cls, "relations", None)
        if relations is not None:  # the rules between the settings that are valid still apply
            self.problems += [problem.under(where) for problem in relations(values)]
        return None

    def _construct(self, cls: type, values: dict[str, Any], where: str) -> Any | None:
        try:
            return cls(**values)
        except ConfigError as err:
            self.problems += [problem.under(where) for problem in err.problems]
        except (ValueError, GarrisonError) as err:  # a class that checks itself in its own words
            self.problems.append(Problem(where, str(err)))
        return None

    def value(self, raw: Any, hint: Any, meta: typing.Mapping[str, Any], here: str) -> Any:
        """`raw` converted to `hint`; INVALID (with a problem recorded) when it cannot be. A list keeps its
        valid items, with INVALID in place of the others."""
        before = len(self.problems)
        value = self._convert(raw, hint, meta, here)
        if len(self.problems) == before and not _fits(value, hint, meta):
            self.problems.append(Problem(here, f"must be {expectation(hint, meta)}, got {shown(raw, meta)}"))
        return value if len(self.problems) == before or isinstance(value, tuple) else INVALID

    def _convert(self, raw: Any, hint: Any, meta: typing.Mapping[str, Any], here: str) -> Any:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (Union, types.UnionType):
            if raw is None:
                return None
            choices = [arg for arg in args if arg is not type(None)]
            if len(choices) == 1:
                return self._convert(raw, choices[0], meta, here)
            for choice in choices:  # the first reading that fits (a dtype's name, or "auto")
                before = len(self.problems)
                converted = self._convert(raw, choice, meta, here)
                if len(self.problems) == before and _fits(converted, choice, meta):
                    return converted
                del self.problems[before:]
            return raw
        if origin is tuple and isinstance(raw, list):
            return tuple(self.value(item, args[0], {}, f"{here}[{i}]") for i, item in enumerate(raw))
        if is_dataclass(hint) and isinstance(raw, dict):
            built = self.build(hint, raw, here)  # type: ignore[arg-type]
            return built if built is not None else INVALID
        if isinstance(raw, str) and raw:
            return self._text(raw, hint, meta)
        return raw

    def _text(self, raw: str, hint: Any, meta: typing.Mapping[str, Any]) -> Any:
        if hint is Path:
            return (self.base / Path(raw).expanduser()).resolve()
        if hint is torch.dtype:
            return DTYPES[raw] if raw in dtype_names(meta) else raw
        if meta.get("ref") and is_path_ref(raw):
            return str((self.base / Path(raw).expanduser()).resolve())
        return raw


def setting(default: Any = MISSING, **meta: Any) -> Any:
    """A field with metadata for the checks (`min`, `max`, `min_len`, `ref`, `url`)."""
    return field(default=default, metadata=meta)
