"""The knee phantom: distal femur, proximal tibia and fibula, patella, cartilage, menisci,
cruciate and collateral ligaments, extensor tendons, fluid, fat, muscles, vessels and skin.

Geometry is designed for an average adult at scale 1 in the *joint frame* of a right knee
(``u`` medial = toward the midline, ``v`` posterior, ``w`` superior, origin at the centre of
the tibial plateau surface) and placed in patient coordinates by
:class:`~training.phantoms.shapes.LayeredModel` (scale, small rotation, laterality mirror).

Individual shape varies with ``params``: ``tibial_slope_deg`` (posterior slope of the plateau,
which the menisci follow), ``patella_height_mm`` (patella alta/baja), ``meniscus_size``.

Flexion (``params['flexion_deg']``) is a rotation about the transverse (``u``) axis through the
centre of the posterior condylar arcs: with the patient supine and the knee on a cushion the
femur tilts back by half the angle and the tibia by the other half, so that the tibia is
flexed by the full angle relative to the femur; the patella follows the trochlea at 0.7 times
the angle.  Ligaments are straight rods between attachment points carried by their bones,
so they change course with flexion.

Dimensions (mm, scale 1): condylar width ~84, condyle AP ~60, tibial plateau 76 x 54,
patella 44 x 40 x 20, cartilage 2.2 (femur), 2.5 (tibia), 3.0 (patella), ACL ~35 long and
~10 wide, menisci 6 mm high at the rim.

Structures (``evaluate``'s second output) follow :data:`inference.labels.KNEE_STRUCTURES`:
a bone is its cortex, marrow and any bone bruise inside it; a torn ligament's gap is not
the ligament; a meniscal tear line stays part of the meniscus.

Lesions, as radiologists see them (severity ``s`` in (0, 1]; see also
:func:`~training.phantoms.shapes.fibre_layers`):

* ACL tear: fibres discontinuous at ``acl_tear_at`` (mid-substance or proximal), a gap of
  ``2 + 12 s`` mm with fluid-like TEAR signal, swollen stumps with an edematous rim and
  periligamentous edema, the distal stump sagging anteriorly-inferiorly (flat course);
  subtle tears (``s < 0.3``) interrupt only part of the cross-section.  With
  ``acl_bruise`` the pivot-shift bone bruise: MARROW_EDEMA in the lateral femoral condyle
  near the terminal sulcus and in the posterolateral tibial plateau, larger with ``s``.
  Effusion is associated through the case sampling.
* PCL tear: the same rupture model on the PCL (partial tears on its posterior half).
* Meniscal tear: a TEAR sheet ``0.6 + 1.2 s`` mm thick in the meniscus, horizontal
  (cleavage, reaching the free edge), oblique (reaching the inferior surface) or vertical
  longitudinal (peripheral third, both surfaces); posterior horn unless sampled otherwise;
  its arc grows with ``s`` (:class:`MeniscalTear`).
* MCL/LCL injury: grade I (``s < 0.35``) thickened ligament with intermediate signal and
  surrounding SOFT_TISSUE_EDEMA; grade II adds a partial-thickness TEAR of the deep fibres
  (MCL mostly proximal, at ``mcl_tear_at``); grade III a full-thickness gap.
* Transient lateral patellar dislocation: patella displaced ``4 + 10 s`` mm laterally and
  tilted ``6 + 12 s`` degrees; bone bruises of the medial patellar facet and the
  anterolateral lateral femoral condyle; MPFL sprain/tear (graded as a collateral
  ligament, near its patellar or femoral attachment) with edema; effusion via sampling.
* Effusion: the suprapatellar recess distends (thickness ``physio + 1 + 8 s`` mm, and
  wider/taller), the articular fluid films thicken by ``0.5 + 3 s`` mm, fluid fills the capsule
  around the condyles and the notch (``1 + 4 s`` mm) and the posterior condylar recesses.
  Negative cases keep a physiological film (``physio_fluid_mm``).
"""
from __future__ import annotations

