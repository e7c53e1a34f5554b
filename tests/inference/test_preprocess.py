"""The shared preprocessing path: slice choice, padding, resizing, scaling, windows."""
from __future__ import annotations

import numpy as np
import pytest

from inference.preprocess import (
    PreprocessConfig,
    central_slice_range,
    preprocess_mask,
    preprocess_volume,
    segment_series,
    slice_windows,
)

CFG = PreprocessConfig(depth=8, size=(32, 32))


def _ramp(slices: int, rows: int = 40, cols: int = 48) -> np.ndarray:
    """Each slice constant and equal to its index: the slice choice can be read off the output."""
    return np.broadcast_to(np.arange(slices, dtype=np.float32)[:, None, None], (slices, rows, cols)).copy()


def test_output_shape_dtype_and_range() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(300, 80, size=(21, 100, 90)).astype(np.int16)
    out = preprocess_volume(volume, CFG)
    assert out.shape == (1, 8, 32, 32) and out.dtype == np.float32
    assert out.min() == -1.0 and out.max() == 1.0


def test_constant_volume_gives_zeros_not_nan() -> None:
    out = preprocess_volume(np.full((10, 20, 20), 7.0), CFG)
    assert np.isfinite(out).all() and not out.any()


def test_central_slices_are_chosen() -> None:
    assert central_slice_range(20, 8) == (6, 14)
    assert central_slice_range(21, 8) == (6, 14)  # odd surplus: one more slice after the window
    assert central_slice_range(8, 8) == (0, 8)
    assert central_slice_range(5, 8) == (0, 5)
    out = preprocess_volume(_ramp(20), CFG)[0]
    # slices 6..13 scaled from [6, 13] to [-1, 1]
    expected = (np.arange(6, 14) - 6) / 7 * 2 - 1
    np.testing.assert_allclose(out[:, 0, 0], expected, atol=1e-6)


def test_short_series_is_padded_by_edge_replication() -> None:
    out = preprocess_volume(_ramp(5), CFG)[0]
    # 3 missing slices: 1 copy of slice 0 before, 2 copies of slice 4 after
    slices = (out[:, 0, 0] + 1) / 2 * 4
    np.testing.assert_allclose(slices, [0, 0, 1, 2, 3, 4, 4, 4], atol=1e-5)


def test_shrinking_is_anti_aliased() -> None:
    """A one-pixel checkerboard averages to flat grey when shrunk by 4, instead of aliasing."""
    rows, cols = np.indices((128, 128))
    board = ((rows + cols) % 2).astype(np.float32)
    volume = np.concatenate([np.stack([board] * 8), np.zeros((1, 128, 128)), np.full((1, 128, 128), 1.0)])
    out = preprocess_volume(volume, PreprocessConfig(depth=10, size=(32, 32)))[0]
    assert np.ptp(out[3, 2:-2, 2:-2]) < 0.05  # was 0/1 everywhere: now uniform
    assert abs(out[3, 16, 16]) < 0.05  # grey maps to the middle of [-1, 1]


def test_mask_follows_the_same_slices_with_nearest_labels() -> None:
    mask = np.zeros((20, 40, 40), dtype=np.uint8)
    mask[:, 10:30, 10:30] = np.arange(20, dtype=np.uint8)[:, None, None] % 12
    out = preprocess_mask(mask, PreprocessConfig(depth=8, size=(20, 20)))
    assert out.shape == (8, 20, 20) and out.dtype == np.int64
    assert set(np.unique(out)) <= set(np.unique(mask))  # no interpolated labels
    assert out[:, 10, 10].tolist() == [s % 12 for s in range(6, 14)]  # same central slices
    sparse = np.full((4, 40, 40), -1, dtype=np.int16)
    sparse[1, :20] = 3
    padded = preprocess_mask(sparse, CFG)
    assert set(np.unique(padded)) == {-1, 3}
    assert (padded[:3] == -1).all()  # 2 copies of the unannotated first slice, then the slice itself
    assert (padded[3, :16] == 3).all() and (padded[3, 16:] == -1).all()


