"""Anatomical models of the phantoms: structure volumes and positions, laterality, lesions."""
from __future__ import annotations

import numpy as np
import pytest

from inference.labels import KNEE_STRUCTURES, STRUCTURE_INDEX, label_keys
from training.phantoms.anatomy import CaseSpec, Tissue
from training.phantoms.cases import build_anatomy, sample_case

S = STRUCTURE_INDEX

KNEE_PARAMS = dict(scale=1.0, flexion_deg=10.0, fat_mm=10.0, physio_fluid_mm=0.6, rot_u_deg=0.0, rot_v_deg=0.0,
                   rot_w_deg=0.0, offset_x_mm=90.0, offset_y_mm=0.0, offset_z_mm=0.0, acl_tear_at=0.5, acl_bruise=1.0,
                   pcl_tear_at=0.5, mcl_tear_at=0.25, lcl_tear_at=0.3, mpfl_tear_at=0.2, mm_tear_kind=0.5,
                   lm_tear_kind=2.5, mm_tear_center_deg=90.0, lm_tear_center_deg=90.0, tibial_slope_deg=7.0,
                   patella_height_mm=0.0, meniscus_size=1.0)


def knee_spec(laterality: str = "R", severity: dict[str, float] | None = None, **overrides: float) -> CaseSpec:
    severity = severity or {}
    labels = {k: int(k in severity) for k in label_keys("knee")}
    params = {**KNEE_PARAMS, **overrides}
    return CaseSpec("t", "knee", "site", laterality, 30, "F", 1.7, 65.0, labels, dict(severity), params)


def grid(center: np.ndarray, lo: tuple[float, float, float], hi: tuple[float, float, float], step: float = 1.0) -> np.ndarray:
    """A regular grid of patient points, offsets lo..hi (mm) from ``center``."""
    axes = [np.arange(a, b, step, dtype=np.float32) for a, b in zip(lo, hi)]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return g + center.astype(np.float32)


@pytest.fixture(scope="module")
def right_knee() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    model = build_anatomy(knee_spec("R"))
    pts = grid(model.center, (-60, -60, -60), (60, 60, 80))
    tissue, structure = model.evaluate(pts)
    return pts - model.center.astype(np.float32), tissue, structure, model.center


# plausible adult volumes (mm^3) inside the +-60 mm / -60..80 mm box around the joint
VOLUME_RANGE = {
    "femur": (100e3, 260e3), "tibia": (60e3, 160e3), "fibula": (3e3, 20e3), "patella": (10e3, 30e3),
    "femoral_cartilage": (7e3, 22e3), "tibial_cartilage": (2.5e3, 8e3), "patellar_cartilage": (2e3, 7e3),
    "medial_meniscus": (1.5e3, 4.5e3), "lateral_meniscus": (1.2e3, 4e3), "acl": (0.8e3, 3.5e3), "pcl": (1.0e3, 4e3),
}


def test_every_knee_structure_has_a_plausible_volume(right_knee):
    _, _, structure, _ = right_knee
    counts = np.bincount(structure, minlength=len(KNEE_STRUCTURES) + 1)
    for s in KNEE_STRUCTURES:
        lo, hi = VOLUME_RANGE[s.key]
        assert lo <= counts[s.index] <= hi, f"{s.key}: {counts[s.index]} mm^3 outside [{lo}, {hi}]"


def test_knee_structures_have_their_tissues(right_knee):
    _, tissue, structure, _ = right_knee
    bones = structure == S["femur"]
    assert set(np.unique(tissue[bones])) <= {Tissue.CORTEX, Tissue.MARROW, Tissue.MARROW_EDEMA}
    assert np.mean(tissue[bones] == Tissue.CORTEX) < 0.3  # a thin shell around the marrow
    assert np.all(tissue[structure == S["femoral_cartilage"]] == Tissue.CARTILAGE)
    assert np.all(tissue[structure == S["medial_meniscus"]] == Tissue.FIBROCARTILAGE)
    assert np.all(tissue[structure == S["acl"]] == Tissue.LIGAMENT)
    present = set(np.unique(tissue).tolist())
    for t in (Tissue.AIR, Tissue.FAT, Tissue.MUSCLE, Tissue.SKIN, Tissue.FLUID, Tissue.VESSEL, Tissue.LIGAMENT):
        assert t in present, t.name


