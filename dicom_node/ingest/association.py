"""Which associations the node accepts: the called and calling AE titles, the caller's host
and the association limit, checked in front of pynetdicom's own negotiation so that every
rejection is logged, audited and counted the same way.

The check replaces pynetdicom's private ``ACSE._negotiate_as_acceptor`` and
``RequestHandler._create_association`` (pynetdicom has no public hook that sees the called
title and the peer before it answers); pynetdicom is pinned to 3.0.x and
``tests/dicom_node/ingest/test_pynetdicom_hooks.py`` checks that both exist with the shape used here.
"""
from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node.config import ListenerSection

log = logging.getLogger(__name__)

#: ``(reason, message)`` of an association rejected at negotiation (see :class:`Rejection`)
AssociationRejectedCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (result, source, diagnostic), the reason for the log, and ``kind``,
    the short reason counted in /metrics (``called_ae_title``, ``calling_ae_title``, ``host``
    or ``too_many_associations``)."""

    result: int
    source: int
    diagnostic: int
    reason: str
    kind: str


def _network(entry: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise ValueError(f"{where}: {entry!r} is not an IP address or network (host names are not resolved)") from None


def _peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class CallerPolicy:
    """Decides whether to accept an association: called title, calling title and peer host."""

    def __init__(self, listener: ListenerSection) -> None:
        self.ae_titles = frozenset(listener.ae_titles)
        self.allow_any_caller = listener.allow_any_caller
        self._callers: dict[str, list[Any] | None] = {}
        for i, caller in enumerate(listener.allowed_callers):
            where = f"listener.allowed_callers[{i}].hosts"
            nets = [_network(h, where) for h in caller.hosts]
            if caller.ae_title in self._callers:
                previous = self._callers[caller.ae_title]
                # one entry without hosts allows any host for that title
                self._callers[caller.ae_title] = None if previous is None or not nets else previous + nets
            else:
                self._callers[caller.ae_title] = nets or None

    def check(self, called_ae: str, calling_ae: str, host: str) -> Rejection | None:
        """``None`` to accept, or the rejection to send."""
        if called_ae not in self.ae_titles:
            return Rejection(
                0x01, 0x01, 0x07, f"called AE title {called_ae!r} is not one of {sorted(self.ae_titles)}", "called_ae_title"
            )
        if self.allow_any_caller:
            return None
        if calling_ae not in self._callers:
            return Rejection(
                0x01, 0x01, 0x03, f"calling AE title {calling_ae!r} is not in listener.allowed_callers", "calling_ae_title"
            )
        nets = self._callers[calling_ae]
        if nets is None:
            return None
        address = _peer_address(host)
        if address is None or not any(address in net for net in nets):
            return Rejection(
                0x01,
                0x01,
                0x03,
                f"host {host} is not among the hosts allowed for calling AE title {calling_ae!r}",
                "host",
            )
        return None


class _GatedACSE(ACSE):
    """pynetdicom's ACSE with the node's caller check and association limit in front of the
    negotiation, so every rejection is logged and reported the same way."""

    def __init__(self, assoc: Association, policy: CallerPolicy, on_rejected: AssociationRejectedCallback | None) -> None:
        super().__init__(assoc)
        self._policy = policy
        self._on_rejected = on_rejected

    def _over_limit(self) -> Rejection | None:
        # the same test pynetdicom makes after this check (this association is among the active)
        limit = self.assoc.ae.maximum_associations
        active = sum(1 for a in self.assoc.ae.active_associations if a.is_acceptor)
        if active > limit:
            return Rejection(
                0x02, 0x03, 0x02, f"{active - 1} associations are open, listener.max_associations is {limit}",
                "too_many_associations",
            )
        return None

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        called = str(request.called_ae_title).strip()
        calling = str(request.calling_ae_title).strip()
        host = self.assoc.requestor.address
        rejection = self._policy.check(called, calling, host) or self._over_limit()
        if rejection is not None:
            log.warning("association from %s@%s to %s rejected: %s", calling, host, called, rejection.reason)
            if self._on_rejected is not None:
                self._on_rejected(rejection.kind, f"{calling}@{host} to {called}: {rejection.reason}")
            self.requestor.ae_title = calling
            self.send_reject(rejection.result, rejection.source, rejection.diagnostic)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        # answer under the title that was called (the AE serves several)
        self.acceptor.ae_title = called
        super()._negotiate_as_acceptor()


class _GatedRequestHandler(RequestHandler):
    server: _NodeServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.acse = _GatedACSE(assoc, self.server.caller_policy, self.server.on_rejected)
        return assoc


class _NodeServer(ThreadedAssociationServer):
    def __init__(
        self,
        *args: Any,
        caller_policy: CallerPolicy,
        on_rejected: AssociationRejectedCallback | None = None,
        **kwargs: Any,
    ) -> None:
        self.caller_policy = caller_policy
        self.on_rejected = on_rejected
        super().__init__(*args, request_handler=_GatedRequestHandler, **kwargs)
