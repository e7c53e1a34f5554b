"""The SEG and SR of a phantom knee study checked by independent validators.

dciodvfy checks the IODs; PixelMed's ``DicomSRValidator`` also checks TID 1500 and its
sub-templates (which dciodvfy does not), ``DicomInstanceValidator`` the SEG and SR IODs, and
dcentvfy that the outputs agree with the source images on patient, study and equipment.

The study is a phantom from ``orthonode phantom`` (generated here, small matrix); the SEG is
written from the phantom's own sagittal label map, so every knee structure is present and
the SR holds every kind of group it can write: findings placed on key slices, structure
outlines and structure volumes.  PixelMed's SR validation takes tens of seconds, so all
validators run once for the module, side by side.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.labels import KNEE_STRUCTURES
from inference.seg_writer import structure_volumes_ml, write_segmentation
from inference.series import load_series
from inference.sr_writer import Finding, write_report
from inference.uids import AlgorithmInfo, NodeInfo
from sr_templates import load_template
from tests.inference.output_factory import ValidatorOutput, dciodvfy_errors, dcentvfy_output, run_pixelmed

pytestmark = [pytest.mark.dicomtools, pytest.mark.slow]

ALGORITHM = AlgorithmInfo(name="OrthoDiffusion", version="0.1-validate")
NODE = NodeInfo(software_version="0.1.0")
#: the one dcentvfy message that is not an inconsistency: dicom3tools files Accession Number
#: under the Series entity in images and SEG (the Request Attributes macro) and under the
#: Study entity in SR; the values agree (a differing value is an Error line)
ACCESSION_ENTITY_NOTE = "Different information entities for attribute - Element=<AccessionNumber>"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SEG and SR of one phantom knee, and every validator's output on them."""
    from training.datasets import read_phantom_folder
    from training.phantoms.generate import generate_dataset

    root = tmp_path_factory.mktemp("validators") / "knee"
    generate_dataset(root, "knee", 1, seed=5, matrix=64)
    (record,) = read_phantom_folder(root)
    volumes = {plane: load_series(source.series) for plane, source in record.planes.items()}
    sagittal = volumes["sagittal"]
    label_map = record.planes["sagittal"].load_mask().astype(np.uint8)
    seg = write_segmentation(sagittal.datasets, label_map, ALGORITHM, 300, node_info=NODE)
    template = load_template("knee")
    rng = np.random.default_rng(3)
    findings = [
        Finding.at_threshold(label.key, label.name, float(rng.uniform()), 0.5) for label in template.labels
    ]
    sr = write_report(
        template,
        [volume.datasets[0] for volume in volumes.values()],
        findings,
        {plane: (v.info.series_instance_uid, v.info.series_description) for plane, v in volumes.items()},
        [],
        record.laterality,
        ALGORITHM,
        seg,
        structure_volumes_ml(sagittal.datasets, label_map),
        301,
        NODE,
        label_map=label_map,
        segmented_series=sagittal.datasets,
    )
    out = tmp_path_factory.mktemp("validators_out")
    seg_path, sr_path, unplaced_path = out / "seg.dcm", out / "sr.dcm", out / "ankle_sr.dcm"
    seg.save_as(seg_path)
    sr.save_as(sr_path)
    _ankle_report().save_as(unplaced_path)
    # DicomSRValidator checks the SR's IOD as well as its templates (PixelMed's
    # DicomInstanceValidator of Debian 12 does not know the Comprehensive 3D SR SOP class)
    sr_template, seg_iod, unplaced = run_pixelmed(
        [("DicomSRValidator", sr_path), ("DicomInstanceValidator", seg_path), ("DicomSRValidator", unplaced_path)]
    )
    sources = sorted(p for p in (root / "knee_0001" / "dicom").rglob("*.dcm"))
    return {
        "seg": seg_path,
        "sr": sr_path,
        "sources": sources,
        "laterality": record.laterality,
        "sr_template": sr_template,
        "seg_iod": seg_iod,
        "unplaced": unplaced,
        "unplaced_path": unplaced_path,
        "dcentvfy": dcentvfy_output([seg_path, sr_path, *sources]),
    }


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
    # the warnings left: Presence of property in the TID 1410 finding groups, which PixelMed's
    # TID 1411 (it checks every group as 1411 once one references a segment) does not list
    assert all("Presence of property" in line for line in result.warnings), "\n".join(result.warnings)


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
    assert dciodvfy_errors(outputs["seg"]) == []
    assert dciodvfy_errors(outputs["sr"]) == []


def test_outputs_agree_with_the_source_study(outputs):
    result = outputs["dcentvfy"]
    assert result.errors == [], _report(result)
    assert all(ACCESSION_ENTITY_NOTE in line for line in result.warnings), "\n".join(result.warnings)


def test_seg_states_the_source_side(outputs):
    import pydicom

    seg = pydicom.dcmread(outputs["seg"])
    (anatomy,) = seg.SharedFunctionalGroupsSequence[0].FrameAnatomySequence
    assert outputs["laterality"] in ("L", "R")
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
