"""The shoulder phantom: humeral head and shaft with tuberosities and bicipital groove,
glenoid and scapula, acromion, clavicle (acromioclavicular joint), coracoid, the rotator cuff
(supraspinatus, infraspinatus, subscapularis tendons and muscles), the long head of the
biceps tendon (LHBT) in its groove and sheath, glenoid labrum, subacromial-subdeltoid (SASD)
bursa, deltoid, fat and skin.

Joint frame of a right shoulder (mirrored for the left by the model): ``u`` medial (toward
the midline), ``v`` posterior, ``w`` superior, origin at the centre of the humeral head.  The
patient lies supine, head first, the arm at the side; ``params['arm_rotation_deg']`` rotates
the humerus about its shaft axis (external rotation positive), carrying the tuberosities,
the groove and the cuff insertions with it; ``params['acromion_tilt_deg']`` lowers the
anterolateral acromion (flat to hooked acromion).

The rotator cuff is modelled as sectors of a spherical shell over the humeral head (the
tendons hug the head on their way to the tuberosities); tears are sub-sectors of that shell
next to the footprint.  Dimensions (mm, scale 1): head radius 23, cartilage 1.5, cuff 5.5 mm
thick, acromion about 8 mm thick with its undersurface 8-9 mm above the cuff, LHBT 5 mm wide.
No knee-style structures: the second output of ``evaluate`` is always 0.

Lesions (severity ``s`` in (0, 1]):

* SSP / ISP / SSC tear: a fluid-filled (TEAR) defect of the tendon next to its footprint,
  ``6 + 14 s`` mm in radius; full thickness (``cuff_full_thickness`` or ``s > 0.7``) from
  the articular to the bursal surface, otherwise a partial-thickness tear of the articular
  or bursal (``cuff_bursal_side``) half; tendinosis (SOFT_TISSUE_EDEMA signal) around it.
* LHBT injury: tendinopathy/partial tear (thickened tendon with intrasubstance intermediate
  or, for ``s >= 0.5``, fluid-like signal), or with ``lhbt_rupture`` and ``s > 0.5`` an
  empty groove (fluid) with the retracted stump distally.
* AC joint lesion: widened joint (clavicle raised ``2 + 5 s`` mm and shifted), capsular
  hypertrophy with edema, fluid in the joint and bone-marrow edema of the acromion and the
  distal clavicle.
* GHJ lesion / effusion: fluid distending the joint (``0.8 + 3 s`` mm) and the axillary
  recess, and a labral TEAR line at the base of the labrum: superior (SLAP),
  anteroinferior (Bankart) or posterior (``labral_tear_site``).
* LHBT sheath effusion: fluid ring around the tendon in the groove, ``0.8 + 2.5 s`` mm
  thicker than the physiological film.
* SASD bursitis: the bursa between cuff and deltoid/acromion filled with fluid,
  ``0.2 + 3.5 s`` mm thick (a fat plane when normal).
"""
from __future__ import annotations

import numpy as np

from training.phantoms.anatomy import CaseSpec, Tissue
from training.phantoms.shapes import (
    BONE, EDEMA_OVER, Difference, HARD, INF, Band, Ellipsoid, Frame, HalfSpace, Intersection, Layer,
    LayeredModel, Limb, Offset, Ring, Rod, Shape, Shell, Union, bone, rotation, solid)

HEAD_R = 23.0
CARTILAGE_MM = 1.5
CUFF_IN = HEAD_R + CARTILAGE_MM + 0.3  # cuff starts just outside the cartilage
CUFF_OUT = CUFF_IN + 5.5
CORTEX_MM = 1.3
SKIN_MM = 1.5


def _param(spec: CaseSpec, key: str) -> float:
    try:
        return float(spec.params[key])
    except KeyError:
        raise KeyError(f"shoulder case {spec.case_id!r}: spec.params lacks {key!r} (draw it with sample_case)") from None


def _sector(H: Frame, normal_lo: tuple[float, float, float], normal_hi: tuple[float, float, float] | None = None,
            extra: tuple[HalfSpace, ...] = ()) -> Shape:
    """Half-spaces through the head centre cutting a sector (points with p . n > 0 kept)."""
    cuts = [HalfSpace(H.point((0, 0, 0)), -H.direction(normal_lo))]
    if normal_hi is not None:
        cuts.append(HalfSpace(H.point((0, 0, 0)), -H.direction(normal_hi)))
    return Intersection(*cuts, *extra)


