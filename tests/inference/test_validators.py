"""The node's outputs for a knee, an ankle and a shoulder study checked by independent validators.

dciodvfy checks the IODs; PixelMed's ``DicomSRValidator`` also checks TID 1500 and its
sub-templates (which dciodvfy does not), ``DicomInstanceValidator`` the SEG and SR IODs, and
dcentvfy that the outputs agree with the source images on patient, study and equipment.

- Knee: a phantom from ``orthonode phantom`` (small matrix) planned oblique (its sagittal
  series tilted along the knee).  The sagittal SEG is written from the phantom's own sagittal
  label map, so every knee structure is present and the SR holds every kind of group it can
  write: findings placed on key slices, structure outlines and structure volumes.  The
  coronal and axial SEGs hold that label map mapped onto their grids, as the node writes them.
- Ankle: a report with nothing to place (no segmentation of the ankle), one sagittal series.
- Shoulder: a phantom shoulder, whose sagittal and coronal series are always oblique (the
  scapular plane, 14-26 degrees); a report on three series, no segmentation.

PixelMed's SR validation takes tens of seconds, so every validator runs once for the module,
side by side.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.labels import KNEE_STRUCTURES
from inference.pipeline import SEG_SERIES_NUMBER
from inference.plane_mapping import DEFAULT_RULE, map_label_map
from inference.seg_writer import MappedFrom, structure_volumes_ml, write_segmentation
from inference.series import load_series
from inference.sr_writer import Finding, write_report
from inference.uids import AlgorithmInfo, NodeInfo
from sr_templates import load_template
from tests.inference.output_factory import ValidatorOutput, dciodvfy_errors, dcentvfy_output, run_pixelmed
from tests.support.shared import built_once

pytestmark = [pytest.mark.dicomtools, pytest.mark.slow]

ALGORITHM = AlgorithmInfo(name="OrthoDiffusion", version="0.1-validate")
NODE = NodeInfo(software_version="0.1.0")
#: the one dcentvfy message that is not an inconsistency: dicom3tools files Accession Number
#: under the Series entity in images and SEG (the Request Attributes macro) and under the
#: Study entity in SR; the values agree (a differing value is an Error line)
ACCESSION_ENTITY_NOTE = "Different information entities for attribute - Element=<AccessionNumber>"
SEG_PLANES = ("sagittal", "coronal", "axial")


def _phantom(root: Path, joint: str, seed: int, oblique: bool | None) -> tuple:
    """One phantom case of ``joint``: its exam record, loaded series per plane and source files."""
    from training.datasets import read_phantom_folder
    from training.phantoms.generate import generate_case, write_cases_csv

    case = generate_case(root, joint, 0, seed=seed, matrix=64, oblique=oblique)
    write_cases_csv(root / "cases.csv", [case.spec])
    (record,) = read_phantom_folder(root)
    volumes = {plane: load_series(source.series) for plane, source in record.planes.items()}
    sources = sorted((case.case_dir / "dicom").rglob("*.dcm"))
    return record, volumes, sources


def _findings(template, rng: np.random.Generator) -> list[Finding]:
    return [Finding.at_threshold(label.key, label.name, float(rng.uniform()), 0.5) for label in template.labels]


def _series_facts(volumes: dict) -> dict:
    """What the tests check of each series: identity, grid and tilt."""
    return {
        plane: {
            "series_uid": v.info.series_instance_uid,
            "sop_uids": [str(ds.SOPInstanceUID) for ds in v.datasets],
            "shape": list(v.pixels.shape),
            "obliquity_deg": float(v.info.obliquity_deg or 0.0),
        }
        for plane, v in volumes.items()
    }


def _build(root: Path) -> dict:
    """Write the SEGs and SRs of the three joints under ``root`` and run every validator on them;
    returns what the tests read (JSON-serialisable)."""
    record, volumes, sources = _phantom(root / "knee", "knee", 5, True)
    sagittal = volumes["sagittal"]
    label_map = record.planes["sagittal"].load_mask().astype(np.uint8)
    out = root / "out"
    out.mkdir()
    segs = {"sagittal": write_segmentation(sagittal.datasets, label_map, ALGORITHM, SEG_SERIES_NUMBER["sagittal"],
                                           node_info=NODE, plane="sagittal")}
    for plane in ("coronal", "axial"):  # as the node writes them: the sagittal map on their grids
        mapped = map_label_map(label_map, sagittal, volumes[plane], DEFAULT_RULE)
        segs[plane] = write_segmentation(
            volumes[plane].datasets, mapped, ALGORITHM, SEG_SERIES_NUMBER[plane], node_info=NODE, plane=plane,
            mapped_from=MappedFrom("sagittal", sagittal.datasets, DEFAULT_RULE),
        )
    template = load_template("knee")
    sr = write_report(
        template,
        [volume.datasets[0] for volume in volumes.values()],
        _findings(template, np.random.default_rng(3)),
        {plane: (v.info.series_instance_uid, v.info.series_description) for plane, v in volumes.items()},
        [],
        record.laterality,
        ALGORITHM,
        segs["sagittal"],
        structure_volumes_ml(sagittal.datasets, label_map),
        301,
        NODE,
        label_map=label_map,
        segmented_series=sagittal.datasets,
    )
    seg_paths = {plane: out / f"seg_{plane}.dcm" for plane in SEG_PLANES}
    for plane, seg in segs.items():
        seg.save_as(seg_paths[plane])
    sr_path, unplaced_path, shoulder_path = out / "sr.dcm", out / "ankle_sr.dcm", out / "shoulder_sr.dcm"
    sr.save_as(sr_path)
    _ankle_report().save_as(unplaced_path)
    shoulder_record, shoulder_volumes, shoulder_sources = _phantom(root / "shoulder", "shoulder", 4, None)
    _shoulder_report(shoulder_record, shoulder_volumes).save_as(shoulder_path)
    # DicomSRValidator checks the SR's IOD as well as its templates (PixelMed's
    # DicomInstanceValidator of Debian 12 does not know the Comprehensive 3D SR SOP class)
    validated = run_pixelmed(
        [("DicomSRValidator", sr_path), ("DicomSRValidator", unplaced_path), ("DicomSRValidator", shoulder_path)]
        + [("DicomInstanceValidator", seg_paths[plane]) for plane in SEG_PLANES]
    )
    validated += [
        dcentvfy_output([*seg_paths.values(), sr_path, *sources]),
        dcentvfy_output([shoulder_path, *shoulder_sources]),
    ]
    return {
        "segs": {plane: str(path) for plane, path in seg_paths.items()},
        "sr": str(sr_path),
        "unplaced_path": str(unplaced_path),
        "shoulder_path": str(shoulder_path),
        "sources": [str(path) for path in sources],
        "laterality": record.laterality,
        "series": _series_facts(volumes),
        "shoulder_series": _series_facts(shoulder_volumes),
        "validated": [(v.command, str(v.path), v.output) for v in validated],
    }


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The SEGs and SRs of the three joints, and every validator's output on them.

    Built once per test run (:func:`tests.support.shared.built_once`), so PixelMed (a JVM per
    file, tens of seconds each) does not run twice on the two cores.
    """
    import json

    def build(folder: Path) -> Path:
        done = folder / "outputs.json"
        done.write_text(json.dumps(_build(folder)), encoding="utf-8")
        return done

    built = json.loads(built_once(tmp_path_factory, "validators", build).read_text(encoding="utf-8"))
    results = [ValidatorOutput(command, Path(path), output) for command, path, output in built["validated"]]
    sr_template, unplaced, shoulder, *seg_iods = results[:3 + len(SEG_PLANES)]
    segs = {plane: Path(path) for plane, path in built["segs"].items()}
    return {
        "seg": segs["sagittal"],
        "segs": segs,
        "sr": Path(built["sr"]),
        "sources": [Path(path) for path in built["sources"]],
        "series": built["series"],
        "laterality": built["laterality"],
        "sr_template": sr_template,
        "seg_iod": seg_iods[0],
        "seg_iods": dict(zip(SEG_PLANES, seg_iods)),
        "unplaced": unplaced,
        "unplaced_path": Path(built["unplaced_path"]),
        "shoulder": shoulder,
        "shoulder_path": Path(built["shoulder_path"]),
        "shoulder_series": built["shoulder_series"],
        "dcentvfy": results[-2],
        "shoulder_dcentvfy": results[-1],
    }


