"""Training data readers: every supported layout becomes a list of :class:`ExamRecord`.

Why one module of about 1,000 lines: one small reader per supported layout, sharing the
record types and the header parsing; a new layout is one more reader here.

A record describes one exam (one study of one joint): its labels, its EHR values and, per
plane, *how* to load the volume (a :class:`VolumeSource`), never the pixels themselves, so a
list of records for thousands of exams is cheap to build, to split and to hash.  The MONAI
datasets in :mod:`training.data` load and preprocess the volumes lazily.

Supported layouts (see each reader's docstring for the exact files):

* ``phantom:DIR`` -- a folder written by ``orthonode phantom`` (:func:`read_phantom_folder`);
* ``dicom:DIR:LABELS.csv`` -- any DICOM studies plus a labels CSV (:func:`read_dicom_folder`);
* ``mrnet:DIR:train|valid`` -- the published MRNet layout (:func:`read_mrnet`);
* ``nifti:DIR`` -- one NIfTI per plane per case plus a manifest (:func:`read_nifti_folder`).

Series of DICOM studies are chosen by :func:`inference.selection.select_series`, exactly the
logic the node runs on studies it receives, so a model never trains on a different kind of
series than the one it is later shown.  Every volume comes out slice-first ``(S, R, C)``
float32, the input contract of :func:`inference.preprocess.preprocess_volume`.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from inference.labels import JOINTS, PLANES, label_keys as joint_label_keys

log = logging.getLogger(__name__)

#: EHR fields of :attr:`ExamRecord.ehr`, in the order :func:`inference.model.encode_ehr` takes them
EHR_FIELDS: tuple[str, ...] = ("age", "sex", "height_m", "weight_kg")

#: MRNet's three tasks, in the order of its published CSV files
MRNET_LABELS: tuple[str, ...] = ("abnormal", "acl", "meniscus")

#: Columns of a labels CSV / manifest that identify or describe an exam rather than label it
KEY_COLUMNS: tuple[str, ...] = ("case_id", "study_instance_uid", "accession")
META_COLUMNS: tuple[str, ...] = (
    "case_id",
    "study_instance_uid",
    "accession",
    "patient_id",
    "joint",
    "site",
    "laterality",
) + EHR_FIELDS

SOURCE_KINDS: tuple[str, ...] = ("dicom", "npy", "nifti")


class DatasetError(ValueError):
    """A data folder or CSV does not follow its documented layout; the message names the file."""


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


@dataclass
class VolumeSource:
    """How to load one plane of one exam as a slice-first ``(S, R, C)`` float32 volume.

    ``kind`` is ``"dicom"`` (``paths`` are the series' files, ``series`` the header summary
    from :func:`inference.series.scan_folder`), ``"npy"`` (one ``.npy`` file holding
    ``(S, R, C)``) or ``"nifti"`` (one NIfTI file, reoriented to the plane's slice-first
    convention, see :func:`read_nifti_folder`).  ``mask_path`` is an optional label map
    (NIfTI) on the same voxel grid; value 255 (uint8) or any negative value marks voxels that
    were not annotated and become -1.
    """

    kind: str
    paths: tuple[Path, ...]
    plane: str
    series_uid: str | None = None
    mask_path: Path | None = None
    description: str = ""
    series: Any = None  # inference.series.SeriesInfo for kind == "dicom"

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"VolumeSource.kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if self.plane not in PLANES:
            raise ValueError(f"VolumeSource.plane must be one of {PLANES}, got {self.plane!r}")
        self.paths = tuple(Path(p) for p in self.paths)
        if not self.paths:
            raise ValueError("VolumeSource.paths is empty")
        if self.kind == "dicom" and self.series is None:
            raise ValueError("VolumeSource.series (a SeriesInfo) is required for kind 'dicom'")
        if self.mask_path is not None:
            self.mask_path = Path(self.mask_path)

    # -- pixels -------------------------------------------------------------------------------
    def load(self) -> np.ndarray:
        """The volume as float32 ``(S, R, C)``."""
        if self.kind == "dicom":
            return self._load_dicom().pixels.astype(np.float32, copy=False)
        if self.kind == "npy":
            volume = np.load(self.paths[0], allow_pickle=False)
            if volume.ndim != 3:
                raise DatasetError(f"{self.paths[0]}: expected a 3D (S, R, C) array, got shape {volume.shape}")
            return volume.astype(np.float32)
        volume, _ = _load_nifti_slice_first(self.paths[0], self.plane)
        return volume.astype(np.float32)

    def load_mask(self) -> np.ndarray | None:
        """The label map as int64 ``(S, R, C)`` aligned with :meth:`load`, -1 = not annotated."""
        if self.mask_path is None:
            return None
        if not self.mask_path.is_file():
            raise DatasetError(f"mask file {self.mask_path} of {self.description or self.paths[0]} does not exist")
        if self.kind == "dicom":
            mask = _mask_on_series_grid(self.mask_path, self._load_dicom())
        elif self.kind == "nifti":
            mask, mask_affine = _load_nifti_slice_first(self.mask_path, self.plane)
            _, image_affine = _load_nifti_slice_first(self.paths[0], self.plane, header_only=True)
            if not np.allclose(mask_affine, image_affine, atol=1e-3):
                raise DatasetError(f"mask {self.mask_path} is not on the voxel grid of {self.paths[0]} (affines differ)")
        else:
            mask = _read_nifti_array(self.mask_path)
        return _mask_to_int64(mask, self.mask_path)

    def num_slices(self) -> int:
        """Number of slices without decoding pixels (needed to plan sliding windows)."""
        if self.kind == "dicom":
            return int(self.series.num_frames)
        if self.kind == "npy":
            return int(np.load(self.paths[0], mmap_mode="r", allow_pickle=False).shape[0])
        import nibabel as nib

        image = nib.load(str(self.paths[0]))
        ornt = _nifti_transform(image.affine, self.plane)
        return int(image.shape[int(np.flatnonzero(ornt[:, 0] == 0)[0])])

    def nbytes_on_disk(self) -> int:
        """Total size of the files (part of the data fingerprint)."""
        files = list(self.paths) + ([self.mask_path] if self.mask_path is not None else [])
        return sum(p.stat().st_size for p in files if p.exists())

    def _load_dicom(self) -> Any:
        from inference.series import load_series

        return load_series(self.series)


@dataclass
class ExamRecord:
    """One exam: labels (NaN = unknown), EHR (None = missing) and a :class:`VolumeSource` per plane.

    ``labels`` is None when the exam has no labels at all (usable for pretraining only).
    ``selection_log`` keeps the series-selection explanation (DICOM sources) so a data set can
    be audited the same way the node's choices are.  ``source`` names the reader
    (``phantom``, ``dicom``, ``mrnet``, ``nifti``): evaluation states that phantom results
    are not clinical results.
    """

    exam_id: str
    patient_id: str
    site: str | None
    joint: str | None
    label_keys: tuple[str, ...]
    labels: np.ndarray | None
    ehr: dict[str, Any] = field(default_factory=lambda: {k: None for k in EHR_FIELDS})
    planes: dict[str, VolumeSource] = field(default_factory=dict)
    selection_log: list[str] = field(default_factory=list)
    source: str = "unknown"
    laterality: str | None = None

    def __post_init__(self) -> None:
        self.label_keys = tuple(self.label_keys)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.float32)
            if self.labels.shape != (len(self.label_keys),):
                raise ValueError(
                    f"exam {self.exam_id}: labels shape {self.labels.shape} does not match "
                    f"label_keys {self.label_keys}"
                )
            bad = ~np.isnan(self.labels) & ~np.isin(self.labels, (0.0, 1.0))
            if bad.any():
                raise ValueError(f"exam {self.exam_id}: labels must be 0, 1 or NaN, got {self.labels}")
        unknown = set(self.ehr) - set(EHR_FIELDS)
        if unknown:
            raise ValueError(f"exam {self.exam_id}: unknown EHR fields {sorted(unknown)}; allowed {EHR_FIELDS}")
        self.ehr = {k: self.ehr.get(k) for k in EHR_FIELDS}
        for plane in self.planes:
            if plane not in PLANES:
                raise ValueError(f"exam {self.exam_id}: unknown plane {plane!r}")

    def label_dict(self) -> dict[str, float]:
        """label key -> 0/1/NaN (empty when the exam is unlabeled)."""
        if self.labels is None:
            return {}
        return {k: float(v) for k, v in zip(self.label_keys, self.labels)}


# --------------------------------------------------------------------------------------------
# CSV helpers
# --------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"CSV file {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise DatasetError(f"{path} is empty (a header row is required)")
        rows = []
        for row in reader:
            if None in row:
                raise DatasetError(f"{path} line {reader.line_num}: more cells than header columns")
            rows.append({k.strip(): (v or "").strip() for k, v in row.items()})
    return rows


def _parse_label(value: str, column: str, where: str) -> float:
    if value == "":
        return math.nan
    if value in ("0", "1", "0.0", "1.0"):
        return float(value)
    raise DatasetError(f"{where}: column {column!r} must be 0, 1 or empty, got {value!r}")


def _parse_float(value: str | None, column: str, where: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise DatasetError(f"{where}: column {column!r} must be a number or empty, got {value!r}") from None


def _parse_sex(value: str | None, where: str) -> str | None:
    if value is None or value == "":
        return None
    v = value.upper()
    if v not in ("M", "F", "O"):
        raise DatasetError(f"{where}: column 'sex' must be M, F, O or empty, got {value!r}")
    return v


def _ehr_from_row(row: dict[str, str], where: str) -> dict[str, Any]:
    return {
        "age": _parse_float(row.get("age"), "age", where),
        "sex": _parse_sex(row.get("sex"), where),
        "height_m": _parse_float(row.get("height_m"), "height_m", where),
        "weight_kg": _parse_float(row.get("weight_kg"), "weight_kg", where),
    }


def _label_columns(fieldnames: Iterable[str], joint: str | None, path: Path) -> tuple[str, ...]:
    """Label columns of a CSV: every non-meta column, in the label table's order when it matches."""
    columns = tuple(c for c in fieldnames if c not in META_COLUMNS)
    if joint is not None:
        expected = joint_label_keys(joint)
        missing = [k for k in expected if k not in columns]
        if missing:
            raise DatasetError(f"{path}: joint {joint!r} needs label columns {list(expected)}; missing {missing}")
        extra = [c for c in columns if c not in expected]
        if extra:
            raise DatasetError(f"{path}: columns {extra} are neither labels of {joint!r} nor known fields {META_COLUMNS}")
        return expected
    return columns


