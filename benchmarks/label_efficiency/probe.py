"""Frozen-feature probe of the label-efficiency benchmark's backbones (phantoms only).

Fine-tuning one classifier per variant is too slow to search where the diffusion features
carry the phantom findings.  This probe answers the cheaper question: with the backbone
frozen, which (pretraining length, timestep t, UNet block, pooling) gives features from
which a linear model separates the knee labels, on the in-site test set and on the
held-out site?  For every point it

1. extracts features of every exam and plane once, with the project's own
   :class:`inference.model.FeatureExtractor` (evaluation mode: one fixed, seeded noise
   volume per shape) on the exact arrays the trainer and the node see
   (:func:`training.data.classification_dataset`, :mod:`inference.preprocess`);
2. pools them per channel: global average (``gap``), average and standard deviation
   (``gap_std``) or average and maximum (``gap_max``);
3. fits, per label, an L2 logistic regression on standardised features, C chosen by
   stratified cross-validation on the labelled training subset (the seeded stratified
   subset of :func:`training.finetune.split_labelled`, without a validation split: the
   cross-validation plays its part), on the fused three-plane concatenation and per plane;
4. scores macro AUC (mean over the labels with both classes in the test set).

Baselines in the same table: the same probe on a randomly initialised backbone of the
same architecture (the weights pretraining starts from, i.e. what "scratch" features
give), and on the preprocessed input itself, average-pooled to a coarse grid (default
4 x 8 x 8 per plane): if the raw probe cannot find a finding, no backbone will.

    python benchmarks/label_efficiency/probe.py --work WORK [--timesteps 0,25,50,100,200,400]
        [--blocks down_2,down_3,mid_0,mid_2,up_0,up_1] [--checkpoints all|last]
        [--fractions 0.1,1.0] [--poolings gap,gap_std] [--device auto] [--time-budget S]
        [--report PATH] [--json PATH]

WORK is a folder written by ``benchmarks/label_efficiency/run.py`` (``config.yaml``,
``phantoms/knee_*``, ``pretrain/<plane>``).  The results JSON (default
``WORK/probe/results.json``) and the markdown report are rewritten after every extraction,
so a run that is killed still leaves its data; ``--time-budget`` stops starting new
extractions once exceeded and still writes both.  Nothing big is cached on disk: pooled
features live in memory only.  Synthetic phantoms only: the numbers say where the
machinery's features carry the planted findings, not how the method performs on patients.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

log = logging.getLogger("label_efficiency.probe")

PLANES = ("sagittal", "coronal", "axial")
TRAIN_SET = "knee_pool"
TEST_SETS = ("knee_test", "knee_held_out")
POOLINGS = ("gap", "gap_std", "gap_max")
RAW_POOLING = "avg"  # the raw-input source has one pooling: a coarse average grid
#: inverse regularisation strengths searched by cross-validation (standardised features)
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
C_DEFAULT = 1.0  # used when the subset has too few positives or negatives to cross-validate
CV_FOLDS = 3
DEFAULT_TIMESTEPS = "0,25,50,100,200,400"
DEFAULT_BLOCKS = "down_2,down_3,mid_0,mid_2,up_0,up_1"


# --------------------------------------------------------------------------- data


@dataclass
class ExamSet:
    """One phantom set loaded into memory: preprocessed volumes per plane and the labels."""

    name: str
    exam_ids: list[str]
    volumes: dict[str, np.ndarray]  # plane -> (N, 1, D, H, W) float32
    labels: np.ndarray  # (N, K) 0/1 (unknown stored as 0)
    label_mask: np.ndarray  # (N, K) 1 where known
    label_keys: tuple[str, ...]
    records: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.exam_ids)


def load_exam_set(work: Path, name: str, cfg: Any) -> ExamSet:
    """Read ``WORK/phantoms/<name>`` with the trainer's readers and preprocessing."""
    from training.cli import read_records
    from training.data import classification_dataset
    from training.pretrain import cache_kwargs, preprocess_config

    folder = work / "phantoms" / name
    if not folder.is_dir():
        raise FileNotFoundError(f"--work {work}: phantom set {folder} does not exist (run run.py on this WORK first)")
    records = read_records([f"phantom:{folder}"])
    # run.py's configuration caches preprocessed exams in WORK/cache: the same keys are reused
    dataset = classification_dataset(records, PLANES, preprocess_config(cfg), **cache_kwargs(cfg, None))
    excluded = {exam_id for exam_id, _ in getattr(dataset, "excluded", [])}
    ids: list[str] = []
    planes: dict[str, list[np.ndarray]] = {p: [] for p in PLANES}
    labels, masks = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        ids.append(str(item["exam_id"]))
        for plane in PLANES:
            planes[plane].append(_numpy(item[plane]))
        labels.append(_numpy(item["labels"]))
        masks.append(_numpy(item["label_mask"]))
    by_id = {r.exam_id: r for r in records if r.exam_id not in excluded}
    return ExamSet(
        name=name,
        exam_ids=ids,
        volumes={p: np.stack(v).astype(np.float32) for p, v in planes.items()},
        labels=np.stack(labels).astype(np.float32),
        label_mask=np.stack(masks).astype(np.float32),
        label_keys=tuple(dataset.label_keys),
        records=[by_id[i] for i in ids],
    )


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "as_tensor"):  # MONAI MetaTensor
        value = value.as_tensor()
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def training_subset(pool: ExamSet, fraction: float, seed: int) -> np.ndarray:
    """Row indices of the labelled subset: :func:`training.finetune.split_labelled` without validation.

    The fine-tuning cells take a validation split out of the same subset to pick thresholds;
    the probe picks its C by cross-validation inside the subset instead, so it trains on all of it.
    """
    from training.finetune import split_labelled

    subset, _ = split_labelled(pool.records, fraction, 0.0, seed)
    index = {exam_id: i for i, exam_id in enumerate(pool.exam_ids)}
    return np.array(sorted(index[r.exam_id] for r in subset), dtype=int)


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class Source:
    """Where a plane's backbone weights come from: a pretraining step, random init, or none (raw)."""

    kind: str  # "pretrained" | "random" | "raw"
    step: int | None = None
    files: tuple[tuple[str, str], ...] = ()  # (plane, file) per plane for pretrained sources

    @property
    def label(self) -> str:
        if self.kind == "pretrained":
            return f"pretrained@{self.step}"
        return self.kind