def _centroid(rel: np.ndarray, structure: np.ndarray, key: str) -> np.ndarray:
    return rel[structure == S[key]].mean(axis=0)


def test_knee_structures_sit_where_they_should_in_a_right_knee(right_knee):
    rel, _, structure, _ = right_knee
    c = {s.key: _centroid(rel, structure, s.key) for s in KNEE_STRUCTURES}
    x, y, z = 0, 1, 2  # patient left, posterior, superior
    assert c["patella"][y] < c["femur"][y] - 20  # patella anterior to the femur
    assert c["tibia"][z] < c["femur"][z] - 30  # tibia inferior
    assert c["fibula"][x] < c["tibia"][x] - 20  # right knee: lateral is patient right (-x)
    assert c["fibula"][y] > c["tibia"][y] + 5  # fibular head posterolateral
    assert c["medial_meniscus"][x] > c["lateral_meniscus"][x] + 25  # medial toward the midline (+x)
    assert c["patellar_cartilage"][y] > c["patella"][y]  # cartilage on the back of the patella
    assert c["tibial_cartilage"][z] > c["tibia"][z]
    assert abs(c["acl"][z]) < 20 and abs(c["pcl"][z]) < 20
    assert c["pcl"][y] > c["acl"][y]  # PCL posterior to the ACL
    for key in ("medial_meniscus", "lateral_meniscus"):
        assert c["tibial_cartilage"][z] < c[key][z] < c["femoral_cartilage"][z]


def test_acl_runs_anterior_inferior_medial_from_the_lateral_condyle(right_knee):
    rel, _, structure, _ = right_knee
    pts = rel[structure == S["acl"]]
    top = pts[pts[:, 2] > np.percentile(pts[:, 2], 85)].mean(axis=0)
    bottom = pts[pts[:, 2] < np.percentile(pts[:, 2], 15)].mean(axis=0)
    assert bottom[1] < top[1] - 8  # anterior
    assert bottom[0] > top[0] + 3  # medial (+x for a right knee)


def test_left_knee_is_the_mirror_image_of_the_right(right_knee):
    rel, tissue, structure, center = right_knee
    left = build_anatomy(knee_spec("L"))
    assert left.center[0] == pytest.approx(-center[0])
    sample = np.random.default_rng(3).choice(len(rel), 200_000, replace=False)
    mirrored = rel[sample] * np.array([-1, 1, 1], dtype=np.float32) + left.center.astype(np.float32)
    t_left, s_left = left.evaluate(mirrored)
    # identical up to float rounding at surfaces
    assert np.mean(t_left == tissue[sample]) > 0.999
    assert np.mean(s_left == structure[sample]) > 0.999


def test_evaluate_is_deterministic_and_independent_of_point_order():
    model = build_anatomy(knee_spec("R", {"acl": 0.6, "mm": 0.5, "effusion": 0.5}))
    pts = grid(model.center, (-40, -40, -30), (40, 40, 50), step=1.3)
    t1, s1 = model.evaluate(pts)
    perm = np.random.default_rng(0).permutation(len(pts))
    t2, s2 = build_anatomy(knee_spec("R", {"acl": 0.6, "mm": 0.5, "effusion": 0.5})).evaluate(pts[perm])
    assert np.array_equal(t1[perm], t2) and np.array_equal(s1[perm], s2)
    assert t1.dtype == np.uint8 and s1.dtype == np.uint8


def _acl_box(model) -> np.ndarray:
    return grid(model.center, (-25, -25, -15), (25, 30, 30), step=0.7)