def _row_joint(row: dict[str, str], where: str) -> str | None:
    joint = row.get("joint") or None
    if joint is not None and joint not in JOINTS:
        raise DatasetError(f"{where}: column 'joint' must be one of {JOINTS}, got {joint!r}")
    return joint


# --------------------------------------------------------------------------------------------
# DICOM studies (phantom folders and user folders)
# --------------------------------------------------------------------------------------------


def _resolve_rules(rules: Any) -> Any:
    if rules is None:
        from inference.selection import DEFAULT_RULES

        return DEFAULT_RULES
    return rules


def _select_planes(series: list[Any], rules: Any, where: str) -> tuple[dict[str, VolumeSource], list[str]]:
    """Choose one series per plane with the node's own selection logic."""
    from inference.selection import select_series

    selection = select_series(series, rules)
    sources = {}
    for plane, info in selection.chosen.items():
        sources[plane] = VolumeSource(
            kind="dicom",
            paths=tuple(info.files),
            plane=plane,
            series_uid=info.series_instance_uid,
            description=f"{where} series {info.series_number} {info.series_description!r}",
            series=info,
        )
    log_lines = list(selection.log)
    for plane in selection.missing:
        log_lines.append(f"{where}: no {plane} series selected")
    return sources, log_lines


#: a folder with at least this many cases is scanned by several processes
PARALLEL_SCAN_MIN_CASES = 32


