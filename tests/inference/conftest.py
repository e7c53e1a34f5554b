"""Fixtures for the pipeline and ``orthonode predict`` tests: a small trained model and phantom studies.

The model is trained once per test session with the trainer's own functions (tiny
configuration, 8 x 32 x 32 inputs): a segmenter on the sagittal series of four phantom knees
(every slice window, enough steps for the large bones to be found) and a fused three-plane
classifier with EHR fusion (one epoch: its probabilities are not meant to be good, only
real).  Test studies are other phantom cases (another seed), so the Dice the tests state is
measured on studies the segmenter never saw.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

#: phantom matrix; the tiny model sees 32 x 32, so 64 keeps studies small and realistic enough
MATRIX = 64
TRAIN_CASES = 4
TRAIN_SEED = 11
TEST_SEED = 5
#: segmenter training: epochs over all sagittal windows of the training cases
SEG_EPOCHS = 50


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a small knee bundle (classifier + segmenter) trained on phantoms.

    Under pytest-xdist the workers share one run's base folder: the first worker that gets
    here trains while holding a file lock, the others wait and load its checkpoint, so the
    two CPU cores are not spent training the same model twice.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # a plain run: nothing to share
        return _train_checkpoint(tmp_path_factory.mktemp("predict_train"))
    shared = tmp_path_factory.getbasetemp().parent / "predict_train"
    shared.mkdir(exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            path = shared / "model.pt"
            return path if path.is_file() else _train_checkpoint(shared)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _train_checkpoint(root: Path) -> Path:
    import torch

    from training.config import load_config
    from training.datasets import read_source
    from training.finetune import finetune_classifier, finetune_segmenter, make_bundle
    from training.phantoms.generate import generate_dataset

    generate_dataset(root / "knee", "knee", TRAIN_CASES, seed=TRAIN_SEED, matrix=MATRIX)
    records = read_source(f"phantom:{root / 'knee'}")
    # From scratch the backbone must learn too (factor 1); CE at full weight finds the large
    # bones within a few hundred steps where the Dice term alone is still flat.
    cfg = load_config("tiny").with_overrides(
        segment={"epochs": SEG_EPOCHS, "batch_size": 4, "lr": 1e-2, "backbone_lr_factor": 1.0, "ce_weight": 1.0},
        classify={"epochs": 1},
    )
    torch.manual_seed(0)
    seg = finetune_segmenter(
        cfg, records, plane="sagittal", pretrained=None, from_scratch=True, seed=0, progress=False,
        dataset_options={"windows": "all"},
    )
    cls = finetune_classifier(
        cfg, records, ["sagittal", "coronal", "axial"], use_ehr=True, pretrained=None, from_scratch=True, seed=0,
        progress=False,
    )
    bundle = make_bundle(cfg, classifier=cls, segmenter=seg, name="test-knee", version="0.1-test")
    path = root / "model.pt"
    bundle.save(path)
    return path


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
