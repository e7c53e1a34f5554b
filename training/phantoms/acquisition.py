"""Series planning and image formation: from a continuous anatomy to stored pixel values.

Why one module of about 700 lines: series planning and image formation (contrast, coil,
noise, artefacts per site) feed each other on the same grid; the phantom package keeps anatomy
(``shapes``) apart from acquisition, as a scanner would.

Every series of a case is planned as a technologist would plan it on the localizer: a field
of view centred on the joint, a slice stack covering it with a given thickness and gap, a
plane that may be tilted from the cardinal one (the knee sagittal along the ACL, the shoulder
coronal along the supraspinatus).  The anatomy is then sampled on that series' own grid with
several sub-samples per voxel (through the slice thickness, and in-plane when pixels are
coarse) whose signals are averaged, which is what makes thin structures fade into their
neighbours as on real images (partial-volume averaging).  Coil shading (a smooth
multiplicative bias field, shared by all series of a case because the coil stays put) and
Rician noise complete the picture.

Geometry is kept in DICOM terms: ``row_dir`` is the first triplet of ImageOrientationPatient
(the direction of increasing column index), ``col_dir`` the second, and slices are ordered
along ``row_dir x col_dir``, the order SimpleITK and most viewers sort them in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from training.phantoms.anatomy import Anatomy, CaseSpec
from training.phantoms.contrast import FAT_SUPPRESSED, SequenceParameters, fat_signal_table, sequence_parameters, signal_table
from training.phantoms.sites import SiteProfile

#: DICOM stores 12 significant bits for these images (BitsStored)
MAX_STORED_VALUE = 4095

#: reference voxel (mm^3) at which ``SiteProfile.snr`` is quoted
_REFERENCE_VOXEL_MM3 = 0.6 * 0.6 * 3.5

#: at most this many points per call to ``Anatomy.evaluate`` (bounds memory)
_POINTS_PER_CALL = 2_000_000

_CARDINAL = {
    # plane -> (row_dir, col_dir) of the usual DICOM orientation for that plane
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}

_PROTOCOLS: dict[str, dict[str, tuple[tuple[str, float], ...]]] = {
    # joint -> plane -> ((sequence, probability), ...)
    "knee": {
        "sagittal": (("PD_FS", 0.7), ("T2_FS", 0.3)),
        "coronal": (("PD_FS", 0.5), ("T1", 0.5)),
        "axial": (("PD_FS", 0.85), ("T2_FS", 0.15)),
    },
    "ankle": {
        "sagittal": (("T2_FS", 0.5), ("PD_FS", 0.3), ("T1", 0.2)),
        "coronal": (("PD_FS", 0.6), ("T1", 0.4)),
        "axial": (("PD_FS", 0.7), ("T2_FS", 0.3)),
    },
    "shoulder": {
        "sagittal": (("T2_FS", 0.5), ("T1", 0.5)),
        "coronal": (("PD_FS", 0.6), ("T2_FS", 0.4)),
        "axial": (("PD_FS", 0.8), ("T2_FS", 0.2)),
    },
}

_FOV_MM: dict[str, tuple[float, float]] = {"knee": (140.0, 170.0), "ankle": (140.0, 180.0), "shoulder": (140.0, 180.0)}

#: fraction of the anatomy box (``Anatomy.extent_mm``, which includes the soft tissues) that
#: a slice stack covers along its normal: the sagittal knee stack spans the collateral
#: ligaments, not the whole thigh; the axial stack runs from the suprapatellar pouch to the
#: tibial tuberosity
_COVERAGE: dict[str, dict[str, tuple[float, float]]] = {
    "knee": {"sagittal": (0.66, 0.78), "coronal": (0.6, 0.72), "axial": (0.6, 0.72)},
    "ankle": {"sagittal": (0.65, 0.8), "coronal": (0.55, 0.7), "axial": (0.65, 0.8)},
    "shoulder": {"sagittal": (0.6, 0.75), "coronal": (0.55, 0.7), "axial": (0.65, 0.8)},
}

#: probability that a case carries a distractor series (localizer or second sagittal)
DISTRACTOR_PROBABILITY = 0.3


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def rotation_matrix(axis: np.ndarray | tuple[float, float, float], angle_deg: float) -> np.ndarray:
    """3x3 right-handed rotation by ``angle_deg`` about ``axis`` (Rodrigues)."""
    a = _unit(np.asarray(axis, dtype=np.float64))
    t = math.radians(angle_deg)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + math.sin(t) * k + (1.0 - math.cos(t)) * (k @ k)


@dataclass(frozen=True, eq=False)
class SliceStack:
    """A stack of parallel, equally spaced slices on one pixel grid.

    ``origin`` is the centre of the first pixel (row 0, column 0) of the first slice, i.e. its
    ImagePositionPatient.  ``pixel_spacing`` is DICOM order: (between rows, between columns).
    """

    row_dir: np.ndarray
    col_dir: np.ndarray
    origin: np.ndarray
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    n_slices: int
    slice_spacing: float
    thickness: float

    def __post_init__(self) -> None:
        if abs(float(np.dot(self.row_dir, self.col_dir))) > 1e-6:
            raise ValueError("SliceStack: row_dir and col_dir must be orthogonal")
        for name in ("row_dir", "col_dir"):
            if abs(float(np.linalg.norm(getattr(self, name))) - 1.0) > 1e-6:
                raise ValueError(f"SliceStack: {name} must be a unit vector")
        if self.rows < 1 or self.cols < 1 or self.n_slices < 1:
            raise ValueError(f"SliceStack: rows, cols and n_slices must be >= 1, got {self.rows}, {self.cols}, {self.n_slices}")
        if self.slice_spacing <= 0 or self.thickness <= 0 or min(self.pixel_spacing) <= 0:
            raise ValueError("SliceStack: spacings and thickness must be positive")

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal ``row_dir x col_dir``; slice k lies at ``origin + k * slice_spacing * normal``."""
        return np.cross(self.row_dir, self.col_dir)

    @property
    def gap(self) -> float:
        """Gap between slices (spacing minus thickness), mm."""
        return self.slice_spacing - self.thickness

    def slice_origin(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        return self.origin + k * self.slice_spacing * self.normal

    def slice_center(self, k: int) -> np.ndarray:
        """Patient position of the centre of slice ``k`` (used for SliceLocation)."""
        dr, dc = self.pixel_spacing
        return self.slice_origin(k) + 0.5 * (self.cols - 1) * dc * self.row_dir + 0.5 * (self.rows - 1) * dr * self.col_dir

    def affine_lps(self) -> np.ndarray:
        """4x4 map from voxel index (column i, row j, slice k) to patient LPS millimetres."""
        dr, dc = self.pixel_spacing
        affine = np.eye(4)
        affine[:3, 0] = self.row_dir * dc
        affine[:3, 1] = self.col_dir * dr
        affine[:3, 2] = self.normal * self.slice_spacing
        affine[:3, 3] = self.origin
        return affine

    def voxel_to_patient(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (column, row, slice) -> (N, 3) patient positions."""
        ijk = np.asarray(ijk, dtype=np.float64)
        affine = self.affine_lps()
        return ijk @ affine[:3, :3].T + affine[:3, 3]


@dataclass(frozen=True, eq=False)
class SeriesPlan:
    """One series as planned: what it is, its contrast and its slice stack(s).

    A diagnostic series has one stack.  A three-plane localizer has three (one per plane),
    which is exactly why it must not be mistaken for a diagnostic series downstream.
    """

    plane: str  # "sagittal" | "coronal" | "axial" | "localizer"
    role: str  # "primary" (one per plane) | "distractor"
    sequence: str
    series_number: int
    description: str
    stacks: tuple[SliceStack, ...]
    oblique_deg: float  # angle between the slice normal and the nearest patient axis
    parameters: SequenceParameters
    start_offset_s: float  # acquisition start after the study start

    @property
    def phase_direction(self) -> str:
        """InPlanePhaseEncodingDirection: "ROW" (phase varies along a row, across columns) for
        the sagittal planes, "COL" (along a column, across rows) for the others."""
        return "ROW" if self.plane == "sagittal" else "COL"

    @property
    def folder_name(self) -> str:
        """Folder of the series below ``<case>/dicom/``: ``<SeriesNumber>_<plane-or-kind>``."""
        return f"{self.series_number}_{self.plane}"

    @property
    def n_images(self) -> int:
        return sum(stack.n_slices for stack in self.stacks)


def oblique_angle_deg(normal: np.ndarray) -> float:
    """Angle (degrees) between ``normal`` and the closest of the three patient axes."""
    cos_max = float(np.max(np.abs(_unit(np.asarray(normal, dtype=np.float64)))))
    return math.degrees(math.acos(min(1.0, cos_max)))


def _choose(rng: np.random.Generator, options: tuple[tuple[str, float], ...]) -> str:
    names = [name for name, _ in options]
    probs = np.array([p for _, p in options], dtype=np.float64)
    return str(rng.choice(names, p=probs / probs.sum()))


def _orientation(
    joint: str, plane: str, laterality: str, rng: np.random.Generator, oblique: bool | None, yaw_deg: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Row/column directions of a plane, tilted the way that joint's protocols tilt it.

    ``oblique`` True forces the sagittal and coronal planes oblique, False keeps every plane
    cardinal, None draws it per joint and plane.  ``yaw_deg`` is the rotation of the knee's
    condylar axis about the patient's superior axis (see :func:`knee_condylar_yaw_deg`): an
    oblique knee plane is planned relative to it, as the technologist plans it on the
    localizer.
    """
    row, col = (np.array(v, dtype=np.float64) for v in _CARDINAL[plane])
    # "lateral" is patient-right (-x) for a right joint, patient-left (+x) for a left one
    lateral_sign = -1.0 if laterality == "R" else 1.0
    z = np.array([0.0, 0.0, 1.0])
    angle = 0.0
    axis = z
    if joint == "knee":
        if plane == "sagittal" and (oblique or (oblique is None and rng.random() < 0.6)):
            # perpendicular to the condylar axis, then along the ACL / lateral femoral condyle:
            # the posterior end of the plane swings laterally (rotating +y towards lateral about +z)
            # (a technologist does not tilt a knee sagittal beyond about 20 degrees)
            angle = float(np.clip(yaw_deg + float(rng.uniform(5.0, 12.0)) * -lateral_sign, -20.0, 20.0))
        elif plane == "coronal" and (oblique or (oblique is None and rng.random() < 0.4)):
            angle = yaw_deg + float(rng.normal(0.0, 2.0))  # parallel to the posterior condylar line
        elif plane == "axial" and oblique is None and rng.random() < 0.2:
            axis = np.array([1.0, 0.0, 0.0])
            angle = float(rng.uniform(2.0, 6.0)) * float(rng.choice([-1.0, 1.0]))
    elif joint == "ankle":
        if plane in ("sagittal", "coronal") and (oblique or (oblique is None and rng.random() < 0.3)):
            angle = float(rng.uniform(5.0, 14.0)) * float(rng.choice([-1.0, 1.0]))
        elif plane == "axial" and oblique is None and rng.random() < 0.3:
            axis = np.array([1.0, 0.0, 0.0])
            angle = float(rng.uniform(5.0, 15.0))  # oblique axial along the peroneal tendons
    elif joint == "shoulder":
        if plane in ("sagittal", "coronal") and oblique is not False:
            # scapular plane, along the supraspinatus: its medial end runs posteriorly.  The
            # shoulder model (training.phantoms.shoulder) lays the supraspinatus and the
            # scapular body about 16-22 degrees from the coronal plane, so the planes follow
            # that (in patients the angle is nearer 30-40 degrees)
            angle = float(rng.uniform(14.0, 26.0)) * -lateral_sign
        elif plane == "axial" and oblique is None and rng.random() < 0.2:
            axis = np.array([1.0, 0.0, 0.0])
            angle = float(rng.uniform(2.0, 6.0)) * float(rng.choice([-1.0, 1.0]))
    else:
        raise ValueError(f"joint must be knee, ankle or shoulder, got {joint!r}")
    if angle != 0.0:
        rot = rotation_matrix(axis, angle)
        row, col = rot @ row, rot @ col
    return _unit(row), _unit(col)


def knee_condylar_yaw_deg(anatomy: Anatomy, step_mm: float = 2.0) -> float:
    """Rotation (degrees, about +z) of the knee's medial-lateral condylar axis from the x axis.

    Estimated from the anatomy itself, through the contract only: the femur voxels of a slab
    just above the joint centre (the condyles) are wider medial-lateral than anterior-
    posterior, so the main axis of their axial cross-section is the condylar axis.  Returns
    0.0 when the slab holds too little femur to tell (the planes then stay cardinal).
    """
    from inference.labels import STRUCTURE_INDEX

    center = np.asarray(anatomy.center, dtype=np.float64)
    xs = np.arange(-70.0, 70.0 + 1e-6, step_mm)
    zs = np.arange(8.0, 30.0 + 1e-6, step_mm)
    gx, gy, gz = np.meshgrid(xs, xs, zs, indexing="ij")
    points = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1) + center
    _, structure = _evaluate(anatomy, points)
    femur = points[structure == STRUCTURE_INDEX["femur"], :2]
    if len(femur) < 50:
        return 0.0
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov((femur - femur.mean(axis=0)).T))
    major = eigenvectors[:, int(np.argmax(eigenvalues))]
    angle = math.degrees(math.atan2(major[1], major[0]))
    angle = (angle + 90.0) % 180.0 - 90.0  # an axis, not a direction: fold into [-90, 90)
    if abs(angle) > 45.0:  # the cross-section is not wider than deep: no usable axis
        return 0.0
    return float(angle)


