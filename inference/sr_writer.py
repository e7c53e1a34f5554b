"""DICOM SR writer: the diagnostic findings and structure volumes as a TID 1500 Measurement Report.

The report is a highdicom ``MeasurementReport`` (TID 1500) inside a ``Comprehensive3DSR``,
the only SR form OHIF interprets.  Its content tree:

- Observation context: the node as device observer (TID 1004).
- Procedure reported (template), Image Library (TID 1600) listing the evidence images: the
  first instance of each series the model used, so the series per plane are recorded as data.
- Imaging Measurements:
  - one TID 1501 group per label of the joint, in model order: finding type = the label's
    concept from the template, Algorithm Identification (TID 4019, with the decision threshold
    as a parameter), finding site with laterality, the probability (DCM 122157, unit UCUM "1")
    and the qualitative evaluation Presence of property (DCM 121052) = Present (DCM 121053) /
    Absent (DCM 121054) at the model card's threshold.  The evaluation is not named Finding
    (DCM 121071): in TID 1501 that concept already names the group's finding type (row 3), and
    two "Finding" items in one group are ambiguous (highdicom reads back only one of them);
  - one TID 1411 group per structure volume, referencing the structure's SEG segment (built
    explicitly, see the single-segment pitfall in docs/peers.md) with the volume (SCT 118565006)
    in cm3 (= mL) and the same tracking UID as the segment.
- Qualitative Evaluations (TID 1500 row 12) as TEXT, for PACS that show SR as text: one line
  per finding, the impression, the series used per plane, the missing planes, and the notice
  that this is research software whose output no physician has verified.

The document is COMPLETE (all planned content is there), PRELIMINARY and UNVERIFIED; UIDs are
derived from the study, the series used and the model version (see :mod:`inference.uids`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.labels import KNEE_STRUCTURES, PLANES
from inference.seg_writer import complete_type2_header, structure_tracking_uid
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


def _finding_group(
    finding: Finding,
    template: JointTemplate,
    algorithm: AlgorithmInfo,
    laterality: Code | None,
    study_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one label."""
    label = template.label(finding.key)
    site = label.finding_site
    location = site.location.code() if site else template.finding_site.code()
    modifier = site.modifier.code() if site and site.modifier else None
    algorithm_id = algorithm.sr_identification(parameters=[f"decision threshold {finding.threshold:.4f}"])
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(study_uid, algorithm.version, "finding-tracking", template.joint, finding.key),
            identifier=f"{finding.key}: {label.name}"[:64],
        ),
        finding_type=label.concept.code(),
        algorithm_id=algorithm_id,
        finding_sites=[hd.sr.FindingSite(location, laterality=laterality, topographical_modifier=modifier)],
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=round(finding.probability, 6),
                unit=PROBABILITY_UNIT,
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.DCM.PresenceOfProperty,
                value=codes.DCM.Present if finding.present else codes.DCM.Absent,
            )
        ],
    )


def _volume_groups(
    segmentation: Dataset,
    volumes_ml: Mapping[str, float],
    algorithm: AlgorithmInfo,
    laterality: Code | None,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """TID 1411 groups, one per structure volume, each referencing its SEG segment."""
    templates = {t.key: t for t in load_structures()}
    source_series_uid = str(segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID)
    study_uid = str(segmentation.StudyInstanceUID)
    algorithm_id = algorithm.sr_identification()
    groups = []
    for structure in KNEE_STRUCTURES:
        if structure.key not in volumes_ml:
            continue
        tpl = templates[structure.key]
        # Built explicitly: ReferencedSegment.from_segmentation fails on single-segment SEGs.
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=str(segmentation.SOPClassUID),
            sop_instance_uid=str(segmentation.SOPInstanceUID),
            segment_number=structure.index,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=structure_tracking_uid(study_uid, source_series_uid, algorithm.version, structure.key),
                    identifier=f"{structure.key}: {structure.name}"[:64],
                ),
                referenced_segment=referenced,
                finding_type=tpl.type.code(),
                algorithm_id=algorithm_id,
                finding_sites=(
                    [hd.sr.FindingSite(tpl.anatomic_region.code(), laterality=laterality)]
                    if tpl.anatomic_region
                    else None
                ),
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=round(float(volumes_ml[structure.key]), 4),
                        unit=VOLUME_UNIT,
                    )
                ],
            )
        )
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
    items: list[hd.sr.TextContentItem] = []
    side = f"{_LATERALITY[laterality][1]} " if laterality else ""
    items.append(_text(codes.DCM.Summary, f"{template.title} ({side}{template.joint})"))
    by_key = {f.key: f for f in findings}
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
    groups: list = [_finding_group(f, template, algorithm, laterality_code, study_uid) for f in findings]
    schemes = [template.coding_scheme]
    if segmentation is not None and volumes_ml:
        groups.extend(_volume_groups(segmentation, volumes_ml, algorithm, laterality_code))
        schemes.append(structures_coding_scheme())
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=template.procedure.code(),
        imaging_measurements=groups,
        referenced_images=list(evidence),
    )
    report[0].ContentSequence.append(
        _qualitative_container(template, findings, used_series, missing_planes, laterality, volumes_ml)
    )

    series_uids = sorted(uid for uid, _ in used_series.values())
    inputs = input_fingerprint or instances_fingerprint(list(evidence))
    all_evidence = list(evidence) + ([segmentation] if segmentation is not None else [])
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
