"""DICOM series to volumes: scan a folder cheaply, then load one series into a 3D array.

Why one module of about 820 lines: the header scan and the volume loader share the per-frame
geometry readers (classic and enhanced multi-frame) and the completeness rules, so the scan
and the loader cannot disagree about a frame.

Two steps, because a study holds many series and only three of them feed the model:

1. :func:`scan_folder` reads headers only (``stop_before_pixels``) and groups files by
   SeriesInstanceUID into :class:`SeriesInfo` records: enough to pick series by plane,
   contrast and joint without decoding a single pixel.  Files that are not images (a
   DICOMDIR, a report, junk, a truncated transfer) are skipped with a reason, never a crash.
2. :func:`load_series` decodes one chosen series into a :class:`SeriesVolume`: float32
   pixels with the modality rescale applied, slices sorted along the slice normal, and the
   exact geometry (positions, orientation, spacing, affine) that the SEG writer needs to put
   masks back on the source grid.

Both classic MR (one file per slice) and Enhanced MR (one multi-frame file with per-frame
functional groups) are read; compressed transfer syntaxes are decoded through pydicom's
plugins (pylibjpeg, pyjpegls).  Geometry is computed from Image Position/Orientation
(Patient), never from InstanceNumber or SliceLocation, which vendors fill inconsistently.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID

from inference.planes import classify_plane, slice_normal

if TYPE_CHECKING:  # SimpleITK is only needed by to_sitk
    import SimpleITK

log = logging.getLogger(__name__)

#: Media Storage Directory Storage (DICOMDIR): an index of a file set, not an image
MEDIA_STORAGE_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"

#: two slices whose direction cosines differ by more than this belong to different planes
_ORIENTATION_TOLERANCE = 1e-3

#: relative tolerance on the spacing between consecutive slices; beyond it a slice is
#: missing or the series holds several stacks, and a single affine would be wrong
_SPACING_RELATIVE_TOLERANCE = 0.05


#: what pydicom raises on malformed values (wrong VR, bad lengths, type confusion)
_HEADER_ERRORS = (
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    struct.error,
    NotImplementedError,
    BytesLengthException,
)


class SeriesError(ValueError):
    """A series cannot become a volume; ``reason`` says why in words an administrator reads."""

    def __init__(self, series_uid: str, reason: str) -> None:
        super().__init__(f"series {series_uid}: {reason}")
        self.series_uid = series_uid
        self.reason = reason


@dataclass(frozen=True)
class SkippedFile:
    """A file :func:`scan_folder` did not use, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class SeriesInfo:
    """One series as described by its headers (no pixel data read).

    ``num_frames`` counts slices (files for classic MR, frames for multi-frame objects).
    ``orientation`` is the common Image Orientation (Patient) of all slices, or ``None``
    when the slices lie in several orientations (``orientation_count`` > 1, a 3-plane
    localizer) or carry none.  ``plane``/``obliquity_deg`` come from
    :func:`inference.planes.classify_plane` with its default tolerance; selection applies
    its own per-plane limits on ``obliquity_deg``.
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    series_number: int | None
    series_description: str
    modality: str
    sop_class_uid: str
    body_part: str
    laterality: str | None
    study_description: str
    protocol_name: str
    image_type: tuple[str, ...]
    files: tuple[Path, ...]
    num_frames: int
    orientation: np.ndarray | None = field(compare=False)
    orientation_count: int
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    rows: int | None
    columns: int | None
    manufacturer: str
    plane: str | None
    obliquity_deg: float | None
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    transfer_syntaxes: tuple[str, ...] = ()
    is_multiframe: bool = False
    #: ``(size, mtime_ns)`` of each file when the scan read and fully converted its header;
    #: :func:`load_series` does not convert a header again while the file is unchanged
    scanned_files: Mapping[Path, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)
    #: every distinct Study Instance UID and Patient ID among the series' files (the fields
    #: above are the first file's); more than one means the series mixes studies or patients
    study_instance_uids: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()

    def label(self) -> str:
        """``series 5 'PD FS SAG'``: how logs and reports name a series for an administrator."""
        number = "?" if self.series_number is None else str(self.series_number)
        return f"series {number} {self.series_description!r}"


@dataclass
class ScanResult:
    """What :func:`scan_folder_report` found: the series and every file it skipped."""

    series: list[SeriesInfo]
    skipped: list[SkippedFile]


# --------------------------------------------------------------------------- header helpers


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    return "" if value is None else str(value).strip()


def _first_item(ds: Dataset, *path: str) -> Dataset | None:
    """Follow sequence keywords through first items (functional groups nest this way)."""
    current: Dataset | None = ds
    for keyword in path:
        if current is None:
            return None
        seq = current.get(keyword, None)
        if not seq:
            return None
        current = seq[0]
    return current


def _group_value(shared: Dataset | None, frame: Dataset | None, macro: str, keyword: str) -> Any:
    """A functional-group attribute, per-frame first (it overrides shared), then shared."""
    for group in (frame, shared):
        item = _first_item(group, macro) if group is not None else None
        if item is not None and keyword in item:
            return item[keyword].value
    return None


@dataclass(frozen=True)
class _FrameHeader:
    """Geometry and rescale of one slice, from a classic file or one frame of a multi-frame file."""

    path: Path
    sop_instance_uid: str
    frame: int | None  # 1-based frame number in a multi-frame file, None for single-frame
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    slope: float
    intercept: float


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return values if len(values) == count else None


def _float_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def _frame_headers(ds: Dataset, path: Path) -> list[_FrameHeader]:
    """One :class:`_FrameHeader` per slice held in ``ds``."""
    sop = _text(ds, "SOPInstanceUID")
    if not _is_multiframe(ds):
        spacing = _floats(ds.get("PixelSpacing"), 2)
        slope = _float_or_none(ds.get("RescaleSlope"))
        intercept = _float_or_none(ds.get("RescaleIntercept"))
        return [
            _FrameHeader(
                path=path,
                sop_instance_uid=sop,
                frame=None,
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                position=_floats(ds.get("ImagePositionPatient"), 3),
                pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
                slice_thickness=_float_or_none(ds.get("SliceThickness")),
                slope=1.0 if slope is None else slope,
                intercept=0.0 if intercept is None else intercept,
            )
        ]
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", None) or [])
    n_frames = int(ds.get("NumberOfFrames", len(per_frame)) or len(per_frame))
    headers: list[_FrameHeader] = []
    for index in range(n_frames):
        frame = per_frame[index] if index < len(per_frame) else None
        spacing = _floats(_group_value(shared, frame, "PixelMeasuresSequence", "PixelSpacing"), 2)
        slope = _float_or_none(
            _group_value(shared, frame, "PixelValueTransformationSequence", "RescaleSlope")
        )
        intercept = _float_or_none(
            _group_value(shared, frame, "PixelValueTransformationSequence", "RescaleIntercept")
        )
        headers.append(
            _FrameHeader(
                path=path,
                sop_instance_uid=sop,
                frame=index + 1,
                orientation=_floats(
                    _group_value(shared, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
                ),
                position=_floats(
                    _group_value(shared, frame, "PlanePositionSequence", "ImagePositionPatient"), 3
                ),
                pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
                slice_thickness=_float_or_none(
                    _group_value(shared, frame, "PixelMeasuresSequence", "SliceThickness")
                ),
                slope=1.0 if slope is None else slope,
                intercept=0.0 if intercept is None else intercept,
            )
        )
    return headers


def _distinct_orientations(orientations: Iterable[tuple[float, ...] | None]) -> list[np.ndarray]:
    distinct: list[np.ndarray] = []
    for orientation in orientations:
        if orientation is None:
            continue
        vector = np.asarray(orientation, dtype=np.float64)
        if not any(np.max(np.abs(vector - seen)) <= _ORIENTATION_TOLERANCE for seen in distinct):
            distinct.append(vector)
    return distinct


def expected_pixel_bytes(ds: Any) -> int | None:
    """Bytes of native (uncompressed) pixel data the header promises (Rows x Columns x Frames x
    Samples x Bits Allocated, rounded up to whole bytes), or None if those attributes cannot be read.
    The receiver and the series reader both judge a file cut short by this."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return (rows * cols * frames * samples * bits + 7) // 8


