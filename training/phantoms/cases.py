"""Clinical sampling of phantom cases: who the patient is, what is wrong, how the joint lies.

``sample_case(joint, rng, case_id, site)`` draws one :class:`CaseSpec` and
``build_anatomy(spec)`` turns it into the joint's 3D model.  Every random choice, including the
sub-type of each lesion (tear position, tear orientation, whether an ACL tear comes with a
bone bruise), is drawn here and stored in ``spec.params`` so that building the anatomy is a
pure function of the spec, and the same generator state always gives the same case.

Patient record (EHR)
    sex 1:1 (knee and ankle slightly more men: 55 %); age from a clipped normal distribution
    per joint (knee 40 +- 16 y, ankle 38 +- 15 y, shoulder 52 +- 14 y; 14..90); height
    normal per sex (men 1.77 +- 0.07 m, women 1.64 +- 0.065 m); body-mass index log-normal
    around 26 kg/m^2 (17..45), weight = BMI * height^2.  Each of the four values is missing
    (None) independently with probability 10 %; the true value still drives the anatomy and
    the labels (a missing header does not make the patient ageless).

Labels: a chain of logistic models
    Labels are drawn in a fixed order; each has a target marginal prevalence, a log-odds
    slope per decade of age around 40 y, a log-odds offset for women and log-odds offsets
    for labels drawn before it (co-occurrence).  The intercepts are calibrated numerically
    (bisection on a fixed simulated population, see :func:`_intercepts`) so that the
    marginal prevalences match the targets while the associations hold.  Targets and
    associations (from clinical MRI series of referred patients):

    knee      acl 25 % (younger: -0.45/decade; women +0.2), pd 6 % (young, women),
              mm 35 % (+0.45/decade; +0.7 with ACL), lm 20 % (+1.3 with ACL),
              mcl 12 % (+0.9 with ACL), pcl 5 % (+1.0 with ACL), lcl 5 % (+1.0 ACL, +1.2 PCL),
              effusion 40 % (+2.2 ACL, +2.5 PD, +0.5 MM, +0.5 LM, +0.8 PCL, +0.4 MCL).
    ankle     atfl 35 % (younger), cfl 15 % (+2.8 with ATFL), atr 8 % (men, 30-50 y),
              olt 12 % (+0.8 with ATFL).
    shoulder  ssp 35 % (+0.8/decade), isp 10 % (+2.2 with SSP), ssc 12 % (+0.4/decade,
              +1.2 with SSP), lhbt 15 % (+1.8 with SSC, +0.6 with SSP), ac 25 %
              (+0.4/decade, men), ghj 20 % (+0.5 with SSP), lhbt_effusion 20 % (+1.5 with
              LHBT, +0.8 with SSP, +0.8 with GHJ), sasd 30 % (+1.3 with SSP, +0.5 with AC).

    Severity of a positive label is Beta(1.4, 1.6) clipped to [0.05, 1], so a good share of
    positives is subtle (small gap, thin tear line, little fluid).  Negatives still carry a
    physiological amount of joint fluid (``physio_fluid_mm``).

Anatomy parameters (``spec.params``)
    ``scale`` follows the true height (1.72 m -> 1.0) with 3 % individual spread, clipped to
    0.85..1.15 (so it is sex-related through height); ``fat_mm`` (subcutaneous fat) grows with
    BMI and is thicker in women; ``flexion_deg`` (knee 0..25), ``plantarflexion_deg`` (ankle
    -10..20), ``arm_rotation_deg`` (shoulder -20..40); ``rot_u_deg``/``rot_v_deg``/
    ``rot_w_deg`` small whole-joint rotations; ``offset_*_mm`` the joint position; knee shape:
    ``tibial_slope_deg`` 3..10, ``patella_height_mm`` (alta/baja) +-9, ``meniscus_size``
    0.92..1.08; shoulder: ``acromion_tilt_deg`` (flat to hooked acromion) -4..12.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from inference.labels import JOINTS, label_keys
from training.phantoms.anatomy import Anatomy, CaseSpec

MISSING_P = 0.10
SEVERITY_BETA = (1.4, 1.6)
SEVERITY_MIN = 0.05


@dataclass(frozen=True)
class LabelModel:
    """Logistic model of one label: target prevalence, age and sex slopes, parent log-odds."""

    key: str
    prevalence: float
    per_decade: float = 0.0  # log-odds per 10 years of age above 40
    female: float = 0.0  # log-odds added for women
    parents: tuple[tuple[str, float], ...] = ()  # (earlier label, log-odds when it is positive)
    peak_age: float | None = None  # if set: age effect is -|age - peak| per decade instead
    male: float = 0.0


LABEL_MODELS: dict[str, tuple[LabelModel, ...]] = {
    "knee": (
        LabelModel("acl", 0.25, per_decade=-0.45, female=0.2),
        LabelModel("pd", 0.06, per_decade=-0.9, female=0.4),
        LabelModel("mm", 0.35, per_decade=0.45, parents=(("acl", 0.7),)),
        LabelModel("lm", 0.20, per_decade=0.15, parents=(("acl", 1.3),)),
        LabelModel("mcl", 0.12, parents=(("acl", 0.9),)),
        LabelModel("pcl", 0.05, parents=(("acl", 1.0),)),
        LabelModel("lcl", 0.05, parents=(("acl", 1.0), ("pcl", 1.2))),
        LabelModel("effusion", 0.40, parents=(("acl", 2.2), ("pd", 2.5), ("mm", 0.5), ("lm", 0.5),
                                              ("pcl", 0.8), ("mcl", 0.4))),
    ),
    "ankle": (
        LabelModel("atfl", 0.35, per_decade=-0.3),
        LabelModel("cfl", 0.15, parents=(("atfl", 2.8),)),
        LabelModel("atr", 0.08, peak_age=40.0, per_decade=0.5, male=0.8),
        LabelModel("olt", 0.12, parents=(("atfl", 0.8),)),
    ),
    "shoulder": (
        LabelModel("ssp", 0.35, per_decade=0.8),
        LabelModel("isp", 0.10, parents=(("ssp", 2.2),)),
        LabelModel("ssc", 0.12, per_decade=0.4, parents=(("ssp", 1.2),)),
        LabelModel("lhbt", 0.15, parents=(("ssc", 1.8), ("ssp", 0.6))),
        LabelModel("ac", 0.25, per_decade=0.4, male=0.3),
        LabelModel("ghj", 0.20, parents=(("ssp", 0.5),)),
        LabelModel("lhbt_effusion", 0.20, parents=(("lhbt", 1.5), ("ssp", 0.8), ("ghj", 0.8))),
        LabelModel("sasd", 0.30, parents=(("ssp", 1.3), ("ac", 0.5))),
    ),
}

AGE = {"knee": (40.0, 16.0), "ankle": (38.0, 15.0), "shoulder": (52.0, 14.0)}
MALE_P = {"knee": 0.55, "ankle": 0.55, "shoulder": 0.5}


def _check_tables() -> None:
    for joint in JOINTS:
        keys = tuple(m.key for m in LABEL_MODELS[joint])
        if sorted(keys) != sorted(label_keys(joint)):
            raise RuntimeError(f"LABEL_MODELS[{joint!r}] keys {keys} differ from inference.labels {label_keys(joint)}")
        for i, m in enumerate(LABEL_MODELS[joint]):
            for parent, _ in m.parents:
                if parent not in keys[:i]:
                    raise RuntimeError(f"label {m.key!r} of {joint} depends on {parent!r}, which is not drawn before it")


_check_tables()


def _age_term(m: LabelModel, age: np.ndarray) -> np.ndarray:
    if m.peak_age is not None:
        return -m.per_decade * np.abs(age - m.peak_age) / 10.0
    return m.per_decade * (age - 40.0) / 10.0


def _logit_rest(m: LabelModel, age: np.ndarray, female: np.ndarray, drawn: dict[str, np.ndarray]) -> np.ndarray:
    z = _age_term(m, age) + m.female * female + m.male * (1 - female)
    for parent, w in m.parents:
        z = z + w * drawn[parent]
    return z


def _draw_ehr_truth(joint: str, rng: np.random.Generator, n: int | None = None) -> dict[str, np.ndarray]:
    size = 1 if n is None else n
    male = rng.random(size) < MALE_P[joint]
    mu, sd = AGE[joint]
    age = np.clip(rng.normal(mu, sd, size), 14, 90)
    height = np.where(male, rng.normal(1.77, 0.07, size), rng.normal(1.64, 0.065, size))
    height = np.clip(height, 1.45, 2.05)
    bmi = np.clip(np.exp(rng.normal(np.log(26.0), 0.17, size)), 17.0, 45.0)
    return {"male": male, "age": age, "height": height, "bmi": bmi}


@functools.lru_cache(maxsize=None)
def _intercepts(joint: str) -> dict[str, float]:
    """Intercepts that make each label's marginal prevalence equal its target.

    Calibrated on a fixed simulated population (seeded, so deterministic) by bisection, label
    by label in drawing order, each using the labels already drawn for that population.
    """
    rng = np.random.default_rng(20240611)
    n = 40000
    ehr = _draw_ehr_truth(joint, rng, n)
    female = (~ehr["male"]).astype(float)
    drawn: dict[str, np.ndarray] = {}
    out: dict[str, float] = {}
    for m in LABEL_MODELS[joint]:
        rest = _logit_rest(m, ehr["age"], female, drawn)
        lo, hi = -12.0, 12.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if np.mean(1 / (1 + np.exp(-(mid + rest)))) < m.prevalence:
                lo = mid
            else:
                hi = mid
        out[m.key] = (lo + hi) / 2
        drawn[m.key] = (rng.random(n) < 1 / (1 + np.exp(-(out[m.key] + rest)))).astype(float)
    return out


def _maybe(rng: np.random.Generator, value: float | int | str) -> float | int | str | None:
    return None if rng.random() < MISSING_P else value


def sample_case(joint: str, rng: np.random.Generator, case_id: str, site: str) -> CaseSpec:
    """Draw one clinically plausible case of ``joint`` (see the module docstring for the model)."""
    if joint not in JOINTS:
        raise ValueError(f"joint must be one of {JOINTS}, got {joint!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    truth = {k: v[0] for k, v in _draw_ehr_truth(joint, rng).items()}
    male = bool(truth["male"])
    age = float(truth["age"])
    height = float(truth["height"])
    bmi = float(truth["bmi"])
    weight = bmi * height**2
    laterality = "R" if rng.random() < (0.55 if joint == "shoulder" else 0.5) else "L"

    intercept = _intercepts(joint)
    drawn: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    severity: dict[str, float] = {}
    for m in LABEL_MODELS[joint]:
        z = intercept[m.key] + _logit_rest(m, np.array([age]), np.array([0.0 if male else 1.0]), drawn)
        positive = bool(rng.random() < 1 / (1 + np.exp(-z[0])))
        drawn[m.key] = np.array([1.0 if positive else 0.0])
        labels[m.key] = int(positive)
        if positive:
            severity[m.key] = float(np.clip(rng.beta(*SEVERITY_BETA), SEVERITY_MIN, 1.0))
    labels = {k: labels[k] for k in label_keys(joint)}

    params = _common_params(rng, male, height, bmi)
    params.update(_JOINT_PARAMS[joint](rng, labels))
    return CaseSpec(
        case_id=case_id, joint=joint, site=site, laterality=laterality,
        age=_maybe(rng, int(round(age))), sex=_maybe(rng, "M" if male else "F"),
        height_m=_maybe(rng, round(height, 2)), weight_kg=_maybe(rng, round(weight, 1)),
        labels=labels, severity=severity, params=params,
    )


def _common_params(rng: np.random.Generator, male: bool, height: float, bmi: float) -> dict[str, float]:
    scale = float(np.clip(height / 1.72 * rng.normal(1.0, 0.03), 0.85, 1.15))
    fat = (2.5 + 0.75 * (bmi - 18.0)) * (1.0 if male else 1.35) * rng.normal(1.0, 0.12)
    return {
        "scale": scale,
        "fat_mm": float(np.clip(fat, 2.0, 40.0)),
        "rot_u_deg": float(np.clip(rng.normal(0, 3), -8, 8)),
        "rot_v_deg": float(np.clip(rng.normal(0, 3), -8, 8)),
        "rot_w_deg": float(np.clip(rng.normal(0, 5), -12, 12)),
        "offset_y_mm": float(rng.normal(0, 8)),
        "offset_z_mm": float(rng.normal(0, 10)),
        "physio_fluid_mm": float(rng.uniform(0.3, 1.2)),
    }


def _knee_params(rng: np.random.Generator, labels: dict[str, int]) -> dict[str, float]:
    # tear sub-types are drawn for every case (used only when the label is positive), so the
    # stream of random numbers does not depend on which labels came out positive
    kind = {"mm": rng.choice([0.5, 1.5, 2.5], p=[0.45, 0.35, 0.20]),
            "lm": rng.choice([0.5, 1.5, 2.5], p=[0.35, 0.35, 0.30])}
    horn = {k: rng.choice(["posterior", "body", "anterior"], p=[0.7, 0.2, 0.1]) for k in ("mm", "lm")}
    body_deg = {"mm": 0.0, "lm": 180.0}  # the body sits opposite the gap of the C
    centre = {k: {"posterior": 90.0, "anterior": -90.0, "body": body_deg[k]}[horn[k]] + rng.normal(0, 12)
              for k in ("mm", "lm")}
    return {
        "flexion_deg": float(rng.uniform(0, 25)),
        "tibial_slope_deg": float(rng.uniform(3, 10)),
        "patella_height_mm": float(np.clip(rng.normal(0, 4), -9, 9)),
        "meniscus_size": float(rng.uniform(0.92, 1.08)),
        "offset_x_mm": float(rng.uniform(70, 110)),
        "acl_tear_at": float(rng.choice([rng.uniform(0.2, 0.35), rng.uniform(0.35, 0.7)], p=[0.3, 0.7])),
        "acl_bruise": float(rng.random() < 0.7),
        "pcl_tear_at": float(rng.uniform(0.3, 0.7)),
        "mcl_tear_at": float(rng.choice([rng.uniform(0.1, 0.3), rng.uniform(0.4, 0.8)], p=[0.65, 0.35])),
        "lcl_tear_at": float(rng.uniform(0.2, 0.8)),
        "mpfl_tear_at": float(rng.choice([rng.uniform(0.1, 0.25), rng.uniform(0.75, 0.9)], p=[0.6, 0.4])),
        "mm_tear_kind": float(kind["mm"]), "lm_tear_kind": float(kind["lm"]),
        "mm_tear_center_deg": float(centre["mm"]), "lm_tear_center_deg": float(centre["lm"]),
    }


def _ankle_params(rng: np.random.Generator, labels: dict[str, int]) -> dict[str, float]:
    return {
        "plantarflexion_deg": float(rng.uniform(-10, 20)),
        "offset_x_mm": float(rng.uniform(80, 120)),
        "atfl_tear_at": float(rng.choice([rng.uniform(0.1, 0.3), rng.uniform(0.3, 0.7)], p=[0.6, 0.4])),
        "cfl_tear_at": float(rng.uniform(0.2, 0.8)),
        "atr_gap_above_mm": float(rng.uniform(20, 60)),  # watershed zone 2-6 cm above the insertion
        "olt_site": float(rng.random() < 0.6),  # 1: posteromedial dome, 0: anterolateral dome
    }


def _shoulder_params(rng: np.random.Generator, labels: dict[str, int]) -> dict[str, float]:
    return {
        "arm_rotation_deg": float(rng.uniform(-20, 40)),
        "acromion_tilt_deg": float(rng.uniform(-4, 12)),
        "offset_x_mm": float(rng.uniform(150, 200)),
        "cuff_full_thickness": float(rng.random() < 0.5),
        "cuff_bursal_side": float(rng.random() < 0.4),  # partial tears: bursal vs articular side
        "lhbt_rupture": float(rng.random() < 0.25),
        "labral_tear_site": float(rng.choice([0.0, 1.0, 2.0], p=[0.45, 0.4, 0.15])),  # SLAP, Bankart, posterior
    }


_JOINT_PARAMS = {"knee": _knee_params, "ankle": _ankle_params, "shoulder": _shoulder_params}


def build_anatomy(spec: CaseSpec) -> Anatomy:
    """The 3D model of ``spec`` (dispatches on ``spec.joint``)."""
    if spec.joint == "knee":
        from training.phantoms.knee import build_knee

        return build_knee(spec)
    if spec.joint == "ankle":
        from training.phantoms.ankle import build_ankle

        return build_ankle(spec)
    if spec.joint == "shoulder":
        from training.phantoms.shoulder import build_shoulder

        return build_shoulder(spec)
    raise ValueError(f"spec.joint must be one of {JOINTS}, got {spec.joint!r}")
