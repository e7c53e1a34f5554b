"""Classification and segmentation metrics as the method reports them.

Per label: AUC-ROC and average precision (scikit-learn), with 95 % percentile bootstrap
intervals; precision, recall and F1 at the model card's thresholds.  Over labels: macro AUC
and mAP (means over labels that can be scored), macro precision/recall/F1 (mean of the
per-label values, scikit-learn's ``average="macro"``) and micro precision/recall/F1 (all
label decisions pooled, scikit-learn's ``average="micro"``).  Segmentation: Dice per
structure.

Unknown labels (NaN in ``y_true``) are left out of that label's scores only.  A label whose
known truths are all one class has ``auc``/``ap`` ``None`` with the reason, not a number a
reader could mistake for a result.  When ``groups`` (patient ids) are given, probabilities are
averaged per group before scoring, as the method does when a patient has several series sets,
so one patient with many exams does not weigh more than another.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

from inference.labels import KNEE_STRUCTURES, Structure


def _as_2d(name: str, values: Any, n_labels: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1 and n_labels == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] != n_labels:
        raise ValueError(f"{name} must have shape (N, {n_labels}) to match label_keys, got {array.shape}")
    return array


def average_by_group(y_true: np.ndarray, y_prob: np.ndarray, groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean probability per group; the truth of a group must agree across its rows.

    Returns ``(y_true, y_prob, group_names)`` with one row per group (sorted by name).  A
    label known in some rows of a group and unknown in others takes the known value; rows of
    one group with different known values are an error (group by exam instead).
    """
    groups = [str(g) for g in groups]
    if len(groups) != len(y_true):
        raise ValueError(f"groups has {len(groups)} entries, y_true has {len(y_true)} rows")
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    rows = np.array([index[g] for g in groups])
    prob = np.zeros((len(names), y_prob.shape[1]))
    np.add.at(prob, rows, y_prob)
    prob /= np.bincount(rows, minlength=len(names))[:, None]
    truth = np.full((len(names), y_true.shape[1]), np.nan)
    for i, g in enumerate(names):
        block = y_true[rows == i]
        for k in range(block.shape[1]):
            known = block[~np.isnan(block[:, k]), k]
            if known.size == 0:
                continue
            if np.any(known != known[0]):
                raise ValueError(f"group {g!r} has conflicting truths for label column {k}: {sorted(set(known))}")
            truth[i, k] = known[0]
    return truth, prob, names


def _rank_scores(t: np.ndarray, p: np.ndarray) -> tuple[float | None, float | None, str | None]:
    if t.size == 0:
        return None, None, "no known truth"
    if np.all(t == t[0]):
        return None, None, f"only one class in y_true ({'positive' if t[0] == 1 else 'negative'}, n={t.size})"
    return float(roc_auc_score(t, p)), float(average_precision_score(t, p)), None