def test_windows_cover_every_slice() -> None:
    for num_slices in (1, 7, 8, 9, 16, 23, 40):
        for stride in (None, 3, 8):
            windows = slice_windows(num_slices, 8, stride)
            covered = np.zeros(num_slices, dtype=int)
            for start, stop in windows:
                assert stop - start == min(8, num_slices)
                assert 0 <= start < stop <= num_slices
                covered[start:stop] += 1
            assert covered.min() >= 1
            if stride in (None, 8):  # no overlap except the last window aligned to the end
                assert covered.sum() == len(windows) * min(8, num_slices)
    assert slice_windows(23, 8) == [(0, 8), (8, 16), (15, 23)]
    with pytest.raises(ValueError, match="stride"):
        slice_windows(20, 8, 9)


def test_segment_series_returns_labels_on_the_source_grid() -> None:
    volume = _ramp(13, 50, 60)
    volume[:, :, 30:] += 100.0  # right half bright

    def predict(x: np.ndarray) -> np.ndarray:  # class 1 where the input is bright
        assert x.shape == (1, 8, 32, 32)
        return np.stack([np.zeros_like(x[0]), x[0]])

    labels = segment_series(predict, volume, CFG, stride=4)
    assert labels.shape == (13, 50, 60) and labels.dtype == np.uint8
    assert (labels[:, :, 33:] == 1).all() and (labels[:, :, :27] == 0).all()


def test_segment_series_is_the_argmax_of_the_resized_mean_logits_ties_to_the_first_class() -> None:
    """Labels equal torch.argmax over the averaged, resized logits, including exact ties."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    volume = rng.normal(size=(11, 40, 36)).astype(np.float32)
    windows: list[np.ndarray] = []

    def predict(x: np.ndarray) -> np.ndarray:
        logits = rng.normal(size=(5, *CFG.shape)).astype(np.float32)
        logits[3] = logits[1]  # class 3 ties class 1 everywhere: the first (1) must win
        logits[:, :, :4] = 0.0  # a band where every class ties: class 0 must win
        windows.append(logits)
        return logits

    labels = segment_series(predict, volume, CFG, stride=3)
    # logits given as tensors (the pipeline's, which stay on the model's device) give the same labels
    replay = iter(list(windows))
    assert np.array_equal(segment_series(lambda x: torch.from_numpy(next(replay)), volume, CFG, stride=3), labels)
    total = np.zeros((5, 11, *CFG.size), np.float32)
    counts = np.zeros(11, np.float32)
    for (start, stop), logits in zip(slice_windows(11, CFG.depth, 3), windows):
        before = (CFG.depth - (stop - start)) // 2 if stop - start < CFG.depth else 0
        total[:, start:stop] += logits[:, before : before + stop - start]
        counts[start:stop] += 1
    mean = torch.from_numpy(total / counts[None, :, None, None]).permute(1, 0, 2, 3)
    expected = F.interpolate(mean, size=(40, 36), mode="bilinear", align_corners=False).argmax(dim=1).numpy()
    assert np.array_equal(labels, expected.astype(np.uint8))
    assert not (labels == 3).any() and (labels[:, :4] == 0).all()


def test_invalid_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="volume"):
        preprocess_volume(np.zeros((20, 20)), CFG)
    with pytest.raises(ValueError, match="NaN"):
        preprocess_volume(np.full((4, 8, 8), np.nan), CFG)
    with pytest.raises(ValueError, match="integer"):
        preprocess_mask(np.zeros((4, 8, 8), dtype=np.float32), CFG)
    with pytest.raises(ValueError, match="depth"):
        PreprocessConfig(depth=0)
    with pytest.raises(ValueError, match="sise"):
        PreprocessConfig.from_dict({"sise": [2, 2]})
    assert PreprocessConfig.from_dict(CFG.to_dict()) == CFG