def test_acl_tear_has_fluid_signal_gap_fewer_fibres_and_a_bone_bruise():
    intact = build_anatomy(knee_spec("R"))
    torn = build_anatomy(knee_spec("R", {"acl": 0.8}))
    pts = _acl_box(intact)
    ti, si = intact.evaluate(pts)
    tt, st = torn.evaluate(pts)
    assert (st == S["acl"]).sum() < 0.9 * (si == S["acl"]).sum()
    # the gap lies in the course of the intact ligament and carries TEAR signal, unlabelled
    course = si == S["acl"]
    assert np.sum(course & (tt == Tissue.TEAR)) > 50
    assert np.all(st[tt == Tissue.TEAR] != S["acl"])
    assert np.sum(ti == Tissue.TEAR) == 0
    # pivot-shift bone bruise in the lateral femoral condyle (-x for a right knee)
    big = grid(intact.center, (-50, -40, -30), (50, 40, 50), step=1.5)
    tb, sb = torn.evaluate(big)
    bruise = (tb == Tissue.MARROW_EDEMA) & (sb == S["femur"])
    assert bruise.sum() > 30
    assert np.all(big[bruise, 0] < intact.center[0])


def test_subtle_acl_tear_is_smaller_than_a_florid_one():
    model = build_anatomy(knee_spec("R"))
    pts = _acl_box(model)
    tears = [np.sum(build_anatomy(knee_spec("R", {"acl": s}, acl_bruise=0.0)).evaluate(pts)[0] == Tissue.TEAR)
             for s in (0.1, 0.5, 1.0)]
    assert 0 < tears[0] < tears[1] < tears[2]


def test_effusion_distends_the_suprapatellar_recess_monotonically():
    volumes = []
    for s in (None, 0.2, 0.5, 1.0):
        model = build_anatomy(knee_spec("R", {} if s is None else {"effusion": s}))
        pts = grid(model.center, (-40, -60, 35), (40, -5, 110), step=1.0)  # anterior, above the patella
        volumes.append(int(np.sum(model.evaluate(pts)[0] == Tissue.FLUID)))
    assert volumes[0] > 0  # physiological fluid in a negative case
    assert all(a < b for a, b in zip(volumes, volumes[1:])), volumes
    assert volumes[-1] > 10 * volumes[0]


@pytest.mark.parametrize("key, structure", [("mm", "medial_meniscus"), ("lm", "lateral_meniscus")])
def test_meniscal_tear_is_a_high_signal_line_inside_the_meniscus(key, structure):
    model = build_anatomy(knee_spec("R", {key: 0.6}))
    pts = grid(model.center, (-45, -35, -8), (45, 35, 10), step=0.5)
    tissue, struct = model.evaluate(pts)
    tear = (tissue == Tissue.TEAR)
    assert tear.sum() > 20
    assert np.all(struct[tear] == S[structure])  # the torn meniscus stays the meniscus
    assert np.mean(pts[tear, 1] > model.center[1] + 5) > 0.8  # posterior horn
    # the line reaches the articular surface: tear voxels next to non-meniscal tissue
    shape = tuple(len(np.arange(a, b, 0.5)) for a, b in zip((-45, -35, -8), (45, 35, 10)))
    t3 = tear.reshape(shape)
    inside = (struct == S[structure]).reshape(shape)
    near_outside = np.zeros_like(t3)
    for axis in range(3):
        for shift in (1, -1):
            near_outside |= t3 & ~np.roll(inside, shift, axis=axis)
    assert near_outside.sum() > 0


