"""MONAI datasets built on :mod:`training.datasets` records.

Records say how to load each plane; the dictionary transforms here load it and run the
node's own preprocessing (:func:`inference.preprocess.preprocess_volume` /
``preprocess_mask``), so a model trains on exactly the arrays the node will feed it (no
train/serve skew).  Caching is MONAI's: ``cache="memory"`` is a ``CacheDataset``,
``cache="disk"`` a ``PersistentDataset`` whose cache key covers the record's files *and*
the preprocessing configuration (a changed depth or size never reuses stale arrays), and
``cache=None`` a plain ``Dataset``.  Batching and worker processes are left to
``monai.data.DataLoader`` / ``torch.utils.data.DataLoader``.

Choices, documented because they change what a model sees:

* **Missing planes.**  An exam that lacks a requested plane is *excluded* (logged with the
  reason), not filled with zeros: a fused classifier trained on blank planes learns that
  blank means something, and the node refuses a study without the planes a model needs.
* **Unknown labels.**  ``labels`` has NaN replaced by 0 and ``label_mask`` is 0 there, so a
  loss can be masked (``BCEWithLogits(reduction="none") * label_mask``); a NaN in a loss
  would poison the whole batch.  Exams without any labels are excluded from classification.
* **Sparse segmentation labels.**  Voxels marked not annotated in the mask file (255 in a
  uint8 map, or negative) are -1 and are ignored by the segmentation loss.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Transform

from inference.labels import PLANES
from inference.preprocess import preprocess_mask, preprocess_volume
from training.datasets import ExamRecord, VolumeSource

log = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", None)


def _preprocess_dict(cfg: Any) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))


class LoadPlanesd(Transform):
    """Load and preprocess every plane of an exam item: ``item["sources"][plane]`` -> ``item[plane]``."""

    def __init__(self, planes: Sequence[str], cfg: Any) -> None:
        self.planes = tuple(planes)
        self.cfg = cfg

    def __call__(self, item: Mapping[Hashable, Any]) -> dict:
        out = {k: v for k, v in item.items() if k not in ("sources", "cache_key")}
        for plane in self.planes:
            source: VolumeSource = item["sources"][plane]
            volume = preprocess_volume(source.load(), self.cfg)
            out[plane] = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)
        for key in ("labels", "label_mask", "ehr", "ehr_mask"):
            if key in out:
                out[key] = torch.as_tensor(np.asarray(out[key], dtype=np.float32))
        return out


class LoadImageMaskd(Transform):
    """Load one plane (and its mask) of an item, optionally a slice window of it."""

    def __init__(self, cfg: Any, with_mask: bool) -> None:
        self.cfg = cfg
        self.with_mask = with_mask

    def __call__(self, item: Mapping[Hashable, Any]) -> dict:
        source: VolumeSource = item["source"]
        window = item.get("window")
        volume = source.load()
        mask = None
        if self.with_mask:
            mask = source.load_mask()
            if mask is None:
                raise ValueError(f"exam {item['exam_id']}: {source.description} has no mask")
            if mask.shape != volume.shape:
                raise ValueError(
                    f"exam {item['exam_id']}: mask {source.mask_path} has shape {mask.shape}, "
                    f"the volume {volume.shape}"
                )
        if window is not None:
            volume = volume[window[0] : window[1]]
            mask = None if mask is None else mask[window[0] : window[1]]
        out: dict[str, Any] = {
            "image": torch.as_tensor(np.ascontiguousarray(preprocess_volume(volume, self.cfg)), dtype=torch.float32),
            "exam_id": item["exam_id"],
            "site": item["site"],
        }
        if mask is not None:
            out["mask"] = torch.as_tensor(np.ascontiguousarray(preprocess_mask(mask, self.cfg)), dtype=torch.int64)
        return out


def _cache_key(item: Mapping[str, Any]) -> bytes:
    return item["cache_key"].encode()


def _source_key(source: VolumeSource) -> dict:
    files = list(source.paths) + ([source.mask_path] if source.mask_path is not None else [])
    return {
        "kind": source.kind,
        "series_uid": source.series_uid,
        "files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()],
    }


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _build(data: list[dict], transform: Any, cache: str | None, cache_dir: str | Path | None, name: str):
    from monai.data import CacheDataset, Dataset, PersistentDataset
    from monai.transforms import Compose

    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    chain = Compose([transform])
    if cache == "memory":
        return CacheDataset(data, chain, cache_rate=1.0, num_workers=0, progress=False, copy_cache=False)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError(f"{name}: cache='disk' needs cache_dir")
        return PersistentDataset(data, chain, cache_dir=Path(cache_dir), hash_func=_cache_key)
    return Dataset(data, chain)


def classification_dataset(
    records: Sequence[ExamRecord],
    planes: Sequence[str],
    preprocess_cfg: Any,
    cache_dir: str | Path | None = None,
    cache: str | None = "memory",
):
    """Dataset of exams for classification (one item per exam, all ``planes`` of it).

    Items: ``{plane: float32 (1, D, H, W) for each plane, "labels": (K,) float32 (unknown -> 0),
    "label_mask": (K,) float32 (1 = known), "ehr": (5,), "ehr_mask": (5,), "exam_id": str,
    "site": str}`` with ``ehr``/``ehr_mask`` from :func:`inference.model.encode_ehr`.  All
    records must share one ``label_keys``.  Exams without labels or without one of ``planes``
    are excluded with a log line; :attr:`excluded` on the returned dataset lists
    ``(exam_id, reason)``.
    """
    from inference.model import encode_ehr

    planes = tuple(planes)
    bad = [p for p in planes if p not in PLANES]
    if bad or not planes:
        raise ValueError(f"planes must be a non-empty subset of {PLANES}, got {planes}")
    keys = {r.label_keys for r in records if r.labels is not None}
    if len(keys) > 1:
        raise ValueError(f"records mix label sets {sorted(keys)}: classification needs one label set")
    pp = _preprocess_dict(preprocess_cfg)
    data, excluded = [], []
    for r in records:
        missing = [p for p in planes if p not in r.planes]
        if r.labels is None:
            excluded.append((r.exam_id, "no labels"))
        elif missing:
            excluded.append((r.exam_id, f"missing plane(s) {missing}"))
        else:
            try:
                values, mask = encode_ehr(r.ehr["age"], r.ehr["sex"], r.ehr["height_m"], r.ehr["weight_kg"])
            except ValueError as err:
                raise ValueError(f"exam {r.exam_id}: {err}") from None
            known = ~np.isnan(r.labels)
            sources = {p: r.planes[p] for p in planes}
            data.append(
                {
                    "exam_id": r.exam_id,
                    "site": r.site or "unknown",
                    "sources": sources,
                    "labels": np.where(known, r.labels, 0.0).astype(np.float32),
                    "label_mask": known.astype(np.float32),
                    "ehr": np.asarray(values, dtype=np.float32),
                    "ehr_mask": np.asarray(mask, dtype=np.float32),
                    "cache_key": _digest(
                        ["classify", r.exam_id, r.labels.tolist(), r.ehr, pp, {p: _source_key(s) for p, s in sources.items()}]
                    ),
                }
            )
    for exam_id, reason in excluded:
        log.warning("classification dataset: exam %s excluded: %s", exam_id, reason)
    if not data:
        raise ValueError(f"no exam has labels and all planes {planes} ({len(excluded)} excluded)")
    ds = _build(data, LoadPlanesd(planes, preprocess_cfg), cache, cache_dir, "classification_dataset")
    ds.excluded = excluded
    ds.label_keys = next(iter(keys))
    return ds


def segmentation_dataset(
    records: Sequence[ExamRecord],
    plane: str,
    preprocess_cfg: Any,
    windows: str = "central",
    stride: int | None = None,
    cache_dir: str | Path | None = None,
    cache: str | None = "memory",
):
    """Dataset of (image, mask) pairs of one plane.

    ``windows="central"``: one item per exam, the central ``depth`` slices (the method's
    input); ``"all"``: one item per :func:`inference.preprocess.slice_windows` window
    (``stride`` passed on), so every annotated slice is seen.  Items: ``{"image": float32
    (1, D, H, W), "mask": int64 (D, H, W) with -1 where not annotated, "exam_id", "site"}``.
    Exams without that plane or without a mask for it are excluded (``.excluded``).
    """
    from inference.preprocess import slice_windows

    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    if windows not in ("central", "all"):
        raise ValueError(f"windows must be 'central' or 'all', got {windows!r}")
    pp = _preprocess_dict(preprocess_cfg)
    data, excluded = [], []
    for r in records:
        source = r.planes.get(plane)
        if source is None:
            excluded.append((r.exam_id, f"no {plane} series"))
            continue
        if source.mask_path is None:
            excluded.append((r.exam_id, f"no mask for the {plane} series"))
            continue
        spans: list[Any] = [None]
        if windows == "all":
            spans = [tuple(w) for w in slice_windows(source.num_slices(), preprocess_cfg.depth, stride)]
        for span in spans:
            data.append(
                {
                    "exam_id": r.exam_id,
                    "site": r.site or "unknown",
                    "source": source,
                    "window": span,
                    "cache_key": _digest(["segment", r.exam_id, plane, span, pp, _source_key(source)]),
                }
            )
    for exam_id, reason in excluded:
        log.warning("segmentation dataset: exam %s excluded: %s", exam_id, reason)
    if not data:
        raise ValueError(f"no exam has a {plane} series with a mask ({len(excluded)} excluded)")
    ds = _build(data, LoadImageMaskd(preprocess_cfg, with_mask=True), cache, cache_dir, "segmentation_dataset")
    ds.excluded = excluded
    return ds


def pretrain_dataset(
    records: Sequence[ExamRecord],
    plane: str,
    preprocess_cfg: Any,
    cache_dir: str | Path | None = None,
    cache: str | None = "memory",
):
    """Unlabeled volumes of one plane for diffusion pretraining: ``{"image": (1, D, H, W),
    "exam_id", "site"}``, the central ``depth`` slices of every exam that has the plane
    (labels are ignored; exams without the plane are excluded, see ``.excluded``)."""
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    pp = _preprocess_dict(preprocess_cfg)
    data, excluded = [], []
    for r in records:
        source = r.planes.get(plane)
        if source is None:
            excluded.append((r.exam_id, f"no {plane} series"))
            continue
        data.append(
            {
                "exam_id": r.exam_id,
                "site": r.site or "unknown",
                "source": source,
                "window": None,
                "cache_key": _digest(["pretrain", r.exam_id, plane, pp, _source_key(source)]),
            }
        )
    for exam_id, reason in excluded:
        log.info("pretrain dataset (%s): exam %s excluded: %s", plane, exam_id, reason)
    if not data:
        raise ValueError(f"no exam has a {plane} series ({len(excluded)} excluded)")
    ds = _build(data, LoadImageMaskd(preprocess_cfg, with_mask=False), cache, cache_dir, "pretrain_dataset")
    ds.excluded = excluded
    return ds

