"""The model at paper size on a GPU: correctness against the CPU, training step times, memory.

Checks, each written to ``OUT/gpu_check.json`` as soon as it finishes (a check that fails
records its error and the others still run):

* **correctness** - the same seeded paper-size networks and input on the CPU (float32) and on
  CUDA, in float32 (TF32 off) and under bf16 autocast (what the node and the trainer use):
  feature-extractor activations (relative error, cosine similarity), fused classifier
  probabilities (largest difference) and the segmenter's per-voxel argmax (agreement);
* **pretraining** - the real :func:`training.pretrain.pretrain` loop (bf16 autocast, Adam, EMA)
  on random volumes at the reference input size and batch, seconds per step after warm-up,
  peak GPU memory, and the resulting time for the reference's 21,500 steps;
* **fine-tuning** - one optimizer step of the fused three-plane classifier with EHR (batch 4)
  and of the segmenter (batch 2), backbones trained at the method's reduced rate: seconds per
  step and peak GPU memory.

Per-study inference time is measured by ``benchmarks/predict.py --device cuda``.

    python benchmarks/gpu_check.py --out OUT [--preset paper] [--pretrain-batch 10]
    python benchmarks/gpu_check.py --out OUT --preset tiny --device cpu   # checks the script itself

The networks hold seeded random weights: times, memory and numerical agreement do not depend
on what the weights learned.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_check")

REFERENCE_PRETRAIN_STEPS = 21_500  # docs/method.md


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def smooth_volume(shape: tuple[int, ...], seed: int) -> Any:
    """A (1, 1, D, H, W) volume in [-1, 1] with image-like spatial structure (upsampled noise)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    d, h, w = shape
    coarse = torch.randn((1, 1, max(2, d // 4), max(2, h // 16), max(2, w // 16)), generator=gen)
    vol = F.interpolate(coarse, size=(d, h, w), mode="trilinear", align_corners=False)
    vol = vol - vol.amin()
    return vol / vol.amax().clamp_min(1e-6) * 2.0 - 1.0


def environment(device: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = "missing"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def check_correctness(preset: str, device: Any) -> dict[str, Any]:
    """CPU float32 vs device float32 vs device bf16 autocast, same weights and input."""
    import torch

    from inference.labels import JOINT_LABELS, NUM_SEG_CLASSES, PLANES
    from inference.model import PRESETS, DiffusionBackbone, FeatureExtractor, OrthoDiffusionClassifier, OrthoDiffusionSegmenter

    cfg = PRESETS[preset]
    shape = tuple(cfg.input_shape)
    cpu = torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out: dict[str, Any] = {"preset": preset, "input": [1, *shape]}

    def compare(ref: Any, other: Any) -> dict[str, float]:
        ref = ref.detach().double().cpu().flatten()  # float64: a float32 cosine of 10^6 values can exceed 1
        other = other.detach().double().cpu().flatten()
        return {
            "max_abs_error": float((ref - other).abs().max()),
            "relative_error": float((ref - other).abs().max() / ref.abs().max().clamp_min(1e-12)),
            "cosine": float(torch.nn.functional.cosine_similarity(ref, other, dim=0)),
        }

    def run(module: Any, inputs: Callable[[Any], tuple[Any, ...]], where: Any, autocast: bool) -> tuple[Any, float]:
        module = module.to(where).eval()
        args = inputs(where)
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                                             enabled=autocast and where.type == "cuda"):
            if where.type == "cuda":
                module(*args)  # warm-up (cuDNN algorithm choice, lazy CUDA initialisation)
                _sync(where)
            t0 = time.perf_counter()
            result = module(*args)
            _sync(where)
        return result, time.perf_counter() - t0

    # feature extractor of every configured plane point
    torch.manual_seed(0)
    backbone = DiffusionBackbone(cfg)
    x = smooth_volume(shape, 1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    features: dict[str, Any] = {}
    for plane in PLANES:
        point = cfg.point(plane)
        key = f"t{point.timestep}_{point.block}"
        if key in features:
            continue
        extractor = FeatureExtractor(backbone, point)
        ref, t_cpu = run(extractor, lambda d: (x.to(d), noise.to(d)), cpu, False)
        entry: dict[str, Any] = {"shape": list(ref.shape), "cpu_seconds": round(t_cpu, 4)}
        if device.type == "cuda":
            fp32, t32 = run(extractor, lambda d: (x.to(d), noise.to(d)), device, False)
            bf16, t16 = run(extractor, lambda d: (x.to(d), noise.to(d)), device, True)
            entry.update(fp32=compare(ref, fp32), bf16=compare(ref, bf16),
                         gpu_fp32_seconds=round(t32, 4), gpu_bf16_seconds=round(t16, 4))
        features[key] = entry
        backbone.to(cpu)
    out["features"] = features

    # fused classifier with EHR, two studies (one with EHR missing)
    labels = JOINT_LABELS["knee"]
    torch.manual_seed(3)
    classifier = OrthoDiffusionClassifier(cfg, PLANES, len(labels), use_ehr=True)
    volumes = {p: torch.cat([smooth_volume(shape, 10 + i), smooth_volume(shape, 20 + i)]) for i, p in enumerate(PLANES)}
    ehr = torch.tensor([[0.2, -0.3, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0] * 5, [0.0] * 5])

    def cls_inputs(d: Any) -> tuple[Any, ...]:
        return ({p: v.to(d) for p, v in volumes.items()}, ehr.to(d), mask.to(d))

    logits_cpu, t_cpu = run(classifier, cls_inputs, cpu, False)
    cls: dict[str, Any] = {"cpu_seconds": round(t_cpu, 4)}
    if device.type == "cuda":
        for name, amp in (("fp32", False), ("bf16", True)):
            logits, t = run(classifier, cls_inputs, device, amp)
            diff = (torch.sigmoid(logits.float().cpu()) - torch.sigmoid(logits_cpu.float())).abs().max()
            cls[name] = {"max_probability_difference": float(diff), "gpu_seconds": round(t, 4)}
        classifier.to(cpu)
    out["classifier"] = cls

    # segmenter: per-voxel argmax agreement on one window
    torch.manual_seed(4)
    segmenter = OrthoDiffusionSegmenter(cfg, NUM_SEG_CLASSES)
    image = smooth_volume(shape, 30)
    seg_cpu, t_cpu = run(segmenter, lambda d: (image.to(d),), cpu, False)
    seg: dict[str, Any] = {"cpu_seconds": round(t_cpu, 4), "classes": NUM_SEG_CLASSES}
    if device.type == "cuda":
        for name, amp in (("fp32", False), ("bf16", True)):
            logits, t = run(segmenter, lambda d: (image.to(d),), device, amp)
            agree = (logits.float().cpu().argmax(1) == seg_cpu.argmax(1)).float().mean()
            seg[name] = {**compare(seg_cpu, logits), "argmax_agreement": float(agree), "gpu_seconds": round(t, 4)}
        segmenter.to(cpu)
    out["segmenter"] = seg
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return out


class _RandomVolumes:
    """Seeded random (1, D, H, W) volumes for timing the pretraining loop."""

    def __init__(self, shape: tuple[int, ...], count: int) -> None:
        self.items = [smooth_volume(shape, 100 + i)[0] for i in range(count)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.items[index]}


def time_pretraining(preset_config: str, batch: int, steps: int, warmup: int, device: Any) -> dict[str, Any]:
    """Seconds per step of the real pretraining loop at ``batch``, and peak GPU memory."""
    from training.config import load_config
    from training.distributed import DistContext
    from training.pretrain import pretrain, read_log

    cfg = load_config(preset_config).with_overrides(
        pretrain={"steps": steps, "batch_size": batch, "checkpoint_every": steps, "keep_checkpoints": 1,
                  "log_every": 1, "num_workers": 0},
    )
    shape = tuple(cfg.model_cfg().input_shape)
    data = _RandomVolumes(shape, max(2 * batch, 4))
    _reset_peak(device)
    ctx = DistContext(device=device) if device.type == "cuda" else DistContext()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = pretrain(cfg, data, "sagittal", Path(tmp) / "run", ctx=ctx, progress=False)
        wall = time.perf_counter() - t0
        rows = read_log(Path(tmp) / "run")
    elapsed = [r[3] for r in rows]
    per_step = [b - a for a, b in zip(elapsed[warmup:], elapsed[warmup + 1:])]
    median = statistics.median(per_step) if per_step else float("nan")
    return {
        "config": preset_config, "batch": batch, "steps": steps, "warmup_steps": warmup,
        "seconds_per_step_median": round(median, 4),
        "seconds_per_step_min": round(min(per_step), 4) if per_step else None,
        "volumes_per_second": round(batch / median, 2) if per_step else None,
        "reference_run_hours": round(median * REFERENCE_PRETRAIN_STEPS / 3600, 2) if per_step else None,
        "peak_gpu_mib": _peak_mib(device), "wall_seconds_incl_checkpoint": round(wall, 1),
        "final_loss": result.losses[-1][1] if result.losses else None,
        "amp_bf16": bool(cfg.pretrain.amp and device.type == "cuda"),
    }


def time_finetuning(preset_config: str, device: Any, steps: int, warmup: int) -> dict[str, Any]:
    """Seconds per optimizer step of the fused classifier (batch from the config) and the segmenter."""
    import torch

    from inference.labels import JOINT_LABELS, NUM_SEG_CLASSES, PLANES
    from training.config import load_config
    from inference.checkpoint import autocast as mixed_precision
    from training.finetune import (build_classifier, build_segmenter, classification_loss, make_optimizer,
                                   segmentation_loss)

    cfg = load_config(preset_config)
    shape = tuple(cfg.model_cfg().input_shape)
    out: dict[str, Any] = {}

    def loop(model: Any, step_fn: Callable[[], Any], lr: float, factor: float, amp: bool) -> dict[str, Any]:
        opt, sched = make_optimizer(model, lr, factor, 0.0, "cosine", steps + warmup)
        times = []
        for i in range(steps + warmup):
            _sync(device)
            t0 = time.perf_counter()
            with mixed_precision(device, amp, training=True):
                loss = step_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return {"seconds_per_step_median": round(statistics.median(times), 4), "peak_gpu_mib": _peak_mib(device),
                "final_loss": float(loss.detach())}

    labels = JOINT_LABELS["knee"]
    ccfg = cfg.classify
    b = ccfg.batch_size
    torch.manual_seed(0)
    _reset_peak(device)
    classifier = build_classifier(cfg, PLANES, len(labels), True, {}).to(device).train()
    volumes = {p: torch.cat([smooth_volume(shape, 200 + 10 * i + j) for j in range(b)]).to(device)
               for i, p in enumerate(PLANES)}
    ehr = torch.zeros((b, 5), device=device)
    mask = torch.ones((b, 5), device=device)
    target = (torch.rand((b, len(labels)), generator=torch.Generator().manual_seed(5)) > 0.7).float().to(device)
    result = loop(classifier, lambda: classification_loss(classifier(volumes, ehr, mask), target),
                  ccfg.head_lr, ccfg.backbone_lr_factor, ccfg.amp)
    out["classifier"] = {"batch": b, "planes": list(PLANES), "ehr": True, **result}
    classifier = volumes = None  # frees the GPU memory before the segmenter is measured

    scfg = cfg.segment
    b = scfg.batch_size
    torch.manual_seed(1)
    _reset_peak(device)
    segmenter = build_segmenter(cfg, None).to(device).train()
    image = torch.cat([smooth_volume(shape, 300 + j) for j in range(b)]).to(device)
    mask_t = torch.randint(0, NUM_SEG_CLASSES, (b, *shape), generator=torch.Generator().manual_seed(6)).to(device)
    result = loop(segmenter, lambda: segmentation_loss(segmenter(image), mask_t, scfg.ce_weight, scfg.dice_weight),
                  scfg.lr, scfg.backbone_lr_factor, scfg.amp)
    out["segmenter"] = {"batch": b, **result}
    return out


def render(results: dict[str, Any]) -> str:
    """A short markdown summary of whatever checks finished."""
    env = results.get("environment", {})
    lines = ["# Model at paper size on the GPU", "",
             f"Device: {env.get('gpu', env.get('device'))} ({env.get('gpu_memory_gib', '?')} GiB), "
             f"torch {env.get('torch')}, CUDA {env.get('cuda', '-')}, MONAI {env.get('monai')}, "
             f"Python {env.get('python')}.", f"Command: `{results.get('command')}`", ""]
    corr = results.get("correctness")
    if isinstance(corr, dict) and "features" in corr:
        lines += ["## Correctness (seeded random weights, CPU float32 as the reference)", "",
                  "| output | GPU float32 | GPU bf16 autocast |", "| --- | --- | --- |"]
        for key, f in corr["features"].items():
            if "fp32" in f:
                lines.append(f"| features {key} {f['shape']} | rel. error {f['fp32']['relative_error']:.2e}, "
                             f"cosine {f['fp32']['cosine']:.6f} | rel. error {f['bf16']['relative_error']:.2e}, "
                             f"cosine {f['bf16']['cosine']:.6f} |")
        c = corr.get("classifier", {})
        if "fp32" in c:
            lines.append(f"| fused classifier probabilities | max diff {c['fp32']['max_probability_difference']:.2e} | "
                         f"max diff {c['bf16']['max_probability_difference']:.2e} |")
        s = corr.get("segmenter", {})
        if "fp32" in s:
            lines.append(f"| segmenter argmax agreement | {s['fp32']['argmax_agreement']:.5f} | "
                         f"{s['bf16']['argmax_agreement']:.5f} |")
        lines.append("")
    pre = results.get("pretraining")
    if isinstance(pre, list) and pre:
        lines += ["## Pretraining step (real loop: bf16 autocast, Adam, EMA)", "",
                  "| batch | s/step (median) | volumes/s | peak GPU MiB | 21,500 steps (h) |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for row in pre:
            if "error" in row:
                lines.append(f"| {row.get('batch')} | error: {row['error'].splitlines()[-1]} | | | |")
                continue
            peak = "-" if row["peak_gpu_mib"] is None else f"{row['peak_gpu_mib']:.0f}"
            lines.append(f"| {row['batch']} | {row['seconds_per_step_median']} | {row['volumes_per_second']} | "
                         f"{peak} | {row['reference_run_hours']} |")
        lines.append("")
    fin = results.get("finetuning")
    if isinstance(fin, dict) and "classifier" in fin:
        lines += ["## Fine-tuning step", "", "| network | batch | s/step (median) | peak GPU MiB |",
                  "| --- | ---: | ---: | ---: |"]
        for name in ("classifier", "segmenter"):
            row = fin.get(name)
            if row:
                peak = "-" if row["peak_gpu_mib"] is None else f"{row['peak_gpu_mib']:.0f}"
                lines.append(f"| {name} | {row['batch']} | {row['seconds_per_step_median']} | {peak} |")
        lines.append("")
    for key in ("correctness", "finetuning"):
        if isinstance(results.get(key), dict) and "error" in results[key]:
            lines += [f"{key}: error: {results[key]['error'].splitlines()[-1]}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--preset", default="paper", help="model preset and training configuration (default paper)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--pretrain-batch", type=int, nargs="+", default=[10], help="batch sizes to time")
    parser.add_argument("--pretrain-steps", type=int, default=25)
    parser.add_argument("--finetune-steps", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[], choices=["correctness", "pretraining", "finetuning"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from inference.checkpoint import pick_device

    device = pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"command": "python benchmarks/gpu_check.py " + " ".join(argv or sys.argv[1:]),
                               "environment": environment(device)}

    def save() -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
        (args.out / "gpu_check.md").write_text(render(results))

    def section(name: str, fn: Callable[[], Any]) -> None:
        if name in args.skip:
            return
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - a failed check is recorded; the others still run
            results[name] = {"error": traceback.format_exc()}
            log.error("%s failed:\n%s", name, results[name]["error"])
        log.info("%s took %.1f s", name, time.perf_counter() - t0)
        save()

    save()
    section("correctness", lambda: check_correctness(args.preset, device))

    def pretraining() -> list[dict[str, Any]]:
        rows = []
        for batch in args.pretrain_batch:
            try:
                rows.append(time_pretraining(args.preset, batch, args.pretrain_steps, min(5, args.pretrain_steps // 2),
                                             device))
            except Exception:  # noqa: BLE001 - e.g. out of memory at one batch size; the next still runs
                rows.append({"batch": batch, "error": traceback.format_exc()})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results["pretraining"] = rows
            save()
        return rows

    section("pretraining", pretraining)
    section("finetuning", lambda: time_finetuning(args.preset, device, args.finetune_steps, 3))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
