"""Unlabeled DDPM pretraining of one plane's diffusion backbone.

The objective is the backbone's own ``training_loss`` (epsilon prediction, L2, uniformly
drawn timestep on the cosine schedule); this module owns everything around it: the data
order, the optimizer, the EMA of the weights, mixed precision, DistributedDataParallel,
checkpoints that can be resumed bit-for-bit, and the run folder::

    RUN/
      pretrain.json          manifest: plane, configuration, learning rate, world size, data fingerprint
      checkpoints/step_0000100.pt ...   model, EMA, optimizer, step, RNG states, configuration
      ema_backbone.pt        the EMA weights alone, what fine-tuning loads
      log.csv                step, loss (mean over ranks), lr, seconds
      loss.png               the loss curve

Resuming reproduces the uninterrupted run: the data order is a function of (seed, epoch)
through ``DistributedSampler``, batches already consumed in the interrupted epoch are
skipped by index, and the noise generator of every rank is saved with the checkpoint.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from training.config import TrainConfig
from training.distributed import DistContext, barrier, init_distributed, mean_across_ranks, unwrap
from training.loop import train_step

log = logging.getLogger(__name__)

MANIFEST = "pretrain.json"
EMA_FILE = "ema_backbone.pt"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 1


class ExponentialMovingAverage:
    """EMA of a module's floating-point state, updated every ``every`` optimizer steps.

    ``update(model, step)`` applies ``shadow = decay * shadow + (1 - decay) * weight`` only
    when ``step`` is a multiple of ``every`` (the reference updates every 10 steps with decay
    0.995); integer buffers are copied.  The shadow starts as a copy of the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float, every: int) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.decay = decay
        self.every = every
        self.shadow: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Fold the current weights in when ``step % every == 0``; returns whether it did."""
        if step % self.every != 0:
            return False
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.mul_(self.decay).add_(value.detach().to(shadow.dtype), alpha=1.0 - self.decay)
            else:
                shadow.copy_(value)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (for export or evaluation)."""
        model.load_state_dict(self.shadow)


class _LossModule(nn.Module):
    """Makes ``training_loss`` the ``forward`` so DistributedDataParallel synchronises its gradients."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.backbone.training_loss(x, generator=generator)


@dataclass
class PretrainResult:
    """What a run did: the per-step losses of this invocation and where its outputs are."""

    run_dir: Path
    plane: str
    start_step: int
    final_step: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    ema_path: Path | None = None
    backbone: nn.Module | None = None  # the trained network (not the EMA), unwrapped from DDP


# --------------------------------------------------------------------------- checkpoints


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(folder.glob("step_*.pt"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_generator_states(gen: torch.Generator, ctx: DistContext) -> list[torch.Tensor]:
    """Noise-generator state of every rank (rank order), so each rank resumes its own stream."""
    state = gen.get_state()
    if not ctx.distributed:
        return [state]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a pretraining checkpoint on the CPU and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretraining checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("kind") != "pretrain":
        raise ValueError(f"{path} is not an orthonode pretraining checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def _diff_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# --------------------------------------------------------------------------- pretrained weights


@dataclass(frozen=True)
class PretrainedBackbone:
    """EMA weights of one plane's backbone and the architecture they belong to."""

    plane: str
    state_dict: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    step: int
    source: Path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _normalise(value: Any) -> Any:
    """JSON round trip, so tuples and lists compare equal between a config and its stored copy."""
    return json.loads(json.dumps(value, default=_json_default))


def load_pretrained_backbone(run_dir: Path) -> PretrainedBackbone:
    """EMA weights of a pretraining run (``ema_backbone.pt``, else its latest checkpoint)."""
    run_dir = Path(run_dir)
    ema_file = run_dir / EMA_FILE
    if ema_file.is_file():
        data = torch.load(ema_file, map_location="cpu", weights_only=False)
        return PretrainedBackbone(data["plane"], data["state_dict"], data["model_config"], int(data["step"]), ema_file)
    last = latest_checkpoint(run_dir)
    if last is None:
        raise FileNotFoundError(f"{run_dir} holds no {EMA_FILE} and no checkpoint: not a pretraining run")
    ckpt = load_checkpoint(last)
    return PretrainedBackbone(ckpt["plane"], ckpt["ema"], ckpt["model_config"], int(ckpt["step"]), last)


