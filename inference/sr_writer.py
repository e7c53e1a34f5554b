"""DICOM SR writer: the diagnostic findings and structure volumes as a TID 1500 Measurement Report.

Why one module of about 690 lines: the content tree is shaped by two readers' constraints
(below), written beside the code that meets each of them.

The report is a highdicom ``MeasurementReport`` (TID 1500) inside a ``Comprehensive3DSR``,
the only SR form OHIF interprets.  Two readers shape its content tree, and both were checked
against their code: PixelMed's ``DicomSRValidator`` and OHIF 3.13's SR extension.

- OHIF turns every measurement group of Imaging Measurements into a measurement and reads
  ``coords[0]`` of each: a group without an SCOORD/SCOORD3D (and without a group of the same
  Tracking UID that has one) raises a TypeError and the viewer shows "Something went wrong".
  Groups with the same Tracking Unique Identifier are merged into one measurement.
- OHIF loads ("hydrates") a report into its Measurements panel only when a group's Tracking
  Identifier names one of its tools, ``Cornerstone3DTools@^0.1.0:<tool>`` (or its region is a
  point or a 4-5 point rectangle).  Its freehand ROI adapter then takes the outline and the
  area from the group's *first* NUM, which must itself be INFERRED FROM the outline (else the
  group is skipped), and names the measurement after the group's TEXT Comment (DCM 121106);
  the Finding and Finding Site only show as details.  A group it cannot hydrate (a TID 1411
  volume) is skipped with a console warning.
- PixelMed chooses the sub-template of *all* groups from the whole Imaging Measurements
  container: once any group references a segment, every group is validated as TID 1411 and
  needs an Image Region, a Referenced Segment or a Volume Surface.  A TID 1501 group without
  image references next to TID 1411 groups is an error there.

So every group in Imaging Measurements is placed on the images, and a classification that
cannot be placed is reported where neither reader trips over it:

- Observation context: the node as device observer (TID 1004).
- Procedure reported (template), Image Library (TID 1600) listing the evidence images.
- Imaging Measurements:
  - Algorithm Identification (TID 4019, TID 1500 row 7) once for the container, with the
    decision threshold of every label as an Algorithm Parameter;
  - one TID 1410 group per finding that can be placed: a label whose template names a
    segmented structure (knee: ACL, PCL, menisci) that the label map holds.  Its region is
    the outline (convex hull of the pixels) of that structure on its key slice, the source
    slice where the structure's cross-section is largest, as a closed POLYLINE on that source
    image; finding type, finding site with laterality, the area the outline encloses (SCT
    42798000, mm2, the first NUM, INFERRED FROM the outline), the probability (DCM 122157,
    UCUM "1"), the qualitative evaluation Presence of property (DCM 121052) = Present/Absent,
    and a TEXT Comment, the label viewers list it under (``<finding>: present (p = 0.80)``);
  - one TID 1411 group per structure with a non-zero volume, referencing the structure's SEG
    segment (built explicitly, see the single-segment pitfall in docs/peers.md) with the
    volume (SCT 118565006) in cm3 (= mL) and the same tracking UID as the segment.  For OHIF
    the same tracking UID also gets a TID 1410 group with the structure's outline and area
    on its key slice (as for a finding), labelled ``<structure> (volume 12.34 mL)``;
  - every TID 1410 group has the Tracking Identifier ``Cornerstone3DTools@^0.1.0:PlanarFreehandROI``
    (free text in TID 4108), the TID 1411 groups the structure's name.  OHIF 3.13 then lists
    each placed finding and structure outline in its Measurements panel and jumps to its key
    slice.  PixelMed (its TID 1411 rows, by which it checks every group) reports the Comment,
    the NUM's SCOORD and its image as "Content Item not in template" warnings: they extend
    the extensible templates, no error.
- Qualitative Evaluations (TID 1500 rows 12-14), which OHIF does not read: one CODE item per
  label (the finding's concept = Present/Absent), so findings without a location are still
  coded, and TEXT lines for PACS that show SR as text: one line per finding with probability
  and threshold, the volumes, the impression, the series used per plane, the missing planes,
  and the notice that this is research software whose output no physician has verified.

The document is COMPLETE (all planned content is there), PRELIMINARY and UNVERIFIED; UIDs are
derived from the study, the series used and the model version (see :mod:`inference.uids`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.labels import KNEE_STRUCTURES, PLANES
from inference.seg_writer import complete_type2_header
from inference.uids import AlgorithmInfo, NodeInfo, default_node_info, derived_uid, instances_fingerprint
from sr_templates import CodingSchemeSpec, JointTemplate, load_structures, structures_coding_scheme

#: TID 1500 row 12 container; UMLS concept as used by TID 1500 itself
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: unit of a probability: UCUM "1" (no units)
PROBABILITY_UNIT = codes.UCUM.NoUnits
#: unit of a volume; 1 cm3 = 1 mL, and "cm3" is the UCUM code PS3.16 lists
VOLUME_UNIT = codes.UCUM.CubicCentimeter
NOTICE = "Research use only; not a medical device. Automated result, not verified by a physician."

_LATERALITY: dict[str, tuple[Code, str]] = {
    "R": (codes.SCT.Right, "right"),
    "L": (codes.SCT.Left, "left"),
}


@dataclass(frozen=True)
class Finding:
    """One label's classification result.

    ``present`` must agree with ``probability >= threshold``: a caller that decided presence
    some other way has a bug, and the report would contradict itself.
    """

    key: str
    name: str
    probability: float
    threshold: float
    present: bool

    def __post_init__(self) -> None:
        for attr in ("probability", "threshold"):
            value = getattr(self, attr)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"Finding {self.key!r}: {attr} must be a finite number, got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Finding {self.key!r}: {attr} must lie in [0, 1], got {value}")
        if self.present != (self.probability >= self.threshold):
            raise ValueError(
                f"Finding {self.key!r}: present={self.present} contradicts probability "
                f"{self.probability:.4f} vs threshold {self.threshold:.4f}"
            )

    @classmethod
    def at_threshold(cls, key: str, name: str, probability: float, threshold: float) -> Finding:
        """The finding with ``present`` decided as ``probability >= threshold``."""
        return cls(key, name, float(probability), float(threshold), float(probability) >= float(threshold))

    def text(self) -> str:
        """One report line, e.g. ``Joint effusion: present (probability 0.87, threshold 0.50)``."""
        state = "present" if self.present else "absent"
        return f"{self.name}: {state} (probability {self.probability:.2f}, threshold {self.threshold:.2f})"


def _check_inputs(
    template: JointTemplate,
    evidence: Sequence[Dataset],
    findings: Sequence[Finding],
    used_series: Mapping[str, tuple[str, str]],
    missing_planes: Sequence[str],
    laterality: str | None,
    segmentation: Dataset | None,
    volumes_ml: Mapping[str, float] | None,
) -> str:
    """Validate the arguments together; return the study UID."""
    if not evidence:
        raise ValueError("evidence must hold at least one source instance (the first of each used series)")
    study_uid = str(evidence[0].StudyInstanceUID)
    for i, ds in enumerate(evidence):
        if str(ds.StudyInstanceUID) != study_uid:
            raise ValueError(f"evidence[{i}] belongs to study {ds.StudyInstanceUID}, not {study_uid}")
    expected = [label.key for label in template.labels]
    keys = [f.key for f in findings]
    if sorted(keys) != sorted(expected) or len(set(keys)) != len(keys):
        missing = [k for k in expected if k not in keys]
        extra = [k for k in keys if k not in expected or keys.count(k) > 1]
        raise ValueError(
            f"findings must hold each label of the {template.joint} template once; "
            f"missing {missing}, unexpected or repeated {extra}"
        )
    for plane in (*used_series, *missing_planes):
        if plane not in PLANES:
            raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    both = set(used_series) & set(missing_planes)
    if both:
        raise ValueError(f"plane(s) {sorted(both)} are both in used_series and missing_planes")
    if not used_series:
        raise ValueError("used_series is empty: a report needs at least one analysed series")
    evidence_series = {str(ds.SeriesInstanceUID) for ds in evidence}
    for plane, (series_uid, _description) in used_series.items():
        if series_uid not in evidence_series:
            raise ValueError(f"used series of plane {plane!r} ({series_uid}) has no instance in evidence")
    if laterality is not None and laterality not in _LATERALITY:
        raise ValueError(f"laterality must be 'L', 'R' or None, got {laterality!r}")
    if segmentation is not None and str(segmentation.StudyInstanceUID) != study_uid:
        raise ValueError(f"segmentation belongs to study {segmentation.StudyInstanceUID}, not {study_uid}")
    if volumes_ml:
        if segmentation is None:
            raise ValueError("volumes_ml needs the segmentation whose segments they measure")
        numbers = {int(item.SegmentNumber) for item in segmentation.SegmentSequence}
        known = {s.key: s.index for s in KNEE_STRUCTURES}
        for key, value in volumes_ml.items():
            if key not in known:
                raise ValueError(f"volumes_ml key {key!r} is not a structure of inference.labels.KNEE_STRUCTURES")
            if known[key] not in numbers:
                raise ValueError(f"volumes_ml key {key!r}: segment {known[key]} is not in the segmentation")
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"volumes_ml[{key!r}] must be a finite number >= 0, got {value!r}")
    return study_uid


#: TID 1411 row 12 as PS3.16 spells it (highdicom 0.28 writes "Source Series for Segmentation")
SOURCE_SERIES_FOR_SEGMENTATION = Code("121232", "DCM", "Source series for segmentation")
#: unit of an outline's area: mm2, the unit OHIF (cornerstone3D) measures a freehand ROI in
AREA_UNIT = codes.UCUM.SquareMillimeter


@dataclass(frozen=True)
class KeySlice:
    """Where one structure is shown: the source slice of its largest cross-section.

    ``source`` is the source dataset of that slice and ``frame`` its frame number (1-based)
    for a multi-frame source, else ``None``.  ``outline`` is a closed polygon (first point
    repeated last) of (column, row) image coordinates around the structure's pixels on that
    slice (the convex hull of their corners); ``area_mm2`` the area the outline encloses (the
    region's area, as a viewer measures that polygon).
    """

    source: Dataset
    frame: int | None
    outline: np.ndarray
    area_mm2: float

    def region(self) -> hd.sr.ImageRegion:
        """The TID 1410 Image Region: the outline as a closed POLYLINE on the key slice."""
        source = hd.sr.SourceImageForRegion.from_source_image(
            self.source, referenced_frame_numbers=[self.frame] if self.frame else None
        )
        return hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=self.outline, source_image=source
        )

    def area_measurement(self) -> hd.sr.Measurement:
        """The Area of the region (TID 1419 row 5): what the outline encloses, in mm2."""
        return hd.sr.Measurement(name=codes.SCT.Area, value=round(self.area_mm2, 3), unit=AREA_UNIT)

    def inferred_from(self) -> hd.sr.ScoordContentItem:
        """The outline again, as the SCOORD (TID 320 row 3) a measurement is INFERRED FROM,
        with the key slice it is SELECTED FROM."""
        item = hd.sr.ScoordContentItem(
            name=codes.DCM.ImageRegion,
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=self.outline,
            relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
        )
        item.ContentSequence = hd.sr.ContentSequence([
            hd.sr.SourceImageForRegion.from_source_image(
                self.source, referenced_frame_numbers=[self.frame] if self.frame else None
            )
        ])
        return item


def _outline(mask: np.ndarray) -> np.ndarray:
    """Closed convex polygon (column, row) around the pixels of a 2D mask (pixel corners)."""
    from scipy.spatial import ConvexHull  # noqa: PLC0415 - only when placing findings

    rows, cols = np.nonzero(mask)
    corners = np.concatenate(
        [np.stack([cols + dc, rows + dr], axis=1) for dr in (0, 1) for dc in (0, 1)]
    ).astype(float)
    corners = np.unique(corners, axis=0)
    vertices = corners[ConvexHull(corners).vertices]  # counter-clockwise, no repeats
    return np.vstack([vertices, vertices[:1]])


def _enclosed_area(outline: np.ndarray) -> float:
    """Area (in pixels) a closed polygon of (column, row) points encloses (shoelace formula)."""
    x, y = outline[:-1, 0], outline[:-1, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def key_slices(segmented_series: Sequence[Dataset], label_map: np.ndarray) -> dict[str, KeySlice]:
    """Key slice of every structure present in ``label_map`` (sorted slice order, as for the SEG).

    The key slice is the one where the structure's cross-section is largest (the first such
    slice along the normal on a tie).
    """
    from inference.seg_writer import multiframe_sort_order, sort_single_frame  # noqa: PLC0415

    if len(segmented_series) == 1 and int(segmented_series[0].get("NumberOfFrames", 1)) > 1:
        (multiframe,) = segmented_series
        order = multiframe_sort_order(multiframe)
        slices = [(multiframe, int(order[k]) + 1) for k in range(len(order))]
        shared = multiframe.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        measures = (shared.get("PixelMeasuresSequence") or
                    multiframe.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence)[0]
        rows, columns = int(multiframe.Rows), int(multiframe.Columns)
    else:
        ordered = sort_single_frame(segmented_series)
        slices = [(ds, None) for ds in ordered]
        measures = ordered[0]
        rows, columns = int(ordered[0].Rows), int(ordered[0].Columns)
    if label_map.shape != (len(slices), rows, columns):
        raise ValueError(
            f"label_map shape {label_map.shape} does not match the segmented series "
            f"(slices, rows, columns) = {(len(slices), rows, columns)}"
        )
    row_mm, col_mm = (float(v) for v in measures.PixelSpacing)
    placed: dict[str, KeySlice] = {}
    for structure in KNEE_STRUCTURES:
        areas = (label_map == structure.index).sum(axis=(1, 2))
        if not areas.any():
            continue
        k = int(np.argmax(areas))
        source, frame = slices[k]
        outline = _outline(label_map[k] == structure.index)
        placed[structure.key] = KeySlice(
            source=source,
            frame=frame,
            outline=outline,
            area_mm2=_enclosed_area(outline) * row_mm * col_mm,
        )
    return placed


#: Tracking Identifier of every group placed on the images: the name the cornerstone3D adapters
#: of OHIF 3.13 give their freehand ROI tool.  OHIF hydrates a TID 1500 group into its
#: Measurements panel only when its Tracking Identifier names one of its tools (or its outline is
#: a point or a 4-5 point rectangle); TID 4108 allows any text here, and the Tracking Unique
#: Identifier is what identifies the finding or structure.
VIEWER_TRACKING_IDENTIFIER = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
#: a group's free-text label, a TEXT qualitative evaluation; OHIF names the measurement with it
COMMENT = Code("121106", "DCM", "Comment")


def finding_label(finding: Finding) -> str:
    """The name a viewer lists a placed finding under, e.g.
    ``Anterior cruciate ligament tear: present (p = 0.80)`` (short: OHIF shows two lines)."""
    return f"{finding.name}: {'present' if finding.present else 'absent'} (p = {finding.probability:.2f})"


def structure_label(name: str, volume_ml: float) -> str:
    """The name a viewer lists a structure outline under, e.g. ``Femur (volume 162.02 mL)``."""
    return f"{name} (volume {volume_ml:.2f} mL)"


def _make_viewable(group: Dataset, key_slice: KeySlice, label: str) -> None:
    """Add to a TID 1410 group what OHIF 3.13 needs to list and draw it (its SR hydration, read
    in the cornerstone3D adapters' MeasurementReport and PlanarFreehandROI): the group's first
    NUM, the Area, INFERRED FROM the outline (the adapter takes the outline and the area from the
    first NUM, and skips the group when that NUM has no SCOORD), and the label as a TEXT
    Comment, which OHIF shows as the measurement's name."""
    items = group[0].ContentSequence
    first = next(item for item in items if item.ValueType == "NUM")
    if first.ConceptNameCodeSequence[0].CodeValue != codes.SCT.Area.value:
        raise ValueError("the first measurement of a group shown in viewers must be its Area")
    first.ContentSequence = hd.sr.ContentSequence([key_slice.inferred_from()])
    items.append(_text(COMMENT, label))


def _finding_group(
    finding: Finding,
    template: JointTemplate,
    laterality: Code | None,
    study_uid: str,
    version: str,
    key_slice: KeySlice,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one finding, on the key slice of the structure it concerns."""
    label = template.label(finding.key)
    site = label.finding_site
    location = site.location.code() if site else template.finding_site.code()
    modifier = site.modifier.code() if site and site.modifier else None
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(study_uid, version, "finding-tracking", template.joint, finding.key),
            identifier=VIEWER_TRACKING_IDENTIFIER,
        ),
        referenced_region=key_slice.region(),
        finding_type=label.concept.code(),
        finding_sites=[hd.sr.FindingSite(location, laterality=laterality, topographical_modifier=modifier)],
        measurements=[
            key_slice.area_measurement(),
            hd.sr.Measurement(name=codes.DCM.Probability, value=round(finding.probability, 6), unit=PROBABILITY_UNIT),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.DCM.PresenceOfProperty,
                value=codes.DCM.Present if finding.present else codes.DCM.Absent,
            )
        ],
    )
    _make_viewable(group, key_slice, finding_label(finding))
    return group


def _unplaced_group(
    finding: Finding, template: JointTemplate, study_uid: str, version: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one finding (no image reference); only to build a report whose
    Imaging Measurements are then removed, see :func:`write_report`."""
    label = template.label(finding.key)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(study_uid, version, "finding-tracking", template.joint, finding.key),
            identifier=label.name[:64],
        ),
        finding_type=label.concept.code(),
    )


