"""The ankle phantom: distal tibia and fibula (malleoli), talus, calcaneus, navicular, cuboid,
metatarsal bases, the lateral ligaments (ATFL, CFL, PTFL), deltoid ligament, Achilles and
other tendons, tibiotalar fluid, fat, muscle and skin.

Joint frame of a right ankle (mirrored for the left by the model): ``u`` medial, ``v``
posterior, ``w`` superior, origin on top of the talar dome.  The patient lies supine, feet
first, the foot in neutral position pointing up (anterior, -v), the sole facing inferior.
``params['plantarflexion_deg']`` rotates the foot (talus and everything below it) about the
transverse axis through the talar body: positive values point the toes down.

Dimensions (mm, scale 1): talar dome 30 wide, calcaneus 75 long, Achilles tendon 16 x 6,
ATFL 2.5 mm thick band, tibiotalar cartilage 1.5 + 1.5.  No knee-style structures: the
second output of ``evaluate`` is always 0.

Lesions (severity ``s`` in (0, 1]; see :func:`~training.phantoms.shapes.fibre_layers`):

* ATFL / CFL injury: graded sprain: thickening and surrounding SOFT_TISSUE_EDEMA (grade
  I), partial-thickness TEAR of the deep fibres (grade II), full-thickness gap (grade III),
  at ``atfl_tear_at`` (mostly near the fibula) / ``cfl_tear_at``.
* Achilles tendon rupture: a gap ``2 + 12 s`` mm long with TEAR signal in the watershed
  zone ``atr_gap_above_mm`` above the calcaneal insertion, thickened edematous stumps and
  edema in the paratenon fat; the proximal stump retracts upward; subtle cases are partial
  (anterior half).
* Osteochondral lesion of the talus: subchondral MARROW_EDEMA under the posteromedial or
  anterolateral dome (``olt_site``), a cartilage defect filled with fluid, and for
  ``s >= 0.5`` a fluid-like rim undermining an unstable fragment.
"""
from __future__ import annotations

import numpy as np

from training.phantoms.anatomy import CaseSpec, Tissue
from training.phantoms.shapes import (
    BONE, HARD, INF, Band, Box, Ellipsoid, Frame, HalfSpace, Intersection, Layer, LayeredModel, Limb,
    Offset, Rod, Union, bone, fibre_layers, rotation, solid)

TALUS_CENTRE = (0.0, 2.0, -14.0)
CORTEX_MM = 1.2
SKIN_MM = 1.5


def ankle_frames(plantarflexion_deg: float) -> dict[str, Frame]:
    """Frames of the leg (tibia, fibula) and of the foot (talus and distal)."""
    return {"leg": Frame(), "foot": Frame.about(TALUS_CENTRE, "u", plantarflexion_deg)}


def _param(spec: CaseSpec, key: str) -> float:
    try:
        return float(spec.params[key])
    except KeyError:
        raise KeyError(f"ankle case {spec.case_id!r}: spec.params lacks {key!r} (draw it with sample_case)") from None