def build_shoulder(spec: CaseSpec) -> LayeredModel:
    """The shoulder of one case; all random choices are in ``spec.params``/``spec.severity``."""
    sev = {k: float(spec.severity.get(k, 0.0)) if spec.labels.get(k) else 0.0 for k in spec.labels}
    scale = _param(spec, "scale")
    fat_mm = _param(spec, "fat_mm") / scale
    film = _param(spec, "physio_fluid_mm")
    B = Frame()  # body (scapula, clavicle)
    # humerus: rotation about the shaft axis; positive = external rotation, which turns the
    # anterior tuberosities and the groove laterally (toward -u)
    H = Frame.about((0, 0, 0), (0.03, 0, 1), -_param(spec, "arm_rotation_deg"))

    head = Ellipsoid((0, 0, 0), (HEAD_R, HEAD_R, HEAD_R), H)
    humerus = Union(
        head,
        Rod(H.point((-6, 0, -10)), H.point((-12, 0, -260)), 12.5),
        Ellipsoid((-19, -3, 6), (8, 14, 13), H),  # greater tuberosity
        Ellipsoid((-6, -19, -2), (7, 7, 10), H),  # lesser tuberosity
        k=5.0)
    groove = Rod(H.point((-15, -19, 12)), H.point((-15, -20, -60)), 4.0)
    humerus = Difference(humerus, groove, k=1.5)
    # articular surface: the medial-superior hemisphere of the head, not the neck or the shaft
    head_articular = Intersection(HalfSpace(H.point((-4, 0, 0)), H.direction((-1, 0, 0.3))),
                                  Offset(head, CARTILAGE_MM + 1.0))

    glenoid_face_u = HEAD_R + 2 * CARTILAGE_MM + 0.5
    glenoid = Difference(
        Union(Ellipsoid((glenoid_face_u + 7, 0, 0), (8, 13, 19), B),
              Rod(B.point((glenoid_face_u + 8, 3, 0)), B.point((110, 35, -35)), 13.0, 8.0, flat=0.35, wide=(0.3, 0.2, 1)),
              k=5.0),
        Ellipsoid((0, 0, 0), (HEAD_R + 2 * CARTILAGE_MM + 0.5,) * 3, B))
    glenoid_articular = Ellipsoid((glenoid_face_u, 0, 0), (5, 14, 20), B)
    spine = Rod(B.point((105, 45, 25)), B.point((20, 28, 36)), 9.0, 7.0, flat=0.5, wide=(0, 0, 1))
    # a hooked acromion (positive tilt) dips anterolaterally and narrows the subacromial space
    acromion = Rod(B.point((20, 28, 36)), B.point((-22, -2, 36 - 0.35 * _param(spec, "acromion_tilt_deg"))),
                   14.0, 12.0, flat=0.3, wide=(0.3, -0.3, 0))
    clavicle_lift = 2.0 + 5.0 * sev.get("ac", 0.0)  # AC widening/elevation with the lesion
    clavicle = Rod(B.point((-12 + 3.5 + 1.5 * sev.get("ac", 0.0), -18, 38 + clavicle_lift)), B.point((120, -30, 55)), 8.0, 9.0)
    coracoid = Rod(B.point((38, -5, 14)), B.point((16, -34, 10)), 6.0)
    scapula = Union(glenoid, spine, acromion, coracoid, k=4.0)

    layers: list[Layer] = []
    torso = Ellipsoid((80, 15, -40), (100, 80, 140), B)
    arm = Limb((-12, 0, 0), (42, 42), w0=-400, w1=30, taper=-0.0005, frame=H)
    cap = Ellipsoid((-2, 0, 0), (52, 50, 48), B)
    core = Union(torso, arm, cap, k=15.0)
    layers.append(Layer("envelope", Offset(core, fat_mm * 0.6 + SKIN_MM), [
        Band(Tissue.SKIN, 0, -SKIN_MM, 0.0), Band(Tissue.FAT, 0, -INF, -SKIN_MM)]))
    # deltoid: a thick cap over the lateral, anterior and posterior head, from the acromion
    # and clavicle down to its humeral insertion; never medial to the glenoid
    deltoid = Intersection(Shell(Ellipsoid((-4, 0, -8), (49, 47, 56), B), -15.0, 0.0),
                           HalfSpace(B.point((12, 0, 0)), B.direction((1, 0, 0))),
                           HalfSpace(B.point((0, 0, 44)), B.direction((0, 0, 1))))
    muscles = (
        deltoid,
        Rod(B.point((30, 14, 30)), B.point((120, 40, 30)), 14.0),  # supraspinatus in its fossa
        Ellipsoid((75, 42, -25), (50, 12, 42), B),  # infraspinatus
        Ellipsoid((75, 12, -25), (50, 11, 42), B),  # subscapularis
        Ellipsoid((40, -35, -40), (40, 15, 40), B),  # pectoralis major
        Ellipsoid((-10, -30, -90), (14, 13, 60), H),  # biceps / coracobrachialis
        Ellipsoid((70, 30, 62), (60, 16, 22), B),  # trapezius
        Ellipsoid((90, 50, -70), (40, 14, 50), B),  # teres major / minor
    )
    # one layer per muscle: the bricks cull each on its own box
    layers += [Layer(f"muscle_{i}", m, solid(Tissue.MUSCLE)) for i, m in enumerate(muscles)]
    layers.append(Layer("lung", Ellipsoid((150, 10, -70), (55, 60, 110), B), solid(Tissue.AIR)))
    layers.append(Layer("axillary_vessels", Rod(B.point((60, -20, -30)), H.point((5, -15, -140)), 4.0), solid(Tissue.VESSEL)))

    # --- rotator cuff tendons: shells over the head, three sectors
    cuff_shell = Shell(head, CUFF_IN - HEAD_R, CUFF_OUT - HEAD_R)
    ssp_sector = _sector(H, (0, 0, 1), None, (HalfSpace(H.point((0, 14, 0)), H.direction((0, 1, 0))),
                                                  HalfSpace(H.point((0, -14, 0)), H.direction((0, -1, 0))),
                                                  HalfSpace(H.point((0, 0, 10)), H.direction((0, 0, -1)))))
    isp_sector = _sector(H, (0, 1, 0), None, (HalfSpace(H.point((0, 12, 0)), H.direction((0, -1, 0))),
                                                  HalfSpace(H.point((0, 0, -18)), H.direction((0, 0, -1))),
                                                  HalfSpace(H.point((12, 0, 0)), H.direction((1, 0, 0)))))
    ssc_sector = _sector(H, (0, -1, 0), None, (HalfSpace(H.point((0, -14, 0)), H.direction((0, 1, 0))),
                                                   HalfSpace(H.point((0, 0, 12)), H.direction((0, 0, 1))),
                                                   HalfSpace(H.point((0, 0, -26)), H.direction((0, 0, -1))),
                                                   HalfSpace(H.point((-8, 0, 0)), H.direction((-1, 0, 0)))))

    # --- joint fluid, bursa, sheath (drawn before bones/tendons, which overwrite them)
    s_ghj = sev.get("ghj", 0.0)
    # positives always exceed the largest physiological film (1.2 mm)
    joint_space = Intersection(Shell(head, 0.0, CARTILAGE_MM + 0.3 + film + (0.8 + 3.0 * s_ghj if s_ghj else 0.0)),
                               HalfSpace(H.point((-2, 0, 0)), H.direction((-1, 0, 0))))
    layers.append(Layer("glenohumeral_fluid", joint_space, solid(Tissue.FLUID)))
    if s_ghj:
        layers.append(Layer("axillary_recess", Ellipsoid((4, 0, -24), (10 + 4 * s_ghj, 12 + 4 * s_ghj, 3 + 6 * s_ghj), H),
                            solid(Tissue.FLUID, never_over=HARD)))
    s_sasd = sev.get("sasd", 0.0)
    bursa_t = 0.2 + 3.5 * s_sasd
    # subacromial part over the cuff, subdeltoid part over the lateral head and tuberosities
    bursa = Intersection(Shell(head, CUFF_OUT - HEAD_R + 0.2, CUFF_OUT - HEAD_R + 0.2 + bursa_t),
                         HalfSpace(H.point((0, 0, -12)), H.direction((0, 0, -1))),
                         HalfSpace(H.point((20, 0, 0)), H.direction((1, 0, 0))),
                         Union(HalfSpace(H.point((2, 0, 0)), H.direction((1, 0, 0))),
                               HalfSpace(H.point((0, 0, 14)), H.direction((0, 0, -1)))))
    layers.append(Layer("sasd_bursa", bursa, solid(Tissue.FLUID if s_sasd else Tissue.FAT)))
    s_lhe = sev.get("lhbt_effusion", 0.0)
    lhbt_groove = Rod(H.point((-15, -20, 14)), H.point((-15, -21, -55)), 2.6)
    sheath = Offset(lhbt_groove, 0.6 + film * 0.5 + (0.8 + 2.5 * s_lhe if s_lhe else 0.0))
    layers.append(Layer("lhbt_sheath", sheath, solid(Tissue.FLUID, never_over=HARD)))

    # --- bones
    layers.append(Layer("humerus", humerus, bone(0, CORTEX_MM, cartilage_mm=CARTILAGE_MM, cartilage_clip=head_articular)))
    layers.append(Layer("scapula", scapula, bone(0, CORTEX_MM, cartilage_mm=CARTILAGE_MM, cartilage_clip=glenoid_articular)))
    layers.append(Layer("clavicle", clavicle, bone(0, CORTEX_MM)))
    s_ac = sev.get("ac", 0.0)
    if s_ac:
        ac_centre = (-10.0, -12.0, 38.0 + clavicle_lift / 2)
        layers.append(Layer("ac_capsule", Ellipsoid(ac_centre, (8 + 3 * s_ac, 10 + 3 * s_ac, 8 + 5 * s_ac), B),
                            [Band(Tissue.SOFT_TISSUE_EDEMA, 0, only_over=EDEMA_OVER | {Tissue.LIGAMENT})]))
        layers.append(Layer("ac_marrow_edema", Ellipsoid(ac_centre, (12 + 8 * s_ac, 14, 12), B),
                            [Band(Tissue.MARROW_EDEMA, None, only_over=frozenset({Tissue.MARROW}))]))
    layers.append(Layer("ac_joint_fluid", Ellipsoid((-8.5 + 0.75 * s_ac, -12, 38 + clavicle_lift / 2), (1.0 + 1.5 * s_ac, 8, 6), B),
                        solid(Tissue.FLUID, never_over=BONE)))

    # --- labrum (triangular ring around the glenoid rim) and its tear
    labrum_frame = B.compose(Frame(rotation("v", -90), np.array([glenoid_face_u - 0.5, 0.0, 0.0])))
    labrum = Ring((0, 0, 0), (20.0, 14.0), inner=0.72, height=4.0, profile="round", frame=labrum_frame)
    layers.append(Layer("labrum", labrum, solid(Tissue.FIBROCARTILAGE, never_over=BONE)))
    if s_ghj:
        site = int(round(_param(spec, "labral_tear_site")))
        # ring angle measured from local u (= body superior after the frame rotation) toward local v (posterior)
        centre_deg = {0: 0.0, 1: 200.0, 2: 110.0}[site]  # superior (SLAP), anteroinferior (Bankart), posterior
        c = np.deg2rad(centre_deg)
        spot = Ellipsoid((20 * np.cos(c), 14 * np.sin(c), 0.0), (7 + 9 * s_ghj,) * 3, labrum_frame)
        # a detachment line at the base of the labrum (toward the glenoid, local -w)
        slab = Intersection(HalfSpace(labrum_frame.point((0, 0, -0.2)), labrum_frame.direction((0, 0, 1))),
                            HalfSpace(labrum_frame.point((0, 0, -1.0 - 0.8 * s_ghj)), labrum_frame.direction((0, 0, -1))))
        layers.append(Layer("labral_tear", Intersection(labrum, slab, spot),
                            [Band(Tissue.TEAR, None, only_over=frozenset({Tissue.FIBROCARTILAGE}))]))

    # --- cuff tendons and tears
    full = _param(spec, "cuff_full_thickness") >= 0.5
    bursal = _param(spec, "cuff_bursal_side") >= 0.5
    for key, sector, footprint in (("ssp", ssp_sector, (-1.0, 0.0, 0.35)), ("isp", isp_sector, (-0.9, 0.7, 0.1)),
                                   ("ssc", ssc_sector, (-0.4, -1.0, -0.1))):
        layers.append(Layer(f"{key}_tendon", Intersection(cuff_shell, sector), solid(Tissue.LIGAMENT, never_over=HARD)))
        s = sev.get(key, 0.0)
        if not s:
            continue
        f = np.asarray(footprint) / np.linalg.norm(footprint)
        spot = Ellipsoid(tuple(H.point(f * (CUFF_IN + 3) + np.array([0, 0, 0]))), (6 + 14 * s,) * 3)
        if full or s > 0.7:
            lo, hi = CUFF_IN - HEAD_R - 0.3, CUFF_OUT - HEAD_R + 0.3  # full thickness: both surfaces
        elif bursal:
            lo, hi = CUFF_OUT - HEAD_R - 1.5 - 2 * s, CUFF_OUT - HEAD_R + 0.3
        else:
            lo, hi = CUFF_IN - HEAD_R - 0.3, CUFF_IN - HEAD_R + 1.5 + 2 * s
        gap = Intersection(Shell(head, lo, hi), sector, spot)
        layers.append(Layer(f"{key}_tear", gap, [Band(Tissue.TEAR, 0, never_over=HARD)]))
        layers.append(Layer(f"{key}_tendinosis", Intersection(Shell(head, CUFF_IN - HEAD_R, CUFF_OUT - HEAD_R), sector,
                                                               Offset(spot, 4 + 4 * s)),
                            [Band(Tissue.SOFT_TISSUE_EDEMA, 0, only_over=frozenset({Tissue.LIGAMENT}))]))

    # --- long head of biceps: intra-articular arch from the supraglenoid tubercle, then the groove
    s_lhbt = sev.get("lhbt", 0.0)
    arch = Rod(B.point((glenoid_face_u, 0, 21)), H.point((-12, -18, 20)), 2.6)
    if s_lhbt and _param(spec, "lhbt_rupture") >= 0.5 and s_lhbt > 0.5:
        # rupture: the groove is empty (fluid/fat), the retracted stump lies distally
        layers.append(Layer("lhbt_empty_groove", Offset(lhbt_groove, 0.5), solid(Tissue.FLUID, never_over=HARD)))
        layers.append(Layer("lhbt_stump", Rod(H.point((-14, -22, -70)), H.point((-12, -24, -120)), 3.5),
                            solid(Tissue.LIGAMENT, never_over=HARD)))
        layers.append(Layer("lhbt_arch", arch, solid(Tissue.LIGAMENT, never_over=HARD)))
    else:
        thick = 1.0 + 0.6 * s_lhbt
        tendon = Union(Rod(arch.p0, arch.p1, 2.6 * thick), Rod(lhbt_groove.p0, lhbt_groove.p1, 2.6 * thick))
        bands = [Band(Tissue.LIGAMENT, 0, never_over=HARD)]
        if s_lhbt:  # tendinopathy / partial tear: intrasubstance high signal
            bands.append(Band(Tissue.SOFT_TISSUE_EDEMA if s_lhbt < 0.5 else Tissue.TEAR, 0, -INF, -0.6 - 0.4 * s_lhbt,
                              never_over=HARD))
        layers.append(Layer("lhbt", tendon, bands))

    R = rotation("w", _param(spec, "rot_w_deg")) @ rotation("v", _param(spec, "rot_v_deg")) \
        @ rotation("u", _param(spec, "rot_u_deg"))
    side = 1.0 if spec.laterality == "L" else -1.0
    center = np.array([side * _param(spec, "offset_x_mm"), _param(spec, "offset_y_mm"),
                       _param(spec, "offset_z_mm")])
    return LayeredModel("shoulder", spec.laterality, center, R, layers, np.array([160.0, 160.0, 160.0]) * scale, scale=scale)