def find_pretrained_runs(path: Path) -> dict[str, Path]:
    """Map plane -> run folder for ``path`` = one run folder or a folder of run folders."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--pretrained {path} is not a folder")

    def plane_of(run: Path) -> str | None:
        manifest = run / MANIFEST
        if manifest.is_file():
            return str(json.loads(manifest.read_text())["plane"])
        if (run / EMA_FILE).is_file():
            return str(torch.load(run / EMA_FILE, map_location="cpu", weights_only=False)["plane"])
        return None

    own = plane_of(path)
    if own is not None:
        return {own: path}
    runs: dict[str, Path] = {}
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        plane = plane_of(child)
        if plane is None:
            continue
        if plane in runs:
            raise ValueError(f"--pretrained {path}: two runs for plane {plane!r}: {runs[plane]} and {child}")
        runs[plane] = child
    if not runs:
        raise FileNotFoundError(f"--pretrained {path}: no pretraining run ({MANIFEST}) in it or in its sub-folders")
    return runs


# --------------------------------------------------------------------------- data order


def _batch_tensor(batch: Any) -> torch.Tensor:
    image = batch["image"] if isinstance(batch, dict) else batch
    if hasattr(image, "as_tensor"):  # MONAI MetaTensor -> plain tensor (no metadata tracking in the loop)
        image = image.as_tensor()
    return torch.as_tensor(image)


class _EpochBatches:
    """Deterministic batches for (epoch, skip): a ``DistributedSampler`` order, batched here."""

    def __init__(self, dataset: Dataset, batch_size: int, ctx: DistContext, seed: int, num_workers: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=False
        )
        per_rank = len(self.sampler)
        if per_rank == 0:
            raise ValueError("the pretraining dataset is empty")
        # full batches only, unless the data cannot fill one batch per rank
        self.drop_last = per_rank >= batch_size
        self.per_epoch = per_rank // batch_size if self.drop_last else 1
        self.num_workers = num_workers
        self.seed = seed

    def epoch(self, epoch: int, skip: int) -> Iterator[torch.Tensor]:
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)[skip * self.batch_size:]
        # a private generator keeps the DataLoader from drawing on the global RNG
        gen = torch.Generator().manual_seed(self.seed + epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=indices,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            generator=gen,
            persistent_workers=False,
        )
        for batch in loader:
            yield _batch_tensor(batch)


# --------------------------------------------------------------------------- logging


def _write_log(run_dir: Path, rows: Sequence[tuple[int, float, float, float]]) -> None:
    path = run_dir / "log.csv"
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "loss", "lr", "seconds"])
        for step, loss, lr, secs in rows:
            writer.writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{secs:.3f}"])
    os.replace(tmp, path)


def read_log(run_dir: Path) -> list[tuple[int, float, float, float]]:
    """Rows of a run's ``log.csv`` (step, loss, lr, seconds); empty when there is none."""
    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"]), float(r["seconds"])) for r in csv.DictReader(fh)]


