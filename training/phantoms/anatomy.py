"""The contract between the anatomical models and the acquisition simulator.

A phantom case is made in two steps:

1. ``sample_case(joint, rng, case_id, site)`` (anatomy side) draws the clinical picture of one
   patient: laterality, EHR values, the labels with a severity per positive label, and the
   anatomical parameters (size, flexion, rotation, habitus).  ``build_anatomy(spec)`` turns it
   into an :class:`Anatomy`: one continuous 3D model of the joint in DICOM patient coordinates
   (LPS, millimetres: +x patient left, +y posterior, +z superior).
2. The acquisition side samples that model on each series' own voxel grid (with sub-voxel
   sampling for partial-volume averaging) through :meth:`Anatomy.evaluate`, maps tissues to
   signal with the sequence and site contrast tables, and writes DICOM and masks.

Tissues are discrete classes; signal variation within a tissue (bias field, noise, edema
intensity grading through partial volume) is added by the acquisition side.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

import numpy as np


class Tissue(IntEnum):
    """Tissue classes with distinct MR contrast.  Values are stable (stored in tests)."""

    AIR = 0
    FAT = 1  # subcutaneous and intermuscular fat, Hoffa's fat pad
    MUSCLE = 2
    SKIN = 3
    CORTEX = 4  # cortical bone: dark in every sequence
    MARROW = 5  # fatty bone marrow
    CARTILAGE = 6  # hyaline cartilage
    FIBROCARTILAGE = 7  # menisci, glenoid labrum: dark
    LIGAMENT = 8  # ligaments and tendons: dark
    FLUID = 9  # joint fluid, effusion, bursal fluid, tendon-sheath fluid
    MARROW_EDEMA = 10  # bone bruise / contusion: bright on fat-suppressed images
    SOFT_TISSUE_EDEMA = 11  # periligamentous / subcutaneous edema, partial-tear fibres
    TEAR = 12  # fluid-like signal inside a torn ligament, tendon or meniscus
    VESSEL = 13  # popliteal / major vessels (flow-related signal)


N_TISSUES = len(Tissue)


@dataclass
class CaseSpec:
    """Everything drawn for one case before any image is made."""

    case_id: str
    joint: str  # "knee" | "ankle" | "shoulder"
    site: str
    laterality: str  # "L" | "R"
    age: int | None  # years; None = missing in the header
    sex: str | None  # "M" | "F"; None = missing
    height_m: float | None
    weight_kg: float | None
    labels: dict[str, int]  # every label key of the joint -> 0/1 (order: inference.labels)
    severity: dict[str, float] = field(default_factory=dict)  # positive label -> (0, 1]; 1 = florid
    params: dict[str, float] = field(default_factory=dict)  # anatomy parameters (scale, flexion_deg, ...)


class Anatomy(Protocol):
    """A continuous 3D joint model in patient coordinates (mm)."""

    joint: str
    laterality: str

    @property
    def center(self) -> np.ndarray:
        """(3,) joint centre in patient coordinates; series are planned around it."""

    @property
    def extent_mm(self) -> np.ndarray:
        """(3,) size of the box (x, y, z) that holds the anatomy worth imaging."""

    def evaluate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Classify points.

        ``points`` is (N, 3) float32 in patient coordinates.  Returns ``(tissue, structure)``,
        both (N,) uint8: ``tissue`` a :class:`Tissue` value, ``structure`` the knee structure
        index of :data:`inference.labels.KNEE_STRUCTURES` (0 = none; always 0 for ankle and
        shoulder).  Must be fast: tens of millions of points per case.
        """
