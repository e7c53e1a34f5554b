"""Fine-tuning: pretrained vs scratch initialisation, layer-wise learning rates, losses, bundles."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.labels import NUM_SEG_CLASSES, label_keys
from tests.training.fixtures import make_phantom_like_folder
from training.config import load_config
from training.distributed import DistContext
from training.finetune import (
    build_classifier,
    classification_loss,
    finetune_classifier,
    finetune_segmenter,
    make_bundle,
    make_optimizer,
    param_groups,
    resolve_pretrained,
    segmentation_loss,
)
from training.pretrain import pretrain

PLANES = ("sagittal", "coronal", "axial")


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny pretraining runs (2 steps each) in one folder: RUN/<plane>/."""
    root = tmp_path_factory.mktemp("pretrained")
    cfg = load_config("tiny").with_overrides(pretrain={"steps": 2, "batch_size": 1, "checkpoint_every": 2, "ema_every": 1, "ema_decay": 0.5})
    gen = torch.Generator().manual_seed(3)
    data = [{"image": torch.rand(1, 8, 32, 32, generator=gen) * 2 - 1} for _ in range(2)]
    for i, plane in enumerate(PLANES):  # another seed per plane, as separate runs would have
        pretrain(cfg.with_overrides(pretrain={"seed": i}), data, plane, root / plane, ctx=DistContext(), progress=False)
    return root


@pytest.fixture(scope="module")
def knee_records(tmp_path_factory: pytest.TempPathFactory) -> list:
    from training.datasets import read_source

    root = tmp_path_factory.mktemp("knee")
    make_phantom_like_folder(root, n_cases=6, joint="knee")
    return read_source(f"phantom:{root}")


def _tiny(**sections):
    return load_config("tiny").with_overrides(**sections) if sections else load_config("tiny")


def _first_backbone_weight(model: torch.nn.Module, plane: str | None = None) -> tuple[str, torch.Tensor]:
    backbone = model.backbones[plane] if plane else model.backbone
    name, value = next((n, v) for n, v in backbone.state_dict().items() if n.endswith("conv_in.conv.weight"))
    return name, value


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("planes", [("sagittal",), PLANES])
def test_classifier_starts_from_the_pretrained_ema_weights(pretrained_dir: Path, planes: tuple[str, ...]) -> None:
    cfg = _tiny()
    backbones = resolve_pretrained(pretrained_dir, planes, from_scratch=False)
    model = build_classifier(cfg, planes, 8, use_ehr=False, pretrained=backbones)
    scratch = build_classifier(cfg, planes, 8, use_ehr=False, pretrained=resolve_pretrained(None, planes, True))
    for plane in planes:
        ema = torch.load(pretrained_dir / plane / "ema_backbone.pt", weights_only=False)["state_dict"]
        name, value = _first_backbone_weight(model, plane)
        torch.testing.assert_close(value, ema[name], rtol=0, atol=0)
        # every backbone tensor is the EMA one, and a scratch model differs from it
        for key, tensor in model.backbones[plane].state_dict().items():
            torch.testing.assert_close(tensor, ema[key], rtol=0, atol=0)
        assert not torch.equal(_first_backbone_weight(scratch, plane)[1], ema[name])
    # the sagittal run is not mixed up with the other planes
    if len(planes) == 3:
        assert not torch.equal(_first_backbone_weight(model, "sagittal")[1], _first_backbone_weight(model, "axial")[1])