import numpy as np

from inference.labels import STRUCTURE_INDEX
from training.phantoms.anatomy import CaseSpec, Tissue
from training.phantoms.shapes import (
    BONE, HARD, INF, Band, Box, Difference, Ellipsoid, Frame,
    HalfSpace, Intersection, Layer, LayeredModel, Limb, Offset, Ring, Rod, Shape, Union, bone,
    fibre_layers, rotation, solid)

S = STRUCTURE_INDEX
#: centre of the condylar arcs: the flexion axis passes through it along u
PIVOT = (0.0, 6.0, 26.0)
CORTEX_MM = 1.5
SKIN_MM = 1.5


def knee_frames(flexion_deg: float, pd_shift_mm: float = 0.0, pd_tilt_deg: float = 0.0,
                patella_height_mm: float = 0.0) -> dict[str, Frame]:
    """Frames of the femur, tibia (with fibula and menisci) and patella for a flexion angle.

    ``patella_height_mm`` moves the patella up (alta, positive) or down (baja) along the
    trochlea; ``pd_shift_mm``/``pd_tilt_deg`` displace the patella laterally (toward -u) and
    tilt it (lateral facet toward the femur) for a transient lateral patellar dislocation.
    """
    femur = Frame.about(PIVOT, "u", -flexion_deg / 2)
    tibia = Frame.about(PIVOT, "u", flexion_deg / 2)
    patella = femur.compose(Frame.about(PIVOT, "u", 0.7 * flexion_deg))
    patella = patella.compose(Frame(np.eye(3), np.array([0.0, 0.0, patella_height_mm])))
    if pd_shift_mm or pd_tilt_deg:
        centre = (0.0, -45.0, 38.0)
        patella = patella.compose(Frame(np.eye(3), np.array([-pd_shift_mm, 0.0, 0.0])))
        patella = patella.compose(Frame.about(centre, "w", -pd_tilt_deg))
    return {"femur": femur, "tibia": tibia, "patella": patella}


def _femur(F: Frame) -> tuple[Shape, Shape, Shape]:
    """Distal femur, the clip of its articular cartilage and the intercondylar notch."""
    shaft = Rod(F.point((0, 2, 40)), F.point((0, 2, 320)), 14.0)
    metaphysis = Ellipsoid((0, 4, 40), (34, 19, 30), F)
    med_condyle = Ellipsoid((21, 6, 26.5), (14, 30, 24), F)
    lat_condyle = Ellipsoid((-21, 5, 27), (14, 28, 24.5), F)
    med_facet = Ellipsoid((10, -10, 36), (20, 17, 22), F)
    lat_facet = Ellipsoid((-10, -10, 37), (22, 19, 23), F)
    med_epicondyle = Ellipsoid((35, 6, 34), (6, 9, 9), F)
    lat_epicondyle = Ellipsoid((-35, 6, 32), (5, 9, 9), F)
    notch = Box((0, 14, 8), (9, 26, 14), rounding=3.0, frame=F.compose(Frame.about((0, 14, 8), "u", 35)))
    groove = Rod(F.point((0, -36, 10)), F.point((0, -39, 65)), 10.0)
    body = Union(shaft, metaphysis, med_condyle, lat_condyle, med_facet, lat_facet, med_epicondyle,
                 lat_epicondyle, k=6.0)
    femur = Difference(body, notch, groove, k=2.0)
    articular = Intersection(
        Difference(Union(Offset(med_condyle, 4), Offset(lat_condyle, 4), Offset(med_facet, 4), Offset(lat_facet, 4)),
                   Offset(notch, -1.0)),
        HalfSpace(F.point((0, 0, 50)), F.direction((0, 0, 1))),
        # the outer (epicondylar) walls of the condyles carry no cartilage
        HalfSpace(F.point((31, 0, 0)), F.direction((1, 0, 0))),
        HalfSpace(F.point((-31, 0, 0)), F.direction((-1, 0, 0))),
        # no cartilage on the posterior-superior non-articular metaphysis
        HalfSpace(F.point((0, 0, 40)), F.direction((0, 0.6, 0.8))),
    )
    return femur, articular, notch


