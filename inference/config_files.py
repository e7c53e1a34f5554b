"""Reading the project's YAML files (node.yaml, training configurations, SR templates) the same way.

One error base class, one reader and one rendering of pydantic's error locations, so that every
file the project reads is refused with a message that names the file and the key.
:class:`dicom_node.config.ConfigError`, :class:`training.config.ConfigError` and
:class:`sr_templates.TemplateError` are its subclasses.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class ConfigFileError(ValueError):
    """A configuration or template file is unreadable or invalid; the message names the file and the key."""


def read_yaml(path: str | Path, error: type[ConfigFileError] = ConfigFileError, what: str = "file") -> Any:
    """The YAML document in ``path``; ``error`` (naming the file) when it is missing, unreadable or not YAML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: cannot read {what}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def error_locations(exc: ValidationError, skip: tuple[str, ...] = ()) -> Iterator[tuple[list[Any], str]]:
    """Each pydantic error as (location parts, message without pydantic's "Value error, " prefix)."""
    for err in exc.errors():
        yield [part for part in err["loc"] if part not in skip], err["msg"].removeprefix("Value error, ")