def _coverage_mm(extent: np.ndarray, normal: np.ndarray) -> float:
    """Length of the anatomy box seen along ``normal``."""
    return float(np.sum(np.abs(normal) * extent))


def plan_stack(
    center: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    fov_mm: float,
    matrix: int,
    thickness: float,
    slice_spacing: float,
    n_slices: int,
) -> SliceStack:
    """A square-FOV slice stack centred on ``center``."""
    spacing = fov_mm / matrix
    normal = np.cross(row_dir, col_dir)
    half = 0.5 * (matrix - 1) * spacing
    origin = center - half * row_dir - half * col_dir - 0.5 * (n_slices - 1) * slice_spacing * normal
    return SliceStack(
        row_dir=row_dir, col_dir=col_dir, origin=origin, rows=matrix, cols=matrix,
        pixel_spacing=(spacing, spacing), n_slices=n_slices, slice_spacing=slice_spacing, thickness=thickness,
    )


def plan_protocol(
    anatomy: Anatomy,
    spec: CaseSpec,
    site: SiteProfile,
    rng: np.random.Generator,
    matrix: int = 256,
    oblique: bool | None = None,
    distractor: str | None = None,
) -> list[SeriesPlan]:
    """Plan the series of one examination, in acquisition order.

    Always one sagittal, one coronal and one axial diagnostic series (``role="primary"``);
    with probability :data:`DISTRACTOR_PROBABILITY` (or when ``distractor`` names one of
    "localizer" / "second_sagittal") a distractor series as well.  ``oblique`` is passed to
    the plane orientation (True: sagittal and coronal tilted; False: all cardinal).
    """
    if matrix < 32:
        raise ValueError(f"matrix must be >= 32, got {matrix}")
    if distractor not in (None, "none", "localizer", "second_sagittal"):
        raise ValueError(f"distractor must be None, 'none', 'localizer' or 'second_sagittal', got {distractor!r}")
    joint = spec.joint
    protocol = _PROTOCOLS[joint]
    center = np.asarray(anatomy.center, dtype=np.float64)
    extent = np.asarray(anatomy.extent_mm, dtype=np.float64)
    if distractor is None:
        distractor = str(rng.choice(["localizer", "second_sagittal"])) if rng.random() < DISTRACTOR_PROBABILITY else "none"

    yaw = knee_condylar_yaw_deg(anatomy) if joint == "knee" and oblique is not False else 0.0
    planes = list(protocol)
    rng.shuffle(planes)  # acquisition order differs between sites and technologists
    entries: list[tuple[str, str, str]] = [(plane, "primary", _choose(rng, protocol[plane])) for plane in planes]
    if distractor == "second_sagittal":
        first = next(seq for plane, _, seq in entries if plane == "sagittal")
        other = "T1" if first != "T1" else "PD_FS"
        position = 1 + next(i for i, (plane, _, _) in enumerate(entries) if plane == "sagittal")
        entries.insert(position, ("sagittal", "distractor", other))
    if distractor == "localizer":
        entries.insert(0, ("localizer", "distractor", "LOCALIZER"))

    plans: list[SeriesPlan] = []
    clock = float(rng.uniform(20.0, 90.0))
    fov_lo, fov_hi = _FOV_MM[joint]
    for index, (plane, role, sequence) in enumerate(entries):
        number = (index + 1) * site.series_number_step + (1 if site.series_number_step > 1 else 0)
        params = sequence_parameters(sequence, site, rng)
        if plane == "localizer":
            stacks = _plan_localizer(center, rng, matrix)
            normal_angle = 0.0
            description = site.series_description("LOCALIZER", "sagittal")
            duration = 25.0
        else:
            row, col = _orientation(joint, plane, spec.laterality, rng, oblique, yaw)
            thickness = float(round(rng.uniform(*site.slice_thickness_mm) * 2) / 2)  # 0.5 mm steps
            gap = float(round(rng.uniform(0.3, 1.0), 1))
            spacing = thickness + gap
            normal = np.cross(row, col)
            coverage = _coverage_mm(extent, normal) * float(rng.uniform(*_COVERAGE[joint][plane]))
            n_slices = int(np.clip(math.ceil(coverage / spacing), 14, 48))
            fov = float(round(rng.uniform(fov_lo, fov_hi)))
            shift = rng.normal(0.0, 3.0, size=3)  # the technologist never centres exactly
            stacks = (plan_stack(center + shift, row, col, fov, matrix, thickness, spacing, n_slices),)
            normal_angle = oblique_angle_deg(normal)
            description = site.series_description(sequence, plane, oblique=normal_angle > 1.0)
            duration = params.repetition_time_ms * matrix * params.percent_sampling / 100.0 / params.echo_train_length / 1000.0
            duration *= params.number_of_averages
        plans.append(
            SeriesPlan(
                plane=plane, role=role, sequence=sequence, series_number=number, description=description,
                stacks=stacks, oblique_deg=normal_angle, parameters=params, start_offset_s=clock,
            )
        )
        clock += duration + float(rng.uniform(15.0, 60.0))
    return plans