def _shoulder_report(record, volumes: dict):
    """A shoulder report on its three series (oblique sagittal and coronal); nothing to place."""
    template = load_template("shoulder")
    return write_report(
        template,
        [volume.datasets[0] for volume in volumes.values()],
        _findings(template, np.random.default_rng(4)),
        {plane: (v.info.series_instance_uid, v.info.series_description) for plane, v in volumes.items()},
        [],
        record.laterality,
        ALGORITHM,
        None,
        None,
        301,
        NODE,
    )


def _ankle_report():
    """An ankle report: no segmentation, so no finding can be placed on the images."""
    from tests.inference.output_factory import make_series, new_study

    study = new_study(body_part="ANKLE")
    sagittal = make_series(study, "sagittal", seed=5, description="ankle sag")
    template = load_template("ankle")
    findings = [
        Finding.at_threshold(label.key, label.name, 0.3 + 0.1 * i, 0.5) for i, label in enumerate(template.labels)
    ]
    return write_report(
        template, [sagittal[0]], findings, {"sagittal": (sagittal[0].SeriesInstanceUID, "ankle sag")},
        ["coronal", "axial"], "R", ALGORITHM, None, None, 301, NODE,
    )


def _report(result: ValidatorOutput) -> str:
    return "\n".join(result.errors[:20])