def build_ankle(spec: CaseSpec) -> LayeredModel:
    """The ankle of one case; all random choices are in ``spec.params``/``spec.severity``."""
    sev = {k: float(spec.severity.get(k, 0.0)) if spec.labels.get(k) else 0.0 for k in spec.labels}
    fr = ankle_frames(_param(spec, "plantarflexion_deg"))
    L, Fo = fr["leg"], fr["foot"]
    scale = _param(spec, "scale")
    fat_mm = _param(spec, "fat_mm") / scale * 0.7  # less subcutaneous fat at the ankle than at the knee
    film = 0.5 * _param(spec, "physio_fluid_mm")  # the tibiotalar joint holds less fluid than the knee

    tibia = Union(
        Rod(L.point((0, 2, 30)), L.point((0, 2, 330)), 12.0),
        # the distal metaphysis flares gradually from the shaft to the plafond
        Intersection(Ellipsoid((0, 3, 3.5), (23, 20, 75), L), HalfSpace(L.point((0, 0, 3.2)), L.direction((0, 0, -1)))),
        Rod(L.point((22, 3, 12)), L.point((22, 4, -10)), 6.5),  # medial malleolus
        k=5.0)
    tibia_articular = Ellipsoid((0, 2, 3.2), (19, 16, 4), L)
    fibula = Union(Rod(L.point((-21, 10, 60)), L.point((-19, 10, 330)), 6.5),
                   Rod(L.point((-21, 10, 60)), L.point((-24, 8, -16)), 7.0),
                   Ellipsoid((-24, 7, -6), (7, 9, 12), L), k=5.0)
    dome = Ellipsoid((0, 2, -10), (14.5, 17, 10), Fo)  # flat in the coronal plane, convex sagittally
    talus = Union(dome, Ellipsoid((0, 3, -17), (13, 15, 11), Fo),
                  Rod(Fo.point((0, -8, -16)), Fo.point((2, -30, -20)), 10.0),
                  Ellipsoid((3, -33, -20), (12, 8, 11), Fo), k=4.0)
    talus_articular = Intersection(Offset(dome, 3.0),
                                   HalfSpace(Fo.point((0, 0, -9)), Fo.direction((0, 0, -1))))
    calc_frame = Fo.compose(Frame.about((-3, 22, -42), "u", -13))
    calcaneus = Union(Ellipsoid((-3, 20, -42), (15, 36, 15), calc_frame),
                      Ellipsoid((12, 5, -30), (8, 9, 5), Fo),  # sustentaculum tali
                      k=4.0)
    navicular = Ellipsoid((6, -47, -22), (15, 6, 12), Fo)
    cuboid = Ellipsoid((-13, -32, -40), (11, 13, 10), Fo)
    metatarsals = Union(*[Rod(Fo.point((u, -58, w)), Fo.point((u * 1.3, -125, w - 12)), r)
                          for u, w, r in ((18, -30, 6.0), (8, -36, 5.0), (-2, -40, 5.0), (-12, -44, 5.0), (-22, -46, 5.5))])
    capsule = Union(Ellipsoid((0, 2, -2), (30, 26, 14), L))

    layers: list[Layer] = []
    leg = Limb((0, 8, 0), (36, 38), w0=-25, w1=400, taper=0.002, frame=L)
    foot = Box((0, -56, -38), (32, 114, 28), rounding=18.0, frame=Fo)
    core = Union(leg, foot, k=15.0)
    layers.append(Layer("envelope", Offset(core, fat_mm + SKIN_MM), [
        Band(Tissue.SKIN, 0, -SKIN_MM, 0.0), Band(Tissue.FAT, 0, -INF, -SKIN_MM)]))
    muscles = (
        Ellipsoid((0, 32, 170), (30, 18, 95), L),  # triceps surae
        Ellipsoid((4, 20, 95), (12, 10, 60), L),  # flexor hallucis longus
        Ellipsoid((-26, 8, 140), (9, 10, 75), L),  # peronei
        Ellipsoid((8, -16, 160), (10, 10, 95), L),  # tibialis anterior
        Ellipsoid((20, -20, -55), (9, 30, 10), Fo),  # abductor hallucis
        Ellipsoid((0, -40, -60), (14, 35, 7), Fo),  # flexor digitorum brevis
    )
    # one layer per muscle: the bricks cull each on its own box
    layers += [Layer(f"muscle_{i}", m, solid(Tissue.MUSCLE)) for i, m in enumerate(muscles)]
    vessels = Union(Rod(L.point((10, 18, 120)), L.point((19, 15, -6)), 2.5),  # behind the medial malleolus
                    Rod(L.point((19, 15, -6)), Fo.point((14, -20, -48)), 2.5))  # into the sole
    layers.append(Layer("posterior_tibial_vessels", vessels, solid(Tissue.VESSEL)))
    layers.append(Layer("anterior_recess", Ellipsoid((0, -17, 1), (14, 0.5 + film, 4), L), solid(Tissue.FLUID, never_over=HARD)))
    layers.append(Layer("posterior_recess", Ellipsoid((0, 19, -1), (14, 0.5 + film, 5), L), solid(Tissue.FLUID, never_over=HARD)))

    layers.append(Layer("tibia", tibia, bone(0, CORTEX_MM, fluid_mm=1.5 + film, fluid_clip=capsule, cartilage_mm=1.5,
                                             cartilage_clip=tibia_articular)))
    layers.append(Layer("fibula", fibula, bone(0, CORTEX_MM, fluid_mm=0.6 + film, fluid_clip=capsule)))
    layers.append(Layer("talus", talus, bone(0, CORTEX_MM, fluid_mm=1.5 + film, fluid_clip=capsule, cartilage_mm=1.5,
                                             cartilage_clip=talus_articular)))
    # physeal scar of the distal tibia: a thin dark line across the metaphysis
    scar = Intersection(tibia, HalfSpace(L.point((0, 0, 22.4)), L.direction((0, 0, 1))),
                        HalfSpace(L.point((0, 0, 21.6)), L.direction((0, 0, -1))))
    layers.append(Layer("physeal_scar", scar, [Band(Tissue.CORTEX, None, only_over=frozenset({Tissue.MARROW}))]))
    for name, shape in (("calcaneus", calcaneus), ("navicular", navicular), ("cuboid", cuboid), ("metatarsals", metatarsals)):
        layers.append(Layer(name, shape, bone(0, CORTEX_MM)))

    s_olt = sev.get("olt", 0.0)
    if s_olt:
        site = (8.0, 7.0) if _param(spec, "olt_site") >= 0.5 else (-8.0, -6.0)  # posteromedial / anterolateral
        u, v = site
        layers.append(Layer("olt_edema", Ellipsoid((u, v, -5), (5 + 5 * s_olt, 5 + 5 * s_olt, 4 + 4 * s_olt), Fo),
                            [Band(Tissue.MARROW_EDEMA, None, only_over=frozenset({Tissue.MARROW}))]))
        layers.append(Layer("olt_cartilage_defect", Ellipsoid((u, v, 0.8), (2 + 3 * s_olt, 2 + 3 * s_olt, 1.5), Fo),
                            [Band(Tissue.FLUID, None, only_over=frozenset({Tissue.CARTILAGE}))]))
        if s_olt >= 0.5:  # unstable fragment: fluid-like line undermining the fragment
            frag = Ellipsoid((u, v, -1.5), (2 + 3 * s_olt, 2 + 3 * s_olt, 2.5), Fo)
            layers.append(Layer("olt_fragment_rim", frag, [Band(Tissue.TEAR, None, -0.8, 0.0, only_over=BONE)]))

    atfl = Rod(L.point((-24, 0, -10)), Fo.point((-13, -16, -14)), 4.0, flat=0.35, wide=(0, 0, 1))
    cfl = Rod(L.point((-24, 10, -18)), Fo.point((-17, 24, -38)), 3.0, flat=0.6, wide=(0, 1, 0))
    ptfl = Rod(L.point((-22, 14, -10)), Fo.point((-8, 18, -16)), 4.0, flat=0.5, wide=(0, 0, 1))
    deltoid = Rod(L.point((22, 3, -8)), Fo.point((14, 2, -20)), 6.0, flat=0.5, wide=(0, 1, 0))
    layers += fibre_layers("atfl", atfl, 0, sev.get("atfl", 0.0), "sprain", at=_param(spec, "atfl_tear_at"), deep=(1, 0, 0))
    layers += fibre_layers("cfl", cfl, 0, sev.get("cfl", 0.0), "sprain", at=_param(spec, "cfl_tear_at"), deep=(1, 0, 0))
    layers += fibre_layers("ptfl", ptfl)
    layers += fibre_layers("deltoid", deltoid)
    achilles = Rod(L.point((0, 38, 140)), Fo.point((0, 52, -38)), 8.0, 8.5, flat=0.4, wide=(1, 0, 0))
    at = 1.0 - _param(spec, "atr_gap_above_mm") / achilles.length
    layers += fibre_layers("achilles", achilles, 0, sev.get("atr", 0.0), "rupture", at=float(np.clip(at, 0.2, 0.9)),
                           deep=(0, -1, 0), retract_mm=10.0)
    tendons = [
        Rod(L.point((14, 12, 60)), L.point((23, 8, -8)), 3.0), Rod(L.point((23, 8, -8)), Fo.point((10, -45, -28)), 3.0),
        Rod(L.point((6, 20, 60)), Fo.point((6, 14, -32)), 3.0),
        Rod(L.point((-22, 20, 60)), L.point((-27, 16, -18)), 3.0), Rod(L.point((-27, 16, -18)), Fo.point((-20, -22, -48)), 3.0),
        Rod(L.point((8, -22, 60)), Fo.point((12, -50, -14)), 3.5), Rod(L.point((0, -24, 60)), Fo.point((0, -62, -18)), 2.5),
    ]
    layers += [Layer(f"tendon_{i}", t, solid(Tissue.LIGAMENT, never_over=HARD)) for i, t in enumerate(tendons)]

    R = rotation("w", _param(spec, "rot_w_deg")) @ rotation("v", _param(spec, "rot_v_deg")) \
        @ rotation("u", _param(spec, "rot_u_deg"))
    side = 1.0 if spec.laterality == "L" else -1.0
    center = np.array([side * _param(spec, "offset_x_mm"), _param(spec, "offset_y_mm"),
                       _param(spec, "offset_z_mm")])
    return LayeredModel("ankle", spec.laterality, center, R, layers, np.array([140.0, 170.0, 160.0]) * scale, scale=scale)
