"""Every attribute of a phantom knee image, removed from every file of the study in turn.

Real archives hold objects that lack attributes the standard requires (de-identification
tools delete instead of emptying, old modalities omit some).  For each attribute the pipeline
must give an outcome with its reason, never an exception, and whatever it writes must pass
``dciodvfy`` without errors: nothing missing in the source may make an output invalid.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from inference.checkpoint import ModelBundle
from inference.pipeline import Outcome, run_study
from tests.support.tiny_model import MATRIX, TEST_SEED

from tests.inference.output_factory import dciodvfy_errors

#: the top-level attributes of a phantom MR image (the generator writes these for every site)
_ATTRIBUTES = (
    "SpecificCharacterSet", "ImageType", "InstanceCreationDate", "InstanceCreationTime", "SOPClassUID",
    "SOPInstanceUID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
    "AcquisitionTime", "ContentTime", "AccessionNumber", "Modality", "Manufacturer", "InstitutionName",
    "ReferringPhysicianName", "StationName", "StudyDescription", "SeriesDescription", "ManufacturerModelName",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
    "PatientIdentityRemoved", "DeidentificationMethod", "BodyPartExamined", "ScanningSequence", "SequenceVariant",
    "ScanOptions", "MRAcquisitionType", "SequenceName", "AngioFlag", "SliceThickness", "RepetitionTime",
    "EchoTime", "NumberOfAverages", "ImagingFrequency", "ImagedNucleus", "EchoNumbers", "MagneticFieldStrength",
    "SpacingBetweenSlices", "EchoTrainLength", "PercentSampling", "PercentPhaseFieldOfView", "PixelBandwidth",
    "DeviceSerialNumber", "SoftwareVersions", "ProtocolName", "ReceiveCoilName", "TransmitCoilName",
    "AcquisitionMatrix", "InPlanePhaseEncodingDirection", "FlipAngle", "Laterality", "VariableFlipAngleFlag", "PatientPosition",
    "StudyInstanceUID", "SeriesInstanceUID", "StudyID", "SeriesNumber", "AcquisitionNumber", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID", "ImageLaterality",
    "PositionReferenceIndicator", "SliceLocation", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
    "Columns", "PixelSpacing", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "WindowCenter",
    "WindowWidth", "WindowCenterWidthExplanation",
)


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint: Path) -> ModelBundle:
    return ModelBundle.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One phantom knee (its own seed, not shared with other modules' fixtures)."""
    from training.phantoms.generate import generate_dataset

    root = tmp_path_factory.mktemp("missing_attributes")
    generate_dataset(root / "knee", "knee", 1, seed=TEST_SEED + 2, matrix=MATRIX)
    return root / "knee" / "knee_0001" / "dicom"


def test_the_list_covers_the_phantom_images(study: Path) -> None:
    ds = pydicom.dcmread(next(study.rglob("*.dcm")))
    written = {e.keyword for e in ds if e.keyword and e.keyword != "PixelData"}
    assert written <= set(_ATTRIBUTES), sorted(written - set(_ATTRIBUTES))


@pytest.mark.dicomtools
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("keyword", _ATTRIBUTES)
def test_an_attribute_missing_from_every_file(keyword: str, bundle: ModelBundle, study: Path, tmp_path: Path) -> None:
    copy = tmp_path / "study"
    for source in sorted(study.rglob("*.dcm")):
        target = copy / source.relative_to(study)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds = pydicom.dcmread(source)
        if keyword in ds:
            delattr(ds, keyword)
            ds.save_as(target, enforce_file_format=False)
        else:
            shutil.copyfile(source, target)
    result = run_study(copy, bundle, tmp_path / "out")  # an exception fails the test
    assert result.outcome in (Outcome.COMPLETE, Outcome.PARTIAL, Outcome.UNSUPPORTED)
    assert result.reason
    for path in result.files:
        assert dciodvfy_errors(path) == [], f"{path.name} without {keyword}"