def test_report_has_every_kind_of_group(outputs):
    """The validators below see findings on key slices, outlines and volumes (not an empty report)."""
    import highdicom as hd

    sr = hd.sr.srread(outputs["sr"])
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == len(KNEE_STRUCTURES)
    assert len(sr.content.get_planar_roi_measurement_groups()) == len(KNEE_STRUCTURES) + 4


def test_pixelmed_sr_templates_have_no_errors(outputs):
    result = outputs["sr_template"]
    assert result.errors == [], _report(result)
    # the warnings left, all "Content Item not in template": PixelMed checks every group by its
    # TID 1411 rows (once one group references a segment), which list neither qualitative
    # evaluations nor a measurement INFERRED FROM an outline.  Per finding group its Presence
    # of property; per group OHIF lists (the 4 findings and every structure outline) its Comment
    # (the label OHIF shows) and the Area's outline with its image (where OHIF reads the outline)
    group = ('/CONTAINER (126000,DCM,"Imaging Measurement Report")/CONTAINER (126010,DCM,"Imaging Measurements")'
             '/CONTAINER (125007,DCM,"Measurement Group")')
    outline = f'{group}/NUM (42798000,SCT,"Area")/SCOORD (111030,DCM,"Image Region")'
    listed = len(KNEE_STRUCTURES) + 4
    expected = {
        f'{group}/CODE (121052,DCM,"Presence of property")': 4,
        f'{group}/TEXT (121106,DCM,"Comment")': listed,
        outline: listed,
        f'{outline}/IMAGE (260753009,SCT,"Source")': listed,
    }
    found: dict[str, int] = {}
    for line in result.warnings:
        where, _, message = line.split(": ", 2)[2].rpartition(": ")  # "Warning: <item>: <path>: <message>"
        assert message == "Content Item not in template", line
        found[where] = found.get(where, 0) + 1
    assert found == expected, "\n".join(result.warnings)


def test_pixelmed_report_without_placed_findings(outputs):
    result = outputs["unplaced"]
    assert "Found Root Template TID_1500" in result.output
    assert (result.errors, result.warnings) == ([], []), "\n".join(result.errors + result.warnings)
    assert dciodvfy_errors(outputs["unplaced_path"]) == []