def test_collateral_sprain_grades_add_edema_then_discontinuity():
    model = build_anatomy(knee_spec("R"))
    pts = grid(model.center, (25, -25, -60), (60, 25, 45), step=1.0)  # medial side
    counts = {}
    for s in (0.2, 0.9):
        t, _ = build_anatomy(knee_spec("R", {"mcl": s})).evaluate(pts)
        counts[s] = (np.sum(t == Tissue.SOFT_TISSUE_EDEMA), np.sum(t == Tissue.TEAR))
    t0, _ = model.evaluate(pts)
    assert np.sum(t0 == Tissue.SOFT_TISSUE_EDEMA) == 0
    assert counts[0.2][0] > 100 and counts[0.2][1] == 0  # grade I: edema, no tear
    assert counts[0.9][1] > 20  # grade III: full-thickness gap


def test_patellar_dislocation_shifts_the_patella_laterally_with_bruises():
    base = build_anatomy(knee_spec("R"))
    pd = build_anatomy(knee_spec("R", {"pd": 0.8}))
    pts = grid(base.center, (-50, -65, -20), (50, 20, 70), step=1.0)
    tb, sb = base.evaluate(pts)
    tp, sp = pd.evaluate(pts)
    shift = pts[sp == S["patella"], 0].mean() - pts[sb == S["patella"], 0].mean()
    assert shift < -5  # lateral = -x for a right knee
    bruised = (tp == Tissue.MARROW_EDEMA)
    assert np.sum(bruised & (sp == S["patella"])) > 20
    assert np.sum(bruised & (sp == S["femur"])) > 20


def test_ankle_and_shoulder_have_no_structures_and_show_their_lesions():
    rng = np.random.default_rng(5)
    for joint, lesion in (("ankle", "atr"), ("shoulder", "ssp")):
        spec = sample_case(joint, rng, "x", "site")
        spec.labels = {k: int(k == lesion) for k in spec.labels}
        spec.severity = {lesion: 0.9}
        spec.params.update(rot_u_deg=0.0, rot_v_deg=0.0, rot_w_deg=0.0, cuff_full_thickness=1.0)
        model = build_anatomy(spec)
        pts = grid(model.center, (-60, -60, -60), (60, 60, 60), step=1.5)
        tissue, structure = model.evaluate(pts)
        assert not structure.any()
        present = set(np.unique(tissue).tolist())
        for t in (Tissue.FAT, Tissue.MUSCLE, Tissue.SKIN, Tissue.CORTEX, Tissue.MARROW, Tissue.CARTILAGE,
                  Tissue.LIGAMENT, Tissue.FLUID, Tissue.TEAR):
            assert t in present, (joint, t.name)
        spec.labels[lesion] = 0
        healthy, _ = build_anatomy(spec).evaluate(pts)
        assert np.sum(healthy == Tissue.TEAR) == 0, joint


def test_build_anatomy_rejects_an_unknown_joint():
    spec = knee_spec()
    spec.joint = "elbow"
    with pytest.raises(ValueError, match="joint"):
        build_anatomy(spec)


@pytest.mark.parametrize("joint", ["knee", "ankle", "shoulder"])
def test_brick_culling_matches_evaluating_every_point(joint):
    # with an infinite safety factor no brick is classified from its centre: every point is
    # evaluated, which is the reference the culled evaluation must reproduce exactly
    spec = sample_case(joint, np.random.default_rng(11), "x", "site")
    spec.labels = {k: 1 for k in spec.labels}
    spec.severity = {k: 0.7 for k in spec.labels}
    model = build_anatomy(spec)
    pts = (model.center + (np.random.default_rng(2).random((150_000, 3)) - 0.5) * model.extent_mm).astype(np.float32)
    culled = model.evaluate(pts)
    model.SAFETY = 1e6
    reference = model.evaluate(pts)
    assert np.array_equal(culled[0], reference[0]) and np.array_equal(culled[1], reference[1])


def _shaft_axis(pts: np.ndarray) -> np.ndarray:
    """Principal direction of a cloud of points (unit vector pointing superior)."""
    centred = pts - pts.mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    return axis if axis[2] > 0 else -axis


