"""Resident memory of the node's models: one model, and the three joints' models with and
without sharing identical backbones (:class:`inference.model_set.ModelSet`).

Each case runs in a fresh Python process that imports torch and MONAI, records its resident
set size (VmRSS), loads the models as the node does and records it again; the difference is
what the models cost.  The three demo models are the default (``orthonode train demo``
writes them):

    .venv/bin/python benchmarks/model_memory.py --out benchmarks/results/model_memory.md
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = {joint: REPO / "models" / f"demo-{joint}.pt" for joint in ("knee", "ankle", "shoulder")}

CHILD = r"""
import gc, json, sys
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import torch, monai  # noqa: F401 - the import cost is not the models'
from inference.checkpoint import ModelBundle
from inference.model_set import ModelSet
torch.set_num_threads(1)
paths, share = json.loads(sys.argv[1]), sys.argv[2] == "1"
gc.collect()
before = rss_mb()
bundles = {joint: ModelBundle.load(path) for joint, path in paths.items()}
models = ModelSet(bundles, share=share)
del bundles
gc.collect()
after = rss_mb()
params = {id(p): p.numel() * p.element_size() for _, b in models for net in (b.classifier, b.segmenter)
          if net is not None for p in net.parameters()}
print(json.dumps({"before_mb": before, "after_mb": after, "shared": len(models.shared),
                  "distinct_parameter_mb": sum(params.values()) / 2**20}))
"""


def measure(paths: dict[str, Path], share: bool) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({k: str(v) for k, v in paths.items()}), "1" if share else "0"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", metavar="JOINT=FILE",
                        help="a model per joint (default: the three demo models in models/)")
    parser.add_argument("--repeat", type=int, default=3, help="processes per case; the median is reported")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    args = parser.parse_args()
    paths = dict(DEFAULT_MODELS)
    if args.model:
        paths = {k: Path(v) for k, v in (item.split("=", 1) for item in args.model)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        print(f"missing model file(s): {', '.join(missing)} (orthonode train demo writes the demo models)",
              file=sys.stderr)
        return 2
    first = next(iter(paths))
    cases = [(f"the {first} model alone", {first: paths[first]}, True),
             (f"{len(paths)} models, backbones shared", paths, True),
             (f"{len(paths)} models, each its own copy", paths, False)]
    rows = []
    for name, case_paths, share in cases:
        runs = sorted((measure(case_paths, share) for _ in range(args.repeat)),
                      key=lambda r: r["after_mb"] - r["before_mb"])
        median = runs[len(runs) // 2]
        rows.append((name, median))
        print(f"{name}: +{median['after_mb'] - median['before_mb']:.0f} MB resident "
              f"({median['distinct_parameter_mb']:.1f} MB of distinct parameters, {median['shared']} backbones shared)")
    lines = [
        "# Resident memory of the node's models",
        "",
        f"Command: `.venv/bin/python benchmarks/model_memory.py{' ' if args.model else ''}"
        f"{' '.join('--model ' + m for m in args.model or [])} --out benchmarks/results/model_memory.md`",
        f"Machine: {platform.machine()}, {platform.system()} {platform.release()}, Python {platform.python_version()}; "
        f"median of {args.repeat} fresh processes per case, torch and MONAI imported before the first reading.",
        "",
        "Models: " + ", ".join(f"{joint} `{p.relative_to(REPO) if p.is_relative_to(REPO) else p}`"
                               for joint, p in paths.items()),
        "",
        "| case | resident memory added by loading (MB) | distinct parameters (MB) | backbones shared |",
        "|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['after_mb'] - r['before_mb']:.0f} | {r['distinct_parameter_mb']:.1f} | {r['shared']} |")
    lines += ["", "Resident memory includes the allocator's slack; the parameter column counts each tensor once."]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
