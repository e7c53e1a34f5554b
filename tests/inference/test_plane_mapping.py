"""The sagittal label map carried into the coronal and axial series, tested on the mapping alone.

A phantom knee's own sagittal ground truth is mapped into its coronal and axial series and
compared with the phantom's ground truth of those series (computed by the phantom from the
anatomy on each grid), so no model is involved: a wrong axis, slice order, origin or
direction shows up as a low Dice.  The phantom is planned oblique (its sagittal series
tilted along the knee), where geometry bugs hide.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.labels import STRUCTURE_INDEX
from inference.plane_mapping import DEFAULT_RULE, RULES, MappingError, footprint_offsets, map_label_map
from inference.series import SeriesVolume, load_series

#: bones are large and smooth; the mapping must keep them (measured 0.95-0.98 at matrix 64)
MIN_BONE_DICE = 0.9


def _dice(a: np.ndarray, b: np.ndarray, index: int) -> float:
    x, y = a == index, b == index
    return float(2.0 * np.count_nonzero(x & y) / max(np.count_nonzero(x) + np.count_nonzero(y), 1))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, SeriesVolume], dict[str, np.ndarray]]:
    """Series and ground-truth label maps per plane of one oblique phantom knee (matrix 64)."""
    from training.datasets import read_phantom_folder
    from training.phantoms.generate import generate_case, write_cases_csv

    root = tmp_path_factory.mktemp("plane_mapping") / "knee"
    case = generate_case(root, "knee", 0, seed=8, matrix=64, oblique=True)
    write_cases_csv(root / "cases.csv", [case.spec])
    (record,) = read_phantom_folder(root)
    volumes = {plane: load_series(source.series) for plane, source in record.planes.items()}
    truth = {plane: source.load_mask().astype(np.uint8) for plane, source in record.planes.items()}
    assert set(volumes) == {"sagittal", "coronal", "axial"}
    assert (volumes["sagittal"].info.obliquity_deg or 0.0) > 3.0, "the phantom's sagittal series is not oblique"
    return volumes, truth


@pytest.mark.parametrize("plane", ["coronal", "axial"])
def test_sagittal_truth_mapped_into_each_plane_matches_its_truth(phantom, plane: str) -> None:
    volumes, truth = phantom
    mapped = map_label_map(truth["sagittal"], volumes["sagittal"], volumes[plane])
    assert mapped.dtype == np.uint8 and mapped.shape == truth[plane].shape
    dice = {key: _dice(mapped, truth[plane], STRUCTURE_INDEX[key]) for key in ("femur", "tibia", "patella")}
    assert min(dice["femur"], dice["tibia"]) >= MIN_BONE_DICE, dice
    assert dice["patella"] >= 0.8, dice
    # every structure the plane's truth holds is found there (thin ones with a lower overlap)
    present = [i for i in np.unique(truth[plane]) if i > 0]
    assert all(_dice(mapped, truth[plane], int(i)) > 0.4 for i in present)
    # a geometry error of two pixels costs Dice: the bar is not met by a misplaced map
    shifted = np.roll(mapped, 2, axis=2)
    assert _dice(shifted, truth[plane], STRUCTURE_INDEX["femur"]) < dice["femur"] - 0.02


def test_the_default_rule_beats_nearest_neighbour(phantom) -> None:
    """The partial-volume vote is the measured best (benchmarks/results/seg_per_plane.md); on
    this phantom too it is at least as good as nearest neighbour on average."""
    volumes, truth = phantom

    def mean_dice(rule: str) -> float:
        scores = []
        for plane in ("coronal", "axial"):
            mapped = map_label_map(truth["sagittal"], volumes["sagittal"], volumes[plane], rule)
            scores += [_dice(mapped, truth[plane], int(i)) for i in np.unique(truth[plane]) if i > 0]
        return float(np.mean(scores))

    assert mean_dice(DEFAULT_RULE) >= mean_dice("nearest")


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_maps_a_series_onto_itself(phantom, rule: str) -> None:
    """Onto its own grid the label map comes back (exactly for the point rules)."""
    volumes, truth = phantom
    sagittal = volumes["sagittal"]
    mapped = map_label_map(truth["sagittal"], sagittal, sagittal, rule)
    if rule in ("nearest", "label_linear", "majority"):
        np.testing.assert_array_equal(mapped, truth["sagittal"])
    else:
        assert _dice(mapped, truth["sagittal"], STRUCTURE_INDEX["femur"]) > 0.95


def test_footprint_covers_the_voxel(phantom) -> None:
    volumes, _ = phantom
    coronal = volumes["coronal"]
    offsets = footprint_offsets(coronal, 3, 2)
    assert offsets.shape == (12, 3)
    np.testing.assert_allclose(offsets.mean(axis=0), 0.0, atol=1e-9)
    along = offsets @ coronal.normal
    thickness = coronal.info.slice_thickness
    np.testing.assert_allclose(sorted(set(np.round(along, 6))), [-thickness / 3, 0.0, thickness / 3], atol=1e-6)


def test_series_of_another_frame_of_reference_are_not_mapped(phantom) -> None:
    from dataclasses import replace

    volumes, truth = phantom
    other = replace(volumes["coronal"], info=replace(volumes["coronal"].info, frame_of_reference_uid="1.2.3.4"))
    with pytest.raises(MappingError, match="different Frames of Reference"):
        map_label_map(truth["sagittal"], volumes["sagittal"], other)
    none = replace(volumes["coronal"], info=replace(volumes["coronal"].info, frame_of_reference_uid=None))
    with pytest.raises(MappingError, match="without Frame of Reference"):
        map_label_map(truth["sagittal"], volumes["sagittal"], none)
    with pytest.raises(MappingError, match="does not fit"):
        map_label_map(truth["sagittal"][1:], volumes["sagittal"], volumes["coronal"])
    with pytest.raises(MappingError, match="uint8"):
        map_label_map(truth["sagittal"].astype(np.int64), volumes["sagittal"], volumes["coronal"])
    with pytest.raises(ValueError, match="rule must be one of"):
        map_label_map(truth["sagittal"], volumes["sagittal"], volumes["coronal"], "cubic")


def test_mapped_label_map_lands_where_the_target_series_says(tmp_path: Path) -> None:
    """Synthetic check independent of the phantoms: a box in the source, mapped into a series
    with another orientation, lies at the same patient coordinates there."""
    from inference.series import scan_folder
    from tests.inference.output_factory import make_series, new_study

    study = new_study()
    folder = tmp_path / "study"
    folder.mkdir()
    for plane, number in (("sagittal", 1), ("coronal", 2)):
        series = make_series(study, plane, oblique=plane == "coronal", slices=24, rows=40, columns=40,
                             pixel_spacing=(0.5, 0.5), slice_spacing=0.5, series_number=number)
        for i, ds in enumerate(series):
            ds.save_as(folder / f"{plane}_{i:03d}.dcm", enforce_file_format=True)
    volumes = {info.plane: load_series(info) for info in scan_folder(folder)}
    source, target = volumes["sagittal"], volumes["coronal"]
    label_map = np.zeros(source.pixels.shape, np.uint8)
    label_map[8:16, 12:28, 12:28] = 1
    mapped = map_label_map(label_map, source, target, "nearest")
    assert mapped.any()

    def patient(volume: SeriesVolume, mask: np.ndarray) -> np.ndarray:
        k, j, i = np.nonzero(mask)
        return (volume.affine() @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T

    centre_source = patient(source, label_map == 1).mean(axis=0)
    centre_target = patient(target, mapped == 1).mean(axis=0)
    assert np.linalg.norm(centre_source - centre_target) < 1.0, (centre_source, centre_target)
