"""Small synthetic source MR series for the SEG/SR writer tests.

Each series is classic single-frame MR (one dataset per slice) with a real geometry: axial,
sagittal, and a double-oblique coronal series (rotated about two axes), which is where
geometry bugs hide.  The datasets are returned in a shuffled order, with Instance Numbers
that run against the slice positions, so a writer that trusts file order or Instance Number
instead of sorting along the slice normal fails the tests.
"""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    """Rotation about the patient x axis, then about the z axis."""
    a, b = np.deg2rad(z_deg), np.deg2rad(x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    return rz @ rx


#: row and column direction cosines of each plane in LPS patient coordinates
PLANE_ORIENTATION: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "axial": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),
    "sagittal": (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])),
    "coronal": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])),
}

#: the oblique coronal series: coronal turned 17 degrees about z and 9 degrees about x
OBLIQUE_ROTATION = _rotation(17.0, 9.0)


@dataclass(frozen=True)
class StudyInfo:
    """Patient/study attributes shared by all series of one synthetic study."""

    study_uid: str
    frame_of_reference_uid: str
    patient_id: str = "PHANTOM-0001"
    patient_name: str = "Phantom^Knee"
    accession: str = "ACC0001"
    laterality: str = "R"
    body_part: str = "KNEE"


def new_study(**kwargs: str) -> StudyInfo:
    """A study with fresh UIDs."""
    return StudyInfo(study_uid=generate_uid(), frame_of_reference_uid=generate_uid(), **kwargs)


def make_series(
    study: StudyInfo,
    plane: str,
    *,
    oblique: bool = False,
    slices: int = 7,
    rows: int = 24,
    columns: int = 20,
    pixel_spacing: tuple[float, float] = (0.6, 0.5),
    slice_spacing: float = 3.3,
    series_number: int = 1,
    description: str | None = None,
    seed: int = 0,
) -> list[Dataset]:
    """One classic single-frame MR series, returned in shuffled order.

    Pixel spacing is anisotropic and rows != columns, so swapped axes show up in tests.
    """
    if plane not in PLANE_ORIENTATION:
        raise ValueError(f"plane must be one of {sorted(PLANE_ORIENTATION)}, got {plane!r}")
    rng = np.random.default_rng(seed)
    row_dir, col_dir = PLANE_ORIENTATION[plane]
    if oblique:
        row_dir, col_dir = OBLIQUE_ROTATION @ row_dir, OBLIQUE_ROTATION @ col_dir
    normal = np.cross(row_dir, col_dir)
    centre = np.array([12.0, -30.0, 45.0])
    # top-left corner of the middle slice, so that the slab is centred on `centre`
    corner = centre - row_dir * pixel_spacing[1] * columns / 2 - col_dir * pixel_spacing[0] * rows / 2
    series_uid = generate_uid()
    description = description or f"PD {'oblique ' if oblique else ''}{plane}"
    datasets = []
    for k in range(slices):
        position = corner + normal * slice_spacing * (k - (slices - 1) / 2)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = study.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientName = study.patient_name
        ds.PatientID = study.patient_id
        ds.PatientBirthDate = "19800101"
        ds.PatientSex = "F"
        ds.StudyDate = "20260101"
        ds.StudyTime = "101500"
        ds.SeriesDate = "20260101"
        ds.SeriesTime = "101500"
        ds.StudyID = "1"
        ds.AccessionNumber = study.accession
        ds.ReferringPhysicianName = ""
        ds.Modality = "MR"
        ds.Manufacturer = "Phantom Scanner Co"
        ds.BodyPartExamined = study.body_part
        ds.Laterality = study.laterality
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        # Instance numbers run against the spatial order on purpose.
        ds.InstanceNumber = slices - k
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.PatientPosition = "FFS"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 3000.0
        ds.EchoTime = 30.0
        ds.EchoTrainLength = 8
        ds.MagneticFieldStrength = 3.0
        ds.SliceThickness = slice_spacing
        ds.SpacingBetweenSlices = slice_spacing
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 2048
        ds.WindowWidth = 4096
        ds.PixelData = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16).tobytes()
        datasets.append(ds)
    order = rng.permutation(slices)
    return [datasets[i] for i in order]


def enhanced_from(series: Sequence[Dataset], series_number: int = 50) -> Dataset:
    """The series as one (legacy converted) Enhanced MR multi-frame dataset."""
    import highdicom as hd  # noqa: PLC0415

    return hd.legacy.LegacyConvertedEnhancedMRImage(
        list(series), series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1,
    )


