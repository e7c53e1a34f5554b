"""The training step every trainer takes, and the epoch loop of the fine-tuning trainers.

:func:`train_step` is one optimizer step: the forward pass under autocast, the loss, a check
of it, ``zero_grad``, ``backward``, optional gradient clipping, ``optimizer.step`` and an
optional scheduler step, always in that order.  Pretraining (:func:`training.pretrain.pretrain`,
step-based and resumable), the classifier and the segmenter fine-tuning
(:func:`training.finetune.finetune_classifier`, :func:`training.finetune.finetune_segmenter`)
all take their steps through it; the two fine-tunings also share :func:`train_epochs`, their
epoch loop with per-epoch history and validation.  Neither draws random numbers of its own,
so a run takes the same steps on the same batches as when each trainer had its own loop.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from inference.checkpoint import autocast

__all__ = ["progress", "train_epochs", "train_step"]


def progress(iterable: Iterable[Any], enabled: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    """``iterable`` under a tqdm bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def train_step(
    forward: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    amp: bool,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    check: Callable[[torch.Tensor], None] | None = None,
    clip: tuple[nn.Module, float] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> torch.Tensor:
    """One optimizer step; returns the loss (still attached to the graph).

    ``forward()`` runs under :func:`inference.checkpoint.autocast` (``amp``, training mode) and
    gives the loss itself or, with ``loss_fn``, the output that ``loss_fn`` turns into the loss
    outside autocast.  ``check(loss)`` may raise before any gradient is taken; ``clip`` is
    ``(module, max_norm)`` for ``clip_grad_norm_`` over the module's parameters.
    """
    with autocast(device, amp, training=True):
        out = forward()
    loss = out if loss_fn is None else loss_fn(out)
    if check is not None:
        check(loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        module, max_norm = clip
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss


def train_epochs(
    model: nn.Module,
    loader: Iterable[Any],
    step: Callable[[Any], torch.Tensor],
    *,
    epochs: int,
    total: int,
    task: str,
    log: logging.Logger,
    show_progress: bool = True,
    validate: Callable[[], Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """``epochs`` passes over ``loader``, ``step(batch)`` (a :func:`train_step`) per batch until
    ``total`` steps are taken; one history row per epoch (``epoch``, ``steps``, mean
    ``train_loss``, and what ``validate()`` returns, evaluated after the epoch)."""
    history: list[dict[str, Any]] = []
    taken = 0
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for batch in progress(loader, show_progress, f"{task} epoch {epoch}/{epochs}"):
            if taken >= total:
                break
            loss = step(batch)
            taken += 1
            losses.append(float(loss.detach()))
        row: dict[str, Any] = {"epoch": epoch, "steps": taken, "train_loss": float(np.mean(losses))}
        if validate is not None:
            row.update(validate())
        history.append(row)
        log.info("%s epoch %d: %s", task, epoch, row)
    return history
