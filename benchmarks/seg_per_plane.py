"""How well the sagittal label map, carried into the coronal and axial series, matches their truth.

The node segments the sagittal series and writes a SEG on every plane by resampling that one
label map through the shared Frame of Reference (:func:`inference.plane_mapping.map_label_map`).
This measures the mapping itself, independent of any model: for phantom knees, the phantom's
own sagittal ground-truth label map is mapped into each series with each resampling rule and
compared (Dice per structure) with the phantom's ground truth of that series, which the
phantom computes from the anatomy on that series' grid (majority label of each voxel's
sub-samples).  The sagittal row is the round trip onto its own grid.

Also reported: the share of each series' truth that lies outside the sagittal series' field of
view (it cannot be mapped; those voxels stay background), and the seconds per mapping.

    .venv/bin/python benchmarks/seg_per_plane.py --cases 10 --matrix 256 \\
        --out benchmarks/results/seg_per_plane.md
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from inference.labels import KNEE_STRUCTURES, PLANES
from inference.plane_mapping import map_label_map
from inference.series import load_series
from training.datasets import read_phantom_folder
from training.metrics import dice_per_structure
from training.phantoms.generate import generate_dataset

#: (rule, footprint) pairs measured; footprint only matters to the vote rules
VARIANTS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("nearest", (3, 2)),
    ("label_linear", (3, 2)),
    ("label_gaussian", (3, 2)),
    ("majority", (3, 1)),
    ("majority", (3, 2)),
    ("linear_majority", (3, 1)),
    ("linear_majority", (3, 2)),
)


def variant_name(rule: str, footprint: tuple[int, int]) -> str:
    if rule in ("majority", "linear_majority"):
        return f"{rule} {footprint[0]}x{footprint[1]}x{footprint[1]}"
    return rule


def measure(root: Path) -> tuple[dict, dict, dict, list[str]]:
    """Dice per (plane, variant, structure) over the cases, seconds per (plane, variant), and
    the share of truth outside the sagittal field of view per plane."""
    dice: dict[tuple[str, str], dict[str, list[float]]] = {}
    seconds: dict[tuple[str, str], list[float]] = {}
    outside: dict[str, list[float]] = {}
    geometry: list[str] = []
    for record in read_phantom_folder(root):
        volumes = {plane: load_series(source.series) for plane, source in record.planes.items()}
        truth = {plane: source.load_mask().astype(np.uint8) for plane, source in record.planes.items()}
        sagittal = volumes["sagittal"]
        geometry.append(
            f"{record.exam_id}: " + ", ".join(
                f"{p} {v.pixels.shape[1]}x{v.pixels.shape[2]}x{v.pixels.shape[0]} "
                f"{v.spacing[0]:.2f} mm, step {v.spacing[2]:.1f} mm, {v.info.obliquity_deg or 0:.0f} deg"
                for p, v in volumes.items()
            )
        )
        for plane in PLANES:
            if plane not in volumes:
                continue
            covered = map_label_map(np.ones_like(truth["sagittal"]), sagittal, volumes[plane], "nearest") > 0
            outside[plane] = outside.get(plane, []) + [float(((truth[plane] > 0) & ~covered).sum() / max(1, (truth[plane] > 0).sum()))]
            for rule, footprint in VARIANTS:
                name = variant_name(rule, footprint)
                started = time.perf_counter()
                mapped = map_label_map(truth["sagittal"], sagittal, volumes[plane], rule, footprint=footprint)
                seconds.setdefault((plane, name), []).append(time.perf_counter() - started)
                for key, value in dice_per_structure(mapped, truth[plane]).items():
                    if value is not None:
                        dice.setdefault((plane, name), {}).setdefault(key, []).append(value)
    return dice, seconds, outside, geometry


def table(dice: dict, seconds: dict, outside: dict, n_cases: int) -> list[str]:
    keys = [s.key for s in KNEE_STRUCTURES]
    lines = []
    for plane in PLANES:
        names = [name for (p, name) in dice if p == plane]
        if not names:
            continue
        lines += [
            f"### {plane} ({n_cases} cases; truth outside the sagittal field of view: "
            f"{100 * float(np.mean(outside[plane])):.2f} % of its structure voxels)",
            "",
            "| rule | s per mapping | mean | " + " | ".join(keys) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " |",
        ]
        best = max(names, key=lambda n: np.mean([np.mean(v) for v in dice[(plane, n)].values()]))
        for name in names:
            per = dice[(plane, name)]
            mean = float(np.mean([np.mean(v) for v in per.values()]))
            cells = [f"{np.mean(per[k]):.3f}" if k in per else "-" for k in keys]
            label = f"**{name}**" if name == best else name
            lines.append(f"| {label} | {np.mean(seconds[(plane, name)]):.2f} | {mean:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10, help="phantom knees (default 10)")
    parser.add_argument("--matrix", type=int, default=256, help="phantom in-plane matrix (default 256)")
    parser.add_argument("--seed", type=int, default=2026, help="phantom seed (default 2026)")
    parser.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be at least 1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seg_per_plane_") as tmp:
        root = Path(tmp) / "knee"
        generate_dataset(root, "knee", args.cases, seed=args.seed, matrix=args.matrix)
        dice, seconds, outside, geometry = measure(root)
    command = " ".join(["python", "benchmarks/seg_per_plane.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"Mean Dice per structure of the phantom's sagittal truth mapped into each series vs that series' "
        f"own truth; {args.cases} phantom knees (seed {args.seed}, matrix {args.matrix}); the best mean per "
        "plane in bold.",
        "",
        *table(dice, seconds, outside, args.cases),
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"{platform.platform()}; {time.perf_counter() - started:.0f} s in all.  Command: `{command}`",
        "",
        "Series of the cases (in-plane matrix, pixel, slice step, obliquity):",
        "",
        *[f"- {line}" for line in geometry],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
