"""The demo models: a knee bundle trained end to end on synthetic phantoms in minutes on a CPU,
and ankle and shoulder classifiers transferred from it.

``orthonode train demo`` runs the whole method at toy scale so the node has a model per joint
to serve out of the box and so a user can watch every stage once:

1. generate knee phantoms (small matrix): training cases spread over four sites, and a
   fifth, held-out site for an external test;
2. pretrain the sagittal, coronal and axial diffusion backbones briefly (``demo`` config);
3. fine-tune a fused three-plane classifier with EHR late fusion on the pretrained EMA
   backbones, frozen (their features are computed once per exam, as the node computes them,
   and only the pools and heads train: ``demo.yaml`` says what that measured), and a
   sagittal segmenter from the same backbones, every weight trained;
4. evaluate the bundle on the held-out site and save ONE bundle file (classifier +
   segmenter + card).  The card says the model was trained on synthetic phantoms and is
   not for clinical use;
5. for the ankle and the shoulder: phantoms of the same sites, and a fused classifier on the
   knee classifier's backbones, frozen (:data:`TRANSFER`), so only the pools and heads learn
   the joint's labels.  The three classifiers
   then hold the same backbone weights, which a node serving them keeps once
   (:mod:`inference.model_set`).  Each is evaluated on its joint's held-out site.

The phantom helpers are shared with ``benchmarks/label_efficiency``.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: the site left out of training in the demo and the benchmark (a 1.5 T scanner of another vendor)
HELD_OUT_SITE = "siemens_1p5t_d"
#: the joints the demo trains a model for; the first is trained end to end, the others transfer from it
DEMO_JOINTS = ("knee", "ankle", "shoulder")
#: classify settings of the transfer to the ankle and shoulder: frozen backbones (features
#: computed once), so only the attention pools, normalisation and heads train
TRANSFER = {"backbone_lr_factor": 0.0, "cache_features": True, "steps": 1500, "head_lr": 2.0e-3}


def demo_model_paths(knee: Path) -> dict[str, Path]:
    """Where the demo writes each joint's model: next to the knee bundle, ``knee`` in its name
    replaced by the joint (``models/demo-knee.pt`` -> ``models/demo-ankle.pt``)."""
    knee = Path(knee)
    out = {}
    for joint in DEMO_JOINTS:
        stem = knee.stem.replace("knee", joint) if "knee" in knee.stem else f"{knee.stem}-{joint}"
        out[joint] = knee if joint == "knee" else knee.with_name(stem + knee.suffix)
    return out


def training_sites(held_out: str = HELD_OUT_SITE) -> list[str]:
    from training.phantoms.sites import site_names

    names = list(site_names())
    if held_out not in names:
        raise ValueError(f"held-out site {held_out!r} is not a phantom site; sites are {names}")
    return [s for s in names if s != held_out]


def _one_case(args: tuple[str, str, int, int, str, int]) -> Any:
    from training.phantoms.generate import generate_case

    folder, joint, index, seed, site, matrix = args
    return generate_case(Path(folder), joint, index, seed=seed, site=site, matrix=matrix).spec


def make_phantom_set(
    folder: Path,
    joint: str,
    indices: Sequence[int],
    sites: Sequence[str],
    seed: int,
    matrix: int,
    workers: int = 1,
) -> Path:
    """Generate phantom cases ``indices`` into ``folder``, case ``i`` at ``sites[i % len(sites)]``.

    Case ids come from the index (``knee_0001`` ...), so disjoint index ranges give sets
    that never share an exam id.  A folder whose ``cases.csv`` already lists exactly these
    cases is reused (reruns of the benchmark skip generation); a folder holding other cases
    is an error rather than a silent mix.
    """
    from training.phantoms.generate import CASES_CSV, case_id_for, write_cases_csv

    folder = Path(folder)
    if not sites:
        raise ValueError("make_phantom_set: sites is empty")
    wanted = [case_id_for(joint, i) for i in indices]
    manifest = folder / CASES_CSV
    if manifest.is_file():
        import csv

        with manifest.open(newline="") as fh:
            have = [row["case_id"] for row in csv.DictReader(fh)]
        if have == wanted:
            log.info("reusing %d phantom cases in %s", len(have), folder)
            return folder
        raise FileExistsError(f"{folder} holds other phantom cases ({len(have)}); remove it or choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), joint, int(i), int(seed), sites[n % len(sites)], int(matrix)) for n, i in enumerate(indices)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            specs = list(pool.map(_one_case, jobs))
    else:
        specs = [_one_case(job) for job in jobs]
    write_cases_csv(manifest, specs)
    return folder


@dataclass
class DemoSummary:
    """What the demo did and measured; ``text()`` is what the command prints."""

    bundle: Path
    seconds: float
    cases: dict[str, int]
    held_out_site: str
    pretrain_loss: dict[str, float | None]  # None: the plane's finished run was reused
    classifier_val: dict[str, Any]
    segmenter_val: dict[str, Any]
    held_out: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    #: the transferred joints: bundle path, cases and held-out figures per joint
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def text(self) -> str:
        def fmt(value: Any) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        lines = [
            f"demo knee model written to {self.bundle}; {1 + len(self.transfers)} model(s) in "
            f"{self.seconds / 60:.1f} min",
            f"  data: synthetic knee phantoms, {self.cases['train']} training cases on 4 sites, "
            f"{self.cases['held_out']} held-out cases from site {self.held_out_site}",
            "  pretraining (last loss): " + ", ".join(
                f"{p} {'reused' if v is None else f'{v:.3f}'}" for p, v in self.pretrain_loss.items()),
            f"  validation: fused classifier macro AUC {fmt(self.classifier_val.get('val_macro_auc'))}, "
            f"segmenter mean Dice {fmt(self.segmenter_val.get('val_mean_dice'))}",
            f"  held-out site ({self.cases['held_out']} exams never seen in training): macro AUC "
            f"{fmt(self.held_out.get('macro_auc'))}, mean Dice {fmt(self.held_out.get('mean_dice'))} "
            f"(metrics in {self.held_out.get('out_dir')})",
            *held_out_lines(self.held_out),
            *[line for joint, t in self.transfers.items() for line in (
                f"demo {joint} model written to {t['bundle']}: the knee classifier's backbones (frozen), "
                f"{t['cases']['train']} training phantoms; held-out site ({t['cases']['held_out']} exams): macro AUC "
                f"{fmt(t['held_out'].get('macro_auc'))}",
                *held_out_lines(t["held_out"]))],
            "  timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items()),
            "  trained on synthetic phantoms only: for demonstration, NOT for clinical use",
        ]
        return "\n".join(lines)


def held_out_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-label and per-structure figures of an ``evaluate_bundle`` result, for the card and printouts."""
    cls = metrics.get("classification") or {}
    seg = metrics.get("segmentation") or {}
    labels = {}
    for key, entry in (cls.get("labels") or {}).items():
        labels[key] = {k: entry.get(k) for k in ("auc", "auc_ci", "n", "n_pos", "precision", "recall", "threshold")}
    structures = {key: (entry or {}).get("mean") for key, entry in (seg.get("per_structure") or {}).items()}
    return {"macro_auc": cls.get("macro_auc"), "macro_auc_ci": cls.get("macro_auc_ci"),
            "mean_dice": seg.get("mean_dice"), "labels": labels, "dice": structures}