def _plan_localizer(center: np.ndarray, rng: np.random.Generator, matrix: int) -> tuple[SliceStack, ...]:
    """Three orthogonal stacks of three thick, low-resolution slices each."""
    loc_matrix = min(matrix, 128)
    fov = float(round(rng.uniform(240.0, 300.0)))
    thickness = float(rng.choice([7.0, 8.0, 10.0]))
    spacing = thickness + float(rng.choice([5.0, 8.0, 10.0]))
    stacks = []
    for plane in ("sagittal", "coronal", "axial"):
        row, col = (np.array(v, dtype=np.float64) for v in _CARDINAL[plane])
        stacks.append(plan_stack(center, row, col, fov, loc_matrix, thickness, spacing, 3))
    return tuple(stacks)


@dataclass
class BiasField:
    """Smooth multiplicative receive-coil shading in patient coordinates.

    A sum of a few long-wavelength cosines plus a radial fall-off from the coil centre; its
    log is scaled so the field stays within about ``1 +- strength``.  One field per case:
    the coil does not move between series, so the same tissue is shaded alike in all planes.
    """

    center: np.ndarray
    strength: float
    wavevectors: np.ndarray = field(repr=False)  # (K, 3) rad/mm
    phases: np.ndarray = field(repr=False)  # (K,)
    weights: np.ndarray = field(repr=False)  # (K,)
    falloff_mm: float = 120.0

    @classmethod
    def random(cls, center: np.ndarray, strength: float, rng: np.random.Generator, n_terms: int = 4) -> "BiasField":
        directions = rng.normal(size=(n_terms, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(250.0, 600.0, size=(n_terms, 1))
        weights = rng.uniform(0.3, 1.0, size=n_terms)
        return cls(
            center=np.asarray(center, dtype=np.float64) + rng.normal(0.0, 20.0, size=3),
            strength=float(strength),
            wavevectors=2.0 * np.pi * directions / wavelengths,
            phases=rng.uniform(0.0, 2.0 * np.pi, size=n_terms),
            weights=weights / weights.sum(),
            falloff_mm=float(rng.uniform(100.0, 180.0)),
        )

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) patient positions -> (N,) float32 gain."""
        rel = np.asarray(points, dtype=np.float64) - self.center
        waves = np.cos(rel @ self.wavevectors.T + self.phases) @ self.weights  # in [-1, 1]
        radial = np.sum(rel * rel, axis=1) / (self.falloff_mm**2)  # 0 at the coil centre
        log_gain = self.strength * (0.7 * waves - 0.6 * np.tanh(radial) + 0.3)
        return np.exp(log_gain).astype(np.float32)


def _interpolate_axis(values: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation of ``values`` along ``axis`` onto ``n_out`` points with the same ends."""
    n_in = values.shape[axis]
    if n_in == 1:
        return np.repeat(values, n_out, axis=axis)
    pos = np.linspace(0.0, n_in - 1, n_out)
    low = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = (pos - low).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = n_out
    frac = frac.reshape(shape)
    return np.take(values, low, axis=axis) * (1.0 - frac) + np.take(values, low + 1, axis=axis) * frac


def bias_on_stack(bias: BiasField, stack: SliceStack, coarse: int = 17) -> np.ndarray:
    """(slices, rows, cols) gain of ``bias`` at the voxel centres of ``stack``.

    The field varies over hundreds of millimetres, so it is evaluated on a coarse in-plane
    grid with the same corners as the image and interpolated bilinearly.
    """
    n_r, n_c = min(coarse, stack.rows), min(coarse, stack.cols)
    dr, dc = stack.pixel_spacing
    rr = np.linspace(0.0, (stack.rows - 1) * dr, n_r)
    cc = np.linspace(0.0, (stack.cols - 1) * dc, n_c)
    jj, ii = np.meshgrid(rr, cc, indexing="ij")
    grid = ii.reshape(-1, 1) * stack.row_dir + jj.reshape(-1, 1) * stack.col_dir  # (n_r * n_c, 3)
    ks = np.arange(stack.n_slices)
    points = stack.origin + (ks * stack.slice_spacing)[:, None, None] * stack.normal + grid[None]
    coarse_field = bias(points.reshape(-1, 3)).reshape(stack.n_slices, n_r, n_c)
    return _interpolate_axis(_interpolate_axis(coarse_field, stack.rows, 1), stack.cols, 2).astype(np.float32)


def _offsets(stack: SliceStack, through: int, inplane: int) -> np.ndarray:
    """(D, 3) sub-sample offsets of one voxel: ``through`` across the thickness, ``inplane``^2 in-plane."""
    dr, dc = stack.pixel_spacing
    t = (np.arange(through) + 0.5) / through - 0.5
    s = (np.arange(inplane) + 0.5) / inplane - 0.5
    ts, rs, cs = np.meshgrid(t * stack.thickness, s * dc, s * dr, indexing="ij")
    return (
        ts.reshape(-1, 1) * stack.normal + rs.reshape(-1, 1) * stack.row_dir + cs.reshape(-1, 1) * stack.col_dir
    )


class _VoxelCentres:
    """Patient positions of voxel centres of a stack, from flat (slice, row, column) indices."""

    def __init__(self, stack: SliceStack) -> None:
        dr, dc = stack.pixel_spacing
        jj, ii = np.meshgrid(np.arange(stack.rows), np.arange(stack.cols), indexing="ij")
        self._plane = ((ii.reshape(-1, 1) * dc) * stack.row_dir + (jj.reshape(-1, 1) * dr) * stack.col_dir).astype(np.float32)
        ks = np.arange(stack.n_slices)
        self._slices = (stack.origin + (ks * stack.slice_spacing)[:, None] * stack.normal).astype(np.float32)
        self._per_slice = stack.rows * stack.cols

    def __call__(self, flat_index: np.ndarray) -> np.ndarray:
        k, in_plane = np.divmod(flat_index, self._per_slice)
        return self._slices[k] + self._plane[in_plane]


def _evaluate(anatomy: Anatomy, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tissue, structure = anatomy.evaluate(np.ascontiguousarray(points, dtype=np.float32))
    tissue, structure = np.asarray(tissue), np.asarray(structure)
    if tissue.shape != (len(points),) or structure.shape != (len(points),):
        raise ValueError(f"Anatomy.evaluate returned shapes {tissue.shape}/{structure.shape} for {len(points)} points")
    return tissue, structure


def _differs_from_neighbours(volume: np.ndarray) -> np.ndarray:
    """True where a voxel's value differs from one of its 6 face neighbours (stack edges excluded)."""
    out = np.zeros(volume.shape, dtype=bool)
    for axis in range(3):
        if volume.shape[axis] < 2:
            continue
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        change = volume[tuple(lo)] != volume[tuple(hi)]
        out[tuple(lo)] |= change
        out[tuple(hi)] |= change
    return out


def sample_stack(
    anatomy: Anatomy,
    stack: SliceStack,
    table: np.ndarray,
    through_samples: int = 3,
    inplane_samples: int | None = None,
    adaptive: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume sampling of ``anatomy`` on ``stack``.

    Returns ``(signal, structure)``, both shaped (slices, rows, columns): the mean relative
    signal of the sub-samples of each voxel (``table`` maps tissue -> signal), and the
    majority structure label of those sub-samples (the voxel's ground truth on this grid).
    A 2-D ``table`` (K, N_TISSUES) gives K signal maps at once, shaped (K, slices, rows,
    columns), from the same sub-samples.
    ``inplane_samples`` defaults to 2 when pixels are coarser than 0.8 mm, else 1.

    With ``adaptive`` the anatomy is first probed at every voxel centre, and only voxels
    whose tissue or structure differs from a face neighbour's (the boundary voxels, where
    partial volume happens) are sub-sampled; interior voxels take their centre's tissue.
    This evaluates the anatomy about half as often at the default settings.  A structure
    thinner than the slice gap that lies parallel to the slices, between two slice centres,
    can be missed by the probes; ``adaptive=False`` sub-samples every voxel.
    """
    if through_samples < 1:
        raise ValueError(f"through_samples must be >= 1, got {through_samples}")
    if inplane_samples is None:
        inplane_samples = 2 if max(stack.pixel_spacing) > 0.8 else 1
    if inplane_samples < 1:
        raise ValueError(f"inplane_samples must be >= 1, got {inplane_samples}")
    single = np.ndim(table) == 1
    tables = np.atleast_2d(np.asarray(table, dtype=np.float32))
    shape = (stack.n_slices, stack.rows, stack.cols)
    n_voxels = stack.n_slices * stack.rows * stack.cols

    offsets = _offsets(stack, through_samples, inplane_samples)
    centre_in_set = bool(np.any(np.all(np.abs(offsets) < 1e-9, axis=1)))
    extra = offsets[~np.all(np.abs(offsets) < 1e-9, axis=1)]  # sub-samples besides the centre
    n_sub = len(offsets)

    centres = _VoxelCentres(stack)
    # probe every voxel centre
    probe_tissue = np.empty(n_voxels, dtype=np.uint8)
    probe_structure = np.empty(n_voxels, dtype=np.uint8)
    for start in range(0, n_voxels, _POINTS_PER_CALL):
        index = np.arange(start, min(n_voxels, start + _POINTS_PER_CALL))
        probe_tissue[index], probe_structure[index] = _evaluate(anatomy, centres(index))
    signal = tables[:, probe_tissue]  # (K, voxels)
    structure = probe_structure.copy()
    out_shape = shape if single else (len(tables), *shape)
    if n_sub == 1 and centre_in_set:
        return signal.reshape(out_shape), structure.reshape(shape)

    if adaptive:
        refine = _differs_from_neighbours(probe_tissue.reshape(shape)) | _differs_from_neighbours(probe_structure.reshape(shape))
        to_refine = np.flatnonzero(refine)
    else:
        to_refine = np.arange(n_voxels)
    per_call = max(1, _POINTS_PER_CALL // max(1, len(extra)))
    for start in range(0, len(to_refine), per_call):
        index = to_refine[start : start + per_call]
        points = centres(index)[:, None, :] + extra[None, :, :].astype(np.float32)
        tissue, struct = _evaluate(anatomy, points.reshape(-1, 3))
        tissue = tissue.reshape(len(index), len(extra))
        struct = struct.reshape(len(index), len(extra))
        if centre_in_set:  # the probe is one of the sub-samples
            tissue = np.concatenate([probe_tissue[index, None], tissue], axis=1)
            struct = np.concatenate([probe_structure[index, None], struct], axis=1)
        signal[:, index] = tables[:, tissue].mean(axis=2)
        structure[index] = _majority(struct)
    return signal.reshape(out_shape), structure.reshape(shape)


def _majority(labels: np.ndarray) -> np.ndarray:
    """(N, D) uint8 -> (N,) most frequent label per row (ties: the first sub-sample's label for
    D == 3, which is the voxel centre when the centre is a sub-sample; else the lowest label)."""
    n, d = labels.shape
    if d == 1:
        return labels[:, 0]
    if d == 3:
        a, b, c = labels[:, 0], labels[:, 1], labels[:, 2]
        return np.where((b == c) & (a != b), b, a)
    present = np.unique(labels)
    if len(present) == 1:
        return np.full(n, present[0], dtype=np.uint8)
    counts = np.stack([(labels == value).sum(axis=1) for value in present], axis=-1)  # (N, L)
    return present[np.argmax(counts, axis=-1)].astype(np.uint8)


@dataclass(eq=False)
class AcquiredSeries:
    """A planned series with its stored pixels (uint16, one array per stack) and ground truth."""

    plan: SeriesPlan
    pixels: list[np.ndarray]  # per stack (slices, rows, cols) uint16
    structures: list[np.ndarray]  # per stack (slices, rows, cols) uint8
    window: tuple[float, float]  # (center, width)


def fat_sat_failure_map(stack: SliceStack, radius_mm: float = 120.0) -> np.ndarray:
    """(slices, rows, cols) weight in [0, 1] of failing fat suppression at each voxel.

    Spectral fat saturation relies on a homogeneous main field, which holds near the
    isocentre (the centre of the field of view, where the joint is placed) and degrades
    towards the edges: fat there is suppressed less, a classic artefact of fat-sat images.
    0 at the stack centre, rising with the fourth power of the distance (so the middle of the
    field of view stays clean) to 1 at ``radius_mm`` and beyond.
    """
    dr, dc = stack.pixel_spacing
    # offsets from the stack centre along its own orthonormal axes (normal, column, row)
    k = ((np.arange(stack.n_slices) - 0.5 * (stack.n_slices - 1)) * stack.slice_spacing)[:, None, None]
    j = ((np.arange(stack.rows) - 0.5 * (stack.rows - 1)) * dr)[None, :, None]
    i = ((np.arange(stack.cols) - 0.5 * (stack.cols - 1)) * dc)[None, None, :]
    distance_sq = k * k + j * j + i * i
    return np.clip((distance_sq / radius_mm**2) ** 2, 0.0, 1.0).astype(np.float32)


def truncate_phase_encoding(real: np.ndarray, imag: np.ndarray, axis: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the central ``fraction`` of k-space lines along ``axis`` (zero-filled).

    This is what partial phase sampling does to an image: lower resolution along the phase
    direction, Gibbs ringing at sharp edges (the cartilage-fluid interface), and noise that
    is correlated along that direction.  Works on the complex image (``real`` + i ``imag``),
    before the magnitude is taken.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = real.shape[axis]
    keep = int(round(n * fraction))
    if keep >= n:
        return real, imag
    from scipy import fft  # single precision transforms (numpy.fft always works in double)

    kspace = fft.fft(real.astype(np.float32) + np.complex64(1j) * imag.astype(np.float32), axis=axis)
    freqs = np.abs(fft.fftfreq(n) * n)  # distance of each line from the k-space centre
    dropped = np.argsort(freqs, kind="stable")[keep:]
    index = [slice(None)] * real.ndim
    index[axis] = dropped
    kspace[tuple(index)] = 0.0
    image = fft.ifft(kspace, axis=axis)
    return image.real.astype(np.float32), image.imag.astype(np.float32)


def acquire_series(
    anatomy: Anatomy,
    plan: SeriesPlan,
    site: SiteProfile,
    bias: BiasField,
    rng: np.random.Generator,
    through_samples: int = 3,
) -> AcquiredSeries:
    """Image one planned series: contrast, partial volume, coil shading, Rician noise, scaling."""
    table = signal_table(plan.sequence, site, rng)
    fat_sat = plan.sequence in FAT_SUPPRESSED and site.fat_sat_edge_failure > 0.0
    gain = site.intensity_scale * float(rng.uniform(0.85, 1.15))  # receiver gain differs per series
    pixels: list[np.ndarray] = []
    structures: list[np.ndarray] = []
    for stack in plan.stacks:
        if fat_sat:
            (signal, fat), structure = sample_stack(anatomy, stack, np.stack([table, fat_signal_table()]), through_samples)
            signal = signal + site.fat_sat_edge_failure * fat_sat_failure_map(stack) * fat
        else:
            signal, structure = sample_stack(anatomy, stack, table, through_samples)
        shading = bias_on_stack(bias, stack)
        dr, dc = stack.pixel_spacing
        voxel = dr * dc * stack.thickness
        snr = site.snr * (voxel / _REFERENCE_VOXEL_MM3) * math.sqrt(plan.parameters.number_of_averages)
        snr = float(np.clip(snr, 6.0, 120.0))
        sigma = 1.0 / snr
        clean = signal * shading
        real = clean + rng.normal(0.0, sigma, size=clean.shape).astype(np.float32)
        imag = rng.normal(0.0, sigma, size=clean.shape).astype(np.float32)
        if plan.parameters.percent_sampling < 100.0:
            phase_axis = 2 if plan.phase_direction == "ROW" else 1
            real, imag = truncate_phase_encoding(real, imag, phase_axis, plan.parameters.percent_sampling / 100.0)
        magnitude = np.sqrt(real * real + imag * imag)  # Rician: magnitude of complex Gaussian
        stored = np.clip(np.rint(magnitude * gain), 0, MAX_STORED_VALUE).astype(np.uint16)
        pixels.append(stored)
        structures.append(structure)
    values = np.concatenate([p.ravel() for p in pixels])
    low, high = np.percentile(values, [1.0, 99.5])
    width = max(float(high - low), 1.0)
    return AcquiredSeries(plan=plan, pixels=pixels, structures=structures, window=(float(round(low + width / 2)), float(round(width))))