def _scan_many(folders: list[Path], workers: int | None) -> list[list[Any]]:
    """``scan_folder`` of every folder, in order; by a pool of processes for large sets.

    Header scanning is CPU-bound Python (pydicom converts every header value, ~3 ms per
    file), so a few hundred cases take minutes in one process.  ``workers`` None picks
    ``min(cpu_count, 16)`` when there are at least :data:`PARALLEL_SCAN_MIN_CASES` folders;
    1 scans in this process.  Where ``fork`` exists the children are forked (they run only
    pydicom code, never torch's thread pools) so that callers need no ``__main__`` guard.
    """
    from inference.series import scan_folder

    if workers is None:
        workers = min(os.cpu_count() or 1, 16) if len(folders) >= PARALLEL_SCAN_MIN_CASES else 1
    if workers <= 1 or len(folders) < 2:
        return [scan_folder(folder) for folder in folders]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
        return list(pool.map(scan_folder, folders, chunksize=max(1, len(folders) // (4 * workers))))


def read_phantom_folder(root: str | Path, rules: Any = None, workers: int | None = None) -> list[ExamRecord]:
    """Read a folder written by ``orthonode phantom`` / ``generate_dataset``.

    Layout: ``root/cases.csv`` (``case_id, joint, site, laterality, age, sex, height_m,
    weight_kg`` then one 0/1 column per label of the joint; an empty EHR cell is missing),
    ``root/<case_id>/dicom/...`` (one study) and, for the knee,
    ``root/<case_id>/masks/<SeriesInstanceUID>.nii.gz`` (label map on that series' grid).
    Series are chosen per plane by :func:`inference.selection.select_series` with ``rules``
    (default: the node's ``DEFAULT_RULES``); the mask of a chosen series is attached when present.
    ``workers``: processes scanning the cases' headers (see :func:`_scan_many`).
    """
    root = Path(root)
    manifest = root / "cases.csv"
    rows = _read_csv(manifest)
    rules = _resolve_rules(rules)
    checked = []
    for line, row in enumerate(rows, start=2):
        where = f"{manifest} line {line}"
        case_id = row.get("case_id", "")
        if not case_id:
            raise DatasetError(f"{where}: empty or missing 'case_id'")
        joint = _row_joint(row, where)
        if joint is None:
            raise DatasetError(f"{where}: a phantom folder needs the 'joint' column")
        keys = joint_label_keys(joint)
        missing = [k for k in keys if k not in row]
        if missing:
            raise DatasetError(f"{manifest}: label columns {missing} of joint {joint!r} are missing")
        labels = np.array([_parse_label(row[k], k, where) for k in keys], dtype=np.float32)
        dicom_dir = root / case_id / "dicom"
        if not dicom_dir.is_dir():
            raise DatasetError(f"{where}: case folder {dicom_dir} does not exist")
        checked.append((row, case_id, joint, keys, labels, dicom_dir, where))
    scanned = _scan_many([item[5] for item in checked], workers)
    records = []
    for (row, case_id, joint, keys, labels, dicom_dir, where), series in zip(checked, scanned):
        planes, sel_log = _select_planes(series, rules, f"case {case_id}")
        for source in planes.values():
            mask = root / case_id / "masks" / f"{source.series_uid}.nii.gz"
            if mask.is_file():
                source.mask_path = mask
        records.append(
            ExamRecord(
                exam_id=case_id,
                patient_id=case_id,
                site=row.get("site") or None,
                joint=joint,
                label_keys=keys,
                labels=labels,
                ehr=_ehr_from_row(row, where),
                planes=planes,
                selection_log=sel_log,
                source="phantom",
                laterality=row.get("laterality") or None,
            )
        )
    log.info("read %d phantom cases from %s", len(records), root)
    return records


def _header_facts(path: Path) -> dict[str, Any]:
    """EHR values and identifiers from one instance's header.

    The EHR values come from :func:`inference.model.ehr_from_dicom`, the reader the node
    uses, so a model trains on exactly the values it is later served.  A malformed value is
    logged and masked as missing (never guessed); it does not stop a data set from loading.
    """
    import pydicom

    from inference.model import EHR_DICOM_KEYWORDS, ehr_from_dicom

    ds = pydicom.dcmread(
        path,
        stop_before_pixels=True,
        specific_tags=[*EHR_DICOM_KEYWORDS.values(), "PatientID", "AccessionNumber"],
    )
    ehr, notes = ehr_from_dicom(ds)
    for note in notes:
        if "not used" in note:
            log.warning("%s: %s", path, note)
    return {
        "ehr": ehr,
        "patient_id": str(ds.get("PatientID", "") or "") or None,
        "accession": str(ds.get("AccessionNumber", "") or "") or None,
    }


def read_dicom_folder(root: str | Path, labels_csv: str | Path | None, rules: Any = None) -> list[ExamRecord]:
    """Read any folder of DICOM studies plus a labels CSV.

    Studies are found by scanning ``root`` recursively and grouping series by
    StudyInstanceUID, so both "one study per sub-folder" and a flat dump work.  The labels CSV
    identifies each study by exactly one of these key columns (the first present wins):

    * ``case_id`` -- the name of the top-level sub-folder of ``root`` that holds the study;
    * ``study_instance_uid`` -- the StudyInstanceUID;
    * ``accession`` -- the AccessionNumber of the study's instances.

    Optional columns: ``patient_id`` (default: the header's PatientID, used to keep a
    patient's exams on one side of a split and to average predictions per patient),
    ``joint``, ``site``, ``laterality``, ``age``, ``sex``, ``height_m``, ``weight_kg`` (an empty
    EHR cell falls back to the header's PatientAge/PatientSex/PatientSize/PatientWeight, the
    values the node reads from studies it receives).  Every other column is a label (0, 1, empty = unknown); with a ``joint``
    column the label columns must be that joint's keys.  Studies without a CSV row are
    returned with ``labels=None`` (pretraining only); CSV rows without a study are logged.
    ``labels_csv=None`` reads unlabeled studies.
    """
    from inference.series import scan_folder

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"DICOM folder {root} does not exist")
    rules = _resolve_rules(rules)
    studies: dict[str, list[Any]] = {}
    for info in scan_folder(root):
        studies.setdefault(info.study_instance_uid, []).append(info)
    if not studies:
        raise DatasetError(f"no DICOM series found under {root}")

    def case_folder(series: list[Any]) -> str:
        """Top-level sub-folder of ``root`` holding the study ("" for files directly in root)."""
        rels = [Path(f).resolve().relative_to(root.resolve()).parts for s in series for f in s.files]
        tops = {parts[0] if len(parts) > 1 else "" for parts in rels}
        if len(tops) != 1:
            raise DatasetError(f"study {series[0].study_instance_uid} spans several sub-folders of {root}: {sorted(tops)}")
        return tops.pop()

    rows: list[dict[str, str]] = []
    key_column = None
    columns: tuple[str, ...] = ()
    if labels_csv is not None:
        labels_csv = Path(labels_csv)
        rows = _read_csv(labels_csv)
        if not rows:
            raise DatasetError(f"{labels_csv} has no data rows")
        fieldnames = list(rows[0].keys())
        key_column = next((c for c in KEY_COLUMNS if c in fieldnames), None)
        if key_column is None:
            raise DatasetError(f"{labels_csv}: needs one key column of {KEY_COLUMNS}; found {fieldnames}")
        joints = {r.get("joint") or None for r in rows}
        columns = _label_columns(fieldnames, joints.pop() if len(joints) == 1 else None, labels_csv)
        if not columns:
            raise DatasetError(f"{labels_csv}: no label columns (all columns are known fields {META_COLUMNS})")

    by_key: dict[str, tuple[int, dict[str, str]]] = {}
    for line, row in enumerate(rows, start=2):
        key = row.get(key_column or "", "")
        if not key:
            raise DatasetError(f"{labels_csv} line {line}: empty {key_column!r}")
        if key in by_key:
            raise DatasetError(f"{labels_csv} line {line}: {key_column} {key!r} repeats line {by_key[key][0]}")
        by_key[key] = (line, row)

    records = []
    used: set[str] = set()
    folders = {uid: case_folder(series) for uid, series in studies.items()}
    studies_per_folder: dict[str, int] = {}
    for folder in folders.values():
        studies_per_folder[folder] = studies_per_folder.get(folder, 0) + 1
    for study_uid in sorted(studies):
        series = studies[study_uid]
        facts = _header_facts(Path(series[0].files[0]))
        folder = folders[study_uid]
        exam_key = {"case_id": folder, "study_instance_uid": study_uid, "accession": facts["accession"]}
        key = exam_key[key_column] if key_column else None
        row_entry = by_key.get(key) if key is not None else None
        if key_column == "case_id" and row_entry is not None and studies_per_folder[folder] > 1:
            raise DatasetError(
                f"{labels_csv}: case_id {folder!r} names a folder holding {studies_per_folder[folder]} studies; "
                "use the study_instance_uid key column"
            )
        if row_entry is not None:
            exam_id = str(key)
        else:
            exam_id = folder if folder and studies_per_folder[folder] == 1 else study_uid
        planes, sel_log = _select_planes(series, rules, f"study {exam_id}")
        ehr = dict(facts["ehr"])
        labels = None
        joint = site = laterality = None
        patient_id = facts["patient_id"] or exam_id
        if row_entry is not None:
            used.add(key)
            line, row = row_entry
            where = f"{labels_csv} line {line}"
            joint = _row_joint(row, where)
            site = row.get("site") or None
            laterality = row.get("laterality") or None
            patient_id = row.get("patient_id") or patient_id
            labels = np.array([_parse_label(row.get(c, ""), c, where) for c in columns], dtype=np.float32)
            for k, v in _ehr_from_row(row, where).items():
                if v is not None:
                    ehr[k] = v
        elif labels_csv is not None:
            log.warning("study %s (folder %s) has no row in %s: read as unlabeled", study_uid, folder, labels_csv)
        records.append(
            ExamRecord(
                exam_id=exam_id,
                patient_id=patient_id,
                site=site,
                joint=joint,
                label_keys=columns,
                labels=labels,
                ehr=ehr,
                planes=planes,
                selection_log=sel_log,
                source="dicom",
                laterality=laterality,
            )
        )
    unused = sorted(set(by_key) - used)
    if unused:
        log.warning("%d rows of %s match no study under %s: %s", len(unused), labels_csv, root, unused[:10])
    if labels_csv is not None and not used:
        raise DatasetError(f"no row of {labels_csv} ({key_column}) matches a study under {root}")
    log.info("read %d DICOM studies from %s", len(records), root)
    return records


# --------------------------------------------------------------------------------------------
# MRNet
# --------------------------------------------------------------------------------------------

MRNET_PLANES: tuple[str, ...] = ("sagittal", "coronal", "axial")


def read_mrnet(root: str | Path, split: str) -> list[ExamRecord]:
    """Read MRNet's published layout.

    ``root/{train,valid}/{axial,coronal,sagittal}/NNNN.npy`` (uint8 ``(S, 256, 256)``, slice
    first already) and ``root/{train,valid}-{abnormal,acl,meniscus}.csv`` whose rows are
    ``case_id,label`` without a header.  Label keys are ``("abnormal", "acl", "meniscus")``
    (MRNet's tasks, not the knee label table).  MRNet has one exam per patient and a single
    centre: ``patient_id`` is the exam id and ``site`` is ``"mrnet"``.  An exam listed in a CSV
    without its three volumes, or a volume without a label row, is an error.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    root = Path(root)
    labels: dict[str, dict[str, float]] = {}
    for task in MRNET_LABELS:
        path = root / f"{split}-{task}.csv"
        if not path.is_file():
            raise DatasetError(f"MRNet label file {path} does not exist")
        with path.open(newline="") as fh:
            for line, row in enumerate(csv.reader(fh), start=1):
                if not row:
                    continue
                if len(row) != 2:
                    raise DatasetError(f"{path} line {line}: expected 'case_id,label', got {row}")
                case = row[0].strip()
                if not case.isdigit():
                    raise DatasetError(f"{path} line {line}: case id {case!r} is not a number (no header expected)")
                labels.setdefault(case.zfill(4), {})[task] = _parse_label(row[1].strip(), task, f"{path} line {line}")
    records = []
    for case in sorted(labels):
        missing_tasks = [t for t in MRNET_LABELS if t not in labels[case]]
        if missing_tasks:
            raise DatasetError(f"MRNet {split} case {case} has no row in {[f'{split}-{t}.csv' for t in missing_tasks]}")
        planes = {}
        for plane in MRNET_PLANES:
            path = root / split / plane / f"{case}.npy"
            if not path.is_file():
                raise DatasetError(f"MRNet {split} case {case}: {path} does not exist")
            planes[plane] = VolumeSource(kind="npy", paths=(path,), plane=plane, description=f"MRNet {split}/{plane}/{case}")
        records.append(
            ExamRecord(
                exam_id=case,
                patient_id=case,
                site="mrnet",
                joint="knee",
                label_keys=MRNET_LABELS,
                labels=np.array([labels[case][t] for t in MRNET_LABELS], dtype=np.float32),
                planes=planes,
                source="mrnet",
            )
        )
    for plane in MRNET_PLANES:
        folder = root / split / plane
        extra = sorted(p.stem for p in folder.glob("*.npy") if p.stem not in labels) if folder.is_dir() else []
        if extra:
            raise DatasetError(f"{folder}: volumes without labels: {extra[:10]}")
    log.info("read %d MRNet %s exams from %s", len(records), split, root)
    return records


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------

#: slice-first orientation per plane as RAS axis codes of (S, R, C): the usual DICOM layout
#: (sagittal: slices toward patient left, rows head->foot, columns anterior->posterior;
#: coronal: slices anterior->posterior, rows head->foot, columns right->left; axial: slices
#: foot->head, rows anterior->posterior, columns right->left).
SLICE_FIRST_AXCODES: dict[str, tuple[str, str, str]] = {
    "sagittal": ("L", "I", "P"),
    "coronal": ("P", "I", "L"),
    "axial": ("S", "P", "L"),
}


def _nifti_transform(affine: np.ndarray, plane: str) -> np.ndarray:
    import nibabel as nib

    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(SLICE_FIRST_AXCODES[plane])
    return nib.orientations.ornt_transform(current, target)


def _load_nifti_slice_first(path: Path, plane: str, header_only: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
    """Load a NIfTI and reorient it to the plane's slice-first (S, R, C) layout.

    Returns the array (None with ``header_only``) and the affine of the reoriented grid.
    The axes are permuted/flipped to the nearest cardinal directions; an oblique volume keeps
    its obliquity (no resampling).
    """
    import nibabel as nib

    if not Path(path).is_file():
        raise DatasetError(f"NIfTI file {path} does not exist")
    image = nib.load(str(path))
    if len(image.shape) != 3:
        raise DatasetError(f"{path}: expected a 3D image, got shape {image.shape}")
    transform = _nifti_transform(image.affine, plane)
    affine = image.affine @ nib.orientations.inv_ornt_aff(transform, image.shape)
    if header_only:
        return None, affine
    data = np.asanyarray(image.dataobj)
    return nib.orientations.apply_orientation(data, transform), affine


def _read_nifti_array(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj)


def _mask_on_series_grid(mask_path: Path, volume: Any) -> np.ndarray:
    """Bring a NIfTI label map onto a loaded DICOM series' (S, R, C) index order.

    The NIfTI affine (RAS) is converted to LPS and compared with the series affine
    ((col, row, slice) index -> LPS mm); the two grids must be the same up to a permutation
    and flip of axes, which is undone.  Anything else (a resampled mask) is an error, not
    a silent resampling.
    """
    import nibabel as nib

    image = nib.load(str(mask_path))
    data = np.asanyarray(image.dataobj)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    src = ras_to_lps @ image.affine
    dst = np.asarray(volume.affine(), dtype=np.float64)
    m = np.linalg.inv(dst) @ src  # mask voxel index -> series (col, row, slice) index
    rot = m[:3, :3]
    perm = np.argmax(np.abs(rot), axis=0)  # series axis of each mask axis
    signs = np.sign(rot[perm, range(3)])
    expected = np.zeros((3, 3))
    expected[perm, range(3)] = signs
    if sorted(perm) != [0, 1, 2] or not np.allclose(rot, expected, atol=1e-2):
        raise DatasetError(f"mask {mask_path} is not on the voxel grid of series {volume.info.series_instance_uid}")
    series_shape = (volume.pixels.shape[2], volume.pixels.shape[1], volume.pixels.shape[0])  # (col, row, slice)
    # reorder mask axes into (col, row, slice) order, then flip reversed axes
    order = np.argsort(perm)
    out = np.transpose(data, order)
    for axis in range(3):
        if signs[order[axis]] < 0:
            out = np.flip(out, axis=axis)
    if out.shape != series_shape:
        raise DatasetError(f"mask {mask_path} has {out.shape} voxels (col,row,slice); series has {series_shape}")
    offset = m[:3, 3]  # indexed by series axis: 0 for kept axes, size - 1 for flipped ones
    expect_offset = np.array([series_shape[a] - 1 if signs[order[a]] < 0 else 0 for a in range(3)], float)
    if not np.allclose(offset, expect_offset, atol=0.05):
        raise DatasetError(
            f"mask {mask_path} is shifted against series {volume.info.series_instance_uid} "
            f"by {np.round(offset - expect_offset, 2).tolist()} voxels (col, row, slice)"
        )
    return np.ascontiguousarray(np.transpose(out, (2, 1, 0)))


def _mask_to_int64(mask: np.ndarray, path: Path) -> np.ndarray:
    if not np.issubdtype(mask.dtype, np.integer):
        if not np.all(np.equal(np.mod(mask, 1), 0)):
            raise DatasetError(f"mask {path} has non-integer values")
    out = np.asarray(mask).astype(np.int64)
    if mask.dtype == np.uint8:
        out[out == 255] = -1
    out[out < 0] = -1
    return out


def read_nifti_folder(root: str | Path) -> list[ExamRecord]:
    """Read a folder of NIfTI volumes with a manifest.

    Layout::

        root/cases.csv                       case_id[, patient_id, joint, site, laterality,
                                             age, sex, height_m, weight_kg][, label columns]
        root/<case_id>/sagittal.nii.gz       any subset of the three planes
        root/<case_id>/coronal.nii.gz
        root/<case_id>/axial.nii.gz
        root/<case_id>/<plane>_mask.nii.gz   optional label map on the plane's voxel grid
                                             (0 background, 1..11 knee structures, 255 or
                                             negative = not annotated)

    Label columns are every column that is not a known field (0, 1, empty = unknown); with a
    ``joint`` column they must be that joint's keys.  A manifest without label columns gives
    unlabeled records.  Each volume is reoriented (axis permutation and flips only, from the
    NIfTI affine) to the plane's slice-first layout of :data:`SLICE_FIRST_AXCODES` -- the
    layout a typical DICOM series of that plane has -- so the same anatomy reaches the model
    in the same orientation whatever the exporting tool wrote.
    """
    root = Path(root)
    manifest = root / "cases.csv"
    rows = _read_csv(manifest)
    if not rows:
        raise DatasetError(f"{manifest} has no data rows")
    if "case_id" not in rows[0]:
        raise DatasetError(f"{manifest}: the 'case_id' column is required")
    joints = {r.get("joint") or None for r in rows}
    columns = _label_columns(rows[0].keys(), joints.pop() if len(joints) == 1 else None, manifest)
    records = []
    for line, row in enumerate(rows, start=2):
        where = f"{manifest} line {line}"
        case_id = row["case_id"]
        if not case_id:
            raise DatasetError(f"{where}: empty 'case_id'")
        folder = root / case_id
        if not folder.is_dir():
            raise DatasetError(f"{where}: case folder {folder} does not exist")
        planes = {}
        for plane in PLANES:
            path = folder / f"{plane}.nii.gz"
            if not path.is_file():
                path = folder / f"{plane}.nii"
            if not path.is_file():
                continue
            mask = next((m for m in (folder / f"{plane}_mask.nii.gz", folder / f"{plane}_mask.nii") if m.is_file()), None)
            planes[plane] = VolumeSource(
                kind="nifti", paths=(path,), plane=plane, mask_path=mask, description=f"case {case_id} {path.name}"
            )
        if not planes:
            raise DatasetError(f"{where}: {folder} holds none of {[p + '.nii.gz' for p in PLANES]}")
        labels = (
            np.array([_parse_label(row.get(c, ""), c, where) for c in columns], dtype=np.float32) if columns else None
        )
        records.append(
            ExamRecord(
                exam_id=case_id,
                patient_id=row.get("patient_id") or case_id,
                site=row.get("site") or None,
                joint=_row_joint(row, where),
                label_keys=columns,
                labels=labels,
                ehr=_ehr_from_row(row, where),
                planes=planes,
                source="nifti",
                laterality=row.get("laterality") or None,
            )
        )
    log.info("read %d NIfTI cases from %s", len(records), root)
    return records


# --------------------------------------------------------------------------------------------
# source specs
# --------------------------------------------------------------------------------------------


def detect_layout(folder: str | Path) -> str:
    """Name the layout of ``folder`` (``phantom``, ``nifti``, ``mrnet``) or raise saying why not."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"data folder {folder} does not exist")
    if (folder / "cases.csv").is_file():
        case_dirs = [p for p in folder.iterdir() if p.is_dir()]
        if any((p / "dicom").is_dir() for p in case_dirs):
            return "phantom"
        if any(list(p.glob("*.nii*")) for p in case_dirs):
            return "nifti"
        raise DatasetError(f"{folder} has cases.csv but no <case_id>/dicom/ or <case_id>/*.nii.gz folders")
    if any((folder / s / "sagittal").is_dir() for s in ("train", "valid")) and any(
        (folder / f"{s}-abnormal.csv").is_file() for s in ("train", "valid")
    ):
        return "mrnet"
    raise DatasetError(
        f"cannot tell the layout of {folder}: expected cases.csv with case folders (phantom/NIfTI) or "
        "MRNet's train/valid folders; give a spec like dicom:DIR:labels.csv"
    )


def read_source(spec: str) -> list[ExamRecord]:
    """Read records from a spec string.

    ``phantom:DIR``, ``dicom:DIR:LABELS.csv`` (or ``dicom:DIR`` for unlabeled studies),
    ``mrnet:DIR:train|valid``, ``nifti:DIR``, or a bare ``DIR`` whose layout is detected
    (phantom and NIfTI folders; an MRNet folder needs its split, so a bare MRNet folder is
    an error that says so).
    """
    kinds = ("phantom", "dicom", "mrnet", "nifti")
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in kinds:
        kind, rest = detect_layout(spec), spec
        if kind == "mrnet":
            raise DatasetError(f"{spec} is an MRNet folder: give the split, e.g. mrnet:{spec}:train")
    if not rest:
        raise DatasetError(f"data spec {spec!r} has no folder")
    if kind == "phantom":
        return read_phantom_folder(rest)
    if kind == "nifti":
        return read_nifti_folder(rest)
    if kind == "mrnet":
        folder, sep, split = rest.rpartition(":")
        if not sep or split not in ("train", "valid"):
            raise DatasetError(f"data spec {spec!r}: expected mrnet:DIR:train or mrnet:DIR:valid")
        return read_mrnet(folder, split)
    folder, sep, labels = rest.rpartition(":")
    if sep and labels.lower().endswith(".csv"):
        return read_dicom_folder(folder, labels)
    return read_dicom_folder(rest, None)


# --------------------------------------------------------------------------------------------
# subsets and splits
# --------------------------------------------------------------------------------------------


def _label_matrix(records: Sequence[ExamRecord]) -> np.ndarray:
    """(N, K) 0/1/NaN over the union of label keys (NaN where a record lacks the key)."""
    keys: list[str] = []
    for r in records:
        for k in r.label_keys:
            if k not in keys:
                keys.append(k)
    out = np.full((len(records), len(keys)), np.nan, dtype=np.float32)
    for i, r in enumerate(records):
        for k, v in r.label_dict().items():
            out[i, keys.index(k)] = v
    return out


def _stratified_indices(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Choose ``n`` of ``len(y)`` rows: proportional per label combination, then repair.

    1. Rows are grouped by their label combination (NaN is its own value); each group gets
       ``n * size / N`` rows, rounded by largest remainder (ties broken by ``rng``), and its
       rows are drawn at random.
    2. Repair: for each label (rarest first) with positives in the pool but none chosen, a
       random positive row is swapped in for a chosen row whose removal leaves every label
       still covered, taken from the most over-represented combination.  With ``n`` smaller
       than the number of labels not every label can be kept.
    """
    total = len(y)
    keys = ["".join("?" if np.isnan(v) else str(int(v)) for v in row) for row in y]
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    names = sorted(groups)
    exact = np.array([n * len(groups[g]) / total for g in names])
    quota = np.floor(exact).astype(int)
    remainder = exact - quota
    left = n - int(quota.sum())
    if left > 0:
        order = np.lexsort((rng.random(len(names)), -remainder))
        quota[order[:left]] += 1
    chosen_set: set[int] = set()
    members_of: dict[str, list[int]] = {}
    for g, q in zip(names, quota):
        members = [int(i) for i in rng.permutation(groups[g])]
        members_of[g] = members
        chosen_set.update(members[:q])

    positives = np.nan_to_num(y, nan=0.0) > 0.5
    chosen_count = {g: sum(1 for i in members_of[g] if i in chosen_set) for g in names}
    chosen_pos = positives[sorted(chosen_set)].sum(axis=0) if chosen_set else np.zeros(y.shape[1], int)
    for k in np.argsort(positives.sum(axis=0), kind="stable"):  # rarest label first
        pos = np.flatnonzero(positives[:, k])
        if len(pos) == 0 or chosen_pos[k] > 0:
            continue
        candidate = int(rng.choice(pos))
        victim = None
        # most over-represented combination first; a victim must not hold the last chosen
        # positive of any label
        for g in sorted(names, key=lambda g: -(chosen_count[g] - n * len(groups[g]) / total)):
            for i in members_of[g]:
                if i in chosen_set and all(chosen_pos[j] > 1 for j in np.flatnonzero(positives[i])):
                    victim = i
                    break
            if victim is not None:
                break
        if victim is None:
            continue
        chosen_set.discard(victim)
        chosen_count[keys[victim]] -= 1
        chosen_pos -= positives[victim]
        chosen_set.add(candidate)
        chosen_count[keys[candidate]] += 1
        chosen_pos += positives[candidate]
    return np.array(sorted(chosen_set), dtype=int)


def stratified_subset(records: Sequence[ExamRecord], fraction: float, seed: int) -> list[ExamRecord]:
    """A seeded subset of ``round(fraction * N)`` labeled records (at least one).

    Stratified on label combinations with a minimum of one positive per label where
    possible (see :func:`_stratified_indices`): the label-efficiency experiments train on
    10 % of the labels, and a 10 % draw that loses every positive of a rare label would
    measure the draw, not the method.  Unlabeled records count as one combination.
    ``fraction`` 1.0 returns all records in their order; the same seed gives the same subset,
    returned in the input order.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    records = list(records)
    if fraction == 1.0 or not records:
        return records
    n = max(1, int(round(fraction * len(records))))
    idx = _stratified_indices(_label_matrix(records), n, np.random.default_rng(seed))
    return [records[i] for i in idx]


def split_by_site(records: Sequence[ExamRecord], held_out: str) -> tuple[list[ExamRecord], list[ExamRecord]]:
    """(train, test): the test set is every record of site ``held_out`` (external validation)."""
    sites = sorted({str(r.site) for r in records})
    if held_out not in sites:
        raise ValueError(f"held_out site {held_out!r} is not in the data; sites are {sites}")
    train = [r for r in records if r.site != held_out]
    test = [r for r in records if r.site == held_out]
    if not train:
        raise ValueError(f"held_out site {held_out!r} holds every record: nothing left to train on")
    return train, test


def train_val_split(
    records: Sequence[ExamRecord], val_fraction: float, seed: int
) -> tuple[list[ExamRecord], list[ExamRecord]]:
    """(train, val) split by patient (all exams of a patient on one side), stratified as
    :func:`stratified_subset` on each patient's labels (positive if any exam is positive)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    records = list(records)
    patients = sorted({r.patient_id for r in records})
    if len(patients) < 2:
        raise ValueError(f"train_val_split needs at least 2 patients, got {len(patients)}")
    y_all = _label_matrix(records)
    y = np.full((len(patients), y_all.shape[1]), np.nan, dtype=np.float32)
    index = {p: i for i, p in enumerate(patients)}
    for r, row in zip(records, y_all):
        i = index[r.patient_id]
        y[i] = np.where(np.isnan(y[i]), row, np.fmax(y[i], row))
    n_val = min(len(patients) - 1, max(1, int(round(val_fraction * len(patients)))))
    val_patients = {patients[i] for i in _stratified_indices(y, n_val, np.random.default_rng(seed))}
    train = [r for r in records if r.patient_id not in val_patients]
    val = [r for r in records if r.patient_id in val_patients]
    return train, val


def fingerprint(records: Sequence[ExamRecord]) -> str:
    """sha256 over the sorted exam ids, their label keys and values, and file sizes per plane.

    Stored in the model card so an evaluation can say which data a model was trained on and
    tell when "the same folder" changed underneath.
    """
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.exam_id):
        h.update(r.exam_id.encode())
        h.update(b"\x00")
        h.update(",".join(r.label_keys).encode())
        if r.labels is not None:
            h.update(",".join("nan" if np.isnan(v) else f"{v:g}" for v in r.labels).encode())
        for plane in sorted(r.planes):
            src = r.planes[plane]
            h.update(f"|{plane}:{src.kind}:{src.series_uid}:{src.nbytes_on_disk()}".encode())
        h.update(b"\n")
    return h.hexdigest()
