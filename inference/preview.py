"""PNG previews of a predicted study: key slices per plane with the segmentation overlaid.

For a person checking a result without a DICOM viewer: one image per plane, three key slices
of the series the model used (the slices with the most segmented voxels, or evenly spaced
slices when nothing was segmented), the label map drawn over them in the structures' display
colours, and the findings printed underneath.  Matplotlib runs with the Agg backend (no
display needed); pixels are shown as stored, rows down and columns right, as a viewer shows a
slice.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.labels import KNEE_STRUCTURES, PLANES

if TYPE_CHECKING:
    from inference.series import SeriesVolume
    from inference.sr_writer import Finding

__all__ = ["key_slices", "write_previews"]

#: slices shown per plane
KEY_SLICES = 3


def key_slices(label_map: np.ndarray | None, num_slices: int, count: int = KEY_SLICES) -> list[int]:
    """Indices of the ``count`` slices to show, in ascending order.

    With a label map, the slices holding the most labelled voxels (the structures are what a
    reader checks); otherwise slices at 1/4, 1/2 and 3/4 of the series.
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be positive, got {num_slices}")
    count = min(count, num_slices)
    if label_map is not None:
        if label_map.shape[0] != num_slices:
            raise ValueError(f"label_map has {label_map.shape[0]} slices; the series has {num_slices}")
        per_slice = np.count_nonzero(label_map.reshape(num_slices, -1), axis=1)
        if per_slice.any():
            order = np.argsort(-per_slice, kind="stable")[:count]
            return sorted(int(i) for i in order)
    positions = np.linspace(0, num_slices - 1, count + 2)[1:-1] if count > 1 else [num_slices // 2]
    return sorted({int(round(p)) for p in positions})


def _colour_table() -> np.ndarray:
    """RGBA per structure index from sr_templates/structures.yaml (the SEG display colours)."""
    from sr_templates import load_structures

    table = np.zeros((len(KNEE_STRUCTURES) + 1, 4), dtype=np.float32)
    for template in load_structures():
        index = next((s.index for s in KNEE_STRUCTURES if s.key == template.key), None)
        if index is not None:
            table[index, :3] = np.asarray(template.color_rgb, dtype=np.float32) / 255.0
            table[index, 3] = 0.45
    return table


def write_previews(
    out_dir: Path,
    volumes: Mapping[str, SeriesVolume],
    label_maps: Mapping[str, np.ndarray],
    findings: Sequence[Finding],
    missing_planes: Sequence[str] = (),
) -> list[Path]:
    """Write ``<out_dir>/<plane>.png`` for every plane in ``volumes``; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = _colour_table()
    text = [f.text() for f in findings] or ["(no classifier in this model)"]
    if missing_planes:
        text.append(f"Missing planes: {', '.join(missing_planes)}")
    paths: list[Path] = []
    for plane in PLANES:
        if plane not in volumes:
            continue
        volume = volumes[plane]
        pixels = volume.pixels
        labels = label_maps.get(plane)
        if labels is not None and labels.shape != pixels.shape:
            raise ValueError(f"{plane}: label map {labels.shape} does not match the series {pixels.shape}")
        indices = key_slices(labels, pixels.shape[0])
        low, high = np.percentile(pixels, [1.0, 99.5])
        fig, axes = plt.subplots(1, len(indices), figsize=(4 * len(indices), 4.2 + 0.16 * len(text)), squeeze=False)
        for ax, index in zip(axes[0], indices):
            ax.imshow(pixels[index], cmap="gray", vmin=float(low), vmax=float(max(high, low + 1e-6)))
            if labels is not None:
                ax.imshow(colours[np.minimum(labels[index], len(colours) - 1)], interpolation="nearest")
            ax.set_title(f"{plane} slice {index + 1}/{pixels.shape[0]}", fontsize=9)
            ax.axis("off")
        if labels is not None:
            shown = sorted({int(v) for i in indices for v in np.unique(labels[i]) if v > 0})
            names = {s.index: s.name for s in KNEE_STRUCTURES}
            handles = [Patch(color=colours[v, :3], label=names.get(v, str(v))) for v in shown if v < len(colours)]
            if handles:
                fig.legend(handles=handles, loc="lower right", fontsize=7, ncol=2, frameon=False)
        fig.suptitle(f"{volume.info.label()} - research use only, not verified by a physician", fontsize=10)
        fig.text(0.01, 0.01, "\n".join(text), fontsize=8, family="monospace", va="bottom")
        fig.subplots_adjust(bottom=min(0.6, 0.04 + 0.16 * len(text) / (4.2 + 0.16 * len(text))), top=0.9)
        path = out_dir / f"{plane}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