def _ci(values: list[float]) -> list[float] | None:
    if len(values) < 2:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def classification_metrics(
    y_true: Any,
    y_prob: Any,
    label_keys: Sequence[str],
    thresholds: Mapping[str, float],
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Scores of multi-label probabilities.

    ``y_true`` (N, K) 0/1/NaN, ``y_prob`` (N, K) in [0, 1], ``label_keys`` the K keys,
    ``thresholds`` key -> decision threshold (every key required).  ``n_boot`` bootstrap
    resamples (of groups, when given) give 95 % percentile intervals for each label's AUC and
    AP and for macro AUC and mAP; a resample in which a label has one class only is skipped
    for that label (``n_boot_used`` says how many counted).  ``n_boot=0`` skips the bootstrap.

    Returns ``{"labels": {key: {auc, ap, auc_ci, ap_ci, precision, recall, f1, threshold, n,
    n_pos, reason}}, "macro_auc", "map", "macro_auc_ci", "map_ci", "macro": {precision,
    recall, f1}, "micro": {...}, "n", "n_rows", "grouped"}``.
    """
    keys = list(label_keys)
    if not keys:
        raise ValueError("label_keys is empty")
    missing = [k for k in keys if k not in thresholds]
    if missing:
        raise ValueError(f"thresholds has no value for label(s) {missing}")
    truth = _as_2d("y_true", y_true, len(keys))
    prob = _as_2d("y_prob", y_prob, len(keys))
    if truth.shape[0] != prob.shape[0]:
        raise ValueError(f"y_true has {truth.shape[0]} rows, y_prob {prob.shape[0]}")
    if np.isnan(prob).any() or (prob < 0).any() or (prob > 1).any():
        raise ValueError("y_prob must hold probabilities in [0, 1] without NaN")
    bad = ~np.isnan(truth) & (truth != 0) & (truth != 1)
    if bad.any():
        raise ValueError("y_true must hold 0, 1 or NaN")
    n_rows = truth.shape[0]
    if groups is not None:
        truth, prob, _ = average_by_group(truth, prob, groups)
    thr = np.array([float(thresholds[k]) for k in keys])
    pred = (prob >= thr).astype(int)
    known = ~np.isnan(truth)

    per_label: dict[str, dict] = {}
    for j, key in enumerate(keys):
        t, p, d = truth[known[:, j], j].astype(int), prob[known[:, j], j], pred[known[:, j], j]
        auc, ap, reason = _rank_scores(t, p)
        if t.size:
            precision, recall, f1, _ = precision_recall_fscore_support(
                t, d, average="binary", pos_label=1, zero_division=0
            )
        else:
            precision = recall = f1 = None
        per_label[key] = {
            "auc": auc,
            "ap": ap,
            "auc_ci": None,
            "ap_ci": None,
            "precision": None if precision is None else float(precision),
            "recall": None if recall is None else float(recall),
            "f1": None if f1 is None else float(f1),
            "threshold": float(thresholds[key]),
            "n": int(t.size),
            "n_pos": int(t.sum()),
            "reason": reason,
        }

    scored = [k for k in keys if per_label[k]["auc"] is not None]
    with_truth = [k for k in keys if per_label[k]["n"] > 0]
    macro = {
        m: (float(np.mean([per_label[k][m] for k in with_truth])) if with_truth else None)
        for m in ("precision", "recall", "f1")
    }
    if known.any():
        mp, mr, mf, _ = precision_recall_fscore_support(
            truth[known].astype(int), pred[known], average="binary", pos_label=1, zero_division=0
        )
        micro = {"precision": float(mp), "recall": float(mr), "f1": float(mf)}
    else:
        micro = {"precision": None, "recall": None, "f1": None}

    result = {
        "labels": per_label,
        "macro_auc": float(np.mean([per_label[k]["auc"] for k in scored])) if scored else None,
        "map": float(np.mean([per_label[k]["ap"] for k in scored])) if scored else None,
        "macro_auc_ci": None,
        "map_ci": None,
        "scored_labels": scored,
        "macro": macro,
        "micro": micro,
        "n": int(truth.shape[0]),
        "n_rows": int(n_rows),
        "grouped": groups is not None,
        "n_boot": int(n_boot),
    }
    if n_boot > 0 and scored:
        _bootstrap(result, truth, prob, keys, scored, n_boot, seed)
    return result


def _bootstrap(result: dict, truth: np.ndarray, prob: np.ndarray, keys: list[str], scored: list[str],
               n_boot: int, seed: int) -> None:
    """Percentile intervals from resampling rows (groups) with replacement.

    Inputs were validated once by :func:`classification_metrics`, so scikit-learn's own
    per-call validation is switched off inside the loop, and a resample in which every
    scored label has both classes and no unknown truth is scored in one multi-label call;
    both only save time (the numbers are the same scikit-learn functions').
    """
    import sklearn

    rng = np.random.default_rng(seed)
    n = truth.shape[0]
    cols = [keys.index(k) for k in scored]
    t_all, p_all = truth[:, cols], prob[:, cols]
    samples: dict[str, dict[str, list[float]]] = {k: {"auc": [], "ap": []} for k in scored}
    macro_auc, mean_ap = [], []
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        for _ in range(n_boot):
            idx = rng.integers(0, n, n)
            t, p = t_all[idx], p_all[idx]
            both = ~np.isnan(t).any() and (t.min(axis=0) == 0).all() and (t.max(axis=0) == 1).all()
            if both:
                aucs = [float(v) for v in np.atleast_1d(roc_auc_score(t.astype(int), p, average=None))]
                aps = [float(v) for v in np.atleast_1d(average_precision_score(t.astype(int), p, average=None))]
            else:
                aucs, aps = [], []
                for j in range(len(scored)):
                    keep = ~np.isnan(t[:, j])
                    auc, ap, _ = _rank_scores(t[keep, j].astype(int), p[keep, j])
                    aucs.append(auc)
                    aps.append(ap)
            for key, auc, ap in zip(scored, aucs, aps):
                if auc is not None:
                    samples[key]["auc"].append(auc)
                    samples[key]["ap"].append(ap)
            if all(a is not None for a in aucs):  # macro values only where every label scores
                macro_auc.append(float(np.mean(aucs)))
                mean_ap.append(float(np.mean(aps)))
    for key in scored:
        entry = result["labels"][key]
        entry["auc_ci"] = _ci(samples[key]["auc"])
        entry["ap_ci"] = _ci(samples[key]["ap"])
        entry["n_boot_used"] = len(samples[key]["auc"])
    result["macro_auc_ci"] = _ci(macro_auc)
    result["map_ci"] = _ci(mean_ap)
    result["n_boot_macro_used"] = len(macro_auc)


def dice_of_labels(pred: Any, true: Any, labels: Sequence[int], ignore_index: int = -1) -> list[float | None]:
    """Hard Dice of each label value in ``labels`` between two label maps of one shape.

    Voxels where ``true`` is ``ignore_index`` (not annotated) are left out of both maps.  A
    label absent from both has Dice ``None`` (undefined: averaging it as 1 or 0 would bias the
    mean); absent from the truth but predicted gives 0.
    """
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"pred shape {pred.shape} differs from true shape {true.shape}")
    annotated = true != ignore_index
    out: list[float | None] = []
    for label in labels:
        p = (pred == label) & annotated
        t = (true == label) & annotated
        denominator = int(p.sum()) + int(t.sum())
        out.append(None if denominator == 0 else 2.0 * int((p & t).sum()) / denominator)
    return out


def dice_per_structure(pred: Any, true: Any, structures: Sequence[Structure] = KNEE_STRUCTURES) -> dict[str, float | None]:
    """Dice per structure (:func:`dice_of_labels` of each structure's index), by structure key;
    ``true`` may hold -1 for voxels that were not annotated."""
    scores = dice_of_labels(pred, true, [s.index for s in structures])
    return {s.key: score for s, score in zip(structures, scores)}


def per_site(metrics_fn: Callable[..., dict], sites: Sequence[str], *arrays: Any, **kwargs: Any) -> dict[str, dict]:
    """Run ``metrics_fn`` on each site's rows.

    ``arrays`` (row-aligned with ``sites``) and a ``groups`` keyword, if given, are sliced
    per site; other keywords pass through unchanged.  Each result gains ``"n_site"``, the
    number of rows of that site.  Example:
    ``per_site(classification_metrics, sites, y_true, y_prob, label_keys=keys, thresholds=thr)``.
    """
    sites = np.asarray([str(s) for s in sites])
    for i, a in enumerate(arrays):
        if len(a) != len(sites):
            raise ValueError(f"array {i} has {len(a)} rows, sites has {len(sites)}")
    groups = kwargs.pop("groups", None)
    out = {}
    for site in sorted(set(sites.tolist())):
        mask = sites == site
        sliced = [np.asarray(a)[mask] for a in arrays]
        extra = dict(kwargs)
        if groups is not None:
            extra["groups"] = [g for g, m in zip(groups, mask) if m]
        result = metrics_fn(*sliced, **extra)
        result["n_site"] = int(mask.sum())
        out[site] = result
    return out
