"""A PNG montage of one phantom case, for a person to check what was generated.

One column per diagnostic plane (the central slice of the primary sagittal, coronal and axial
series), displayed with the series' own window: the image as acquired on the top row and, for
the knee, the same slice with the structure mask overlaid in colour below it, so the signal
under the mask can still be judged.  The case's positive labels and acquisition details are
printed underneath.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from inference.labels import JOINT_LABELS, KNEE_STRUCTURES, PLANES
from training.phantoms.acquisition import AcquiredSeries
from training.phantoms.anatomy import CaseSpec


def _central(series: AcquiredSeries) -> tuple[np.ndarray, np.ndarray]:
    stack_pixels, stack_struct = series.pixels[0], series.structures[0]
    k = stack_pixels.shape[0] // 2
    return stack_pixels[k].astype(np.float32), stack_struct[k]


def write_preview(path: Path, spec: CaseSpec, series: list[AcquiredSeries]) -> Path:
    """Write the montage of ``spec``'s primary series to ``path`` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    primary = {s.plan.plane: s for s in series if s.plan.role == "primary"}
    missing = [plane for plane in PLANES if plane not in primary]
    if missing:
        raise ValueError(f"case {spec.case_id}: no primary series for plane(s) {missing}")
    n_struct = len(KNEE_STRUCTURES)
    colours = plt.get_cmap("tab20")(np.linspace(0.0, 1.0, n_struct + 1))
    colours[0, 3] = 0.0  # background transparent
    colours[1:, 3] = 0.35
    overlay_map = ListedColormap(colours)

    rows = 2 if spec.joint == "knee" else 1
    fig, axes = plt.subplots(rows, len(PLANES), figsize=(4.2 * len(PLANES), 4.4 * rows + 0.8), dpi=90, squeeze=False)
    for col, plane in enumerate(PLANES):
        acquired = primary[plane]
        image, structure = _central(acquired)
        center, width = acquired.window
        for row in range(rows):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=center - width / 2, vmax=center + width / 2, interpolation="nearest")
            if row == 1 and structure.any():
                ax.imshow(structure, cmap=overlay_map, vmin=0, vmax=n_struct, interpolation="nearest")
            ax.set_axis_off()
        plan = acquired.plan
        axes[0, col].set_title(
            f"{plan.series_number}: {plan.description}\n{plan.sequence}, oblique {plan.oblique_deg:.0f} deg", fontsize=9
        )
    names = {label.key: label.name for label in JOINT_LABELS[spec.joint]}
    positive = [names[key] for key, value in spec.labels.items() if value]
    ehr = ", ".join(
        f"{name} {value}"
        for name, value in (("age", spec.age), ("sex", spec.sex), ("height", spec.height_m), ("weight", spec.weight_kg))
        if value is not None
    )
    fig.suptitle(f"{spec.case_id} ({spec.joint}, {spec.laterality}, {spec.site}) {ehr}", fontsize=10)
    fig.text(0.5, 0.02, "Positive: " + ("; ".join(positive) if positive else "none"), ha="center", fontsize=9, wrap=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path
