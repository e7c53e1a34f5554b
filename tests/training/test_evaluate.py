"""evaluate_bundle with a tiny real ModelBundle on a small phantom-layout folder (training/evaluate.py)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.checkpoint import ModelBundle, ModelCard
from inference.labels import JOINT_LABELS, KNEE_STRUCTURES, label_keys
from inference.model import PRESETS, OrthoDiffusionClassifier, OrthoDiffusionSegmenter
from inference.preprocess import PreprocessConfig
from training.datasets import read_phantom_folder
from training.evaluate import PHANTOM_STATEMENT, evaluate_bundle
from training.metrics import classification_metrics, dice_per_structure
from tests.training import fixtures as fx

TINY = PRESETS["tiny"]
PLANES = ["sagittal", "coronal"]


def _bundle(with_segmenter: bool = True) -> ModelBundle:
    torch.manual_seed(0)
    keys = list(label_keys("knee"))
    card = ModelCard(
        name="orthodiffusion-knee-eval-test",
        version="0.0.2",
        joint="knee",
        labels=keys,
        label_names=[label.name for label in JOINT_LABELS["knee"]],
        structures=[s.key for s in KNEE_STRUCTURES] if with_segmenter else [],
        thresholds={k: 0.5 for k in keys},
        planes=PLANES,
        use_ehr=True,
        model=TINY.to_dict(),
        preprocess=PreprocessConfig(depth=8, size=(32, 32)).to_dict(),
        training_data={"description": "synthetic phantoms", "fingerprint": "0" * 64},
    )
    classifier = OrthoDiffusionClassifier(TINY, PLANES, num_labels=len(keys), use_ehr=True)
    segmenter = OrthoDiffusionSegmenter(TINY, num_classes=len(KNEE_STRUCTURES) + 1) if with_segmenter else None
    return ModelBundle(card, classifier, segmenter)


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    fx.make_phantom_like_folder(root, n_cases=4)
    return root


def test_evaluate_bundle_writes_metrics_and_figures(phantom_root: Path, tmp_path: Path) -> None:
    phantom_records = read_phantom_folder(phantom_root)
    bundle = _bundle()
    out = evaluate_bundle(bundle, phantom_records, tmp_path / "eval", n_boot=30, seed=1)
    for name in ("metrics.json", "roc.png", "dice.png", "predictions.csv"):
        assert (tmp_path / "eval" / name).stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk == out
    assert out["model"]["name"] == "orthodiffusion-knee-eval-test" and out["model"]["version"] == "0.0.2"
    assert len(out["data"]["fingerprint"]) == 64
    assert out["data"]["n_per_site"] == {"alpha": 2, "beta": 2}
    assert out["data"]["synthetic_phantoms"] is True and out["statement"] == PHANTOM_STATEMENT
    # the classification numbers are those of the predictions the bundle makes on the raw series
    with (tmp_path / "eval" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    keys = label_keys("knee")
    first = phantom_records[0]
    direct = bundle.predict_proba({p: first.planes[p].load() for p in PLANES}, ehr=first.ehr)
    assert float(rows[0]["p_acl"]) == pytest.approx(direct["acl"], abs=1e-5)
    y_true = np.array([[float(r[f"y_{k}"]) for k in keys] for r in rows])
    y_prob = np.array([[float(r[f"p_{k}"]) for k in keys] for r in rows])
    again = classification_metrics(y_true, y_prob, keys, bundle.card.thresholds, groups=[r["patient_id"] for r in rows],
                                   n_boot=0)
    cls = out["classification"]
    assert cls["macro_auc"] == pytest.approx(again["macro_auc"])
    assert cls["micro"]["f1"] == pytest.approx(again["micro"]["f1"])
    for key in keys:
        entry = cls["labels"][key]
        assert set(entry) >= {"auc", "ap", "precision", "recall", "f1", "auc_ci", "ap_ci", "threshold"}
        if entry["auc"] is None:
            assert "only one class" in entry["reason"]
    assert set(out["per_site"]) == {"alpha", "beta"} and out["per_site"]["alpha"]["n_site"] == 2
    # Dice per structure equals the Dice of the bundle's own segmentation of the series
    seg = out["segmentation"]
    assert seg["plane"] == "sagittal" and seg["n_exams"] == 4
    source = first.planes["sagittal"]
    dice = dice_per_structure(bundle.segment(source.load()), source.load_mask(), KNEE_STRUCTURES)
    assert seg["per_exam"][0]["dice"] == pytest.approx(dice)
    assert set(seg["per_structure"]) == {s.key for s in KNEE_STRUCTURES}


def test_records_without_planes_or_truth_are_skipped_with_reasons(phantom_root: Path, tmp_path: Path) -> None:
    bundle = _bundle(with_segmenter=False)
    records = read_phantom_folder(phantom_root)[:3]
    del records[0].planes["coronal"]
    records[1].labels = None
    out = evaluate_bundle(bundle, records, tmp_path / "eval", n_boot=0)
    reasons = {(s["exam_id"], s["task"]): s["reason"] for s in out["skipped"]}
    assert "missing plane(s) ['coronal']" in reasons[(records[0].exam_id, "classification")]
    assert "no truth" in reasons[(records[1].exam_id, "classification")]
    assert out["classification"]["n"] == 1 and out["segmentation"] is None
    assert (tmp_path / "eval" / "dice.png").is_file() and (tmp_path / "eval" / "roc.png").is_file()
