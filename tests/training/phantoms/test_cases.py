"""Clinical sampling of phantom cases: prevalence, co-occurrence, EHR, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from inference.labels import JOINTS, label_keys
from training.phantoms.cases import LABEL_MODELS, MISSING_P, sample_case

N = 2000


@pytest.fixture(scope="module")
def cohorts():
    out = {}
    for i, joint in enumerate(JOINTS):
        rng = np.random.default_rng(100 + i)
        out[joint] = [sample_case(joint, rng, f"{joint}-{k}", "site-a") for k in range(N)]
    return out


def _rate(cases, key):
    return float(np.mean([c.labels[key] for c in cases]))


def test_every_case_has_every_label_of_its_joint_in_order(cohorts):
    for joint, cases in cohorts.items():
        for c in cases[:50]:
            assert tuple(c.labels) == label_keys(joint)
            assert set(c.labels.values()) <= {0, 1}
            assert c.joint == joint and c.site == "site-a" and c.laterality in ("L", "R")


def test_prevalence_matches_the_model_within_sampling_error(cohorts):
    for joint, cases in cohorts.items():
        for m in LABEL_MODELS[joint]:
            p = m.prevalence
            tol = 4 * np.sqrt(p * (1 - p) / N)
            assert abs(_rate(cases, m.key) - p) < tol, (joint, m.key, _rate(cases, m.key), p)


def test_knee_reference_prevalences(cohorts):
    cases = cohorts["knee"]
    for key, target in (("acl", 0.25), ("mm", 0.35), ("lm", 0.20), ("mcl", 0.12), ("effusion", 0.40),
                        ("pcl", 0.05), ("lcl", 0.05)):
        assert abs(_rate(cases, key) - target) < 0.04, key


def _conditional(cases, key, given):
    pos = [c.labels[key] for c in cases if c.labels[given]]
    neg = [c.labels[key] for c in cases if not c.labels[given]]
    return np.mean(pos), np.mean(neg)


def test_knee_co_occurrence(cohorts):
    cases = cohorts["knee"]
    with_acl, without = _conditional(cases, "effusion", "acl")
    assert with_acl > without + 0.3
    with_pd, without_pd = _conditional(cases, "effusion", "pd")
    assert with_pd > without_pd + 0.3
    lm_acl, lm_no = _conditional(cases, "lm", "acl")
    assert lm_acl > 1.5 * lm_no


def _true_age_relation(cases, key):
    ages_pos = [c.age for c in cases if c.labels[key] and c.age is not None]
    ages_neg = [c.age for c in cases if not c.labels[key] and c.age is not None]
    return np.mean(ages_pos), np.mean(ages_neg)


def test_age_relations(cohorts):
    pos, neg = _true_age_relation(cohorts["knee"], "mm")
    assert pos > neg + 2  # degenerative meniscal tears with age
    pos, neg = _true_age_relation(cohorts["knee"], "acl")
    assert pos < neg - 2  # ACL tears in younger patients
    pos, neg = _true_age_relation(cohorts["shoulder"], "ssp")
    assert pos > neg + 4  # cuff tears with age


def test_ehr_values_are_plausible_and_sometimes_missing(cohorts):
    for joint, cases in cohorts.items():
        for field in ("age", "sex", "height_m", "weight_kg"):
            values = [getattr(c, field) for c in cases]
            missing = np.mean([v is None for v in values])
            assert abs(missing - MISSING_P) < 0.03, (joint, field, missing)
        ages = np.array([c.age for c in cases if c.age is not None])
        assert ages.min() >= 14 and ages.max() <= 90
        heights = np.array([c.height_m for c in cases if c.height_m is not None])
        assert 1.5 < np.median(heights) < 1.85
        weights = np.array([c.weight_kg for c in cases if c.weight_kg is not None])
        assert 55 < np.median(weights) < 95 and weights.min() > 35
        sexes = [c.sex for c in cases if c.sex is not None]
        assert set(sexes) == {"M", "F"}
        men = [c.height_m for c in cases if c.sex == "M" and c.height_m]
        women = [c.height_m for c in cases if c.sex == "F" and c.height_m]
        assert np.mean(men) > np.mean(women) + 0.08


def test_severity_only_for_positives_and_in_range_with_subtle_cases(cohorts):
    sev = []
    for cases in cohorts.values():
        for c in cases:
            assert set(c.severity) == {k for k, v in c.labels.items() if v}
            sev += list(c.severity.values())
    sev = np.array(sev)
    assert np.all((sev > 0) & (sev <= 1))
    assert np.mean(sev < 0.3) > 0.15  # a real share of subtle positives


def test_anatomy_parameters_are_in_their_ranges(cohorts):
    knee = cohorts["knee"]
    scale = np.array([c.params["scale"] for c in knee])
    assert scale.min() >= 0.85 and scale.max() <= 1.15
    men = np.mean([c.params["scale"] for c in knee if c.sex == "M"])
    women = np.mean([c.params["scale"] for c in knee if c.sex == "F"])
    assert men > women + 0.03
    flex = np.array([c.params["flexion_deg"] for c in knee])
    assert flex.min() >= 0 and flex.max() <= 25
    fat_heavy = np.mean([c.params["fat_mm"] for c in knee if c.weight_kg and c.height_m and c.weight_kg / c.height_m**2 > 30])
    fat_lean = np.mean([c.params["fat_mm"] for c in knee if c.weight_kg and c.height_m and c.weight_kg / c.height_m**2 < 22])
    assert fat_heavy > fat_lean + 3
    lat = np.mean([c.laterality == "R" for c in knee])
    assert 0.45 < lat < 0.55


def test_same_generator_state_gives_the_same_case():
    for joint in JOINTS:
        a = sample_case(joint, np.random.default_rng(7), "c", "s")
        b = sample_case(joint, np.random.default_rng(7), "c", "s")
        assert a == b
        c = sample_case(joint, np.random.default_rng(8), "c", "s")
        assert c != a


def test_sample_case_rejects_bad_arguments():
    with pytest.raises(ValueError, match="joint"):
        sample_case("hip", np.random.default_rng(0), "c", "s")
    with pytest.raises(TypeError, match="rng"):
        sample_case("knee", 42, "c", "s")  # type: ignore[arg-type]
