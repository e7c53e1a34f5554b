"""Ingest: what the node does with an association and an instance, up to a committed row.

- :mod:`~dicom_node.ingest.association`: the caller policy (AE titles, hosts, the
  association limit), applied in front of pynetdicom's negotiation;
- :mod:`~dicom_node.ingest.checks`: the header checks of a received data set and the
  duplicate-content comparison;
- :mod:`~dicom_node.ingest.receiver`: :class:`StoreReceiver`, one C-STORE from bytes to a
  DIMSE status (network-free), and the pynetdicom event handlers;
- :mod:`~dicom_node.ingest.group_commit`: several instances' rows in one transaction, each
  acknowledged only once durable;
- :mod:`~dicom_node.ingest.recovery`: the start-up check of rows without files;
- :mod:`~dicom_node.ingest.listener`: :class:`Listener`, the running AE (TLS, start, stop).

What happens to an association and an instance, and why, is in ``docs/ingest.md``.
"""
from dicom_node.ingest.association import CallerPolicy, Rejection
from dicom_node.ingest.checks import pixel_data_problem, same_instance_content, sop_class_uid
from dicom_node.ingest.group_commit import GroupRecorder
from dicom_node.ingest.listener import Listener, make_ssl_context
from dicom_node.ingest.receiver import AssociationHolds, StoreReceiver
from dicom_node.ingest.status import StoreStatus

__all__ = [
    "AssociationHolds",
    "CallerPolicy",
    "GroupRecorder",
    "Listener",
    "Rejection",
    "StoreReceiver",
    "StoreStatus",
    "make_ssl_context",
    "pixel_data_problem",
    "same_instance_content",
    "sop_class_uid",
]
