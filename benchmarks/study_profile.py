"""Where a study's CPU time goes around the networks: ``run_study`` per stage, then profiled.

The issue's target is at most 0.5 s per knee study for everything but the networks (reading,
preprocessing, mapping the label map onto the other planes, writing the SEGs and the SR).
This measures that figure and, when it is missed, says where the time goes:

1. ``--studies`` phantom knees (matrix ``--matrix``) run through :func:`inference.pipeline.run_study`
   (what ``orthonode predict`` and the node call) ``--repeat`` times each, warm, without a
   profiler: per-stage seconds (``StudyResult.timings``) and "around the networks" = total
   minus the ``model`` stage (the network forwards);
2. one more run of the first study under :mod:`cProfile`: the cumulative time of the library
   calls that make up the stages (pydicom's writer, highdicom's SEG and SR constructors,
   SimpleITK's resampler, the header scan, pixel decoding), scaled to the unprofiled run, and
   the functions with the most cumulative time.

    .venv/bin/python benchmarks/study_profile.py --out benchmarks/results/study_profile.md

``--model FILE`` profiles a trained checkpoint; by default a ``small`` bundle with seeded
random weights (what the stages cost does not depend on the weights, but how many voxels
each structure holds does, a little, for the SEG).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

#: profile buckets: label -> (file path fragment, function name) whose cumulative time is summed
BUCKETS: tuple[tuple[str, str, str], ...] = (
    ("pydicom dcmwrite (saving SEGs and SR)", "pydicom/filewriter.py", "dcmwrite"),
    ("highdicom Segmentation() (3 SEGs)", "highdicom/seg/sop.py", "__init__"),
    ("highdicom Comprehensive3DSR() (SR content tree)", "highdicom/sr/sop.py", "__init__"),
    ("SimpleITK Resample (label map onto coronal + axial)", "SimpleITK/extra.py", "Resample"),
    ("header scan of the study folder", "inference/series.py", "scan_folder_report"),
    ("series load + pixel decode", "inference/series.py", "load_series"),
    ("network forwards (torch conv3d)", "~", "<built-in method torch.conv3d>"),
)


def _phantoms(work: Path, count: int, matrix: int) -> list[Path]:
    from training.phantoms.generate import generate_dataset

    root = work / "phantoms"
    generate_dataset(root, "knee", count, seed=0, matrix=matrix)
    return sorted({p.parent.parent for p in root.rglob("*.dcm")})


def _bucket_seconds(stats: pstats.Stats) -> dict[str, float]:
    found = {label: 0.0 for label, _, _ in BUCKETS}
    for (filename, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        for label, fragment, function in BUCKETS:
            if name == function and (fragment == "~" or filename.replace(os.sep, "/").endswith(fragment)):
                found[label] = max(found[label], ct)  # nested calls of one name: the outermost
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a knee checkpoint (default: small preset, random weights)")
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="warm runs per study (default %(default)s)")
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=25, help="functions listed from the profile")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from inference.checkpoint import ModelBundle
    from inference.pipeline import STAGES, run_study

    torch.set_num_threads(args.threads)
    if args.model is not None:
        bundle = ModelBundle.load(args.model)
        model_text = f"`{args.model}` ({bundle.card.name} {bundle.card.version})"
    else:
        from benchmarks.predict import build_bundle

        bundle = build_bundle("small")
        model_text = "`small` preset, seeded random weights"

    with tempfile.TemporaryDirectory(prefix="study-profile-") as tmp:
        work = Path(tmp)
        studies = _phantoms(work, args.studies, args.matrix)
        run_study(studies[0], bundle, work / "warm-up")
        runs: list[dict[str, float]] = []
        for i, study in enumerate(studies):
            for r in range(args.repeat):
                runs.append(dict(run_study(study, bundle, work / f"out-{i}-{r}").timings))
        stages = [*STAGES, "total"]
        median = {s: statistics.median(run.get(s, 0.0) for run in runs) for s in stages}
        around = [run["total"] - run.get("model", 0.0) for run in runs]

        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        profiled = run_study(studies[0], bundle, work / "profiled")
        profiler.disable()
        profiled_wall = time.perf_counter() - t0
        stats = pstats.Stats(profiler)
        buckets = _bucket_seconds(stats)
        listing = io.StringIO()
        pstats.Stats(profiler, stream=listing).sort_stats("cumulative").print_stats(args.top)

    first = runs[: args.repeat]
    first_around = statistics.median(run["total"] - run.get("model", 0.0) for run in first)
    profiled_around = profiled.timings["total"] - profiled.timings.get("model", 0.0)
    scale = first_around / profiled_around if profiled_around > 0 else 1.0
    lines = [
        "# A knee study's CPU time around the networks, per stage and profiled",
        "",
        f"Command: `.venv/bin/python benchmarks/{Path(__file__).name} {' '.join(argv or sys.argv[1:])}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__} at {args.threads} thread(s); load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end.",
        f"Model: {model_text}. Studies: {len(studies)} phantom knees, matrix {args.matrix} (three planes), "
        f"{args.repeat} warm runs each after one warm-up: {len(runs)} runs.",
        "",
        "## Per stage (median of the runs, seconds)",
        "",
        "| " + " | ".join(stages) + " | around the networks (total - model) |",
        "| " + " | ".join("---:" for _ in stages) + " | ---: |",
        "| " + " | ".join(f"{median[s]:.3f}" for s in stages)
        + f" | {statistics.median(around):.3f} ({min(around):.3f}-{max(around):.3f}) |",
        "",
        f"Target: at most 0.5 s around the networks. Measured median {statistics.median(around):.2f} s: "
        + ("met." if statistics.median(around) <= 0.5 else "**not met**."),
        "",
        "## Where the time goes (one profiled run of the first study)",
        "",
        f"Under cProfile the run took {profiled_wall:.2f} s; around the networks {profiled_around:.2f} s against "
        f"{first_around:.2f} s unprofiled (same study). The last column scales the profiled figures by that ratio, "
        f"{scale:.2f}: the profiler slows Python code, which is nearly all of the time around the networks, so the "
        "scaled figures estimate the unprofiled seconds (native rows, the SimpleITK resampler and the network "
        "forwards, are understated by it: read those unscaled).",
        "",
        "| library call | profiled cumulative (s) | scaled (s) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {label} | {seconds:.3f} | {seconds * scale:.3f} |" for label, seconds in buckets.items()]
    lines += [
        "",
        "Profiled run's stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in profiled.timings.items()),
        "",
        f"<details><summary>top {args.top} functions by cumulative time (profiled run)</summary>",
        "",
        "```",
        listing.getvalue().strip(),
        "```",
        "",
        "</details>",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
