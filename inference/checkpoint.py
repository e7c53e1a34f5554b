"""One-file model checkpoints that carry their own model card.

A checkpoint is a single ``torch.save`` file::

    {"format": "orthonode-checkpoint/1",
     "card": ModelCard as plain types,
     "state": {"classifier": state_dict, "segmenter": state_dict}}   # either may be absent

It loads with ``torch.load(weights_only=True)`` (no pickled code runs), and the card alone
says how to rebuild the networks (model configuration, planes, labels, EHR use,
preprocessing), so inference never needs outside knowledge or guesses.  Files are written
to a temporary name in the target folder, flushed to disk and renamed into place, so a crash
never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import pickle
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from inference.labels import JOINTS, KNEE_STRUCTURES, PLANES
from inference.model import (
    EHR_FEATURES,
    ModelConfig,
    OrthoDiffusionClassifier,
    encode_ehr,
    make_segmenter,
)
from inference.preprocess import PreprocessConfig, preprocess_volume, segment_series
from inference.validated import plain_errors, sequence

__all__ = [
    "CHECKPOINT_FORMAT", "INTENDED_USE", "CheckpointError", "ModelBundle", "ModelCard", "pick_device", "read_card",
    "weights_fingerprint",
]

CHECKPOINT_FORMAT = "orthonode-checkpoint/1"
INTENDED_USE = "Research use only; not a medical device"


class CheckpointError(ValueError):
    """A checkpoint file cannot be read as an orthonode checkpoint; the message names the file."""


def _framework_versions() -> dict[str, str]:
    import monai

    versions = {"torch": str(torch.__version__), "monai": str(monai.__version__), "numpy": str(np.__version__)}
    try:
        from importlib.metadata import PackageNotFoundError, version

        versions["orthonode"] = version("orthonode")
    except PackageNotFoundError:
        versions["orthonode"] = "unknown"
    return versions


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _distinct(values: list[str]) -> list[str]:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"must not repeat an entry, but {repeated} appear more than once in {values}")
    return values


_NonEmptyStr = Annotated[str, Strict(), Field(min_length=1)]
_Plane = Literal[PLANES]  # type: ignore[valid-type]
_Structure = Literal[tuple(s.key for s in KNEE_STRUCTURES)]  # type: ignore[misc]
#: lists are given as lists or tuples (a set or a string has no reliable order) and kept as lists
_Strings = Annotated[list[_NonEmptyStr], BeforeValidator(sequence)]
_DistinctStrings = Annotated[list[_NonEmptyStr], BeforeValidator(sequence), AfterValidator(_distinct)]
_Structures = Annotated[list[_Structure], BeforeValidator(sequence)]  # type: ignore[valid-type]
_Planes = Annotated[list[_Plane], BeforeValidator(sequence), AfterValidator(_distinct)]  # type: ignore[valid-type]
_Probability = Annotated[float, Strict(), Field(ge=0.0, le=1.0)]  # an int is read as a float; a bool is not
_Sha256 = Annotated[str, Strict(), Field(pattern=r"^[0-9a-fA-F]{64}$")]
_Mapping = dict[str, Any]


@plain_errors
@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class ModelCard:
    """What a model is, what it was trained on and how to rebuild and use it.

    ``labels`` are the label keys in model output order and ``label_names`` their readable
    names; ``structures`` the segmentation structure keys in class order (class ``i + 1`` is
    ``structures[i]``; empty without a segmenter).  ``thresholds`` map each label to the
    probability at which it is reported present.  ``model`` and ``preprocess`` are
    :meth:`ModelConfig.to_dict` and :meth:`PreprocessConfig.to_dict`.  ``training_data``
    describes the data (``description``, ``fingerprint`` sha256, ``counts``, ``sites``; it
    says "synthetic phantoms" where so).

    A pydantic dataclass: the fields' types and values are checked by pydantic (unknown keys
    are errors), the rules between fields by :meth:`_check_consistency`, which also rebuilds
    both configurations, so a card that saves also loads; an invalid card raises
    ``ValueError`` naming the field.
    """

    name: _NonEmptyStr
    version: _NonEmptyStr
    joint: Literal[JOINTS]  # type: ignore[valid-type]
    labels: _DistinctStrings
    label_names: _Strings
    structures: _Structures
    thresholds: dict[str, _Probability]
    planes: _Planes
    use_ehr: Annotated[bool, Strict()]
    model: _Mapping
    preprocess: _Mapping
    training_data: _Mapping = field(default_factory=dict)
    metrics: _Mapping = field(default_factory=dict)
    created: _NonEmptyStr = field(default_factory=_now_iso)
    framework: dict[str, str] = field(default_factory=_framework_versions)
    intended_use: _NonEmptyStr = INTENDED_USE
    #: the plane whose series the segmenter was trained on (and the node segments); None without one
    segmentation_plane: _Plane | None = None
    #: sha256 of each diffusion backbone's weights ("classifier.<plane>", "segmenter"), written
    #: when the bundle is saved; bundles whose cards give the same fingerprint hold the same
    #: weights, and a node serving both keeps one copy (:mod:`inference.model_set`)
    backbones: dict[str, _Sha256] = field(default_factory=dict)

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelCard:
        """The rules between fields; then both configurations must rebuild."""
        if len(self.label_names) != len(self.labels):
            raise ValueError(
                f"ModelCard.label_names has {len(self.label_names)} entries; labels has {len(self.labels)}"
            )
        if set(self.thresholds) != set(self.labels):
            raise ValueError(
                "ModelCard.thresholds must have exactly one entry per label: missing "
                f"{sorted(set(self.labels) - set(self.thresholds))}, "
                f"extra {sorted(set(self.thresholds) - set(self.labels))}"
            )
        self.thresholds = {k: self.thresholds[k] for k in self.labels}  # in label order
        if self.segmentation_plane is not None and not self.structures:
            raise ValueError("ModelCard.segmentation_plane is set but the card lists no structures")
        self.model_config()
        self.preprocess_config()
        return self

    def segmenter_plane(self) -> str | None:
        """The plane the segmenter works on: the card's field, else what older cards recorded."""
        if self.segmentation_plane is not None:
            return self.segmentation_plane
        record = self.training_data.get("segmenter")
        planes = record.get("planes") if isinstance(record, Mapping) else None
        return planes[0] if planes else None

    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig.from_dict(self.model)
        except (TypeError, ValueError) as err:
            raise ValueError(f"ModelCard.model: {err}") from None

    def preprocess_config(self) -> PreprocessConfig:
        try:
            cfg = PreprocessConfig.from_dict(self.preprocess)
        except (TypeError, ValueError) as err:
            raise ValueError(f"ModelCard.preprocess: {err}") from None
        model_shape = tuple(self.model.get("input_shape", ModelConfig().input_shape))
        if cfg.shape != model_shape:
            raise ValueError(
                f"ModelCard.preprocess gives inputs of shape {cfg.shape} but ModelCard.model.input_shape is "
                f"{model_shape}"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (what ``torch.load(weights_only=True)`` accepts)."""
        return _plain(asdict(self), "card")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelCard:
        if not isinstance(d, Mapping):
            raise ValueError(f"model card must be a mapping, got {type(d).__name__}")
        return cls(**dict(d))


def autocast(device: torch.device, enabled: bool = True, training: bool = False) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision on CUDA (bf16 where supported); plain float32 elsewhere or when not ``enabled``.

    Without bf16 support, inference runs in fp16; training (``training=True``) stays in
    float32 there, because fp16 gradients would need a loss scaler the trainer does not use.
    """
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    if torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if training:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.float16)


