"""Series selection per plane and joint detection, from headers built like a scanner writes them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydantic
import pytest

from inference.joint import DEFAULT_JOINT_RULES, JointPatterns, JointRules, detect_joint
from inference.selection import DEFAULT_RULES, PlaneRule, SelectionRules, select_series
from inference.series import SeriesInfo, scan_folder
from tests.inference.dicom_factory import (
    CARDINAL_ORIENTATIONS,
    Geometry,
    SeriesHeader,
    orientation,
    pattern_volume,
    write_classic_series,
)


def make_info(
    number: int,
    description: str,
    plane: str = "sagittal",
    tilt: float = 0.0,
    tilt_axis: str = "z",
    slices: int = 24,
    thickness: float = 3.0,
    **fields: object,
) -> SeriesInfo:
    """A SeriesInfo as :func:`scan_folder` builds it, without writing files."""
    cosines = np.asarray(orientation(plane, tilt, tilt_axis))
    base = SeriesInfo(
        study_instance_uid="1.2.3",
        series_instance_uid=f"1.2.3.{number}",
        frame_of_reference_uid="1.2.3.0",
        series_number=number,
        series_description=description,
        modality="MR",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        body_part="KNEE",
        laterality="R",
        study_description="MRI KNEE RIGHT",
        protocol_name="",
        image_type=("ORIGINAL", "PRIMARY", "M", "NONE"),
        files=(),
        num_frames=slices,
        orientation=cosines,
        orientation_count=1,
        pixel_spacing=(0.5, 0.5),
        slice_thickness=thickness,
        rows=256,
        columns=256,
        manufacturer="SIEMENS",
        plane=plane,
        obliquity_deg=abs(tilt),
    )
    return replace(base, **fields)


def _lines_about(log: list[str], text: str) -> list[str]:
    return [line for line in log if text in line]


def test_fat_sat_pd_sagittal_beats_t1_sagittal_and_the_localizer() -> None:
    series = [
        make_info(1, "localizer", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), slices=9),
        make_info(2, "T1 TSE SAG"),
        make_info(3, "PD_FS_SAG"),
        make_info(4, "T2 STIR SAG"),
        make_info(5, "Cor PD FSE FS", plane="coronal"),
        make_info(6, "T1 COR", plane="coronal"),
        make_info(7, "PD SPAIR AX", plane="axial"),
    ]
    selection = select_series(series)
    assert {p: s.series_number for p, s in selection.chosen.items()} == {
        "sagittal": 3,
        "coronal": 5,
        "axial": 7,
    }
    assert selection.missing == []
    (chosen,) = _lines_about(selection.log, "sagittal: chose")
    assert "series 3 'PD_FS_SAG'" in chosen and "'PD_FS' matches preference #1 of 7" in chosen
    assert any("series 2 'T1 TSE SAG'" in line and "not chosen" in line for line in selection.log)
    assert any("series 4 'T2 STIR SAG'" in line and "not chosen" in line for line in selection.log)
    (localizer,) = _lines_about(selection.log, "series 1 'localizer'")
    assert "localizer" in localizer and "ImageType LOCALIZER" in localizer


@pytest.mark.parametrize(
    "description",
    [
        "PD_FS_SAG",
        "Sag PD FSE FS",
        "sag pd fat sat",
        "PDW_SPAIR SAG",
        "DP FS SAG",
        "PD TSE FS",
        "pd_tse_fs_sag",
        "SAG PDFS",
        "FSE PD FatSat",
    ],
)
def test_vendor_wordings_of_fat_sat_pd_rank_first(description: str) -> None:
    selection = select_series([make_info(2, "T1 SAG"), make_info(8, "T2 SAG"), make_info(9, description)])
    assert selection.chosen["sagittal"].series_number == 9


def test_plain_pd_does_not_count_as_fat_sat() -> None:
    selection = select_series([make_info(2, "PD TSE SAG"), make_info(3, "T2 FS SAG")])
    assert selection.chosen["sagittal"].series_number == 3


def test_real_series_over_localizer_even_when_it_matches_first_pattern() -> None:
    series = [
        make_info(1, "PD FS SAG scout", slices=3),
        make_info(2, "T1 SAG"),
    ]
    selection = select_series(series)
    assert selection.chosen["sagittal"].series_number == 2
    (line,) = _lines_about(selection.log, "series 1 ")
    assert "localizer" in line and "only 3 slice(s)" in line


def test_rejections_are_explained_and_missing_plane_reported() -> None:
    series = [
        make_info(3, "PD FS SAG"),
        make_info(4, "PD FS COR 6mm", plane="coronal", thickness=7.0),
        make_info(5, "PD FS COR", plane="coronal", slices=5),
        make_info(6, "PD FS AX", plane="axial", tilt=32.0, tilt_axis="x"),
        make_info(7, "DWI AX", plane="axial"),
        make_info(8, "SR", modality="SR"),
    ]
    selection = select_series(series)
    assert set(selection.chosen) == {"sagittal"}
    assert selection.missing == ["coronal", "axial"]
    log = selection.log
    assert "7 mm slices (limit 6 mm)" in _lines_about(log, "series 4 ")[0]
    assert "5 slices (needs at least 8)" in _lines_about(log, "series 5 ")[0]
    assert "32 degrees oblique from axial (limit 30)" in _lines_about(log, "series 6 ")[0]
    assert "'DWI' matches avoid pattern #3" in _lines_about(log, "series 7 ")[0]
    assert "modality SR" in _lines_about(log, "series 8 ")[0]
    assert "coronal: no usable series; this plane is missing" in log
    assert "axial: no usable series; this plane is missing" in log


def test_coronal_oblique_twenty_degrees_is_chosen_as_coronal() -> None:
    selection = select_series([make_info(4, "PD FS COR OBL", plane="coronal", tilt=20.0, tilt_axis="z")])
    assert selection.chosen["coronal"].series_number == 4
    assert "coronal-oblique 20 degrees" in _lines_about(selection.log, "coronal: chose")[0]


def test_plane_comes_from_geometry_not_description() -> None:
    # a description saying SAG on an axial acquisition is an axial series
    selection = select_series([make_info(5, "PD FS SAG", plane="axial")])
    assert set(selection.chosen) == {"axial"}


def test_ties_prefer_thinner_slices_then_later_repeat() -> None:
    selection = select_series(
        [make_info(3, "PD FS SAG", thickness=4.0), make_info(4, "PD FS SAG", thickness=3.0)]
    )
    assert selection.chosen["sagittal"].series_number == 4
    selection = select_series([make_info(3, "PD FS SAG"), make_info(13, "PD FS SAG")])
    assert selection.chosen["sagittal"].series_number == 13


def test_custom_rules_change_the_choice() -> None:
    t1_first = PlaneRule(prefer=[r"t1"], min_slices=4)
    rules = SelectionRules(sagittal=t1_first, coronal=t1_first, axial=t1_first)
    selection = select_series([make_info(2, "T1 SAG"), make_info(3, "PD FS SAG")], rules)
    assert selection.chosen["sagittal"].series_number == 2


def test_rules_validate_and_name_the_key() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"prefer\[1\] is not a valid regular expression"):
        PlaneRule(prefer=["pd", "(unclosed"])
    with pytest.raises(pydantic.ValidationError, match="min_slices"):
        PlaneRule(min_slices=0)
    with pytest.raises(pydantic.ValidationError, match="max_slice_thicknes"):
        PlaneRule.model_validate({"max_slice_thicknes": 3})
    rule = PlaneRule()
    with pytest.raises(pydantic.ValidationError, match="modalities"):
        SelectionRules(sagittal=rule, coronal=rule, axial=rule, modalities=[])
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        DEFAULT_RULES.sagittal.min_slices = 2  # type: ignore[misc]
    # round trip through plain data, as node.yaml will hold it
    assert SelectionRules.model_validate(DEFAULT_RULES.model_dump()) == DEFAULT_RULES


def test_selection_from_scanned_files_with_a_three_plane_localizer(tmp_path: Path) -> None:
    study = SeriesHeader().study_uid
    volume = pattern_volume(10, 16, 16)
    planes = ["sagittal"] * 3 + ["coronal"] * 3 + ["axial"] * 3
    write_classic_series(
        tmp_path / "1_loc",
        pattern_volume(9, 16, 16),
        Geometry(),
        SeriesHeader(series_number=1, series_description="AAHead", study_uid=study),
        positions=[(0.0, 0.0, float(i)) for i in range(9)],
        orientations=[CARDINAL_ORIENTATIONS[p] for p in planes],
    )
    write_classic_series(
        tmp_path / "2_t1",
        volume,
        Geometry(),
        SeriesHeader(series_number=2, series_description="T1 SAG", study_uid=study),
    )
    write_classic_series(
        tmp_path / "3_pd",
        volume,
        Geometry(),
        SeriesHeader(series_number=3, series_description="PD FS SAG", study_uid=study),
    )
    coronal = Geometry(orientation=orientation("coronal", 20.0, "z"))
    write_classic_series(
        tmp_path / "4_cor",
        volume,
        coronal,
        SeriesHeader(series_number=4, series_description="PD FS COR", study_uid=study),
    )
    selection = select_series(scan_folder(tmp_path))
    assert {p: s.series_number for p, s in selection.chosen.items()} == {"sagittal": 3, "coronal": 4}
    assert selection.missing == ["axial"]
    assert "slices in 3 different planes" in _lines_about(selection.log, "series 1 ")[0]


# ----------------------------------------------------------------------------- joint detection


def test_joint_from_body_part_examined() -> None:
    joint, reason = detect_joint([make_info(3, "PD FS SAG", body_part="ANKLE", study_description="MR")])
    assert joint == "ankle" and "BodyPartExamined" in reason and "ANKLE" in reason
    joint, _ = detect_joint([make_info(3, "PD FS SAG", body_part="SHOULDER", study_description="")])
    assert joint == "shoulder"


def test_joint_from_descriptions_when_body_part_is_generic() -> None:
    series = [make_info(3, "PD FS SAG", body_part="EXTREMITY", study_description="MR Schulter rechts")]
    joint, reason = detect_joint(series)
    assert joint == "shoulder" and "StudyDescription" in reason and "EXTREMITY" in reason
    series = [
        make_info(3, "Knee PD FS SAG", body_part="", study_description=""),
        make_info(4, "knee T1 COR", body_part="", study_description="", plane="coronal"),
    ]
    joint, reason = detect_joint(series)
    assert joint == "knee" and "SeriesDescription" in reason and "2 of 2" in reason
    joint, reason = detect_joint(
        [make_info(3, "t2 sag", body_part="", study_description="", protocol_name="OSG_t2_sag")]
    )
    assert joint == "ankle" and "ProtocolName" in reason


def test_joint_conflicts_and_absence_are_reported_not_guessed() -> None:
    series = [make_info(3, "x", body_part="KNEE"), make_info(4, "y", body_part="ANKLE")]
    joint, reason = detect_joint(series)
    assert joint is None and "different joints" in reason
    joint, reason = detect_joint([make_info(3, "PD FS SAG", body_part="LEG", study_description="MRI")])
    assert joint is None and "no header names a joint" in reason and "LEG" in reason
    assert detect_joint([]) == (None, "no series to look at")


def test_joint_rules_validate() -> None:
    with pytest.raises(pydantic.ValidationError, match="elbow"):
        JointRules(joints={"elbow": JointPatterns(body_part=["elbow"])})
    with pytest.raises(pydantic.ValidationError, match=r"body_part\[0\]"):
        JointPatterns(body_part=["(knee"])
    custom = JointRules(joints={"knee": JointPatterns(body_part=["^KNIEGELENK$"])})
    assert (
        detect_joint([make_info(3, "x", body_part="KNIEGELENK", study_description="")], custom)[0] == "knee"
    )
    assert JointRules.model_validate(DEFAULT_JOINT_RULES.model_dump()) == DEFAULT_JOINT_RULES


def test_joint_words_need_token_boundaries() -> None:
    series = [make_info(3, "PD FS SAG", body_part="", study_description="MR Osgood-Schlatter knee")]
    assert detect_joint(series)[0] == "knee"
    series = [make_info(3, "PD FS SAG", body_part="", study_description="", protocol_name="OSG sag")]
    assert detect_joint(series)[0] == "ankle"
