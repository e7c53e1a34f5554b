"""DDPM pretraining: the loss falls, the EMA follows its schedule, and a resumed run is the same run."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training.config import load_config
from training.distributed import DistContext
from training.pretrain import (
    EMA_FILE,
    ExponentialMovingAverage,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_pretrained_backbone,
    pretrain,
)


SHAPE = (8, 16, 16)  # the tiny preset at half its in-plane size: still three 2x downsamplings


def _volumes(n: int, shape: tuple[int, int, int] = SHAPE) -> list[dict[str, torch.Tensor]]:
    """Smooth blobs in [-1, 1]: structure a denoiser can learn quickly."""
    d, h, w = shape
    z, y, x = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    items = []
    for i in range(n):
        r = np.sqrt(z**2 + (y - 0.2 * i) ** 2 + x**2)
        vol = np.where(r < 0.6, 0.8, -0.8) + 0.1 * x
        items.append({"image": torch.tensor(vol[None], dtype=torch.float32)})
    return items


def _cfg(**pretrain):
    return load_config("tiny").with_overrides(pretrain=pretrain, model={"input_shape": list(SHAPE)})


CPU = DistContext()


def test_loss_decreases_on_a_fixed_batch(tmp_path: Path) -> None:
    cfg = _cfg(steps=20, batch_size=2, base_lr=1e-3, checkpoint_every=20)
    result = pretrain(cfg, _volumes(2), "sagittal", tmp_path / "run", ctx=CPU, progress=False)
    losses = np.array([loss for _, loss in result.losses])
    assert len(losses) == 20 and np.isfinite(losses).all()
    # epsilon-MSE starts near 1 (an untrained UNet predicts ~0); t is random, so compare means
    assert losses[-6:].mean() < 0.6 * losses[:5].mean(), losses


def test_ema_updates_every_n_steps_with_its_decay() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = ExponentialMovingAverage(model, decay=0.9, every=10)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 26):
        with torch.no_grad():
            model.weight.add_(1.0)  # an "optimizer step"
        updated = ema.update(model, step)
        assert updated == (step % 10 == 0)
        if updated:
            expected = {k: 0.9 * expected[k] + 0.1 * v for k, v in model.state_dict().items()}
        for k in expected:
            torch.testing.assert_close(ema.shadow[k], expected[k])
    # after 25 steps only steps 10 and 20 were folded in: the shadow lags the weights
    assert (ema.shadow["weight"] < model.weight).all()
    with pytest.raises(ValueError, match="decay"):
        ExponentialMovingAverage(model, decay=1.0, every=10)


def test_paper_configuration_uses_the_reference_schedule() -> None:
    cfg = load_config("paper")
    assert (cfg.pretrain.ema_decay, cfg.pretrain.ema_every, cfg.pretrain.batch_size) == (0.995, 10, 10)
    assert cfg.pretrain.lr(world_size=1) == pytest.approx(1e-4)
    assert cfg.pretrain.lr(world_size=4) == pytest.approx(4e-4)
    model = cfg.model_cfg()
    assert model.input_shape == (16, 256, 256) and model.channels == (64, 64, 128, 128, 256)


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    cfg = _cfg(steps=7, batch_size=2, base_lr=1e-3, checkpoint_every=3, ema_every=2, ema_decay=0.5)
    data = _volumes(5)  # 2 batches per epoch: the resume point falls inside an epoch
    full = pretrain(cfg, data, "coronal", tmp_path / "full", ctx=CPU, progress=False)

    part = pretrain(cfg, data, "coronal", tmp_path / "split", steps=4, ctx=CPU, progress=False)
    assert part.final_step == 4
    rest = pretrain(cfg, data, "coronal", tmp_path / "split", resume=True, ctx=CPU, progress=False)
    assert rest.start_step == 4 and rest.final_step == 7
    assert [s for s, _ in part.losses + rest.losses] == list(range(1, 8))
    np.testing.assert_allclose([v for _, v in part.losses + rest.losses], [v for _, v in full.losses], rtol=1e-6)

    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert a["step"] == b["step"] == 7
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-6, atol=1e-7)
    assert {"model", "ema", "optimizer", "step", "rng", "config", "model_config", "plane"} <= set(a)
    assert a["config"]["pretrain"]["ema_every"] == 2

    # the log continues the interrupted one, the plot and the EMA export exist
    with (tmp_path / "split" / "log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    assert (tmp_path / "split" / "loss.png").stat().st_size > 0
    exported = load_pretrained_backbone(tmp_path / "split")
    assert exported.plane == "coronal" and exported.step == 7 and exported.source.name == EMA_FILE
    for name, value in exported.state_dict.items():
        torch.testing.assert_close(value, b["ema"][name])
    # checkpoints every 3 steps and at the end, two kept
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_0000006.pt", "step_0000007.pt"]


def test_existing_run_is_not_overwritten_and_resume_checks_the_architecture(tmp_path: Path) -> None:
    cfg = _cfg(steps=2, batch_size=1, checkpoint_every=2)
    pretrain(cfg, _volumes(2), "axial", tmp_path / "run", ctx=CPU, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(cfg, _volumes(2), "axial", tmp_path / "run", ctx=CPU, progress=False)
    with pytest.raises(ValueError, match="plane 'axial'"):
        pretrain(cfg, _volumes(2), "sagittal", tmp_path / "run", resume=True, ctx=CPU, progress=False)
    wider = cfg.with_overrides(model={"channels": [8, 8, 16, 32], "input_shape": list(SHAPE)})
    with pytest.raises(ValueError, match="channels"):
        pretrain(wider, _volumes(2), "axial", tmp_path / "run", resume=True, ctx=CPU, progress=False)
