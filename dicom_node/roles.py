"""The roles of an ``orthonode serve`` process (``--role``, ``node.role``); see
:mod:`dicom_node.cluster`.  Imports nothing, so the configuration can check a role cheaply."""
from __future__ import annotations

from collections.abc import Iterable

#: the roles a process can run, in start order (consumers before producers)
ROLES = ("exporter", "worker", "listener")
#: every role in one process
ALL = "all"


def parse_roles(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"all"``, ``"listener"``, ``"worker,exporter"`` (or a list) -> the roles, in start order.

    Raises :class:`ValueError` for an unknown role, a role given twice, ``all`` beside another
    role, or nothing at all.
    """
    items = [part.strip() for part in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    if not items or any(not item for item in items):
        raise ValueError(f"role {value!r}: name one or more of {', '.join(ROLES)} (comma-separated), or {ALL!r}")
    seen: set[str] = set()
    for item in items:
        if item != ALL and item not in ROLES:
            raise ValueError(f"unknown role {item!r}: the roles are {', '.join(ROLES)} and {ALL!r}")
        if item in seen:
            raise ValueError(f"role {item!r} is given twice")
        seen.add(item)
    if ALL in seen:
        if len(seen) > 1:
            raise ValueError(f"role {ALL!r} already includes {', '.join(sorted(seen - {ALL}))}; give it alone")
        return ROLES
    return tuple(role for role in ROLES if role in seen)


def describe_roles(roles: Iterable[str]) -> str:
    roles = tuple(roles)
    return ALL if set(roles) == set(ROLES) else ",".join(roles)
