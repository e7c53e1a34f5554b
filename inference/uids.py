"""Deterministic UIDs and the identity of the node and its model in the DICOM it writes.

A PACS keys everything on UIDs.  If the node generated random UIDs, sending the same study
twice (a re-route, a retry after a crash, a manual re-send) would create a second SEG and a
second SR next to the first ones.  Every UID the writers create is therefore *derived*: a
hash of what the object was derived from (source study, source series, model version, the
kind of object), so the same inputs give the same UID and a new model version gives new ones.

UID root
--------
Derived UIDs live under the ``2.25`` root (ISO/IEC 9834-8, PS3.5 B.2): ``2.25.`` followed by
the decimal form of a UUID.  The UUID is name-based (RFC 4122 version 5, SHA-1) in the
project's namespace :data:`UID_NAMESPACE`, with the joined parts as the name.  This root
needs no registered organisation, cannot collide with UIDs issued under somebody else's
root, and does not depend on pydicom internals (``pydicom.uid.generate_uid(prefix=None)``
ignores ``entropy_srcs`` and returns a *random* UUID, so it cannot be used here).  A site
with its own registered root can set :data:`UID_ROOT` (ending in ``.``) before the node
starts; UIDs then come from ``generate_uid(prefix=UID_ROOT, entropy_srcs=...)``, a SHA-512
of the parts under that root.
"""
from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

#: Root for derived UIDs; ``None`` selects the ``2.25`` UUID-derived root (see module docstring).
UID_ROOT: str | None = None

#: Namespace of the name-based UUIDs behind ``2.25`` UIDs; fixed forever, changing it would
#: give every re-sent study new UIDs.
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "orthonode.derived-uids")

#: PS3.5 9.1: a UID is at most 64 characters.
_MAX_UID_LENGTH = 64


def derived_uid(*parts: str) -> str:
    """Return the UID derived from ``parts``; the same parts always give the same UID.

    Callers pass what makes the object unique, e.g. ``(study_uid, series_uid,
    model_version, "seg-series")``, always with a ``kind`` part so two objects made from the
    same sources get different UIDs.  Parts are joined with a unit separator (0x1F) before
    hashing, so ``("ab", "c")`` and ``("a", "bc")`` give different UIDs.

    Raises:
        ValueError: if no part is given, a part is not a non-empty string, or the configured
            :data:`UID_ROOT` is malformed.
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part")
    for i, part in enumerate(parts):
        if not isinstance(part, str) or not part:
            raise ValueError(f"derived_uid part {i} must be a non-empty string, got {part!r}")
    name = "\x1f".join(parts)
    if UID_ROOT is None:
        return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"
    if not UID_ROOT.endswith(".") or not UID(UID_ROOT[:-1]).is_valid:
        raise ValueError(f"UID_ROOT must be a valid UID prefix ending in '.', got {UID_ROOT!r}")
    if len(UID_ROOT) > _MAX_UID_LENGTH - 20:
        raise ValueError(f"UID_ROOT {UID_ROOT!r} leaves too little room for a unique suffix")
    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=[name]))


def instances_fingerprint(datasets: Sequence[Dataset]) -> str:
    """A short digest of the exact source instances an output was made from.

    It enters output UIDs so that a re-run on unchanged inputs gives the same UIDs (the PACS
    replaces nothing twice) and a re-run after instances were added, removed or replaced gives
    new ones.  SOP Instance UIDs alone identify unchanged content; the number of frames is
    added for multi-frame sources.
    """
    if not datasets:
        raise ValueError("instances_fingerprint needs at least one dataset")
    keys = sorted(f"{ds.SOPInstanceUID}/{int(ds.get('NumberOfFrames', 1) or 1)}" for ds in datasets)
    return hashlib.sha256("\n".join(keys).encode("ascii")).hexdigest()[:32]


@dataclass(frozen=True)
class AlgorithmInfo:
    """What the writers say about the model: TID 4019 Algorithm Identification and the SEG
    Algorithm Identification Sequence, plus the Contributing Equipment entry for the model.

    ``version`` enters every derived UID, so outputs of a new model never overwrite the
    outputs of an old one in the PACS.
    """

    name: str
    version: str
    #: Algorithm family (CID 7162); DCM 123110 "Artificial Intelligence" is the concept that
    #: highdicom's own examples use for deep-learning models.
    family: Code = field(default_factory=lambda: codes.DCM.ArtificialIntelligence)
    manufacturer: str = "orthonode"
    #: model name as shown in Contributing Equipment (Manufacturer's Model Name)
    model_name: str = "OrthoDiffusion"
    #: where the model comes from (e.g. a checkpoint file name or a citation); optional
    source: str | None = None

    def __post_init__(self) -> None:
        for attr in ("name", "version", "manufacturer", "model_name"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"AlgorithmInfo.{attr} must be a non-empty string, got {value!r}")
        if not isinstance(self.family, Code):
            raise TypeError(f"AlgorithmInfo.family must be a pydicom Code, got {self.family!r}")

    def seg_identification(self, parameters: Mapping[str, str] | None = None) -> hd.AlgorithmIdentificationSequence:
        """The SEG segment's Algorithm Identification Sequence, with optional Algorithm Parameters."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name, family=self.family, version=self.version, source=self.source,
            parameters=dict(parameters) if parameters else None,
        )

    def sr_identification(self, parameters: Sequence[str] | None = None) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification for SR groups, with optional text parameters."""
        return hd.sr.AlgorithmIdentification(
            name=self.name,
            version=self.version,
            parameters=list(parameters) if parameters else None,
            family=self.family,
            manufacturer=self.manufacturer,
        )

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """Contributing Equipment item naming the model (manufacturer / model / version)."""
        return hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_name,
            software_versions=self.version,
            contribution_description=f"{self.name} {self.version}: automatic analysis",
        )


@dataclass(frozen=True)
class NodeInfo:
    """The node that writes the objects: the equipment of the SEG/SR instances themselves."""

    manufacturer: str = "orthonode"
    model_name: str = "orthonode DICOM AI node"
    software_version: str = "0.1.0"
    device_serial_number: str = "0"
    station_name: str | None = None
    institution_name: str | None = None

    def __post_init__(self) -> None:
        for attr in ("manufacturer", "model_name", "software_version", "device_serial_number"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"NodeInfo.{attr} must be a non-empty string, got {value!r}")

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """Contributing Equipment item naming the node."""
        return hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_name,
            software_versions=self.software_version,
            device_serial_number=self.device_serial_number,
            station_name=self.station_name,
            institution_name=self.institution_name,
        )


def default_node_info() -> NodeInfo:
    """NodeInfo with the installed package version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return NodeInfo(software_version=version("orthonode"))
    except PackageNotFoundError:
        return NodeInfo()
