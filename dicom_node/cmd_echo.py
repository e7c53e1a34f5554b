"""``orthonode echo``: see :mod:`dicom_node.commands`."""
from dicom_node.commands import configure_echo as configure, run_echo as run

__all__ = ["configure", "run"]
