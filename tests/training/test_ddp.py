"""DistributedDataParallel pretraining with two CPU processes on the gloo backend."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from training.config import load_config
    from training.distributed import init_distributed, shutdown
    from training.pretrain import pretrain

    ctx = init_distributed("cpu")  # creates the gloo group from the torchrun-style environment
    assert ctx.backend == "gloo" and ctx.world_size == world and ctx.rank == rank
    cfg = load_config("tiny").with_overrides(pretrain={"steps": 3, "batch_size": 1, "checkpoint_every": 3, "base_lr": 1e-3})
    gen = torch.Generator().manual_seed(7)
    data = [{"image": torch.rand(1, 8, 32, 32, generator=gen) * 2 - 1} for _ in range(4)]
    torch.manual_seed(100 + rank)  # ranks must not depend on their own global seed for the initial weights
    result = pretrain(cfg, data, "sagittal", Path(out) / "run", ctx=ctx, progress=False)
    weights = {k: v.detach().clone() for k, v in result.backbone.state_dict().items()}
    torch.save({"losses": result.losses, "lr": cfg.pretrain.lr(world), "weights": weights}, Path(out) / f"rank{rank}.pt")
    from training.pretrain import latest_checkpoint

    dist.barrier()
    if rank == 0:
        assert latest_checkpoint(Path(out) / "run") is not None
    shutdown(ctx)


def _rank_state(tmp: Path, rank: int) -> dict:
    return torch.load(tmp / f"rank{rank}.pt", weights_only=False)


def test_two_gloo_processes_keep_identical_weights(tmp_path: Path) -> None:
    port = _free_port()
    # fork: the children inherit the imported modules (a spawn re-imports torch and MONAI per process)
    import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: seconds per child otherwise)

    import inference.model  # noqa: F401  (MONAI)
    import training.pretrain  # noqa: F401

    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = _rank_state(tmp_path, 0), _rank_state(tmp_path, 1)
    assert [s for s, _ in r0["losses"]] == [1, 2, 3]
    # the logged loss is the mean over ranks: both ranks report the same numbers
    assert r0["losses"] == r1["losses"]
    assert r0["lr"] == 1e-3 * 1 * 2  # base lr x batch x world size
    # gradients were averaged: both ranks hold the same weights, and they moved from the start
    for name, value in r0["weights"].items():
        torch.testing.assert_close(value, r1["weights"][name], rtol=0, atol=0)
    from inference.model import DiffusionBackbone
    from training.config import load_config

    torch.manual_seed(0)  # the seed pretrain() builds the model with (pretrain.seed)
    initial = DiffusionBackbone(load_config("tiny").model_cfg()).state_dict()
    moved = [n for n, v in initial.items() if v.is_floating_point() and not torch.equal(v, r0["weights"][n])]
    assert len(moved) > len(initial) // 2

    from training.pretrain import latest_checkpoint, load_checkpoint

    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3
    assert len(ckpt["rng"]["noise"]) == 2  # one noise stream per rank, for resuming
    assert not torch.equal(ckpt["rng"]["noise"][0], ckpt["rng"]["noise"][1])
