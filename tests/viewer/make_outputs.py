"""A phantom knee study with the node's DICOM SEG and SR, for the OHIF viewer check.

Writes ``OUT/study/`` (the phantom's source images, as ``orthonode phantom`` makes them),
``OUT/seg.dcm``, ``OUT/sr.dcm`` and ``OUT/expected.json`` (the Study Instance UID, the SEG's
segment labels, and the SR's measurements as OHIF should list them: label, key slice and area,
read back from the SR; the browser check looks for these).

The SEG and SR come from the node's own writers (:mod:`inference.seg_writer`,
:mod:`inference.sr_writer`) called as :func:`inference.pipeline.run_study` calls them, the
route of ``tests/inference/test_validators.py``: the label map is the phantom's ground truth on
its sagittal series (no model is trained here), the findings have fixed probabilities, so the
segments and findings the viewer must show are known in advance.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from inference.labels import PLANES
from inference.pipeline import SEG_SERIES_NUMBER, SR_SERIES_NUMBER, _evidence
from inference.seg_writer import structure_volumes_ml, write_segmentation
from inference.series import load_series
from inference.sr_writer import VIEWER_TRACKING_IDENTIFIER, Finding, write_report
from inference.uids import AlgorithmInfo, NodeInfo
from sr_templates import load_template

ALGORITHM = AlgorithmInfo(name="OrthoDiffusion", version="0.1-viewer-check")
NODE = NodeInfo(software_version="0.1.0")
#: findings reported present (probability 0.8); the others absent (0.2)
PRESENT = ("acl", "mm", "effusion")


def build(out: Path, matrix: int, seed: int) -> dict:
    from training.datasets import read_phantom_folder
    from training.phantoms.generate import generate_dataset

    phantoms = out / "phantom"
    if phantoms.exists():
        shutil.rmtree(phantoms)
    generate_dataset(phantoms, "knee", 1, seed=seed, matrix=matrix)
    (record,) = read_phantom_folder(phantoms)
    volumes = {plane: load_series(source.series) for plane, source in record.planes.items()}
    sagittal = volumes["sagittal"]
    label_map = record.planes["sagittal"].load_mask().astype(np.uint8)
    seg = write_segmentation(sagittal.datasets, label_map, ALGORITHM, SEG_SERIES_NUMBER["sagittal"], node_info=NODE)
    template = load_template("knee")
    findings = [
        Finding.at_threshold(label.key, label.name, 0.8 if label.key in PRESENT else 0.2, 0.5)
        for label in template.labels
    ]
    used = {p: (volumes[p].info.series_instance_uid, volumes[p].info.series_description) for p in PLANES if p in volumes}
    sr = write_report(
        template,
        [_evidence(volumes[p]) for p in PLANES if p in volumes],
        findings,
        used,
        [p for p in PLANES if p not in volumes],
        record.laterality,
        ALGORITHM,
        seg,
        structure_volumes_ml(sagittal.datasets, label_map),
        SR_SERIES_NUMBER,
        NODE,
        label_map=label_map,
        segmented_series=sagittal.datasets,
    )
    seg.save_as(out / "seg.dcm")
    sr.save_as(out / "sr.dcm")
    present = {int(v) for v in np.unique(label_map)} - {0}
    instance_numbers = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in sagittal.datasets}
    groups = sr_groups(sr, instance_numbers)
    placed_names = {g["finding"] for g in groups if g["probability"] is not None}
    expected = {
        "study_instance_uid": str(sagittal.datasets[0].StudyInstanceUID),
        "segmented_series_uid": sagittal.info.series_instance_uid,
        "seg_series_number": int(seg.SeriesNumber),
        "sr_series_number": int(sr.SeriesNumber),
        "seg_series_description": str(seg.SeriesDescription),
        "sr_series_description": str(sr.SeriesDescription),
        "segment_labels": [str(s.SegmentLabel) for s in seg.SegmentSequence if int(s.SegmentNumber) in present],
        "findings": [label.name for label in template.labels],
        # what OHIF lists in its Measurements panel once it loads the SR: every group with the
        # viewer's tracking identifier (findings placed on a key slice, then structure outlines),
        # by its label, in the SR's order, each on its key slice
        "measurements": [
            {key: g[key] for key in ("label", "finding", "probability", "instance_number", "area_mm2")}
            for g in groups if g["tracking_id"] == VIEWER_TRACKING_IDENTIFIER
        ],
        "placed_findings": [g for g in groups if g["probability"] is not None and g["scoord"]],
        # findings without a location: only in the Qualitative Evaluations, no measurement
        "unplaced_findings": [label.name for label in template.labels if label.concept.meaning not in placed_names],
        # per structure (outline and volume groups share one Tracking UID): area and volume
        "structures": merge_structures([g for g in groups if g["probability"] is None]),
        "sources": sorted(str(p) for p in phantoms.glob("*/dicom/**/*.dcm")),
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=2), encoding="utf-8")
    return expected


def _code(item, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    code = getattr(item, keyword)[0]
    return str(code.CodeValue), str(code.CodeMeaning)


def sr_groups(sr, instance_numbers: dict[str, int]) -> list[dict]:
    """The measurement groups of the SR's Imaging Measurements, read back from the dataset;
    ``instance_numbers`` maps the SOP Instance UIDs of the source images to their numbers."""
    (measurements,) = [i for i in sr.ContentSequence if _code(i)[0] == "126010"]
    out = []
    for group in measurements.ContentSequence:
        if _code(group)[0] != "125007":
            continue
        entry = {"tracking_id": "", "tracking_uid": "", "finding": None, "site": None, "probability": None,
                 "area_mm2": None, "volume_cm3": None, "scoord": False, "label": None, "instance_number": None}
        for item in group.ContentSequence:
            value, meaning = _code(item)
            if value == "112039":
                entry["tracking_id"] = str(item.TextValue)
            elif value == "112040":
                entry["tracking_uid"] = str(item.UID)
            elif value == "121071" and item.ValueType == "CODE":
                entry["finding"] = _code(item, "ConceptCodeSequence")[1]
            elif value == "363698007":
                entry["site"] = _code(item, "ConceptCodeSequence")[1]
            elif value == "121106" and item.ValueType == "TEXT":
                entry["label"] = str(item.TextValue)
            elif item.ValueType == "SCOORD":
                entry["scoord"] = True
                (image,) = item.ContentSequence
                entry["instance_number"] = instance_numbers[str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
            elif item.ValueType == "NUM":
                number = float(item.MeasuredValueSequence[0].NumericValue)
                key = {"Probability": "probability", "Area": "area_mm2", "Volume": "volume_cm3"}.get(meaning)
                if key:
                    entry[key] = number
        out.append(entry)
    return out


def merge_structures(groups: list[dict]) -> list[dict]:
    merged: dict[str, dict] = {}
    for g in groups:
        m = merged.setdefault(g["tracking_uid"], {"name": None, "site": None, "area_mm2": None, "volume_cm3": None})
        if g["tracking_id"] != VIEWER_TRACKING_IDENTIFIER:  # the volume group names the structure
            m["name"] = g["tracking_id"]
        for key in ("site", "area_mm2", "volume_cm3"):
            if g[key] is not None:
                m[key] = g[key]
    return list(merged.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    expected = build(args.out, args.matrix, args.seed)
    print(json.dumps({k: v for k, v in expected.items() if k != "sources"}, indent=2))


if __name__ == "__main__":
    main()
