"""Label-efficiency benchmark on phantoms: diffusion-pretrained vs from-scratch vs MONAI supervised baselines.

Variants (cells), each fine-tuned with every seed of ``--seeds`` (default 0, 1, 2):

* knee, fused three-plane classifier with EHR late fusion, at 10 % and 100 % of the labelled
  pool: OrthoDiffusion from the pretrained backbones (``pretrained``); the same architecture
  from random weights, every weight at the full learning rate (``scratch``); and the
  supervised baseline, MONAI's 3D ResNet-18 per plane under the same fusion
  (``monai_resnet18``, :class:`inference.model.ResNetPlaneEncoder`);
* knee, sagittal segmenter (11 structures), the same three variants with MONAI's 3D ``UNet``
  (``monai_unet``) or ``SegResNet`` as the baseline;
* transfer: knee-pretrained backbones fine-tuned on ankle and on shoulder labels with 10 % of
  their pools, against scratch.

Knee cells are scored on an in-site test set (the training sites) and on a held-out phantom
site (``siemens_1p5t_d``) that appears neither in pretraining nor in fine-tuning; transfer
cells on a test set of their joint.  Every cell is saved as a model bundle, loaded back and
scored through the node's own prediction path (:func:`training.evaluate.evaluate_bundle`:
``ModelBundle.predict_proba`` / ``ModelBundle.segment`` on the raw series).  The report gives
AUC per label, Dice per structure, mean +- sd over seeds and 95 % bootstrap intervals over
test exams of the seed-averaged figures, and paired intervals of the differences between
variants.

Budgets are steps, not epochs.  A baseline gets the optimiser steps that take the method's
cell the same time (:data:`STEP_SECONDS`, measured per preset), so both train within the
same wall-clock budget; pretraining time is not charged to the fine-tuning budget (it is
paid once for every task), and the report lists the seconds each cell really took.

    python benchmarks/label_efficiency/run.py --scale smoke --work /tmp/le_smoke --seeds 0   # ~1 min, meaningless
    python benchmarks/label_efficiency/run.py --scale cpu     # 2 CPU cores, planned for <= 60 min
    python benchmarks/label_efficiency/run.py --scale gpu     # one H100/H200 + 16 cores, planned for <= 10 min
    OUT=DIR ONLY=le bash benchmarks/device_run.sh 590 gpu    # the gpu scale in stages on a lent device

``--input-size N`` sets the in-plane model input to N x N and generates the phantoms at
matrix N (64 vs 128 is the comparison the issue asks for; use another WORK per size).

Stages (``--stage data|pretrain|finetune|report``) share WORK, so parallel processes can run
one stage each: ``--planes`` splits pretraining by plane and ``--cells K/N`` splits the
fine-tuning cells; ``--stage report`` gathers whatever cells have finished.  ``--stage all``
with ``--jobs N`` (the cpu and gpu scales' default) runs the planes and N shares of the cells
as parallel processes itself.

Writes the report (``benchmarks/results/label_efficiency.md`` at the cpu scale,
``label_efficiency_gpu.md`` at the gpu scale, ``WORK/report.md`` otherwise) and
``WORK/results.json``.  Synthetic phantoms only: the numbers say whether the method's
machinery works, not how it performs on patients.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

log = logging.getLogger("label_efficiency")

PLANES = ("sagittal", "coronal", "axial")

#: seconds per optimiser step (classifier: batch 4, three planes, EHR; segmenter: batch 2), one
#: torch thread per process, measured on this project's 2-core CPU while it was shared (load
#: about 3 on 2 cores), so an idle machine is faster.  They set the baselines' step budgets
#: (equal wall-clock) and balance cells over parallel workers.  The segmenter rows are the
#: ``unet`` head, the benchmark's; ``monai_*`` rows do not depend on the head.
STEP_SECONDS: dict[str, dict[str, dict[str, float]]] = {
    "tiny": {
        "classify": {"diffusion_unet": 0.150, "monai_resnet18": 0.089},
        "segment": {"diffusion_unet": 0.103, "monai_unet": 0.025, "monai_segresnet": 0.066},
    },
    "small": {
        "classify": {"diffusion_unet": 1.135, "monai_resnet18": 0.634},
        "segment": {"diffusion_unet": 0.835, "monai_unet": 0.171, "monai_segresnet": 0.520},
    },
}
#: seconds per scored exam through the node's path (classifier: 3 planes; segmenter: every sliding
#: window of a ~27-slice sagittal series, 4 windows of 8 slices at the tiny preset, 2 of 16 at the
#: small one), measured as above
EVAL_SECONDS: dict[str, dict[str, dict[str, float]]] = {
    "tiny": {
        "classify": {"diffusion_unet": 0.04, "monai_resnet18": 0.02},
        "segment": {"diffusion_unet": 0.18, "monai_unet": 0.03, "monai_segresnet": 0.10},
    },
    "small": {
        "classify": {"diffusion_unet": 0.6, "monai_resnet18": 0.25},
        "segment": {"diffusion_unet": 1.6, "monai_unet": 0.2, "monai_segresnet": 1.0},
    },
}
#: seconds per pretraining step of one plane's diffusion UNet (batch 4), measured as above
#: (the small preset's is scaled from its fine-tuning step, not measured)
PRETRAIN_SECONDS = {"tiny": 0.17, "small": 1.3}
#: one core's seconds per phantom case (generation at matrix 32 / 64), and per exam to scan its
#: headers and, for test sets, to read its pixels, measured as above
PHANTOM_SECONDS = {"knee": {32: 0.95, 64: 1.75}, "ankle": {32: 0.6, 64: 0.6}, "shoulder": {32: 0.8, 64: 1.25}}
READ_SECONDS = {"records": 0.2, "pixels": 0.12}
#: seconds each cell spends outside its steps and its scoring (datasets from the disk cache,
#: validation, bundle save and load, figures and metrics per test set)
CELL_OVERHEAD_SECONDS = 8.0

BASELINES = {"classify": ("monai_resnet18",), "segment": ("monai_unet", "monai_segresnet")}
VARIANTS = ("pretrained", "scratch", "baseline")


@dataclass(frozen=True)
class Scale:
    """Sizes of one benchmark scale (steps are optimiser steps per fine-tuning cell)."""

    knee_pool: int  # labelled knee exams on the training sites (pretraining uses them unlabelled)
    knee_test: int  # in-site knee test exams
    held_out: int  # knee test exams of the held-out site
    transfer_pool: int  # labelled ankle / shoulder exams
    transfer_test: int
    matrix: int  # phantom acquisition matrix = in-plane model input
    pretrain_steps: int
    classify_steps: int  # knee classifier cells of the method (pretrained and scratch)
    transfer_steps: int  # ankle / shoulder classifier cells
    segment_steps: int  # segmenter cells of the method
    n_boot: int
    config: str = "small"
    pretrain_batch: int = 4
    pretrain_lr: float | None = None  # total pretraining lr (None: the configuration's base_lr x batch)
    classify_lr: float | None = None  # classifier head lr (None: the configuration's)
    segment_lr: float | None = None  # segmenter lr (None: the configuration's)
    val_fraction: float | None = None  # validation split of the labelled subset (None: the configuration's 0.2)
    baseline_budget: str = "time"  # "time": baselines get the steps that take the method's time; "steps": the same steps
    jobs: int = 1  # parallel fine-tuning processes under --stage all

    def method_steps(self, task: str, joint: str) -> int:
        if task == "segment":
            return self.segment_steps
        return self.classify_steps if joint == "knee" else self.transfer_steps

    def steps(self, task: str, joint: str, init: str) -> int:
        """Optimiser steps of a cell: the method's, or for a baseline the steps of equal wall-clock."""
        base = self.method_steps(task, joint)
        if not init.startswith("monai_") or self.baseline_budget == "steps":
            return base
        table = STEP_SECONDS.get(self.config, STEP_SECONDS["small"])[task]
        return max(1, int(round(base * table["diffusion_unet"] / table[init])))


