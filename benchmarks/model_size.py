"""Model sizes and CPU/GPU timings of the OrthoDiffusion presets.

Checks on the real sizes what the unit tests check at small widths: the paper preset maps a
1 x 16 x 256 x 256 volume to a 256 x 1 x 16 x 16 bottleneck, and reports per preset the
parameter counts (whole UNet, and the encoder + middle block that classification uses),
the time of one feature extraction (q_sample + encoder + middle block), of one full UNet
forward, and of one pre-training step (loss + backward).

    .venv/bin/python benchmarks/model_size.py --presets paper small tiny --threads 2 \\
        --out benchmarks/results/model_size.md
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from inference.model import PRESETS, DiffusionBackbone, FeatureExtractor, FeaturePoint, OrthoDiffusionSegmenter


def _timed(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _count(params: object) -> int:
    return sum(p.numel() for p in params)  # type: ignore[attr-defined]


def measure(name: str, device: torch.device, repeat: int, train_step: bool) -> dict[str, object]:
    cfg = PRESETS[name]
    torch.manual_seed(0)
    backbone = DiffusionBackbone(cfg).to(device).eval()
    extractor = FeatureExtractor(backbone, FeaturePoint(100, "mid_2"))
    x = torch.rand(1, 1, *cfg.input_shape, device=device) * 2 - 1
    with torch.no_grad():
        features = extractor(x)
    expected = (1, *cfg.bottleneck_shape)
    if tuple(features.shape) != expected:
        raise AssertionError(f"preset {name}: bottleneck {tuple(features.shape)}, expected {expected}")
    row: dict[str, object] = {
        "preset": name,
        "input": "1x" + "x".join(map(str, cfg.input_shape)),
        "bottleneck": "x".join(map(str, cfg.bottleneck_shape)),
        "unet_params": _count(backbone.parameters()),
        "encoder_mid_params": _count(backbone.parameters_for("mid_2")),
        "segmenter_head_params": _count(OrthoDiffusionSegmenter(cfg).head_parameters()),
    }
    t = torch.full((1,), 100, dtype=torch.long, device=device)
    with torch.no_grad():
        row["features_s"] = _timed(lambda: extractor(x), repeat, device)
        row["unet_forward_s"] = _timed(lambda: backbone(x, t), repeat, device)
    if train_step:
        backbone.train()

        def step() -> None:
            backbone.zero_grad(set_to_none=True)
            backbone.training_loss(x).backward()

        row["train_step_s"] = _timed(step, repeat, device)
    else:
        row["train_step_s"] = None
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["paper", "small", "tiny"], choices=sorted(PRESETS))
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--no-train-step-for", nargs="*", default=["paper"], metavar="PRESET",
                        help="presets whose training step is not timed (the paper size is slow on CPU)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)

    from inference.checkpoint import pick_device

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    skip_train = set(args.no_train_step_for) if device.type == "cpu" else set()
    rows = [measure(name, device, args.repeat, name not in skip_train) for name in args.presets]

    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s)"
    lines = [
        "# OrthoDiffusion model sizes and timings",
        "",
        f"Device: {machine}; torch {torch.__version__}; batch 1; median of {args.repeat} runs after one warm-up.",
        "Command: `" + " ".join(["benchmarks/model_size.py", *(sys.argv[1:] if argv is None else argv)]) + "`",
        "",
        "| preset | input | bottleneck | UNet params | encoder+mid params | seg decoder params "
        "| features (s) | UNet forward (s) | train step (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        step = "-" if r["train_step_s"] is None else f"{r['train_step_s']:.3f}"
        lines.append(
            f"| {r['preset']} | {r['input']} | {r['bottleneck']} | {r['unet_params']:,} | {r['encoder_mid_params']:,} "
            f"| {r['segmenter_head_params']:,} | {r['features_s']:.3f} | {r['unet_forward_s']:.3f} | {step} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