def test_pretrained_options_are_checked(pretrained_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        resolve_pretrained(pretrained_dir, PLANES, from_scratch=True)
    with pytest.raises(ValueError, match="--from-scratch"):
        resolve_pretrained(None, PLANES, from_scratch=False)
    with pytest.raises(FileNotFoundError, match="no pretraining run"):
        resolve_pretrained(tmp_path, PLANES, from_scratch=False)
    # one run folder serves its own plane only
    assert list(resolve_pretrained(pretrained_dir / "coronal", ("coronal",), False)) == ["coronal"]
    with pytest.raises(FileNotFoundError, match=r"\['sagittal'\]"):
        resolve_pretrained(pretrained_dir / "coronal", ("sagittal",), False)
    wider = _tiny(model={"channels": [8, 8, 16, 32]})
    with pytest.raises(ValueError, match="channels"):
        build_classifier(wider, ("sagittal",), 8, False, resolve_pretrained(pretrained_dir, ("sagittal",), False))


def test_layerwise_learning_rates_and_cosine_schedule() -> None:
    cfg = _tiny()
    model = build_classifier(cfg, PLANES, 8, use_ehr=True, pretrained={})
    groups = param_groups(model, 5e-4, 0.05)
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert groups[0]["lr"] == pytest.approx(5e-4) and groups[1]["lr"] == pytest.approx(2.5e-5)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.head_parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.backbone_parameters()}
    ehr_gate = model.ehr.gate
    assert any(p is ehr_gate for p in groups[0]["params"])

    optimizer, scheduler = make_optimizer(model, 5e-4, 0.05, 0.0, "cosine", total_steps=10)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 2.5e-5])
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.5e-4, 1.25e-5])  # half-way: cos = 0
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0, 0.0], abs=1e-12)

    frozen = build_classifier(cfg, ("axial",), 8, use_ehr=False, pretrained={})
    only_head = param_groups(frozen, 1e-3, 0.0)
    assert [g["name"] for g in only_head] == ["head"]
    assert not any(p.requires_grad for p in frozen.backbone_parameters())


# ----------------------------------------------------------------------------- losses


def test_segmentation_loss_ignores_unannotated_voxels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, NUM_SEG_CLASSES, 4, 8, 8, requires_grad=True)
    none = torch.full((2, 4, 8, 8), -1, dtype=torch.long)
    loss = segmentation_loss(logits, none)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0

    target = torch.randint(0, NUM_SEG_CLASSES, (2, 4, 8, 8))
    sparse = target.clone()
    sparse[:, 1:3] = -1  # two unannotated slices per volume
    base = segmentation_loss(logits.detach(), sparse)
    changed = logits.detach().clone()
    changed[:, :, 1:3] = torch.randn_like(changed[:, :, 1:3]) * 10  # predictions there must not matter
    assert segmentation_loss(changed, sparse).item() == pytest.approx(base.item(), rel=1e-6)
    assert segmentation_loss(logits.detach(), target).item() != pytest.approx(base.item(), rel=1e-3)
    # CE weight 0.2 and Dice weight 1 are the two terms
    ce_only = segmentation_loss(logits.detach(), sparse, ce_weight=1.0, dice_weight=0.0)
    dice_only = segmentation_loss(logits.detach(), sparse, ce_weight=0.0, dice_weight=1.0)
    assert base.item() == pytest.approx(0.2 * ce_only.item() + dice_only.item(), rel=1e-5)
    with pytest.raises(ValueError, match="outside"):
        segmentation_loss(logits.detach(), torch.full((2, 4, 8, 8), NUM_SEG_CLASSES))


def test_classification_loss_masks_unknown_labels() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, [0, 2]], labels[:, [0, 2]])
    torch.testing.assert_close(classification_loss(logits, labels, mask), expected)
    nan_labels = torch.tensor([[1.0, float("nan"), 1.0]])
    torch.testing.assert_close(classification_loss(logits, nan_labels), expected)
    assert classification_loss(logits, labels, torch.zeros_like(mask)).item() == 0.0


# ----------------------------------------------------------------------------- runs