SCALES: dict[str, Scale] = {
    # checks the script end to end in about a minute (tiny model, 3-exam test sets); its numbers mean nothing
    # (no validation split, so that 10 % of a 20-exam pool still trains on a batch of 2)
    "smoke": Scale(knee_pool=20, knee_test=3, held_out=3, transfer_pool=20, transfer_test=3, matrix=32,
                   pretrain_steps=4, classify_steps=3, transfer_steps=2, segment_steps=3, n_boot=20,
                   config="tiny", pretrain_batch=2, val_fraction=0.0, baseline_budget="steps"),
    # 2 CPU cores within 60 minutes (README: the plan and how it was sized): the tiny preset
    # (8 x 32 x 32 inputs) on phantoms of matrix 32, 200-exam test sets, 48 cells over 2 processes
    "cpu": Scale(knee_pool=120, knee_test=200, held_out=200, transfer_pool=100, transfer_test=200, matrix=32,
                 pretrain_steps=1000, classify_steps=400, transfer_steps=300, segment_steps=600, n_boot=1000,
                 config="tiny", pretrain_batch=4, pretrain_lr=1e-3, classify_lr=3e-3, segment_lr=4e-3, jobs=2),
    # one H100/H200 with 16 CPU cores within 10 minutes, phantom generation included (not yet
    # measured on a device: the README gives the estimate); the small preset (16 x 64 x 64)
    "gpu": Scale(knee_pool=240, knee_test=200, held_out=200, transfer_pool=100, transfer_test=200, matrix=64,
                 pretrain_steps=1500, classify_steps=600, transfer_steps=400, segment_steps=1200, n_boot=1000,
                 config="small", pretrain_batch=16, pretrain_lr=8e-4, classify_lr=1e-3, segment_lr=2e-3,
                 baseline_budget="steps", jobs=8),
}
SCALES["h200"] = SCALES["gpu"]  # the name benchmarks/device_run.sh used before the gpu scale

DEFAULT_REPORTS = {"cpu": "label_efficiency.md", "gpu": "label_efficiency_gpu.md", "h200": "label_efficiency_gpu.md"}


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
        "load_average": _load(),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    return info


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def effective_config(scale: Scale, work: Path, input_size: int | None = None) -> Path:
    """Write the method's configuration (the scale's overrides applied) to ``WORK/config.yaml``.

    ``input_size`` replaces the in-plane input size (default: the preset's, which must then
    match the phantom matrix).  The cells' own configurations (steps, baseline networks) are
    derived from this one by :func:`cell_config`.
    """
    import yaml

    from training.config import load_config

    base = load_config(scale.config)
    # The EMA must forget the random initial weights within the run: every step, with a decay
    # whose memory (1 / (1 - decay)) is at most a tenth of the run, capped at the reference 0.995.
    decay = min(0.995, 1.0 - 10.0 / scale.pretrain_steps) if scale.pretrain_steps > 20 else 0.5
    pretrain: dict[str, Any] = {
        # five checkpoints, all kept: the probe (probe.py) reads the pretraining-length axis from them
        "steps": scale.pretrain_steps, "batch_size": scale.pretrain_batch,
        "checkpoint_every": max(1, scale.pretrain_steps // 5), "keep_checkpoints": 5,
        "ema_every": 1, "ema_decay": decay,
    }
    if scale.pretrain_lr is not None:
        pretrain.update(base_lr=scale.pretrain_lr / scale.pretrain_batch, lr_scaling="batch_and_gpus")
    classify: dict[str, Any] = {"steps": scale.classify_steps}
    if scale.classify_lr is not None:
        classify["head_lr"] = scale.classify_lr
    segment: dict[str, Any] = {"steps": scale.segment_steps, "windows": "all"}
    if scale.segment_lr is not None:
        segment["lr"] = scale.segment_lr
    if scale.val_fraction is not None:
        classify["val_fraction"] = segment["val_fraction"] = scale.val_fraction
    # the UNet-decoder head: the small preset's default, chosen by measurement (inference.model.PRESETS)
    model: dict[str, Any] = {"seg_head": "unet"}
    if input_size is not None:
        depth = base.model_cfg().input_shape[0]
        model["input_shape"] = [depth, input_size, input_size]
    cfg = base.with_overrides(
        model=model, pretrain=pretrain, classify=classify, segment=segment,
        # preprocessed volumes are cached once and shared by every cell and process
        data={"cache": "disk", "cache_dir": str(work / "cache")},
    )
    data = cfg.to_dict()
    data["name"] = f"label-efficiency-{scale.config}"
    path = work / "config.yaml"
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
    return path


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    cls = metrics.get("classification") or {}
    seg = metrics.get("segmentation") or {}
    return {
        "macro_auc": cls.get("macro_auc"), "map": cls.get("map"), "mean_dice": seg.get("mean_dice"),
        "n_cls": cls.get("n"), "n_seg": seg.get("n_exams"),
        "auc": {k: v.get("auc") for k, v in (cls.get("labels") or {}).items()},
        "dice": {k: v.get("mean") for k, v in (seg.get("per_structure") or {}).items()},
    }


PHANTOM_SETS = ("knee_pool", "knee_test", "knee_held_out", "ankle_pool", "ankle_test", "shoulder_pool", "shoulder_test")
TEST_SETS = ("knee_test", "knee_held_out", "ankle_test", "shoulder_test")


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run and the test sets it is scored on.

    ``init`` is ``pretrained``, ``scratch`` or the name of a MONAI baseline network
    (``monai_resnet18`` for classifiers, ``monai_unet`` / ``monai_segresnet`` for segmenters).
    """

    task: str
    joint: str
    init: str
    fraction: float
    seed: int
    tag: str = ""  # e.g. "_steps800" when the steps differ from the scale's

    @property
    def name(self) -> str:
        return f"{self.joint}_{self.task}_{self.init}_{int(round(self.fraction * 100))}pct_seed{self.seed}{self.tag}"

    @property
    def variant(self) -> str:
        """The cell's name without its seed: the row of the report it belongs to."""
        return f"{self.joint}_{self.task}_{self.init}_{int(round(self.fraction * 100))}pct{self.tag}"

    @property
    def baseline(self) -> bool:
        return self.init.startswith("monai_")

    @property
    def tests(self) -> list[str]:
        return ["knee_test", "knee_held_out"] if self.joint == "knee" else [f"{self.joint}_test"]

    def cost(self, scale: Scale) -> float:
        """Estimated seconds on one core (training + scoring), to spread cells over parallel
        workers and to plan a scale (:func:`estimate`)."""
        preset = scale.config if scale.config in STEP_SECONDS else "small"
        arch = self.init if self.baseline else "diffusion_unet"
        train = scale.steps(self.task, self.joint, self.init) * STEP_SECONDS[preset][self.task][arch]
        exams = {"knee_test": scale.knee_test, "knee_held_out": scale.held_out}
        n = sum(exams.get(t, scale.transfer_test) for t in self.tests)
        return train + n * EVAL_SECONDS[preset][self.task][arch] + CELL_OVERHEAD_SECONDS


def all_cells(
    seeds: list[int],
    tags: dict[str, str] | None = None,
    classifier_baseline: str = "monai_resnet18",
    segmenter_baseline: str = "monai_unet",
) -> list[Cell]:
    """Every cell of the benchmark; ``tags`` (task -> name suffix) marks cells trained with other steps."""
    tags = tags or {}
    baseline = {"classify": classifier_baseline, "segment": segmenter_baseline}
    cells = []
    for seed in seeds:
        for task in ("classify", "segment"):
            for fraction in (0.1, 1.0):
                for init in ("pretrained", "scratch", baseline[task]):
                    cells.append(Cell(task, "knee", init, fraction, seed, tags.get(task, "")))
        for joint in ("ankle", "shoulder"):
            for init in ("pretrained", "scratch"):
                cells.append(Cell("classify", joint, init, 0.1, seed, tags.get("transfer", "")))
    return cells


def estimate(scale: Scale, cells: list[Cell], cores: int, jobs: int) -> dict[str, float]:
    """Planned wall-clock minutes per stage on ``cores`` CPU cores from the measured constants above.

    Phantoms and header scans use every core; the three planes pretrain in parallel processes;
    the cells run in ``jobs`` processes (one core each at most).  A CPU estimate: it does not
    apply to a GPU run.
    """
    preset = scale.config if scale.config in STEP_SECONDS else "small"
    matrix = 32 if scale.matrix <= 32 else 64
    sizes = {"knee": (scale.knee_pool + scale.knee_test + scale.held_out, scale.knee_test + scale.held_out)}
    for joint in ("ankle", "shoulder"):
        if any(c.joint == joint for c in cells):
            sizes[joint] = (scale.transfer_pool + scale.transfer_test, scale.transfer_test)
    data = sum(n * (PHANTOM_SECONDS[j][matrix] + READ_SECONDS["records"]) + t * READ_SECONDS["pixels"]
               for j, (n, t) in sizes.items()) / max(1, cores)
    pretrain = 3 * scale.pretrain_steps * PRETRAIN_SECONDS[preset] * (scale.pretrain_batch / 4) / min(3, max(1, cores))
    workers = max(1, min(jobs, cores))
    loads = [sum(c.cost(scale) for c in share_of_cells(cells, scale, k, workers)) for k in range(workers)]
    finetune = max(loads) if loads else 0.0
    report = 60.0
    minutes = {"phantoms": data / 60, "pretraining": pretrain / 60, "fine-tuning and evaluation": finetune / 60,
               "report": report / 60}
    minutes["total"] = sum(minutes.values())
    return minutes


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def share_of_cells(cells: list[Cell], scale: Scale, part: int, parts: int) -> list[Cell]:
    """Worker ``part`` of ``parts``: longest cells first, each to the least loaded worker."""
    loads = [0.0] * parts
    mine: list[Cell] = []
    for cell in sorted(cells, key=lambda c: (-c.cost(scale), c.name)):
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
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _stage_time(work: Path, stage: str, seconds: float) -> None:
    path = work / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[stage] = max(seconds, timings.get(stage, 0.0))
    _write_json(path, timings)


# --------------------------------------------------------------------------- test sets held in memory


class HeldSource:
    """A plane of a test exam whose pixels (and mask) were read once, by the data stage.

    ``load()`` and ``load_mask()`` return exactly the arrays the wrapped
    :class:`training.datasets.VolumeSource` gives (pixels are stored as uint16 when they are
    integers in range, and returned as float32), so the node's prediction path sees the same
    input; every other attribute is the wrapped source's.  This saves reading 200-exam DICOM
    test sets again in every cell.
    """

    def __init__(self, source: Any, volume: np.ndarray, mask: np.ndarray | None) -> None:
        self._source = source
        self._volume = volume
        self._mask = mask

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._source, name)

    def load(self) -> np.ndarray:
        return self._volume.astype(np.float32)

    def load_mask(self) -> np.ndarray | None:
        return None if self._mask is None else self._mask.astype(np.int64)


