"""Fixtures for the pipeline and ``orthonode predict`` tests: phantom studies.

The model is the run's tiny trained knee model (fixture ``tiny_checkpoint``,
:mod:`tests.support.tiny_model`).  Test studies are other phantom cases (another seed than
the model's training cases), so the Dice the tests state is measured on studies the
segmenter never saw.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.tiny_model import MATRIX, TEST_SEED


@pytest.fixture(scope="session")
def knee_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantom knee cases (uncompressed) with their ground-truth masks: ROOT/knee_000N/{dicom,masks}."""
    from training.phantoms.generate import generate_dataset

    root = tmp_path_factory.mktemp("predict_knee") / "knee"
    generate_dataset(root, "knee", 2, seed=TEST_SEED, matrix=MATRIX)
    return root


@pytest.fixture(scope="session")
def compressed_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One phantom knee study stored as JPEG 2000 (lossless): its ``dicom`` folder."""
    from training.phantoms.generate import generate_dataset

    root = tmp_path_factory.mktemp("predict_j2k") / "knee"
    generate_dataset(root, "knee", 1, seed=TEST_SEED + 1, transfer_syntax="jpeg2000", matrix=MATRIX)
    return root / "knee_0001" / "dicom"


@pytest.fixture(scope="session")
def ankle_study(knee_studies: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom study whose headers name the ankle: a joint the knee model must refuse.

    The knee images are relabelled (body part, descriptions) rather than generated as an
    ankle: the joint decision is made on headers only, and this keeps the fixture cheap.
    """
    target = tmp_path_factory.mktemp("predict_ankle") / "dicom"
    _copy_relabelled(
        knee_studies / "knee_0002" / "dicom", target, BodyPartExamined="ANKLE", StudyDescription="MRI ANKLE RIGHT",
        ProtocolName="ankle_routine",
    )
    return target


def _copy_relabelled(source: Path, target: Path, drop: tuple[str, ...] = (), **values: str) -> Path:
    import pydicom

    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*drop) if drop else None)
    if values:
        for path in sorted(target.rglob("*.dcm")):
            ds = pydicom.dcmread(path)
            for keyword, value in values.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
    return target


@pytest.fixture()
def relabelled_copy(tmp_path: Path) -> Callable[..., Path]:
    """Copy a study folder, rewriting header values of every file (e.g. a knee made a brain MR)."""
    def copy(source: Path, name: str, drop: tuple[str, ...] = (), **values: str) -> Path:
        return _copy_relabelled(source, tmp_path / name, drop, **values)

    return copy
