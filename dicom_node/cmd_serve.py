"""``orthonode serve``: see :mod:`dicom_node.commands`."""
from dicom_node.commands import configure_serve as configure, run_serve as run

__all__ = ["configure", "run"]
