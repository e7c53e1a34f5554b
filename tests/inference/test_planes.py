"""Plane classification from direction cosines, and localizer detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.planes import classify_plane, is_localizer, nearest_plane, slice_normal
from inference.series import SeriesInfo, scan_folder
from tests.inference.dicom_factory import (
    CARDINAL_ORIENTATIONS,
    Geometry,
    SeriesHeader,
    orientation,
    pattern_volume,
    write_classic_series,
)


@pytest.mark.parametrize("plane", ["sagittal", "coronal", "axial"])
@pytest.mark.parametrize("flip", [False, True])
def test_cardinal_planes_and_flipped_normals(plane: str, flip: bool) -> None:
    cosines = orientation(plane, flip=flip)
    assert classify_plane(cosines) == (plane, pytest.approx(0.0, abs=1e-6))
    normal = slice_normal(cosines)
    assert np.isclose(np.linalg.norm(normal), 1.0)


@pytest.mark.parametrize(
    ("plane", "axis", "tilt"),
    [
        ("coronal", "z", 20.0),
        ("coronal", "x", -20.0),
        ("sagittal", "z", 15.0),
        ("axial", "x", 25.0),
        ("sagittal", "y", -30.0),
    ],
)
def test_oblique_within_tolerance_keeps_its_plane(plane: str, axis: str, tilt: float) -> None:
    for flip in (False, True):
        name, obliquity = classify_plane(orientation(plane, tilt, axis, flip=flip))
        assert name == plane
        assert obliquity == pytest.approx(abs(tilt), abs=1e-6)


def test_beyond_tolerance_is_oblique_but_nearest_plane_still_known() -> None:
    cosines = orientation("coronal", 40.0, "z")
    assert classify_plane(cosines) == ("oblique", pytest.approx(40.0))
    assert classify_plane(cosines, oblique_tolerance_deg=45.0) == ("coronal", pytest.approx(40.0))
    assert nearest_plane(cosines) == ("coronal", pytest.approx(40.0))
    # past 45 degrees the normal is nearer the other axis: a sagittal-oblique series
    assert nearest_plane(orientation("coronal", 60.0, "z")) == ("sagittal", pytest.approx(30.0))


def test_double_oblique_obliquity_is_angle_to_nearest_axis() -> None:
    rotated = orientation("sagittal", 10.0, "z")
    row = np.asarray(rotated[:3])
    col = np.asarray(rotated[3:])
    # tilt again about the row direction by 10 degrees (Rodrigues)
    k, a = row, np.radians(10.0)
    col2 = col * np.cos(a) + np.cross(k, col) * np.sin(a) + k * np.dot(k, col) * (1 - np.cos(a))
    plane, obliquity = classify_plane(np.concatenate([row, col2]))
    normal = np.abs(np.cross(row, col2))
    assert plane == "sagittal"
    assert obliquity == pytest.approx(np.degrees(np.arccos(normal.max())))
    assert 10.0 < obliquity < 20.0


@pytest.mark.parametrize(
    ("cosines", "message"),
    [
        ((1.0, 0.0, 0.0, 0.0, 1.0), "6 values"),
        ((1.0, 0.0, 0.0, 0.0, 0.0, 0.0), "column cosines must be a unit vector"),
        ((1.0, 0.0, 0.0, 0.6, 0.8, 0.0), "orthogonal"),
        ((np.nan, 0.0, 0.0, 0.0, 1.0, 0.0), "finite"),
    ],
)
def test_invalid_orientation_is_a_specific_error(cosines: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classify_plane(cosines)


def test_tolerance_out_of_range() -> None:
    with pytest.raises(ValueError, match="oblique_tolerance_deg"):
        classify_plane(CARDINAL_ORIENTATIONS["axial"], oblique_tolerance_deg=120.0)


def _scan_one(folder: Path) -> SeriesInfo:
    (info,) = scan_folder(folder)
    return info


def test_localizer_by_image_type_planes_slices_and_description(tmp_path: Path) -> None:
    volume = pattern_volume(12, 16, 16)
    geometry = Geometry()

    write_classic_series(tmp_path / "real", volume, geometry)
    real = _scan_one(tmp_path / "real")
    assert not is_localizer(real)

    header = SeriesHeader(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), series_description="survey")
    write_classic_series(tmp_path / "typed", volume, geometry, header)
    assert is_localizer(_scan_one(tmp_path / "typed"))

    # a 3-plane localizer: nine slices, three in each plane, one series
    planes = ["sagittal"] * 3 + ["coronal"] * 3 + ["axial"] * 3
    offsets = [(-5.0 + 5 * (i % 3)) for i in range(9)]
    orientations = [CARDINAL_ORIENTATIONS[p] for p in planes]
    positions = []
    for p, d in zip(planes, offsets):
        n = Geometry(orientation=CARDINAL_ORIENTATIONS[p]).normal
        positions.append(tuple(np.array([-6.0, -6.0, 6.0]) + d * n))
    header = SeriesHeader(series_description="AX COR SAG", image_type=("ORIGINAL", "PRIMARY", "M", "NONE"))
    write_classic_series(
        tmp_path / "tri",
        pattern_volume(9, 16, 16),
        geometry,
        header,
        positions=positions,
        orientations=orientations,
    )
    tri = _scan_one(tmp_path / "tri")
    assert tri.orientation is None and tri.orientation_count == 3 and tri.plane is None
    assert is_localizer(tri)

    write_classic_series(
        tmp_path / "few", pattern_volume(2, 16, 16), geometry, SeriesHeader(series_description="T1 SAG")
    )
    assert is_localizer(_scan_one(tmp_path / "few"))

    write_classic_series(tmp_path / "named", volume, geometry, SeriesHeader(series_description="3-PLANE LOC"))
    assert is_localizer(_scan_one(tmp_path / "named"))