def test_flexion_rotates_tibia_against_femur_about_the_transverse_axis():
    angles = {}
    for flexion in (0.0, 24.0):
        model = build_anatomy(knee_spec("R", flexion_deg=flexion))
        pts = grid(model.center, (-40, -70, -150), (40, 70, 170), step=2.0)
        _, structure = model.evaluate(pts)
        rel = pts - model.center.astype(np.float32)
        femur = _shaft_axis(rel[(structure == S["femur"]) & (rel[:, 2] > 70)])
        tibia = _shaft_axis(rel[(structure == S["tibia"]) & (rel[:, 2] < -60)])
        assert abs(femur[0]) < 0.05 and abs(tibia[0]) < 0.05  # rotation about the x (transverse) axis
        angles[flexion] = np.degrees(np.arccos(np.clip(femur @ tibia, -1, 1)))
        if flexion:  # supine on a cushion: the thigh descends posteriorly to the hip, the leg to the foot
            assert femur[1] > 0.1 and tibia[1] < -0.1
    assert angles[0.0] < 3
    assert angles[24.0] == pytest.approx(24.0, abs=3)


@pytest.mark.parametrize("joint", ["ankle", "shoulder"])
def test_ankle_and_shoulder_mirror_with_laterality(joint):
    spec = sample_case(joint, np.random.default_rng(21), "x", "site")
    spec.laterality = "R"
    right = build_anatomy(spec)
    spec.laterality = "L"
    left = build_anatomy(spec)
    assert left.center[0] == pytest.approx(-right.center[0])
    rel = ((np.random.default_rng(4).random((100_000, 3)) - 0.5) * right.extent_mm).astype(np.float32)
    t_right, _ = right.evaluate(rel + right.center.astype(np.float32))
    t_left, _ = left.evaluate(rel * np.array([-1, 1, 1], dtype=np.float32) + left.center.astype(np.float32))
    assert np.mean(t_right == t_left) > 0.999
    assert len(np.unique(t_right)) > 6


def test_evaluate_validates_points_and_handles_empty_input():
    model = build_anatomy(knee_spec("R"))
    t, s = model.evaluate(np.zeros((0, 3), dtype=np.float32))
    assert t.shape == (0,) and s.shape == (0,)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        model.evaluate(np.zeros((5, 2), dtype=np.float32))
    bad = np.zeros((4, 3), dtype=np.float32)
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        model.evaluate(bad)
    with pytest.raises(KeyError, match="flexion_deg"):
        spec = knee_spec("R")
        del spec.params["flexion_deg"]
        build_anatomy(spec)


@pytest.mark.parametrize("joint", ["knee", "ankle", "shoulder"])
def test_sampled_cases_build_across_the_parameter_ranges(joint):
    rng = np.random.default_rng(31)
    for i in range(12):
        spec = sample_case(joint, rng, f"{joint}-{i}", "site")
        model = build_anatomy(spec)
        assert model.joint == joint and model.laterality == spec.laterality
        pts = grid(model.center, tuple(-model.extent_mm / 2), tuple(model.extent_mm / 2), step=3.0)
        tissue, structure = model.evaluate(pts)
        assert np.mean(tissue == Tissue.AIR) < 0.75  # the imaging box is mostly filled (the ankle is L-shaped)
        if joint == "knee":  # every structure is present whatever the lesions, flexion or size
            assert set(np.unique(structure).tolist()) == set(range(12)), spec.case_id
        else:
            assert not structure.any()


def test_subtle_effusion_exceeds_the_largest_physiological_fluid():
    def recess_fluid(severity, physio):
        model = build_anatomy(knee_spec("R", severity, physio_fluid_mm=physio))
        pts = grid(model.center, (-40, -60, 35), (40, -5, 110), step=0.7)
        return int(np.sum(model.evaluate(pts)[0] == Tissue.FLUID))

    assert recess_fluid({"effusion": 0.05}, 0.3) > 1.2 * recess_fluid({}, 1.2)
