"""SEG writer: geometry on axial, sagittal and oblique-coronal sources, references, codes, UIDs."""
from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
import highdicom as hd

from inference.labels import KNEE_STRUCTURES
from inference.seg_writer import MappedFrom, SourceSeriesError, structure_volumes_ml, write_segmentation
from inference.uids import instances_fingerprint, AlgorithmInfo, NodeInfo, derived_uid
from sr_templates import load_structures
from tests.inference.output_factory import (
    dciodvfy_errors,
    enhanced_from,
    knee_label_map,
    make_series,
    new_study,
    sorted_positions,
)

ALGORITHM = AlgorithmInfo(name="OrthoDiffusion knee segmenter", version="1.2.0")
NODE = NodeInfo(software_version="0.1.0", device_serial_number="SN-7")
PLANES = [("axial", False), ("sagittal", False), ("coronal", True)]


@pytest.fixture(scope="module")
def study():
    return new_study()


def _roundtrip(seg: hd.seg.Segmentation, tmp_path, name: str) -> tuple[hd.seg.Segmentation, list[str]]:
    path = tmp_path / f"{name}.dcm"
    seg.save_as(path)
    return hd.seg.segread(path), dciodvfy_errors(path)


def _frame_source_uid(frame) -> str:
    return frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID


@pytest.mark.dicomtools
@pytest.mark.parametrize(("plane", "oblique"), PLANES, ids=["axial", "sagittal", "oblique-coronal"])
def test_seg_matches_source_geometry_and_masks(study, plane, oblique, tmp_path):
    series = make_series(study, plane, oblique=oblique, seed=3)
    ordered = sorted_positions(series)
    label_map = knee_label_map((len(series), int(series[0].Rows), int(series[0].Columns)), seed=5)

    seg, errors = _roundtrip(write_segmentation(series, label_map, ALGORITHM, 300, node_info=NODE), tmp_path, plane)

    assert errors == []
    first = ordered[0]
    assert (seg.Rows, seg.Columns) == (first.Rows, first.Columns)
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in first.ImageOrientationPatient],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [float(v) for v in first.PixelSpacing]
    )
    # Every segment has a frame for every source slice (no empty-frame omission).
    assert seg.NumberOfFrames == len(KNEE_STRUCTURES) * len(series)

    position_of = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds in series}
    slice_of = {ds.SOPInstanceUID: k for k, ds in enumerate(ordered)}
    pixels = seg.pixel_array
    seen = set()
    for f, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source_uid = _frame_source_uid(frame)
        assert source_uid in position_of, "frame references an instance outside the source series"
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], position_of[source_uid], atol=1e-4
        )
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = slice_of[source_uid]
        np.testing.assert_array_equal(pixels[f].astype(bool), label_map[k] == segment, err_msg=f"frame {f + 1}")
        seen.add((segment, k))
    assert len(seen) == len(KNEE_STRUCTURES) * len(series)

    decoded = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in ordered], combine_segments=True
    )
    np.testing.assert_array_equal(decoded, label_map)


@pytest.mark.dicomtools
def test_segment_descriptions_codes_and_equipment(study, tmp_path):
    series = make_series(study, "sagittal", seed=1)
    label_map = knee_label_map((len(series), 24, 20), present=[1, 2, 4, 10], seed=2)
    seg, errors = _roundtrip(write_segmentation(series, label_map, ALGORITHM, 300, node_info=NODE), tmp_path, "desc")
    assert errors == []

    templates = load_structures()
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [s.index for s in KNEE_STRUCTURES]
    for item, structure, tpl in zip(seg.SegmentSequence, KNEE_STRUCTURES, templates):
        assert item.SegmentLabel == tpl.label
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == (ALGORITHM.name, ALGORITHM.version)
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "91723000")
        assert (kind.CodingSchemeDesignator, kind.CodeValue) == (tpl.type.scheme, tpl.type.value)
        assert len(item.RecommendedDisplayCIELabValue) == 3
        assert item.TrackingID == structure.key
    femur = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (femur.CodeValue, femur.CodeMeaning) == ("71341001", "Femur")
    medial = seg.SegmentSequence[7].SegmentedPropertyTypeCodeSequence[0]
    assert medial.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "255561001"
    acl_type = seg.SegmentSequence[9].SegmentedPropertyTypeCodeSequence[0]
    assert acl_type.CodingSchemeDesignator == "99ORTHONODE"
    declared = {item.CodingSchemeDesignator for item in seg.CodingSchemeIdentificationSequence}
    assert "99ORTHONODE" in declared

    equipment = {
        (e.Manufacturer, e.get("ManufacturerModelName"), str(e.get("SoftwareVersions")))
        for e in seg.ContributingEquipmentSequence
    }
    assert (NODE.manufacturer, NODE.model_name, NODE.software_version) in equipment
    assert (ALGORITHM.manufacturer, ALGORITHM.model_name, ALGORITHM.version) in equipment
    assert seg.SegmentationType == "BINARY"

    # An absent structure is an empty segment: numbering stays the structure index.
    for number in (3, 5, 11):
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[ds.SOPInstanceUID for ds in series], segment_numbers=[number]
        )
        assert not mask.any()