def _tibia(T: Frame, slope_deg: float) -> tuple[Shape, Shape]:
    """Proximal tibia (sloped plateau, spines, tuberosity, shaft) and its cartilage clip."""
    slope = np.deg2rad(slope_deg)
    # one tapering body from the plateau rim into the shaft: a tall ellipsoid cut by the sloped plateau plane
    plateau = Intersection(Ellipsoid((0, 3, -3), (38, 26, 62), T),
                           HalfSpace(T.point((0, 0, -3)), T.direction((0, np.sin(slope), np.cos(slope)))))
    spines = Union(Ellipsoid((5, 2, -3), (4, 8, 5.5), T), Ellipsoid((-5, 3, -3), (4, 8, 5.0), T))
    shaft = Rod(T.point((0, 3, -25)), T.point((0, 3, -320)), 14.0)
    tuberosity = Ellipsoid((0, -20, -32), (12, 8, 14), T)
    tibia = Union(plateau, spines, shaft, tuberosity, k=8.0)
    articular = Union(Ellipsoid((20, 3, -3), (17, 23, 7), T), Ellipsoid((-20, 3, -3), (16, 21, 7), T))
    return tibia, articular


def _fibula(T: Frame) -> Shape:
    head = Ellipsoid((-33, 17, -24), (10, 10, 11), T)
    shaft = Rod(T.point((-33, 18, -28)), T.point((-35, 20, -320)), 7.0)
    return Union(head, shaft, k=5.0)


def _patella(P: Frame) -> tuple[Shape, Shape]:
    body = Union(Ellipsoid((0, -45, 38), (22, 10, 20), P), Ellipsoid((0, -37, 39), (6, 4, 13), P), k=3.0)
    articular = Intersection(HalfSpace(P.point((0, -41, 0)), P.direction((0, -1, 0))),
                             HalfSpace(P.point((0, 0, 27)), P.direction((0, 0, -1))))
    return body, articular


def _meniscus_frame(T: Frame, center: tuple[float, float, float], slope_deg: float) -> Frame:
    """A meniscus lies on the sloped plateau: its base plane follows the posterior slope."""
    return T.compose(Frame.about((0, 0, -3), "u", -slope_deg)).compose(Frame(np.eye(3), np.array(center)))


def medial_meniscus(T: Frame, slope_deg: float = 7.0, size: float = 1.0) -> Ring:
    """Larger, open C (gap toward the intercondylar area, i.e. lateral = 180 degrees)."""
    return Ring((0, 0, 0), (13.5 * size, 22.0 * size), inner=0.45, height=6.0 * size, edge=0.5, gap_center_deg=180.0,
                gap_half_deg=40.0, frame=_meniscus_frame(T, (20.0, 3.0, -0.6), slope_deg))


def lateral_meniscus(T: Frame, slope_deg: float = 7.0, size: float = 1.0) -> Ring:
    """Smaller, nearly circular C (narrow gap toward the midline = 0 degrees)."""
    return Ring((0, 0, 0), (13.0 * size, 16.0 * size), inner=0.40, height=5.5 * size, edge=0.5, gap_center_deg=0.0,
                gap_half_deg=18.0, frame=_meniscus_frame(T, (-20.0, 4.0, -0.6), slope_deg))


