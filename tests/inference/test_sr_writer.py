"""SR writer: TID 1500 content, dciodvfy, dsrdump text, highdicom round trip, UIDs, templates."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
import highdicom as hd
from pydicom.sr.codedict import codes

from inference.labels import JOINTS, KNEE_STRUCTURES, label_keys
from inference.seg_writer import structure_volumes_ml, write_segmentation
from inference.sr_writer import VIEWER_TRACKING_IDENTIFIER, Finding, write_report
from inference.uids import AlgorithmInfo, NodeInfo
from sr_templates import load_template
from tests.inference.output_factory import (
    dciodvfy_errors,
    dsrdump_text,
    knee_label_map,
    make_series,
    new_study,
    sorted_positions,
)

ALGORITHM = AlgorithmInfo(name="OrthoDiffusion", version="2.0.1")
NODE = NodeInfo(software_version="0.1.0")
THRESHOLDS = (0.5, 0.3, 0.65, 0.45, 0.5, 0.5, 0.4, 0.55)


def _findings(joint: str, seed: int) -> list[Finding]:
    template = load_template(joint)
    rng = np.random.default_rng(seed)
    findings = []
    for i, label in enumerate(template.labels):
        threshold = THRESHOLDS[i % len(THRESHOLDS)]
        # alternate clearly above / below the threshold so both outcomes occur
        probability = threshold + (0.2 if i % 2 == 0 else -0.2) * float(rng.uniform(0.5, 1.0))
        findings.append(Finding.at_threshold(label.key, label.name, probability, threshold))
    return findings


@pytest.fixture(scope="module")
def knee_case():
    study = new_study()
    series = {
        "sagittal": make_series(study, "sagittal", series_number=3, description="PD FS SAG", seed=1),
        "coronal": make_series(study, "coronal", oblique=True, series_number=4, description="PD FS COR", seed=2),
    }
    label_map = knee_label_map((7, 24, 20), seed=4)
    seg = write_segmentation(series["sagittal"], label_map, ALGORITHM, 300, node_info=NODE)
    volumes = structure_volumes_ml(series["sagittal"], label_map)
    assert sum(v > 0 for v in volumes.values()) >= 5
    return study, series, seg, volumes, label_map


def _write_knee(knee_case, findings, algorithm=ALGORITHM, previous_versions=()):
    _study, series, seg, volumes, label_map = knee_case
    return write_report(
        template=load_template("knee"),
        evidence=[s[0] for s in series.values()],
        findings=findings,
        used_series={p: (s[0].SeriesInstanceUID, s[0].SeriesDescription) for p, s in series.items()},
        missing_planes=["axial"],
        laterality="R",
        algorithm=algorithm,
        segmentation=seg,
        volumes_ml=volumes,
        series_number=301,
        node_info=NODE,
        previous_versions=previous_versions,
        label_map=label_map,
        segmented_series=series["sagittal"],
    )


def _items(container: Dataset, value: str) -> list[Dataset]:
    """Children of ``container`` whose concept name has code value ``value``."""
    return [i for i in container.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == value]


def _scoords(group: Dataset) -> list[Dataset]:
    return [i for i in group.ContentSequence if i.ValueType in ("SCOORD", "SCOORD3D")]


def _hull_area_mm2(mask: np.ndarray, spacing: tuple[float, float]) -> float:
    """Area of the convex hull of a 2D mask's pixel corners (scipy's hull), in mm2."""
    from scipy.spatial import ConvexHull

    rows, cols = np.nonzero(mask)
    corners = np.concatenate([np.stack([cols + dc, rows + dr], axis=1) for dr in (0, 1) for dc in (0, 1)])
    return float(ConvexHull(corners.astype(float)).volume) * spacing[0] * spacing[1]


def _assert_viewable(group: Dataset, label: str) -> None:
    """What OHIF 3.13 needs to list a TID 1410 group as a measurement named ``label`` (see the
    SR writer): its tool as Tracking Identifier, the Area as first NUM INFERRED FROM the
    group's outline on the same image, and the label as a TEXT Comment."""
    (tracking,) = _items(group, "112039")
    assert tracking.TextValue == VIEWER_TRACKING_IDENTIFIER
    (region,) = _scoords(group)
    first = next(i for i in group.ContentSequence if i.ValueType == "NUM")
    assert first.ConceptNameCodeSequence[0].CodeValue == codes.SCT.Area.value
    assert first.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm2"
    (inferred,) = first.ContentSequence
    assert (inferred.ValueType, inferred.RelationshipType, inferred.GraphicType) == ("SCOORD", "INFERRED FROM", "POLYLINE")
    assert list(inferred.GraphicData) == list(region.GraphicData)
    (image,) = inferred.ContentSequence
    assert image.RelationshipType == "SELECTED FROM"
    assert (image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    (comment,) = _items(group, "121106")
    assert (comment.ValueType, comment.TextValue) == ("TEXT", label)


@pytest.mark.dicomtools
def test_knee_report_round_trip(knee_case, tmp_path):
    study, series, seg, volumes, label_map = knee_case
    findings = _findings("knee", seed=0)
    path = tmp_path / "knee_sr.dcm"
    _write_knee(knee_case, findings).save_as(path)
    seg_path = tmp_path / "knee_seg.dcm"
    seg.save_as(seg_path)

    assert dciodvfy_errors(path) == []
    assert dciodvfy_errors(seg_path) == []

    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID == study.study_uid
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert "99ORTHONODE" in {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    equipment = {(e.Manufacturer, e.get("ManufacturerModelName")) for e in sr.ContributingEquipmentSequence}
    assert (ALGORITHM.manufacturer, ALGORITHM.model_name) in equipment
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study_item.ReferencedSeriesSequence
        for ref in series_item.ReferencedSOPSequence
    }
    assert {seg.SOPInstanceUID, series["sagittal"][0].SOPInstanceUID, series["coronal"][0].SOPInstanceUID} <= evidence

    template = load_template("knee")
    ordered = sorted_positions(series["sagittal"])
    spacing = tuple(float(v) for v in ordered[0].PixelSpacing)
    index = {s.key: s.index for s in KNEE_STRUCTURES}
    # findings tied to a segmented structure: TID 1410 on the structure's largest cross-section
    planar = sr.content.get_planar_roi_measurement_groups()
    by_concept = {(g.finding_type.scheme_designator, g.finding_type.value): g for g in planar}
    placed = [label for label in template.labels if label.structure is not None]
    assert [label.key for label in placed] == ["acl", "pcl", "mm", "lm"]
    for label in placed:
        finding = next(f for f in findings if f.key == label.key)
        group = by_concept[(label.concept.scheme, label.concept.value)]
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(finding.probability, abs=1e-6)
        state = "present" if finding.present else "absent"
        _assert_viewable(group[0], f"{finding.name}: {state} (p = {finding.probability:.2f})")
        (evaluation,) = group.get_qualitative_evaluations(name=codes.DCM.PresenceOfProperty)
        assert evaluation.value == (codes.DCM.Present if finding.present else codes.DCM.Absent)
        assert group.finding_sites[0].laterality == codes.SCT.Right
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value
        assert np.array_equal(points[0], points[-1]) and len(points) >= 5  # closed
        mask = label_map == index[label.structure]
        key = int(np.argmax(mask.sum(axis=(1, 2))))
        (referenced,) = region.ContentSequence[0].ReferencedSOPSequence
        assert referenced.ReferencedSOPInstanceUID == ordered[key].SOPInstanceUID
        rows, cols = np.nonzero(mask[key])
        # the outline encloses the structure's pixels (corners) and no more than its bounding box
        assert points[:, 0].min() == cols.min() and points[:, 0].max() == cols.max() + 1
        assert points[:, 1].min() == rows.min() and points[:, 1].max() == rows.max() + 1
        # its area is the area the outline encloses, as a viewer measures the polygon
        (area,) = group.get_measurements(name=codes.SCT.Area)
        assert area.value == pytest.approx(_hull_area_mm2(mask[key], spacing), abs=1e-3)
    # unplaced findings (no segmented structure) are no measurement group
    unplaced = {(label.concept.scheme, label.concept.value) for label in template.labels if label.structure is None}
    assert not unplaced & set(by_concept)

    # structures: a TID 1411 group (segment, volume) and a TID 1410 group (outline, area) per
    # structure present, both with the segment's tracking UID, so OHIF merges them; the outline
    # is listed in OHIF under the structure's name and volume, the volume group (which OHIF
    # cannot load as a tool) keeps the structure's name as Tracking Identifier
    volume_groups = sr.content.get_volumetric_roi_measurement_groups()
    present = [s for s in KNEE_STRUCTURES if volumes[s.key] > 0]
    assert len(volume_groups) == len(present)
    segment_labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    tracking = {int(s.SegmentNumber): s.TrackingUID for s in seg.SegmentSequence}
    planar_by_uid = {g.tracking_uid: g for g in planar}
    # a structure absent from the label map has no group (its volume 0 is in the text only)
    assert {g.tracking_uid for g in volume_groups} == {tracking[s.index] for s in present}
    for group, structure in zip(volume_groups, present):
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [structure.index]
        assert segment_labels[structure.index] == structure.name
        assert group.tracking_uid == tracking[structure.index]
        assert group.tracking_identifier == structure.name
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(volumes[structure.key], abs=1e-4)
        outline = planar_by_uid[group.tracking_uid]
        _assert_viewable(outline[0], f"{structure.name} (volume {volumes[structure.key]:.2f} mL)")
        (area,) = outline.get_measurements(name=codes.SCT.Area)
        mask = label_map == structure.index
        key = int(np.argmax(mask.sum(axis=(1, 2))))
        assert area.value == pytest.approx(_hull_area_mm2(mask[key], spacing), abs=1e-3)

    raw = sr.ContentSequence
    (measurements,) = _items(sr, "126010")
    # OHIF reads coords[0] of every group (merged by tracking UID): each needs an SCOORD
    groups = _items(measurements, "125007")
    with_coords = {
        _items(g, "112040")[0].UID for g in groups if _scoords(g)
    }
    assert all(_items(g, "112040")[0].UID in with_coords for g in groups)
    # TID 4019 once for the container, with every threshold; none inside the groups
    (name,) = _items(measurements, "111001")
    assert name.TextValue == ALGORITHM.name
    parameters = [i.TextValue for i in _items(measurements, "111002")]
    assert parameters == [f"decision threshold {f.key} {f.threshold:.4f}" for f in
                          sorted(findings, key=lambda f: label_keys("knee").index(f.key))]
    assert not any(_items(g, "111001") for g in groups)
    # PS3.16's spelling of (121232, DCM)
    for g in groups:
        for item in _items(g, "121232"):
            assert item.ConceptNameCodeSequence[0].CodeMeaning == "Source series for segmentation"
    # every label coded in the Qualitative Evaluations (TID 1500 row 13)
    (evaluations,) = [i for i in raw if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    coded = {
        (i.ConceptNameCodeSequence[0].CodingSchemeDesignator, i.ConceptNameCodeSequence[0].CodeValue):
            i.ConceptCodeSequence[0].CodeValue
        for i in evaluations.ContentSequence if i.ValueType == "CODE"
    }
    for finding in findings:
        concept = template.label(finding.key).concept
        assert coded[(concept.scheme, concept.value)] == ("121053" if finding.present else "121054")

    text = dsrdump_text(path)
    for finding in findings:
        state = "present" if finding.present else "absent"
        assert f"{finding.name}: {state} (probability {finding.probability:.2f}" in text
    assert 'Impression")="' in text
    positives = [template.label(f.key).impression_present for f in findings if f.present]
    assert positives and all(sentence in text for sentence in positives)
    assert "Research use only; not a medical device" in text
    assert "Missing planes: axial" in text
    assert "sagittal: PD FS SAG" in text and "coronal: PD FS COR" in text
    assert "Femur" in text and "mL" in text


def test_uids_deterministic_and_versioned(knee_case):
    findings = _findings("knee", seed=1)
    first = _write_knee(knee_case, findings)
    again = _write_knee(knee_case, list(reversed(findings)))
    newer = _write_knee(knee_case, findings, AlgorithmInfo(name="OrthoDiffusion", version="2.1.0"))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID
    assert first.SOPInstanceUID != newer.SOPInstanceUID


@pytest.mark.dicomtools
def test_predecessors_are_earlier_versions_only(knee_case, tmp_path):
    """A report of a newer model names the older one it replaces; the same report written
    again (same UID) or a report of another study is not a predecessor."""
    findings = _findings("knee", seed=1)
    older = _write_knee(knee_case, findings)
    other_study = Dataset()  # the header of a report of another study
    other_study.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.7"
    other_study.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.8"
    other_study.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.9"
    other_study.SOPClassUID = older.SOPClassUID
    newer = _write_knee(knee_case, findings, AlgorithmInfo(name="OrthoDiffusion", version="2.1.0"),
                        previous_versions=[older, other_study])
    (item,) = newer.PredecessorDocumentsSequence
    referenced = [i.ReferencedSOPInstanceUID for s in item.ReferencedSeriesSequence for i in s.ReferencedSOPSequence]
    assert referenced == [older.SOPInstanceUID]
    path = tmp_path / "sr.dcm"
    newer.save_as(path)
    assert dciodvfy_errors(path) == []
    again = _write_knee(knee_case, findings, previous_versions=[older])
    assert "PredecessorDocumentsSequence" not in again


@pytest.mark.dicomtools
@pytest.mark.parametrize("joint", [j for j in JOINTS if j != "knee"])
def test_other_joint_reports(joint, tmp_path):
    study = new_study(body_part=joint.upper())
    sagittal = make_series(study, "sagittal", seed=5, description=f"{joint} sag")
    axial = make_series(study, "axial", seed=6, description=f"{joint} ax")
    findings = _findings(joint, seed=2)
    sr = write_report(
        template=load_template(joint),
        evidence=[sagittal[0], axial[0]],
        findings=findings,
        used_series={"sagittal": (sagittal[0].SeriesInstanceUID, "s"), "axial": (axial[0].SeriesInstanceUID, "a")},
        missing_planes=["coronal"],
        laterality=None,
        algorithm=ALGORITHM,
        segmentation=None,
        volumes_ml=None,
        series_number=301,
        node_info=NODE,
    )
    path = tmp_path / f"{joint}.dcm"
    sr.save_as(path)
    assert dciodvfy_errors(path) == []
    read = hd.sr.srread(path)
    # nothing can be placed on the images: no Imaging Measurements (groups without coordinates
    # break OHIF), every finding coded in the Qualitative Evaluations
    assert not [i for i in read.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    (evaluations,) = [i for i in read.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    template = load_template(joint)
    coded = {i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0] for i in evaluations.ContentSequence
             if i.ValueType == "CODE"}
    for finding in findings:
        value = coded[template.label(finding.key).concept.value]
        assert value.CodeValue == ("121053" if finding.present else "121054")
    text = dsrdump_text(path)
    assert all(f.name in text for f in findings)
    assert "Missing planes: coronal" in text


@pytest.mark.dicomtools
def test_single_segment_segmentation_is_referenced(tmp_path):
    """highdicom's ReferencedSegment.from_segmentation fails on one-segment SEGs (peers.md)."""
    study = new_study()
    series = make_series(study, "sagittal", seed=8)
    label_map = knee_label_map((7, 24, 20), present=[1], seed=1)
    seg = write_segmentation(series, label_map, ALGORITHM, 300, structures=KNEE_STRUCTURES[:1], node_info=NODE)
    assert len(seg.SegmentSequence) == 1
    sr = write_report(
        template=load_template("knee"),
        evidence=[series[0]],
        findings=_findings("knee", seed=3),
        used_series={"sagittal": (series[0].SeriesInstanceUID, "sag")},
        missing_planes=["coronal", "axial"],
        laterality="L",
        algorithm=ALGORITHM,
        segmentation=seg,
        volumes_ml={"femur": 42.0},
        series_number=301,
        node_info=NODE,
        label_map=label_map,
        segmented_series=series,
    )
    path = tmp_path / "single.dcm"
    sr.save_as(path)
    assert dciodvfy_errors(path) == []
    read = hd.sr.srread(path)
    (group,) = read.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_segment_numbers == [1]
    # only the femur is in the label map: its outline is the one planar group; the findings
    # about the cruciates and menisci have no structure to be placed on
    (outline,) = read.content.get_planar_roi_measurement_groups()
    assert outline.tracking_uid == group.tracking_uid
    assert outline.finding_type.value == "71341001"


def test_finding_must_agree_with_threshold():
    with pytest.raises(ValueError, match="contradicts"):
        Finding("acl", "ACL tear", probability=0.2, threshold=0.5, present=True)
    with pytest.raises(ValueError, match="probability must lie in"):
        Finding("acl", "ACL tear", probability=1.2, threshold=0.5, present=True)
    assert Finding.at_threshold("acl", "ACL tear", 0.5, 0.5).present


def test_rejects_inconsistent_inputs(knee_case):
    study, series, seg, volumes, label_map = knee_case
    template = load_template("knee")
    findings = _findings("knee", seed=4)
    kwargs = dict(
        template=template,
        evidence=[series["sagittal"][0]],
        findings=findings,
        used_series={"sagittal": (series["sagittal"][0].SeriesInstanceUID, "sag")},
        missing_planes=[],
        laterality="R",
        algorithm=ALGORITHM,
        segmentation=seg,
        volumes_ml=volumes,
        series_number=301,
    )
    with pytest.raises(ValueError, match=r"missing \['acl'\]"):
        write_report(**{**kwargs, "findings": findings[1:]})
    other = make_series(new_study(), "axial", seed=1)
    with pytest.raises(ValueError, match="belongs to study"):
        write_report(**{**kwargs, "evidence": [series["sagittal"][0], other[0]]})
    with pytest.raises(ValueError, match="plane must be one of"):
        write_report(**{**kwargs, "missing_planes": ["oblique"]})
    with pytest.raises(ValueError, match="no instance in evidence"):
        write_report(**{**kwargs, "used_series": {"axial": (other[0].SeriesInstanceUID, "ax")}})
    with pytest.raises(ValueError, match="laterality"):
        write_report(**{**kwargs, "laterality": "left"})
    with pytest.raises(ValueError, match="'menisci' is not a structure"):
        write_report(**{**kwargs, "volumes_ml": {"menisci": 1.0}})
    with pytest.raises(ValueError, match="needs the segmentation"):
        write_report(**{**kwargs, "segmentation": None})
    with pytest.raises(ValueError, match="label_map needs the segmentation and its segmented_series"):
        write_report(**{**kwargs, "label_map": label_map})
    with pytest.raises(ValueError, match="does not match the segmented series"):
        write_report(**{**kwargs, "label_map": label_map[1:], "segmented_series": series["sagittal"]})


def test_key_slices_of_a_multiframe_source_name_the_frame():
    """An Enhanced MR source: the key slice is a frame of the one dataset, in slice order."""
    from inference.seg_writer import multiframe_sort_order
    from inference.sr_writer import key_slices
    from tests.inference.output_factory import enhanced_from

    study = new_study()
    series = make_series(study, "coronal", oblique=True, seed=9)
    multiframe = enhanced_from(series)
    label_map = knee_label_map((7, 24, 20), present=[10, 11], seed=6)
    placed = key_slices([multiframe], label_map)
    assert set(placed) == {"acl", "pcl"}
    order = multiframe_sort_order(multiframe)
    for key, index in (("acl", 10), ("pcl", 11)):
        k = int(np.argmax((label_map == index).sum(axis=(1, 2))))
        assert placed[key].source is multiframe
        assert placed[key].frame == int(order[k]) + 1
        region = placed[key].region()
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == int(order[k]) + 1