def _spell_source_series(group: Dataset) -> None:
    """Write (121232, DCM) with the meaning PS3.16 gives it."""
    for item in group[0].ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if name.CodeValue == SOURCE_SERIES_FOR_SEGMENTATION.value and name.CodingSchemeDesignator == "DCM":
            name.CodeMeaning = SOURCE_SERIES_FOR_SEGMENTATION.meaning


def _structure_groups(
    segmentation: Dataset,
    volumes_ml: Mapping[str, float],
    placed: Mapping[str, KeySlice],
    laterality: Code | None,
) -> list:
    """Per structure shown on the images: a TID 1410 group (outline and area on its key slice)
    and a TID 1411 group (its SEG segment and volume), both with the segment's tracking UID."""
    templates = {t.key: t for t in load_structures()}
    source_series_uid = str(segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID)
    groups: list = []
    for structure in KNEE_STRUCTURES:
        if structure.key not in volumes_ml or structure.key not in placed:
            continue  # absent from the label map: nothing to show; its volume 0 is in the text
        tpl = templates[structure.key]
        segment = next(
            item for item in segmentation.SegmentSequence if int(item.SegmentNumber) == structure.index
        )
        sites = [hd.sr.FindingSite(tpl.anatomic_region.code(), laterality=laterality)] if tpl.anatomic_region else None
        outline = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=str(segment.TrackingUID), identifier=VIEWER_TRACKING_IDENTIFIER
            ),
            referenced_region=placed[structure.key].region(),
            finding_type=tpl.type.code(),
            finding_sites=sites,
            measurements=[placed[structure.key].area_measurement()],
        )
        _make_viewable(outline, placed[structure.key], structure_label(structure.name, volumes_ml[structure.key]))
        groups.append(outline)
        tracking = hd.sr.TrackingIdentifier(uid=str(segment.TrackingUID), identifier=structure.name[:64])
        # Built explicitly: ReferencedSegment.from_segmentation fails on single-segment SEGs.
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=str(segmentation.SOPClassUID),
            sop_instance_uid=str(segmentation.SOPInstanceUID),
            segment_number=structure.index,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
        )
        volume_group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=referenced,
            finding_type=tpl.type.code(),
            finding_sites=sites,
            measurements=[
                hd.sr.Measurement(
                    name=codes.SCT.Volume, value=round(float(volumes_ml[structure.key]), 4), unit=VOLUME_UNIT
                )
            ],
        )
        _spell_source_series(volume_group)
        groups.append(volume_group)
    return groups