def pretrained_sources(work: Path, which: str) -> list[Source]:
    """Pretraining checkpoints common to the three planes, newest first (the EMA export included)."""
    import torch

    from training.pretrain import EMA_FILE, list_checkpoints

    steps_per_plane: list[dict[int, Path]] = []
    for plane in PLANES:
        run_dir = work / "pretrain" / plane
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--work {work}: no pretraining run {run_dir}")
        found: dict[int, Path] = {}
        for path in list_checkpoints(run_dir):
            found[int(path.stem.split("_")[1])] = path
        ema = run_dir / EMA_FILE
        if ema.is_file():
            step = int(torch.load(ema, map_location="cpu", weights_only=False)["step"])
            found.setdefault(step, ema)  # a checkpoint of the same step carries the same EMA weights
        if not found:
            raise FileNotFoundError(f"{run_dir} holds neither {EMA_FILE} nor checkpoints")
        steps_per_plane.append(found)
    common = sorted(set.intersection(*(set(s) for s in steps_per_plane)), reverse=True)
    if not common:
        raise ValueError(
            f"--work {work}: the planes' pretraining runs share no step "
            f"({[sorted(s) for s in steps_per_plane]}); the fused probe needs one step for every plane"
        )
    if which == "last":
        common = common[:1]
    return [
        Source("pretrained", step, tuple((plane, str(found[step])) for plane, found in zip(PLANES, steps_per_plane)))
        for step in common
    ]


def load_backbone(source: Source, plane: str, model_cfg: Any, seed: int, device: Any) -> Any:
    """The frozen backbone of ``plane`` for ``source``, in evaluation mode on ``device``."""
    import torch

    from inference.model import DiffusionBackbone, ModelConfig
    from training.pretrain import EMA_FILE, load_checkpoint

    if source.kind == "random":
        # the same initial weights pretraining starts from (pretrain() seeds with pretrain.seed)
        torch.manual_seed(seed)
        backbone = DiffusionBackbone(model_cfg)
    elif source.kind == "pretrained":
        path = Path(dict(source.files)[plane])
        if path.name == EMA_FILE:
            data = torch.load(path, map_location="cpu", weights_only=False)
            state, stored_cfg = data["state_dict"], data["model_config"]
        else:
            ckpt = load_checkpoint(path)
            # EMA weights are what fine-tuning loads; a checkpoint without them falls back to the raw weights
            state, stored_cfg = (ckpt["ema"] if ckpt.get("ema") else ckpt["model"]), ckpt["model_config"]
        stored = ModelConfig.from_dict(stored_cfg)
        if stored.input_shape != model_cfg.input_shape:
            raise ValueError(
                f"{path}: backbone pretrained on {stored.input_shape} volumes, WORK's configuration "
                f"preprocesses to {model_cfg.input_shape}"
            )
        backbone = DiffusionBackbone(stored)
        backbone.load_state_dict(state)
    else:
        raise ValueError(f"source kind {source.kind!r} has no backbone")
    backbone.requires_grad_(False)
    return backbone.to(device).eval()


