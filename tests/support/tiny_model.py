"""The one tiny trained knee model of a test run, and the phantom matrix the tests use.

Trained with the trainer's own functions (tiny configuration, 8 x 32 x 32 inputs) on four
phantom knees: a sagittal segmenter over every slice window, long enough for the large bones
to be found, and a fused three-plane classifier with EHR fusion (one epoch: its probabilities
are real, not meant to be good).  The node tests check plumbing with it, the pipeline tests
what it says; test studies are other phantom seeds, so a Dice a test states is measured on
studies the segmenter never saw.  :func:`tests.support.fixtures.tiny_checkpoint` builds it
once per run.
"""
from __future__ import annotations

from pathlib import Path

#: phantom matrix of the tests; the tiny model sees 32 x 32, so 64 keeps studies small and realistic enough
MATRIX = 64
TRAIN_CASES = 4
TRAIN_SEED = 11
#: segmenter training: epochs over all sagittal windows of the training cases
SEG_EPOCHS = 50
NAME, VERSION = "test-knee", "0.1-test"
#: phantom seed of the studies the pipeline tests run the model on (not a training seed)
TEST_SEED = 5


def build_tiny_checkpoint(root: Path) -> Path:
    """Train the tiny knee bundle into ``root/model.pt``; returns that path."""
    import torch

    from training.config import load_config
    from training.datasets import read_source
    from training.finetune import finetune_classifier, finetune_segmenter, make_bundle
    from training.phantoms.generate import generate_dataset

    generate_dataset(root / "knee", "knee", TRAIN_CASES, seed=TRAIN_SEED, matrix=MATRIX)
    records = read_source(f"phantom:{root / 'knee'}")
    # From scratch the backbone must learn too (factor 1); CE at full weight finds the large
    # bones within a few hundred steps where the Dice term alone is still flat.
    cfg = load_config("tiny").with_overrides(
        segment={"epochs": SEG_EPOCHS, "batch_size": 4, "lr": 1e-2, "backbone_lr_factor": 1.0, "ce_weight": 1.0},
        classify={"epochs": 1},
    )
    torch.manual_seed(0)
    seg = finetune_segmenter(
        cfg, records, plane="sagittal", pretrained=None, from_scratch=True, seed=0, progress=False,
        dataset_options={"windows": "all"},
    )
    cls = finetune_classifier(
        cfg, records, ["sagittal", "coronal", "axial"], use_ehr=True, pretrained=None, from_scratch=True, seed=0,
        progress=False,
    )
    bundle = make_bundle(cfg, classifier=cls, segmenter=seg, name=NAME, version=VERSION)
    path = root / "model.pt"
    bundle.save(path)
    return path