def impression_text(template: JointTemplate, findings: Sequence[Finding], missing_planes: Sequence[str]) -> str:
    """The impression: positive findings first, then the negatives, then the limitations."""
    by_key = {f.key: f for f in findings}
    present = [label.impression_present for label in template.labels if by_key[label.key].present]
    absent = [label.impression_absent for label in template.labels if not by_key[label.key].present]
    sentences = present or [template.impression_normal]
    if present and absent:
        sentences += absent
    if missing_planes:
        sentences.append(f"Limited assessment: no {' or '.join(missing_planes)} series was available.")
    return " ".join(sentences)


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _qualitative_container(
    template: JointTemplate,
    findings: Sequence[Finding],
    used_series: Mapping[str, tuple[str, str]],
    missing_planes: Sequence[str],
    laterality: str | None,
    volumes_ml: Mapping[str, float] | None,
) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the report as text lines, for PACS that render SR as plain text."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    by_key = {f.key: f for f in findings}
    items: list = [
        # TID 1500 row 13: every label coded, placed on the images or not
        hd.sr.CodeContentItem(
            name=label.concept.code(),
            value=codes.DCM.Present if by_key[label.key].present else codes.DCM.Absent,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for label in template.labels
    ]
    side = f"{_LATERALITY[laterality][1]} " if laterality else ""
    items.append(_text(codes.DCM.Summary, f"{template.title} ({side}{template.joint})"))
    for label in template.labels:
        items.append(_text(codes.DCM.Finding, by_key[label.key].text()))
    if volumes_ml:
        names = {s.key: s.name for s in KNEE_STRUCTURES}
        volumes = ", ".join(
            f"{names[s.key]} {volumes_ml[s.key]:.2f} mL" for s in KNEE_STRUCTURES if s.key in volumes_ml
        )
        items.append(_text(codes.DCM.Comment, f"Structure volumes: {volumes}"))
    items.append(_text(codes.DCM.Impression, impression_text(template, findings, missing_planes)))
    for plane in PLANES:
        if plane in used_series:
            uid, description = used_series[plane]
            items.append(
                _text(
                    codes.DCM.SourceSeriesForImageProcessingOperation,
                    f"{plane}: {description or '(no description)'} (Series Instance UID {uid})",
                )
            )
    if missing_planes:
        items.append(_text(codes.DCM.Comment, f"Missing planes: {', '.join(missing_planes)}"))
    items.append(_text(codes.DCM.Comment, NOTICE))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _add_algorithm_identification(
    report: hd.sr.MeasurementReport, algorithm: AlgorithmInfo, findings: Sequence[Finding]
) -> None:
    """TID 4019 once for Imaging Measurements (TID 1500 row 7), thresholds as its parameters."""
    # name, version, parameters and family: the rows of TID 4019 (the manufacturer is in the
    # Contributing Equipment Sequence)
    identification = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"decision threshold {f.key} {f.threshold:.4f}" for f in findings],
        family=algorithm.family,
    )
    container = next(
        item for item in report[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value
    )
    container.ContentSequence = hd.sr.ContentSequence([*identification, *container.ContentSequence])


def _coding_schemes(schemes: Sequence[CodingSchemeSpec]) -> DicomSequence:
    """Coding Scheme Identification items, one per private designator; conflicts are errors."""
    by_designator: dict[str, CodingSchemeSpec] = {}
    for scheme in schemes:
        previous = by_designator.setdefault(scheme.designator, scheme)
        if previous != scheme:
            raise ValueError(
                f"private coding scheme {scheme.designator!r} is declared differently in the joint "
                f"template and in structures.yaml: {previous} vs {scheme}"
            )
    return DicomSequence([scheme.dataset() for scheme in by_designator.values()])


def write_report(
    template: JointTemplate,
    evidence: Sequence[Dataset],
    findings: list[Finding],
    used_series: Mapping[str, tuple[str, str]],
    missing_planes: list[str],
    laterality: str | None,
    algorithm: AlgorithmInfo,
    segmentation: hd.seg.Segmentation | None,
    volumes_ml: Mapping[str, float] | None,
    series_number: int,
    node_info: NodeInfo | None = None,
    input_fingerprint: str | None = None,
    previous_versions: Sequence[Dataset] = (),
    label_map: np.ndarray | None = None,
    segmented_series: Sequence[Dataset] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR of one analysed study.

    Args:
        template: the joint's report template (:func:`sr_templates.load_template`).
        evidence: one source instance per used series (e.g. the first of each); they define
            the patient and study of the report and fill the Image Library.
        findings: one :class:`Finding` per label of the template.
        used_series: plane -> (Series Instance UID, Series Description) of the series used.
        missing_planes: planes the model expected but the study did not provide.
        laterality: ``"L"``, ``"R"`` or ``None`` when unknown.
        algorithm: the model; its version enters the UIDs.
        segmentation: the SEG written for the same study, referenced by the volume groups.
        volumes_ml: structure key -> volume in mL, one TID 1411 group each.
        input_fingerprint: digest of every source instance the analysis used
            (:func:`inference.uids.instances_fingerprint` over all used series); it enters the
            UIDs so changed inputs give a new report and unchanged inputs the same one.  Default:
            the digest of ``evidence``.
        series_number: Series Number of the new SR series.
        node_info: the writing node; defaults to the installed package.
        previous_versions: earlier reports of the study that this one replaces (headers are
            enough).  Those with another SOP Instance UID are listed in the Predecessor
            Documents Sequence, so a viewer knows which report is current; one with this
            report's own UID (same inputs, same model) is the same document and is left out.
        label_map: the label map the SEG was written from, on the grid of ``segmented_series``
            (slices in the SEG writer's sorted order).  With it, findings tied to a structure
            and the structures themselves are placed on their key slices (TID 1410 groups)
            and volumes are reported per segment (TID 1411); without it the report holds no
            measurement groups, only the coded and written evaluations.
        segmented_series: the source series of ``segmentation`` (its datasets, any order).
    """
    node_info = node_info or default_node_info()
    study_uid = _check_inputs(
        template, evidence, findings, used_series, missing_planes, laterality, segmentation, volumes_ml
    )
    complete_type2_header(evidence)  # the report's Patient and Study modules come from evidence[0]
    laterality_code = _LATERALITY[laterality][0] if laterality else None
    order = {label.key: i for i, label in enumerate(template.labels)}
    findings = sorted(findings, key=lambda f: order[f.key])

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(node_info.manufacturer, node_info.model_name, node_info.device_serial_number, "device"),
        name=node_info.model_name,
        manufacturer_name=node_info.manufacturer,
        model_name=node_info.model_name,
        serial_number=node_info.device_serial_number,
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    schemes = [template.coding_scheme]
    placed: dict[str, KeySlice] = {}
    if label_map is not None:
        if segmentation is None or segmented_series is None:
            raise ValueError("label_map needs the segmentation and its segmented_series")
        placed = key_slices(segmented_series, label_map)
    elif segmented_series is not None:
        raise ValueError("segmented_series is given without the label_map to place findings with")
    groups: list = [
        _finding_group(f, template, laterality_code, study_uid, algorithm.version, placed[structure])
        for f in findings
        if (structure := template.label(f.key).structure) is not None and structure in placed
    ]
    if segmentation is not None and volumes_ml and placed:
        groups.extend(_structure_groups(segmentation, volumes_ml, placed, laterality_code))
        schemes.append(structures_coding_scheme())
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=template.procedure.code(),
        # highdicom needs at least one group; with nothing placed they are removed below
        imaging_measurements=groups or [_unplaced_group(f, template, study_uid, algorithm.version) for f in findings],
        referenced_images=list(evidence),
    )
    if groups:
        _add_algorithm_identification(report, algorithm, findings)
    else:
        # Nothing can be placed on the images.  Groups without coordinates make OHIF 3.13 fail
        # ("Something went wrong"), so the report has no Imaging Measurements; TID 1500 then
        # requires the Qualitative Evaluations, which code every finding (row 13).
        report[0].ContentSequence = hd.sr.ContentSequence(
            [
                item for item in report[0].ContentSequence
                if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImagingMeasurements.value
            ],
            is_root=False,
        )
    report[0].ContentSequence.append(
        _qualitative_container(template, findings, used_series, missing_planes, laterality, volumes_ml)
    )

    series_uids = sorted(uid for uid, _ in used_series.values())
    inputs = input_fingerprint or instances_fingerprint(list(evidence))
    all_evidence = list(evidence) + ([segmentation] if segmentation is not None else [])
    known = {str(ds.SOPInstanceUID) for ds in all_evidence}
    for key_slice in placed.values():  # the key slices the regions lie on are evidence too
        if str(key_slice.source.SOPInstanceUID) not in known:
            known.add(str(key_slice.source.SOPInstanceUID))
            all_evidence.append(key_slice.source)
    sop_instance_uid = derived_uid(study_uid, *series_uids, inputs, algorithm.version, "sr-instance", template.joint)
    # the reports this one replaces: earlier versions of this study's report, not this very one
    # (the same inputs give the same UID: a resend, not a new version)
    predecessors = [
        ds for ds in previous_versions
        if str(ds.StudyInstanceUID) == study_uid and str(ds.SOPInstanceUID) != sop_instance_uid
    ]
    sr = hd.sr.Comprehensive3DSR(
        evidence=all_evidence,
        content=report,
        series_instance_uid=derived_uid(study_uid, *series_uids, inputs, algorithm.version, "sr-series", template.joint),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=node_info.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[node_info.contributing_equipment(), algorithm.contributing_equipment()],
        previous_versions=predecessors or None,
    )
    sr.ManufacturerModelName = node_info.model_name
    sr.SoftwareVersions = node_info.software_version
    sr.DeviceSerialNumber = node_info.device_serial_number
    sr.SeriesDescription = f"AI report {template.joint}"[:64]
    sr.CodingSchemeIdentificationSequence = _coding_schemes(schemes)
    return sr
