"""Implicit-shape primitives, their combinations and the layered tissue painter of the phantoms.

Why one module of about 890 lines: the primitives, their combinations and the layered tissue
painter are one small implicit-geometry library; the anatomy of each joint builds on all of it.

Every anatomical part is a :class:`Shape`: a function returning an approximate signed distance
(mm, negative inside) for points of the *joint frame* (``u`` toward the patient's midline, i.e.
medial for a limb, ``v`` posterior, ``w`` superior; see :class:`LayeredModel`).  The distances
are exact for spheres, capsules and half-spaces and conservative (never larger than the true
distance, up to the ellipsoid approximation) elsewhere, so thin shells (cortex, cartilage,
fluid films) can be cut as bands of the distance.

A joint model is an ordered list of :class:`Layer` objects painted like a painter paints: each
later layer overwrites the tissue (and structure) of the points it covers, subject to its
``only_over`` / ``never_over`` rules (a bone bruise is painted *only over* marrow; a ligament is
*never* painted over bone).  That keeps every model a readable recipe of the anatomy.

Speed matters (tens of millions of points per case).  Every shape knows its axis-aligned box
in the joint frame.  The painter sorts the points into 8 mm bricks and evaluates each layer
once per brick centre: bricks that the distance proves to lie wholly outside the layer, or
wholly inside one of its bands, are skipped or painted at once, and only bricks crossed by a
surface are evaluated point by point.  For that proof every distance must be a lower bound
of the true one; composite shapes evaluate a member exactly within the *reach* the layers
need (:meth:`Shape.set_reach`) and report a lower bound beyond it.  The result equals a
point-by-point evaluation (tested).  All arithmetic is float32 and vectorised.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from training.phantoms.anatomy import Tissue

F32 = np.float32
INF = float("inf")


def _vec(value: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be 3 finite numbers, got {value!r}")
    return arr


def rotation(axis: str | Sequence[float], degrees: float) -> np.ndarray:
    """3x3 right-handed rotation by ``degrees`` about ``axis`` ('u', 'v', 'w' or a vector)."""
    if isinstance(axis, str):
        try:
            a = np.eye(3)["uvw".index(axis)]
        except ValueError:
            raise ValueError(f"axis must be 'u', 'v', 'w' or a 3-vector, got {axis!r}") from None
    else:
        a = _vec(axis, "axis")
        n = np.linalg.norm(a)
        if n == 0:
            raise ValueError("axis must not be the zero vector")
        a = a / n
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


@dataclass(frozen=True)
class Frame:
    """A rigid placement: ``parent = origin + R @ local`` (columns of ``R`` = local axes)."""

    R: np.ndarray = field(default_factory=lambda: np.eye(3))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @staticmethod
    def about(pivot: Sequence[float], axis: str | Sequence[float], degrees: float) -> "Frame":
        """The frame obtained by rotating the parent about ``pivot`` (a point) and ``axis``."""
        r = rotation(axis, degrees)
        p = _vec(pivot, "pivot")
        return Frame(r, p - r @ p)

    def compose(self, inner: "Frame") -> "Frame":
        """``inner`` placed inside this frame, as a frame of this frame's parent."""
        return Frame(self.R @ inner.R, self.origin + self.R @ inner.origin)

    def point(self, local: Sequence[float]) -> np.ndarray:
        """A local point in parent coordinates."""
        return self.origin + self.R @ _vec(local, "point")

    def direction(self, local: Sequence[float]) -> np.ndarray:
        return self.R @ _vec(local, "direction")

    def to_local(self, p: np.ndarray) -> np.ndarray:
        """(N, 3) parent points into local coordinates (float32)."""
        return _affine(p, self.origin, self.R)


