"""Study-level hostile cases through :func:`inference.pipeline.run_study`: what the node's worker
gets when a PACS sends odd studies.  Each gives its documented outcome (complete, partial with
the missing planes named, or unsupported with a reason), never an exception.

The studies are copies of a phantom knee (``knee_phantoms``) changed with pydicom; the model is
the node tests' tiny bundle (``tiny_checkpoint``), whose findings do not matter here.
"""
from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from inference.checkpoint import ModelBundle
from inference.pipeline import Outcome, StudyResult, run_study
from inference.series import scan_folder


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint: Path) -> ModelBundle:  # noqa: F811
    return ModelBundle.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def source_study(knee_phantoms: Path) -> Path:  # noqa: F811
    return sorted(knee_phantoms.glob("knee_*"))[0] / "dicom"


def _copy(source: Path, target: Path, change: Callable[[pydicom.Dataset, str], bool | None] | None = None) -> Path:
    """Copy a study; ``change(ds, plane)`` edits each data set in place, False drops the file."""
    plane_of = {f: info.plane for info in scan_folder(source) for f in info.files}
    for path in sorted(source.rglob("*.dcm")):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if change is None:
            shutil.copyfile(path, out)
            continue
        ds = pydicom.dcmread(path)
        if change(ds, plane_of.get(path, "")) is False:
            continue
        ds.save_as(out)
    return target


def _run(bundle: ModelBundle, study: Path, out: Path) -> StudyResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return run_study(study, bundle, out, device="cpu")


def test_single_plane_study_is_partial_and_names_the_missing_planes(
    bundle: ModelBundle, source_study: Path, tmp_path: Path
) -> None:
    study = _copy(source_study, tmp_path / "study", lambda ds, plane: plane == "sagittal")
    result = _run(bundle, study, tmp_path / "out")
    assert result.outcome is Outcome.PARTIAL
    assert sorted(result.missing_planes) == ["axial", "coronal"] and set(result.chosen) == {"sagittal"}
    assert "missing" in result.reason and "axial" in result.reason and "coronal" in result.reason
    assert result.report is not None and result.report.is_file()


def test_localizer_only_study_is_unsupported(bundle: ModelBundle, source_study: Path, tmp_path: Path) -> None:
    def localizer(ds: pydicom.Dataset, plane: str) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]
        ds.SeriesDescription = "localizer"

    study = _copy(source_study, tmp_path / "study", localizer)
    result = _run(bundle, study, tmp_path / "out")
    assert result.outcome is Outcome.UNSUPPORTED
    assert "no usable series for any plane" in result.reason
    assert any("localizer" in line for line in result.log)
    assert result.findings == [] and not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_different_frames_of_reference_per_plane(bundle: ModelBundle, source_study: Path, tmp_path: Path) -> None:
    """A Frame of Reference per plane (planes acquired in separate sessions): the sagittal SEG
    carries its series' Frame of Reference, and the sagittal label map is not mapped into the
    other series, whose patient coordinates are not comparable (the log says so)."""
    frames: dict[str, str] = {}

    def own_frame(ds: pydicom.Dataset, plane: str) -> None:
        ds.FrameOfReferenceUID = frames.setdefault(str(ds.SeriesInstanceUID), generate_uid())

    study = _copy(source_study, tmp_path / "study", own_frame)
    assert len(set(frames.values())) == len(frames) >= 3
    result = _run(bundle, study, tmp_path / "out")
    assert result.outcome is Outcome.COMPLETE, result.reason
    assert list(result.segmentations) == ["sagittal"] and result.mapped_from == {}
    for plane, path in result.segmentations.items():
        seg = hd.seg.segread(path)
        assert seg.FrameOfReferenceUID == frames[result.chosen[plane].series_instance_uid], plane
    for plane in ("coronal", "axial"):
        assert any(line.startswith(f"segmentation: the sagittal label map cannot be placed on {plane}")
                   and "different Frames of Reference" in line for line in result.log), plane