def held_out_lines(held: dict[str, Any], indent: str = "    ") -> list[str]:
    """The held-out figures as text: AUC per label with its interval and positives, Dice per structure.

    Agreement counts are not shown: where most findings are absent, "absent" everywhere
    agrees almost always, so the model is judged by its AUC per label instead.
    """
    lines = []
    labels = held.get("labels") or {}
    if labels:
        lines.append(f"{indent}{'finding':<10} {'AUC':>5}  {'95 % interval':<13} positives  recall  precision")
        for key, e in labels.items():
            ci = e.get("auc_ci")
            ci_text = f"{ci[0]:.2f}-{ci[1]:.2f}" if ci and None not in ci else "n/a"
            auc = "n/a" if e.get("auc") is None else f"{e['auc']:.2f}"
            rec = "n/a" if e.get("recall") is None else f"{e['recall']:.2f}"
            prec = "n/a" if e.get("precision") is None else f"{e['precision']:.2f}"
            lines.append(f"{indent}{key:<10} {auc:>5}  {ci_text:<13} {e.get('n_pos', 0):>3}/{e.get('n', 0):<5} "
                         f"{rec:>6}  {prec:>9}")
    dice = {k: v for k, v in (held.get("dice") or {}).items() if v is not None}
    if dice:
        lines.append(f"{indent}Dice: " + ", ".join(f"{k} {v:.2f}" for k, v in dice.items()))
    return lines