def test_uids_are_deterministic_per_model_version(study):
    series = make_series(study, "axial", seed=4)
    label_map = knee_label_map((len(series), 24, 20), seed=1)
    first = write_segmentation(series, label_map, ALGORITHM, 300, node_info=NODE)
    again = write_segmentation(list(reversed(series)), label_map, ALGORITHM, 300, node_info=NODE)
    newer = write_segmentation(
        series, label_map, AlgorithmInfo(name=ALGORITHM.name, version="1.3.0"), 300, node_info=NODE
    )
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID
    assert first.SOPInstanceUID != newer.SOPInstanceUID
    assert first.SOPInstanceUID == derived_uid(
        study.study_uid, series[0].SeriesInstanceUID, instances_fingerprint(series), ALGORITHM.version, "seg-instance"
    )
    other = make_series(study, "axial", seed=4)
    assert write_segmentation(other, label_map, ALGORITHM, 300, node_info=NODE).SOPInstanceUID != first.SOPInstanceUID
    # the same series with one instance replaced by a new one: new inputs, new UIDs
    changed = list(series)
    changed[0] = copy.deepcopy(changed[0])
    changed[0].SOPInstanceUID = pydicom.uid.generate_uid()
    replaced = write_segmentation(changed, label_map, ALGORITHM, 300, node_info=NODE)
    assert replaced.SeriesInstanceUID != first.SeriesInstanceUID
    assert replaced.SOPInstanceUID != first.SOPInstanceUID


@pytest.mark.dicomtools
def test_a_mapped_label_map_says_its_plane_and_where_it_came_from(study, tmp_path):
    """A SEG of a label map mapped from another series names its plane and that series in the
    Series Description and each segment's Algorithm Parameters; the series it was mapped from
    enters its UIDs (a new sagittal series gives a new coronal SEG)."""
    sagittal = make_series(study, "sagittal", seed=6, description="PD FS SAG")
    coronal = make_series(study, "coronal", oblique=True, seed=7, description="T1 COR " + "x" * 50)
    label_map = knee_label_map((len(coronal), 24, 20), seed=2)
    mapped_from = MappedFrom("sagittal", sagittal, "linear_majority")
    seg, errors = _roundtrip(
        write_segmentation(coronal, label_map, ALGORITHM, 9102, node_info=NODE, plane="coronal",
                           mapped_from=mapped_from), tmp_path, "mapped",
    )
    assert errors == []
    assert seg.SeriesDescription.startswith("AI segmentation coronal (from sagittal) T1 COR")
    assert len(seg.SeriesDescription) <= 64
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == coronal[0].SeriesInstanceUID
    for segment in seg.SegmentSequence:
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmParameters == (
            f"mapped_from_series={sagittal[0].SeriesInstanceUID},mapped_from_plane=sagittal,resampling=linear_majority"
        )
    own = write_segmentation(sagittal, knee_label_map((len(sagittal), 24, 20)), ALGORITHM, 9101, node_info=NODE,
                             plane="sagittal")
    assert own.SeriesDescription == "AI segmentation sagittal PD FS SAG"
    assert "AlgorithmParameters" not in own.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    # the UIDs depend on both series
    plain = write_segmentation(coronal, label_map, ALGORITHM, 9102, node_info=NODE, plane="coronal")
    other_sagittal = MappedFrom("sagittal", make_series(study, "sagittal", seed=6), "linear_majority")
    again = write_segmentation(coronal, label_map, ALGORITHM, 9102, node_info=NODE, plane="coronal",
                               mapped_from=MappedFrom("sagittal", list(reversed(sagittal)), "linear_majority"))
    newer = write_segmentation(coronal, label_map, ALGORITHM, 9102, node_info=NODE, plane="coronal",
                               mapped_from=other_sagittal)
    assert again.SOPInstanceUID == seg.SOPInstanceUID and again.SeriesInstanceUID == seg.SeriesInstanceUID
    assert len({seg.SOPInstanceUID, plain.SOPInstanceUID, newer.SOPInstanceUID, own.SOPInstanceUID}) == 4
    assert len({seg.SeriesInstanceUID, plain.SeriesInstanceUID, newer.SeriesInstanceUID}) == 3