def test_flipped_sagittal_series_keeps_its_geometry(bundle: ModelBundle, source_study: Path, tmp_path: Path) -> None:
    """The sagittal series with its row direction reversed (a valid but unusual acquisition): the
    pipeline still completes and the SEG lies on the flipped grid, not on a normalised one."""

    def flip(ds: pydicom.Dataset, plane: str) -> None:
        if plane != "sagittal":
            return
        iop = [float(v) for v in ds.ImageOrientationPatient]
        row, spacing = np.array(iop[:3]), float(ds.PixelSpacing[1])
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        # first column of the flipped image is the last column of the original
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position + row * spacing * (int(ds.Columns) - 1)]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in [*(-row), *iop[3:]]]
        pixels = ds.pixel_array[:, ::-1].copy()
        ds.PixelData = pixels.tobytes()

    study = _copy(source_study, tmp_path / "study", flip)
    result = _run(bundle, study, tmp_path / "out")
    assert result.outcome is Outcome.COMPLETE, result.reason
    seg = hd.seg.segread(result.segmentations["sagittal"])
    source = next(info for info in scan_folder(study) if info.plane == "sagittal")
    first = pydicom.dcmread(source.files[0], stop_before_pixels=True)
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose([float(v) for v in orientation], [float(v) for v in first.ImageOrientationPatient], atol=1e-4)


def test_damaged_files_in_the_chosen_series(bundle: ModelBundle, source_study: Path, tmp_path: Path) -> None:
    """One sagittal file cut inside its pixel data and one claiming 65535 x 65535 x 99999 pixels:
    nothing tries to allocate the declared size, both files are skipped with the reason and the
    study is reported from the rest of the series."""
    damaged: dict[str, Any] = {}

    def damage(ds: pydicom.Dataset, plane: str) -> None:
        if plane != "sagittal" or len(damaged) == 2:
            return
        if "huge" not in damaged:
            ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, "99999"
            damaged["huge"] = ds.SOPInstanceUID
        else:
            damaged["cut"] = ds.SOPInstanceUID

    study = _copy(source_study, tmp_path / "study", damage)
    for path in study.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SOPInstanceUID == damaged["cut"]:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) - 1000])
    original = next(info for info in scan_folder(source_study) if info.plane == "sagittal" and len(info.files) > 1)
    result = _run(bundle, study, tmp_path / "out")
    # both files are skipped at the scan with the reason; the series goes on without them
    skipped = [line for line in result.log if "skipped: truncated" in line]
    assert len(skipped) == 2, result.log
    assert result.outcome is Outcome.COMPLETE, result.reason
    assert result.chosen["sagittal"].num_slices == len(original.files) - 2
    assert result.report is not None and result.report.is_file()


def test_rgb_study_is_not_interpreted_as_grey(bundle: ModelBundle, source_study: Path, tmp_path: Path) -> None:
    """Every series RGB (a screen capture routed as MR): no plane can be used, the study is
    unsupported with a reason instead of a model run on colour channels."""

    def rgb(ds: pydicom.Dataset, plane: str) -> None:
        grey = ds.pixel_array.astype(np.float32)
        scaled = (255 * grey / max(float(grey.max()), 1.0)).astype(np.uint8)
        ds.PixelData = np.repeat(scaled[..., None], 3, axis=-1).tobytes()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)

    study = _copy(source_study, tmp_path / "study", rgb)
    result = _run(bundle, study, tmp_path / "out")
    assert result.outcome is Outcome.UNSUPPORTED, (result.outcome, result.reason, result.log)
    assert "no usable series for any plane" in result.reason
    assert sum("'RGB' is not greyscale" in line for line in result.log) == 3, result.log


def test_two_patients_under_one_study_uid_are_not_interpreted(
    bundle: ModelBundle, source_study: Path, tmp_path: Path
) -> None:
    def other_patient(ds: pydicom.Dataset, plane: str) -> None:
        if plane == "coronal":
            ds.PatientID, ds.PatientName = "SOMEONE-ELSE", "Other^Patient"

    study = _copy(source_study, tmp_path / "study", other_patient)
    result = _run(bundle, study, tmp_path / "out")
    assert result.outcome is Outcome.UNSUPPORTED and "patient" in result.reason.lower()
