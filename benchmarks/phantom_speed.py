"""How long one phantom case takes to generate, and where the time goes.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/phantom_speed.py --joint knee --cases 3 --matrix 256

Generates ``--cases`` cases into a temporary folder (explicit VR, no preview) with the real
anatomical models, and prints per case the wall time and its split into anatomy evaluation,
the rest of the acquisition (contrast, partial volume, bias, noise) and DICOM/NIfTI writing,
then the median.  Wall time is what a user waits on an idle core; the CPU time of the process
is printed too because it stays meaningful on a machine shared with other work.  The figure
is meant to be compared between versions of the generator on the same machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


class _TimedSource:
    """Wraps the case source to time ``Anatomy.evaluate``."""

    def __init__(self, source) -> None:
        self._source = source
        self.evaluate_s = 0.0
        self.points = 0

    def sample_case(self, joint, rng, case_id, site):
        return self._source.sample_case(joint, rng, case_id, site)

    def build_anatomy(self, spec):
        anatomy = self._source.build_anatomy(spec)
        original = anatomy.evaluate
        timer = self

        def evaluate(points):
            started = time.perf_counter()
            result = original(points)
            timer.evaluate_s += time.perf_counter() - started
            timer.points += len(points)
            return result

        anatomy.evaluate = evaluate  # instance attribute shadows the method
        return anatomy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--joint", default="knee", choices=("knee", "ankle", "shoulder"))
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from training.phantoms import generate

    source = _TimedSource(generate.default_case_source())
    write_s = 0.0
    original_write = generate.write_series

    def timed_write(*a, **k):
        nonlocal write_s
        started = time.perf_counter()
        result = original_write(*a, **k)
        write_s += time.perf_counter() - started
        return result

    generate.write_series = timed_write
    totals: list[float] = []
    cpu_totals: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.cases):
            source.evaluate_s, source.points, write_s = 0.0, 0, 0.0
            started, cpu_started = time.perf_counter(), time.process_time()
            case = generate.generate_case(Path(tmp), args.joint, index, seed=args.seed, matrix=args.matrix, case_source=source)
            total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            totals.append(total)
            cpu_totals.append(cpu)
            images = sum(s.plan.n_images for s in case.series)
            print(
                f"{case.spec.case_id}: {total:5.2f} s total ({cpu:5.2f} s CPU) | anatomy.evaluate {source.evaluate_s:5.2f} s "
                f"({source.points / 1e6:.1f} M points) | DICOM+NIfTI writing {write_s:4.2f} s | "
                f"other {total - source.evaluate_s - write_s:4.2f} s | {len(case.series)} series, {images} images"
            )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"median {statistics.median(totals):.2f} s wall, {statistics.median(cpu_totals):.2f} s CPU per {args.joint} case at matrix {args.matrix} "
          f"({platform.machine()}, {os.cpu_count()} logical CPUs, 1-min load {load:.1f}, Python {platform.python_version()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
