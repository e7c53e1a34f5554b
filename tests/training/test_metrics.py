"""Metrics against values worked out by hand on small arrays (training/metrics.py)."""
from __future__ import annotations

import numpy as np
import pytest

from inference.labels import KNEE_STRUCTURES
from training.metrics import average_by_group, classification_metrics, dice_per_structure, per_site

NAN = np.nan


def test_auc_ap_prf_by_hand() -> None:
    # label a: positives 0.8, 0.4; negatives 0.6, 0.2 -> pairs (pos > neg): 0.8>0.6, 0.8>0.2, 0.4>0.2 = 3 of 4
    # ranked: 0.8(+) 0.6(-) 0.4(+) 0.2(-) -> AP = (1/1 + 2/3) / 2 = 5/6
    # at 0.5: predicted 0.8, 0.6 -> TP 1, FP 1, FN 1 -> P = R = F1 = 0.5
    # label b: perfect ranking; at 0.5: predicted 0.9, 0.7, 0.55 -> TP 2, FP 1, FN 0 -> P 2/3, R 1, F1 0.8
    y_true = np.array([[1, 1], [0, 0], [1, 1], [0, 0]], float)
    y_prob = np.array([[0.8, 0.9], [0.6, 0.55], [0.4, 0.7], [0.2, 0.1]])
    m = classification_metrics(y_true, y_prob, ["a", "b"], {"a": 0.5, "b": 0.5}, n_boot=0)
    a, b = m["labels"]["a"], m["labels"]["b"]
    assert a["auc"] == pytest.approx(0.75) and a["ap"] == pytest.approx(5 / 6)
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert b["auc"] == pytest.approx(1.0) and b["ap"] == pytest.approx(1.0)
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert m["macro_auc"] == pytest.approx(0.875) and m["map"] == pytest.approx((5 / 6 + 1) / 2)
    # macro: mean of per-label; micro: pooled TP 3, FP 2, FN 1 -> P 3/5, R 3/4, F1 2/3
    assert m["macro"]["f1"] == pytest.approx((0.5 + 0.8) / 2)
    assert m["macro"]["precision"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert (m["micro"]["precision"], m["micro"]["recall"], m["micro"]["f1"]) == pytest.approx((0.6, 0.75, 2 / 3))
    assert m["micro"]["f1"] != pytest.approx(m["macro"]["f1"])


def test_thresholds_per_label_and_unknown_truths() -> None:
    y_true = np.array([[1, NAN], [0, 1], [1, 0], [0, NAN]])
    y_prob = np.array([[0.35, 0.9], [0.3, 0.8], [0.9, 0.2], [0.1, 0.99]])
    m = classification_metrics(y_true, y_prob, ["a", "b"], {"a": 0.32, "b": 0.5}, n_boot=0)
    # a at 0.32: predicted rows 0, 2 (both positive) -> P = R = 1
    assert m["labels"]["a"]["precision"] == 1.0 and m["labels"]["a"]["recall"] == 1.0
    # b: only rows 1, 2 known -> n 2, perfect ranking
    assert m["labels"]["b"]["n"] == 2 and m["labels"]["b"]["auc"] == 1.0


def test_single_class_label_gives_none_with_reason() -> None:
    y_true = np.array([[1, 0], [0, 0], [1, 0]], float)
    y_prob = np.array([[0.9, 0.1], [0.1, 0.7], [0.8, 0.2]])
    m = classification_metrics(y_true, y_prob, ["a", "b"], {"a": 0.5, "b": 0.5}, n_boot=50)
    assert m["labels"]["b"]["auc"] is None and m["labels"]["b"]["ap"] is None
    assert "only one class" in m["labels"]["b"]["reason"]
    assert m["scored_labels"] == ["a"] and m["macro_auc"] == 1.0
    assert m["labels"]["b"]["precision"] == 0.0  # one false positive, no positives


def test_patient_averaging_changes_scores() -> None:
    # patient p1 has two exams (one scored high, one low); averaging makes it 0.5
    y_true = np.array([[1], [1], [0], [0]], float)
    y_prob = np.array([[0.9], [0.1], [0.4], [0.3]])
    groups = ["p1", "p1", "p2", "p3"]
    per_exam = classification_metrics(y_true, y_prob, ["a"], {"a": 0.5}, n_boot=0)
    per_patient = classification_metrics(y_true, y_prob, ["a"], {"a": 0.5}, groups=groups, n_boot=0)
    # per exam: pairs 0.9>0.4, 0.9>0.3 true; 0.1 beats nothing -> 2/4
    assert per_exam["labels"]["a"]["auc"] == pytest.approx(0.5)
    # per patient: p1 = 0.5 > 0.4, 0.3 -> 1.0; and 3 rows instead of 4
    assert per_patient["labels"]["a"]["auc"] == pytest.approx(1.0)
    assert per_patient["n"] == 3 and per_patient["n_rows"] == 4
    truth, prob, names = average_by_group(y_true, y_prob, groups)
    assert names == ["p1", "p2", "p3"] and prob[:, 0].tolist() == pytest.approx([0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="conflicting"):
        average_by_group(np.array([[1.0], [0.0]]), np.array([[0.5], [0.5]]), ["p", "p"])


def test_bootstrap_interval_contains_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((120, 3)) < 0.4).astype(float)
    prob = np.clip(0.35 * y + 0.65 * rng.random((120, 3)), 0, 1)
    thr = {k: 0.5 for k in "abc"}
    m = classification_metrics(y, prob, list("abc"), thr, n_boot=100, seed=3)
    for key in "abc":
        entry = m["labels"][key]
        assert entry["auc_ci"][0] <= entry["auc"] <= entry["auc_ci"][1]
        assert entry["ap_ci"][0] <= entry["ap"] <= entry["ap_ci"][1]
        assert entry["auc_ci"][1] - entry["auc_ci"][0] > 0.01
    assert m["macro_auc_ci"][0] <= m["macro_auc"] <= m["macro_auc_ci"][1]
    again = classification_metrics(y, prob, list("abc"), thr, n_boot=100, seed=3)
    assert again["labels"]["a"]["auc_ci"] == m["labels"]["a"]["auc_ci"]
    # a label's interval does not depend on the other labels scored with it (same resamples)
    alone = classification_metrics(y[:, :1], prob[:, :1], ["a"], {"a": 0.5}, n_boot=100, seed=3)
    assert alone["labels"]["a"]["auc_ci"] == pytest.approx(m["labels"]["a"]["auc_ci"])
    assert alone["labels"]["a"]["ap_ci"] == pytest.approx(m["labels"]["a"]["ap_ci"])


def test_input_validation_names_the_argument() -> None:
    with pytest.raises(ValueError, match="thresholds"):
        classification_metrics(np.zeros((2, 1)), np.zeros((2, 1)), ["a"], {}, n_boot=0)
    with pytest.raises(ValueError, match="y_prob"):
        classification_metrics(np.zeros((2, 2)), np.zeros((2, 1)), ["a", "b"], {"a": 0.5, "b": 0.5}, n_boot=0)
    with pytest.raises(ValueError, match="y_prob must hold probabilities"):
        classification_metrics(np.zeros((2, 1)), np.full((2, 1), 1.5), ["a"], {"a": 0.5}, n_boot=0)


def test_dice_known_masks() -> None:
    true = np.zeros((2, 4, 4), int)
    pred = np.zeros((2, 4, 4), int)
    true[0, :2, :2] = 1  # femur: 4 voxels
    pred[0, :2, :1] = 1  # 2 voxels, all inside -> 2*2/(4+2) = 2/3
    true[1, 0, 0] = 2  # tibia missed entirely -> 0
    pred[1, 3, 3] = 4  # patella predicted, absent from truth -> 0
    true[1, 2, :] = -1  # not annotated: a prediction here does not count
    pred[1, 2, :] = 3
    dice = dice_per_structure(pred, true, KNEE_STRUCTURES)
    assert dice["femur"] == pytest.approx(2 / 3)
    assert dice["tibia"] == 0.0 and dice["patella"] == 0.0
    assert dice["fibula"] is None and dice["pcl"] is None  # absent from both (after ignoring -1)
    assert set(dice) == {s.key for s in KNEE_STRUCTURES}
    with pytest.raises(ValueError, match="shape"):
        dice_per_structure(pred[:1], true)


def test_per_site_slices_rows_and_groups() -> None:
    y_true = np.array([[1], [0], [1], [0], [1], [0]], float)
    y_prob = np.array([[0.9], [0.1], [0.2], [0.8], [0.6], [0.4]])
    sites = ["s1", "s1", "s2", "s2", "s2", "s2"]
    out = per_site(classification_metrics, sites, y_true, y_prob, label_keys=["a"], thresholds={"a": 0.5},
                   groups=["p1", "p2", "p3", "p4", "p5", "p6"], n_boot=0)
    assert sorted(out) == ["s1", "s2"]
    assert out["s1"]["labels"]["a"]["auc"] == 1.0 and out["s1"]["n_site"] == 2
    # s2: positives 0.2, 0.6; negatives 0.8, 0.4 -> pairs won: 0.6>0.4 -> 1/4
    assert out["s2"]["labels"]["a"]["auc"] == pytest.approx(0.25) and out["s2"]["n"] == 4