def run_demo(
    out: Path = Path("models/demo-knee.pt"),
    work: Path | None = None,
    seed: int = 0,
    config: str = "demo",
    progress: bool = True,
    train_cases: int = 128,
    held_out_cases: int = 40,
    matrix: int = 64,
    workers: int = 2,
    joints: Sequence[str] = DEMO_JOINTS,
    transfer_cases: int = 64,
) -> DemoSummary:
    """Build the demo bundles (``out`` is the knee's, the others :func:`demo_model_paths`);
    see the module docstring for the stages.  ``joints`` must start with the knee."""
    from inference.labels import PLANES
    from inference.model import FeaturePoint
    from training.cli import read_records
    from training.config import load_config
    from training.data import pretrain_dataset
    from training.distributed import DistContext
    from training.evaluate import evaluate_bundle
    from training.finetune import classifier_backbones, finetune_classifier, finetune_segmenter, make_bundle
    from training.pretrain import cache_kwargs, preprocess_config, pretrain

    started = time.monotonic()
    timings: dict[str, float] = {}
    out = Path(out)
    # default under data/ (git-ignored in a checkout), not next to the bundle in models/
    work = Path(work) if work is not None else Path("data") / f"{out.stem}-train"
    cfg = load_config(config)
    if not joints or joints[0] != "knee" or any(j not in DEMO_JOINTS for j in joints):
        raise ValueError(f"joints must start with the knee and name joints of {DEMO_JOINTS}, got {list(joints)}")
    if train_cases < 4 or held_out_cases < 1:
        raise ValueError(f"the demo needs >= 4 training and >= 1 held-out cases, got {train_cases} and {held_out_cases}")

    t = time.monotonic()
    sites = training_sites()
    train_dir = make_phantom_set(work / "phantoms" / "train", "knee", range(train_cases), sites, seed, matrix, workers)
    test_dir = make_phantom_set(
        work / "phantoms" / "held_out", "knee", range(train_cases, train_cases + held_out_cases),
        [HELD_OUT_SITE], seed, matrix, workers,
    )
    train = read_records([f"phantom:{train_dir}"])
    held_out = read_records([f"phantom:{test_dir}"])
    timings["phantoms"] = time.monotonic() - t

    t = time.monotonic()
    losses: dict[str, float | None] = {}
    pre_root = work / "pretrain"
    for plane in ("sagittal", "coronal", "axial"):
        usable = [r for r in train if plane in r.planes]
        dataset = pretrain_dataset(usable, plane, preprocess_config(cfg), **cache_kwargs(cfg, pre_root / plane))
        result = pretrain(cfg, dataset, plane, pre_root / plane, resume=True, ctx=DistContext(), progress=progress)
        losses[plane] = result.losses[-1][1] if result.losses else None  # None: a finished run reused
    timings["pretraining"] = time.monotonic() - t

    t = time.monotonic()
    classifier = finetune_classifier(
        cfg, train, ["sagittal", "coronal", "axial"], use_ehr=True, pretrained=pre_root, seed=seed,
        progress=progress, run_dir=work / "classify",
    )
    timings["classifier"] = time.monotonic() - t
    t = time.monotonic()
    segmenter = finetune_segmenter(
        cfg, train, plane="sagittal", pretrained=pre_root, seed=seed, progress=progress, run_dir=work / "segment"
    )
    timings["segmenter"] = time.monotonic() - t

    bundle = make_bundle(cfg, classifier=classifier, segmenter=segmenter, name="orthodiffusion-knee-demo")
    t = time.monotonic()
    metrics = evaluate_bundle(bundle, held_out, work / "eval_held_out", n_boot=200)
    timings["evaluation"] = time.monotonic() - t
    held = {**held_out_summary(metrics), "out_dir": str(work / "eval_held_out")}
    # the card also records what the held-out phantom site gave
    bundle.card.metrics["held_out_site"] = {"site": HELD_OUT_SITE, "exams": len(held_out), "matrix": matrix,
                                           **{k: v for k, v in held.items() if k != "out_dir"}}
    bundle.save(out)

    transfers: dict[str, dict[str, Any]] = {}
    source = classifier_backbones(classifier.model, f"the knee classifier of {out.name}")
    # the transfers take their features at the method's reference point (FeaturePoint's
    # defaults) on the knee's backbones: the config's own point was chosen on knee findings only
    reference_points = {plane: FeaturePoint().to_dict() for plane in PLANES}
    transfer_cfg = cfg.with_overrides(classify=TRANSFER, model={"feature_points": reference_points})
    for index, joint in enumerate(joints[1:], start=1):
        t = time.monotonic()
        first = train_cases + held_out_cases  # case ids never shared with the knee sets
        joint_train = make_phantom_set(work / "phantoms" / f"{joint}_train", joint, range(first, first + transfer_cases),
                                       sites, seed + index, matrix, workers)
        joint_test = make_phantom_set(
            work / "phantoms" / f"{joint}_held_out", joint,
            range(first + transfer_cases, first + transfer_cases + held_out_cases), [HELD_OUT_SITE], seed + index,
            matrix, workers,
        )
        records, test_records = read_records([f"phantom:{joint_train}"]), read_records([f"phantom:{joint_test}"])
        timings[f"{joint} phantoms"] = time.monotonic() - t
        t = time.monotonic()
        result = finetune_classifier(
            transfer_cfg, records, ["sagittal", "coronal", "axial"], use_ehr=True, pretrained=source, seed=seed,
            progress=progress, run_dir=work / f"classify_{joint}",
        )
        joint_bundle = make_bundle(transfer_cfg, classifier=result, name=f"orthodiffusion-{joint}-demo")
        joint_metrics = evaluate_bundle(joint_bundle, test_records, work / f"eval_held_out_{joint}", n_boot=200)
        joint_held = held_out_summary(joint_metrics)
        joint_bundle.card.metrics["held_out_site"] = {"site": HELD_OUT_SITE, "exams": len(test_records),
                                                      "matrix": matrix, **joint_held}
        path = demo_model_paths(out)[joint]
        joint_bundle.save(path)
        timings[f"{joint} classifier"] = time.monotonic() - t
        transfers[joint] = {"bundle": str(path), "cases": {"train": len(records), "held_out": len(test_records)},
                            "held_out": joint_held}

    summary = DemoSummary(
        bundle=out,
        seconds=time.monotonic() - started,
        cases={"train": len(train), "held_out": len(held_out)},
        held_out_site=HELD_OUT_SITE,
        pretrain_loss=losses,
        classifier_val=classifier.metrics,
        segmenter_val=segmenter.metrics,
        held_out=held,
        timings=timings,
        transfers=transfers,
    )
    (work / "summary.json").write_text(json.dumps({
        "bundle": str(out), "seconds": summary.seconds, "cases": summary.cases, "held_out_site": HELD_OUT_SITE,
        "pretrain_loss": losses, "classifier_val": classifier.metrics, "segmenter_val": segmenter.metrics,
        "held_out": held, "timings": timings, "transfers": transfers,
    }, indent=2, default=str))
    return summary
