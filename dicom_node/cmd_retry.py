"""``orthonode retry``: see :mod:`dicom_node.commands`."""
from dicom_node.commands import configure_retry as configure, run_retry as run

__all__ = ["configure", "run"]
