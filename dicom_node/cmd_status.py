"""``orthonode status``: see :mod:`dicom_node.commands`."""
from dicom_node.commands import configure_status as configure, run_status as run

__all__ = ["configure", "run"]