def _compact(volume: np.ndarray) -> np.ndarray:
    """The same values in fewer bytes: uint16 when every value is an integer in range."""
    if volume.size and volume.min() >= 0 and volume.max() <= 65535 and np.array_equal(volume, np.round(volume)):
        return volume.astype(np.uint16)
    return volume


def _read_set(folder: str, with_arrays: bool) -> tuple[list[Any], dict[str, Any] | None]:
    """The records of a phantom folder and, for a test set, every plane's pixels and mask."""
    from training.cli import read_records

    records = read_records([f"phantom:{folder}"])
    if not with_arrays:
        return records, None
    arrays: dict[str, Any] = {}
    for record in records:
        planes = {}
        for plane, source in record.planes.items():
            mask = source.load_mask() if source.mask_path is not None else None
            planes[plane] = (_compact(source.load()), None if mask is None else mask.astype(np.int8))
        arrays[record.exam_id] = planes
    return records, arrays


def hold_records(records: list[Any], arrays: dict[str, Any]) -> list[Any]:
    """``records`` whose planes load from ``arrays`` (see :class:`HeldSource`)."""
    out = []
    for record in records:
        held = arrays.get(record.exam_id)
        if held is None:
            out.append(record)
            continue
        planes = {p: HeldSource(s, *held[p]) if p in held else s for p, s in record.planes.items()}
        out.append(replace(record, planes=planes))
    return out


# --------------------------------------------------------------------------- bootstrap


