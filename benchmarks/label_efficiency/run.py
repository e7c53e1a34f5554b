"""Label-efficiency benchmark on phantoms: diffusion-pretrained vs from-scratch backbones.

Cells (one seed each unless ``--seeds`` names more):

* knee, fused three-plane classifier with EHR, pretrained vs scratch, 10 % and 100 % of
  the labelled pool; scored on an in-site test set (the training sites) and on a held-out
  phantom site that never appears in pretraining or fine-tuning;
* knee, sagittal segmenter (11 structures), the same four variants and test sets;
* transfer: knee-pretrained backbones fine-tuned on ankle and on shoulder labels with 10 %
  of their pools, against scratch, scored on in-site test sets of that joint.

Pretraining uses the knee pool of the training sites only (unlabelled use of the same
images the labels come from; the held-out site stays unseen).  Every step is the library
call behind an ``orthonode train`` command; the equivalent commands are written to the
report, so any cell can be rerun by hand.

    python benchmarks/label_efficiency/run.py --scale quick     # estimate: ~10-15 min on 2 idle CPU cores
    python benchmarks/label_efficiency/run.py --scale medium    # estimate: ~30 min on 2 idle CPU cores
    python benchmarks/label_efficiency/run.py --scale cpu       # estimate: ~1 h on 2 idle CPU cores
    python benchmarks/label_efficiency/run.py --scale gpu       # larger pools and longer training
    bash benchmarks/label_efficiency/device.sh WORK h200        # stages in parallel processes on one GPU

Stages (``--stage data|pretrain|finetune|report``) share WORK, so parallel processes can
run one stage each: ``--planes`` splits pretraining by plane and ``--cells K/N`` splits the
fine-tuning cells; ``--stage report`` gathers whatever cells have finished.

Writes ``benchmarks/results/label_efficiency.md`` (table, commands, seeds, machine) and
``WORK/results.json``.  Synthetic phantoms only: the numbers say whether the method's
machinery works, not how it performs on patients.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

log = logging.getLogger("label_efficiency")


@dataclass(frozen=True)
class Scale:
    """Sizes of one benchmark scale."""

    knee_pool: int  # labelled knee exams on the training sites (pretraining uses them unlabelled)
    knee_test: int  # in-site knee test exams
    held_out: int  # knee test exams of the held-out site
    transfer_pool: int  # labelled ankle / shoulder exams
    transfer_test: int
    matrix: int
    pretrain_steps: int
    classify_epochs: int
    segment_epochs: int
    n_boot: int
    pretrain_batch: int = 4
    config: str = "small"


SCALES: dict[str, Scale] = {
    "quick": Scale(knee_pool=30, knee_test=8, held_out=8, transfer_pool=20, transfer_test=8, matrix=64,
                   pretrain_steps=30, pretrain_batch=2, classify_epochs=5, segment_epochs=5, n_boot=200),
    # between quick and cpu: about half an hour on 2 idle CPU cores
    "medium": Scale(knee_pool=60, knee_test=12, held_out=12, transfer_pool=30, transfer_test=12, matrix=64,
                    pretrain_steps=150, classify_epochs=8, segment_epochs=10, n_boot=200),
    "cpu": Scale(knee_pool=100, knee_test=20, held_out=20, transfer_pool=50, transfer_test=20, matrix=64,
                 pretrain_steps=300, classify_epochs=8, segment_epochs=10, n_boot=500),
    # checks the script itself in a minute (tiny model); its numbers mean nothing
    "smoke": Scale(knee_pool=10, knee_test=2, held_out=2, transfer_pool=10, transfer_test=2, matrix=32,
                   pretrain_steps=4, classify_epochs=1, segment_epochs=1, n_boot=10, config="tiny"),
    # one H200 with 16 CPU cores inside a few minutes: stages run as parallel processes
    # (benchmarks/label_efficiency/device.sh); larger pools and longer pretraining than cpu
    "h200": Scale(knee_pool=240, knee_test=40, held_out=40, transfer_pool=80, transfer_test=30, matrix=64,
                  pretrain_steps=1200, pretrain_batch=16, classify_epochs=12, segment_epochs=15, n_boot=500),
    "gpu": Scale(knee_pool=400, knee_test=60, held_out=60, transfer_pool=200, transfer_test=60, matrix=64,
                 pretrain_steps=3000, classify_epochs=15, segment_epochs=30, n_boot=1000),
}

PLANES = ("sagittal", "coronal", "axial")


def machine() -> dict[str, str]:
    """CPU model, cores, torch version and devices, for the report."""
    import torch

    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        log.warning("lscpu failed (%s); CPU model from platform", exc)
    info = {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        # the machine may be shared: the load says how much of it the benchmark had
        "load_average": " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    return info


def effective_config(scale: Scale, work: Path) -> Path:
    """Write the configuration the benchmark runs with (the scale's overrides applied) to WORK."""
    import yaml

    from training.config import load_config

    # The EMA must forget the random initial weights within the run: every step, with a decay
    # whose memory (1 / (1 - decay)) is at most a tenth of the run, capped at the reference 0.995.
    decay = min(0.995, 1.0 - 10.0 / scale.pretrain_steps) if scale.pretrain_steps > 20 else 0.5
    cfg = load_config(scale.config).with_overrides(
        # five checkpoints, all kept: the probe (probe.py) reads the pretraining-length axis from them
        pretrain={"steps": scale.pretrain_steps, "batch_size": scale.pretrain_batch,
                  "checkpoint_every": max(1, scale.pretrain_steps // 5), "keep_checkpoints": 5,
                  "ema_every": 1, "ema_decay": decay},
        classify={"epochs": scale.classify_epochs},
        segment={"epochs": scale.segment_epochs},
        # preprocessed volumes are cached once and shared by every cell
        data={"cache": "disk", "cache_dir": str(work / "cache")},
    )
    data = cfg.to_dict()
    data["name"] = f"label-efficiency-{scale.config}"
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    cls = metrics.get("classification") or {}
    seg = metrics.get("segmentation") or {}
    return {"macro_auc": cls.get("macro_auc"), "map": cls.get("map"), "mean_dice": seg.get("mean_dice"),
            "n_cls": cls.get("n"), "n_seg": seg.get("n_exams")}


PHANTOM_SETS = ("knee_pool", "knee_test", "knee_held_out", "ankle_pool", "ankle_test", "shoulder_pool", "shoulder_test")


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run and the test sets it is scored on."""

    task: str
    joint: str
    init: str
    fraction: float
    seed: int
    tag: str = ""  # e.g. "_ep40" when the epochs differ from the scale's

    @property
    def name(self) -> str:
        return f"{self.joint}_{self.task}_{self.init}_{int(self.fraction * 100)}pct_seed{self.seed}{self.tag}"

    @property
    def tests(self) -> list[str]:
        return ["knee_test", "knee_held_out"] if self.joint == "knee" else [f"{self.joint}_test"]

    def cost(self, scale: Scale) -> float:
        """Rough relative cost, to spread cells over parallel workers."""
        epochs = scale.segment_epochs * 2 if self.task == "segment" else scale.classify_epochs
        pool = scale.knee_pool if self.joint == "knee" else scale.transfer_pool
        return epochs * max(1.0, self.fraction * pool)


def all_cells(seeds: list[int], tags: dict[str, str] | None = None) -> list[Cell]:
    """Every cell of the benchmark; ``tags`` (task -> name suffix) marks cells trained with other epochs."""
    tags = tags or {}
    cells = []
    for seed in seeds:
        for task in ("classify", "segment"):
            for fraction in (0.1, 1.0):
                for init in ("pretrained", "scratch"):
                    cells.append(Cell(task, "knee", init, fraction, seed, tags.get(task, "")))
        for joint in ("ankle", "shoulder"):
            for init in ("pretrained", "scratch"):
                cells.append(Cell("classify", joint, init, 0.1, seed, tags.get("classify", "")))
    return cells


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def share_of_cells(cells: list[Cell], scale: Scale, part: int, parts: int) -> list[Cell]:
    """Worker ``part`` of ``parts``: longest cells first, each to the least loaded worker."""
    loads = [0.0] * parts
    mine: list[Cell] = []
    for cell in sorted(cells, key=lambda c: -c.cost(scale)):
        worker = loads.index(min(loads))
        loads[worker] += cell.cost(scale)
        if worker == part:
            mine.append(cell)
    return mine


def _parse_part(text: str) -> tuple[int, int]:
    try:
        part, parts = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cells must be K/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= part < parts:
        raise argparse.ArgumentTypeError(f"--cells {text}: K must be in 0..N-1")
    return part, parts


def _device() -> Any:
    """The CUDA device when there is one (pretraining and fine-tuning), else the CPU."""
    from training.distributed import DistContext, select_device

    return DistContext(device=select_device("auto"))


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _stage_time(work: Path, stage: str, seconds: float) -> None:
    path = work / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[stage] = max(seconds, timings.get(stage, 0.0))
    _write_json(path, timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--work", type=Path, default=Path("runs/label_efficiency"), help="working folder")
    parser.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds (default 0)")
    parser.add_argument("--data-seed", type=int, default=0, help="phantom generation seed")
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    parser.add_argument("--report", type=Path, default=REPO / "benchmarks" / "results" / "label_efficiency.md")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--stage", choices=["all", "data", "pretrain", "finetune", "report"], default="all",
                        help="run one stage only (stages share WORK; parallel workers run the same stage)")
    parser.add_argument("--planes", default=",".join(PLANES), help="pretrain stage: planes this process trains")
    parser.add_argument("--stop-at-checkpoint", action="store_true",
                        help="pretrain stage: end each plane at its latest checkpoint (after a run was cut short) "
                             "and export its EMA weights")
    parser.add_argument("--cells", type=_parse_part, default=(0, 1), metavar="K/N",
                        help="finetune stage: this process runs share K of N of the cells")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="finetune stage: start no new cell after this many seconds")
    parser.add_argument("--classify-epochs", type=int, default=None,
                        help="train classifiers this many epochs instead of the scale's (cells named _ep<N>)")
    parser.add_argument("--segment-epochs", type=int, default=None,
                        help="train segmenters this many epochs instead of the scale's (cells named _ep<N>)")
    parser.add_argument("--feature-point", default=None, metavar="T,BLOCK",
                        help="classifiers take every plane's features at this (t, block) instead of the "
                             "configuration's, e.g. 25,down_2 (cells named _t<T><block>)")
    parser.add_argument("--tasks", default="classify,segment", help="finetune/report: only these tasks")
    parser.add_argument("--joints", default="knee,ankle,shoulder", help="finetune/report: only these joints")
    parser.add_argument("--fractions", default="0.1,1.0", help="finetune/report: only these label fractions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from training.cli import read_records
    from training.config import load_config
    from training.data import pretrain_dataset
    from training.demo import HELD_OUT_SITE, make_phantom_set, training_sites
    from training.evaluate import evaluate_bundle
    from training.finetune import finetune_classifier, finetune_segmenter, make_bundle
    from training.pretrain import (cache_kwargs, latest_checkpoint, load_checkpoint, preprocess_config, pretrain,
                                   read_log)

    scale = SCALES[args.scale]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    stages = ["data", "pretrain", "finetune", "report"] if args.stage == "all" else [args.stage]
    load_path = work / "load_at_start.txt"
    if "data" in stages or not load_path.is_file():
        load_path.write_text(" / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a")
    config_path = work / "config.yaml"
    if "data" in stages or not config_path.is_file():
        config_path = effective_config(scale, work)
    cfg = load_config(config_path)
    tags: dict[str, str] = {}
    if args.classify_epochs is not None and args.classify_epochs != scale.classify_epochs:
        cfg = cfg.with_overrides(classify={"epochs": args.classify_epochs})
        tags["classify"] = f"_ep{args.classify_epochs}"
    if args.segment_epochs is not None and args.segment_epochs != scale.segment_epochs:
        cfg = cfg.with_overrides(segment={"epochs": args.segment_epochs})
        tags["segment"] = f"_ep{args.segment_epochs}"
    if args.feature_point is not None:
        try:
            t_text, block = args.feature_point.split(",")
            point = {"timestep": int(t_text), "block": block.strip()}
        except ValueError:
            parser.error(f"--feature-point must be T,BLOCK (e.g. 25,down_2), got {args.feature_point!r}")
        cfg = cfg.with_overrides(model={"feature_points": {plane: point for plane in PLANES}})
        cfg.model_cfg()  # a block the architecture lacks is an error now, not in a worker
        tags["classify"] = tags.get("classify", "") + f"_t{point['timestep']}{point['block']}"
    cell_config_path = config_path
    if tags:
        # the cells' own configuration, so that their `orthonode train finetune` commands reproduce them
        import yaml

        data = cfg.to_dict()
        cell_config_path = work / f"config{''.join(sorted(set(tags.values())))}.yaml"
        cell_config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    wanted = (set(_csv(args.tasks)), set(_csv(args.joints)), {float(f) for f in _csv(args.fractions)})
    cells_run = [c for c in all_cells(seeds, tags)
                 if c.task in wanted[0] and c.joint in wanted[1] and c.fraction in wanted[2]]
    sites = training_sites()
    ph = work / "phantoms"
    ds = args.data_seed
    pre_root = work / "pretrain"

    # phantom sets: name -> (joint, first index, count, sites)
    layout: dict[str, tuple[str, int, int, list[str]]] = {}
    for joint, pool, test in (("knee", scale.knee_pool, scale.knee_test), ("ankle", scale.transfer_pool, scale.transfer_test),
                              ("shoulder", scale.transfer_pool, scale.transfer_test)):
        layout[f"{joint}_pool"] = (joint, 0, pool, sites)
        layout[f"{joint}_test"] = (joint, pool, test, sites)
        if joint == "knee":
            layout["knee_held_out"] = (joint, pool + test, scale.held_out, [HELD_OUT_SITE])
    sets = {name: ph / name for name in PHANTOM_SETS}

    def set_commands() -> list[str]:
        return [
            f"# {name}: {joint} cases {first}..{first + count - 1} (ids {joint}_{first + 1:04d}..), sites "
            f"{','.join(set_sites)} round-robin, seed {ds}, matrix {scale.matrix}  (training.demo.make_phantom_set)"
            for name, (joint, first, count, set_sites) in layout.items()
        ]

    if "data" in stages:
        t = time.monotonic()
        for name in PHANTOM_SETS:
            joint, first, count, set_sites = layout[name]
            make_phantom_set(sets[name], joint, range(first, first + count), set_sites, ds, scale.matrix, args.workers)
            cached = work / "records" / f"{name}.pkl"
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.unlink(missing_ok=True)
            cached.with_suffix(".tmp").write_bytes(pickle.dumps(read_records([f"phantom:{sets[name]}"])))
            cached.with_suffix(".tmp").replace(cached)
        _stage_time(work, "phantoms", time.monotonic() - t)

    records: dict[str, list[Any]] = {}

    def recs(name: str) -> list[Any]:
        """The set's exam records; the data stage pickles them so that later processes skip the header scan."""
        if name not in records:
            cached = work / "records" / f"{name}.pkl"
            if cached.is_file():
                records[name] = pickle.loads(cached.read_bytes())
            else:
                records[name] = read_records([f"phantom:{sets[name]}"])
        return records[name]

    if "pretrain" in stages:
        t = time.monotonic()
        ctx = _device()
        for plane in [p.strip() for p in args.planes.split(",") if p.strip()]:
            if plane not in PLANES:
                parser.error(f"--planes: unknown plane {plane!r}; planes are {', '.join(PLANES)}")
            t_plane = time.monotonic()
            usable = [r for r in recs("knee_pool") if plane in r.planes]
            dataset = pretrain_dataset(usable, plane, preprocess_config(cfg), **cache_kwargs(cfg, pre_root / plane))
            steps = None
            if args.stop_at_checkpoint:
                latest = latest_checkpoint(pre_root / plane)
                if latest is None:
                    log.error("%s: no checkpoint to stop at; pretraining of this plane is missing", plane)
                    continue
                steps = int(load_checkpoint(latest)["step"])
            result = pretrain(cfg, dataset, plane, pre_root / plane, resume=True, ctx=ctx, progress=progress,
                              steps=steps)
            logged = read_log(pre_root / plane)
            _write_json(pre_root / plane / "summary.json", {
                "final_loss": logged[-1][1] if logged else None, "steps_done": result.final_step,
                "target_steps": scale.pretrain_steps, "seconds": time.monotonic() - t_plane,
                "device": str(ctx.device),
                "command": f"orthonode train pretrain --data phantom:{sets['knee_pool']} --plane {plane} "
                           f"--config {config_path} --out {pre_root / plane} --resume",
            })
        _stage_time(work, "pretraining", time.monotonic() - t)

    def run_cell(cell: Cell) -> None:
        out = work / "runs" / cell.name
        pool = recs(f"{cell.joint}_pool")
        pretrained = None if cell.init == "scratch" else pre_root
        t0 = time.monotonic()
        torch.manual_seed(cell.seed)
        ctx = _device()
        common = dict(pretrained=pretrained, from_scratch=cell.init == "scratch", label_fraction=cell.fraction,
                      seed=cell.seed, progress=progress, run_dir=out, device=ctx.device)
        if cell.task == "classify":
            result = finetune_classifier(cfg, pool, list(PLANES), use_ehr=True, **common)
            bundle = make_bundle(cfg, classifier=result, name=cell.name)
            flags = "--task classify --planes sagittal,coronal,axial --ehr"
        else:
            result = finetune_segmenter(cfg, pool, plane="sagittal", **common)
            bundle = make_bundle(cfg, segmenter=result, name=cell.name)
            flags = "--task segment --planes sagittal"
        bundle.save(out / "model.pt")
        train_seconds = time.monotonic() - t0
        init_flag = "--from-scratch" if cell.init == "scratch" else f"--pretrained {pre_root}"
        commands = [f"orthonode train finetune {flags} --data phantom:{sets[f'{cell.joint}_pool']} {init_flag} "
                    f"--label-fraction {cell.fraction} --seed {cell.seed} --config {cell_config_path} --out {out}"]
        row: dict[str, Any] = {
            "task": cell.task, "joint": cell.joint, "init": cell.init, "label_fraction": cell.fraction,
            "seed": cell.seed, "epochs": cfg.classify.epochs if cell.task == "classify" else cfg.segment.epochs,
            "train_exams": len(result.train_ids), "val_exams": len(result.val_ids),
            "train_seconds": round(train_seconds, 1),
        }
        for test in cell.tests:
            eval_dir = out / f"eval_{test}"
            metrics = evaluate_bundle(bundle, recs(test), eval_dir, n_boot=scale.n_boot, seed=cell.seed)
            row[test] = _headline(metrics)
            commands.append(f"orthonode train evaluate --model {out / 'model.pt'} --data phantom:{sets[test]} "
                            f"--out {eval_dir} --n-boot {scale.n_boot}")
        row["commands"] = commands
        _write_json(out / "row.json", row)
        log.info("cell %s: %s", cell.name, json.dumps({k: v for k, v in row.items() if k != "commands"}, default=str))

    if "finetune" in stages:
        t = time.monotonic()
        part, parts = args.cells
        for cell in share_of_cells(cells_run, scale, part, parts):
            if (work / "runs" / cell.name / "row.json").is_file():
                log.info("cell %s already done", cell.name)
                continue
            if args.time_budget is not None and time.monotonic() - t > args.time_budget:
                log.warning("time budget of %.0f s spent: cell %s not run", args.time_budget, cell.name)
                continue
            run_cell(cell)
        _stage_time(work, "fine-tuning and evaluation", time.monotonic() - t)

    if "report" in stages:
        rows, missing, commands = [], [], [
            f"python benchmarks/label_efficiency/run.py --scale {args.scale} --work {args.work} --seeds {args.seeds} "
            f"--data-seed {args.data_seed} --workers {args.workers}"
            + "".join(f" --{flag.replace('_', '-')} {value}" for flag, value in (
                ("classify_epochs", args.classify_epochs), ("segment_epochs", args.segment_epochs),
                ("feature_point", args.feature_point),
                ("tasks", args.tasks), ("joints", args.joints), ("fractions", args.fractions))
                if value is not None and str(value) != parser.get_default(flag))
        ] + set_commands()
        pretrain_loss: dict[str, float | None] = {}
        cut_short: dict[str, int] = {}
        for plane in PLANES:
            summary = pre_root / plane / "summary.json"
            if summary.is_file():
                data = json.loads(summary.read_text())
                pretrain_loss[plane] = data["final_loss"]
                if data.get("steps_done") is not None and data["steps_done"] < data.get("target_steps", 0):
                    cut_short[plane] = data["steps_done"]
                commands.append(data["command"])
        for cell in cells_run:
            path = work / "runs" / cell.name / "row.json"
            if not path.is_file():
                missing.append(cell.name)
                continue
            row = json.loads(path.read_text())
            commands += row.pop("commands", [])
            rows.append(row)
        timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").is_file() else {}
        info = machine()
        info["load_average_at_start"] = load_path.read_text() if load_path.is_file() else "n/a"
        results = {"scale": args.scale, "scale_parameters": scale.__dict__, "seeds": seeds, "data_seed": ds,
                   "held_out_site": HELD_OUT_SITE, "training_sites": sites, "pretrain_loss": pretrain_loss,
                   "rows": rows, "missing_cells": missing, "pretrain_cut_short": cut_short, "timings": timings, "machine": info,
                   "commands": commands, "config": cfg.to_dict()}
        _write_json(work / "results.json", results)
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(render_report(results))
        print(f"report written to {args.report}")
    return 0


def _f(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def render_report(results: dict[str, Any]) -> str:
    """The markdown report: what was run, on what, and what came out."""
    rows = results["rows"]
    scale = results["scale_parameters"]
    info = results["machine"]
    lines = [
        "# Label efficiency on phantoms: diffusion-pretrained vs from-scratch",
        "",
        f"Scale **{results['scale']}** (generated by `benchmarks/label_efficiency/run.py`). "
        "Synthetic knee/ankle/shoulder phantoms only: these numbers check that the method's "
        "machinery works; they are not clinical performance.",
        "",
        f"- Training sites: {', '.join(results['training_sites'])}; held-out site: **{results['held_out_site']}** "
        "(never seen in pretraining or fine-tuning).",
        f"- Pools: knee {scale['knee_pool']} labelled exams (also the unlabelled pretraining set), "
        f"knee in-site test {scale['knee_test']}, held-out site test {scale['held_out']}, "
        f"ankle/shoulder pools {scale['transfer_pool']} with tests of {scale['transfer_test']}; "
        f"phantom matrix {scale['matrix']}.",
        f"- Configuration `{results['config']['name']}` (model preset "
        f"`{results['config']['model'].get('preset')}`): pretraining {scale['pretrain_steps']} steps of batch "
        f"{scale['pretrain_batch']} per plane, "
        f"classifier {results['config']['classify']['epochs']} epochs, "
        f"segmenter {results['config']['segment']['epochs']} epochs; "
        f"bootstrap {scale['n_boot']} resamples.",
        "- Label fraction: a seeded, stratified subset of the pool; 20 % of it (by patient) is the validation split "
        "that picks thresholds, so '10 %' means 10 % of the pool in total.",
        f"- Seeds (fine-tuning and label subsets): {results['seeds']}; phantom seed {results['data_seed']}.",
        "- Final pretraining loss per plane: "
        + ", ".join(f"{p} {_f(v)}" for p, v in results["pretrain_loss"].items()) + ".",
        "",
        "## Knee",
        "",
        "Fused classifier (sagittal + coronal + axial, EHR late fusion): macro AUC over the labels that have "
        "both classes in the test set.  Segmenter (sagittal): mean Dice over the 11 structures.",
        "",
        "| task | init | labels | train/val exams | in-site | held-out site |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["joint"] != "knee":
            continue
        key = "macro_auc" if r["task"] == "classify" else "mean_dice"
        what = "AUC" if r["task"] == "classify" else "Dice"
        lines.append(
            f"| {r['task']} | {r['init']} | {int(r['label_fraction'] * 100)} % | {r['train_exams']}/{r['val_exams']} | "
            f"{what} {_f(r['knee_test'][key])} | {what} {_f(r['knee_held_out'][key])} |"
        )
    lines += ["", "## Transfer (knee-pretrained backbones, 10 % labels)", "",
              "| joint | init | train/val exams | in-site macro AUC | mAP |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["joint"] == "knee":
            continue
        test = r[f"{r['joint']}_test"]
        lines.append(f"| {r['joint']} | {r['init']} | {r['train_exams']}/{r['val_exams']} | {_f(test['macro_auc'])} | "
                     f"{_f(test['map'])} |")

    def pick(task: str, init: str, fraction: float, test: str, key: str) -> float | None:
        return _mean([r[test][key] for r in rows if r["joint"] == "knee" and r["task"] == task and r["init"] == init
                      and r["label_fraction"] == fraction])

    auc = pick("classify", "pretrained", 1.0, "knee_held_out", "macro_auc")
    dice = pick("segment", "pretrained", 1.0, "knee_held_out", "mean_dice")
    pre10 = pick("classify", "pretrained", 0.1, "knee_held_out", "macro_auc")
    scr10 = pick("classify", "scratch", 0.1, "knee_held_out", "macro_auc")
    seg_pre10 = pick("segment", "pretrained", 0.1, "knee_held_out", "mean_dice")
    seg_scr10 = pick("segment", "scratch", 0.1, "knee_held_out", "mean_dice")

    def verdict(ok: bool | None) -> str:
        return "not measurable" if ok is None else ("met" if ok else "**not met**")

    def ahead(a: float | None, b: float | None) -> str:
        # a difference below 0.01 is not a lead at these test-set sizes
        if a is None or b is None:
            return "not measurable"
        if abs(a - b) < 0.01:
            return "**not met** (tie within 0.01)"
        return verdict(a > b)

    if results.get("pretrain_cut_short"):
        lines += ["", "**Pretraining cut short by the time budget** (steps reached): "
                  + ", ".join(f"{p} {n}" for p, n in results["pretrain_cut_short"].items()) + "."]
    if results.get("missing_cells"):
        lines += ["", f"**Cells that did not finish** (time budget or error; not in the tables): "
                  f"{', '.join(results['missing_cells'])}."]
    if results["scale"] in ("smoke", "quick"):
        lines += [
            "",
            f"**Reading this table.** At the `{results['scale']}` scale the backbones are pretrained for "
            f"{scale['pretrain_steps']} steps (far from converged: see the final losses above) and fine-tuned on "
            "2 to 24 exams, and each test set has a handful of exams, so several labels have one positive case or "
            "none.  The numbers show that every stage runs end to end; they do not measure the method, and "
            "differences between rows are within noise.  Use `--scale cpu` or `--scale gpu` to measure it.",
        ]
    lines += [
        "",
        "## Targets (held-out site)",
        "",
        f"- Fused macro AUC >= 0.90 (pretrained, 100 % labels): {_f(auc)}: "
        f"{verdict(None if auc is None else auc >= 0.90)}.",
        f"- Mean Dice over 11 structures >= 0.80 (pretrained, 100 % labels): {_f(dice)}: "
        f"{verdict(None if dice is None else dice >= 0.80)}.",
        f"- Pretrained ahead of scratch at 10 % labels: classifier {_f(pre10)} vs {_f(scr10)} "
        f"({ahead(pre10, scr10)}); segmenter {_f(seg_pre10)} vs {_f(seg_scr10)} ({ahead(seg_pre10, seg_scr10)}).",
        "",
        "## Machine and time",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores visible, torch threads {info['torch_threads']}; "
        f"CUDA: {info['cuda']}.",
        f"- Load average (1/5/15 min) at start {info.get('load_average_at_start', 'n/a')}, at the end "
        f"{info.get('load_average', 'n/a')} on {info['cores']} cores (a load above the core count means the "
        "machine was shared and wall times are longer than on an idle machine).",
        f"- torch {info['torch']}, MONAI {info.get('monai', '?')}, Python {info['python']}.",
        "- Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in results["timings"].items()) + ".",
        "",
        "## Commands",
        "",
        "The first line ran everything; the others are the equivalent `orthonode train` commands of each step "
        "(the benchmark calls the same library functions in one process).",
        "",
        "```",
        *results["commands"],
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
