"""A simple stand-in anatomy for the acquisition tests, independent of the real joint models.

The acquisition, DICOM and mask code is tested against shapes whose geometry is known
exactly (ellipsoids and cylinders), so that a misplaced slice or a flipped axis shows up as
a measurable error instead of hiding in a complex model.  The stand-in follows the contract
of :mod:`training.phantoms.anatomy`.
"""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from inference.labels import STRUCTURE_INDEX, label_keys
from training.phantoms.anatomy import CaseSpec, Tissue


class EllipsoidJoint:
    """A limb (skin, fat, muscle) around two bones with cartilage, menisci, patella and fluid.

    Bones: an upper (femur) and a lower (tibia) ellipsoid separated by a joint line at the
    centre; an effusion-positive case gets a large suprapatellar fluid pouch.
    """

    def __init__(self, joint: str, laterality: str, effusion: bool, center: np.ndarray, yaw_deg: float = 0.0) -> None:
        self.joint = joint
        self.laterality = laterality
        self._center = np.asarray(center, dtype=np.float64)
        self.effusion = effusion
        self.yaw_deg = yaw_deg  # rotation of the whole joint about the superior axis
        t = np.radians(yaw_deg)
        self._to_joint = np.array([[np.cos(t), np.sin(t), 0.0], [-np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)

    @property
    def center(self) -> np.ndarray:
        return self._center

    @property
    def extent_mm(self) -> np.ndarray:
        return np.array([150.0, 150.0, 170.0])  # limb included, as the real models do

    def evaluate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self._to_joint @ (np.asarray(points, dtype=np.float32) - self._center.astype(np.float32)).T
        x, y, z = p[0], p[1], p[2]
        n = p.shape[1]
        tissue = np.zeros(n, dtype=np.uint8)
        structure = np.zeros(n, dtype=np.uint8)
        knee = self.joint == "knee"

        def ell(cx: float, cy: float, cz: float, ax: float, ay: float, az: float) -> np.ndarray:
            return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2

        r2 = x * x + (y + 5.0) ** 2
        limb = r2 < 55.0**2
        tissue[limb] = Tissue.SKIN
        tissue[r2 < 53.0**2] = Tissue.FAT
        tissue[r2 < 46.0**2] = Tissue.MUSCLE
        # fluid pouch (suprapatellar recess): big with effusion, a thin film without
        pouch = ell(0.0, -30.0, 35.0, 26.0, 9.0 if self.effusion else 1.5, 24.0) < 1.0
        tissue[pouch] = Tissue.FLUID
        femur_q = ell(0.0, 0.0, 38.0, 36.0, 30.0, 36.0)
        tibia_q = ell(0.0, 0.0, -34.0, 34.0, 28.0, 30.0)
        for q, z_face, sign, bone, cart in (
            (femur_q, 2.0, -1.0, "femur", "femoral_cartilage"),
            (tibia_q, -4.0, 1.0, "tibia", "tibial_cartilage"),
        ):
            cartilage = (q < 1.18) & (q >= 1.0) & (sign * (z - z_face) > -14.0)
            tissue[cartilage] = Tissue.CARTILAGE
            tissue[(q < 1.0)] = Tissue.CORTEX
            tissue[(q < 0.86)] = Tissue.MARROW
            if knee:
                structure[cartilage] = STRUCTURE_INDEX[cart]
                structure[q < 1.0] = STRUCTURE_INDEX[bone]
        # menisci: peripheral ring at the joint line, medial and lateral halves
        ring = ell(0.0, 0.0, -1.0, 38.0, 32.0, 3.0) < 1.0
        ring &= ((x / 28.0) ** 2 + (y / 22.0) ** 2) > 1.0
        tissue[ring] = Tissue.FIBROCARTILAGE
        patella_q = ell(0.0, -40.0, 14.0, 20.0, 7.0, 18.0)
        tissue[patella_q < 1.0] = Tissue.CORTEX
        tissue[patella_q < 0.7] = Tissue.MARROW
        if knee:
            medial = x > 0 if self.laterality == "R" else x < 0
            structure[ring & medial] = STRUCTURE_INDEX["medial_meniscus"]
            structure[ring & ~medial] = STRUCTURE_INDEX["lateral_meniscus"]
            structure[patella_q < 1.0] = STRUCTURE_INDEX["patella"]
        tissue[~limb] = Tissue.AIR
        structure[~limb] = 0
        return tissue, structure


class StandInCases:
    """A :class:`training.phantoms.generate.CaseSource` built on :class:`EllipsoidJoint`."""

    def sample_case(self, joint: str, rng: np.random.Generator, case_id: str, site: str) -> CaseSpec:
        labels = {key: int(rng.random() < 0.5) for key in label_keys(joint)}
        return CaseSpec(
            case_id=case_id,
            joint=joint,
            site=site,
            laterality=str(rng.choice(["L", "R"])),
            age=int(rng.integers(18, 80)) if rng.random() < 0.8 else None,
            sex=str(rng.choice(["M", "F"])) if rng.random() < 0.9 else None,
            height_m=round(float(rng.uniform(1.5, 1.95)), 2) if rng.random() < 0.7 else None,
            weight_kg=round(float(rng.uniform(50, 110)), 1) if rng.random() < 0.7 else None,
            labels=labels,
            severity={key: 1.0 for key, value in labels.items() if value},
            params={
                "offset_x": float(rng.uniform(60.0, 110.0)),
                "offset_z": float(rng.uniform(-500.0, -350.0)),
                "yaw_deg": float(rng.uniform(4.0, 10.0) * rng.choice([-1.0, 1.0])),
            },
        )

    def build_anatomy(self, spec: CaseSpec) -> EllipsoidJoint:
        side = -1.0 if spec.laterality == "R" else 1.0
        center = np.array([side * spec.params["offset_x"], 12.0, spec.params["offset_z"]])
        effusion = bool(spec.labels.get("effusion", spec.labels.get("ghj", 0)))
        return EllipsoidJoint(spec.joint, spec.laterality, effusion, center, spec.params["yaw_deg"])


@pytest.fixture(scope="session")
def stand_in() -> StandInCases:
    return StandInCases()


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_tool(name: str) -> str:
    """Path of an external DICOM tool; the suite declares dcmtk and dicom3tools as test requirements."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is required for this test (install dcmtk / dicom3tools)")
    return path


@pytest.fixture(scope="session")
def knee_case(tmp_path_factory: pytest.TempPathFactory, stand_in: StandInCases):
    """One small knee case with a distractor localizer and oblique sagittal/coronal planes."""
    from training.phantoms.generate import generate_case

    out: Path = tmp_path_factory.mktemp("knee_case")
    return generate_case(out, "knee", 0, seed=3, matrix=96, case_source=stand_in, oblique=True, distractor="localizer")