def _affine(p: np.ndarray, origin: np.ndarray, R: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """``((p - origin) * scale) @ R`` for (N, 3) float32 points, column by column.

    numpy's matmul with a 3-wide inner dimension is an order of magnitude slower than these
    three fused multiply-adds (it does not reach BLAS for such shapes).
    """
    o = np.asarray(origin, dtype=F32)
    cols = [p[:, i] - o[i] for i in range(3)]
    if scale is not None:
        cols = [c * F32(scale[i]) for i, c in enumerate(cols)]
    out = np.empty((len(p), 3), dtype=F32)
    for j in range(3):
        out[:, j] = cols[0] * F32(R[0, j]) + cols[1] * F32(R[1, j]) + cols[2] * F32(R[2, j])
    return out


IDENTITY = Frame()


def _in_box(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of ``p`` inside the closed box ``lo``..``hi`` (infinite bounds allowed)."""
    m = np.ones(len(p), dtype=bool)
    for a in range(3):
        if np.isfinite(lo[a]):
            m &= p[:, a] >= F32(lo[a])
        if np.isfinite(hi[a]):
            m &= p[:, a] <= F32(hi[a])
    return m


def _box_of_local(frame: Frame, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = corners @ frame.R.T + frame.origin
    return world.min(axis=0), world.max(axis=0)


class Shape:
    """An implicit solid: ``sdf(points) < 0`` inside.  ``lo``/``hi``: its box in the parent frame."""

    lo: np.ndarray
    hi: np.ndarray
    #: how far outside this shape its distance must be exact (set by the layers and wrappers
    #: that use it: a fluid film 3 mm thick needs exact distances up to 3 mm); composite
    #: shapes evaluate a member exactly within this reach of its box and bound it beyond
    reach: float = 0.0

    def sdf(self, p: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def children(self) -> tuple[tuple["Shape", float], ...]:
        """Members whose distances this shape uses, each with the extra reach it needs of them."""
        return ()

    def set_reach(self, reach: float) -> None:
        """Require exact distances up to ``reach`` mm outside (only ever grows)."""
        self.reach = max(self.reach, float(reach))
        for child, extra in self.children():
            child.set_reach(self.reach + extra)

    def in_box(self, p: np.ndarray, margin: float = 0.0) -> np.ndarray:
        return _in_box(p, self.lo - margin, self.hi + margin)

    def box_distance(self, p: np.ndarray) -> np.ndarray:
        """Distance from the points to the shape's box: a lower bound of the distance to the shape.

        Composite shapes use it for members they skip, so that a skipped member still reports
        a distance that never overstates the truth (the brick culling relies on that).
        """
        acc = np.zeros(len(p), dtype=F32)
        for a in range(3):
            excess = np.zeros(len(p), dtype=F32)
            if np.isfinite(self.lo[a]):
                excess = np.maximum(excess, F32(self.lo[a]) - p[:, a])
            if np.isfinite(self.hi[a]):
                excess = np.maximum(excess, p[:, a] - F32(self.hi[a]))
            acc += excess * excess
        return np.sqrt(acc)


class Ellipsoid(Shape):
    """Axis-aligned (in ``frame``) ellipsoid; distance after the Quilez first-order bound."""

    def __init__(self, center: Sequence[float], radii: Sequence[float], frame: Frame = IDENTITY):
        self.r = _vec(radii, "radii")
        if np.any(self.r <= 0):
            raise ValueError(f"radii must be positive, got {radii!r}")
        self.frame = frame.compose(Frame(np.eye(3), _vec(center, "center")))
        self.lo, self.hi = _box_of_local(self.frame, -self.r, self.r)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        q = self.frame.to_local(p)
        a = [q[:, i] * F32(1.0 / self.r[i]) for i in range(3)]
        k0 = np.sqrt(a[0] * a[0] + a[1] * a[1] + a[2] * a[2])
        b = [a[i] * F32(1.0 / self.r[i]) for i in range(3)]
        k1 = np.sqrt(b[0] * b[0] + b[1] * b[1] + b[2] * b[2])
        return np.where(k1 > 0, k0 * (k0 - 1) / np.maximum(k1, F32(1e-12)), -F32(self.r.min()))


class Rod(Shape):
    """A capsule from ``p0`` to ``p1`` with elliptical, optionally tapering cross-section.

    ``r0``/``r1`` are the semi-axes along ``wide`` at the two ends (``wide`` is projected to be
    perpendicular to the rod) and ``r0 * flat``/``r1 * flat`` the semi-axes across it: a round
    tendon has ``flat = 1``, a flat band-like ligament (MCL) ``flat`` around 0.2.  The
    distance is exact for the round case and scaled for the flat one.  :meth:`along` gives the
    normalised position (0 at ``p0``, 1 at ``p1``) used to cut gaps out of torn fibres.
    """

    def __init__(self, p0: Sequence[float], p1: Sequence[float], r0: float, r1: float | None = None,
                 flat: float = 1.0, wide: Sequence[float] = (0.0, 0.0, 1.0)):
        self.p0 = _vec(p0, "p0")
        self.p1 = _vec(p1, "p1")
        axis = self.p1 - self.p0
        self.length = float(np.linalg.norm(axis))
        if self.length <= 0:
            raise ValueError("rod end points p0 and p1 must differ")
        r1 = r0 if r1 is None else r1
        if r0 <= 0 or r1 <= 0 or not 0 < flat <= 1:
            raise ValueError(f"rod radii must be positive and 0 < flat <= 1, got r0={r0}, r1={r1}, flat={flat}")
        self.r0, self.r1, self.flat = float(r0), float(r1), float(flat)
        ez = axis / self.length
        ex = _vec(wide, "wide")
        ex = ex - ez * (ex @ ez)
        if np.linalg.norm(ex) < 1e-6:  # 'wide' along the rod: any perpendicular will do
            ex = np.cross(ez, [1.0, 0.0, 0.0])
            if np.linalg.norm(ex) < 1e-6:
                ex = np.cross(ez, [0.0, 1.0, 0.0])
        ex = ex / np.linalg.norm(ex)
        ey = np.cross(ez, ex)
        self.frame = Frame(np.stack([ex, ey, ez], axis=1), self.p0)
        rmax = max(r0, r1)
        self.lo = np.minimum(self.p0, self.p1) - rmax
        self.hi = np.maximum(self.p0, self.p1) + rmax

    def along(self, p: np.ndarray) -> np.ndarray:
        q = self.frame.to_local(p)
        return q[:, 2] / F32(self.length)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        q = self.frame.to_local(p)
        t = np.clip(q[:, 2] / F32(self.length), 0, 1)
        r = F32(self.r0) + (F32(self.r1) - F32(self.r0)) * t
        dz = q[:, 2] - t * F32(self.length)
        # scale the thin direction so the cross-section becomes a circle of radius r
        dy = q[:, 1] / F32(self.flat)
        d = np.sqrt(q[:, 0] ** 2 + dy**2 + dz**2) - r
        return d * F32(self.flat) if self.flat < 1 else d


class Box(Shape):
    """Rounded box with half sizes ``half`` (including the rounding radius) in ``frame``."""

    def __init__(self, center: Sequence[float], half: Sequence[float], rounding: float = 0.0,
                 frame: Frame = IDENTITY):
        self.half = _vec(half, "half")
        if np.any(self.half <= 0) or rounding < 0 or rounding > self.half.min():
            raise ValueError(f"box half sizes must be positive and rounding in [0, min(half)], "
                             f"got half={half!r}, rounding={rounding}")
        self.rounding = float(rounding)
        self.frame = frame.compose(Frame(np.eye(3), _vec(center, "center")))
        self.lo, self.hi = _box_of_local(self.frame, -self.half, self.half)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        q = np.abs(self.frame.to_local(p)) - (self.half - self.rounding).astype(F32)
        outside = np.sqrt(np.einsum("ij,ij->i", np.maximum(q, 0), np.maximum(q, 0)))
        inside = np.minimum(q.max(axis=1), 0)
        return outside + inside - F32(self.rounding)


class HalfSpace(Shape):
    """Points with ``(p - point) . normal < 0``: the side opposite the normal.  Unbounded."""

    def __init__(self, point: Sequence[float], normal: Sequence[float]):
        n = _vec(normal, "normal")
        self.n = n / np.linalg.norm(n)
        self.point = _vec(point, "point")
        self.lo = np.full(3, -np.inf)
        self.hi = np.full(3, np.inf)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        n = self.n.astype(F32)
        o = self.point.astype(F32)
        return (p[:, 0] - o[0]) * n[0] + (p[:, 1] - o[1]) * n[1] + (p[:, 2] - o[2]) * n[2]


class Limb(Shape):
    """An elliptic cylinder along the local ``w`` axis whose semi-axes change linearly with w.

    Used for the outer contour of thigh, calf, leg and arm: ``radii`` at ``w = 0`` and a
    relative ``taper`` per mm (positive: thicker upward), from ``w0`` to ``w1``.
    """

    def __init__(self, center: Sequence[float], radii: tuple[float, float], w0: float, w1: float,
                 taper: float = 0.0, frame: Frame = IDENTITY):
        if radii[0] <= 0 or radii[1] <= 0 or w1 <= w0:
            raise ValueError(f"limb radii must be positive and w0 < w1, got radii={radii}, w0={w0}, w1={w1}")
        self.a, self.b, self.w0, self.w1, self.taper = float(radii[0]), float(radii[1]), float(w0), float(w1), float(taper)
        self.frame = frame.compose(Frame(np.eye(3), _vec(center, "center")))
        smax = max(1 + taper * w0, 1 + taper * w1)
        if min(1 + taper * w0, 1 + taper * w1) <= 0:
            raise ValueError("limb taper makes a radius non-positive inside [w0, w1]")
        r = np.array([self.a * smax, self.b * smax, 0])
        self.lo, self.hi = _box_of_local(self.frame, np.array([-r[0], -r[1], w0]), np.array([r[0], r[1], w1]))

    def sdf(self, p: np.ndarray) -> np.ndarray:
        q = self.frame.to_local(p)
        s = F32(1) + F32(self.taper) * q[:, 2]
        a = F32(self.a) * s
        b = F32(self.b) * s
        k = np.sqrt((q[:, 0] / a) ** 2 + (q[:, 1] / b) ** 2)
        radial = (k - 1) * np.minimum(a, b)
        axial = np.maximum(F32(self.w0) - q[:, 2], q[:, 2] - F32(self.w1))
        return np.maximum(radial, axial)


class Ring(Shape):
    """An open or closed ring (C shape) around the local ``w`` axis: menisci and labrum.

    The ring's outer rim is the ellipse with semi-axes ``radii`` (local u, v); its cross-section
    (in the radial-w plane) spans the normalised radius ``inner`` .. 1.  ``profile='wedge'``
    gives the meniscal wedge: a flat base at w = 0 and a top falling linearly from ``height`` at
    the rim to ``edge`` at the free inner edge.  ``profile='round'`` gives a round-ish cord of
    thickness ``height`` centred at mid-radius (labrum).  ``gap_center_deg``/``gap_half_deg``
    remove an arc (angle measured in the local u-v plane from +u toward +v); ``gap_half_deg=0``
    closes the ring.  :meth:`polar` returns (angle in degrees, normalised radius, w) per point
    for cutting tears.
    """

    def __init__(self, center: Sequence[float], radii: tuple[float, float], inner: float, height: float,
                 edge: float = 0.5, profile: str = "wedge", gap_center_deg: float = 180.0,
                 gap_half_deg: float = 0.0, frame: Frame = IDENTITY):
        if profile not in ("wedge", "round"):
            raise ValueError(f"profile must be 'wedge' or 'round', got {profile!r}")
        if not 0 < inner < 1 or height <= 0 or radii[0] <= 0 or radii[1] <= 0:
            raise ValueError(f"ring needs 0 < inner < 1 and positive height/radii, got inner={inner}, "
                             f"height={height}, radii={radii}")
        self.a, self.b = float(radii[0]), float(radii[1])
        self.inner, self.height, self.edge, self.profile = float(inner), float(height), float(edge), profile
        self.gap_center, self.gap_half = float(gap_center_deg), float(gap_half_deg)
        self.frame = frame.compose(Frame(np.eye(3), _vec(center, "center")))
        h = height if profile == "wedge" else height / 2
        lo_w = 0.0 if profile == "wedge" else -h
        self.lo, self.hi = _box_of_local(self.frame, np.array([-self.a, -self.b, lo_w]), np.array([self.a, self.b, h]))

    def polar(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = self.frame.to_local(p)
        ang = np.degrees(np.arctan2(q[:, 1], q[:, 0]))
        rn = np.sqrt((q[:, 0] / F32(self.a)) ** 2 + (q[:, 1] / F32(self.b)) ** 2)
        return ang.astype(F32), rn, q[:, 2]

    def sdf(self, p: np.ndarray) -> np.ndarray:
        ang, rn, w = self.polar(p)
        scale = F32(min(self.a, self.b))
        radial = np.maximum(rn - 1, F32(self.inner) - rn) * scale
        if self.profile == "wedge":
            frac = np.clip((rn - F32(self.inner)) / F32(1 - self.inner), 0, 1)
            top = F32(self.edge) + (F32(self.height) - F32(self.edge)) * frac
            # the sloping top: vertical distance times the cosine of the slope is the normal distance
            rise = (self.height - self.edge) / ((1 - self.inner) * float(scale))
            d = np.maximum(radial, np.maximum(-w, (w - top) * F32(1 / np.sqrt(1 + rise * rise))))
        else:
            mid = F32((1 + self.inner) / 2)
            half_w = F32((1 - self.inner) / 2)
            # elliptical cord: (radial offset / half width)^2 + (w / half height)^2 <= 1
            k = np.sqrt(((rn - mid) / half_w) ** 2 + (w / F32(self.height / 2)) ** 2)
            d = (k - 1) * min(F32(self.height / 2), half_w * scale)
        if self.gap_half > 0:
            d = np.maximum(d, self._gap(ang, rn, scale))
        return d

    def _gap(self, ang: np.ndarray, rn: np.ndarray, scale: F32) -> np.ndarray:
        off = np.abs((ang - F32(self.gap_center) + 180) % 360 - 180)
        # positive inside the removed arc: arc length to the gap border
        return (F32(self.gap_half) - off) * F32(np.pi / 180) * rn * scale


#: up to this many skipped points get their box distance; more get the constant margin
_BOX_DISTANCE_POINTS = 8192


def _skipped_distance(shape: Shape, p: np.ndarray, skipped: np.ndarray, margin: float) -> np.ndarray:
    """Distances for a composite's member, filled in only for the ``skipped`` points.

    A skipped point lies more than ``margin`` outside the member's box, so both its box
    distance and the constant ``margin`` are lower bounds of its true distance, and both
    exceed the reach inside which exact values matter.  Lower bounds keep the brick culling
    safe; the box distance (small arrays, i.e. brick centres) keeps it tight, the constant
    (large arrays of points) keeps it cheap.
    """
    out = np.empty(len(p), dtype=F32)
    n = int(np.count_nonzero(skipped))
    if n and n <= _BOX_DISTANCE_POINTS:
        out[skipped] = shape.box_distance(p[skipped])
    elif n:
        out[skipped] = F32(margin)
    return out


class Union(Shape):
    """Union of shapes, optionally smooth (``k`` mm blending radius, polynomial smooth minimum)."""

    def __init__(self, *children: Shape, k: float = 0.0):
        if not children:
            raise ValueError("Union needs at least one shape")
        self.members = children
        self.k = float(k)
        self.lo = np.min([c.lo for c in children], axis=0) - self.k
        self.hi = np.max([c.hi for c in children], axis=0) + self.k

    def children(self) -> tuple[tuple[Shape, float], ...]:
        return tuple((c, self.k) for c in self.members)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        d = None
        k = F32(self.k)
        # beyond this margin a member's box distance (>= margin) cannot change the result
        # inside the required reach, even through the smooth blend
        margin = self.reach + 2 * self.k + 1.0
        for c in self.members:
            inside = c.in_box(p, margin=margin)
            if inside.all():
                dc = c.sdf(p).astype(F32, copy=False)
            else:
                dc = _skipped_distance(c, p, ~inside, margin)
                if inside.any():
                    dc[inside] = c.sdf(p[inside])
            if d is None:
                d = dc
            elif self.k > 0:
                h = np.clip(F32(0.5) + F32(0.5) * (dc - d) / k, 0, 1)
                d = dc + (d - dc) * h - k * h * (1 - h)
            else:
                d = np.minimum(d, dc)
        return d


class Intersection(Shape):
    """Points inside every child."""

    def __init__(self, *children: Shape):
        if not children:
            raise ValueError("Intersection needs at least one shape")
        self.members = children
        self.lo = np.max([c.lo for c in children], axis=0)
        self.hi = np.min([c.hi for c in children], axis=0)

    def children(self) -> tuple[tuple[Shape, float], ...]:
        return tuple((c, 0.0) for c in self.members)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        d = self.members[0].sdf(p)
        for c in self.members[1:]:
            d = np.maximum(d, c.sdf(p))
        return d


class Difference(Shape):
    """``base`` minus the union of ``cuts`` (``k`` > 0 rounds the cut edges)."""

    def __init__(self, base: Shape, *cuts: Shape, k: float = 0.0):
        self.base, self.cuts, self.k = base, cuts, float(k)
        self.lo, self.hi = base.lo, base.hi

    def children(self) -> tuple[tuple[Shape, float], ...]:
        # inside the base, bands reach inward (cortex): the cut must be exact that deep too
        return ((self.base, self.k),) + tuple((c, self.k + 10.0) for c in self.cuts)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        d = self.base.sdf(p)
        margin = self.reach + 2 * self.k + 11.0
        for c in self.cuts:
            inside = c.in_box(p, margin=margin)
            if not inside.any() and self.k == 0:
                # outside the cut's box: the cut only matters through its (bounded) distance
                d = np.maximum(d, -_skipped_distance(c, p, ~inside, margin))
                continue
            dc = _skipped_distance(c, p, ~inside, margin)
            dc[inside] = c.sdf(p[inside])
            if self.k > 0:
                k = F32(self.k)
                h = np.clip(F32(0.5) - F32(0.5) * (d + dc) / k, 0, 1)
                d = d + (-dc - d) * h + k * h * (1 - h)
            else:
                d = np.maximum(d, -dc)
        return d


class Shell(Shape):
    """The band ``t0 < sdf(shape) <= t1`` as a solid (``t0 < 0`` reaches inside the shape)."""

    def __init__(self, shape: Shape, t0: float, t1: float):
        if not t1 > t0:
            raise ValueError(f"shell needs t1 > t0, got t0={t0}, t1={t1}")
        self.shape, self.t0, self.t1 = shape, float(t0), float(t1)
        self.lo, self.hi = shape.lo - max(t1, 0), shape.hi + max(t1, 0)

    def children(self) -> tuple[tuple[Shape, float], ...]:
        return ((self.shape, max(self.t1, 0.0)),)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        d = self.shape.sdf(p)
        return np.maximum(F32(self.t0) - d, d - F32(self.t1))


class Offset(Shape):
    """The shape grown by ``d`` mm (shrunk when negative)."""

    def __init__(self, shape: Shape, d: float):
        self.shape, self.d = shape, float(d)
        self.lo, self.hi = shape.lo - max(d, 0), shape.hi + max(d, 0)

    def children(self) -> tuple[tuple[Shape, float], ...]:
        return ((self.shape, max(self.d, 0.0)),)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        return self.shape.sdf(p) - F32(self.d)


class AlongRod(Shape):
    """The part of a rod between the normalised positions ``t0`` and ``t1`` (slab along its axis)."""

    def __init__(self, rod: Rod, t0: float, t1: float, grow: float = 0.0):
        if not t1 > t0:
            raise ValueError(f"AlongRod needs t1 > t0, got {t0}, {t1}")
        self.rod, self.t0, self.t1, self.grow = rod, float(t0), float(t1), float(grow)
        self.lo, self.hi = rod.lo - grow, rod.hi + grow

    def children(self) -> tuple[tuple[Shape, float], ...]:
        return ((self.rod, max(self.grow, 0.0)),)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        t = self.rod.along(p)
        slab = np.maximum(F32(self.t0) - t, t - F32(self.t1)) * F32(self.rod.length)
        return np.maximum(self.rod.sdf(p) - F32(self.grow), slab)


# --------------------------------------------------------------------------------- painting

_TISSUE_COUNT = max(int(t) for t in Tissue) + 1


def tissue_set(tissues: Iterable[Tissue] | None) -> np.ndarray | None:
    """A lookup table (bool per tissue value) for the ``only_over``/``never_over`` rules."""
    if tissues is None:
        return None
    table = np.zeros(_TISSUE_COUNT, dtype=bool)
    for t in tissues:
        table[int(Tissue(t))] = True
    return table


@dataclass
class Band:
    """Paint ``tissue`` where ``lo < sdf <= hi``; ``structure`` None keeps the existing index."""

    tissue: Tissue
    structure: int | None = 0
    lo: float = -INF
    hi: float = 0.0
    only_over: frozenset[Tissue] | None = None
    never_over: frozenset[Tissue] | None = None
    clip: "Shape | None" = None  # paint only where clip.sdf <= 0 (e.g. articular surfaces)

    def __post_init__(self) -> None:
        if not self.hi > self.lo:
            raise ValueError(f"band of {self.tissue.name} needs hi > lo, got lo={self.lo}, hi={self.hi}")
        self._only = tissue_set(self.only_over)
        self._never = tissue_set(self.never_over)


@dataclass
class Layer:
    """One step of the recipe: a shape, the bands painted from its distance, an optional clip."""

    name: str
    shape: Shape
    bands: list[Band]
    clip: Shape | None = None

    def __post_init__(self) -> None:
        if not self.bands:
            raise ValueError(f"layer {self.name!r} has no bands")
        reach = max(max(b.hi for b in self.bands), 0.0)
        self.shape.set_reach(reach)
        for clip in [self.clip] + [b.clip for b in self.bands]:
            if clip is not None:
                clip.set_reach(0.0)
        lo, hi = self.shape.lo - reach, self.shape.hi + reach
        if self.clip is not None:
            lo, hi = np.maximum(lo, self.clip.lo), np.minimum(hi, self.clip.hi)
        self.lo, self.hi = lo, hi
        self.reach = reach

    @property
    def empty(self) -> bool:
        return bool(np.any(self.hi < self.lo))


BONE = frozenset({Tissue.CORTEX, Tissue.MARROW, Tissue.MARROW_EDEMA})
HARD = BONE | {Tissue.CARTILAGE}


class LayeredModel:
    """An :class:`~training.phantoms.anatomy.Anatomy` painted from a list of layers.

    ``center`` (patient LPS, mm) is where the joint frame's origin sits; ``R`` (3x3, columns =
    joint axes u, v, w in patient coordinates) carries the small whole-joint rotation; the
    laterality mirror is applied on top: for a right limb u (toward the midline) is patient
    left (+x), for a left limb it is patient right (-x).
    """

    def __init__(self, joint: str, laterality: str, center: Sequence[float], R: np.ndarray,
                 layers: list[Layer], extent_mm: Sequence[float], scale: float = 1.0):
        if laterality not in ("L", "R"):
            raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
        self.joint = joint
        self.laterality = laterality
        self._center = _vec(center, "center")
        self._R = np.asarray(R, dtype=np.float64)
        if (self._R.shape != (3, 3) or not np.allclose(self._R.T @ self._R, np.eye(3), atol=1e-6)
                or np.linalg.det(self._R) < 0):
            raise ValueError("R must be a 3x3 proper rotation matrix (laterality mirroring is done by the model)")
        self._mirror = np.array([1.0 if laterality == "R" else -1.0, 1.0, 1.0])
        self.layers = [layer for layer in layers if not layer.empty]
        self._extent = _vec(extent_mm, "extent_mm")
        if not 0.3 < scale < 3:
            raise ValueError(f"scale must be a plausible body-size factor in (0.3, 3), got {scale}")
        self.scale = float(scale)

    @property
    def center(self) -> np.ndarray:
        return self._center.copy()

    @property
    def extent_mm(self) -> np.ndarray:
        return self._extent.copy()

    def to_joint(self, points: np.ndarray) -> np.ndarray:
        """Patient coordinates (N, 3) into the joint frame (u medial, v posterior, w superior)."""
        p = np.asarray(points, dtype=F32)
        return _affine(p, self._center, self._R, self._mirror / self.scale)

    def to_patient(self, q: np.ndarray) -> np.ndarray:
        """Joint-frame points (N, 3) into patient coordinates."""
        q = np.asarray(q, dtype=np.float64) @ self._R.T
        return q * self._mirror * self.scale + self._center

    def evaluate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pts = np.asarray(points)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"points must have shape (N, 3), got {pts.shape}")
        if not np.isfinite(pts).all():
            raise ValueError("points must be finite (found NaN or infinity)")
        n = len(pts)
        tissue = np.zeros(n, dtype=np.uint8)
        structure = np.zeros(n, dtype=np.uint8)
        for s in range(0, n, self.chunk):
            e = min(s + self.chunk, n)
            t, st = self._paint(self.to_joint(pts[s:e]))
            tissue[s:e] = t
            structure[s:e] = st
        return tissue, structure

    #: points per chunk; each chunk is sorted into bricks of ``brick_mm`` (joint-frame mm)
    chunk = 1 << 21
    brick_mm = 8.0
    #: a brick is classified from the distance at its centre only when the distance is known to
    #: stay on one side of every band edge: |d_centre| > SAFETY * half-diagonal + MARGIN_MM.  The
    #: factor covers the approximate (not exactly 1-Lipschitz) distances of ellipsoids and
    #: smooth unions.
    SAFETY = 1.35
    MARGIN_MM = 1.0

    def _paint(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Paint the layers on joint-frame points, brick by brick.

        The points are sorted into cubic bricks.  For every layer the shape (and clip) distance
        is evaluated once at each brick centre; a brick that lies entirely outside the layer's
        bands is skipped, one that lies entirely inside a single band is painted without
        evaluating its points, and only the remaining bricks, those crossed by a surface, are
        evaluated point by point.  This keeps the cost proportional to the surface area of the
        anatomy rather than to the number of points.
        """
        n = len(q)
        tissue = np.zeros(n, dtype=np.uint8)
        structure = np.zeros(n, dtype=np.uint8)
        if n == 0:
            return tissue, structure
        inv = F32(1.0 / self.brick_mm)
        ijk = [((q[:, a] - q[:, a].min()) * inv).astype(np.int32) for a in range(3)]
        dims = [int(c.max()) + 1 for c in ijk]
        if dims[0] * dims[1] * dims[2] < 65536:
            key = ((ijk[2] * dims[1] + ijk[1]) * dims[0] + ijk[0]).astype(np.uint16)  # numpy radix-sorts 16 bits
        else:
            key = (ijk[2].astype(np.int64) * dims[1] + ijk[1]) * dims[0] + ijk[0]
        order = np.argsort(key, kind="stable")
        # gather whole 12-byte rows at once (much faster than fancy-indexing a (N, 3) float array)
        qs = np.ascontiguousarray(q).view(np.dtype((np.void, 12))).ravel()[order].view(F32).reshape(-1, 3)
        ks = key[order]
        starts = np.flatnonzero(np.concatenate(([True], ks[1:] != ks[:-1])))
        lengths = np.diff(np.append(starts, n))
        bmin = np.minimum.reduceat(qs, starts, axis=0)
        bmax = np.maximum.reduceat(qs, starts, axis=0)
        centre = (bmin + bmax) / 2
        reach = F32(self.SAFETY) * np.linalg.norm(bmax - bmin, axis=1) / 2 + F32(self.MARGIN_MM)
        ts = np.zeros(n, dtype=np.uint8)
        ss = np.zeros(n, dtype=np.uint8)
        for layer in self.layers:
            cand = np.flatnonzero(np.all((bmax >= layer.lo) & (bmin <= layer.hi), axis=1))
            if cand.size == 0:
                continue
            per_point_clip = np.zeros(cand.size, dtype=bool)
            if layer.clip is not None:
                dc = layer.clip.sdf(centre[cand])
                keep = dc <= reach[cand]
                cand, dc = cand[keep], dc[keep]
                per_point_clip = dc >= -reach[cand]
            if cand.size == 0:
                continue
            d = layer.shape.sdf(centre[cand])
            dlo, dhi = d - reach[cand], d + reach[cand]
            # per brick: which bands its distance interval meets, and whether it sits wholly
            # inside exactly one band (then no point needs its own distance)
            nhit = np.zeros(cand.size, dtype=np.int64)
            uniform = np.full(cand.size, -1, dtype=np.int64)
            for k, band in enumerate(layer.bands):
                hit = (dhi > band.lo) & (dlo <= band.hi)
                nhit += hit
                whole = hit & (dlo > band.lo) & (dhi <= band.hi) & (band.clip is None)
                uniform[whole] = k
            uniform[(nhit != 1) | per_point_clip] = -1
            touched = nhit > 0
            mixed = cand[touched & (uniform == -1)]
            for k, band in enumerate(layer.bands):
                sel = cand[uniform == k]
                if sel.size:
                    self._apply(band, _ranges(starts[sel], lengths[sel]), ts, ss)
            if mixed.size:
                idx = _ranges(starts[mixed], lengths[mixed])
                sub = qs[idx]
                if layer.clip is not None:
                    keep = layer.clip.sdf(sub) <= 0
                    idx, sub = idx[keep], sub[keep]
                if idx.size:
                    dd = layer.shape.sdf(sub)
                    for band in layer.bands:
                        m = (dd > band.lo) & (dd <= band.hi)
                        if band.clip is not None and m.any():
                            cand_pts = np.flatnonzero(m)
                            cand_pts = cand_pts[band.clip.in_box(sub[cand_pts])]
                            m[:] = False
                            if cand_pts.size:
                                m[cand_pts[band.clip.sdf(sub[cand_pts]) <= 0]] = True
                        if m.any():
                            self._apply(band, idx[m], ts, ss)
        tissue[order] = ts
        structure[order] = ss
        return tissue, structure

    @staticmethod
    def _apply(band: "Band", idx: np.ndarray, tissue: np.ndarray, structure: np.ndarray) -> None:
        """Paint ``band`` on the points ``idx`` that its only_over/never_over rules allow."""
        if band._only is not None or band._never is not None:
            cur = tissue[idx]
            m = np.ones(idx.size, dtype=bool)
            if band._only is not None:
                m &= band._only[cur]
            if band._never is not None:
                m &= ~band._never[cur]
            idx = idx[m]
        tissue[idx] = int(band.tissue)
        if band.structure is not None:
            structure[idx] = band.structure


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every start/length pair, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return offsets + np.arange(total)


def solid(tissue: Tissue, structure: int | None = 0, **rules: frozenset[Tissue]) -> list[Band]:
    """The bands of a plain solid of one tissue."""
    return [Band(tissue, structure, **rules)]


def bone(structure: int, cortex_mm: float, fluid_mm: float = 0.0, fluid_clip: Shape | None = None,
         cartilage_mm: float = 0.0, cartilage_structure: int = 0, cartilage_clip: Shape | None = None) -> list[Band]:
    """Bands of a bone: marrow inside, a cortex shell, optional cartilage and fluid films outside.

    Fluid is painted first (furthest out) so the cartilage, then the bone, overwrite it and
    only a film of ``fluid_mm - cartilage_mm`` remains on the articular surface.  Fluid and
    cartilage never overwrite another bone (two bones share a joint space); the clips restrict
    them to the joint capsule and to the articular surfaces.
    """
    bands: list[Band] = []
    if fluid_mm > 0:
        bands.append(Band(Tissue.FLUID, 0, 0.0, fluid_mm, never_over=HARD, clip=fluid_clip))
    if cartilage_mm > 0:
        bands.append(Band(Tissue.CARTILAGE, cartilage_structure, 0.0, cartilage_mm, never_over=BONE,
                          clip=cartilage_clip))
    bands.append(Band(Tissue.CORTEX, structure, -cortex_mm, 0.0))
    bands.append(Band(Tissue.MARROW, structure, -INF, -cortex_mm))
    return bands


FIBRE_NEVER = HARD | {Tissue.FIBROCARTILAGE}
EDEMA_OVER = frozenset({Tissue.FAT, Tissue.MUSCLE, Tissue.FLUID})


def fibre_layers(name: str, rod: Rod, structure: int = 0, severity: float = 0.0, mode: str = "rupture",
                 at: float = 0.5, deep: Sequence[float] | None = None, sag: Sequence[float] | None = None,
                 retract_mm: float = 0.0, tissue: Tissue = Tissue.LIGAMENT) -> list[Layer]:
    """The layers of one ligament or tendon, intact (``severity == 0``) or injured.

    Injury models (severity ``s`` in (0, 1]):

    ``mode='rupture'`` (cruciates, Achilles tendon, cuff tendons): the fibres are discontinuous
    at ``at`` (normalised position along the rod).  The gap is ``2 + 12 s`` mm long and filled
    with fluid-like TEAR signal that is *not* labelled as the structure; the stumps are swollen
    toward the tear (radius up to ``1 + 0.25 s`` times normal) with an edematous rim
    (SOFT_TISSUE_EDEMA, still the structure) and periligamentous edema over the surrounding fat.
    Subtle cases (``s < 0.3``) tear only the ``deep`` half of the cross-section (partial tear).
    ``sag`` (mm, joint frame) displaces the free end of the distal stump, e.g. the sagging,
    horizontally oriented distal ACL stump; ``retract_mm`` shortens the proximal stump by up
    to that much (muscle pull on a ruptured tendon), widening the gap.

    ``mode='sprain'`` (collateral ligaments, ATFL, CFL) follows the clinical grading: grade I
    (``s < 0.35``) thickening and surrounding SOFT_TISSUE_EDEMA only; grade II (``s < 0.75``)
    additionally a partial-thickness TEAR of the ``deep`` half near ``at``; grade III a
    full-thickness gap.

    Layers are painted never over bone, cartilage or fibrocartilage, so attachments stay bone.
    """
    if mode not in ("rupture", "sprain"):
        raise ValueError(f"mode must be 'rupture' or 'sprain', got {mode!r}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity of {name} must be in [0, 1], got {severity}")
    if not 0.0 < at < 1.0:
        raise ValueError(f"tear position 'at' of {name} must be inside (0, 1), got {at}")
    s = float(severity)
    if s == 0:
        return [Layer(name, rod, [Band(tissue, structure, never_over=FIBRE_NEVER)])]

    layers: list[Layer] = []
    wide = rod.frame.R[:, 0]
    edema = Offset(rod, 1.5 + 4.0 * s)
    layers.append(Layer(f"{name}_edema", edema, [Band(Tissue.SOFT_TISSUE_EDEMA, 0, only_over=EDEMA_OVER)]))
    deep_half: Shape | None = None
    if deep is not None:
        axis_mid = (rod.p0 + rod.p1) / 2
        deep_half = HalfSpace(axis_mid, -_vec(deep, "deep"))

    if mode == "sprain":
        thick = Rod(rod.p0, rod.p1, rod.r0, rod.r1, flat=min(1.0, rod.flat * (1 + 0.6 * s)), wide=wide)
        layers.append(Layer(name, thick, [Band(Tissue.SOFT_TISSUE_EDEMA, structure, never_over=FIBRE_NEVER),
                                          Band(tissue, structure, -INF, -0.6, never_over=FIBRE_NEVER)]))
        if s >= 0.35:
            length = (3.0 + 8.0 * s) / rod.length
            t0, t1 = max(0.02, at - length / 2), min(0.98, at + length / 2)
            gap: Shape = AlongRod(thick, t0, t1, grow=0.3)
            if s < 0.75 and deep_half is not None:
                gap = Intersection(gap, deep_half)
            layers.append(Layer(f"{name}_tear", gap, [Band(Tissue.TEAR, 0, never_over=FIBRE_NEVER)]))
        return layers

    gap_len = min((2.0 + 12.0 * s) / rod.length, 0.6)
    t0, t1 = max(0.05, at - gap_len / 2), min(0.95, at + gap_len / 2)
    if retract_mm < 0:
        raise ValueError(f"retract_mm of {name} must be >= 0, got {retract_mm}")
    t0 = max(0.05, t0 - retract_mm * s / rod.length)
    swell = 1.0 + 0.25 * s
    pa = rod.p0 + (rod.p1 - rod.p0) * t0
    pb = rod.p0 + (rod.p1 - rod.p0) * t1
    ra = rod.r0 + (rod.r1 - rod.r0) * t0
    rb = rod.r0 + (rod.r1 - rod.r0) * t1
    partial = s < 0.3 and deep_half is not None
    if partial:
        stumps: list[Rod] = [rod]
    else:
        pb_free = pb + (np.zeros(3) if sag is None else _vec(sag, "sag") * s)
        stumps = [Rod(rod.p0, pa, rod.r0, ra * swell, rod.flat, wide),
                  Rod(pb_free, rod.p1, rb * swell, rod.r1, rod.flat, wide)]
    for k, stump in enumerate(stumps):
        layers.append(Layer(f"{name}_stump{k}", stump, [
            Band(Tissue.SOFT_TISSUE_EDEMA, structure, never_over=FIBRE_NEVER),
            Band(tissue, structure, -INF, -(0.4 + 0.8 * s), never_over=FIBRE_NEVER)]))
    gap_shape: Shape = AlongRod(Rod(rod.p0, rod.p1, rod.r0 * swell, rod.r1 * swell, rod.flat, wide), t0, t1, grow=0.4)
    if partial:
        gap_shape = Intersection(gap_shape, deep_half)
    layers.append(Layer(f"{name}_gap", gap_shape, [Band(Tissue.TEAR, 0, never_over=FIBRE_NEVER)]))
    return layers