def test_finetune_per_plane_classifier_with_label_fraction(knee_records: list, pretrained_dir: Path) -> None:
    # backbone frozen: after training its weights must still be exactly the pretrained EMA
    cfg = _tiny(classify={"backbone_lr_factor": 0.0, "epochs": 2})
    result = finetune_classifier(cfg, knee_records, ["sagittal"], use_ehr=False, pretrained=pretrained_dir,
                                 label_fraction=0.5, seed=1, progress=False)
    assert result.init == "pretrained" and result.planes == ("sagittal",)
    assert len(result.train_ids) + len(result.val_ids) == 3  # half of 6 exams
    assert set(result.thresholds) == set(label_keys("knee"))
    assert all(0.0 <= t <= 1.0 for t in result.thresholds.values())
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["train_loss"])
    ema = torch.load(pretrained_dir / "sagittal" / "ema_backbone.pt", weights_only=False)["state_dict"]
    for key, tensor in result.model.backbones["sagittal"].state_dict().items():
        torch.testing.assert_close(tensor, ema[key], rtol=0, atol=0)
    assert "synthetic phantoms" in result.data_description


def test_finetune_fused_classifier_with_ehr_from_scratch(knee_records: list) -> None:
    cfg = _tiny()
    torch.manual_seed(0)
    result = finetune_classifier(cfg, knee_records, list(PLANES), use_ehr=True, pretrained=None,
                                 from_scratch=True, seed=0, progress=False)
    assert result.init == "scratch" and result.pretrained_from == {}
    assert result.use_ehr and result.model.ehr is not None
    assert len(result.train_ids) + len(result.val_ids) == 6
    assert set(result.train_ids).isdisjoint(result.val_ids)
    assert {"train_exams", "val_exams", "val_auc", "val_macro_auc", "threshold_policy"} <= set(result.metrics)

    bundle = make_bundle(cfg, classifier=result)
    assert bundle.card.joint == "knee" and bundle.card.use_ehr and bundle.card.planes == list(PLANES)
    assert "synthetic phantoms" in bundle.card.training_data["description"]
    assert "not for clinical use" in bundle.card.intended_use
    assert bundle.card.training_data["fingerprint"] == result.fingerprint


def test_finetune_segmenter_and_one_bundle_with_both(knee_records: list, pretrained_dir: Path, tmp_path: Path) -> None:
    from inference.checkpoint import ModelBundle

    cfg = _tiny()
    seg = finetune_segmenter(cfg, knee_records, plane="sagittal", pretrained=pretrained_dir, seed=0, progress=False)
    assert seg.task == "segment" and seg.planes == ("sagittal",)
    assert "val_dice" in seg.metrics and set(seg.metrics["val_dice"]) >= {"femur", "pcl"}
    cls = finetune_classifier(cfg, knee_records, ["sagittal"], use_ehr=False, pretrained=pretrained_dir,
                              seed=0, progress=False)
    bundle = make_bundle(cfg, classifier=cls, segmenter=seg, name="test-knee", version="1")
    bundle.save(tmp_path / "model.pt")
    loaded = ModelBundle.load(tmp_path / "model.pt")
    assert loaded.classifier is not None and loaded.segmenter is not None
    assert loaded.card.name == "test-knee" and len(loaded.card.structures) == NUM_SEG_CLASSES - 1
    assert loaded.card.training_data["segmenter"]["planes"] == ["sagittal"]
    assert loaded.card.segmentation_plane == "sagittal" == loaded.card.segmenter_plane()
    assert loaded.card.metrics["segmenter"]["val_exams"] == len(seg.val_ids)
    for key, value in seg.model.state_dict().items():
        torch.testing.assert_close(loaded.segmenter.state_dict()[key], value)


def test_transfer_to_ankle_labels_from_knee_backbones(pretrained_dir: Path, tmp_path: Path) -> None:
    from training.datasets import read_source

    make_phantom_like_folder(tmp_path / "ankle", n_cases=4, joint="ankle")
    records = read_source(f"phantom:{tmp_path / 'ankle'}")
    result = finetune_classifier(_tiny(), records, ["sagittal"], use_ehr=False, pretrained=pretrained_dir,
                                 seed=0, progress=False)
    assert result.label_keys == label_keys("ankle") and result.joint == "ankle"
    assert result.model.num_labels == 4
    assert make_bundle(_tiny(), classifier=result).card.labels == list(label_keys("ankle"))


