"""Builders of small training-data folders for tests: MRNet layout, NIfTI folders, DICOM studies.

Every builder returns what it wrote (labels, volumes, UIDs) so tests compare the readers'
output with known values instead of re-deriving them.  Volumes have a value pattern that
differs per slice, row and column, so a transposed or flipped axis shows up as a mismatch.
DICOM series are written with :mod:`tests.inference.dicom_factory` (classic MR Image
Storage with explicit geometry).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.labels import label_keys
from tests.inference.dicom_factory import Geometry, SeriesHeader, orientation, write_classic_series

MRNET_TASKS = ("abnormal", "acl", "meniscus")

#: RAS direction of each array axis of a slice-first volume, per plane (see
#: training.datasets.SLICE_FIRST_AXCODES): used to write NIfTI files with a known answer
_AXIS_RAS = {"L": (-1, 0, 0), "R": (1, 0, 0), "P": (0, -1, 0), "A": (0, 1, 0), "I": (0, 0, -1), "S": (0, 0, 1)}


def ramp_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """float32 volume whose value identifies (slice, row, col) plus a little noise."""
    s, r, c = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    noise = np.random.default_rng(seed).random(shape, dtype=np.float32)
    return 1000.0 * s + 10.0 * r + 0.1 * c + noise * 0.01


# ------------------------------------------------------------------------------------ MRNet


def make_mrnet(root: Path, split: str = "train", n_cases: int = 6, size: int = 32, seed: int = 0,
               first_case: int = 0) -> dict[str, dict]:
    """Write MRNet's layout: ``split/{axial,coronal,sagittal}/NNNN.npy`` + three CSVs.

    Returns case id -> {"labels": (3,) float32, "shapes": {plane: (S, size, size)}}.
    Slice counts differ per plane and case, as in MRNet.
    """
    rng = np.random.default_rng(seed)
    cases: dict[str, dict] = {}
    for i in range(first_case, first_case + n_cases):
        case = f"{i:04d}"
        acl = int(rng.random() < 0.4)
        meniscus = int(rng.random() < 0.4)
        abnormal = int(acl or meniscus or rng.random() < 0.3)
        shapes = {}
        for plane in ("axial", "coronal", "sagittal"):
            shape = (int(rng.integers(17, 30)), size, size)
            folder = root / split / plane
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{case}.npy", rng.integers(0, 256, shape, dtype=np.uint8))
            shapes[plane] = shape
        cases[case] = {"labels": np.array([abnormal, acl, meniscus], dtype=np.float32), "shapes": shapes}
    for t, task in enumerate(MRNET_TASKS):
        with (root / f"{split}-{task}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            for case, info in cases.items():
                writer.writerow([case, int(info["labels"][t])])
    return cases


# ------------------------------------------------------------------------------------ NIfTI


def write_slice_first_nifti(path: Path, volume: np.ndarray, plane: str, axcodes: dict[str, tuple[str, str, str]],
                            permutation: tuple[int, int, int] = (0, 1, 2), flips: tuple[bool, bool, bool] = (False, False, False),
                            spacing: tuple[float, float, float] = (3.0, 0.5, 0.5), dtype=np.float32) -> None:
    """Write ``volume`` (S, R, C, in ``axcodes[plane]`` orientation) to NIfTI, stored with its
    axes permuted by ``permutation`` and flipped where ``flips`` says, with the affine that
    keeps every voxel at its physical place.  A correct reader gives ``volume`` back."""
    import nibabel as nib

    codes = axcodes[plane]
    affine = np.eye(4)
    for axis in range(3):
        affine[:3, axis] = np.asarray(_AXIS_RAS[codes[axis]], float) * spacing[axis]
    affine[:3, 3] = (10.0, -20.0, 30.0)
    data = np.asarray(volume)
    # flip stored axes, moving the origin to the voxel that becomes index 0
    for axis, flip in enumerate(flips):
        if flip:
            affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * (data.shape[axis] - 1)
            affine[:3, axis] = -affine[:3, axis]
            data = np.flip(data, axis=axis)
    data = np.transpose(data, permutation)
    affine[:, :3] = affine[:, list(permutation)]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data).astype(dtype), affine), str(path))


def make_nifti_folder(root: Path, axcodes: dict[str, tuple[str, str, str]], joint: str = "knee") -> dict[str, dict]:
    """Three NIfTI cases: full planes with masks, stored in scrambled axis orders; one case
    without an axial series; EHR partly missing.  Returns case id -> expected values."""
    keys = label_keys(joint)
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    layouts = [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True)), ((1, 2, 0), (False, True, False))]
    cases: dict[str, dict] = {}
    rows = []
    for n, case in enumerate(("n001", "n002", "n003")):
        folder = root / case
        folder.mkdir()
        volumes, masks = {}, {}
        planes = ("sagittal", "coronal") if case == "n003" else ("sagittal", "coronal", "axial")
        for p, plane in enumerate(planes):
            shape = (9 + p, 12, 14)
            volume = ramp_volume(shape, seed=n * 3 + p)
            perm, flips = layouts[(n + p) % 3]
            write_slice_first_nifti(folder / f"{plane}.nii.gz", volume, plane, axcodes, perm, flips)
            volumes[plane] = volume
            if plane == "sagittal":
                mask = (np.arange(shape[1])[None, :, None] % 12 + np.zeros(shape, int)).astype(np.uint8)
                mask[0] = 255  # first slice not annotated
                write_slice_first_nifti(folder / "sagittal_mask.nii.gz", mask, plane, axcodes, perm, flips, dtype=np.uint8)
                masks[plane] = mask
        labels = rng.integers(0, 2, len(keys)).astype(np.float32)
        if case == "n002":
            labels[1] = np.nan
        row = {"case_id": case, "joint": joint, "site": f"site{n % 2}", "age": "" if n == 1 else str(30 + n),
               "sex": "F" if n else "", "height_m": "1.70", "weight_kg": ""}
        row.update({k: ("" if np.isnan(v) else str(int(v))) for k, v in zip(keys, labels)})
        rows.append(row)
        cases[case] = {"labels": labels, "volumes": volumes, "masks": masks, "row": row}
    with (root / "cases.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return cases


# ------------------------------------------------------------------------------------ DICOM


@dataclass
class WrittenSeries:
    plane: str
    series_uid: str
    description: str
    volume: np.ndarray  # (S, R, C) stored values in slice order (ascending along the normal)
    geometry: Geometry


def series_affine_lps(geometry: Geometry) -> np.ndarray:
    """(col, row, slice) index -> LPS mm of a series written with ``geometry``."""
    o = np.asarray(geometry.orientation, float)
    a = np.eye(4)
    a[:3, 0] = o[:3] * geometry.pixel_spacing[1]
    a[:3, 1] = o[3:] * geometry.pixel_spacing[0]
    a[:3, 2] = geometry.normal * geometry.slice_spacing
    a[:3, 3] = geometry.origin
    return a


def write_mask_for_series(path: Path, mask: np.ndarray, geometry: Geometry, reverse_slices: bool = False) -> None:
    """Write a (S, R, C) label map as NIfTI on the series grid: array (col, row, slice), RAS
    affine.  ``reverse_slices`` stores the slice axis reversed (origin moved accordingly),
    as some tools write it; a reader must undo it from the affine."""
    import nibabel as nib

    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ series_affine_lps(geometry)
    data = np.transpose(mask, (2, 1, 0))
    if reverse_slices:
        affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * (data.shape[2] - 1)
        affine[:3, 2] = -affine[:3, 2]
        data = data[:, :, ::-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data).astype(np.uint8), affine), str(path))


def write_study(case_dir: Path, seed: int, study_uid: str, patient_id: str, accession: str,
                distractor: bool = False, planes: tuple[str, ...] = ("sagittal", "coronal", "axial"),
                size: int = 16, slices: int = 10) -> dict[str, WrittenSeries]:
    """One MR study: a fat-sat PD series per plane (+ a T1 sagittal distractor that selection
    must pass over).  Returns plane -> the series selection should choose."""
    rng = np.random.default_rng(seed)
    written: dict[str, WrittenSeries] = {}
    number = 1
    for plane in planes:
        volume = rng.integers(0, 3000, (slices, size, size + 2)).astype(np.uint16)
        geometry = Geometry(orientation=orientation(plane), origin=(-40.0, -30.0, 40.0), pixel_spacing=(0.9, 0.8),
                            slice_spacing=3.5, slice_thickness=3.0)
        description = f"PD FS {plane[:3].upper()}"
        header = SeriesHeader(series_description=description, series_number=number, study_uid=study_uid,
                              patient_id=patient_id, accession=accession)
        number += 1
        write_classic_series(case_dir / f"{number:02d}_{plane}", volume, geometry, header)
        written[plane] = WrittenSeries(plane, header.series_uid, description, volume.astype(np.float32), geometry)
    if distractor:
        volume = rng.integers(0, 3000, (slices, size, size + 2)).astype(np.uint16)
        header = SeriesHeader(series_description="T1 SAG", series_number=number, study_uid=study_uid,
                              patient_id=patient_id, accession=accession)
        write_classic_series(case_dir / f"{number + 1:02d}_t1", volume, Geometry(orientation=orientation("sagittal")), header)
    return written


def make_phantom_like_folder(root: Path, n_cases: int = 3, joint: str = "knee") -> dict[str, dict]:
    """A folder in ``orthonode phantom``'s documented layout, built by hand: cases.csv,
    ``<case>/dicom/`` (one study; case 1 has a distractor) and, for the knee, masks named by
    SeriesInstanceUID (the second case stores its masks with the slice axis reversed).
    Returns case id -> {"labels", "series": plane -> WrittenSeries, "masks": plane -> (S,R,C)}."""
    from pydicom.uid import generate_uid

    keys = label_keys(joint)
    rng = np.random.default_rng(11)
    root.mkdir(parents=True, exist_ok=True)
    rows, cases = [], {}
    for i in range(n_cases):
        case = f"case{i:03d}"
        series = write_study(root / case / "dicom", seed=i, study_uid=generate_uid(), patient_id=case,
                             accession=f"A{i}", distractor=(i == 1))
        masks = {}
        if joint == "knee":
            for plane, s in series.items():
                mask = (s.volume > 1500).astype(np.uint8) * (1 + i)
                write_mask_for_series(root / case / "masks" / f"{s.series_uid}.nii.gz", mask, s.geometry,
                                      reverse_slices=(i == 1))
                masks[plane] = mask
        labels = (rng.random(len(keys)) < 0.5).astype(np.float32)
        row = {"case_id": case, "joint": joint, "site": ("alpha", "beta")[i % 2], "laterality": "R",
               "age": "" if i == 2 else str(40 + i), "sex": ("M", "F")[i % 2], "height_m": "1.75",
               "weight_kg": "" if i == 0 else "80"}
        row.update({k: str(int(v)) for k, v in zip(keys, labels)})
        rows.append(row)
        cases[case] = {"labels": labels, "series": series, "masks": masks, "row": row}
    with (root / "cases.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return cases
