"""The shared training step and epoch loop (training/loop.py)."""
from __future__ import annotations

import logging

import pytest
import torch

from training.loop import train_epochs, train_step

CPU = torch.device("cpu")


def _model_and_optimizer() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_a_step_is_zero_grad_backward_clip_step_schedule() -> None:
    model, optimizer = _model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    x = torch.ones(4, 3) * 100.0
    before = model.weight.detach().clone()
    loss = train_step(lambda: model(x), optimizer, device=CPU, amp=True, loss_fn=lambda out: out.pow(2).mean(),
                      clip=(model, 1e-3), scheduler=scheduler)
    assert loss.requires_grad
    grad_norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert float(grad_norm) == pytest.approx(1e-3, rel=1e-4)  # clipped before the step
    # SGD at lr 0.1 moves each weight by at most lr x clipped norm
    assert float((model.weight.detach() - before).abs().max()) <= 0.1 * 1e-3 * 1.001
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # the scheduler stepped once


def test_a_failed_check_leaves_the_weights_alone() -> None:
    model, optimizer = _model_and_optimizer()
    before = model.weight.detach().clone()

    def refuse(loss: torch.Tensor) -> None:
        raise FloatingPointError("no")

    with pytest.raises(FloatingPointError):
        train_step(lambda: model(torch.ones(2, 3)).sum(), optimizer, device=CPU, amp=False, check=refuse)
    assert model.weight.grad is None and torch.equal(model.weight.detach(), before)


def test_epochs_stop_at_the_total_and_keep_one_row_each() -> None:
    model, optimizer = _model_and_optimizer()
    batches = [torch.full((2, 3), float(i)) for i in range(3)]
    seen: list[float] = []

    def step(batch: torch.Tensor) -> torch.Tensor:
        seen.append(float(batch[0, 0]))
        return train_step(lambda: model(batch).pow(2).mean(), optimizer, device=CPU, amp=False)

    history = train_epochs(model, batches, step, epochs=2, total=4, task="test", log=logging.getLogger("test"),
                           show_progress=False, validate=lambda: {"val": 1.0})
    assert seen == [0.0, 1.0, 2.0, 0.0]
    assert [(row["epoch"], row["steps"], row["val"]) for row in history] == [(1, 3, 1.0), (2, 4, 1.0)]
    assert all(isinstance(row["train_loss"], float) for row in history)