def sorted_positions(series: Sequence[Dataset]) -> list[Dataset]:
    """The series sorted along its slice normal (independent of the writer's own sorting)."""
    first = series[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(series, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))))


def knee_label_map(shape: tuple[int, int, int], *, present: Sequence[int] | None = None, seed: int = 0) -> np.ndarray:
    """A synthetic knee label map (slices, rows, cols) with blobs of the given structure indices.

    Each structure is a distinct box, so masks never overlap; some slices are left empty so
    empty-frame handling is exercised.
    """
    rng = np.random.default_rng(seed)
    present = list(range(1, 12)) if present is None else list(present)
    label_map = np.zeros(shape, dtype=np.uint8)
    n_slices, rows, cols = shape
    for index in present:
        z0 = int(rng.integers(0, max(1, n_slices - 2)))
        z1 = min(n_slices - 1, z0 + int(rng.integers(1, 3)))  # leave the last slice empty
        r0, c0 = int(rng.integers(0, rows - 4)), int(rng.integers(0, cols - 4))
        label_map[z0:z1, r0 : r0 + int(rng.integers(2, 5)), c0 : c0 + int(rng.integers(2, 5))] = index
    return label_map


def dciodvfy_errors(path: str | Path) -> list[str]:
    """Lines of ``dciodvfy`` output that start with ``Error`` for the file at ``path``."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        raise RuntimeError("dciodvfy (dicom3tools) is not installed; it is a test requirement")
    result = subprocess.run([executable, str(path)], capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    if "Abort" in output:
        raise RuntimeError(f"dciodvfy could not read {path}: {output.strip()}")
    return [line for line in output.splitlines() if line.startswith("Error")]


def dsrdump_text(path: str | Path) -> str:
    """``dsrdump +Pl`` output (long values printed in full) of the SR at ``path``."""
    executable = shutil.which("dsrdump")
    if executable is None:
        raise RuntimeError("dsrdump (dcmtk) is not installed; it is a test requirement")
    result = subprocess.run([executable, "+Pl", str(path)], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"dsrdump failed on {path}: {result.stderr.strip()}")
    return result.stdout


#: PixelMed's XSLT validators exceed JDK 17's default XPath limits
PIXELMED_JVM_OPTIONS = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)
#: where Debian's libpixelmed-java puts the library
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")


@dataclass(frozen=True)
class ValidatorOutput:
    """What one validator run printed, split into its error and warning lines."""

    command: str
    path: Path
    output: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("Error")]

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("Warning")]


def pixelmed_command(validator: str, path: str | Path) -> list[str]:
    """The java command line of ``com.pixelmed.validate.<validator>`` on ``path``."""
    java = shutil.which("java")
    if java is None or not PIXELMED_JAR.is_file():
        raise RuntimeError(
            "PixelMed is not installed (java and /usr/share/java/pixelmed.jar from the Debian packages "
            "libpixelmed-java pixelmed-apps); it is a test requirement"
        )
    return [java, *PIXELMED_JVM_OPTIONS, "-cp", str(PIXELMED_JAR), f"com.pixelmed.validate.{validator}", str(path)]


def run_pixelmed(jobs: Sequence[tuple[str, str | Path]], timeout: float = 600) -> list[ValidatorOutput]:
    """Run PixelMed validators (``(validator, path)`` pairs) side by side; one output each.

    A run that does not finish with "validation complete" (an unreadable file, an unknown
    SOP class) raises, so a validator that checked nothing cannot pass a test.
    """
    started = [
        (validator, Path(path), subprocess.Popen(
            pixelmed_command(validator, path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ))
        for validator, path in jobs
    ]
    results = []
    for validator, path, process in started:
        output, _ = process.communicate(timeout=timeout)
        if "validation complete" not in output:
            raise RuntimeError(f"PixelMed {validator} did not validate {path}: {output.strip()[-2000:]}")
        results.append(ValidatorOutput(validator, path, output))
    return results


def dcentvfy_output(paths: Sequence[str | Path]) -> ValidatorOutput:
    """``dcentvfy`` (dicom3tools) over ``paths``: attributes of one entity that differ between files."""
    executable = shutil.which("dcentvfy")
    if executable is None:
        raise RuntimeError("dcentvfy (dicom3tools) is not installed; it is a test requirement")
    result = subprocess.run(
        [executable, *map(str, paths)], capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    if "Abort" in output:
        raise RuntimeError(f"dcentvfy could not read its files: {output.strip()[-2000:]}")
    return ValidatorOutput("dcentvfy", Path(paths[0]), output)