def auc_resampled(y: np.ndarray, p: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AUC-ROC of each resample ``idx[b]`` of (truth ``y``, score ``p``); NaN where a resample
    lacks a class.  Rank formula (Mann-Whitney U) with average ranks for ties, as scikit-learn's
    ``roc_auc_score``; unknown truths (NaN) are left out."""
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    idx = np.atleast_2d(idx)
    ys, ps = y[idx], p[idx]
    known = ~np.isnan(ys)
    ps = np.where(known, ps, np.inf)  # unknown exams rank above every known one and do not count
    ranks = rankdata(ps, axis=1)
    positive = known & (ys == 1)
    n_pos = positive.sum(axis=1).astype(np.float64)
    n_neg = known.sum(axis=1) - n_pos
    u = np.where(positive, ranks, 0.0).sum(axis=1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[~np.isnan(values)]
    if values.size < 2:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None and not math.isnan(v)]
    if not known:
        return None, None
    return float(np.mean(known)), (float(np.std(known, ddof=1)) if len(known) > 1 else None)


def _read_predictions(path: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(patient ids, label keys, truth (N, K), probabilities (N, K)) of a predictions.csv,
    averaged per patient as evaluate_bundle scores them."""
    import csv

    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return [], [], np.zeros((0, 0)), np.zeros((0, 0))
    keys = [c[2:] for c in rows[0] if c.startswith("p_")]
    patients = [r["patient_id"] for r in rows]
    prob = np.array([[float(r[f"p_{k}"]) for k in keys] for r in rows])
    truth = np.array([[float(r[f"y_{k}"]) if r[f"y_{k}"] != "" else np.nan for k in keys] for r in rows])
    names = sorted(set(patients))
    index = np.array([names.index(p) for p in patients])
    counts = np.bincount(index, minlength=len(names))[:, None]
    prob_g = np.zeros((len(names), len(keys)))
    np.add.at(prob_g, index, prob)
    truth_g = np.full((len(names), len(keys)), np.nan)
    for i in range(len(names)):
        truth_g[i] = truth[index == i][0]
    return names, keys, truth_g, prob_g / counts


def _read_dice(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(exam ids, structure keys, Dice (N, S) with NaN where a structure is absent from both maps)."""
    seg = json.loads(path.read_text()).get("segmentation") or {}
    per_exam = seg.get("per_exam") or []
    keys = list((seg.get("per_structure") or {}).keys())
    ids = [e["exam_id"] for e in per_exam]
    dice = np.array([[np.nan if e["dice"].get(k) is None else float(e["dice"][k]) for k in keys] for e in per_exam])
    return ids, keys, dice.reshape(len(ids), len(keys))


def summarise(rows: list[dict[str, Any]], work: Path, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Per variant and test set: the figure of each seed, mean +- sd over seeds, and 95 % bootstrap
    intervals of the seed-averaged figure; per label AUC and per structure Dice; paired
    differences between variants.

    The bootstrap resamples test exams (patients) with replacement, the same resamples for
    every seed and variant of a test set, so an interval of a difference is paired.  Macro AUC
    of a resample is the mean over the labels that have both classes in the whole test set
    (a label missing a class in a resample is left out of that resample's mean).
    """
    by_variant: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for row in rows:
        for test in row.get("tests", []):
            by_variant.setdefault((row["variant"], test), {})[row["seed"]] = row
    rng_seed = {t: seed + 1000 * i for i, t in enumerate(TEST_SETS)}
    data: dict[tuple[str, str], dict[str, Any]] = {}
    for (variant, test), per_seed in sorted(by_variant.items()):
        first = next(iter(per_seed.values()))
        entry: dict[str, Any] = {"variant": variant, "test": test, "task": first["task"], "joint": first["joint"],
                                 "init": first["init"], "label_fraction": first["label_fraction"],
                                 "seeds": sorted(per_seed), "tag": first.get("tag", "")}
        runs = {}
        for s, row in sorted(per_seed.items()):
            folder = work / "runs" / row["name"] / f"eval_{test}"
            if row["task"] == "classify" and (folder / "predictions.csv").is_file():
                runs[s] = _read_predictions(folder / "predictions.csv")
            elif row["task"] == "segment" and (folder / "metrics.json").is_file():
                runs[s] = _read_dice(folder / "metrics.json")
        entry["runs"] = runs
        data[(variant, test)] = entry

    # one set of resamples per test set, over the exams every run of it scored
    resamples: dict[tuple[str, str], tuple[list[str], np.ndarray]] = {}
    for task in ("classify", "segment"):
        for test in TEST_SETS:
            id_sets = [set(run[0]) for e in data.values() if e["test"] == test and e["task"] == task
                       for run in e["runs"].values()]
            if not id_sets:
                continue
            ids = sorted(set.intersection(*id_sets))
            rng = np.random.default_rng(rng_seed[test] + (0 if task == "classify" else 7))
            idx = rng.integers(0, len(ids), (n_boot, len(ids))) if n_boot > 0 and ids else np.zeros((0, len(ids)), int)
            resamples[(task, test)] = (ids, idx)

    out: dict[str, Any] = {"n_boot": n_boot, "variants": [], "comparisons": []}
    boots: dict[tuple[str, str], np.ndarray] = {}
    for key, entry in data.items():
        task, test = entry["task"], entry["test"]
        if (task, test) not in resamples or not entry["runs"]:
            continue
        ids, idx = resamples[(task, test)]
        full = np.arange(len(ids))[None]
        point, per_item, boot = {}, {}, []
        for s, run in entry["runs"].items():
            order = [run[0].index(i) for i in ids]
            if task == "classify":
                _, keys, truth, prob = run
                truth, prob = truth[order], prob[order]
                scored = [j for j in range(len(keys)) if len(np.unique(truth[~np.isnan(truth[:, j]), j])) == 2]
                aucs = {keys[j]: float(auc_resampled(truth[:, j], prob[:, j], full)[0]) for j in scored}
                point[s] = float(np.mean(list(aucs.values()))) if aucs else None
                per_item[s] = aucs
                if idx.size and scored:
                    boot.append(_nanmean(np.stack([auc_resampled(truth[:, j], prob[:, j], idx) for j in scored]), axis=0))
                entry["positives"] = {keys[j]: int(np.nansum(truth[:, j])) for j in range(len(keys))}
                entry["n"] = len(ids)
            else:
                _, keys, dice = run
                dice = dice[order]
                means = _nanmean(dice, axis=0)
                point[s] = float(_nanmean(means, axis=0)) if np.isfinite(means).any() else None
                per_item[s] = {k: (None if np.isnan(m) else float(m)) for k, m in zip(keys, means)}
                if idx.size:
                    boot.append(_nanmean(_nanmean(dice[idx], axis=1), axis=1))
                entry["n"] = len(ids)
        mean, sd = _mean_sd(list(point.values()))
        seed_mean = np.mean(np.stack(boot), axis=0) if len(boot) == len(entry["runs"]) and boot else None
        if seed_mean is not None:
            boots[key] = seed_mean
        items = sorted({k for d in per_item.values() for k in d})
        result = {k: v for k, v in entry.items() if k != "runs"}
        result.update({
            "metric": "macro_auc" if task == "classify" else "mean_dice",
            "per_seed": {str(s): v for s, v in point.items()}, "mean": mean, "sd": sd,
            "ci": None if seed_mean is None else _interval(seed_mean),
            "per_item": {k: dict(zip(("mean", "sd"), _mean_sd([per_item[s].get(k) for s in per_item]))) for k in items},
        })
        out["variants"].append(result)

    # paired differences: pretrained against scratch and against the baseline
    for v in out["variants"]:
        if v["init"] != "pretrained":
            continue
        for other in [x for x in out["variants"] if x["test"] == v["test"] and x["task"] == v["task"]
                      and x["joint"] == v["joint"] and x["label_fraction"] == v["label_fraction"]
                      and x["tag"] == v["tag"] and x["init"] != "pretrained"]:
            a, b = (v["variant"], v["test"]), (other["variant"], other["test"])
            diff = None if v["mean"] is None or other["mean"] is None else v["mean"] - other["mean"]
            ci = _interval(boots[a] - boots[b]) if a in boots and b in boots else None
            out["comparisons"].append({"test": v["test"], "task": v["task"], "joint": v["joint"],
                                       "label_fraction": v["label_fraction"], "a": v["init"], "b": other["init"],
                                       "tag": v["tag"], "difference": diff, "ci": ci})
    return out


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmean`` without the warning for all-NaN slices (they stay NaN)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(values, axis=axis)


# --------------------------------------------------------------------------- main


def _forward_options(args: argparse.Namespace, work: Path) -> list[str]:
    """The options a stage process needs to see the same benchmark as this one."""
    out = ["--scale", args.scale, "--work", str(work), "--seeds", args.seeds, "--data-seed", str(args.data_seed),
           "--workers", str(args.workers), "--tasks", args.tasks, "--joints", args.joints, "--fractions", args.fractions,
           "--variants", args.variants, "--classifier-baseline", args.classifier_baseline,
           "--segmenter-baseline", args.segmenter_baseline]
    for flag in ("input_size", "classify_steps", "transfer_steps", "segment_steps", "feature_point"):
        value = getattr(args, flag)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    return out


def _spawn(args: argparse.Namespace, work: Path, stage_args: list[str], log_path: Path, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), *_forward_options(args, work), *stage_args,
           "--no-progress", "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("starting %s (log %s)", " ".join(stage_args), log_path)
    with log_path.open("a") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))


