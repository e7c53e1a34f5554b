"""Pydantic dataclasses that fail with one plain ``ValueError`` naming each bad field.

:class:`inference.model.ModelConfig`, :class:`inference.model.FeaturePoint` and
:class:`inference.checkpoint.ModelCard` are pydantic dataclasses: pydantic checks each field's
type and bounds and rejects unknown keys, while the classes stay real dataclasses
(``dataclasses.replace``, ``fields``, ``asdict``, positional arguments, frozen hashing), which
their callers rely on.  :func:`plain_errors` turns pydantic's ``ValidationError`` into a
``ValueError`` whose message reads like the project's other errors, one clause per problem::

    ModelConfig.norm_num_groups: Input should be greater than 0 (got 0)
    ModelCard lacks key(s) ['version', 'joint']
    ModelConfig has unknown key(s) ['chanels']; known keys are [...]
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

__all__ = ["describe_errors", "plain_errors", "sequence"]

T = TypeVar("T")

#: an input longer than this is cut in error messages
_MAX_REPR = 120


def sequence(value: Any) -> Any:
    """A before-validator: a list or a tuple, nothing else (a set or a string has no reliable order)."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list, got {_short(value)}")
    return value


def plain_errors(cls: type[T]) -> type[T]:
    """Class decorator for a pydantic dataclass: construction raises ``ValueError(describe_errors(...))``."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise ValueError(describe_errors(cls.__name__, names, exc)) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def describe_errors(owner: str, names: Sequence[str], exc: ValidationError) -> str:
    """One clause per problem of ``exc``, each naming ``owner`` and the field (``names`` in
    positional order, to name positional arguments)."""
    missing: list[str] = []
    unknown: list[str] = []
    clauses: list[str] = []
    for err in exc.errors():
        loc = list(err["loc"])
        if loc and isinstance(loc[0], int) and loc[0] < len(names):
            loc[0] = names[loc[0]]
        kind = err["type"]
        if kind in ("missing", "missing_argument") and len(loc) == 1:
            missing.append(str(loc[0]))
        elif kind == "unexpected_keyword_argument" and len(loc) == 1:
            unknown.append(str(loc[0]))
        elif kind == "unexpected_positional_argument":
            clauses.append(f"{owner} takes at most {len(names)} positional arguments")
        elif not loc:  # a check across fields: its message names the fields itself
            clauses.append(err["msg"].removeprefix("Value error, "))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if kind in ("missing", "missing_argument"):
                msg = "missing"
            elif kind == "unexpected_keyword_argument":
                msg = "unknown key"
            elif kind != "value_error":  # our own messages say what they got; pydantic's do not
                msg = f"{msg} (got {_short(err.get('input'))})"
            clauses.append(f"{owner}.{_path(loc)}: {msg}")
    if missing:
        clauses.insert(0, f"{owner} lacks key(s) {missing}")
    if unknown:
        clauses.insert(0, f"{owner} has unknown key(s) {sorted(unknown)}; known keys are {sorted(names)}")
    return "; ".join(clauses)


def _path(loc: Sequence[Any]) -> str:
    """``('feature_points', 'sagittal', 'timestep')`` -> ``feature_points.sagittal.timestep``;
    ``('thresholds', 'a b')`` -> ``thresholds['a b']``; a dict key's own error says ``(the key)``."""
    text = str(loc[0])
    for part in loc[1:]:
        if part == "[key]":
            text += " (the key)"
        elif isinstance(part, int):
            text += f"[{part}]"
        elif str(part).isidentifier():
            text += f".{part}"
        else:
            text += f"[{str(part)!r}]"
    return text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."
