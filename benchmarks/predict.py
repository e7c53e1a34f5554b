"""Time ``run_study`` per stage, and its peak memory, for the small and the paper-size model.

One phantom knee study (three planes, uncompressed, ``--matrix`` pixels) goes through the
whole pipeline: scan + decode, preprocessing (input slabs, sliding windows, resizing back),
the networks (fused three-plane classifier with EHR, segmenter over every sagittal slice),
and writing one SEG and the SR.  The networks hold seeded random weights: timings and memory
do not depend on what the weights learned.

Each preset runs in its own process so that its peak resident memory (``ru_maxrss``) is its
own; on CUDA the peak allocated GPU memory is reported too.

    .venv/bin/python benchmarks/predict.py --presets small paper --threads 2 \\
        --out benchmarks/results/predict.md
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

#: stages of the table, each a sum of :data:`inference.pipeline.STAGES` entries
COLUMNS: dict[str, tuple[str, ...]] = {
    "read/decode (s)": ("scan", "load"),
    "select (s)": ("select",),
    "preprocess (s)": ("preprocess",),
    "model (s)": ("model",),
    "write (s)": ("write",),
    "total (s)": ("total",),
}


def build_bundle(preset: str, seed: int = 0) -> Any:
    """A knee bundle of ``preset`` with seeded random weights (classifier on 3 planes + EHR, segmenter)."""
    import torch

    from inference.checkpoint import ModelBundle, ModelCard
    from inference.labels import JOINT_LABELS, KNEE_STRUCTURES, PLANES
    from inference.model import PRESETS, OrthoDiffusionClassifier, OrthoDiffusionSegmenter
    from inference.preprocess import PreprocessConfig

    cfg = PRESETS[preset]
    labels = JOINT_LABELS["knee"]
    depth, height, width = cfg.input_shape
    card = ModelCard(
        name=f"benchmark-{preset}",
        version="benchmark",
        joint="knee",
        labels=[label.key for label in labels],
        label_names=[label.name for label in labels],
        structures=[s.key for s in KNEE_STRUCTURES],
        thresholds={label.key: 0.5 for label in labels},
        planes=list(PLANES),
        use_ehr=True,
        model=cfg.to_dict(),
        preprocess=PreprocessConfig(depth=depth, size=(height, width)).to_dict(),
        training_data={
            "description": "untrained, seeded random weights (benchmark only)",
            "segmenter": {"planes": ["sagittal"]},
        },
    )
    torch.manual_seed(seed)
    classifier = OrthoDiffusionClassifier(cfg, PLANES, len(labels), use_ehr=True)
    segmenter = OrthoDiffusionSegmenter(cfg, len(KNEE_STRUCTURES) + 1)
    return ModelBundle(card, classifier, segmenter)


def worker(preset: str, study: Path, device: str, threads: int, repeat: int) -> dict[str, Any]:
    """Run the study ``repeat`` times with ``preset``; the run with the median total is reported."""
    import torch

    from inference.pipeline import Outcome, run_study

    torch.set_num_threads(threads)
    bundle = build_bundle(preset)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            result = run_study(study, bundle, Path(tmp) / f"run{i}", device=device)
            if result.outcome is not Outcome.COMPLETE:
                raise RuntimeError(f"benchmark study was not interpreted: {result.outcome.value}: {result.reason}")
            runs.append(result)
    runs.sort(key=lambda r: r.timings["total"])
    chosen = runs[len(runs) // 2]
    row: dict[str, Any] = {
        "preset": preset,
        "device": chosen.device,
        "series": {p: f"{c.num_slices} slices" for p, c in chosen.chosen.items()},
        "timings": chosen.timings,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_gpu_mib": None,
        "runs": repeat,
    }
    if chosen.device.startswith("cuda"):
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def _machine(device: str, threads: int) -> str:
    import torch

    from inference.checkpoint import pick_device

    picked = pick_device(device)
    if picked.type == "cuda":
        return f"{torch.cuda.get_device_name(picked)} (autocast)"
    return f"{platform.processor() or platform.machine()} CPU, {threads} torch thread(s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "paper"])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--matrix", type=int, default=256, help="phantom acquisition matrix (default %(default)s)")
    parser.add_argument("--study", type=Path, help="use this study folder instead of generating a phantom")
    parser.add_argument("--repeat", type=int, default=1, help="runs per preset (the median run is reported)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one preset in a child process
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    if args.worker:
        print(json.dumps(worker(args.worker, args.study, args.device, args.threads, args.repeat)))
        return 0

    from inference.model import PRESETS

    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        parser.error(f"--presets: unknown preset(s) {unknown}; presets are {sorted(PRESETS)}")
    with tempfile.TemporaryDirectory() as tmp:
        study = args.study
        if study is None:
            from training.phantoms.generate import generate_dataset

            generate_dataset(Path(tmp) / "knee", "knee", 1, seed=0, matrix=args.matrix)
            study = Path(tmp) / "knee" / "knee_0001" / "dicom"
        rows = []
        for preset in args.presets:
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", preset, "--study", str(study),
                       "--device", args.device, "--threads", str(args.threads), "--repeat", str(args.repeat)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                raise SystemExit(f"benchmark of preset {preset!r} failed (exit {done.returncode})")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    shapes = {p: "x".join(map(str, PRESETS[p].input_shape)) for p in args.presets}
    lines = [
        "# Inference pipeline timings per stage (one knee study)",
        "",
        f"Device: {_machine(args.device, args.threads)}; Python {platform.python_version()}.",
        "Command: `" + " ".join([".venv/bin/python benchmarks/predict.py", *(sys.argv[1:] if argv is None else argv)])
        + "`",
        f"Study: {'phantom knee, matrix ' + str(args.matrix) if args.study is None else args.study}; "
        f"series used: {rows[0]['series']}.  The classifier sees every plane; the segmenter every sagittal slice.",
        "",
        "| preset | input | " + " | ".join(COLUMNS) + " | peak RSS (MiB) | peak GPU (MiB) |",
        "| --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " | ---: | ---: |",
    ]
    for row in rows:
        cells = [f"{sum(row['timings'][s] for s in stages):.2f}" for stages in COLUMNS.values()]
        gpu = "-" if row["peak_gpu_mib"] is None else f"{row['peak_gpu_mib']:.0f}"
        lines.append(
            f"| {row['preset']} | 1x{shapes[row['preset']]} | " + " | ".join(cells)
            + f" | {row['peak_rss_mib']:.0f} | {gpu} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