def _read_header(path: Path) -> tuple[Dataset | None, str | None]:
    """Header of ``path`` or the reason it is not a usable image file."""
    try:
        with open(path, "rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True)
            header_end = handle.tell()
        # pydicom converts element values lazily: convert them all now, so that a corrupt
        # value is this file's reason to be skipped rather than a crash later in the scan
        for _ in ds.file_meta.iterall():
            pass
        for _ in ds.iterall():
            pass
    except InvalidDicomError as exc:
        return None, f"not a DICOM file ({exc})"
    except (OSError, EOFError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    except _HEADER_ERRORS as exc:
        # pydicom reports a corrupt or truncated header through these
        return None, f"corrupt DICOM header ({type(exc).__name__}: {exc})"
    sop_class = _text(ds, "SOPClassUID") or _text(
        getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID"
    )
    if sop_class == MEDIA_STORAGE_DIRECTORY_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return None, "DICOMDIR (a file-set index, not an image)"
    if "Rows" not in ds or "Columns" not in ds:
        if header_end >= os.path.getsize(path):
            return None, "truncated: the file ends inside the header"
        return None, f"not an image (SOP Class {sop_class or 'unknown'} has no Rows/Columns)"
    # the identity every output refers to (SEG and SR reference each source instance by these)
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = _text(ds, keyword)
        if not value:
            return None, f"no {keyword}"
        if not UID(value).is_valid:
            return None, f"{keyword} {value[:80]!r} is not a valid UID"
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and not isinstance(syntax, UID):
        return None, f"malformed Transfer Syntax UID {syntax!r}"
    if syntax is not None and not syntax.is_transfer_syntax:
        return None, f"unknown transfer syntax {syntax!s}"
    size = os.path.getsize(path)
    if header_end >= size:
        return None, f"truncated: the file ends at byte {size} before any pixel data"
    if syntax is not None and not syntax.is_compressed:
        expected = expected_pixel_bytes(ds)
        if expected is not None and size < header_end + expected:
            return None, (
                f"truncated: {size} bytes on disk, header and pixel data need at least "
                f"{header_end + expected}"
            )
    elif syntax is not None and not _ends_with_sequence_delimiter(path, size):
        return None, "truncated: the compressed pixel data has no end-of-sequence delimiter"
    return ds, None


#: (FFFE,E0DD) Sequence Delimitation Item with zero length: how encapsulated pixel data ends
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _ends_with_sequence_delimiter(path: Path, size: int) -> bool:
    """True when the delimiter sits near the end of the file (padding may follow it)."""
    with open(path, "rb") as handle:
        handle.seek(max(0, size - 4096))
        return _SEQUENCE_DELIMITER in handle.read()


def _iter_files(folder: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


@dataclass(frozen=True)
class _FileHeader:
    """What the scan keeps of one file: parsed once, under one guard, so a malformed value
    makes that file a skipped file instead of breaking its whole series."""

    path: Path
    series_uid: str
    instance_number: int
    frames: tuple[_FrameHeader, ...]
    fields: dict[str, Any]
    transfer_syntax: str
    multiframe: bool
    #: (size, mtime_ns) of the file when its header was read and converted
    stamp: tuple[int, int] = (-1, -1)


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "":
        return None
    return int(value)


def _stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns): tells whether a file changed between the scan and the load."""
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _parse_file(path: Path, ds: Dataset) -> _FileHeader:
    """Every header value the scan needs, converted (raises on malformed values)."""
    image_type = tuple(str(v).strip().upper() for v in (ds.get("ImageType", None) or ()))
    laterality = _text(ds, "Laterality") or _text(ds, "ImageLaterality") or None
    if laterality is None:
        frame_anatomy = _first_item(ds, "SharedFunctionalGroupsSequence", "FrameAnatomySequence")
        if frame_anatomy is not None:
            laterality = _text(frame_anatomy, "FrameLaterality") or None
    fields = {
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "frame_of_reference_uid": _text(ds, "FrameOfReferenceUID") or None,
        "series_number": _int_or_none(ds.get("SeriesNumber", None)),
        "series_description": _text(ds, "SeriesDescription"),
        "modality": _text(ds, "Modality"),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "body_part": _text(ds, "BodyPartExamined"),
        "laterality": laterality,
        "study_description": _text(ds, "StudyDescription"),
        "protocol_name": _text(ds, "ProtocolName"),
        "image_type": image_type,
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "manufacturer": _text(ds, "Manufacturer"),
        "patient_id": _text(ds, "PatientID"),
        "accession_number": _text(ds, "AccessionNumber"),
        "study_date": _text(ds, "StudyDate"),
    }
    meta = getattr(ds, "file_meta", Dataset())
    return _FileHeader(
        path=path,
        series_uid=_text(ds, "SeriesInstanceUID"),
        instance_number=_int_or_none(ds.get("InstanceNumber", None)) or 0,
        frames=tuple(_frame_headers(ds, path)),
        fields=fields,
        transfer_syntax=_text(meta, "TransferSyntaxUID"),
        multiframe=_is_multiframe(ds),
        stamp=_stamp(path),
    )


def _build_info(series_uid: str, entries: list[_FileHeader]) -> SeriesInfo:
    entries = sorted(entries, key=lambda item: (item.instance_number, str(item.path)))
    frames = [header for entry in entries for header in entry.frames]
    distinct = _distinct_orientations(h.orientation for h in frames)
    orientation: np.ndarray | None = None
    plane: str | None = None
    obliquity: float | None = None
    if len(distinct) == 1:
        orientation = distinct[0].copy()
        orientation.setflags(write=False)
        try:
            plane, obliquity = classify_plane(orientation)
        except ValueError as exc:
            log.warning("series %s: orientation %s unusable: %s", series_uid, orientation.tolist(), exc)
            orientation = None
    return SeriesInfo(
        series_instance_uid=series_uid,
        files=tuple(entry.path for entry in entries),
        scanned_files={entry.path: entry.stamp for entry in entries},
        num_frames=len(frames),
        orientation=orientation,
        orientation_count=len(distinct),
        pixel_spacing=next((h.pixel_spacing for h in frames if h.pixel_spacing), None),
        slice_thickness=next((h.slice_thickness for h in frames if h.slice_thickness is not None), None),
        plane=plane,
        obliquity_deg=obliquity,
        transfer_syntaxes=tuple(
            sorted({entry.transfer_syntax for entry in entries if entry.transfer_syntax})
        ),
        is_multiframe=any(entry.multiframe for entry in entries),
        study_instance_uids=tuple(sorted({entry.fields["study_instance_uid"] for entry in entries})),
        patient_ids=tuple(sorted({entry.fields["patient_id"] for entry in entries})),
        **entries[0].fields,
    )


def scan_folder_report(folder: Path | str) -> ScanResult:
    """Series found under ``folder`` (recursively) and every file skipped, with its reason."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"scan folder {root} does not exist or is not a directory")
    return scan_files_report(_iter_files(root))


def scan_files_report(paths: Iterable[Path]) -> ScanResult:
    """The series of exactly these files (e.g. those the node's database records for a study)
    and every file skipped, with its reason; a file that cannot be opened is skipped too."""
    grouped: dict[str, list[_FileHeader]] = defaultdict(list)
    skipped: list[SkippedFile] = []
    for path in paths:
        ds, reason = _read_header(path)
        parsed: _FileHeader | None = None
        if ds is not None:
            try:
                parsed = _parse_file(path, ds)
            except _HEADER_ERRORS as exc:
                reason = f"malformed header value ({type(exc).__name__}: {exc})"
        if parsed is None:
            log.info("skipping %s: %s", path, reason)
            skipped.append(SkippedFile(path, reason or "unknown"))
            continue
        grouped[parsed.series_uid].append(parsed)
    series = [_build_info(uid, entries) for uid, entries in grouped.items()]
    series.sort(
        key=lambda s: (
            s.study_instance_uid,
            s.series_number if s.series_number is not None else 1 << 30,
            s.series_instance_uid,
        )
    )
    return ScanResult(series=series, skipped=skipped)


def scan_folder(folder: Path | str) -> list[SeriesInfo]:
    """Series under ``folder``, read from headers only and grouped by SeriesInstanceUID.

    Non-image files are skipped with a log line; use :func:`scan_folder_report` to get the
    skipped files and their reasons as data.
    """
    return scan_folder_report(folder).series


# --------------------------------------------------------------------------- volumes


@dataclass
class SeriesVolume:
    """One series as a 3D volume with its exact patient geometry.

    ``pixels`` is (slices, rows, cols) float32, sorted by ascending projection of
    ImagePositionPatient on the slice normal ``row x col``: the same order SimpleITK/GDCM
    use, so index ``k`` of ``pixels`` is slice ``k`` of ``to_sitk()``.  ``source_refs[k]``
    is (SOP Instance UID, frame number or None) of that slice.  ``datasets`` are the source
    datasets in slice order (one per file: a multi-frame object appears once).
    """

    info: SeriesInfo
    pixels: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float, float]
    source_refs: list[tuple[str, int | None]]
    datasets: list[Dataset]

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row x col)."""
        return slice_normal(self.orientation)

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping (col, row, slice, 1) indices to LPS millimetres.

        Column index moves along the row direction cosines by the column spacing
        (PixelSpacing[1]); row index moves along the column direction cosines by the row
        spacing (PixelSpacing[0]); slice index moves along the normal by the slice spacing.
        """
        row_spacing, col_spacing, slice_spacing = self.spacing
        row_dir = np.asarray(self.orientation[:3], dtype=np.float64)
        col_dir = np.asarray(self.orientation[3:], dtype=np.float64)
        matrix = np.eye(4)
        matrix[:3, 0] = row_dir * col_spacing
        matrix[:3, 1] = col_dir * row_spacing
        matrix[:3, 2] = self.normal * slice_spacing
        matrix[:3, 3] = self.positions[0]
        return matrix

    def to_sitk(self, array: np.ndarray | None = None) -> SimpleITK.Image:
        """The volume as a SimpleITK image (x = column, y = row, z = slice) in LPS.

        ``array`` (same shape as ``pixels``, e.g. a label map on this series' grid) is put on
        this volume's geometry instead of the pixels.
        """
        import SimpleITK as sitk

        if array is not None and np.shape(array) != self.pixels.shape:
            raise ValueError(f"array shape {np.shape(array)} differs from the volume's {self.pixels.shape}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.pixels if array is None else array))
        row_spacing, col_spacing, slice_spacing = self.spacing
        image.SetSpacing((float(col_spacing), float(row_spacing), float(slice_spacing)))
        image.SetOrigin(tuple(float(v) for v in self.positions[0]))
        direction = np.column_stack(
            [np.asarray(self.orientation[:3], float), np.asarray(self.orientation[3:], float), self.normal]
        )
        image.SetDirection(tuple(float(v) for v in direction.reshape(-1)))
        return image


def _decode(ds: Dataset, path: Path, series_uid: str) -> np.ndarray:
    """Stored pixel values of one file as (frames, rows, cols)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise SeriesError(series_uid, f"{path}: no pixel data")
    photometric = _text(ds, "PhotometricInterpretation")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SeriesError(series_uid, f"{path}: photometric interpretation {photometric!r} is not greyscale")
    try:
        array = ds.pixel_array
    except BaseException as exc:
        # decoders raise many types, and the Rust-based ones raise a PanicException that
        # derives from BaseException on corrupt input; report which file and why, but never
        # swallow an interrupt
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise SeriesError(
            series_uid, f"{path}: undecodable pixel data ({name}): {type(exc).__name__}: {exc}"
        ) from exc
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[np.newaxis]
    if photometric == "MONOCHROME1":
        # MONOCHROME1 shows the minimum as white; invert so that higher is always brighter
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        high = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        low = -(1 << (bits - 1)) if signed else 0
        array = (high + low) - array.astype(np.int64)
    return array


#: Pixel Data: elements from here on are not part of the header the scan converted
_PIXEL_DATA_TAG = 0x7FE00010


def _read_full(path: Path, uid: str, header_checked: bool = False) -> Dataset:
    """Whole dataset of ``path``; a truncated file is an error, not an empty dataset.

    pydicom only warns when encapsulated pixel data ends early, and then returns a dataset
    with nothing in it, so the warning is turned into a :class:`SeriesError`.

    pydicom converts values lazily; they are converted here, under this guard, so that a
    corrupt value is this file's error rather than a crash later.  With ``header_checked``
    (the scan converted this very file's header, and it has not changed since) only the pixel
    data and what follows it are converted: converting every header value again is most of
    the time of reading a classic MR file.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
            if header_checked:
                for tag in [t for t in ds.keys() if t >= _PIXEL_DATA_TAG]:
                    ds[tag]
            else:
                for _ in ds.iterall():
                    pass
        except (InvalidDicomError, OSError, EOFError, *_HEADER_ERRORS) as exc:
            raise SeriesError(uid, f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    for warning in caught:
        message = str(warning.message)
        if "End of file reached" in message or "truncated" in message.lower():
            raise SeriesError(uid, f"{path}: truncated file ({message})")
        log.info("%s: %s", path, message)
    if len(ds) == 0:
        raise SeriesError(uid, f"{path}: no data elements could be read")
    return ds


def complete_slice_thickness(sorted_slices: Sequence[Dataset]) -> float | None:
    """Single-frame slices (sorted along the normal) without a Slice Thickness value: the SEG's
    Pixel Measures need one, so the median distance between neighbouring slices is set in its
    place, in memory only.  Returns that distance, or ``None`` when every slice has a value."""
    if len(sorted_slices) < 2 or all(ds.get("SliceThickness", None) not in (None, "") for ds in sorted_slices):
        return None
    normal = slice_normal(np.asarray(sorted_slices[0].ImageOrientationPatient, dtype=float))
    along = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in sorted_slices]
    spacing = round(abs(float(np.median(np.diff(along)))), 6)
    for ds in sorted_slices:
        if ds.get("SliceThickness", None) in (None, ""):
            ds.SliceThickness = spacing
    return spacing


def load_series(info: SeriesInfo) -> SeriesVolume:
    """Decode ``info`` into a :class:`SeriesVolume` or raise :class:`SeriesError` saying why."""
    uid = info.series_instance_uid
    if not info.files:
        raise SeriesError(uid, "no files")
    datasets: dict[Path, Dataset] = {}
    frames: list[_FrameHeader] = []
    sizes: set[tuple[int, int]] = set()
    for path in info.files:
        stamp = info.scanned_files.get(path)
        try:
            unchanged = stamp is not None and stamp == _stamp(path)
        except OSError:
            unchanged = False  # _read_full says why the file cannot be read
        ds = _read_full(path, uid, header_checked=unchanged)
        if _text(ds, "SeriesInstanceUID") != uid:
            raise SeriesError(
                uid, f"{path}: belongs to series {_text(ds, 'SeriesInstanceUID')}, not this one"
            )
        datasets[path] = ds
        try:
            frames.extend(_frame_headers(ds, path))
            size = (int(ds.Rows), int(ds.Columns))
        except _HEADER_ERRORS as exc:
            raise SeriesError(uid, f"{path}: malformed header value ({type(exc).__name__}: {exc})") from exc
        sizes.add(size)

    if len(sizes) > 1:
        raise SeriesError(uid, f"mixed image sizes (rows, columns) {sorted(sizes)}")
    # outputs on this grid name one study and one frame of reference for all its slices
    for keyword, what in (("StudyInstanceUID", "studies"), ("FrameOfReferenceUID", "frames of reference")):
        values = {_text(ds, keyword) for ds in datasets.values()}
        if len(values) > 1:
            raise SeriesError(uid, f"the slices belong to {len(values)} different {what} ({keyword} differs)")
    missing_orientation = [h for h in frames if h.orientation is None]
    if missing_orientation:
        raise SeriesError(
            uid,
            f"{len(missing_orientation)} slice(s) without ImageOrientationPatient, e.g. {missing_orientation[0].path}",
        )
    distinct = _distinct_orientations(h.orientation for h in frames)
    if len(distinct) > 1:
        raise SeriesError(
            uid,
            f"inconsistent orientation: slices lie in {len(distinct)} different orientations "
            "(a multi-plane localizer or a mixed series)",
        )
    missing_position = [h for h in frames if h.position is None]
    if missing_position:
        raise SeriesError(
            uid,
            f"{len(missing_position)} slice(s) without ImagePositionPatient, e.g. {missing_position[0].path}",
        )
    zero_slope = [h for h in frames if h.slope == 0.0]
    if zero_slope:
        raise SeriesError(
            uid, f"RescaleSlope is 0 in {zero_slope[0].path}: every pixel would be the intercept"
        )
    spacings = {h.pixel_spacing for h in frames}
    if None in spacings:
        raise SeriesError(uid, "missing PixelSpacing")
    if len(spacings) > 1:
        raise SeriesError(uid, f"mixed pixel spacings {sorted(spacings)}")

    orientation = distinct[0]
    try:
        normal = slice_normal(orientation)
    except ValueError as exc:
        raise SeriesError(uid, f"invalid ImageOrientationPatient: {exc}") from exc
    positions = np.array([h.position for h in frames], dtype=np.float64)
    projections = positions @ normal
    order = np.argsort(projections, kind="stable")
    positions = positions[order]
    projections = projections[order]
    frames = [frames[i] for i in order]
    row_spacing, col_spacing = frames[0].pixel_spacing  # type: ignore[misc]
    slice_spacing = _slice_spacing(
        uid, projections, positions, normal, frames[0], min(row_spacing, col_spacing)
    )

    decoded: dict[Path, np.ndarray] = {path: _decode(ds, path, uid) for path, ds in datasets.items()}
    rows, cols = sizes.pop()
    pixels = np.empty((len(frames), rows, cols), dtype=np.float32)
    for k, header in enumerate(frames):
        stack = decoded[header.path]
        index = 0 if header.frame is None else header.frame - 1
        if index >= stack.shape[0]:
            raise SeriesError(
                uid, f"{header.path}: frame {index + 1} missing from pixel data ({stack.shape[0]} frames)"
            )
        pixels[k] = stack[index].astype(np.float64) * header.slope + header.intercept

    ordered_datasets: list[Dataset] = []
    seen: set[Path] = set()
    for header in frames:
        if header.path not in seen:
            seen.add(header.path)
            ordered_datasets.append(datasets[header.path])
    orientation = orientation.copy()
    return SeriesVolume(
        info=info,
        pixels=pixels,
        positions=positions,
        orientation=orientation,
        spacing=(float(row_spacing), float(col_spacing), float(slice_spacing)),
        source_refs=[(h.sop_instance_uid, h.frame) for h in frames],
        datasets=ordered_datasets,
    )


def _slice_spacing(
    uid: str,
    projections: np.ndarray,
    positions: np.ndarray,
    normal: np.ndarray,
    first: _FrameHeader,
    in_plane: float,
) -> float:
    """Spacing between slice centres, checked to be uniform and along the normal.

    A non-uniform spacing (a missing slice, two interleaved stacks, repeated positions) or
    slices shifted in-plane (gantry tilt, stitched stations) cannot be described by one
    affine, so it is an error rather than a silently distorted volume.
    """
    if len(projections) == 1:
        ds_spacing = first.slice_thickness
        return float(ds_spacing) if ds_spacing else 1.0
    steps = np.diff(projections)
    if np.any(steps < 1e-4):
        duplicates = int(np.sum(steps < 1e-4))
        raise SeriesError(
            uid,
            f"{duplicates} slice(s) share a position with another slice "
            "(several echoes, phases or repeated acquisitions in one series)",
        )
    spacing = float(np.median(steps))
    worst = float(np.max(np.abs(steps - spacing)))
    if worst > max(_SPACING_RELATIVE_TOLERANCE * spacing, 1e-3):
        raise SeriesError(
            uid,
            f"non-uniform slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm "
            f"(median {spacing:.3f} mm); a slice is missing or stacks are interleaved",
        )
    expected = positions[0] + np.outer(projections - projections[0], normal)
    shift = float(np.max(np.linalg.norm(positions - expected, axis=1)))
    if shift > max(0.5 * in_plane, 1e-3):
        raise SeriesError(
            uid,
            f"slices are shifted in-plane by up to {shift:.2f} mm (gantry tilt or stitched "
            "stations); the volume is not a regular grid",
        )
    return spacing