class MeniscalTear(Shape):
    """A TEAR line in a meniscus: a thin sheet cut by a line of the radial-height plane.

    The line passes through (normalised radius ``rc``, height ``wc`` mm) at ``angle_deg`` from
    the horizontal (0: horizontal cleavage tear, reaching the free inner edge; 90: vertical
    longitudinal tear, reaching both surfaces; 45: oblique tear, reaching the inferior
    surface), is ``thickness`` mm thick and covers the arc ``center_deg +- half_deg`` of the
    ring (90 degrees is the posterior horn).  Horizontal tears reach from the free edge to
    ``rc``; the ring itself bounds all kinds, so every line meets an articular surface or the
    free edge.
    """

    def __init__(self, ring: Ring, angle_deg: float, rc: float, wc: float, thickness: float,
                 center_deg: float, half_deg: float):
        self.ring = ring
        self.phi = np.deg2rad(angle_deg)
        self.rc, self.wc, self.t = float(rc), float(wc), float(thickness)
        self.center, self.half = float(center_deg), float(half_deg)
        self.horizontal = angle_deg < 10
        self.lo, self.hi = ring.lo, ring.hi

    def sdf(self, p: np.ndarray) -> np.ndarray:
        ang, rn, w = self.ring.polar(p)
        scale = np.float32(min(self.ring.a, self.ring.b))
        dr = (rn - np.float32(self.rc)) * scale
        dist = np.abs(-dr * np.float32(np.sin(self.phi)) + (w - np.float32(self.wc)) * np.float32(np.cos(self.phi)))
        d = np.maximum(self.ring.sdf(p), dist - np.float32(self.t / 2))
        if self.horizontal:
            d = np.maximum(d, dr)
        off = np.abs((ang - np.float32(self.center) + 180) % 360 - 180)
        return np.maximum(d, (off - np.float32(self.half)) * np.float32(np.pi / 180) * rn * scale)


def meniscal_tear(ring: Ring, severity: float, kind: float, center_deg: float) -> MeniscalTear:
    """The tear of a meniscus for a severity: longer and wider line as severity grows.

    ``kind`` < 1 horizontal, < 2 oblique, else vertical longitudinal (peripheral third).
    """
    s = severity
    thickness = 0.6 + 1.2 * s
    half = 12.0 + 30.0 * s
    if kind < 1:
        return MeniscalTear(ring, 0.0, rc=0.6 + 0.3 * s, wc=2.0, thickness=thickness, center_deg=center_deg, half_deg=half)
    if kind < 2:
        return MeniscalTear(ring, 40.0, rc=0.7, wc=1.5, thickness=thickness, center_deg=center_deg, half_deg=half)
    return MeniscalTear(ring, 90.0, rc=0.78, wc=2.0, thickness=thickness, center_deg=center_deg, half_deg=half)


def _param(spec: CaseSpec, key: str) -> float:
    try:
        return float(spec.params[key])
    except KeyError:
        raise KeyError(f"knee case {spec.case_id!r}: spec.params lacks {key!r} (draw it with sample_case)") from None


