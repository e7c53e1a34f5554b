"""One series' label map carried into another series of the study through the Frame of Reference.

The segmenter works on the sagittal series; radiologists also read coronal and axial images.
Every series of a study that shares one Frame of Reference UID is placed in the same patient
coordinates (LPS mm), so the sagittal label map, put on its series' geometry as a SimpleITK
image, can be resampled onto the grid of any other series: each target voxel takes the label
found at its place in the patient.  Nothing is registered or moved; series with different
Frames of Reference are not mapped (their coordinates are not comparable).

Rules (``rule=``), all SimpleITK resampling with the target series' exact geometry (its first
slice position, direction cosines, pixel spacing and slice step; oblique series included):

- ``nearest``: the label of the source voxel nearest to the target voxel centre.
- ``label_linear``: SimpleITK's per-label linear interpolation (``sitkLabelLinear``): each
  label's weight is interpolated between the eight surrounding source voxels and the heaviest
  label wins, a partial-volume rule at the voxel centre.
- ``label_gaussian``: the same with a Gaussian kernel (``sitkLabelGaussian``).
- ``majority``: the target voxel's own footprint (its slice thickness across, its pixel in
  plane) sampled at 3 x 2 x 2 points with ``nearest``, then the most frequent label
  (``sitk.LabelVoting``; a tie takes the centre's label).  This is how the phantoms define a
  series' ground truth from the anatomy (the majority label of the voxel's sub-samples).
- ``linear_majority``: the footprint vote over ``label_linear`` samples.

:data:`DEFAULT_RULE` is chosen from the measurements against the phantoms' own masks of each
series (benchmarks/results/seg_per_plane.md, ``benchmarks/seg_per_plane.py``): ``label_linear``
(mean Dice 0.890 coronal, 0.893 axial) is within 0.005 of the best rule, ``linear_majority``
(0.895, 0.896), at about a fifteenth of its time (0.4-0.6 s per plane at matrix 256 against
several seconds), and 0.017 above ``nearest``.  Target voxels
outside the source series' field of view are background.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK

    from inference.series import SeriesVolume

__all__ = ["DEFAULT_RULE", "RULES", "MappingError", "footprint_offsets", "map_label_map"]

#: the resampling rules :func:`map_label_map` knows
RULES: tuple[str, ...] = ("nearest", "label_linear", "label_gaussian", "majority", "linear_majority")
#: the rule the node uses: within 0.005 mean Dice of the best rule at a fifteenth of its time
DEFAULT_RULE = "label_linear"

#: sub-samples of a target voxel's footprint: across its thickness, and per in-plane axis
THROUGH_SAMPLES = 3
INPLANE_SAMPLES = 2
#: LabelVoting's value for a tie (no label of the structure table reaches it)
_UNDECIDED = 255


class MappingError(ValueError):
    """The label map cannot be carried into that series (another Frame of Reference, wrong shape)."""


def footprint_offsets(
    target: SeriesVolume, through: int = THROUGH_SAMPLES, inplane: int = INPLANE_SAMPLES
) -> np.ndarray:
    """(N, 3) LPS offsets (mm) of the sub-samples of one voxel of ``target`` from its centre.

    ``through`` points evenly across the slice thickness (Slice Thickness; the slice step
    when the series has none) and ``inplane`` x ``inplane`` across the pixel, each at the
    centre of its share of the voxel.
    """
    row_mm, col_mm, step_mm = target.spacing
    thickness = target.info.slice_thickness or step_mm
    row_dir = np.asarray(target.orientation[:3], dtype=np.float64)
    col_dir = np.asarray(target.orientation[3:], dtype=np.float64)
    t = ((np.arange(through) + 0.5) / through - 0.5) * thickness
    s = (np.arange(inplane) + 0.5) / inplane - 0.5
    ts, cs, rs = np.meshgrid(t, s * col_mm, s * row_mm, indexing="ij")
    return (
        ts.reshape(-1, 1) * target.normal
        + cs.reshape(-1, 1) * row_dir  # along a row: one column step is the column spacing
        + rs.reshape(-1, 1) * col_dir
    )


def _resample(image: SimpleITK.Image, target: SeriesVolume, interpolator: int, shift_mm: np.ndarray) -> SimpleITK.Image:
    import SimpleITK as sitk

    n_slices, rows, cols = target.pixels.shape
    row_mm, col_mm, step_mm = target.spacing
    direction = np.column_stack(
        [np.asarray(target.orientation[:3], float), np.asarray(target.orientation[3:], float), target.normal]
    )
    return sitk.Resample(
        image,
        [int(cols), int(rows), int(n_slices)],
        sitk.Transform(),  # identity: both series are in the same patient coordinates
        interpolator,
        tuple(float(v) for v in np.asarray(target.positions[0], float) + shift_mm),
        (float(col_mm), float(row_mm), float(step_mm)),
        tuple(float(v) for v in direction.reshape(-1)),
        0,
        sitk.sitkUInt8,
    )


def map_label_map(
    label_map: np.ndarray,
    source: SeriesVolume,
    target: SeriesVolume,
    rule: str = DEFAULT_RULE,
    *,
    footprint: tuple[int, int] = (THROUGH_SAMPLES, INPLANE_SAMPLES),
) -> np.ndarray:
    """The ``source`` series' label map resampled onto the grid of the ``target`` series.

    Args:
        label_map: ``(slices, rows, columns)`` uint8 on the source grid, slices in the
            source volume's order (``source.pixels``).
        source, target: loaded series (:func:`inference.series.load_series`) of one Frame
            of Reference.
        rule: one of :data:`RULES`.
        footprint: sub-samples of a target voxel for the two vote rules: across its
            thickness, and per in-plane axis (see :func:`footprint_offsets`).

    Returns:
        ``(slices, rows, columns)`` uint8 on the target grid, in ``target.pixels`` order (what
        :func:`inference.seg_writer.write_segmentation` expects for that series).

    Raises:
        MappingError: the series have different (or no) Frames of Reference, or the label
            map does not fit the source grid.
    """
    import SimpleITK as sitk

    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not isinstance(label_map, np.ndarray) or label_map.dtype != np.uint8:
        raise MappingError("label_map must be a uint8 numpy array (structure indices)")
    if label_map.shape != source.pixels.shape:
        raise MappingError(f"label_map shape {label_map.shape} does not fit the source series {source.pixels.shape}")
    source_for = str(source.info.frame_of_reference_uid or "").strip()
    target_for = str(target.info.frame_of_reference_uid or "").strip()
    if not source_for or not target_for:
        raise MappingError("a series without Frame of Reference UID cannot be placed in patient coordinates")
    if source_for != target_for:
        raise MappingError(
            f"series {source.info.series_instance_uid} and {target.info.series_instance_uid} have different Frames "
            "of Reference; their patient coordinates are not comparable"
        )
    image = source.to_sitk(label_map)
    centre = np.zeros(3)
    if rule in ("nearest", "label_linear", "label_gaussian"):
        interpolator = {
            "nearest": sitk.sitkNearestNeighbor,
            "label_linear": sitk.sitkLabelLinear,
            "label_gaussian": sitk.sitkLabelGaussian,
        }[rule]
        return sitk.GetArrayFromImage(_resample(image, target, interpolator, centre))
    interpolator = sitk.sitkNearestNeighbor if rule == "majority" else sitk.sitkLabelLinear
    samples = [_resample(image, target, interpolator, offset) for offset in footprint_offsets(target, *footprint)]
    for sample in samples[1:]:  # one voxel's sub-samples vote together: same grid for LabelVoting
        sample.CopyInformation(samples[0])
    voted = sitk.GetArrayFromImage(sitk.LabelVoting(samples, _UNDECIDED))
    ties = voted == _UNDECIDED
    if ties.any():
        voted[ties] = sitk.GetArrayFromImage(_resample(image, target, interpolator, centre))[ties]
    return voted