def test_derived_uid_properties():
    uid = derived_uid("1.2.3", "4.5.6", "1.0", "seg-series")
    assert uid == derived_uid("1.2.3", "4.5.6", "1.0", "seg-series")
    assert pydicom.uid.UID(uid).is_valid and uid.startswith("2.25.")
    assert derived_uid("ab", "c") != derived_uid("a", "bc")
    with pytest.raises(ValueError, match="part 1"):
        derived_uid("1.2.3", "")


@pytest.mark.dicomtools
def test_enhanced_multiframe_source(study, tmp_path):
    series = make_series(study, "coronal", oblique=True, seed=6)
    enhanced = enhanced_from(series)
    ordered = sorted_positions(series)
    label_map = knee_label_map((len(series), 24, 20), seed=9)

    seg, errors = _roundtrip(write_segmentation([enhanced], label_map, ALGORITHM, 301, node_info=NODE), tmp_path, "mf")

    assert errors == []
    frame_positions = [
        [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        for item in enhanced.PerFrameFunctionalGroupsSequence
    ]
    sorted_positions_mm = [[float(v) for v in ds.ImagePositionPatient] for ds in ordered]
    assert frame_positions != sorted_positions_mm, "precondition: source frames are not in slice order"
    pixels = seg.pixel_array
    for f, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        source_frame = int(source.ReferencedFrameNumber) - 1
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, frame_positions[source_frame], atol=1e-4)
        k = next(i for i, p in enumerate(sorted_positions_mm) if np.allclose(p, position, atol=1e-4))
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(pixels[f].astype(bool), label_map[k] == segment)
    # an Enhanced MR object states its side as Frame Laterality only; the SEG carries it on
    assert "Laterality" not in enhanced and study.laterality in ("L", "R")
    (anatomy,) = seg.SharedFunctionalGroupsSequence[0].FrameAnatomySequence
    assert anatomy.FrameLaterality == study.laterality


def test_rejects_bad_inputs(study):
    series = make_series(study, "axial", seed=7)
    good = knee_label_map((len(series), 24, 20))
    with pytest.raises(ValueError, match=r"shape \(7, 20, 24\)"):
        write_segmentation(series, np.zeros((7, 20, 24), np.uint8), ALGORITHM, 1)
    with pytest.raises(TypeError, match="uint8"):
        write_segmentation(series, good.astype(np.int64), ALGORITHM, 1)
    with pytest.raises(ValueError, match="value 12"):
        write_segmentation(series, np.full_like(good, 12), ALGORITHM, 1)
    other = make_series(study, "axial", seed=8)
    with pytest.raises(SourceSeriesError, match="SeriesInstanceUID"):
        write_segmentation(series[:3] + other[:4], good, ALGORITHM, 1)
    duplicate = [series[0]] + series[:6]
    with pytest.raises(SourceSeriesError, match="same slice position"):
        write_segmentation(duplicate, good, ALGORITHM, 1)
    with pytest.raises(ValueError, match="numbered 1..N"):
        write_segmentation(series, good, ALGORITHM, 1, structures=KNEE_STRUCTURES[1:])


def test_structure_volumes_from_source_geometry(study):
    series = make_series(study, "coronal", oblique=True, pixel_spacing=(0.6, 0.5), slice_spacing=3.3, seed=2)
    label_map = np.zeros((len(series), 24, 20), np.uint8)
    label_map[1:4, 2:12, 3:8] = 1  # 3 * 10 * 5 voxels
    label_map[5, 0:2, 0:2] = 8
    volumes = structure_volumes_ml(series, label_map)
    voxel_ml = 0.6 * 0.5 * 3.3 / 1000.0
    assert volumes["femur"] == pytest.approx(150 * voxel_ml)
    assert volumes["medial_meniscus"] == pytest.approx(4 * voxel_ml)
    assert volumes["tibia"] == 0.0
    assert set(volumes) == {s.key for s in KNEE_STRUCTURES}
    assert structure_volumes_ml([enhanced_from(series)], label_map) == pytest.approx(volumes)
    with pytest.raises(ValueError, match="does not match the source series"):
        structure_volumes_ml([enhanced_from(series)], label_map[:, :, :10])
