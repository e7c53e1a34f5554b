"""The private pynetdicom hooks the listener overrides are still there, with the shape it relies on.

The listener rejects an association by calling AE title *and* host, and by its own association
limit, before pynetdicom negotiates: no public event or setting can refuse by host (EVT_REQUESTED
only notifies, ``AE.require_calling_aet`` knows titles only), so it subclasses pynetdicom's
``ACSE`` (``_negotiate_as_acceptor``) and ``RequestHandler`` (``_create_association``), and
registers its server in ``AE._servers`` as ``AE.start_server`` does.  ``setup.cfg`` pins the
minor version; this test fails first when an upgrade moves any of it.
"""
from __future__ import annotations

import inspect

from pynetdicom import AE
from pynetdicom.acse import ACSE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node.ingest.association import _GatedACSE, _GatedRequestHandler, _NodeServer


def test_the_overridden_private_hooks_exist_with_the_signatures_the_listener_uses() -> None:
    assert list(inspect.signature(ACSE._negotiate_as_acceptor).parameters) == ["self"]
    assert list(inspect.signature(RequestHandler._create_association).parameters) == ["self"]
    assert list(inspect.signature(ACSE.__init__).parameters)[:2] == ["self", "assoc"]
    assert "request_handler" in inspect.signature(ThreadedAssociationServer.__init__).parameters
    assert "server_class" in inspect.signature(AE.make_server).parameters
    ae = AE()
    assert isinstance(ae._servers, list)  # AE.shutdown() stops every server listed there
    # the listener's classes do override them (a rename upstream would leave them dead code)
    assert _GatedACSE._negotiate_as_acceptor is not ACSE._negotiate_as_acceptor
    assert _GatedRequestHandler._create_association is not RequestHandler._create_association
    assert issubclass(_NodeServer, ThreadedAssociationServer)