def pick_device(prefer: str = "auto") -> torch.device:
    """``"auto"``: CUDA when present, else CPU; ``"cuda"``/``"cuda:N"``: must exist; ``"cpu"``."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(prefer)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {prefer!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {prefer!r} was asked for but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {prefer!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {prefer!r}")
    return device


class ModelBundle:
    """A model card with its classifier and/or segmenter, ready for inference."""

    def __init__(
        self,
        card: ModelCard,
        classifier: OrthoDiffusionClassifier | None = None,
        segmenter: torch.nn.Module | None = None,
    ) -> None:
        """``segmenter`` is an :class:`OrthoDiffusionSegmenter` or, for a supervised baseline, a
        :class:`inference.model.MonaiSegmenter` (what ``card.model.segmenter_backbone`` names)."""
        if classifier is None and segmenter is None:
            raise ValueError("ModelBundle needs a classifier, a segmenter or both")
        cfg = card.model_config()
        if classifier is not None:
            if not card.labels:
                raise ValueError("ModelBundle: the card lists no labels but a classifier was given")
            if classifier.num_labels != len(card.labels):
                raise ValueError(
                    f"ModelBundle: the classifier has {classifier.num_labels} outputs; card.labels has "
                    f"{len(card.labels)}"
                )
            if list(classifier.planes) != card.planes:
                raise ValueError(
                    f"ModelBundle: classifier planes {list(classifier.planes)} != card.planes {card.planes}"
                )
            if classifier.use_ehr != card.use_ehr:
                raise ValueError(f"ModelBundle: classifier use_ehr={classifier.use_ehr} != card.use_ehr={card.use_ehr}")
            if classifier.cfg != cfg:
                raise ValueError("ModelBundle: the classifier's ModelConfig differs from card.model")
        if segmenter is not None:
            if not card.structures:
                raise ValueError("ModelBundle: the card lists no structures but a segmenter was given")
            if segmenter.num_classes != len(card.structures) + 1:
                raise ValueError(
                    f"ModelBundle: the segmenter has {segmenter.num_classes} classes; card.structures gives "
                    f"{len(card.structures)} + background"
                )
            if segmenter.cfg != cfg:
                raise ValueError("ModelBundle: the segmenter's ModelConfig differs from card.model")
        elif card.structures:
            raise ValueError("ModelBundle: card.structures is not empty but no segmenter was given")
        self.card = card
        self.classifier = classifier
        self.segmenter = segmenter
        self.preprocess = card.preprocess_config()
        self.device = torch.device("cpu")
        for net in (classifier, segmenter):  # a bundle is for inference: evaluation mode
            if net is not None:
                net.eval()

    # -- persistence -------------------------------------------------------------------

    def backbone_modules(self) -> dict[str, torch.nn.Module]:
        """The diffusion backbones of this bundle by name: ``classifier.<plane>`` and ``segmenter``
        (the MONAI baselines have none)."""
        from inference.model import DiffusionBackbone

        found: dict[str, torch.nn.Module] = {}
        if self.classifier is not None:
            for plane, encoder in self.classifier.encoders.items():
                backbone = getattr(encoder, "backbone", None)
                if isinstance(backbone, DiffusionBackbone):
                    found[f"classifier.{plane}"] = backbone
        backbone = getattr(self.segmenter, "backbone", None)
        if isinstance(backbone, DiffusionBackbone):
            found["segmenter"] = backbone
        return found

    def backbone_fingerprints(self) -> dict[str, str]:
        """sha256 of each backbone's weights (names, dtypes, shapes and bytes), as the card records them."""
        return {name: weights_fingerprint(module) for name, module in self.backbone_modules().items()}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the bundle to ``path`` atomically (temporary file, fsync, rename); the card's
        ``backbones`` fingerprints are refreshed from the weights written."""
        path = Path(path)
        self.card.backbones = self.backbone_fingerprints()
        state: dict[str, Any] = {}
        if self.classifier is not None:
            state["classifier"] = {k: v.detach().cpu() for k, v in self.classifier.state_dict().items()}
        if self.segmenter is not None:
            state["segmenter"] = {k: v.detach().cpu() for k, v in self.segmenter.state_dict().items()}
        payload = {"format": CHECKPOINT_FORMAT, "card": self.card.to_dict(), "state": state}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> ModelBundle:
        """Rebuild a bundle from its file alone; a foreign, corrupt or old file raises CheckpointError."""
        path = Path(path)
        payload = _read_payload(path, map_location=map_location)
        try:
            card = ModelCard.from_dict(payload["card"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: invalid model card: {err}") from None
        state = payload["state"]
        unknown = sorted(set(state) - {"classifier", "segmenter"})
        if unknown:
            raise CheckpointError(f"{path}: unknown state entries {unknown}")
        cfg = card.model_config()
        classifier = segmenter = None
        if "classifier" in state:
            classifier = OrthoDiffusionClassifier(cfg, card.planes, len(card.labels), card.use_ehr)
            _load_state(classifier, state["classifier"], path, "classifier")
        if "segmenter" in state:
            segmenter = make_segmenter(cfg, len(card.structures) + 1)
            _load_state(segmenter, state["segmenter"], path, "segmenter")
        try:
            bundle = cls(card, classifier, segmenter)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        return bundle.to(map_location)

    # -- inference ---------------------------------------------------------------------

    def to(self, device: str | torch.device) -> ModelBundle:
        device = torch.device(device)
        for net in (self.classifier, self.segmenter):
            if net is not None:
                net.to(device)
        self.device = device
        return self

    @torch.no_grad()
    def predict_proba(
        self,
        volumes: Mapping[str, np.ndarray],
        ehr: Mapping[str, Any] | None = None,
        timings: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Probability per label for one exam: the one prediction path of the node,
        ``orthonode predict`` and ``orthonode train evaluate``.

        ``volumes[plane]`` is the ``(S, R, C)`` series of a plane in ``card.planes``; a plane
        may be missing (the classifier then decides from the others, see
        :meth:`OrthoDiffusionClassifier.forward`), but not all of them.  ``ehr`` has keys
        ``age``, ``sex``, ``height_m``, ``weight_kg`` (any may be None or absent: it is then
        masked as missing); it is ignored by a model without EHR fusion.  ``timings``, when
        given, accumulates the seconds spent under ``"preprocess"`` and ``"model"``.
        """
        if self.classifier is None:
            raise ValueError(f"model {self.card.name!r} has no classifier")
        present = [p for p in self.card.planes if p in volumes]
        if not present:
            raise ValueError(
                f"predict_proba: volumes holds none of the planes {self.card.planes} that model "
                f"{self.card.name!r} uses"
            )
        started = time.perf_counter()
        self.classifier.eval()
        inputs = {
            plane: torch.from_numpy(preprocess_volume(volumes[plane], self.preprocess))[None].to(self.device)
            for plane in present
        }
        ehr_values = ehr_mask = None
        if self.card.use_ehr:
            ehr = dict(ehr or {})
            unknown = sorted(set(ehr) - {"age", "sex", "height_m", "weight_kg"})
            if unknown:
                raise ValueError(f"predict_proba: unknown EHR key(s) {unknown}")
            values, mask = encode_ehr(ehr.get("age"), ehr.get("sex"), ehr.get("height_m"), ehr.get("weight_kg"))
            ehr_values = torch.from_numpy(values)[None].to(self.device)
            ehr_mask = torch.from_numpy(mask)[None].to(self.device)
        prepared = time.perf_counter()
        with autocast(self.device):
            logits = self.classifier(inputs, ehr_values, ehr_mask)
        probs = torch.sigmoid(logits.float())[0].cpu().tolist()
        if timings is not None:
            timings["preprocess"] = timings.get("preprocess", 0.0) + prepared - started
            timings["model"] = timings.get("model", 0.0) + time.perf_counter() - prepared
        return dict(zip(self.card.labels, probs))

    @torch.no_grad()
    def segment(
        self, volume: np.ndarray, stride: int | None = None, timings: dict[str, float] | None = None
    ) -> np.ndarray:
        """uint8 label map ``(S, R, C)`` on the series' own grid (0 = background,
        ``i + 1`` = ``card.structures[i]``), from sliding windows over all slices.

        ``timings``, when given, accumulates the network's seconds under ``"model"`` and the
        rest (tiling, scaling, resizing back) under ``"preprocess"``.
        """
        if self.segmenter is None:
            raise ValueError(f"model {self.card.name!r} has no segmenter")
        self.segmenter.eval()
        segmenter = self.segmenter
        model_seconds = 0.0

        def predict(x: np.ndarray) -> torch.Tensor:
            nonlocal model_seconds
            t = time.perf_counter()
            with autocast(self.device):
                logits = segmenter(torch.from_numpy(x)[None].to(self.device))
            out = logits[0].float()  # stays on the device; segment_series averages and labels it there
            if out.is_cuda:
                torch.cuda.synchronize(out.device)  # the forward pass's time counts as model time
            model_seconds += time.perf_counter() - t
            return out

        started = time.perf_counter()
        labels = segment_series(predict, volume, self.preprocess, stride)
        if timings is not None:
            timings["model"] = timings.get("model", 0.0) + model_seconds
            timings["preprocess"] = timings.get("preprocess", 0.0) + time.perf_counter() - started - model_seconds
        return labels

    @property
    def ehr_features(self) -> tuple[str, ...]:
        return EHR_FEATURES


