"""Acquisition plane of a series from its geometry, and localizer detection.

Series descriptions are free text that every vendor and site writes differently, so the
plane is read from the one thing that cannot lie: the direction cosines of the image rows
and columns (Image Orientation (Patient)).  The slice normal is ``row x col``; its largest
component in patient coordinates (LPS) names the nearest cardinal plane, and the angle
between the normal and that axis is the obliquity.  A coronal-oblique knee tilted 20
degrees is still a coronal series; a flipped normal (slices stacked the other way) is the
same plane.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

#: plane named after the patient axis its slice normal points along (x = L, y = P, z = S)
_AXIS_PLANES: tuple[str, str, str] = ("sagittal", "coronal", "axial")

#: tolerance on unit length / orthogonality of the direction cosines; scanners write
#: 6-10 significant digits, so anything worse than this is a broken header, not rounding
_COSINE_TOLERANCE = 1e-3

#: words that name a scout series (Siemens "localizer", GE "3-plane loc", Philips "survey",
#: Canon "scanogram", "tri-pilot"); tokens are delimited by non-alphanumerics because
#: vendors join words with underscores
_LOCALIZER_WORDS = re.compile(
    r"(?<![a-z0-9])(localizer|localiser|loc|scout|survey|scanogram|tri[ _-]?pilot|"
    r"3[ _-]?pl(ane)?[ _-]?loc|aahead[ _-]?scout|pilot)(?![a-z0-9])",
    re.IGNORECASE,
)

#: fewer slices than this cannot make a diagnostic 3D volume; such a series is a scout
#: (or a single calibration slice) whatever its header says
LOCALIZER_MAX_SLICES = 3


def _validated_cosines(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines from a 6-vector, checked to be an orthonormal pair."""
    values = np.asarray(orientation, dtype=np.float64).reshape(-1)
    if values.shape != (6,):
        raise ValueError(f"orientation must have 6 values (row then column cosines), got {values.size}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"orientation must be finite, got {values.tolist()}")
    row, col = values[:3], values[3:]
    for name, vector in (("row", row), ("column", col)):
        if abs(np.linalg.norm(vector) - 1.0) > _COSINE_TOLERANCE:
            raise ValueError(
                f"orientation {name} cosines must be a unit vector, got {vector.tolist()} "
                f"(length {np.linalg.norm(vector):.4f})"
            )
    if abs(float(np.dot(row, col))) > _COSINE_TOLERANCE:
        raise ValueError(
            f"orientation row and column cosines must be orthogonal, got dot product {np.dot(row, col):.4f}"
        )
    return row, col


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit slice normal ``row x col`` (the direction SimpleITK/GDCM stack slices along)."""
    row, col = _validated_cosines(orientation)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def nearest_plane(orientation: Sequence[float]) -> tuple[str, float]:
    """Nearest cardinal plane and the obliquity (degrees) from it, with no tolerance applied.

    The sign of the normal is ignored: a sagittal series scanned right-to-left is as
    sagittal as one scanned left-to-right.
    """
    normal = np.abs(slice_normal(orientation))
    axis = int(np.argmax(normal))
    obliquity = math.degrees(math.acos(min(1.0, float(normal[axis]))))
    return _AXIS_PLANES[axis], obliquity


def classify_plane(orientation: Sequence[float], oblique_tolerance_deg: float = 35.0) -> tuple[str, float]:
    """Plane of a series: ``sagittal``, ``coronal``, ``axial`` or ``oblique``, and its obliquity.

    ``oblique`` is returned when the slice normal is more than ``oblique_tolerance_deg``
    away from every patient axis; the obliquity is always the angle to the nearest
    cardinal plane, so callers can apply their own (per-plane) limits.
    """
    if not (0.0 <= oblique_tolerance_deg <= 90.0):
        raise ValueError(f"oblique_tolerance_deg must be within [0, 90], got {oblique_tolerance_deg}")
    plane, obliquity = nearest_plane(orientation)
    if obliquity > oblique_tolerance_deg:
        return "oblique", obliquity
    return plane, obliquity


def looks_like_localizer_description(text: str | None) -> bool:
    """True when a SeriesDescription/ProtocolName uses a word that names a scout series."""
    return bool(text) and _LOCALIZER_WORDS.search(text) is not None


def is_localizer(info: Any) -> bool:
    """True for scout series that must never feed the model.

    ``info`` is an :class:`inference.series.SeriesInfo` (typed loosely to avoid an import
    cycle).  A series is a localizer when its ImageType says LOCALIZER, when its slices lie
    in more than one plane (the classic 3-plane localizer: ``orientation`` is ``None`` and
    ``orientation_count`` > 1), when it has at most :data:`LOCALIZER_MAX_SLICES` slices, or
    when its description names it a scout.
    """
    image_type = tuple(str(v).upper() for v in (getattr(info, "image_type", ()) or ()))
    if "LOCALIZER" in image_type:
        return True
    if getattr(info, "orientation_count", 1) > 1:
        return True
    if getattr(info, "num_frames", 0) <= LOCALIZER_MAX_SLICES:
        return True
    return looks_like_localizer_description(getattr(info, "series_description", None)) or (
        looks_like_localizer_description(getattr(info, "protocol_name", None))
    )
