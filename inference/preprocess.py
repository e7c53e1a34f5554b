"""The one preprocessing path from a series volume to a model input, used by training and serving.

A series volume is ``(S, R, C)``: S slices of R rows by C columns, slices in acquisition
order.  The model sees ``(1, depth, H, W)``:

1. **Slices**: the central ``depth`` slices (:func:`central_slice_range`).  A series with
   fewer slices is padded by repeating its first and last slices (edge replication, split as
   evenly as possible, the extra one after), so no artificial black slice is invented.
2. **In-plane size**: each slice is resized to ``size`` with bilinear interpolation
   (half-pixel centres); when shrinking, an anti-aliasing filter is applied first so that
   fine structures do not alias into moire.
3. **Intensity**: min-max scaling of the whole ``(depth, H, W)`` block to [-1, 1], as in the
   reference.  A constant block maps to 0 everywhere (never NaN).

Masks follow the same slice choice and padding, and are resized with nearest-neighbour
sampling at half-pixel centres, so label values (including -1 for "not annotated") survive.

For segmenting a whole series, :func:`slice_windows` tiles the slices with ``depth``-slice
windows and :func:`segment_series` averages overlapping logits and maps them back onto the
source grid.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "PreprocessConfig",
    "central_slice_range",
    "preprocess_mask",
    "preprocess_volume",
    "segment_series",
    "slice_windows",
]


@dataclass(frozen=True)
class PreprocessConfig:
    """Model input geometry: ``depth`` slices of ``size`` = (H, W) pixels."""

    depth: int = 16
    size: tuple[int, int] = (256, 256)

    def __post_init__(self) -> None:
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"PreprocessConfig.depth must be a positive int, got {self.depth!r}")
        if (
            not isinstance(self.size, tuple)
            or len(self.size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.size)
        ):
            raise ValueError(f"PreprocessConfig.size must be a pair of positive ints (H, W), got {self.size!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(depth, H, W): the spatial shape of a model input."""
        return (self.depth, *self.size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        if not isinstance(d, Mapping):
            raise TypeError(f"preprocess configuration must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {"depth", "size"})
        if unknown:
            raise ValueError(f"unknown preprocess configuration key(s) {unknown}; known keys are ['depth', 'size']")
        kwargs = dict(d)
        if "size" in kwargs:
            if not isinstance(kwargs["size"], (list, tuple)):
                raise ValueError(f"preprocess configuration key 'size' must be a list [H, W], got {kwargs['size']!r}")
            kwargs["size"] = tuple(kwargs["size"])
        return cls(**kwargs)


def central_slice_range(num_slices: int, depth: int) -> tuple[int, int]:
    """``(start, stop)`` of the central ``depth`` slices; ``(0, num_slices)`` when there are fewer.

    With an odd surplus the window sits one slice towards the start (``start = surplus // 2``).
    """
    _check_counts(num_slices, depth)
    if num_slices <= depth:
        return 0, num_slices
    start = (num_slices - depth) // 2
    return start, start + depth


def slice_windows(num_slices: int, depth: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Windows ``(start, stop)`` of ``depth`` slices that together cover every slice.

    Windows start every ``stride`` slices (default ``depth``: no overlap) and the last one is
    aligned to the final slice, so it may overlap its neighbour.  A series with fewer than
    ``depth`` slices gives one window ``(0, num_slices)``, to be padded like any input.
    """
    _check_counts(num_slices, depth)
    stride = depth if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= depth:
        raise ValueError(f"stride must be an int in [1, depth={depth}], got {stride!r}")
    if num_slices <= depth:
        return [(0, num_slices)]
    starts = list(range(0, num_slices - depth + 1, stride))
    if starts[-1] + depth < num_slices:
        starts.append(num_slices - depth)
    return [(s, s + depth) for s in starts]


def preprocess_volume(volume: np.ndarray, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """``(S, R, C)`` series -> float32 ``(1, depth, H, W)`` in [-1, 1] (see the module docstring)."""
    cfg = cfg or PreprocessConfig()
    block = _slab(_check_volume(volume, "volume"), cfg)
    resized = _resize(block.astype(np.float32, copy=False), cfg.size, nearest=False)
    return scale_to_unit_range(resized)[None]


def preprocess_mask(mask: np.ndarray, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """``(S, R, C)`` integer label map -> int64 ``(depth, H, W)``: same slices, nearest resizing."""
    cfg = cfg or PreprocessConfig()
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (slices, rows, columns), got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must hold integer labels, got dtype {mask.dtype}")
    block = _slab(mask, cfg)
    return _resize(block.astype(np.int64), cfg.size, nearest=True)


def scale_to_unit_range(block: np.ndarray) -> np.ndarray:
    """Min-max scale to [-1, 1]; a constant block becomes all zeros."""
    low, high = float(block.min()), float(block.max())
    if high <= low:
        return np.zeros_like(block, dtype=np.float32)
    out = (block - low) * np.float32(2.0 / (high - low)) - np.float32(1.0)
    return np.clip(out, -1.0, 1.0, out=out).astype(np.float32, copy=False)


def segment_series(
    predict_logits: Callable[[np.ndarray], Any],
    volume: np.ndarray,
    cfg: PreprocessConfig | None = None,
    stride: int | None = None,
) -> np.ndarray:
    """Label a whole series: uint8 ``(S, R, C)`` on the source grid.

    ``predict_logits`` maps one model input ``(1, depth, H, W)`` to logits
    ``(classes, depth, H, W)``, as a numpy array or a torch tensor.  The series is tiled with
    :func:`slice_windows`; each window is scaled like :func:`preprocess_volume` (its own
    min-max, as every training input is), logits of slices covered by several windows are
    averaged, resized bilinearly back to ``(R, C)``, and the arg-max is taken.  Logits given
    as a tensor stay on its device (a GPU) until the labels are taken: only the uint8 label
    map comes back to the host.
    """
    import torch
    import torch.nn.functional as F

    cfg = cfg or PreprocessConfig()
    volume = _check_volume(volume, "volume")
    num_slices, rows, cols = volume.shape
    total: torch.Tensor | None = None
    counts = torch.zeros(num_slices, dtype=torch.float32)
    for start, stop in slice_windows(num_slices, cfg.depth, stride):
        window = volume[start:stop]
        before, _ = _pad_amounts(stop - start, cfg.depth)
        x = scale_to_unit_range(_resize(_pad_edges(window, cfg.depth).astype(np.float32), cfg.size, False))[None]
        out = predict_logits(x)
        logits = out.float() if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out, dtype=np.float32))
        if logits.ndim != 4 or tuple(logits.shape[1:]) != cfg.shape:
            raise ValueError(f"predict_logits returned shape {tuple(logits.shape)}; expected (classes, {cfg.shape})")
        logits = logits[:, before : before + (stop - start)]
        if total is None:
            total = torch.zeros((logits.shape[0], num_slices, *cfg.size), dtype=torch.float32, device=logits.device)
        total[:, start:stop] += logits
        counts[start:stop] += 1.0
    assert total is not None  # slice_windows always yields at least one window
    mean = total / counts.to(total.device)[None, :, None, None]
    # (classes, S, H, W) -> resize each slice to (R, C): treat slices as the batch.
    source = F.interpolate(mean.permute(1, 0, 2, 3), size=(rows, cols), mode="bilinear", align_corners=False)
    # max(dim=1).indices is argmax with the same first-maximum tie rule, and several times faster
    # than Tensor.argmax over the strided class axis on the CPU (0.07 s against 0.36 s for 30
    # slices of 12 classes at 256x256)
    if source.shape[1] > 256:
        raise ValueError("segment_series: more than 256 classes do not fit uint8 labels")
    labels = source.max(dim=1).indices.to(torch.uint8)
    return labels.cpu().numpy()


# --------------------------------------------------------------------------- helpers


def _check_counts(num_slices: int, depth: int) -> None:
    if isinstance(num_slices, bool) or not isinstance(num_slices, (int, np.integer)) or num_slices < 1:
        raise ValueError(f"num_slices must be a positive int, got {num_slices!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")


def _check_volume(volume: np.ndarray, name: str) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 3 or 0 in volume.shape:
        raise ValueError(f"{name} must be a non-empty (slices, rows, columns) array, got shape {volume.shape}")
    if not (np.issubdtype(volume.dtype, np.number) or volume.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {volume.dtype}")
    if np.issubdtype(volume.dtype, np.floating) and not np.isfinite(volume).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return volume


def _pad_amounts(num_slices: int, depth: int) -> tuple[int, int]:
    missing = max(depth - num_slices, 0)
    return missing // 2, missing - missing // 2


def _pad_edges(block: np.ndarray, depth: int) -> np.ndarray:
    before, after = _pad_amounts(block.shape[0], depth)
    if before == after == 0:
        return block
    return np.pad(block, ((before, after), (0, 0), (0, 0)), mode="edge")


def _slab(volume: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    start, stop = central_slice_range(volume.shape[0], cfg.depth)
    return _pad_edges(volume[start:stop], cfg.depth)


def _resize(block: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize each slice of ``(S, R, C)`` to ``size``; bilinear with anti-aliasing, or nearest."""
    import torch
    import torch.nn.functional as F

    if block.shape[1:] == tuple(size):
        return np.ascontiguousarray(block)
    if nearest:
        # nearest-exact samples at half-pixel centres, the same geometry as bilinear below;
        # float64 holds every int64 label we use exactly.
        t = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float64))[:, None]
        out = F.interpolate(t, size=size, mode="nearest-exact")[:, 0]
        return out.round().to(torch.int64).numpy()
    t = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))[:, None]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)[:, 0]
    return out.numpy()