def test_frozen_transfer_from_a_knee_classifier_trains_only_the_heads_on_features_computed_once(
        knee_records: list, tmp_path: Path) -> None:
    """The demo's ankle and shoulder models: the knee classifier's backbones, frozen, features
    cached; the backbones stay bit for bit the knee's, so the node keeps one copy of them."""
    from inference.checkpoint import ModelBundle
    from inference.model_set import ModelSet
    from training.datasets import read_source
    from training.finetune import classifier_backbones

    torch.manual_seed(0)
    knee = finetune_classifier(_tiny(classify={"steps": 2}), knee_records, list(PLANES), use_ehr=True,
                               pretrained=None, from_scratch=True, seed=0, progress=False)
    source = classifier_backbones(knee.model, "knee classifier")
    frozen = _tiny(classify={"steps": 6, "backbone_lr_factor": 0.0, "head_lr": 1e-2})
    bundles = {"knee": make_bundle(_tiny(), classifier=knee)}
    for joint in ("ankle", "shoulder"):
        make_phantom_like_folder(tmp_path / joint, n_cases=5, joint=joint)
        records = read_source(f"phantom:{tmp_path / joint}")
        result = finetune_classifier(frozen, records, list(PLANES), use_ehr=True, pretrained=source, seed=0,
                                     progress=False)
        assert result.joint == joint and result.history[-1]["steps"] == 6
        for plane in PLANES:
            for key, value in knee.model.backbones[plane].state_dict().items():
                assert torch.equal(result.model.backbones[plane].state_dict()[key], value), (joint, plane, key)
        bundles[joint] = make_bundle(frozen, classifier=result, name=f"t-{joint}")

    # the precomputed path is the served forward pass, not an approximation of it
    model = bundles["ankle"].classifier.eval()
    volumes = {p: torch.rand(2, 1, 8, 32, 32) * 2 - 1 for p in PLANES}
    ehr = torch.zeros(2, 5)
    with torch.no_grad():
        served = model(volumes, ehr, torch.ones(2, 5))
        cached = model(model.backbone_features(volumes), ehr, torch.ones(2, 5), precomputed=True)
    torch.testing.assert_close(cached, served)

    paths = {}
    for joint, bundle in bundles.items():
        bundle.save(tmp_path / f"{joint}.pt")
        paths[joint] = tmp_path / f"{joint}.pt"
    loaded = {joint: ModelBundle.load(path) for joint, path in paths.items()}
    assert loaded["ankle"].card.backbones == loaded["knee"].card.backbones == loaded["shoulder"].card.backbones
    models = ModelSet.load(paths)
    assert len(models.shared) == 6  # ankle and shoulder hold the knee's three backbones
    assert models.for_joint("shoulder").classifier.backbones["axial"] is models.for_joint("knee").classifier.backbones["axial"]


def test_youden_threshold_needs_enough_cases_and_a_better_than_chance_split() -> None:
    from training.finetune import youden_threshold

    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], dtype=float)
    p = np.array([0.1, 0.2, 0.25, 0.3, 0.35, 0.6, 0.7, 0.75, 0.8, 0.9])
    chosen = youden_threshold(y, p, min_cases=5)
    assert chosen is not None and 0.35 < chosen <= 0.6
    # one positive is not enough to place a threshold
    assert youden_threshold(np.array([0, 0, 0, 0, 0, 1], dtype=float), np.linspace(0, 1, 6), min_cases=2) is None
    # constant predictions separate nothing: no threshold of 1.0 or 0.0 read off noise
    assert youden_threshold(y, np.full(10, 0.3), min_cases=5) is None
    # unknown truths (NaN) are left out before counting
    y_nan = np.concatenate([y, [np.nan, np.nan]])
    assert youden_threshold(y_nan, np.concatenate([p, [0.5, 0.5]]), min_cases=5) == chosen