def plot_loss(rows: Sequence[tuple[int, float, float, float]], path: Path, title: str) -> None:
    """Loss per step with a moving average (the per-step loss is noisy: t is drawn at random)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r[0] for r in rows])
    losses = np.array([r[1] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="loss")
    if len(losses) >= 5:
        win = max(5, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(win) / win, mode="valid")
        ax.plot(steps[win - 1:], smooth, lw=1.5, label=f"moving mean ({win})")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the loop


def pretrain(
    cfg: TrainConfig,
    dataset: Dataset,
    plane: str,
    run_dir: Path,
    *,
    resume: bool = False,
    steps: int | None = None,
    ctx: DistContext | None = None,
    progress: bool = True,
    data_fingerprint: str | None = None,
) -> PretrainResult:
    """Train one plane's backbone on ``dataset`` (items ``{"image": (1, D, H, W)}``).

    ``steps`` overrides ``cfg.pretrain.steps`` (the total, counted from step 0 of the run).
    Without ``resume`` an existing run folder with checkpoints is refused rather than
    overwritten; with ``resume`` the latest checkpoint is continued (a fresh start when
    there is none yet).
    """
    from inference.labels import PLANES
    from inference.model import DiffusionBackbone

    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    if steps is not None:
        cfg = cfg.with_overrides(pretrain={"steps": steps})
    pcfg = cfg.pretrain
    ctx = ctx or init_distributed()
    run_dir = Path(run_dir)
    model_cfg = cfg.model_cfg()
    model_cfg_dict = _normalise(model_cfg.to_dict())

    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints ({existing.name}); pass --resume or choose another --out")

    torch.manual_seed(pcfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    backbone = DiffusionBackbone(model_cfg).to(ctx.device)
    lr = pcfg.lr(ctx.world_size)
    optimizer = torch.optim.Adam(backbone.parameters(), lr=lr, betas=pcfg.betas, weight_decay=pcfg.weight_decay)
    ema = ExponentialMovingAverage(backbone, pcfg.ema_decay, pcfg.ema_every)
    noise_gen = torch.Generator(device=ctx.device).manual_seed(pcfg.seed * 1009 + ctx.rank + 1)

    start_step = 0
    if resume and existing is not None:
        ckpt = load_checkpoint(existing)
        if ckpt["plane"] != plane:
            raise ValueError(f"--resume: {run_dir} pretrains plane {ckpt['plane']!r}, not {plane!r}")
        stored = _normalise(ckpt["model_config"])
        if stored != model_cfg_dict:
            raise ValueError(
                f"--resume: the model configuration differs from the one in {existing} "
                f"(keys {_diff_keys(stored, model_cfg_dict)})"
            )
        backbone.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # a resumed run may use another world size
            group["lr"] = lr
        start_step = int(ckpt["step"])
        _set_rng_state(ckpt["rng"], ctx.device)
        noise_states = ckpt["rng"]["noise"]
        if len(noise_states) == ctx.world_size:
            noise_gen.set_state(noise_states[ctx.rank])
        else:
            log.warning(
                "resuming with %d processes instead of %d: noise streams are re-seeded, the loss "
                "trajectory will differ from an uninterrupted run", ctx.world_size, len(noise_states)
            )
            noise_gen.manual_seed(pcfg.seed * 1009 + ctx.rank + 1 + start_step)
        log.info("resumed %s from step %d", run_dir, start_step)

    rows = [r for r in read_log(run_dir) if r[0] <= start_step] if start_step else []
    total = pcfg.steps
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = {
            "plane": plane,
            "config": cfg.to_dict(),
            "config_source": cfg.source,
            "model_config": model_cfg_dict,
            "lr": lr,
            "world_size": ctx.world_size,
            "data_fingerprint": data_fingerprint,
            "dataset_size": len(dataset),
            "target_steps": total,
        }
        (run_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
    result = PretrainResult(run_dir, plane, start_step, start_step, backbone=backbone)
    if start_step >= total:
        log.info("%s is already at step %d >= %d: nothing to do", run_dir, start_step, total)
        if ctx.is_main:
            result.ema_path = _export_ema(run_dir, plane, ema, model_cfg_dict, start_step)
        return result

    module: nn.Module = _LossModule(backbone)
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    batches = _EpochBatches(dataset, pcfg.batch_size, ctx, pcfg.seed, pcfg.num_workers)
    use_amp = pcfg.amp and ctx.device.type == "cuda"

    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_step, desc=f"pretrain {plane}", unit="step", dynamic_ncols=True)
    t0 = time.monotonic() - (rows[-1][3] if rows else 0.0)
    step = start_step
    epoch, skip = divmod(step, batches.per_epoch)
    iterator = batches.epoch(epoch, skip)
    module.train()
    try:
        while step < total:
            try:
                x = next(iterator)
            except StopIteration:
                epoch += 1
                iterator = batches.epoch(epoch, 0)
                continue
            x = x.to(ctx.device, non_blocking=True)
            loss = train_step(
                lambda: module(x, noise_gen), optimizer, device=ctx.device, amp=use_amp, check=_finite(step + 1),
                clip=(backbone, pcfg.grad_clip) if pcfg.grad_clip is not None else None,
            )
            step += 1
            ema.update(backbone, step)
            value = float(mean_across_ranks(loss.float(), ctx))
            rows.append((step, value, lr, time.monotonic() - t0))
            result.losses.append((step, value))
            if bar is not None:
                bar.update(1)
                if step % pcfg.log_every == 0:
                    bar.set_postfix(loss=f"{value:.4f}")
            elif ctx.is_main and step % pcfg.log_every == 0:
                log.info("pretrain %s step %d/%d loss %.4f (%.1f s)", plane, step, total, value, rows[-1][3])
            if step % pcfg.checkpoint_every == 0 or step == total:
                _save_checkpoint(run_dir, step, plane, backbone, ema, optimizer, noise_gen, cfg, model_cfg_dict, ctx)
                if ctx.is_main:
                    _write_log(run_dir, rows)
    finally:
        if bar is not None:
            bar.close()
    result.final_step = step
    if ctx.is_main:
        _write_log(run_dir, rows)
        plot_loss(rows, run_dir / "loss.png", f"DDPM pretraining, {plane}")
        result.ema_path = _export_ema(run_dir, plane, ema, model_cfg_dict, step)
    barrier(ctx)
    return result


def _finite(step: int) -> Callable[[torch.Tensor], None]:
    """The check of step ``step``'s loss: a non-finite one stops the run before it reaches the weights."""

    def check(loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}; lower base_lr")

    return check