def build_knee(spec: CaseSpec) -> LayeredModel:
    """The knee of one case; every random choice is already in ``spec.params``/``spec.severity``."""
    sev = {k: float(spec.severity.get(k, 0.0)) if spec.labels.get(k) else 0.0 for k in spec.labels}
    flex = _param(spec, "flexion_deg")
    s_pd = sev.get("pd", 0.0)
    fr = knee_frames(flex, pd_shift_mm=(4.0 + 10.0 * s_pd) if s_pd else 0.0, pd_tilt_deg=(6.0 + 12.0 * s_pd) if s_pd else 0.0,
                     patella_height_mm=_param(spec, "patella_height_mm"))
    slope = _param(spec, "tibial_slope_deg")
    meniscus_size = _param(spec, "meniscus_size")
    F, T, P = fr["femur"], fr["tibia"], fr["patella"]
    scale = _param(spec, "scale")
    fat_mm = _param(spec, "fat_mm") / scale
    s_eff = sev.get("effusion", 0.0)
    # a positive effusion always exceeds the largest physiological amount (1.2 mm), so that
    # even a subtle positive differs from a negative in the image
    film = _param(spec, "physio_fluid_mm") + (0.5 + 3.0 * s_eff if s_eff else 0.0)

    femur, femur_articular, _notch = _femur(F)
    tibia, tibia_articular = _tibia(T, slope)
    fibula = _fibula(T)
    patella, patella_articular = _patella(P)
    capsule = Union(Ellipsoid((0, 4, 24), (50, 44, 44), F), Ellipsoid((0, 3, -2), (46, 34, 12), T))
    mm, lm = medial_meniscus(T, slope, meniscus_size), lateral_meniscus(T, slope, meniscus_size)

    layers: list[Layer] = []
    # --- envelope: skin and subcutaneous fat over a core of muscles and intermuscular fat
    thigh = Limb((0, 0, 0), (50, 58), w0=-10, w1=400, taper=0.0015, frame=F)
    calf = Limb((0, 0, 0), (50, 58), w0=-400, w1=10, taper=-0.0004, frame=T)
    core = Union(thigh, calf, k=8.0)
    layers.append(Layer("envelope", Offset(core, fat_mm + SKIN_MM), [
        Band(Tissue.SKIN, 0, -SKIN_MM, 0.0), Band(Tissue.FAT, 0, -INF, -SKIN_MM)]))
    muscles = [
        Ellipsoid((28, -14, 75), (22, 22, 50), F),  # vastus medialis (obliquus distally)
        Ellipsoid((-30, -8, 100), (20, 22, 65), F),  # vastus lateralis
        Ellipsoid((0, -26, 125), (26, 14, 70), F),  # vastus intermedius / rectus femoris
        Ellipsoid((26, 32, 70), (15, 16, 70), F),  # semimembranosus
        Ellipsoid((-30, 30, 75), (15, 15, 70), F),  # biceps femoris
        Ellipsoid((20, 38, -55), (19, 17, 75), T),  # medial gastrocnemius head
        Ellipsoid((-20, 36, -50), (16, 15, 65), T),  # lateral gastrocnemius head
        Ellipsoid((3, 26, -32), (24, 6, 12), T),  # popliteus
        Ellipsoid((0, 26, -140), (30, 14, 90), T),  # soleus
        Ellipsoid((-22, -10, -120), (12, 13, 85), T),  # tibialis anterior
        Ellipsoid((-38, 8, -130), (9, 12, 80), T),  # peronei
    ]
    # one layer per muscle: the bricks cull each on its own box
    layers += [Layer(f"muscle_{i}", m, solid(Tissue.MUSCLE)) for i, m in enumerate(muscles)]
    layers.append(Layer("popliteal_artery", Rod(F.point((3, 44, 110)), T.point((1, 42, -90)), 3.5), solid(Tissue.VESSEL)))
    layers.append(Layer("popliteal_vein", Rod(F.point((-3, 50, 110)), T.point((-3, 48, -90)), 4.5), solid(Tissue.VESSEL)))

    # --- joint fluid: suprapatellar recess (distended by effusion) and films on the articular surfaces
    h = _param(spec, "physio_fluid_mm") + (1.0 + 8.0 * s_eff if s_eff else 0.0)
    recess = Ellipsoid((0, -14.0 - h, 58 + 8 * s_eff), (24 + 8 * s_eff, h, 20 + 12 * s_eff), F)
    layers.append(Layer("suprapatellar_recess", recess, solid(Tissue.FLUID, never_over=HARD)))
    if s_eff > 0:
        for side in (1.0, -1.0):  # posterior condylar recesses
            layers.append(Layer(f"posterior_recess_{side:+.0f}", Ellipsoid((21 * side, 37, 28), (9 + 3 * s_eff, 1 + 4 * s_eff, 13), F),
                                solid(Tissue.FLUID, never_over=HARD)))
    layers.append(Layer("hoffa_fat_pad", Ellipsoid((0, -24, 9), (20, 8, 12), T), solid(Tissue.FAT)))

    # --- bones with cartilage and fluid films
    femur_bands = bone(S["femur"], CORTEX_MM, fluid_mm=2.2 + film, fluid_clip=Offset(femur_articular, 1.0),
                       cartilage_mm=2.2, cartilage_structure=S["femoral_cartilage"], cartilage_clip=femur_articular)
    if s_eff:  # effusion also fills the capsule around the condyles and the notch
        femur_bands.insert(0, Band(Tissue.FLUID, 0, 0.0, 1.0 + 4.0 * s_eff, never_over=HARD, clip=capsule))
    layers.append(Layer("femur", femur, femur_bands))
    layers.append(Layer("tibia", tibia, bone(S["tibia"], CORTEX_MM, fluid_mm=3.0 + film, fluid_clip=Offset(tibia_articular, 1.0),
                                             cartilage_mm=2.5, cartilage_structure=S["tibial_cartilage"],
                                             cartilage_clip=tibia_articular)))
    layers.append(Layer("fibula", fibula, bone(S["fibula"], CORTEX_MM)))
    layers.append(Layer("patella", patella, bone(S["patella"], CORTEX_MM, fluid_mm=3.0 + film, fluid_clip=Offset(patella_articular, 1.0),
                                                 cartilage_mm=3.0, cartilage_structure=S["patellar_cartilage"],
                                                 cartilage_clip=patella_articular)))

    # --- bone bruises (marrow edema painted only over marrow; the bone keeps its structure)
    # physeal scars: thin dark lines across the epiphyses where the growth plates closed
    scars = (Intersection(HalfSpace(F.point((0, 0, 44.5)), F.direction((0, 0.35, 1))),
                          HalfSpace(F.point((0, 0, 43.7)), F.direction((0, -0.35, -1)))),
             Intersection(HalfSpace(T.point((0, 0, -20)), T.direction((0, 0, 1))),
                          HalfSpace(T.point((0, 0, -20.8)), T.direction((0, 0, -1)))))
    for i, scar in enumerate(scars):
        layers.append(Layer(f"physeal_scar_{i}", Intersection(femur if i == 0 else tibia, scar),
                            [Band(Tissue.CORTEX, None, only_over=frozenset({Tissue.MARROW}))]))

    bruises: list[Shape] = []
    s_acl = sev.get("acl", 0.0)
    if s_acl and _param(spec, "acl_bruise") >= 0.5:  # pivot-shift pattern
        bruises.append(Ellipsoid((-24, -4, 8), (7 + 6 * s_acl, 9 + 8 * s_acl, 5 + 5 * s_acl), F))
        bruises.append(Ellipsoid((-24, 20, -7), (7 + 5 * s_acl, 7 + 5 * s_acl, 6 + 4 * s_acl), T))
    if s_pd:  # impaction of the medial patellar facet on the lateral femoral condyle
        bruises.append(Ellipsoid((12, -38, 38), (9 + 4 * s_pd, 5 + 3 * s_pd, 10 + 4 * s_pd), P))
        bruises.append(Ellipsoid((-26, -16, 14), (8 + 5 * s_pd, 8 + 4 * s_pd, 8 + 5 * s_pd), F))
    for i, b in enumerate(bruises):
        layers.append(Layer(f"bone_bruise_{i}", b, [Band(Tissue.MARROW_EDEMA, None, only_over=frozenset({Tissue.MARROW}))]))

    # --- menisci and their tears
    layers.append(Layer("medial_meniscus", mm, solid(Tissue.FIBROCARTILAGE, S["medial_meniscus"], never_over=BONE)))
    layers.append(Layer("lateral_meniscus", lm, solid(Tissue.FIBROCARTILAGE, S["lateral_meniscus"], never_over=BONE)))
    for key, ring in (("mm", mm), ("lm", lm)):
        if sev.get(key):
            tear = meniscal_tear(ring, sev[key], _param(spec, f"{key}_tear_kind"),
                                 _param(spec, f"{key}_tear_center_deg"))
            layers.append(Layer(f"{key}_tear", tear, [Band(Tissue.TEAR, None, only_over=frozenset({Tissue.FIBROCARTILAGE}))]))

    # --- ligaments and tendons
    acl = Rod(F.point((-9, 18, 15)), T.point((3, -7, -1.5)), 5.5, 5.0, flat=0.7, wide=(1, 0, 0))
    pcl = Rod(F.point((9, 4, 18)), T.point((0, 25, -9)), 6.0, 5.5, flat=0.8, wide=(1, 0, 0))
    mcl = Rod(F.point((41, 6, 34)), T.point((39, -2, -55)), 12.0, 11.0, flat=0.2, wide=(0, 1, 0))
    lcl = Rod(F.point((-38, 8, 32)), T.point((-36, 16, -14)), 3.0)
    layers += fibre_layers("acl", acl, S["acl"], s_acl, "rupture", at=_param(spec, "acl_tear_at"),
                           deep=(1, 0, 0), sag=T.direction((0, -3, -4)))
    layers += fibre_layers("pcl", pcl, S["pcl"], sev.get("pcl", 0.0), "rupture", at=_param(spec, "pcl_tear_at"),
                           deep=(0, 1, 0))
    layers += fibre_layers("mcl", mcl, 0, sev.get("mcl", 0.0), "sprain", at=_param(spec, "mcl_tear_at"),
                           deep=(-1, 0, 0))
    layers += fibre_layers("lcl", lcl, 0, sev.get("lcl", 0.0), "sprain", at=_param(spec, "lcl_tear_at"),
                           deep=(1, 0, 0))
    patellar_tendon = Rod(P.point((0, -46, 20)), T.point((0, -27, -38)), 12.0, 11.0, flat=0.3, wide=(1, 0, 0))
    quadriceps_tendon = Rod(P.point((0, -47, 56)), F.point((0, -36, 110)), 13.0, 14.0, flat=0.3, wide=(1, 0, 0))
    mpfl = Rod(P.point((21, -42, 42)), F.point((38, 6, 48)), 7.0, 5.0, flat=0.2, wide=(0, 0, 1))
    lateral_retinaculum = Rod(P.point((-21, -42, 38)), F.point((-38, 2, 36)), 7.0, 5.0, flat=0.2, wide=(0, 0, 1))
    layers += fibre_layers("patellar_tendon", patellar_tendon)
    layers += fibre_layers("quadriceps_tendon", quadriceps_tendon)
    layers += fibre_layers("mpfl", mpfl, 0, s_pd, "sprain", at=_param(spec, "mpfl_tear_at"), deep=(0, 1, 0))
    layers += fibre_layers("lateral_retinaculum", lateral_retinaculum)
    # iliotibial band to Gerdy's tubercle, popliteus tendon from its femoral groove, the
    # semimembranosus tendon to the posteromedial tibia
    itb = Rod(F.point((-46, -2, 110)), T.point((-30, -14, -24)), 11.0, 8.0, flat=0.2, wide=(0, 1, 0))
    popliteus_tendon = Rod(F.point((-36, 12, 18)), T.point((-22, 28, -20)), 2.5)
    semimembranosus_tendon = Rod(F.point((27, 34, 40)), T.point((30, 18, -14)), 3.5)
    for name, rod in (("itb", itb), ("popliteus_tendon", popliteus_tendon), ("semimembranosus_tendon", semimembranosus_tendon)):
        layers += fibre_layers(name, rod)

    R = rotation("w", _param(spec, "rot_w_deg")) @ rotation("v", _param(spec, "rot_v_deg")) \
        @ rotation("u", _param(spec, "rot_u_deg"))
    side = 1.0 if spec.laterality == "L" else -1.0
    center = np.array([side * _param(spec, "offset_x_mm"), _param(spec, "offset_y_mm"),
                       _param(spec, "offset_z_mm")])
    extent = np.array([150.0, 150.0, 180.0]) * scale
    return LayeredModel("knee", spec.laterality, center, R, layers, extent, scale=scale)
