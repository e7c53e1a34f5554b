"""Tests that fail when learning breaks: short real trainings on phantoms, scored on unseen ones.

These train the ``tiny`` preset from scratch (the classifier well under a minute, the segmenter
about a minute with its UNet-decoder head) and score it through
the node's own prediction path (:meth:`ModelBundle.predict_proba` / :meth:`ModelBundle.segment`,
as ``orthonode train evaluate`` does).  Before the pooled features were standardised, the
classifier gave every exam about the same probability.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.cli import read_records
from training.config import load_config
from training.demo import HELD_OUT_SITE, make_phantom_set, training_sites
from training.evaluate import evaluate_bundle
from training.finetune import finetune_classifier, finetune_segmenter, make_bundle, roc_auc

PLANES = ["sagittal", "coronal", "axial"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    root = tmp_path_factory.mktemp("learning")
    train = make_phantom_set(root / "train", "knee", range(28), training_sites(), seed=7, matrix=64)
    test = make_phantom_set(root / "test", "knee", range(500, 516), [HELD_OUT_SITE], seed=7, matrix=64)
    return read_records([f"phantom:{train}"]), read_records([f"phantom:{test}"])


def _cfg(**sections):
    return load_config("tiny").with_overrides(**sections)


def test_classifier_separates_effusion_on_unseen_phantoms(phantoms: tuple[list, list]) -> None:
    torch.manual_seed(0)
    train, test = phantoms
    cfg = _cfg(classify={"steps": 120, "batch_size": 4, "head_lr": 3e-3, "val_fraction": 0.0})
    result = finetune_classifier(cfg, train, PLANES, use_ehr=True, pretrained=None, from_scratch=True, progress=False)
    bundle = make_bundle(cfg, classifier=result, name="learning-test", version="1")
    probs, truth = [], []
    for record in test:
        p = bundle.predict_proba({p: record.planes[p].load() for p in PLANES}, record.ehr)
        probs.append(p["effusion"])
        truth.append(record.label_dict()["effusion"])
    truth_np, probs_np = np.array(truth), np.array(probs)
    assert 0 < truth_np.sum() < len(truth_np), "the unseen set needs effusions and dry knees"
    auc = roc_auc(truth_np, probs_np)
    assert auc is not None and auc >= 0.9, f"effusion AUC {auc} on {len(test)} unseen phantoms"
    # the probabilities differ between exams (the defect was one probability for all)
    assert float(np.std(probs_np)) > 0.05


def _dice(pred: np.ndarray, truth: np.ndarray, index: int) -> float:
    a, b = pred == index, truth == index
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_segmenter_finds_femur_and_tibia_on_unseen_phantoms(phantoms: tuple[list, list]) -> None:
    """Trained on every window of the series, as the node segments it (about a minute)."""
    from inference.labels import KNEE_STRUCTURES

    torch.manual_seed(0)
    train, test = phantoms
    cfg = _cfg(model={"seg_head": "unet"}, segment={"steps": 600, "batch_size": 2, "lr": 4e-3, "val_fraction": 0.0})
    assert cfg.segment.windows == "all"
    result = finetune_segmenter(cfg, train, plane="sagittal", pretrained=None, from_scratch=True, progress=False)
    bundle = make_bundle(cfg, segmenter=result, name="learning-test", version="1")
    index = {s.key: s.index for s in KNEE_STRUCTURES}
    dice: dict[str, list[float]] = {"femur": [], "tibia": []}
    for record in test[:8]:
        source = record.planes["sagittal"]
        pred = bundle.segment(source.load())  # the node's sliding windows over the whole series
        truth = source.load_mask()
        assert pred.shape == truth.shape
        for key in dice:
            dice[key].append(_dice(pred, truth, index[key]))
    femur, tibia = float(np.mean(dice["femur"])), float(np.mean(dice["tibia"]))
    assert (femur + tibia) / 2 >= 0.8 and min(femur, tibia) >= 0.7, f"femur {femur:.2f}, tibia {tibia:.2f}"


def test_evaluation_scores_exactly_what_the_node_sends(phantoms: tuple[list, list], tmp_path: Path) -> None:
    """``orthonode train evaluate`` and the node's ``run_study`` give the same probabilities."""
    from inference.pipeline import run_study

    torch.manual_seed(0)
    train, test = phantoms
    cfg = _cfg(classify={"steps": 4, "batch_size": 4, "val_fraction": 0.0})
    result = finetune_classifier(cfg, train[:8], PLANES, use_ehr=True, pretrained=None, from_scratch=True,
                                 progress=False)
    bundle = make_bundle(cfg, classifier=result, name="learning-test", version="1")
    record = test[0]
    evaluated = evaluate_bundle(bundle, [record], tmp_path / "eval", n_boot=10)
    rows = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()
    study_dir = Path(record.planes["sagittal"].paths[0]).parents[1]
    node = run_study(study_dir, bundle, tmp_path / "out")
    assert node.supported, node.reason
    sent = {f.key: f.probability for f in node.findings}
    header = rows[0].split(",")
    values = dict(zip(header, rows[1].split(",")))
    for key in bundle.card.labels:
        column = next(c for c in header if c in (f"prob_{key}", f"{key}_prob", f"p_{key}"))
        assert float(values[column]) == pytest.approx(sent[key], abs=1e-6), key
    assert evaluated["classification"] is not None
