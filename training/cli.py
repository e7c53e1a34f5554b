"""``orthonode train``: pretrain, fine-tune, evaluate, and build the demo model.

::

    orthonode train pretrain --data phantom:DIR --plane sagittal --config small --out runs/pre/sagittal
    torchrun --nproc_per_node 4 -m dicom_node.cli train pretrain ...      # DDP, one process per GPU
    orthonode train finetune --task classify --data phantom:DIR --pretrained runs/pre \\
        --planes sagittal,coronal,axial --ehr --config small --out runs/cls
    orthonode train evaluate --model runs/cls/model.pt --data phantom:HELDOUT --out runs/eval
    orthonode train demo --out models/demo-knee.pt

``--data`` takes a :func:`training.datasets.read_source` spec (``phantom:DIR``,
``dicom:DIR:labels.csv``, ``mrnet:DIR:train``, ``nifti:DIR`` or a folder whose layout is
detected) and may be repeated to train on several sources at once.  Heavy imports happen
inside the handlers so ``orthonode --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"


def _planes(text: str) -> list[str]:
    from inference.labels import PLANES

    planes = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in planes if p not in PLANES]
    if not planes or bad:
        raise argparse.ArgumentTypeError(f"--planes must be a comma-separated subset of {','.join(PLANES)}, got {text!r}")
    if len(set(planes)) != len(planes):
        raise argparse.ArgumentTypeError(f"--planes repeats a plane: {text!r}")
    return planes


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--label-fraction must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"--label-fraction must be in (0, 1], got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``pretrain``, ``finetune``, ``evaluate`` and ``demo`` sub-commands."""
    from inference.labels import PLANES

    sub = parser.add_subparsers(dest="train_command", metavar="STEP")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default="small",
                       help="built-in configuration (paper, small, tiny, demo) or a YAML file (default: small)")
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto: the CUDA device of this process when there is one, else the CPU")
        p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")

    p = sub.add_parser("pretrain", help="unlabeled DDPM pretraining of one plane's backbone",
                       description="Unlabeled DDPM pretraining of one plane's diffusion backbone, with EMA, "
                       "checkpoints and resume. Start under torchrun for several GPUs or nodes.")
    p.add_argument("--data", action="append", required=True, metavar="SPEC",
                   help="data source (phantom:DIR, dicom:DIR:labels.csv, mrnet:DIR:split, nifti:DIR); repeatable")
    p.add_argument("--plane", required=True, choices=PLANES)
    p.add_argument("--out", required=True, type=Path, metavar="RUN", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--steps", type=_positive_int, help="total steps (overrides the configuration)")
    common(p)

    p = sub.add_parser("finetune", help="fine-tune a classifier or the segmenter",
                       description="Fine-tune classification heads (per plane or fused, optional EHR) or the "
                       "segmenter from pretrained backbones, or from scratch (the baseline). Writes RUN/model.pt.")
    p.add_argument("--task", required=True, choices=("classify", "segment"))
    p.add_argument("--data", action="append", required=True, metavar="SPEC", help="labelled data source; repeatable")
    init = p.add_mutually_exclusive_group(required=True)
    init.add_argument("--pretrained", type=Path, metavar="RUN_DIR_OR_DIR",
                      help="a pretraining run folder, or a folder holding one run folder per plane")
    init.add_argument("--from-scratch", action="store_true", help="same architecture, random initialisation")
    p.add_argument("--planes", type=_planes,
                   help="comma-separated planes; several planes = fused classifier "
                   "(classify default: sagittal,coronal,axial; segment default: the configuration's plane)")
    p.add_argument("--ehr", action=argparse.BooleanOptionalAction, default=False,
                   help="late fusion with age, sex, height and weight (classify only; default: off)")
    p.add_argument("--label-fraction", type=_fraction, default=1.0, metavar="F",
                   help="train on a seeded, stratified fraction of the labelled exams (default 1)")
    p.add_argument("--seed", type=int, help="seed of the label subset, splits and initialisation (default: configuration)")
    p.add_argument("--exclude-site", action="append", default=[], metavar="SITE",
                   help="leave this site's exams out of training (to evaluate on it afterwards); repeatable")
    p.add_argument("--name", help="model name in the card (default orthodiffusion-<joint>)")
    p.add_argument("--version", help="model version in the card (default <package version>+<data fingerprint>)")
    p.add_argument("--out", required=True, type=Path, metavar="RUN", help=f"run folder; the bundle is RUN/{MODEL_FILE}")
    common(p)

    p = sub.add_parser("evaluate", help="metrics of a model bundle on a data set",
                       description="Evaluate a model bundle: AUC, AP, F1 per label with bootstrap intervals, "
                       "Dice per structure; writes metrics.json, roc.png and dice.png.")
    p.add_argument("--model", required=True, type=Path, metavar="CKPT", help=f"bundle file or run folder ({MODEL_FILE})")
    p.add_argument("--data", action="append", required=True, metavar="SPEC", help="data source; repeatable")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for confidence intervals (default 1000)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))

    p = sub.add_parser("demo", help="train the demo knee, ankle and shoulder models on phantoms (minutes on a CPU)",
                       description="Generate knee phantoms, pretrain the three planes briefly, fine-tune a fused "
                       "classifier with EHR and a sagittal segmenter, evaluate on a held-out phantom site and save "
                       "one bundle; then transfer the classifier to ankle and shoulder phantoms on its frozen "
                       "backbones. Synthetic data only: the models are not for clinical use.")
    p.add_argument("--out", type=Path, default=Path("models/demo-knee.pt"), help="bundle file (default models/demo-knee.pt)")
    p.add_argument("--work", type=Path,
                   help="working folder for phantoms, runs and held-out metrics (default data/<out name>-train); "
                   "a rerun reuses its phantoms and finished pretraining runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="demo", help="configuration (default: demo)")
    p.add_argument("--train-cases", type=_positive_int, default=128, help="knee training phantoms on four sites (default 128)")
    p.add_argument("--held-out-cases", type=_positive_int, default=40, help="phantoms of the held-out site (default 40)")
    p.add_argument("--matrix", type=_positive_int, default=64, help="phantom acquisition matrix (default 64)")
    p.add_argument("--workers", type=_positive_int, default=2, help="processes generating phantoms (default 2)")
    p.add_argument("--joints", default="knee,ankle,shoulder",
                   help="comma-separated joints, the knee first: the ankle and shoulder classifiers transfer from "
                   "the knee's backbones (default knee,ankle,shoulder); their files replace 'knee' in --out's name")
    p.add_argument("--transfer-cases", type=_positive_int, default=64,
                   help="training phantoms per transferred joint (default 64)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    handlers = {"pretrain": _pretrain, "finetune": _finetune, "evaluate": _evaluate, "demo": _demo}
    from training.config import ConfigError

    try:
        return handlers[args.train_command](args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        # user errors: one clear line, no traceback (-vv shows it)
        log.debug("train %s failed", args.train_command, exc_info=True)
        print(f"orthonode train {args.train_command}: error: {exc}", file=sys.stderr)
        return 2


def read_records(specs: list[str]) -> list[Any]:
    """Records of every ``--data`` spec, in order; exam ids must be unique across specs."""
    from training.datasets import read_source

    records: list[Any] = []
    seen: dict[str, str] = {}
    for spec in specs:
        for record in read_source(spec):
            if record.exam_id in seen:
                raise ValueError(f"exam {record.exam_id!r} appears in both --data {seen[record.exam_id]} and {spec}")
            seen[record.exam_id] = spec
            records.append(record)
    if not records:
        raise ValueError(f"--data {' '.join(specs)}: no exams found")
    return records


def _pretrain(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.data import pretrain_dataset
    from training.datasets import fingerprint
    from training.distributed import init_distributed, shutdown
    from training.pretrain import cache_kwargs, pretrain, preprocess_config

    cfg = load_config(args.config)
    records = [r for r in read_records(args.data) if args.plane in r.planes]
    if not records:
        raise ValueError(f"--data {' '.join(args.data)}: no exam has a {args.plane} series")
    dataset = pretrain_dataset(records, args.plane, preprocess_config(cfg), **cache_kwargs(cfg, args.out))
    ctx = init_distributed(args.device)
    try:
        result = pretrain(
            cfg, dataset, args.plane, args.out, resume=args.resume, steps=args.steps, ctx=ctx,
            progress=not args.no_progress, data_fingerprint=fingerprint(records),
        )
    finally:
        shutdown(ctx)
    if ctx.is_main:
        last = result.losses[-1][1] if result.losses else float("nan")
        print(f"pretrained {args.plane}: steps {result.start_step} -> {result.final_step}, last loss {last:.4f}; "
              f"EMA weights {result.ema_path}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.distributed import select_device
    from training.finetune import finetune_classifier, finetune_segmenter, make_bundle

    cfg = load_config(args.config)
    device = select_device(args.device)
    records = read_records(args.data)
    if args.exclude_site:
        unknown = sorted(set(args.exclude_site) - {str(r.site) for r in records})
        if unknown:
            raise ValueError(f"--exclude-site {unknown}: no such site in the data")
        records = [r for r in records if str(r.site) not in set(args.exclude_site)]
    args.out.mkdir(parents=True, exist_ok=True)
    common = dict(
        pretrained=args.pretrained, from_scratch=args.from_scratch, label_fraction=args.label_fraction,
        seed=args.seed, device=device, progress=not args.no_progress, run_dir=args.out,
    )
    if args.task == "classify":
        planes = args.planes or ["sagittal", "coronal", "axial"]
        result = finetune_classifier(cfg, records, planes, use_ehr=args.ehr, **common)
        bundle = make_bundle(cfg, classifier=result, name=args.name, version=args.version)
    else:
        if args.ehr:
            raise ValueError("--ehr applies to --task classify only")
        planes = args.planes or [cfg.segment.plane]
        if len(planes) != 1:
            raise ValueError(f"--task segment trains on one plane, got --planes {','.join(planes)}")
        result = finetune_segmenter(cfg, records, plane=planes[0], **common)
        bundle = make_bundle(cfg, segmenter=result, name=args.name, version=args.version)
    path = args.out / MODEL_FILE
    bundle.save(path)
    summary = {
        "task": args.task,
        "model": str(path),
        "planes": list(result.planes),
        "init": result.init,
        "label_fraction": result.label_fraction,
        "seed": result.seed,
        "thresholds": result.thresholds,
        "metrics": result.metrics,
        "history": result.history,
        "train_exams": result.train_ids,
        "val_exams": result.val_ids,
        "fingerprint": result.fingerprint,
        "config": cfg.to_dict(),
    }
    (args.out / "finetune.json").write_text(json.dumps(summary, indent=2, default=str))
    reached = {k: v for k, v in result.metrics.items() if k.startswith("val_") and not isinstance(v, dict)}
    print(f"fine-tuned {args.task} ({result.init}, planes {','.join(result.planes)}): {reached}; bundle {path}")
    return 0


def resolve_model_path(path: Path) -> Path:
    """A bundle file, or a run folder that holds ``model.pt``."""
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.is_file():
            raise FileNotFoundError(f"--model {path} is a folder without {MODEL_FILE}")
        return candidate
    return path


def _evaluate(args: argparse.Namespace) -> int:
    from inference.checkpoint import ModelBundle
    from training.evaluate import evaluate_bundle

    bundle = ModelBundle.load(resolve_model_path(args.model))
    if args.device != "cpu":
        from training.distributed import select_device

        bundle = bundle.to(select_device(args.device))
    records = read_records(args.data)
    metrics = evaluate_bundle(bundle, records, args.out, n_boot=args.n_boot)
    print(json.dumps(_headline(metrics), indent=2, default=str))
    print(f"metrics written to {args.out}")
    return 0


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of a metrics dict (the full dict is in metrics.json)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float, str)) or value is None:
            out[key] = value
        elif isinstance(value, dict):
            inner = {k: v for k, v in value.items() if isinstance(v, (int, float, str)) or v is None}
            if inner:
                out[key] = inner
    return out


def _demo(args: argparse.Namespace) -> int:
    from training.demo import run_demo

    summary = run_demo(
        out=args.out, work=args.work, seed=args.seed, config=args.config, progress=not args.no_progress,
        train_cases=args.train_cases, held_out_cases=args.held_out_cases, matrix=args.matrix, workers=args.workers,
        joints=[j.strip() for j in args.joints.split(",") if j.strip()], transfer_cases=args.transfer_cases,
    )
    print(summary.text())
    return 0
