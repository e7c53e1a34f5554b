"""Speed of ``Anatomy.evaluate`` for the three joint phantoms.

Evaluates one sampled case per joint on a sagittal grid that covers the model's imaging box
(voxel centres in slice/row/column order, as the acquisition simulator probes them) and on
the same number of points in random order (the worst case for the brick culling: the
sub-samples of scattered boundary voxels), in calls of at most 2 million points, one core.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/phantom_anatomy.py --points 15000000 \\
        --out benchmarks/results/phantom_anatomy.md
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from training.phantoms.cases import build_anatomy, sample_case

PER_CALL = 2_000_000


def sagittal_grid(center: np.ndarray, extent: np.ndarray, n_points: int) -> np.ndarray:
    """Voxel centres of a sagittal stack with square in-plane pixels covering ``extent``."""
    slices = 40
    inplane = int(np.sqrt(n_points / slices))
    x = np.linspace(-extent[0] / 2, extent[0] / 2, slices, dtype=np.float32)
    y = np.linspace(-extent[1] / 2, extent[1] / 2, inplane, dtype=np.float32)
    z = np.linspace(extent[2] / 2, -extent[2] / 2, inplane, dtype=np.float32)
    g = np.stack(np.meshgrid(x, z, y, indexing="ij"), axis=-1).reshape(-1, 3)[:, [0, 2, 1]]
    return g + center.astype(np.float32)


def timed_evaluate(anatomy, points: np.ndarray) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the
    figure that says what one free core would take."""
    start, cpu = time.perf_counter(), time.process_time()
    for s in range(0, len(points), PER_CALL):
        anatomy.evaluate(points[s:s + PER_CALL])
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=15_000_000, help="points per case (default 15 million)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    if args.points < 1000:
        parser.error(f"--points must be at least 1000, got {args.points}")
    rows = ["| joint | layers | points | grid wall s | grid CPU s | grid Mpts/CPU s | random wall s | random CPU s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for joint in ("knee", "ankle", "shoulder"):
        rng = np.random.default_rng(args.seed)
        spec = sample_case(joint, rng, f"bench-{joint}", "bench")
        anatomy = build_anatomy(spec)
        grid = sagittal_grid(anatomy.center, anatomy.extent_mm, args.points)
        t_grid = timed_evaluate(anatomy, grid)
        shuffled = grid[np.random.default_rng(1).permutation(len(grid))]
        t_rand = timed_evaluate(anatomy, shuffled)
        n = len(grid)
        rows.append(f"| {joint} | {len(anatomy.layers)} | {n} | {t_grid[0]:.2f} | {t_grid[1]:.2f} | "
                    f"{n / t_grid[1] / 1e6:.2f} | {t_rand[0]:.2f} | {t_rand[1]:.2f} |")
        print(rows[-1], flush=True)
    text = "\n".join([f"# Phantom anatomy evaluate speed\n\n{platform.processor() or platform.machine()}, "
                      f"Python {sys.version.split()[0]}, numpy {np.__version__}, one process\n", *rows, ""])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