def pool_features(act: Any, pooling: str) -> Any:
    """(B, C, d, h, w) activations -> (B, C) or (B, 2C) per-channel statistics."""
    import torch

    flat = act.float().flatten(2)
    mean = flat.mean(dim=2)
    if pooling == "gap":
        return mean
    if pooling == "gap_std":
        return torch.cat([mean, flat.std(dim=2, unbiased=False)], dim=1)
    if pooling == "gap_max":
        return torch.cat([mean, flat.amax(dim=2)], dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def extract(
    backbone: Any, timestep: int, block: str, volumes: np.ndarray, poolings: Sequence[str], batch: int, device: Any
) -> dict[str, np.ndarray]:
    """Pooled features of every volume at (t, block), one forward pass per batch."""
    import torch

    from inference.model import FeatureExtractor, FeaturePoint

    extractor = FeatureExtractor(backbone, FeaturePoint(timestep, block)).eval()
    out: dict[str, list[np.ndarray]] = {p: [] for p in poolings}
    with torch.inference_mode():
        for start in range(0, len(volumes), batch):
            x = torch.from_numpy(volumes[start:start + batch]).to(device)
            act = extractor(x)
            for pooling in poolings:
                out[pooling].append(pool_features(act, pooling).cpu().numpy())
    return {p: np.concatenate(v).astype(np.float64) for p, v in out.items()}


def raw_features(volumes: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """The preprocessed input average-pooled to ``grid`` (d, h, w), flattened."""
    import torch
    import torch.nn.functional as F

    pooled = F.adaptive_avg_pool3d(torch.from_numpy(volumes).float(), grid)
    return pooled.flatten(1).numpy().astype(np.float64)


# --------------------------------------------------------------------------- probe


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    return model.fit(x, y)


def choose_c(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, str]:
    """C of the best out-of-fold AUC (ties: the smaller C, i.e. the stronger penalty).

    Folds are stratified, at most :data:`CV_FOLDS` and never more than the minority class
    count; the out-of-fold probabilities of all folds are scored together, which is steadier
    than a mean of per-fold AUCs when a fold holds one positive.
    """
    from sklearn.model_selection import StratifiedKFold

    from training.finetune import roc_auc

    minority = int(min(y.sum(), len(y) - y.sum()))
    folds = min(CV_FOLDS, minority)
    if folds < 2:
        return C_DEFAULT, f"C fixed at {C_DEFAULT}: {minority} exam(s) of the minority class, no cross-validation"
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    best_c, best_auc = C_DEFAULT, -1.0
    for c in C_GRID:
        oof = np.zeros(len(y))
        for train, val in splitter.split(x, y):
            oof[val] = _fit(x[train], y[train], c, seed).predict_proba(x[val])[:, 1]
        auc = roc_auc(y, oof)
        if auc is not None and auc > best_auc + 1e-9:
            best_c, best_auc = c, auc
    return best_c, f"{folds}-fold CV, out-of-fold AUC {best_auc:.3f}"


def probe_label(
    x: np.ndarray, y: np.ndarray, tests: Mapping[str, tuple[np.ndarray, np.ndarray]], seed: int
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """One label's probe: fit on (x, y), AUC on each test ``(x, y)``; runs with one BLAS thread.

    Many small fits run side by side in worker processes: a BLAS library that spreads each
    tiny fit over every core is slower by an order of magnitude on a shared machine.
    """
    from threadpoolctl import threadpool_limits

    from training.finetune import roc_auc

    n_pos = int(y.sum())
    info: dict[str, Any] = {"n": int(len(y)), "n_pos": n_pos, "C": None}
    if n_pos == 0 or n_pos == len(y):
        info["note"] = f"not fitted: the training subset has {'no positive' if n_pos == 0 else 'no negative'} exam"
        return info, {name: None for name in tests}
    with threadpool_limits(1):
        c, note = choose_c(x, y, seed)
        model = _fit(x, y, c, seed)
        aucs = {name: (roc_auc(ty, model.predict_proba(tx)[:, 1]) if len(ty) else None)
                for name, (tx, ty) in tests.items()}
    info.update(C=c, note=note)
    return info, aucs


def label_tasks(
    train_x: np.ndarray, train: ExamSet, rows: np.ndarray, tests: Mapping[str, tuple[ExamSet, np.ndarray]]
) -> list[tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """Per label: the training rows and test rows where that label is known (unknown labels drop out)."""
    out = []
    for k in range(len(train.label_keys)):
        known = train.label_mask[rows, k] > 0
        test_parts = {}
        for name, (test, test_x) in tests.items():
            keep = test.label_mask[:, k] > 0
            test_parts[name] = (test_x[keep], test.labels[keep, k])
        out.append((train_x[known], train.labels[rows, k][known], test_parts))
    return out


def summarise(label_keys: Sequence[str], outcomes: Sequence[tuple[dict[str, Any], dict[str, float | None]]],
              test_names: Sequence[str]) -> dict[str, Any]:
    """``{"per_label": {key: fit info}, test: {"macro_auc", "n_labels", "auc": {key: AUC or None}}}``.

    Macro AUC is the mean over labels with both classes in the test set (and a fitted probe).
    """
    out: dict[str, Any] = {"per_label": {key: info for key, (info, _) in zip(label_keys, outcomes)}}
    for name in test_names:
        aucs = {key: aucs[name] for key, (_, aucs) in zip(label_keys, outcomes)}
        scored = [v for v in aucs.values() if v is not None]
        out[name] = {"macro_auc": float(np.mean(scored)) if scored else None, "n_labels": len(scored), "auc": aucs}
    return out


def probe(
    train_x: np.ndarray,
    train: ExamSet,
    rows: np.ndarray,
    tests: Mapping[str, tuple[ExamSet, np.ndarray]],
    seed: int,
) -> dict[str, Any]:
    """Per-label logistic probes trained on ``train_x`` (rows ``rows`` of ``train``), scored on ``tests``.

    A label whose training subset has one class only is not fitted (its AUC is None
    everywhere, with the reason in its note).  Sequential; the driver runs the same per-label
    work in parallel through :func:`probe_label`.
    """
    outcomes = [probe_label(x, y, parts, seed) for x, y, parts in label_tasks(train_x, train, rows, tests)]
    return summarise(train.label_keys, outcomes, list(tests))


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Work:
    """One extraction: a feature source at one (t, block); the raw source has neither."""

    source: Source
    timestep: int | None
    block: str | None

    @property
    def key(self) -> str:
        if self.source.kind == "raw":
            return "raw"
        return f"{self.source.label}/t{self.timestep}/{self.block}"


def plan(sources: Sequence[Source], timesteps: Sequence[int], blocks: Sequence[str]) -> list[Work]:
    """Extraction order: raw input, the last checkpoint, random init, then earlier checkpoints.

    A time budget cuts the tail of this list, so the comparisons that matter most come first.
    """
    pretrained = [s for s in sources if s.kind == "pretrained"]
    ordered = pretrained[:1] + [s for s in sources if s.kind == "random"] + pretrained[1:]
    works = [Work(Source("raw"), None, None)]
    for source in ordered:
        works += [Work(source, t, b) for t in timesteps for b in blocks]
    return works


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _parse_list(text: str, what: str, cast: Any = str) -> list[Any]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{what}: empty list")
    try:
        return [cast(s) for s in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: cannot read {text!r} as a comma-separated list") from None


def _grid(text: str) -> tuple[int, int, int]:
    values = _parse_list(text.replace("x", ","), "--raw-grid", int)
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--raw-grid must be three positive sizes like 4x8x8, got {text!r}")
    return tuple(values)  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a run.py working folder")
    parser.add_argument("--timesteps", default=DEFAULT_TIMESTEPS, help=f"comma-separated t (default {DEFAULT_TIMESTEPS})")
    parser.add_argument("--blocks", default=DEFAULT_BLOCKS, help=f"comma-separated UNet blocks (default {DEFAULT_BLOCKS})")
    parser.add_argument("--checkpoints", choices=("all", "last"), default="all",
                        help="every pretraining checkpoint (the pretraining-length axis) or the last one")
    parser.add_argument("--fractions", default="0.1,1.0", help="label fractions of the knee pool (default 0.1,1.0)")
    parser.add_argument("--poolings", default="gap,gap_std", help=f"comma-separated, of {','.join(POOLINGS)}")
    parser.add_argument("--no-per-plane", action="store_true", help="probe the fused concatenation only")
    parser.add_argument("--no-random", action="store_true", help="skip the randomly initialised backbone")
    parser.add_argument("--raw-grid", type=_grid, default=(4, 8, 8), help="raw-input pooling grid d x h x w (default 4x8x8)")
    parser.add_argument("--seed", type=int, default=0, help="label-subset and cross-validation seed")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--batch", type=int, default=None, help="volumes per forward pass (default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes fitting probes (default: every core; 1 runs them in this process)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new extraction after this many seconds; the report is still written")
    parser.add_argument("--report", type=Path, default=REPO / "benchmarks" / "results" / "label_efficiency_probe.md")
    parser.add_argument("--json", type=Path, default=None, help="results JSON (default WORK/probe/results.json)")
    return parser


def resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        timesteps = _parse_list(args.timesteps, "--timesteps", int)
        blocks = _parse_list(args.blocks, "--blocks")
        fractions = _parse_list(args.fractions, "--fractions", float)
        poolings = _parse_list(args.poolings, "--poolings")
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    bad = [p for p in poolings if p not in POOLINGS]
    if bad:
        parser.error(f"--poolings: unknown pooling(s) {bad}; choose from {POOLINGS}")
    bad_f = [f for f in fractions if not 0.0 < f <= 1.0]
    if bad_f:
        parser.error(f"--fractions must lie in (0, 1], got {bad_f}")
    command = " ".join(["python benchmarks/label_efficiency/probe.py", *(sys.argv[1:] if argv is None else argv)])
    return run(args, timesteps, blocks, fractions, poolings, command)


def run(args: argparse.Namespace, timesteps: list[int], blocks: list[str], fractions: list[float],
        poolings: list[str], command: str) -> int:
    """Load the sets, then extract and probe point by point, saving JSON and report after each."""
    import torch

    from benchmarks.label_efficiency.run import machine
    from inference.model import FeaturePoint, parse_block
    from training.config import load_config

    started = time.monotonic()
    work = args.work.resolve()
    config_path = work / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"--work {work}: no config.yaml (not a run.py working folder)")
    cfg = load_config(config_path)
    model_cfg = cfg.model_cfg()
    for t in timesteps:
        if not 0 <= t < model_cfg.num_train_timesteps:
            raise ValueError(f"--timesteps: {t} is outside [0, {model_cfg.num_train_timesteps})")
        FeaturePoint(t, "mid_2")
    for b in blocks:
        parse_block(b, model_cfg.num_levels)  # names the block and the valid range on error
    device = resolve_device(args.device)
    batch = args.batch or (32 if device.type == "cuda" else 8)
    json_path = args.json or work / "probe" / "results.json"

    t0 = time.monotonic()
    sets = {name: load_exam_set(work, name, cfg) for name in (TRAIN_SET, *TEST_SETS)}
    pool = sets[TRAIN_SET]
    for name in TEST_SETS:
        if sets[name].label_keys != pool.label_keys:
            raise ValueError(f"{name} has labels {sets[name].label_keys}, the pool {pool.label_keys}")
    subsets = {f: training_subset(pool, f, args.seed) for f in fractions}
    load_seconds = time.monotonic() - t0

    sources = pretrained_sources(work, args.checkpoints)
    if not args.no_random:
        sources.append(Source("random"))
    works = plan(sources, timesteps, blocks)
    results: dict[str, Any] = {
        "status": "running",
        "command": command,
        "work": str(work),
        "config": cfg.to_dict().get("name"),
        "model_preset": cfg.to_dict()["model"].get("preset"),
        "input_shape": list(model_cfg.input_shape),
        "pretrain_steps_planned": cfg.pretrain.steps,
        "device": str(device),
        "machine": machine(),
        "load_average_at_start": _load(),
        "timesteps": timesteps,
        "blocks": blocks,
        "poolings": poolings,
        "fractions": fractions,
        "raw_grid": list(args.raw_grid),
        "seed": args.seed,
        "c_grid": list(C_GRID),
        "label_keys": list(pool.label_keys),
        "sets": {name: {"n": len(s), "positives": {k: int(v) for k, v in zip(
            s.label_keys, (s.labels * s.label_mask).sum(axis=0))}} for name, s in sets.items()},
        "subsets": {str(f): {"n": int(len(rows)), "exam_ids": [pool.exam_ids[i] for i in rows]}
                    for f, rows in subsets.items()},
        "sources": [{"source": s.label, "files": dict(s.files)} for s in sources],
        "planned_extractions": len(works),
        "extractions": [],
        "rows": [],
        "timings": {"load_seconds": round(load_seconds, 1)},
    }

    def save(status: str) -> None:
        results["status"] = status
        results["timings"]["total_seconds"] = round(time.monotonic() - started, 1)
        results["load_average_at_end"] = _load()
        _atomic_write(json_path, json.dumps(results, indent=1, default=str))
        _atomic_write(args.report, render_report(results))

    from joblib import Parallel, delayed

    jobs = args.jobs or os.cpu_count() or 1
    runner = Parallel(n_jobs=jobs) if jobs > 1 else (lambda calls: [f(*a, **kw) for f, a, kw in calls])
    results["probe_jobs"] = jobs
    backbones: dict[tuple[str, str], Any] = {}
    status = "complete"
    for index, item in enumerate(works):
        elapsed = time.monotonic() - started
        if args.time_budget is not None and elapsed > args.time_budget:
            status = f"stopped by --time-budget {args.time_budget:g} s after {index} of {len(works)} extractions"
            log.warning("%s", status)
            break
        t_extract = time.monotonic()
        features: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # set -> pooling -> plane -> (N, F)
        if item.source.kind == "raw":
            feature_poolings = [RAW_POOLING]
            for name, s in sets.items():
                features[name] = {RAW_POOLING: {p: raw_features(s.volumes[p], args.raw_grid) for p in PLANES}}
        else:
            feature_poolings = list(poolings)
            # keep only the current source's backbones in memory
            for key in [k for k in backbones if k[0] != item.source.label]:
                del backbones[key]
            for name in sets:
                features[name] = {p: {} for p in poolings}
            for plane in PLANES:
                key = (item.source.label, plane)
                if key not in backbones:
                    backbones[key] = load_backbone(item.source, plane, model_cfg, cfg.pretrain.seed, device)
                for name, s in sets.items():
                    pooled = extract(backbones[key], item.timestep, item.block, s.volumes[plane], poolings, batch, device)
                    for pooling, values in pooled.items():
                        features[name][pooling][plane] = values
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        extract_seconds = time.monotonic() - t_extract
        t_probe = time.monotonic()
        cases: list[dict[str, Any]] = []
        tasks: list[Any] = []
        for n_pool, pooling in enumerate(feature_poolings):
            # per plane for the first pooling only: the fused probe is the question, planes explain it
            per_plane = not args.no_per_plane and n_pool == 0
            for group, planes in [("fused", list(PLANES))] + ([(p, [p]) for p in PLANES] if per_plane else []):
                x = {name: np.concatenate([features[name][pooling][p] for p in planes], axis=1) for name in sets}
                for fraction, rows in subsets.items():
                    cases.append({"source": item.source.kind, "step": item.source.step, "timestep": item.timestep,
                                  "block": item.block, "pooling": pooling, "features": group,
                                  "dim": int(x[TRAIN_SET].shape[1]), "fraction": fraction, "n_train": int(len(rows))})
                    tasks.append(label_tasks(x[TRAIN_SET][rows], pool, rows,
                                             {name: (sets[name], x[name]) for name in TEST_SETS}))
        flat = [(c, k, task) for c, per_label in enumerate(tasks) for k, task in enumerate(per_label)]
        outcomes = runner(delayed(probe_label)(tx, ty, parts, args.seed) for _, _, (tx, ty, parts) in flat)
        for c, case in enumerate(cases):
            mine = [o for (ci, _, _), o in zip(flat, outcomes) if ci == c]
            results["rows"].append({**case, **summarise(pool.label_keys, mine, TEST_SETS)})
        probe_seconds = time.monotonic() - t_probe
        results["extractions"].append({"key": item.key, "extract_seconds": round(extract_seconds, 2),
                                       "probe_seconds": round(probe_seconds, 2)})
        log.info("[%d/%d] %s: features %.1f s, probes %.1f s", index + 1, len(works), item.key,
                 extract_seconds, probe_seconds)
        save("running")
    save(status)
    print(f"results: {json_path}\nreport: {args.report}")
    return 0


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


# --------------------------------------------------------------------------- report


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _row_name(row: Mapping[str, Any]) -> str:
    if row["source"] == "raw":
        return "raw input"
    if row["source"] == "random":
        return "random init"
    return f"pretrained, step {row['step']}"


def _cells(rows: Sequence[Mapping[str, Any]]) -> dict[tuple, dict[float, Mapping[str, Any]]]:
    """(source, step, t, block, pooling, features) -> fraction -> row."""
    out: dict[tuple, dict[float, Mapping[str, Any]]] = {}
    for r in rows:
        key = (r["source"], r["step"], r["timestep"], r["block"], r["pooling"], r["features"])
        out.setdefault(key, {})[r["fraction"]] = r
    return out


def _auc(row: Mapping[str, Any] | None, test: str) -> float | None:
    return None if row is None else row[test]["macro_auc"]


def _best(cells: Mapping[tuple, Mapping[float, Mapping[str, Any]]], features: str, fraction: float,
          source: str | None = None) -> tuple[tuple, Mapping[str, Any]] | None:
    """The point with the best in-site macro AUC (the held-out site never picks the point)."""
    best = None
    for key, by_fraction in cells.items():
        row = by_fraction.get(fraction)
        if row is None or key[5] != features or (source is not None and key[0] != source):
            continue
        auc = _auc(row, "knee_test")
        if auc is None:
            continue
        if best is None or auc > _auc(best[1], "knee_test"):
            best = (key, row)
    return best


def _point(key: tuple) -> str:
    source, step, t, block, pooling, _ = key
    name = _row_name({"source": source, "step": step})
    return name if source == "raw" else f"{name}, t={t}, {block}, {pooling}"


def render_report(results: Mapping[str, Any]) -> str:
    """Markdown: setting, the fused table, best points per plane, machine and time, a short reading."""
    rows = results["rows"]
    fractions = sorted(results["fractions"])
    cells = _cells(rows)
    info = results["machine"]
    sets = results["sets"]
    lines = [
        "# Frozen-feature probe of the label-efficiency backbones (phantoms)",
        "",
        f"Status: **{results['status']}** ({len(results['extractions'])} of {results['planned_extractions']} "
        "feature extractions done).  Synthetic knee phantoms only; the numbers say where the backbones' "
        "features carry the planted findings, not how the method performs on patients.",
        "",
        f"- WORK `{results['work']}` (configuration `{results['config']}`, model preset `{results['model_preset']}`, "
        f"input {' x '.join(map(str, results['input_shape']))}, {results['pretrain_steps_planned']} pretraining "
        "steps planned per plane).",
        f"- Exams: knee pool {sets['knee_pool']['n']}, in-site test {sets['knee_test']['n']}, held-out site "
        f"{sets['knee_held_out']['n']}.  Positives per label (pool / in-site / held-out): "
        + ", ".join(f"{k} {sets['knee_pool']['positives'][k]}/{sets['knee_test']['positives'][k]}/"
                    f"{sets['knee_held_out']['positives'][k]}" for k in results["label_keys"]) + ".",
        "- Label subsets (seeded, stratified, `training.finetune.split_labelled` without a validation split): "
        + ", ".join(f"{int(float(f) * 100)} % = {v['n']} exams" for f, v in results["subsets"].items()) + ".",
        f"- Probe: per label, standardised features, L2 logistic regression, C in {results['c_grid']} by "
        f"stratified {CV_FOLDS}-fold cross-validation inside the subset (fixed at {C_DEFAULT} when a class has "
        "fewer than 2 exams; a label with one class in the subset is not fitted).  Macro AUC = mean over the "
        "labels with both classes in the test set.",
        "- Features: `inference.model.FeatureExtractor` (fixed seeded noise) per plane; pooled per channel: "
        "`gap` global average, `gap_std` average + standard deviation, `gap_max` average + maximum.  "
        f"Raw input: the preprocessed volume average-pooled to {' x '.join(map(str, results['raw_grid']))} per "
        "plane.  Random init: the weights pretraining starts from (same seed), never trained.  Pretrained: "
        "EMA weights of each checkpoint.",
        "",
        "## Fused three-plane probe",
        "",
        "Macro AUC; rows sorted by source, then t, block, pooling.",
        "",
        "| features | t | block | pooling | " + " | ".join(
            f"in-site {int(f * 100)} %" for f in fractions) + " | " + " | ".join(
            f"held-out {int(f * 100)} %" for f in fractions) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in range(2 * len(fractions))) + " |",
    ]
    order = {"raw": 0, "pretrained": 1, "random": 2}
    fused = sorted((k for k in cells if k[5] == "fused"),
                   key=lambda k: (order[k[0]], -(k[1] or 0), k[2] or 0, k[3] or "", k[4]))
    for key in fused:
        by_fraction = cells[key]
        lines.append(
            f"| {_row_name({'source': key[0], 'step': key[1]})} | {'' if key[2] is None else key[2]} | "
            f"{key[3] or ''} | {key[4]} | "
            + " | ".join(_f(_auc(by_fraction.get(f), "knee_test")) for f in fractions) + " | "
            + " | ".join(_f(_auc(by_fraction.get(f), "knee_held_out")) for f in fractions) + " |"
        )
    lines += [
        "",
        "## Best points",
        "",
        "Chosen by the in-site test macro AUC (the held-out column is read off, never used to choose).  With "
        "many points and small test sets the chosen in-site value is optimistic; the held-out value of the "
        "chosen point is the fairer figure.",
        "",
        "| features | labels | best point (by in-site AUC) | in-site | held-out | best random-init point: in-site / held-out | raw input: in-site / held-out |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups = ["fused"] + [p for p in PLANES if any(k[5] == p for k in cells)]
    for group in groups:
        for f in fractions:
            best = _best({k: v for k, v in cells.items() if k[0] == "pretrained"}, group, f)
            rnd = _best(cells, group, f, "random")
            raw = _best(cells, group, f, "raw")
            lines.append(
                f"| {group} | {int(f * 100)} % | {_point(best[0]) if best else 'n/a'} | "
                f"{_f(_auc(best[1], 'knee_test') if best else None)} | "
                f"{_f(_auc(best[1], 'knee_held_out') if best else None)} | "
                f"{_f(_auc(rnd[1], 'knee_test') if rnd else None)} / {_f(_auc(rnd[1], 'knee_held_out') if rnd else None)} | "
                f"{_f(_auc(raw[1], 'knee_test') if raw else None)} / {_f(_auc(raw[1], 'knee_held_out') if raw else None)} |"
            )
    lines += ["", "## Per-label AUC of the best fused points (100 % labels or the largest fraction)", ""]
    top = max(fractions)
    per_label_rows = [("raw input", _best(cells, "fused", top, "raw")),
                      ("best pretrained", _best({k: v for k, v in cells.items() if k[0] == "pretrained"}, "fused", top)),
                      ("best random init", _best(cells, "fused", top, "random"))]
    lines += ["| features | test | " + " | ".join(results["label_keys"]) + " |",
              "| --- | --- | " + " | ".join("---" for _ in results["label_keys"]) + " |"]
    for name, found in per_label_rows:
        if found is None:
            continue
        for test in ("knee_test", "knee_held_out"):
            aucs = found[1][test]["auc"]
            lines.append(f"| {name} | {'in-site' if test == 'knee_test' else 'held-out'} | "
                         + " | ".join(_f(aucs.get(k)) for k in results["label_keys"]) + " |")
    lines += ["", "## Reading", "", *_reading(cells, fractions), ""]
    ext = results["extractions"]
    total = results["timings"].get("total_seconds", 0.0)
    lines += [
        "## Machine, time, command",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores visible, torch threads {info['torch_threads']}; "
        f"CUDA: {info['cuda']}; features on `{results['device']}`.",
        f"- Load average (1/5/15 min) at start {results['load_average_at_start']}, at the end "
        f"{results.get('load_average_at_end', 'n/a')} (above the core count the machine was shared).",
        f"- torch {info['torch']}, Python {info['python']}.",
        f"- Wall time {total / 60:.1f} min: loading {results['timings']['load_seconds']:.0f} s, feature "
        f"extraction {sum(e['extract_seconds'] for e in ext):.0f} s, probes {sum(e['probe_seconds'] for e in ext):.0f} s.",
        "",
        "```",
        results["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def _reading(cells: Mapping[tuple, Mapping[float, Mapping[str, Any]]], fractions: Sequence[float]) -> list[str]:
    """Facts read off the table, stated with their numbers (no judgement beyond them)."""
    out = []
    for f in fractions:
        raw = _best(cells, "fused", f, "raw")
        pre = _best({k: v for k, v in cells.items() if k[0] == "pretrained"}, "fused", f)
        rnd = _best(cells, "fused", f, "random")
        parts = [f"At {int(f * 100)} % labels (fused):"]
        if raw:
            parts.append(f"the raw-input probe reaches {_f(_auc(raw[1], 'knee_test'))} in-site and "
                         f"{_f(_auc(raw[1], 'knee_held_out'))} on the held-out site;")
        if pre:
            parts.append(f"the best pretrained point ({_point(pre[0])}) {_f(_auc(pre[1], 'knee_test'))} in-site, "
                         f"{_f(_auc(pre[1], 'knee_held_out'))} held-out;")
        if rnd:
            parts.append(f"the best random-init point ({_point(rnd[0])}) {_f(_auc(rnd[1], 'knee_test'))} in-site, "
                         f"{_f(_auc(rnd[1], 'knee_held_out'))} held-out.")
        if len(parts) == 1:
            parts.append("no point could be scored (no label has both classes in the subset and in the in-site test).")
        out.append("- " + " ".join(parts))
    steps = sorted({k[1] for k in cells if k[0] == "pretrained"})
    if len(steps) > 1:
        top = max(fractions)
        per_step = []
        for step in steps:
            best = _best({k: v for k, v in cells.items() if k[0] == "pretrained" and k[1] == step}, "fused", top)
            if best:
                per_step.append(f"step {step}: {_f(_auc(best[1], 'knee_test'))} / {_f(_auc(best[1], 'knee_held_out'))}")
        out.append(f"- Pretraining length, best fused point at {int(top * 100)} % labels (in-site / held-out): "
                   + "; ".join(per_step) + ".")
    out.append("- Test sets are small: one exam moves a label's AUC by 1/(positives x negatives); labels "
               "with no positive test exam are left out of the macro AUC (see the per-label table).")
    return out


if __name__ == "__main__":
    sys.exit(main())