def _save_checkpoint(
    run_dir: Path,
    step: int,
    plane: str,
    backbone: nn.Module,
    ema: ExponentialMovingAverage,
    optimizer: torch.optim.Optimizer,
    noise_gen: torch.Generator,
    cfg: TrainConfig,
    model_cfg_dict: dict[str, Any],
    ctx: DistContext,
) -> None:
    noise_states = _gather_generator_states(noise_gen, ctx)  # collective: every rank takes part
    if ctx.is_main:
        rng = _rng_state(ctx.device)
        rng["noise"] = noise_states
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "kind": "pretrain",
            "plane": plane,
            "step": step,
            "model": {k: v.detach().cpu() for k, v in unwrap(backbone).state_dict().items()},
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng,
            "config": cfg.to_dict(),
            "model_config": model_cfg_dict,
            "world_size": ctx.world_size,
        }
        _atomic_save(ckpt, checkpoint_path(run_dir, step))
        keep = cfg.pretrain.keep_checkpoints
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink()
    barrier(ctx)


def _export_ema(run_dir: Path, plane: str, ema: ExponentialMovingAverage, model_cfg_dict: dict[str, Any], step: int) -> Path:
    path = run_dir / EMA_FILE
    _atomic_save(
        {"plane": plane, "state_dict": ema.state_dict(), "model_config": model_cfg_dict, "step": step},
        path,
    )
    return path


def preprocess_config(cfg: TrainConfig) -> Any:
    """The preprocessing every dataset of this configuration uses: the model's input shape."""
    from inference.preprocess import PreprocessConfig

    depth, height, width = cfg.model_cfg().input_shape
    return PreprocessConfig(depth=depth, size=(height, width))


def cache_kwargs(cfg: TrainConfig, run_dir: Path | None) -> dict[str, Any]:
    """Dataset caching options of ``cfg.data`` (a disk cache defaults to ``RUN/cache``)."""
    if cfg.data.cache == "disk":
        base = Path(cfg.data.cache_dir) if cfg.data.cache_dir else (Path(run_dir) / "cache" if run_dir else None)
        if base is None:
            raise ValueError("data.cache is 'disk' but neither data.cache_dir nor a run folder is given")
        return {"cache": "disk", "cache_dir": base}
    return {"cache": None if cfg.data.cache == "none" else cfg.data.cache}