def _read_payload(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's top-level mapping, checked for its format, ``card`` and ``state``."""
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint {str(path)!r} does not exist or is not a file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not an orthonode checkpoint (not a PyTorch zip archive; truncated or foreign file)"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: not an orthonode checkpoint: it holds Python objects that a weights-only load refuses "
            "(orthonode checkpoints hold only tensors and plain data)"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {first})") from err
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{path}: not an orthonode checkpoint (no 'format' entry)")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format']!r} is not supported; this version reads "
            f"{CHECKPOINT_FORMAT!r}"
        )
    for key in ("card", "state"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"{path}: the checkpoint has no {key!r} mapping")
    return payload


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's state: every entry's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """The model card of a checkpoint without building its networks (the tensors stay on disk,
    memory-mapped); raises like :meth:`ModelBundle.load` for a missing, foreign or corrupt file."""
    path = Path(path)
    payload = _read_payload(path, mmap=True)
    try:
        return ModelCard.from_dict(payload["card"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid model card: {err}") from None


def _plain(value: Any, where: str) -> Any:
    """Convert ``value`` to plain str/int/float/bool/None/list/dict, or name what cannot be."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is not a string")
            out[str(key)] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    raise ValueError(f"{where}: a {type(value).__name__} cannot be stored in a model card")


def _load_state(net: torch.nn.Module, state: Any, path: Path, what: str) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: state[{what!r}] is not a state dict")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"{path}: the {what} weights do not match the card's model configuration ({first})"
        ) from None


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
