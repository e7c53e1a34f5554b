"""DICOM SEG writer: the knee structure label map as a BINARY Segmentation on the source grid.

What viewers need (OHIF, 3D Slicer; see docs/peers.md) and how this writer provides it:

- One SEG per source series, in that series' own plane and pixel grid.  The label map must
  already be on the source grid (the caller resamples back from any model grid); this writer
  checks the shape and takes every frame's geometry from the source slice it was derived from,
  so oblique series come out exactly as acquired.
- Slice order.  Classic series arrive in any file order and Instance Numbers are not reliable,
  so the writer sorts the source slices itself by projecting Image Position (Patient) on the
  slice normal (row x column direction cosines), ascending, and expects ``label_map[k]`` to be
  the k-th slice in that order.  For one Enhanced (multi-frame) MR dataset the frames are sorted
  the same way and the label map is mapped back to frame order.
- Segments.  Every structure of ``structures`` is described, and its Segment Number is its
  index in :data:`inference.labels.KNEE_STRUCTURES`.  DICOM (and highdicom) require segment
  numbers 1..N without gaps, so describing only the structures present would renumber them
  from study to study; a structure absent from a series is an empty segment instead, which
  both viewers list without error.  Codes, labels and colours come from
  ``sr_templates/structures.yaml``; private codes are declared in the Coding Scheme
  Identification Sequence.
- Empty frames are kept (``omit_empty_frames=False``): peers report overlays shifting in
  viewers when empty frames are dropped, and a BINARY frame is a few hundred bytes.
- Volumes for the SR: :func:`structure_volumes_ml` measures each structure on the same grid.
- Planes.  The segmenter's label map is on its own series' grid; for the other series of the
  study it is resampled through the Frame of Reference (:mod:`inference.plane_mapping`) and
  written here like any label map, with :class:`MappedFrom` saying where it came from: the
  Series Description names the plane and the series mapped from, each segment's Algorithm
  Parameters name that series and the resampling rule, and that series' instances enter the
  UIDs (new segmenter input, new SEG).
- Laterality: the source series' side (a knee is a paired body part) is written as Frame
  Laterality in the shared Frame Anatomy, with the source's Body Part Examined.
- Identity: Series/SOP Instance UIDs are derived from (study, source series, model version,
  kind), so a re-sent study replaces rather than duplicates; the node and the model are
  named in the Contributing Equipment Sequence and each segment carries the Algorithm
  Identification with type AUTOMATIC.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from inference.labels import KNEE_STRUCTURES, Structure
from inference.series import complete_slice_thickness
from inference.uids import AlgorithmInfo, NodeInfo, default_node_info, derived_uid, instances_fingerprint

#: direction cosines of one series may differ by rounding in the last written digits
_ORIENTATION_TOLERANCE = 1e-4
#: two slices closer than this along the normal (mm) are considered the same position
_POSITION_TOLERANCE = 1e-3


class SourceSeriesError(ValueError):
    """The source datasets do not form one consistent image series."""


#: Type 2 attributes of the Patient and General Study modules that the SEG and SR copy from
#: their source.  Source images must hold them (empty when unknown), but de-identified or
#: non-conformant objects often leave them out; the written objects must still have them.
SOURCE_TYPE2_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


#: De-identification Method written when a source has Patient Identity Removed YES but does not
#: say how (the method is then required, Type 1C)
DEIDENTIFICATION_NOT_STATED = "not stated in the source images"


def complete_type2_header(datasets: Sequence[Dataset]) -> list[str]:
    """Add each attribute of :data:`SOURCE_TYPE2_ATTRIBUTES` that a source dataset lacks, with
    an empty value (what Type 2 means: present, value unknown); returns the keywords added.
    A source with Patient Identity Removed ``YES`` and no De-identification Method gets
    :data:`DEIDENTIFICATION_NOT_STATED`, which the outputs then carry.

    The datasets are changed in memory only (the files are not); values present, even
    empty, are never touched.
    """
    added: set[str] = set()
    for ds in datasets:
        for keyword in SOURCE_TYPE2_ATTRIBUTES:
            if keyword not in ds:
                setattr(ds, keyword, "")
                added.add(keyword)
        # Type 1C: a source that says it is de-identified must say how; the outputs copy both
        if (
            str(ds.get("PatientIdentityRemoved", "")).strip().upper() == "YES"
            and not str(ds.get("DeidentificationMethod", "") or "").strip()
            and not ds.get("DeidentificationMethodCodeSequence", None)
        ):
            ds.DeidentificationMethod = DEIDENTIFICATION_NOT_STATED
            added.add("DeidentificationMethod")
    return sorted(added)


def _orientation(ds: Dataset, where: str) -> np.ndarray:
    try:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    except AttributeError:
        raise SourceSeriesError(f"{where}: Image Orientation (Patient) is missing") from None
    if iop.shape != (6,):
        raise SourceSeriesError(f"{where}: Image Orientation (Patient) must have 6 values, got {iop.tolist()}")
    return iop


def _normal(iop: np.ndarray) -> np.ndarray:
    normal = np.cross(iop[:3], iop[3:])
    length = float(np.linalg.norm(normal))
    if length < 0.5:
        raise SourceSeriesError(f"row and column directions {iop.tolist()} are not orthogonal unit vectors")
    return normal / length


def sort_single_frame(source: Sequence[Dataset]) -> list[Dataset]:
    """Classic single-frame slices of one series, sorted along the slice normal (ascending).

    Raises:
        SourceSeriesError: mixed series/study/frame of reference, different orientations or
            matrix sizes, or two slices at the same position.
    """
    if not source:
        raise SourceSeriesError("source series is empty")
    first = source[0]
    iop0 = _orientation(first, f"source[0] {first.SOPInstanceUID}")
    normal = _normal(iop0)
    keyed = []
    for i, ds in enumerate(source):
        where = f"source[{i}] {getattr(ds, 'SOPInstanceUID', '<no SOP Instance UID>')}"
        for attr in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
            if getattr(ds, attr, None) != getattr(first, attr, None):
                raise SourceSeriesError(
                    f"{where}: {attr} {getattr(ds, attr, None)!r} differs from source[0] "
                    f"{getattr(first, attr, None)!r}; pass exactly one series"
                )
        if "NumberOfFrames" in ds and int(ds.NumberOfFrames) > 1:
            raise SourceSeriesError(f"{where}: multi-frame dataset mixed with single-frame slices")
        if np.max(np.abs(_orientation(ds, where) - iop0)) > _ORIENTATION_TOLERANCE:
            raise SourceSeriesError(f"{where}: orientation differs from source[0]; slices must be parallel")
        try:
            position = np.asarray(ds.ImagePositionPatient, dtype=float)
        except AttributeError:
            raise SourceSeriesError(f"{where}: Image Position (Patient) is missing") from None
        keyed.append((float(np.dot(normal, position)), i, ds))
    keyed.sort(key=lambda item: item[0])
    for (d0, i0, _), (d1, i1, _) in zip(keyed, keyed[1:]):
        if d1 - d0 < _POSITION_TOLERANCE:
            raise SourceSeriesError(f"source[{i0}] and source[{i1}] lie at the same slice position ({d0:.3f} mm)")
    return [ds for _, _, ds in keyed]


def multiframe_sort_order(ds: Dataset) -> np.ndarray:
    """Frame indices (0-based) of one enhanced multi-frame dataset sorted along the slice normal."""
    try:
        per_frame = ds.PerFrameFunctionalGroupsSequence
    except AttributeError:
        raise SourceSeriesError("multi-frame source has no Per-Frame Functional Groups Sequence") from None
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    positions, normals = [], []
    for f, item in enumerate(per_frame):
        orient_group = item.get("PlaneOrientationSequence") or shared.get("PlaneOrientationSequence")
        position_group = item.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        if not orient_group or not position_group:
            raise SourceSeriesError(f"frame {f + 1}: plane orientation or position is missing")
        normals.append(_normal(_orientation(orient_group[0], f"frame {f + 1}")))
        positions.append(np.asarray(position_group[0].ImagePositionPatient, dtype=float))
    normal = normals[0]
    if any(np.max(np.abs(n - normal)) > _ORIENTATION_TOLERANCE for n in normals):
        raise SourceSeriesError("frames of the multi-frame source are not parallel")
    distances = np.array([float(np.dot(normal, p)) for p in positions])
    order = np.argsort(distances, kind="stable")
    if np.any(np.diff(distances[order]) < _POSITION_TOLERANCE):
        raise SourceSeriesError("two frames of the multi-frame source lie at the same slice position")
    return order


@dataclass(frozen=True)
class MappedFrom:
    """A label map carried over from another series of the study (see :mod:`inference.plane_mapping`).

    ``plane`` and ``series`` are the series the segmenter ran on (its datasets), ``rule`` the
    resampling rule that brought its label map onto this SEG's source grid.
    """

    plane: str
    series: Sequence[Dataset]
    rule: str

    def parameters(self) -> dict[str, str]:
        """Algorithm Parameters of each segment: where the label map was made and how it came here."""
        return {
            "mapped_from_series": str(self.series[0].SeriesInstanceUID),
            "mapped_from_plane": self.plane,
            "resampling": self.rule,
        }


@dataclass(frozen=True)
class _Grid:
    """Sampling of a source series: sorted slice positions along the normal and pixel measures."""

    distances_mm: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float | None
    rows: int
    columns: int


def _grid(source: Sequence[Dataset]) -> _Grid:
    if len(source) == 1 and int(source[0].get("NumberOfFrames", 1)) > 1:
        (ds,) = source
        order = multiframe_sort_order(ds)
        shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        frames = ds.PerFrameFunctionalGroupsSequence
        measures_group = shared.get("PixelMeasuresSequence") or frames[0].get("PixelMeasuresSequence")
        if not measures_group:
            raise SourceSeriesError("multi-frame source has no Pixel Measures Sequence")
        measures = measures_group[0]
        orient = (shared.get("PlaneOrientationSequence") or frames[0].PlaneOrientationSequence)[0]
        normal = _normal(_orientation(orient, "frame 1"))
        positions = [
            np.asarray(frames[int(i)].PlanePositionSequence[0].ImagePositionPatient, dtype=float) for i in order
        ]
        header = ds
    else:
        ordered = sort_single_frame(source)
        measures = header = ordered[0]
        normal = _normal(_orientation(header, "source"))
        positions = [np.asarray(item.ImagePositionPatient, dtype=float) for item in ordered]
    if "PixelSpacing" not in measures:
        raise SourceSeriesError("source has no Pixel Spacing; volumes cannot be measured")
    row_mm, col_mm = (float(v) for v in measures.PixelSpacing)
    thickness = float(measures.SliceThickness) if measures.get("SliceThickness") else None
    return _Grid(
        distances_mm=np.asarray([float(np.dot(normal, p)) for p in positions]),
        pixel_spacing_mm=(row_mm, col_mm),
        slice_thickness_mm=thickness,
        rows=int(header.Rows),
        columns=int(header.Columns),
    )


def structure_volumes_ml(
    source: Sequence[Dataset], label_map: np.ndarray, structures: Sequence[Structure] = KNEE_STRUCTURES
) -> dict[str, float]:
    """Volume in mL of every structure in ``label_map`` (on the source grid, sorted slice order).

    A voxel is pixel spacing (row x column) times the slice step: the median distance between
    neighbouring slice positions, which is the sampling of the grid even when Slice Thickness
    differs from it (gaps or overlap).  A single-slice series falls back to Slice Thickness.
    """
    structures = _check_structures(structures)
    grid = _grid(source)
    if len(grid.distances_mm) > 1:
        step_mm = float(np.median(np.diff(grid.distances_mm)))
    elif grid.slice_thickness_mm:
        step_mm = grid.slice_thickness_mm
    else:
        raise SourceSeriesError("single-slice source without Slice Thickness; volumes cannot be measured")
    _check_label_map(label_map, (len(grid.distances_mm), grid.rows, grid.columns), len(structures))
    counts = np.bincount(label_map.ravel(), minlength=len(structures) + 1)
    voxel_ml = grid.pixel_spacing_mm[0] * grid.pixel_spacing_mm[1] * step_mm / 1000.0
    return {s.key: float(counts[s.index]) * voxel_ml for s in structures}


def structure_tracking_uid(study_uid: str, source_series_uid: str, version: str, key: str) -> str:
    """Tracking UID of one structure's segment; the SR's volume group of it uses the same UID."""
    return derived_uid(study_uid, source_series_uid, version, "structure-tracking", key)


def _segment_descriptions(
    structures: Sequence[Structure],
    algorithm: AlgorithmInfo,
    study_uid: str,
    series_uid: str,
    parameters: dict[str, str] | None = None,
) -> tuple[list[hd.seg.SegmentDescription], set[str]]:
    """Segment descriptions from structures.yaml, and the private scheme designators they use."""
    from sr_templates import load_structures  # noqa: PLC0415 - YAML load only when writing

    templates = {t.key: t for t in load_structures()}
    descriptions = []
    schemes: set[str] = set()
    for number, structure in enumerate(structures, start=1):
        try:
            tpl = templates[structure.key]
        except KeyError:
            raise ValueError(
                f"structure {structure.key!r} has no description in sr_templates/structures.yaml"
            ) from None
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=tpl.label,
            segmented_property_category=tpl.category.code(),
            segmented_property_type=tpl.type.code(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm.seg_identification(parameters),
            anatomic_regions=[tpl.anatomic_region.code()] if tpl.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*tpl.color_rgb),
            tracking_id=structure.key,
            tracking_uid=structure_tracking_uid(study_uid, series_uid, algorithm.version, structure.key),
        )
        if tpl.type_modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = DicomSequence(
                [hd.sr.CodedConcept.from_code(tpl.type_modifier.code())]
            )
        descriptions.append(description)
        for spec in (tpl.category, tpl.type, tpl.type_modifier, tpl.anatomic_region):
            if spec is not None:
                schemes.add(spec.scheme)
    return descriptions, schemes


def _check_structures(structures: Sequence[Structure]) -> tuple[Structure, ...]:
    """Segment numbers are structure indices and must run 1..N without gaps (PS3.3 C.8.20.2)."""
    structures = tuple(structures)
    if not structures:
        raise ValueError("structures is empty: a SEG needs at least one segment")
    for number, structure in enumerate(structures, start=1):
        if structure.index != number:
            raise ValueError(
                f"structures must be numbered 1..N in order (segment numbers may not have gaps); "
                f"structure {structure.key!r} has index {structure.index}, expected {number}"
            )
    return structures


def _check_label_map(label_map: np.ndarray, expected_shape: tuple[int, int, int], n_structures: int) -> np.ndarray:
    if not isinstance(label_map, np.ndarray):
        raise TypeError(f"label_map must be a numpy array, got {type(label_map).__name__}")
    if label_map.dtype != np.uint8:
        raise TypeError(f"label_map must have dtype uint8 (structure indices), got {label_map.dtype}")
    if label_map.shape != expected_shape:
        raise ValueError(
            f"label_map shape {label_map.shape} does not match the source series "
            f"(slices, rows, columns) = {expected_shape}; resample it onto the source grid first"
        )
    top = int(label_map.max(initial=0))
    if top > n_structures:
        raise ValueError(f"label_map holds value {top}, but only {n_structures} structures are described")
    return label_map


def write_segmentation(
    source: Sequence[Dataset],
    label_map: np.ndarray,
    algorithm: AlgorithmInfo,
    series_number: int,
    structures: Sequence[Structure] = KNEE_STRUCTURES,
    node_info: NodeInfo | None = None,
    *,
    plane: str | None = None,
    mapped_from: MappedFrom | None = None,
) -> hd.seg.Segmentation:
    """Build the BINARY DICOM SEG of ``label_map`` on the grid of the ``source`` series.

    Args:
        source: the source series: classic single-frame datasets in any order, or exactly one
            enhanced multi-frame dataset.
        label_map: ``(slices, rows, columns)`` uint8, value = structure index (0 = background),
            slices in the order of the source slices sorted along the slice normal
            (ascending projection of Image Position (Patient)); see :func:`sort_single_frame`.
        algorithm: the model that produced the label map (enters the UIDs via its version).
        series_number: Series Number of the new SEG series.
        structures: the structures described as segments, numbered 1..N without gaps.
        node_info: the writing node; defaults to the installed package.
        plane: the source series' plane, named in the Series Description.
        mapped_from: set when ``label_map`` was resampled from another series of the study
            rather than segmented on this one.

    Returns:
        The Segmentation, a pydicom Dataset ready to be saved or sent.
    """
    if not source:
        raise SourceSeriesError("source series is empty")
    node_info = node_info or default_node_info()
    structures = _check_structures(structures)
    if len(source) == 1 and int(source[0].get("NumberOfFrames", 1)) > 1:
        (multiframe,) = source
        order = multiframe_sort_order(multiframe)
        n_frames = int(multiframe.NumberOfFrames)
        shape = (n_frames, int(multiframe.Rows), int(multiframe.Columns))
        checked = _check_label_map(label_map, shape, len(structures))
        pixel_array = np.empty_like(checked)
        pixel_array[order] = checked  # sorted slice k is frame order[k]
        source_images: list[Dataset] = [multiframe]
    else:
        source_images = sort_single_frame(source)
        complete_slice_thickness(source_images)
        first = source_images[0]
        pixel_array = _check_label_map(
            label_map, (len(source_images), int(first.Rows), int(first.Columns)), len(structures)
        )
    first = source_images[0]
    if not str(first.get("FrameOfReferenceUID", "") or "").strip():
        raise SourceSeriesError("the source series has no Frame of Reference UID: a SEG cannot be placed on it")
    complete_type2_header(source_images)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    parameters = mapped_from.parameters() if mapped_from is not None else None
    descriptions, schemes = _segment_descriptions(structures, algorithm, study_uid, series_uid, parameters)
    # new inputs -> new UIDs; same inputs -> same UIDs.  A mapped label map also depends on the
    # series it was segmented on.
    inputs = instances_fingerprint([*source_images, *(mapped_from.series if mapped_from is not None else ())])
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(study_uid, series_uid, inputs, algorithm.version, "seg-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(study_uid, series_uid, inputs, algorithm.version, "seg-instance"),
        instance_number=1,
        manufacturer=node_info.manufacturer,
        manufacturer_model_name=node_info.model_name,
        software_versions=node_info.software_version,
        device_serial_number=node_info.device_serial_number,
        content_description=f"{algorithm.name} {algorithm.version} knee structures"[:64],
        content_label="KNEE_STRUCTURES",
        omit_empty_frames=False,
        contributing_equipment=[node_info.contributing_equipment(), algorithm.contributing_equipment()],
    )
    seg.SeriesDescription = seg_series_description(first, plane, mapped_from)
    _add_laterality(seg, first)
    _declare_private_schemes(seg, schemes)
    return seg


def seg_series_description(source: Dataset, plane: str | None, mapped_from: MappedFrom | None = None) -> str:
    """``AI segmentation <plane> [(from <plane>)] <source description>``, at most 64 characters
    (LO): the plane comes first so that a long source description cannot push it out."""
    source_description = " ".join(str(source.get("SeriesDescription", "") or "").split())
    parts = ["AI segmentation"]
    if plane:
        parts.append(plane)
    if mapped_from is not None:
        parts.append(f"(from {mapped_from.plane})")
    parts.append(source_description)
    return " ".join(p for p in parts if p)[:64].strip()


def _add_laterality(seg: Dataset, source: Dataset) -> None:
    """The side of the source series, as a multi-frame object states it.

    A knee is a paired body part, so the side is required.  In the SEG it goes in the shared
    Frame Anatomy (Frame Laterality with the knee as anatomic region), not in the General Series
    Laterality: with Frame Laterality present, PixelMed requires no series Laterality, and
    dciodvfy rejects a series Laterality in a SEG (Type 2C, "present when condition
    unsatisfied").  Body Part Examined is copied too.  A source without a side adds nothing.
    """
    body_part = str(source.get("BodyPartExamined", "") or "").strip()
    if body_part:
        seg.BodyPartExamined = body_part
    laterality = _source_laterality(source)
    if laterality not in ("L", "R"):
        return
    from pydicom.sr.codedict import codes  # noqa: PLC0415

    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = DicomSequence([hd.sr.CodedConcept.from_code(codes.SCT.Knee)])
    anatomy.FrameLaterality = laterality
    seg.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = DicomSequence([anatomy])


def _source_laterality(source: Dataset) -> str:
    """Laterality, Image Laterality, or for an Enhanced (multi-frame) source the Frame
    Laterality of its shared (else first per-frame) Frame Anatomy, which is where such an object
    states the side."""
    side = str(source.get("Laterality", "") or source.get("ImageLaterality", "") or "").strip()
    if side:
        return side
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = source.get(groups) or []
        anatomy = items[0].get("FrameAnatomySequence") if items else None
        if anatomy:
            return str(anatomy[0].get("FrameLaterality", "") or "").strip()
    return ""


def _declare_private_schemes(dataset: Dataset, schemes: set[str]) -> None:
    """Add the Coding Scheme Identification item of the project's private scheme, if used."""
    from sr_templates import structures_coding_scheme  # noqa: PLC0415

    scheme = structures_coding_scheme()
    if scheme.designator not in schemes:
        return
    existing = dataset.get("CodingSchemeIdentificationSequence", DicomSequence())
    if any(item.CodingSchemeDesignator == scheme.designator for item in existing):
        return
    existing.append(scheme.dataset())
    dataset.CodingSchemeIdentificationSequence = existing