def test_pixelmed_iods_have_no_errors(outputs):
    result = outputs["seg_iod"]
    assert "Found Segmentation IOD" in result.output
    assert result.errors == [], _report(result)
    result = outputs["sr_template"]
    assert "Found Comprehensive3DSR IOD" in result.output and "Found Root Template TID_1500" in result.output


def test_dciodvfy_has_no_errors(outputs):
    for path in outputs["segs"].values():
        assert dciodvfy_errors(path) == [], path.name
    assert dciodvfy_errors(outputs["sr"]) == []


def test_the_series_are_oblique(outputs):
    """The oblique series are where geometry bugs hide: each study here has one."""
    assert outputs["series"]["sagittal"]["obliquity_deg"] > 3.0
    tilts = {p: v["obliquity_deg"] for p, v in outputs["shoulder_series"].items()}
    assert tilts["sagittal"] > 10.0 and tilts["coronal"] > 10.0, tilts


def test_pixelmed_seg_of_every_plane_has_no_errors(outputs):
    """The coronal and axial SEGs (the sagittal label map mapped onto their grids) pass as the
    sagittal one does, and read back in highdicom on their own series' grids."""
    import highdicom as hd

    for plane, result in outputs["seg_iods"].items():
        assert "Found Segmentation IOD" in result.output, plane
        assert result.errors == [], f"{plane}: {_report(result)}"
        seg = hd.seg.segread(outputs["segs"][plane])
        series = outputs["series"][plane]
        n_slices, rows, columns = series["shape"]
        assert seg.SeriesDescription.startswith(f"AI segmentation {plane}")
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series["series_uid"]
        assert (seg.Rows, seg.Columns, seg.number_of_segments) == (rows, columns, len(KNEE_STRUCTURES))
        assert int(seg.NumberOfFrames) == n_slices * len(KNEE_STRUCTURES)
        labels = seg.get_pixels_by_source_instance(series["sop_uids"], combine_segments=True)
        assert labels.shape == (n_slices, rows, columns) and labels.any(), plane


def test_pixelmed_shoulder_report_on_oblique_series(outputs):
    result = outputs["shoulder"]
    assert "Found Root Template TID_1500" in result.output and "Found Comprehensive3DSR IOD" in result.output
    assert (result.errors, result.warnings) == ([], []), "\n".join(result.errors + result.warnings)
    assert dciodvfy_errors(outputs["shoulder_path"]) == []
    check = outputs["shoulder_dcentvfy"]
    assert check.errors == [], _report(check)
    assert all(ACCESSION_ENTITY_NOTE in line for line in check.warnings), "\n".join(check.warnings)


def test_outputs_agree_with_the_source_study(outputs):
    result = outputs["dcentvfy"]
    assert result.errors == [], _report(result)
    assert all(ACCESSION_ENTITY_NOTE in line for line in result.warnings), "\n".join(result.warnings)


def test_seg_states_the_source_side(outputs):
    import pydicom

    assert outputs["laterality"] in ("L", "R")
    for path in outputs["segs"].values():
        seg = pydicom.dcmread(path)
        (anatomy,) = seg.SharedFunctionalGroupsSequence[0].FrameAnatomySequence
        assert anatomy.FrameLaterality == outputs["laterality"]
        assert "Laterality" not in seg  # dciodvfy rejects the series Laterality in a SEG


def test_validators_catch_errors(outputs, tmp_path: Path):
    """The checks above can fail: a report whose study holds another patient is an error for
    dcentvfy, and a SEG without its side is an error for PixelMed."""
    import pydicom

    sr = pydicom.dcmread(outputs["sr"])
    sr.PatientID = "SOMEONE-ELSE"
    bad_sr = tmp_path / "bad_sr.dcm"
    sr.save_as(bad_sr)
    assert dcentvfy_output([bad_sr, *outputs["sources"]]).errors
    seg = pydicom.dcmread(outputs["seg"])
    del seg.SharedFunctionalGroupsSequence[0].FrameAnatomySequence
    bad_seg = tmp_path / "bad_seg.dcm"
    seg.save_as(bad_seg)
    (result,) = run_pixelmed([("DicomInstanceValidator", bad_seg)])
    assert any("Laterality" in line for line in result.errors)
