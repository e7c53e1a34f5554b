"""Fine-tuning: classification heads (per plane or fused, optional EHR) and the segmenter.

Why one module of about 850 lines: both fine-tunings (classifier and segmenter) with their
splits, class weights, thresholds and the supervised baselines' entry points, over the one
training step of :mod:`training.loop`.

Both tasks start from the pretrained backbones (the EMA weights of each plane's
pretraining run) or, with ``from_scratch``, from the same architecture at random
initialisation, which is the baseline the label-efficiency benchmark compares against.
A configuration whose ``model.classifier_backbone`` / ``model.segmenter_backbone`` names a
MONAI network (see :mod:`inference.model`) trains that supervised baseline instead, always
from scratch and with every weight at the full learning rate.
The backbone layers on the feature path (encoder + middle block) are fine-tuned at
``backbone_lr_factor`` x the head learning rate (0.05 in the reference); a factor of 0
freezes them.  Both learning rates follow one cosine schedule over all optimizer steps.

Labelled data are first reduced to ``label_fraction`` with the seeded, stratified
:func:`training.datasets.stratified_subset`, then split by patient into train and
validation (:func:`training.datasets.train_val_split`), so the validation exams, which
choose the decision thresholds and report the metrics reached, come out of the same label
budget: nothing outside the fraction is ever looked at.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from training.config import TrainConfig
from training.loop import train_epochs, train_step
from training.metrics import dice_of_labels
from training.pretrain import (
    PretrainedBackbone,
    cache_kwargs,
    find_pretrained_runs,
    load_pretrained_backbone,
    preprocess_config,
)

log = logging.getLogger(__name__)

#: ModelConfig fields that decide the shapes of a backbone's weights: a pretrained backbone
#: must agree on all of them with the model it is loaded into.
BACKBONE_KEYS: tuple[str, ...] = (
    "channels", "attention_levels", "num_res_blocks", "num_head_channels", "norm_num_groups",
    "num_train_timesteps", "schedule",
)


# --------------------------------------------------------------------------- optimisation


def param_groups(model: nn.Module, head_lr: float, backbone_lr_factor: float) -> list[dict[str, Any]]:
    """Optimizer groups: the head at ``head_lr``, the backbone's feature path at ``factor x head_lr``.

    With a factor of 0 the backbone is frozen (``requires_grad`` off) and left out.  Backbone
    layers off the feature path (the UNet decoder when features come from the middle block)
    get no gradient and are left out too, so they keep their pretrained values.
    """
    if head_lr <= 0:
        raise ValueError(f"head_lr must be > 0, got {head_lr}")
    if backbone_lr_factor < 0:
        raise ValueError(f"backbone_lr_factor must be >= 0, got {backbone_lr_factor}")
    head = list(model.head_parameters())
    backbone = list(model.backbone_parameters())
    overlap = {id(p) for p in head} & {id(p) for p in backbone}
    if overlap:
        raise ValueError(f"{type(model).__name__}: {len(overlap)} parameters are both head and backbone parameters")
    groups: list[dict[str, Any]] = [{"name": "head", "params": head, "lr": head_lr}]
    if backbone_lr_factor > 0:
        groups.append({"name": "backbone", "params": backbone, "lr": head_lr * backbone_lr_factor})
    else:
        for p in backbone:
            p.requires_grad_(False)
    return groups


def cosine_factor(total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rates after ``step`` optimizer steps: 1 -> 0 on a half cosine."""
    total = max(1, total_steps)
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def make_optimizer(
    model: nn.Module, lr: float, backbone_lr_factor: float, weight_decay: float, schedule: str, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(model, lr, backbone_lr_factor)
    optimizer = torch.optim.Adam(groups, weight_decay=weight_decay)
    factor = cosine_factor(total_steps) if schedule == "cosine" else (lambda step: 1.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- losses


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_mask: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE with logits averaged over the known labels.

    A label is unknown where ``label_mask`` is 0 or, without a mask, where it is NaN;
    unknown labels do not count (and a batch without any known label gives exactly 0).
    ``pos_weight`` (K,) weighs each label's positive term (see :func:`positive_weights`).
    """
    known = ~torch.isnan(labels)
    if label_mask is not None:
        known = known & (label_mask > 0)
    if not known.any():
        return logits.sum() * 0.0
    target = torch.where(known, labels, torch.zeros_like(labels))
    weight = None if pos_weight is None else pos_weight.to(device=logits.device, dtype=torch.float32)
    per = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none", pos_weight=weight)
    return (per * known).sum() / known.sum()


def positive_weights(labels: np.ndarray, cap: float) -> np.ndarray:
    """Per label, negatives / positives among the known training labels, within [1, cap].

    A rare finding (PCL, LCL and patellar dislocation are about 5 % of knee phantoms) would
    otherwise be learned as "always absent"; a label without positives gets weight 1.
    """
    labels = np.asarray(labels, dtype=np.float64)
    pos = (labels == 1).sum(axis=0).astype(np.float64)
    neg = (labels == 0).sum(axis=0).astype(np.float64)
    ratio = np.where(pos > 0, neg / np.maximum(pos, 1.0), 1.0)
    return np.clip(ratio, 1.0, cap).astype(np.float32)


def _steps(epochs: int, steps: int | None, batches_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, epochs): ``steps`` when set, else ``epochs`` passes over the data."""
    per = max(1, batches_per_epoch)
    if steps is None:
        return epochs * per, epochs
    return steps, math.ceil(steps / per)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ce_weight: float = 0.2,
    dice_weight: float = 1.0,
    ignore_index: int = -1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``ce_weight * CE + dice_weight * (1 - mean soft Dice over the foreground classes)``.

    ``logits`` (B, C, D, H, W), ``target`` (B, D, H, W) int64.  Voxels equal to
    ``ignore_index`` (unannotated slices) are excluded from both terms; a batch with no
    annotated voxel contributes exactly zero (not NaN).  Dice is pooled over the batch
    (one intersection and one union per class), which keeps classes that are absent from
    one volume from dominating.
    """
    if logits.ndim != 5 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits (B, C, D, H, W) and target (B, D, H, W) expected, got {tuple(logits.shape)} and {tuple(target.shape)}")
    logits = logits.float()
    num_classes = logits.shape[1]
    valid = target != ignore_index
    if (target[valid] < 0).any() or (target[valid] >= num_classes).any():
        raise ValueError(f"target holds values outside [0, {num_classes}) other than {ignore_index}")
    n_valid = valid.sum()
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits, safe_target, reduction="none")
    ce = (ce * valid).sum() / n_valid.clamp(min=1)
    probs = torch.softmax(logits, dim=1)
    weight = valid.unsqueeze(1).to(probs.dtype)
    onehot = F.one_hot(safe_target, num_classes).permute(0, 4, 1, 2, 3).to(probs.dtype)
    dims = (0, 2, 3, 4)
    inter = (probs * onehot * weight).sum(dims)[1:]
    denom = ((probs + onehot) * weight).sum(dims)[1:]
    dice = (2.0 * inter + eps) / (denom + eps)
    return ce_weight * ce + dice_weight * (1.0 - dice.mean())


# --------------------------------------------------------------------------- metrics


def roc_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """AUC-ROC, or None when ``y`` lacks positives or negatives."""
    from sklearn.metrics import roc_auc_score

    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, p))


def youden_threshold(y: np.ndarray, p: np.ndarray, min_cases: int = 1) -> float | None:
    """The threshold maximising sensitivity + specificity - 1.

    None when ``y`` has fewer than ``min_cases`` positives or negatives, or when no threshold
    does better than chance (the index is 0 everywhere, e.g. constant predictions): the caller
    then keeps its default rather than a threshold of 1.0 or 0.0 read off noise.
    """
    from sklearn.metrics import roc_curve

    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    positives = int((y == 1).sum())
    if min(positives, len(y) - positives) < max(1, min_cases):
        return None
    fpr, tpr, thresholds = roc_curve(y, p)
    youden = tpr - fpr
    best = int(np.argmax(youden))
    if youden[best] <= 0:
        return None
    # roc_curve's first threshold is +inf (nothing positive); keep thresholds inside [0, 1]
    return float(np.clip(thresholds[best], 0.0, 1.0))


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = -1) -> list[float | None]:
    """Hard Dice of classes 1..num_classes-1 over annotated voxels; None where a class is absent from both."""
    return dice_of_labels(pred, target, range(1, num_classes), ignore_index)


# --------------------------------------------------------------------------- models


def _normalised(d: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=list))


def check_compatible(pretrained: PretrainedBackbone, model_cfg: Any) -> None:
    """Refuse backbone weights of another architecture; warn when only the input size differs."""
    ours = _normalised(model_cfg.to_dict())
    theirs = _normalised(pretrained.model_config)
    differ = [k for k in BACKBONE_KEYS if ours.get(k) != theirs.get(k)]
    if differ:
        raise ValueError(
            f"pretrained backbone {pretrained.source} ({pretrained.plane}) has another architecture: "
            + ", ".join(f"{k}={theirs.get(k)} (model: {ours.get(k)})" for k in differ)
        )
    if ours.get("input_shape") != theirs.get("input_shape"):
        log.warning(
            "backbone %s was pretrained on %s volumes; fine-tuning uses %s",
            pretrained.source, theirs.get("input_shape"), ours.get("input_shape"),
        )


def resolve_pretrained(path: Path | Mapping[str, PretrainedBackbone] | None, planes: Sequence[str], from_scratch: bool) -> dict[str, PretrainedBackbone]:
    """EMA backbones for ``planes`` from ``path`` (a run folder or a folder of run folders).

    Exactly one of ``path`` and ``from_scratch`` must be given, so a baseline is never
    produced by forgetting an option.
    """
    if from_scratch:
        if path is not None:
            raise ValueError("--pretrained and --from-scratch exclude each other")
        return {}
    if path is None:
        raise ValueError("fine-tuning needs --pretrained RUN_DIR (or --from-scratch for the random-init baseline)")
    if isinstance(path, Mapping):  # backbones given as weights (a transfer from another classifier)
        missing = [p for p in planes if p not in path]
        if missing:
            raise ValueError(f"the given backbones lack plane(s) {missing} (have {sorted(path)})")
        return {plane: path[plane] for plane in planes}
    runs = find_pretrained_runs(Path(path))
    missing = [p for p in planes if p not in runs]
    if missing:
        raise FileNotFoundError(f"--pretrained {path}: no pretraining run for plane(s) {missing} (found {sorted(runs)})")
    out = {}
    for plane in planes:
        backbone = load_pretrained_backbone(runs[plane])
        if backbone.plane != plane:
            raise ValueError(f"{runs[plane]} holds a {backbone.plane} backbone, expected {plane}")
        out[plane] = backbone
    return out


def classifier_backbones(classifier: nn.Module, source: str | Path) -> dict[str, PretrainedBackbone]:
    """A trained classifier's diffusion backbones as the starting weights of another fine-tuning
    (the knee classifier's for the ankle and shoulder: a transfer between joints)."""
    from inference.model import PlaneEncoder

    out = {}
    for plane, encoder in classifier.encoders.items():
        if not isinstance(encoder, PlaneEncoder):
            raise ValueError(f"plane {plane}: a supervised baseline has no diffusion backbone to transfer")
        state = {k: v.detach().cpu().clone() for k, v in encoder.backbone.state_dict().items()}
        out[plane] = PretrainedBackbone(plane=plane, state_dict=state, model_config=classifier.cfg.to_dict(), step=0,
                                        source=Path(str(source)))
    return out


def build_classifier(
    cfg: TrainConfig, planes: Sequence[str], num_labels: int, use_ehr: bool, pretrained: Mapping[str, PretrainedBackbone]
) -> nn.Module:
    """The classifier with pretrained backbone weights loaded per plane (random where none given)."""
    from inference.model import OrthoDiffusionClassifier

    model_cfg = cfg.model_cfg()
    if pretrained and model_cfg.classifier_backbone != "diffusion_unet":
        raise ValueError(f"classifier_backbone {model_cfg.classifier_backbone!r} is a supervised baseline "
                         "without pretraining: train it with --from-scratch")
    model = OrthoDiffusionClassifier(model_cfg, list(planes), num_labels, use_ehr=use_ehr)
    for plane, backbone in pretrained.items():
        check_compatible(backbone, model_cfg)
        model.backbones[plane].load_state_dict(backbone.state_dict)
    return model


def build_segmenter(cfg: TrainConfig, pretrained: PretrainedBackbone | None) -> nn.Module:
    from inference.labels import NUM_SEG_CLASSES
    from inference.model import make_segmenter

    model_cfg = cfg.model_cfg()
    if pretrained is not None and model_cfg.segmenter_backbone != "diffusion_unet":
        raise ValueError(f"segmenter_backbone {model_cfg.segmenter_backbone!r} is a supervised baseline "
                         "without pretraining: train it with --from-scratch")
    model = make_segmenter(model_cfg, NUM_SEG_CLASSES)
    if pretrained is not None:
        check_compatible(pretrained, model_cfg)
        model.backbone.load_state_dict(pretrained.state_dict)
    return model


# --------------------------------------------------------------------------- runs


@dataclass
class FinetuneResult:
    """A fine-tuned model and everything its card needs."""

    task: str  # "classify" | "segment"
    model: nn.Module
    planes: tuple[str, ...]
    label_keys: tuple[str, ...]
    thresholds: dict[str, float]
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    init: str  # "pretrained" | "scratch"
    pretrained_from: dict[str, str]
    train_ids: list[str]
    val_ids: list[str]
    fingerprint: str
    joint: str | None
    use_ehr: bool = False
    label_fraction: float = 1.0
    seed: int = 0
    data_description: str = ""
    sites: list[str] = field(default_factory=list)


def _tensor(value: Any) -> torch.Tensor:
    if hasattr(value, "as_tensor"):  # MONAI MetaTensor -> plain tensor
        value = value.as_tensor()
    return torch.as_tensor(value)


def _loader(dataset: Any, batch_size: int, shuffle: bool, seed: int, num_workers: int, drop_last: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
    )


def split_labelled(records: Sequence[Any], label_fraction: float, val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, val) out of a seeded stratified ``label_fraction`` of ``records``."""
    from training.datasets import stratified_subset, train_val_split

    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"--label-fraction must be in (0, 1], got {label_fraction}")
    subset = stratified_subset(list(records), label_fraction, seed)
    if val_fraction <= 0.0 or len({r.patient_id for r in subset}) < 2:
        if val_fraction > 0.0:
            log.warning("only %d labelled exam(s): no validation split; thresholds stay at 0.5", len(subset))
        return subset, []
    return train_val_split(subset, val_fraction, seed)


def describe_data(records: Sequence[Any]) -> str:
    """Words for the card: says "synthetic phantoms" for phantom data, never implies clinical data."""
    sources = sorted({getattr(r, "source", "unknown") for r in records})
    sites = sorted({str(r.site) for r in records if r.site is not None})
    joints = sorted({str(r.joint) for r in records if r.joint is not None})
    kind = "synthetic phantoms (not patient data)" if sources == ["phantom"] else ", ".join(sources) + " data"
    return f"{kind}; {len(records)} exams; joint(s) {', '.join(joints) or 'unknown'}; site(s) {', '.join(sites) or 'unknown'}"


def _common_label_keys(records: Sequence[Any]) -> tuple[str, ...]:
    keys = {tuple(r.label_keys) for r in records}
    if len(keys) != 1:
        raise ValueError(f"the exams disagree on their label columns: {sorted(keys)}")
    return next(iter(keys))


def _joint(records: Sequence[Any]) -> str | None:
    joints = {r.joint for r in records}
    if len(joints) > 1:
        raise ValueError(f"the data mixes joints {sorted(str(j) for j in joints)}; fine-tune one joint at a time")
    return next(iter(joints))


def _batch_inputs(batch: Mapping[str, Any], planes: Sequence[str], use_ehr: bool, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    volumes = {p: _tensor(batch[p]).float().to(device) for p in planes}
    if not use_ehr:
        return volumes, None, None
    return volumes, _tensor(batch["ehr"]).float().to(device), _tensor(batch["ehr_mask"]).float().to(device)


class FeatureSet(torch.utils.data.Dataset):
    """Exams with each plane's frozen-backbone feature maps in place of its volume (the other
    keys of :func:`training.data.classification_dataset` items unchanged)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


@torch.no_grad()
def cache_features(model: nn.Module, dataset: Any, planes: Sequence[str], device: torch.device,
                   batch_size: int) -> FeatureSet:
    """One pass of frozen backbones over ``dataset`` (evaluation mode, fixed noise, as served)."""
    items: list[dict[str, Any]] = []
    for batch in _loader(dataset, batch_size, False, 0, 0):
        volumes = {p: _tensor(batch[p]).float().to(device) for p in planes}
        features = model.backbone_features(volumes)
        for i in range(len(batch["exam_id"])):
            item = {key: (value[i] if isinstance(value, (list, tuple)) else _tensor(value)[i])
                    for key, value in batch.items() if key not in planes}
            items.append({**item, **{p: features[p][i].float().cpu() for p in planes}})
    return FeatureSet(items)


@torch.no_grad()
def predict_classifier(model: nn.Module, loader: DataLoader, planes: Sequence[str], use_ehr: bool, device: torch.device,
                       precomputed: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(probabilities, labels, exam ids) over a loader, in evaluation mode (fixed feature noise);
    ``precomputed``: the loader yields :class:`FeatureSet` items."""
    model.eval()
    probs, labels, ids = [], [], []
    for batch in loader:
        volumes, ehr, mask = _batch_inputs(batch, planes, use_ehr, device)
        probs.append(torch.sigmoid(model(volumes, ehr, mask, precomputed=precomputed).float()).cpu().numpy())
        known = _tensor(batch["label_mask"]).numpy() > 0
        labels.append(np.where(known, _tensor(batch["labels"]).float().numpy(), np.nan))
        ids += list(batch["exam_id"])
    return np.concatenate(probs), np.concatenate(labels), ids


def _classifier_metrics(probs: np.ndarray, labels: np.ndarray, label_keys: Sequence[str]) -> dict[str, Any]:
    per_label = {k: roc_auc(labels[:, i], probs[:, i]) for i, k in enumerate(label_keys)}
    known = [v for v in per_label.values() if v is not None]
    return {"val_auc": per_label, "val_macro_auc": float(np.mean(known)) if known else None, "val_exams": int(len(labels))}


def finetune_classifier(
    cfg: TrainConfig,
    records: Sequence[Any],
    planes: Sequence[str],
    *,
    use_ehr: bool,
    pretrained: Path | Mapping[str, PretrainedBackbone] | None,
    from_scratch: bool = False,
    label_fraction: float = 1.0,
    seed: int | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    run_dir: Path | None = None,
) -> FinetuneResult:
    """Train a per-plane (one plane) or fused (several planes) classifier on labelled exams.

    ``pretrained`` is a pretraining run folder (or a folder of them), or backbones by plane
    (:func:`classifier_backbones` of another classifier: a transfer between joints).  With
    ``backbone_lr_factor`` 0 the backbones stay frozen, and with ``cache_features`` their
    features are computed once per exam (:func:`cache_features`) and only the pools and heads
    train on them.
    """
    from training.data import classification_dataset
    from training.datasets import fingerprint

    from training.distributed import select_device

    ccfg = cfg.classify
    seed = ccfg.seed if seed is None else seed
    device = device or select_device("auto")
    planes = tuple(planes)
    labelled = [r for r in records if r.labels is not None and all(p in r.planes for p in planes)]
    if not labelled:
        raise ValueError(f"no labelled exam has all of the planes {list(planes)} ({len(records)} exams read)")
    label_keys = _common_label_keys(labelled)
    joint = _joint(labelled)
    # a supervised baseline (classifier_backbone monai_*) has nothing to pretrain: it starts from scratch
    from_scratch = from_scratch or (pretrained is None and cfg.model_cfg().classifier_backbone != "diffusion_unet")
    backbones = resolve_pretrained(pretrained, planes, from_scratch)
    # from scratch, every weight is trained at the full learning rate (a true baseline, not
    # random frozen features under a head)
    backbone_factor = 1.0 if from_scratch else ccfg.backbone_lr_factor
    train, val = split_labelled(labelled, label_fraction, ccfg.val_fraction, seed)
    log.info("classifier: %d train / %d val exams (label fraction %.2f, seed %d)", len(train), len(val), label_fraction, seed)

    pcfg = preprocess_config(cfg)
    cache = cache_kwargs(cfg, run_dir)
    train_ds = classification_dataset(train, list(planes), pcfg, **cache)
    val_ds = classification_dataset(val, list(planes), pcfg, **cache) if val else None

    torch.manual_seed(seed)
    model = build_classifier(cfg, planes, len(label_keys), use_ehr, backbones).to(device)
    precomputed = (backbone_factor == 0 and ccfg.cache_features
                   and cfg.model_cfg().classifier_backbone == "diffusion_unet")
    if precomputed:
        started = time.monotonic()
        train_ds = cache_features(model, train_ds, planes, device, ccfg.batch_size)
        val_ds = cache_features(model, val_ds, planes, device, ccfg.batch_size) if val_ds is not None else None
        log.info("classifier: frozen backbones; features of %d exams computed once in %.0f s",
                 len(train_ds) + (len(val_ds) if val_ds is not None else 0), time.monotonic() - started)
    # the per-plane feature normalisation needs more than one exam per training batch
    loader = _loader(train_ds, ccfg.batch_size, True, seed, 0 if precomputed else ccfg.num_workers,
                     drop_last=len(train_ds) > ccfg.batch_size and len(train_ds) % ccfg.batch_size == 1)
    val_loader = (_loader(val_ds, ccfg.batch_size, False, seed, 0 if precomputed else ccfg.num_workers)
                  if val_ds is not None else None)
    total, epochs = _steps(ccfg.epochs, ccfg.steps, len(loader))
    optimizer, scheduler = make_optimizer(model, ccfg.head_lr, backbone_factor, ccfg.weight_decay, ccfg.schedule, total)
    train_labels = np.stack([r.labels for r in train])
    pos_weight = None
    if ccfg.pos_weight == "auto":
        pos_weight = torch.from_numpy(positive_weights(train_labels, ccfg.max_pos_weight))
        log.info("classifier: positive weights %s", dict(zip(label_keys, np.round(pos_weight.numpy(), 2).tolist())))

    def step(batch: Mapping[str, Any]) -> torch.Tensor:
        volumes, ehr, mask = _batch_inputs(batch, planes, use_ehr, device)
        labels = _tensor(batch["labels"]).float().to(device)
        label_mask = _tensor(batch["label_mask"]).float().to(device)
        return train_step(
            lambda: model(volumes, ehr, mask, precomputed=precomputed), optimizer, device=device, amp=ccfg.amp,
            loss_fn=lambda logits: classification_loss(logits, labels, label_mask, pos_weight), scheduler=scheduler,
        )

    def validate() -> dict[str, Any]:
        if val_loader is None:
            return {}
        probs, labels_np, _ = predict_classifier(model, val_loader, planes, use_ehr, device, precomputed)
        return {"val_macro_auc": _classifier_metrics(probs, labels_np, label_keys)["val_macro_auc"]}

    history = train_epochs(model, loader, step, epochs=epochs, total=total, task="classify", log=log,
                           show_progress=progress, validate=validate)

    thresholds = {k: 0.5 for k in label_keys}
    sources = {k: "default 0.5" if ccfg.threshold_policy == "fixed" else
               f"default 0.5 (validation split has < {ccfg.min_threshold_cases} positives or negatives, "
               "or no threshold beats chance)" for k in label_keys}
    metrics: dict[str, Any] = {"train_exams": len(train), "val_exams": len(val), "final_train_loss": history[-1]["train_loss"]}
    if val_loader is not None:
        probs, labels_np, _ = predict_classifier(model, val_loader, planes, use_ehr, device, precomputed)
        metrics.update(_classifier_metrics(probs, labels_np, label_keys))
        if ccfg.threshold_policy == "youden":
            for i, key in enumerate(label_keys):
                chosen = youden_threshold(labels_np[:, i], probs[:, i], ccfg.min_threshold_cases)
                if chosen is not None:
                    thresholds[key] = chosen
                    sources[key] = "youden on the validation split"
    metrics["threshold_policy"] = ccfg.threshold_policy
    metrics["threshold_sources"] = sources
    result = FinetuneResult(
        task="classify",
        model=model.cpu().eval(),
        planes=planes,
        label_keys=label_keys,
        thresholds=thresholds,
        metrics=metrics,
        history=history,
        init="scratch" if from_scratch else "pretrained",
        pretrained_from={p: str(b.source) for p, b in backbones.items()},
        train_ids=[r.exam_id for r in train],
        val_ids=[r.exam_id for r in val],
        fingerprint=fingerprint(train + val),
        joint=joint,
        use_ehr=use_ehr,
        label_fraction=label_fraction,
        seed=seed,
        data_description=describe_data(train + val),
        sites=sorted({str(r.site) for r in train + val if r.site is not None}),
    )
    if run_dir is not None:
        write_history(Path(run_dir), history, "classify")
    return result


@torch.no_grad()
def predict_segmenter(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(predicted labels, targets, exam id) per window of the loader."""
    model.eval()
    preds, targets, ids = [], [], []
    for batch in loader:
        logits = model(_tensor(batch["image"]).float().to(device))
        preds.append(logits.argmax(1).cpu().numpy())
        targets.append(_tensor(batch["mask"]).long().numpy())
        ids += list(batch["exam_id"])
    return np.concatenate(preds), np.concatenate(targets), ids


def _segmenter_metrics(pred: np.ndarray, target: np.ndarray, exam_ids: Sequence[str]) -> dict[str, Any]:
    """Dice per structure, each exam's windows pooled into one score per exam first."""
    from inference.labels import KNEE_STRUCTURES, NUM_SEG_CLASSES

    order = list(dict.fromkeys(exam_ids))
    ids = np.asarray(exam_ids)
    per_case = [
        dice_per_class(pred[ids == e].reshape(-1), target[ids == e].reshape(-1), NUM_SEG_CLASSES) for e in order
    ]
    per_structure: dict[str, float | None] = {}
    for s in KNEE_STRUCTURES:
        values = [case[s.index - 1] for case in per_case if case[s.index - 1] is not None]
        per_structure[s.key] = float(np.mean(values)) if values else None
    known = [v for v in per_structure.values() if v is not None]
    return {"val_dice": per_structure, "val_mean_dice": float(np.mean(known)) if known else None,
            "val_exams": len(order), "val_windows": int(len(pred))}


def finetune_segmenter(
    cfg: TrainConfig,
    records: Sequence[Any],
    *,
    plane: str | None = None,
    pretrained: Path | None,
    from_scratch: bool = False,
    label_fraction: float = 1.0,
    seed: int | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    run_dir: Path | None = None,
    dataset_options: Mapping[str, Any] | None = None,
) -> FinetuneResult:
    """Train the segmenter on exams whose ``plane`` series has a label map (-1 = unannotated)."""
    from training.data import segmentation_dataset
    from training.datasets import fingerprint

    from training.distributed import select_device

    scfg = cfg.segment
    plane = plane or scfg.plane
    seed = scfg.seed if seed is None else seed
    device = device or select_device("auto")
    annotated = [r for r in records if plane in r.planes and r.planes[plane].mask_path is not None]
    if not annotated:
        raise ValueError(f"no exam has a {plane} series with a mask ({len(records)} exams read)")
    from_scratch = from_scratch or (pretrained is None and cfg.model_cfg().segmenter_backbone != "diffusion_unet")
    backbones = resolve_pretrained(pretrained, (plane,), from_scratch)
    backbone_factor = 1.0 if from_scratch else scfg.backbone_lr_factor
    train, val = split_labelled(annotated, label_fraction, scfg.val_fraction, seed)
    log.info("segmenter: %d train / %d val exams (label fraction %.2f, seed %d)", len(train), len(val), label_fraction, seed)

    pcfg = preprocess_config(cfg)
    cache = cache_kwargs(cfg, run_dir)
    options = dict(dataset_options or {})
    options.setdefault("windows", scfg.windows)
    train_ds = segmentation_dataset(train, plane, pcfg, **cache, **options)
    # validation over every window of the series, as the node segments it
    val_ds = segmentation_dataset(val, plane, pcfg, windows="all", **cache) if val else None

    torch.manual_seed(seed)
    model = build_segmenter(cfg, backbones.get(plane)).to(device)
    loader = _loader(train_ds, scfg.batch_size, True, seed, scfg.num_workers)
    val_loader = _loader(val_ds, scfg.batch_size, False, seed, scfg.num_workers) if val_ds is not None else None
    total, epochs = _steps(scfg.epochs, scfg.steps, len(loader))
    optimizer, scheduler = make_optimizer(model, scfg.lr, backbone_factor, scfg.weight_decay, scfg.schedule, total)

    def step(batch: Mapping[str, Any]) -> torch.Tensor:
        image = _tensor(batch["image"]).float().to(device)
        mask = _tensor(batch["mask"]).long().to(device)
        return train_step(
            lambda: model(image), optimizer, device=device, amp=scfg.amp,
            loss_fn=lambda logits: segmentation_loss(logits, mask, scfg.ce_weight, scfg.dice_weight),
            scheduler=scheduler,
        )

    history = train_epochs(model, loader, step, epochs=epochs, total=total, task="segment", log=log,
                           show_progress=progress)

    metrics: dict[str, Any] = {"train_exams": len(train), "val_exams": len(val), "final_train_loss": history[-1]["train_loss"]}
    if val_loader is not None:
        pred, target, exam_ids = predict_segmenter(model, val_loader, device)
        metrics.update(_segmenter_metrics(pred, target, exam_ids))
        history[-1]["val_mean_dice"] = metrics["val_mean_dice"]
    result = FinetuneResult(
        task="segment",
        model=model.cpu().eval(),
        planes=(plane,),
        label_keys=(),
        thresholds={},
        metrics=metrics,
        history=history,
        init="scratch" if from_scratch else "pretrained",
        pretrained_from={p: str(b.source) for p, b in backbones.items()},
        train_ids=[r.exam_id for r in train],
        val_ids=[r.exam_id for r in val],
        fingerprint=fingerprint(train + val),
        joint=_joint(annotated),
        label_fraction=label_fraction,
        seed=seed,
        data_description=describe_data(train + val),
        sites=sorted({str(r.site) for r in train + val if r.site is not None}),
    )
    if run_dir is not None:
        write_history(Path(run_dir), history, "segment")
    return result


def write_history(run_dir: Path, history: Sequence[Mapping[str, Any]], task: str) -> Path:
    """``RUN/<task>_log.csv``: one row per epoch."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{task}_log.csv"
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow(row)
    return path


# --------------------------------------------------------------------------- bundle


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orthonode")
    except PackageNotFoundError:
        return "0.0.0"


def _task_record(result: FinetuneResult) -> dict[str, Any]:
    return {
        "description": result.data_description,
        "fingerprint": result.fingerprint,
        "counts": {"train": len(result.train_ids), "val": len(result.val_ids)},
        "sites": list(result.sites),
        "planes": list(result.planes),
        "init": result.init,
        "pretrained_from": dict(result.pretrained_from),
        "label_fraction": result.label_fraction,
        "seed": result.seed,
        "use_ehr": result.use_ehr,
        "train_exams": list(result.train_ids),
        "val_exams": list(result.val_ids),
    }


def make_bundle(
    cfg: TrainConfig,
    classifier: FinetuneResult | None = None,
    segmenter: FinetuneResult | None = None,
    *,
    name: str | None = None,
    version: str | None = None,
    extra_metrics: Mapping[str, Any] | None = None,
) -> Any:
    """A :class:`inference.checkpoint.ModelBundle` with its card from fine-tuning results.

    The card's ``training_data`` says which data (description, sha256 fingerprint, counts,
    sites, label fraction, seed, initialisation) each network was trained on; for phantom
    data the description says "synthetic phantoms (not patient data)".  ``metrics`` holds
    what fine-tuning reached on its validation split.  The segmenter's plane is the card's
    ``segmentation_plane``.
    """
    from inference.checkpoint import ModelBundle, ModelCard
    from inference.labels import JOINT_LABELS, KNEE_STRUCTURES

    if classifier is None and segmenter is None:
        raise ValueError("make_bundle needs a classifier result, a segmenter result or both")
    if classifier is not None and classifier.task != "classify":
        raise ValueError(f"classifier result is a {classifier.task!r} run")
    if segmenter is not None and segmenter.task != "segment":
        raise ValueError(f"segmenter result is a {segmenter.task!r} run")
    joints = {r.joint for r in (classifier, segmenter) if r is not None}
    if len(joints) != 1 or None in joints:
        raise ValueError(f"the networks of one bundle must come from one known joint, got {sorted(map(str, joints))}")
    joint = str(next(iter(joints)))
    model_cfg = cfg.model_cfg()
    fingerprints = [r.fingerprint for r in (classifier, segmenter) if r is not None]
    descriptions = sorted({r.data_description.split(";")[0] for r in (classifier, segmenter) if r is not None})
    training_data: dict[str, Any] = {
        "description": "; ".join(descriptions),
        "fingerprint": fingerprints[0] if len(set(fingerprints)) == 1 else "+".join(fingerprints),
        "config": cfg.name,
    }
    metrics: dict[str, Any] = dict(extra_metrics or {})
    labels: list[str] = []
    names: list[str] = []
    thresholds: dict[str, float] = {}
    planes: list[str] = []
    use_ehr = False
    if classifier is not None:
        labels = list(classifier.label_keys)
        known = {label.key: label.name for label in JOINT_LABELS.get(joint, ())}
        names = [known.get(k, k) for k in labels]
        thresholds = dict(classifier.thresholds)
        planes = list(classifier.planes)
        use_ehr = classifier.use_ehr
        training_data["classifier"] = _task_record(classifier)
        metrics["classifier"] = dict(classifier.metrics)
    if segmenter is not None:
        training_data["segmenter"] = _task_record(segmenter)
        metrics["segmenter"] = dict(segmenter.metrics)
        if not planes:
            planes = list(segmenter.planes)
    synthetic = all("synthetic phantoms" in r.data_description for r in (classifier, segmenter) if r is not None)
    version = version or f"{_package_version()}+{fingerprints[0][:8]}"
    card = ModelCard(
        name=name or f"orthodiffusion-{joint}",
        version=version,
        joint=joint,
        labels=labels,
        label_names=names,
        structures=[s.key for s in KNEE_STRUCTURES] if segmenter is not None else [],
        thresholds=thresholds,
        planes=planes,
        use_ehr=use_ehr,
        model=model_cfg.to_dict(),
        preprocess=preprocess_config(cfg).to_dict(),
        training_data=training_data,
        metrics=metrics,
        segmentation_plane=segmenter.planes[0] if segmenter is not None else None,
        intended_use=(
            "Research and demonstration only; trained on synthetic phantoms, not for clinical use"
            if synthetic
            else "Research use only; not a medical device"
        ),
    )
    return ModelBundle(card, classifier.model if classifier else None, segmenter.model if segmenter else None)