def _wait(procs: list[tuple[str, subprocess.Popen]]) -> None:
    for what, proc in procs:
        rc = proc.wait()
        if rc != 0:
            log.error("%s exited with %d (its log is in WORK/logs); the report lists what is missing", what, rc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default runs/label_efficiency/SCALE)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds (default 0,1,2)")
    parser.add_argument("--data-seed", type=int, default=0, help="phantom generation seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating phantoms")
    parser.add_argument("--jobs", type=int, default=None,
                        help="--stage all: parallel fine-tuning processes (default: the scale's); 1 = in this process")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    parser.add_argument("--report", type=Path, default=None,
                        help="report path (default: benchmarks/results/label_efficiency.md at the cpu scale, "
                             "label_efficiency_gpu.md at the gpu scale, WORK/report.md otherwise)")
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
    parser.add_argument("--input-size", type=int, default=None, metavar="N",
                        help="in-plane model input N x N and phantoms at matrix N (default: the scale's matrix)")
    parser.add_argument("--classify-steps", type=int, default=None,
                        help="knee classifier steps instead of the scale's (cells named _steps<N>)")
    parser.add_argument("--transfer-steps", type=int, default=None,
                        help="ankle/shoulder classifier steps instead of the scale's (cells named _steps<N>)")
    parser.add_argument("--segment-steps", type=int, default=None,
                        help="segmenter steps instead of the scale's (cells named _steps<N>)")
    parser.add_argument("--feature-point", default=None, metavar="T,BLOCK",
                        help="classifiers take every plane's features at this (t, block) instead of the "
                             "configuration's, e.g. 25,down_2 (cells named _t<T><block>)")
    parser.add_argument("--tasks", default="classify,segment", help="finetune/report: only these tasks")
    parser.add_argument("--joints", default="knee,ankle,shoulder", help="finetune/report: only these joints")
    parser.add_argument("--fractions", default="0.1,1.0", help="finetune/report: only these label fractions")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="finetune/report: only these of pretrained, scratch, baseline")
    parser.add_argument("--classifier-baseline", choices=BASELINES["classify"], default="monai_resnet18")
    parser.add_argument("--segmenter-baseline", choices=BASELINES["segment"], default="monai_unet")
    parser.add_argument("--plan", action="store_true",
                        help="print the cells, their steps and the planned minutes per stage on this CPU, and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    from training.config import load_config
    from training.demo import HELD_OUT_SITE, make_phantom_set, training_sites
    from training.evaluate import evaluate_bundle
    from training.finetune import finetune_classifier, finetune_segmenter, make_bundle

    scale = SCALES[args.scale]
    if args.input_size is not None:
        if args.input_size < 8:
            parser.error(f"--input-size must be >= 8, got {args.input_size}")
        scale = replace(scale, matrix=args.input_size)
    for flag, field_name in (("classify_steps", "classify_steps"), ("transfer_steps", "transfer_steps"),
                             ("segment_steps", "segment_steps")):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                parser.error(f"--{flag.replace('_', '-')} must be >= 1")
            scale = replace(scale, **{field_name: value})
    seeds = [int(s) for s in _csv(args.seeds)]
    if not seeds:
        parser.error("--seeds names no seed")
    variants = set(_csv(args.variants))
    if variants - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(variants - set(VARIANTS))}; choose from {', '.join(VARIANTS)}")
    n_jobs = args.jobs if args.jobs is not None else scale.jobs
    if args.plan:
        cells = [c for c in all_cells(seeds, None, args.classifier_baseline, args.segmenter_baseline)
                 if c.task in set(_csv(args.tasks)) and c.joint in set(_csv(args.joints))
                 and c.fraction in {float(f) for f in _csv(args.fractions)}
                 and ("baseline" if c.baseline else c.init) in variants]
        print(f"scale {args.scale}: {len(cells)} cells, seeds {seeds}, {n_jobs} fine-tuning process(es)")
        for variant in sorted({(c.task, c.joint, c.init, c.fraction) for c in cells}):
            task, joint, init, fraction = variant
            one = next(c for c in cells if (c.task, c.joint, c.init, c.fraction) == variant)
            print(f"  {one.variant}: {scale.steps(task, joint, init)} steps, ~{one.cost(scale):.0f} core-s per seed")
        minutes = estimate(scale, cells, os.cpu_count() or 1, n_jobs)
        print("planned minutes on this CPU: " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items())
              + ("" if scale.config == "tiny" else "  (CPU constants: on a GPU, see the README's gpu plan)"))
        return 0
    work = (args.work or Path("runs") / "label_efficiency" / args.scale).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report_path = args.report
    if report_path is None:
        report_path = (REPO / "benchmarks" / "results" / DEFAULT_REPORTS[args.scale]
                       if args.scale in DEFAULT_REPORTS else work / "report.md")
    progress = not args.no_progress
    stages = ["data", "pretrain", "finetune", "report"] if args.stage == "all" else [args.stage]
    with (work / "commands.log").open("a") as fh:  # every invocation, for the report
        fh.write(shlex.join(["python", "benchmarks/label_efficiency/run.py", *(argv if argv is not None else sys.argv[1:])])
                 + "\n")
    load_path = work / "load_at_start.txt"
    if "data" in stages or not load_path.is_file():
        load_path.write_text(_load())
    config_path = work / "config.yaml"
    if "data" in stages or not config_path.is_file():
        config_path = effective_config(scale, work, args.input_size)
    cfg = load_config(config_path)
    input_shape = cfg.model_cfg().input_shape
    if input_shape[1:] != (scale.matrix, scale.matrix):
        log.warning("model input %s differs in-plane from the phantom matrix %d (pass --input-size to match them)",
                    input_shape, scale.matrix)
    tags: dict[str, str] = {}
    for task, flag in (("classify", "classify_steps"), ("transfer", "transfer_steps"), ("segment", "segment_steps")):
        if getattr(args, flag) is not None and getattr(args, flag) != getattr(SCALES[args.scale], flag):
            tags[task] = f"_steps{getattr(args, flag)}"
    feature_override: dict[str, Any] | None = None
    if args.feature_point is not None:
        try:
            t_text, block = args.feature_point.split(",")
            point = {"timestep": int(t_text), "block": block.strip()}
        except ValueError:
            parser.error(f"--feature-point must be T,BLOCK (e.g. 25,down_2), got {args.feature_point!r}")
        feature_override = {"feature_points": {plane: point for plane in PLANES}}
        cfg.with_overrides(model=feature_override).model_cfg()  # a block the architecture lacks fails now
        for task in ("classify", "transfer"):
            tags[task] = tags.get(task, "") + f"_t{point['timestep']}{point['block']}"
    wanted_fractions = {float(f) for f in _csv(args.fractions)}
    cells_run = [
        c for c in all_cells(seeds, tags, args.classifier_baseline, args.segmenter_baseline)
        if c.task in set(_csv(args.tasks)) and c.joint in set(_csv(args.joints)) and c.fraction in wanted_fractions
        and ("baseline" if c.baseline else c.init) in variants
    ]
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
    layout_record = {"matrix": scale.matrix, "data_seed": ds,
                     "sets": {name: [j, first, count] for name, (j, first, count, _) in layout.items()}}
    layout_path = work / "layout.json"
    if layout_path.is_file() and json.loads(layout_path.read_text()) != layout_record:
        parser.error(f"{work} holds phantoms of another layout ({layout_path}: {layout_path.read_text().strip()}); "
                     "choose another --work")

    def set_commands() -> list[str]:
        return [
            f"# {name}: {joint} cases {first}..{first + count - 1} (ids {joint}_{first + 1:04d}..), sites "
            f"{','.join(set_sites)} round-robin, seed {ds}, matrix {scale.matrix}  (training.demo.make_phantom_set)"
            for name, (joint, first, count, set_sites) in layout.items() if sets[name].is_dir()
        ]

    joints = set(_csv(args.joints)) | {"knee"}  # the knee pool is the pretraining set
    needed = [name for name in PHANTOM_SETS if name.split("_")[0] in joints]
    wall_start = time.monotonic()
    if "data" in stages:
        t = time.monotonic()
        for name in needed:
            joint, first, count, set_sites = layout[name]
            make_phantom_set(sets[name], joint, range(first, first + count), set_sites, ds, scale.matrix, args.workers)
        _write_json(layout_path, layout_record)
        # header scans (and, for test sets, the pixels) once, in parallel; later processes unpickle them
        from concurrent.futures import ProcessPoolExecutor

        jobs = [(str(sets[name]), name in TEST_SETS) for name in needed]
        workers = max(1, min(args.workers, len(jobs)))
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(_read_set, *zip(*jobs)))
        else:
            results = [_read_set(*job) for job in jobs]
        for name, (records_, arrays_) in zip(needed, results):
            for what, payload in (("records", records_), ("arrays", arrays_)):
                if payload is None:
                    continue
                path = work / what / f"{name}.pkl"
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
                tmp.replace(path)
        _stage_time(work, "phantoms", time.monotonic() - t)

    records: dict[str, list[Any]] = {}

    def recs(name: str) -> list[Any]:
        """The set's exam records (test sets with their pixels held in memory, see HeldSource)."""
        if name not in records:
            cached = work / "records" / f"{name}.pkl"
            if cached.is_file():
                loaded = pickle.loads(cached.read_bytes())
            else:
                from training.cli import read_records

                loaded = read_records([f"phantom:{sets[name]}"])
            arrays = work / "arrays" / f"{name}.pkl"
            if arrays.is_file():
                loaded = hold_records(loaded, pickle.loads(arrays.read_bytes()))
            records[name] = loaded
        return records[name]

    parallel = args.stage == "all" and n_jobs > 1
    cores = os.cpu_count() or 1

    if "pretrain" in stages and parallel:
        t = time.monotonic()
        planes = _csv(args.planes)
        procs = [(f"pretrain {p}", _spawn(args, work, ["--stage", "pretrain", "--planes", p],
                                          work / "logs" / f"pretrain_{p}.log", max(1, cores // len(planes))))
                 for p in planes]
        _wait(procs)
        _stage_time(work, "pretraining", time.monotonic() - t)
    elif "pretrain" in stages:
        from training.data import pretrain_dataset
        from training.pretrain import cache_kwargs, latest_checkpoint, load_checkpoint, preprocess_config, pretrain, read_log

        t = time.monotonic()
        ctx = _device()
        for plane in _csv(args.planes):
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

    def cell_config(cell: Cell) -> tuple[Any, Path]:
        """The cell's configuration (its steps; the baseline network) and the file it is written to."""
        import yaml

        model: dict[str, Any] = {}
        if feature_override is not None and cell.task == "classify" and not cell.baseline:
            model.update(feature_override)
        if cell.baseline:
            model["classifier_backbone" if cell.task == "classify" else "segmenter_backbone"] = cell.init
        steps = scale.steps(cell.task, cell.joint, cell.init)
        section = {"steps": steps}
        c = cfg.with_overrides(model=model, **{cell.task: section}) if model else cfg.with_overrides(**{cell.task: section})
        kind = "transfer" if cell.joint != "knee" else "knee"
        name = f"{cell.task}_{kind}_{cell.init if cell.baseline else 'method'}_steps{steps}{cell.tag}.yaml"
        path = work / "configs" / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
            tmp.write_text(yaml.safe_dump(c.to_dict(), sort_keys=False))
            tmp.replace(path)
        return c, path

    def run_cell(cell: Cell) -> None:
        from inference.checkpoint import ModelBundle

        out = work / "runs" / cell.name
        c, c_path = cell_config(cell)
        pool = recs(f"{cell.joint}_pool")
        pretrained = pre_root if cell.init == "pretrained" else None
        t0 = time.monotonic()
        torch.manual_seed(cell.seed)
        ctx = _device()
        common = dict(pretrained=pretrained, from_scratch=cell.init != "pretrained", label_fraction=cell.fraction,
                      seed=cell.seed, progress=progress, run_dir=out, device=ctx.device)
        if cell.task == "classify":
            result = finetune_classifier(c, pool, list(PLANES), use_ehr=True, **common)
            bundle = make_bundle(c, classifier=result, name=cell.name)
            flags = "--task classify --planes sagittal,coronal,axial --ehr"
        else:
            result = finetune_segmenter(c, pool, plane="sagittal", **common)
            bundle = make_bundle(c, segmenter=result, name=cell.name)
            flags = "--task segment --planes sagittal"
        bundle.save(out / "model.pt")
        train_seconds = time.monotonic() - t0
        # score what was saved, rebuilt from its card alone, as the node would load it
        bundle = ModelBundle.load(out / "model.pt", map_location=ctx.device)
        init_flag = f"--pretrained {pre_root}" if cell.init == "pretrained" else "--from-scratch"
        commands = [f"orthonode train finetune {flags} --data phantom:{sets[f'{cell.joint}_pool']} {init_flag} "
                    f"--label-fraction {cell.fraction} --seed {cell.seed} --config {c_path} --out {out}"]
        row: dict[str, Any] = {
            "name": cell.name, "variant": cell.variant, "task": cell.task, "joint": cell.joint, "init": cell.init,
            "label_fraction": cell.fraction, "seed": cell.seed, "tag": cell.tag,
            "steps": c.classify.steps if cell.task == "classify" else c.segment.steps,
            "network": (bundle.card.model["classifier_backbone"] if cell.task == "classify"
                        else bundle.card.model["segmenter_backbone"]),
            "parameters": int(sum(p.numel() for p in result.model.parameters())),
            "train_exams": len(result.train_ids), "val_exams": len(result.val_ids),
            "train_seconds": round(train_seconds, 1), "tests": cell.tests, "device": str(ctx.device),
            "threads": torch.get_num_threads(),
        }
        t1 = time.monotonic()
        for test in cell.tests:
            eval_dir = out / f"eval_{test}"
            # n_boot=0: the report bootstraps over exams itself, over all seeds at once
            metrics = evaluate_bundle(bundle, recs(test), eval_dir, n_boot=0, seed=cell.seed)
            row[test] = _headline(metrics)
            commands.append(f"orthonode train evaluate --model {out / 'model.pt'} --data phantom:{sets[test]} "
                            f"--out {eval_dir} --n-boot {scale.n_boot}")
        row["eval_seconds"] = round(time.monotonic() - t1, 1)
        row["commands"] = commands
        _write_json(out / "row.json", row)
        log.info("cell %s: %s", cell.name, json.dumps({k: v for k, v in row.items() if k != "commands"}, default=str))

    if "finetune" in stages and parallel:
        t = time.monotonic()
        procs = []
        for k in range(n_jobs):
            stage_args = ["--stage", "finetune", "--cells", f"{k}/{n_jobs}"]
            if args.time_budget is not None:
                stage_args += ["--time-budget", str(args.time_budget)]
            procs.append((f"finetune {k}/{n_jobs}", _spawn(args, work, stage_args, work / "logs" / f"finetune_{k}.log",
                                                            max(1, cores // n_jobs))))
        _wait(procs)
        _stage_time(work, "fine-tuning and evaluation", time.monotonic() - t)
    elif "finetune" in stages:
        t = time.monotonic()
        part, parts = args.cells
        for cell in share_of_cells(cells_run, scale, part, parts):
            if (work / "runs" / cell.name / "row.json").is_file():
                log.info("cell %s already done", cell.name)
                continue
            if args.time_budget is not None and time.monotonic() - t > args.time_budget:
                log.warning("time budget of %.0f s spent: cell %s not run", args.time_budget, cell.name)
                continue
            try:
                run_cell(cell)
            except Exception:  # one failed cell must not lose the others; the report lists it as missing
                log.exception("cell %s failed", cell.name)
        _stage_time(work, "fine-tuning and evaluation", time.monotonic() - t)

    if "report" in stages:
        t = time.monotonic()
        commands_log = work / "commands.log"
        commands = list(dict.fromkeys(commands_log.read_text().splitlines())) if commands_log.is_file() else []
        commands += set_commands()
        pretrain_info: dict[str, Any] = {}
        cut_short: dict[str, int] = {}
        for plane in PLANES:
            summary = pre_root / plane / "summary.json"
            if summary.is_file():
                data = json.loads(summary.read_text())
                pretrain_info[plane] = {"final_loss": data["final_loss"], "steps": data.get("steps_done"),
                                        "seconds": data.get("seconds")}
                if data.get("steps_done") is not None and data["steps_done"] < data.get("target_steps", 0):
                    cut_short[plane] = data["steps_done"]
                commands.append(data["command"])
        rows, missing = [], []
        for cell in cells_run:
            path = work / "runs" / cell.name / "row.json"
            if not path.is_file():
                missing.append(cell.name)
                continue
            row = json.loads(path.read_text())
            commands += row.pop("commands", [])
            rows.append(row)
        summary = summarise(rows, work, scale.n_boot, seed=ds)
        if parallel or args.stage == "all":
            _stage_time(work, "total (this invocation)", time.monotonic() - wall_start)
        timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").is_file() else {}
        info = machine()
        info["load_average_at_start"] = load_path.read_text() if load_path.is_file() else "n/a"
        results = {"scale": args.scale, "scale_parameters": scale.__dict__, "seeds": seeds, "data_seed": ds,
                   "input_shape": list(input_shape), "held_out_site": HELD_OUT_SITE, "training_sites": sites,
                   "pretrain": pretrain_info, "rows": rows, "summary": summary, "missing_cells": missing,
                   "pretrain_cut_short": cut_short, "timings": timings, "machine": info, "commands": commands,
                   "config": cfg.to_dict(), "baselines": {"classify": args.classifier_baseline,
                                                          "segment": args.segmenter_baseline},
                   "jobs": n_jobs}
        _write_json(work / "results.json", results)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(render_report(results))
        log.info("report stage %.1f s", time.monotonic() - t)
        print(f"report written to {report_path}")
    return 0


# --------------------------------------------------------------------------- report


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _msd(entry: dict[str, Any] | None) -> str:
    """``mean +- sd [low, high]`` of a summary entry."""
    if entry is None or entry.get("mean") is None:
        return "n/a"
    text = _f(entry["mean"])
    if entry.get("sd") is not None:
        text += f" ± {_f(entry['sd'])}"
    if entry.get("ci"):
        text += f" [{_f(entry['ci'][0])}, {_f(entry['ci'][1])}]"
    return text


_INIT_NAMES = {
    "pretrained": "OrthoDiffusion, pretrained",
    "scratch": "same architecture, scratch",
    "monai_resnet18": "MONAI ResNet-18 (supervised)",
    "monai_unet": "MONAI UNet (supervised)",
    "monai_segresnet": "MONAI SegResNet (supervised)",
}
_INIT_ORDER = {"pretrained": 0, "scratch": 1}


def render_report(results: dict[str, Any]) -> str:
    """The markdown report: what was run, on what, and what came out."""
    rows = results["rows"]
    scale = results["scale_parameters"]
    info = results["machine"]
    summary = results["summary"]
    seeds = results["seeds"]
    variants = summary["variants"]
    cfg = results["config"]

    def find(task: str, joint: str, init: str, fraction: float, test: str) -> dict[str, Any] | None:
        for v in variants:
            if (v["task"], v["joint"], v["init"], v["label_fraction"], v["test"]) == (task, joint, init, fraction, test) \
                    and not v["tag"]:
                return v
        return None

    def compare(task: str, joint: str, fraction: float, test: str, a: str, b: str) -> dict[str, Any] | None:
        for c in summary["comparisons"]:
            if (c["task"], c["joint"], c["label_fraction"], c["test"], c["a"], c["b"]) == (task, joint, fraction, test, a, b) \
                    and not c["tag"]:
                return c
        return None

    def cell_stats(task: str, joint: str, init: str, fraction: float, tag: str) -> dict[str, Any]:
        mine = [r for r in rows if (r["task"], r["joint"], r["init"], r["label_fraction"], r.get("tag", "")) ==
                (task, joint, init, fraction, tag)]
        if not mine:
            return {}
        return {"steps": mine[0]["steps"], "exams": f"{mine[0]['train_exams']}/{mine[0]['val_exams']}",
                "train_s": float(np.mean([r["train_seconds"] for r in mine])),
                "eval_s": float(np.mean([r.get("eval_seconds", 0.0) for r in mine])),
                "params": mine[0].get("parameters"), "n": len(mine)}

    lines = [
        "# Label efficiency on phantoms: OrthoDiffusion vs scratch vs MONAI supervised baselines",
        "",
        f"Scale **{results['scale']}**, generated by `benchmarks/label_efficiency/run.py`. **Synthetic "
        "knee/ankle/shoulder phantoms only** (orthonode's generator): these numbers say whether the method's "
        "machinery learns what the phantoms plant; they are not clinical performance and say nothing about patients.",
        "",
        "## Setup",
        "",
        f"- Sites: training {', '.join(results['training_sites'])}; held-out **{results['held_out_site']}** (never "
        "seen in pretraining or fine-tuning).",
        f"- Phantom sets (matrix {scale['matrix']}, seed {results['data_seed']}): knee pool {scale['knee_pool']} "
        f"(labelled pool and unlabelled pretraining set), knee in-site test {scale['knee_test']}, held-out site test "
        f"{scale['held_out']}, ankle and shoulder pools {scale['transfer_pool']} with tests of {scale['transfer_test']}.",
        f"- Model input {' x '.join(map(str, results['input_shape']))} (configuration `{cfg['name']}`, preset "
        f"`{cfg['model'].get('preset')}`, segmenter head `{cfg['model'].get('seg_head', 'preset default')}`).",
        f"- Pretraining: {scale['pretrain_steps']} steps of batch {scale['pretrain_batch']} per plane, lr "
        f"{cfg['pretrain']['base_lr'] * scale['pretrain_batch']:.2g}; last loss "
        + ", ".join(f"{p} {_f(v['final_loss'])}" for p, v in results["pretrain"].items()) + ".",
        f"- Fine-tuning (steps, not epochs): knee classifier {scale['classify_steps']}, ankle/shoulder classifier "
        f"{scale['transfer_steps']}, segmenter {scale['segment_steps']} steps for pretrained and scratch; classifier "
        f"batch {cfg['classify']['batch_size']}, head lr {cfg['classify']['head_lr']:g} (backbone "
        f"{cfg['classify']['backbone_lr_factor']:g} x that when pretrained, 1 x from scratch); segmenter batch "
        f"{cfg['segment']['batch_size']}, lr {cfg['segment']['lr']:g} (backbone {cfg['segment']['backbone_lr_factor']:g} x "
        "when pretrained); cosine schedules; segmenter windows over the whole series.",
        "- Baselines: " + (
            "the optimiser steps that take the method's cell the same time (per-step seconds measured per preset, "
            "`STEP_SECONDS` in run.py), so both train within the same wall-clock budget; pretraining time is not "
            "charged to the fine-tuning budget."
            if scale.get("baseline_budget") == "time" else "the same optimiser steps as the method's cells.")
        + " They are trained from random weights at the full learning rate, with the same data, batches, loss, "
        "schedule and validation split.",
        f"- Label fraction: a seeded, stratified subset of the pool; {cfg['classify']['val_fraction'] * 100:.0f} % of it (by "
        "patient) is the validation split that picks thresholds, so '10 %' means 10 % of the pool in total.",
        "- Test exams scored: " + ", ".join(
            f"{t.replace('_', ' ')} {n}" for t, n in sorted({(v['test'], v.get('n')) for v in variants}) if n) + ".",
        f"- Seeds (fine-tuning and label subsets): {seeds}. Figures are mean ± sd over the seeds and, in brackets, "
        f"the 95 % bootstrap interval ({summary['n_boot']} resamples of the test exams, the same resamples for every "
        "seed and variant) of the seed-averaged figure. Every model was saved, loaded back from its file and scored "
        "through the node's prediction path (`ModelBundle.predict_proba` / `.segment` via `evaluate_bundle`).",
        "",
    ]
    if results.get("pretrain_cut_short"):
        lines += ["**Pretraining cut short by the time budget** (steps reached): "
                  + ", ".join(f"{p} {n}" for p, n in results["pretrain_cut_short"].items()) + ".", ""]
    if results.get("missing_cells"):
        lines += [f"**Cells that did not finish** (time budget or error; not in the tables): "
                  f"{', '.join(results['missing_cells'])}.", ""]
    if results["scale"] == "smoke":
        lines += ["**Smoke scale: the numbers mean nothing.** A handful of steps on a few exams, test sets of 3 "
                  "exams: this run only shows that every stage works end to end.", ""]

    def variant_table(task: str, joint: str, tests: list[str], fractions: list[float]) -> list[str]:
        what = "macro AUC" if task == "classify" else "mean Dice"
        head = "| variant | labels | steps | train/val exams | " + " | ".join(
            f"{what}, {t.replace('_', ' ')}" for t in tests) + " | train s | params |"
        out = [head, "|" + " --- |" * (5 + len(tests) + 1)]
        inits = sorted({v["init"] for v in variants if v["task"] == task and v["joint"] == joint and not v["tag"]},
                       key=lambda i: (_INIT_ORDER.get(i, 2), i))
        for fraction in fractions:
            for init in inits:
                if not any(find(task, joint, init, fraction, t) for t in tests):
                    continue
                stats = cell_stats(task, joint, init, fraction, "")
                out.append(
                    f"| {_INIT_NAMES.get(init, init)} | {int(round(fraction * 100))} % | {stats.get('steps', 'n/a')} | "
                    f"{stats.get('exams', 'n/a')} | "
                    + " | ".join(_msd(find(task, joint, init, fraction, t)) for t in tests)
                    + f" | {_f(stats.get('train_s'), 1)} | {stats.get('params', 'n/a')} |")
        return out

    def comparison_table(task: str, joint: str, tests: list[str], fractions: list[float]) -> list[str]:
        out = ["| comparison | labels | " + " | ".join(t.replace("_", " ") for t in tests) + " |",
               "|" + " --- |" * (2 + len(tests))]
        pairs = sorted({(c["a"], c["b"]) for c in summary["comparisons"] if c["task"] == task and c["joint"] == joint
                        and not c["tag"]}, key=lambda ab: (_INIT_ORDER.get(ab[1], 2), ab[1]))
        for fraction in fractions:
            for a, b in pairs:
                cells = []
                for t in tests:
                    c = compare(task, joint, fraction, t, a, b)
                    cells.append("n/a" if c is None or c["difference"] is None else
                                 f"{c['difference']:+.3f}" + (f" [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" if c["ci"] else ""))
                if any(x != "n/a" for x in cells):
                    out.append(f"| {a} − {b} | {int(round(fraction * 100))} % | " + " | ".join(cells) + " |")
        return out

    def per_item_table(task: str, joint: str, test: str, fraction_list: list[float]) -> list[str]:
        entries = [v for v in variants if v["task"] == task and v["joint"] == joint and v["test"] == test
                   and v["label_fraction"] in fraction_list and not v["tag"]]
        if not entries:
            return []
        entries.sort(key=lambda v: (v["label_fraction"], _INIT_ORDER.get(v["init"], 2), v["init"]))
        items = list(entries[0]["per_item"])
        for e in entries[1:]:
            items += [k for k in e["per_item"] if k not in items]
        header = "| " + ("label (positives)" if task == "classify" else "structure") + " | " + " | ".join(
            f"{_INIT_NAMES.get(e['init'], e['init'])}, {int(round(e['label_fraction'] * 100))} %" for e in entries) + " |"
        out = [header, "|" + " --- |" * (1 + len(entries))]
        for k in items:
            name = f"{k} ({entries[0].get('positives', {}).get(k, '?')})" if task == "classify" else k
            cells = []
            for e in entries:
                d = e["per_item"].get(k)
                cells.append("n/a" if not d or d["mean"] is None else
                             _f(d["mean"], 2) + (f" ± {_f(d['sd'], 2)}" if d.get("sd") is not None else ""))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        return out

    knee_tests = ["knee_test", "knee_held_out"]
    fractions = sorted({v["label_fraction"] for v in variants if v["joint"] == "knee"}) or [0.1, 1.0]
    lines += ["## Knee classifier (fused sagittal + coronal + axial, EHR late fusion)", "",
              "Macro AUC over the labels that have both classes in the test set.", ""]
    lines += variant_table("classify", "knee", knee_tests, fractions)
    lines += ["", "Paired differences of macro AUC (same test exams), with 95 % bootstrap intervals:", ""]
    lines += comparison_table("classify", "knee", knee_tests, fractions)
    lines += ["", "AUC per label on the held-out site (mean ± sd over seeds; positives in the test set):", ""]
    lines += per_item_table("classify", "knee", "knee_held_out", fractions)
    lines += ["", "AUC per label on the in-site test set:", ""]
    lines += per_item_table("classify", "knee", "knee_test", fractions)
    lines += ["", "## Knee segmenter (sagittal, 11 structures)", "",
              "Mean Dice over the structures (each structure's mean over exams first).", ""]
    lines += variant_table("segment", "knee", knee_tests, fractions)
    lines += ["", "Paired differences of mean Dice:", ""]
    lines += comparison_table("segment", "knee", knee_tests, fractions)
    lines += ["", "Dice per structure on the held-out site:", ""]
    lines += per_item_table("segment", "knee", "knee_held_out", fractions)
    lines += ["", "## Transfer: knee-pretrained backbones on ankle and shoulder, 10 % labels", ""]
    for joint in ("ankle", "shoulder"):
        test = f"{joint}_test"
        if not any(v["joint"] == joint for v in variants):
            continue
        lines += [f"### {joint.capitalize()}", ""]
        lines += variant_table("classify", joint, [test], [0.1])
        lines += [""] + comparison_table("classify", joint, [test], [0.1]) + [""]
        lines += per_item_table("classify", joint, test, [0.1]) + [""]

    def verdict_at_least(entry: dict[str, Any] | None, target: float) -> str:
        if entry is None or entry.get("mean") is None:
            return "not measured"
        low = entry["ci"][0] if entry.get("ci") else None
        if entry["mean"] < target:
            return "**not met**"
        return "met" if low is not None and low >= target else "met on the mean, not by the interval"

    def verdict_ahead(c: dict[str, Any] | None, margin: float = 0.0, at_or_above: bool = False) -> str:
        """``ahead``: difference > 0 (or >= margin when one is given) and an interval above 0;
        ``at_or_above``: difference >= 0 and an interval that does not reach below 0."""
        if c is None or c["difference"] is None:
            return "not measured"
        diff, low = c["difference"], (c["ci"][0] if c.get("ci") else None)
        on_mean = diff >= margin if (margin > 0 or at_or_above) else diff > 0
        if not on_mean:
            return "**not met**"
        if low is None:
            return "met on the mean (no interval)"
        if margin > 0 and low >= margin:
            return f"met (the whole interval is at or above {margin:+.2f})"
        if margin > 0 and low > 0:
            return f"met on the mean; the interval is above 0 but reaches below {margin:+.2f}"
        if (at_or_above and low >= 0) or (not at_or_above and low > 0):
            return "met (the interval is above 0)" if not at_or_above else "met (the interval does not reach below 0)"
        return "met on the mean, **not shown by the interval**"

    auc = find("classify", "knee", "pretrained", 1.0, "knee_held_out")
    dice = find("segment", "knee", "pretrained", 1.0, "knee_held_out")
    base_cls = next((v["init"] for v in variants if v["task"] == "classify" and v["init"].startswith("monai_")),
                    results["baselines"]["classify"])
    base_seg = next((v["init"] for v in variants if v["task"] == "segment" and v["init"].startswith("monai_")),
                    results["baselines"]["segment"])
    c_scr = compare("classify", "knee", 0.1, "knee_held_out", "pretrained", "scratch")
    c_base = compare("classify", "knee", 0.1, "knee_held_out", "pretrained", base_cls)
    s_scr = compare("segment", "knee", 0.1, "knee_held_out", "pretrained", "scratch")
    s_base = compare("segment", "knee", 0.1, "knee_held_out", "pretrained", base_seg)

    def diff_text(c: dict[str, Any] | None) -> str:
        if c is None or c["difference"] is None:
            return "n/a"
        return f"{c['difference']:+.3f}" + (f" [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" if c.get("ci") else "")

    lines += [
        "## Targets (issue #11, held-out site)",
        "",
        f"- Fused macro AUC >= 0.90, pretrained, 100 % labels: {_msd(auc)}: {verdict_at_least(auc, 0.90)}.",
        f"- Mean Dice >= 0.80 over the 11 structures, pretrained, 100 % labels: {_msd(dice)}: "
        f"{verdict_at_least(dice, 0.80)}.",
        f"- 10 % labels, pretrained >= scratch + 0.05 macro AUC: {diff_text(c_scr)}: {verdict_ahead(c_scr, 0.05)}.",
        f"- 10 % labels, pretrained at or above the {base_cls} baseline: {diff_text(c_base)}: "
        f"{verdict_ahead(c_base, 0.0, at_or_above=True)}.",
        f"- Segmenter at 10 % labels (not a target, for reading): pretrained − scratch {diff_text(s_scr)}, pretrained − "
        f"{base_seg} {diff_text(s_base)}.",
    ]
    for joint in ("ankle", "shoulder"):
        c = compare("classify", joint, 0.1, f"{joint}_test", "pretrained", "scratch")
        lines.append(f"- Transfer to {joint}, 10 % labels, pretrained ahead of scratch: {diff_text(c)}: "
                     f"{verdict_ahead(c)}.")
    lines += [
        "",
        "A verdict 'met' needs the mean past the target and the interval on the right side of it; 'met on the mean' "
        "says the interval still allows the opposite.",
    ]
    follow_ups = sorted({v["tag"] for v in variants if v["tag"]})
    if follow_ups:
        lines += ["", "## Follow-up cells", "", "| variant | test | figure |", "| --- | --- | --- |"]
        for v in variants:
            if v["tag"]:
                lines.append(f"| {v['variant']} | {v['test']} | {_msd(v)} |")
    timings = results["timings"]
    total_train = sum(r["train_seconds"] for r in rows)
    total_eval = sum(r.get("eval_seconds", 0.0) for r in rows)
    lines += [
        "",
        "## Machine and time",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores visible; CUDA: {info['cuda']}; fine-tuning in "
        f"{results.get('jobs', 1)} parallel process(es), torch threads per process "
        f"{sorted({r.get('threads') for r in rows} - {None}) or info['torch_threads']}.",
        f"- Load average (1/5/15 min) at start {info.get('load_average_at_start', 'n/a')}, at the end "
        f"{info.get('load_average', 'n/a')} on {info['cores']} cores (a load above the core count means the "
        "machine was shared and wall times are longer than on an idle machine).",
        f"- torch {info['torch']}, MONAI {info.get('monai', '?')}, Python {info['python']}.",
        "- Wall time per stage: " + (", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) or "n/a") + ".",
        f"- Cells: {len(rows)} finished, {total_train / 60:.1f} min of training and {total_eval / 60:.1f} min of "
        "scoring summed over cells (the train s column above is the mean per cell).",
        "",
        "## Commands",
        "",
        "The first lines ran the benchmark; the others are the equivalent `orthonode train` commands of each step "
        "(the benchmark calls the same library functions). The report bootstraps over test exams itself "
        "(`orthonode train evaluate --n-boot` gives each model's own intervals).",
        "",
        "```",
        *results["commands"],
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
