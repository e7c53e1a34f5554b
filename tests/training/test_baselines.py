"""MONAI supervised baselines: built from the model card, trained a few steps, saved, loaded, served.

The baselines (``ModelConfig.classifier_backbone = "monai_resnet18"``, ``segmenter_backbone =
"monai_unet" | "monai_segresnet"``) go through the same fine-tuning, bundle and prediction
code as OrthoDiffusion, so the node could serve one and the label-efficiency benchmark scores
it exactly as it scores the method.  Tiny sizes: the whole module runs in seconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.checkpoint import ModelBundle
from inference.labels import NUM_SEG_CLASSES
from inference.model import (
    PRESETS,
    MonaiSegmenter,
    ModelConfig,
    OrthoDiffusionClassifier,
    OrthoDiffusionSegmenter,
    ResNetPlaneEncoder,
    make_segmenter,
    model_config,
)
from tests.training.fixtures import make_phantom_like_folder
from training.config import load_config
from training.finetune import build_classifier, build_segmenter, finetune_classifier, finetune_segmenter, make_bundle, param_groups

PLANES = ("sagittal", "coronal", "axial")
TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def knee_records(tmp_path_factory: pytest.TempPathFactory) -> list:
    from training.datasets import read_source

    root = tmp_path_factory.mktemp("knee_baselines")
    make_phantom_like_folder(root, n_cases=6, joint="knee")
    return read_source(f"phantom:{root}")


def _cfg(model: dict, **sections):
    return load_config("tiny").with_overrides(model=model, **sections)


def test_model_config_validates_and_stores_the_network_choice() -> None:
    cfg = model_config({**TINY.to_dict(), "classifier_backbone": "monai_resnet18", "segmenter_backbone": "monai_unet"})
    d = cfg.to_dict()
    assert d["classifier_backbone"] == "monai_resnet18" and d["segmenter_backbone"] == "monai_unet"
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig().classifier_backbone == "diffusion_unet" == ModelConfig().segmenter_backbone
    with pytest.raises(ValueError, match="classifier_backbone"):
        model_config({**TINY.to_dict(), "classifier_backbone": "monai_densenet121"})
    with pytest.raises(ValueError, match="segmenter_backbone"):
        model_config({**TINY.to_dict(), "segmenter_backbone": "unet"})
    with pytest.raises(ValueError, match="divisible by 8"):  # SegResNet halves every axis three times
        model_config({**TINY.to_dict(), "input_shape": (4, 32, 32), "channels": (8, 8, 16),
                      "attention_levels": (False, False, True), "seg_decoder_channels": (8, 8),
                      "segmenter_backbone": "monai_segresnet"})


def test_baseline_networks_share_the_fusion_and_the_segmenter_interface() -> None:
    cfg = model_config({**TINY.to_dict(), "classifier_backbone": "monai_resnet18"})
    model = OrthoDiffusionClassifier(cfg, PLANES, num_labels=8, use_ehr=True)
    assert all(isinstance(enc, ResNetPlaneEncoder) for enc in model.encoders.values())
    assert len(model.backbones) == 0  # nothing to load pretrained weights into
    assert model.norms["axial"].num_features == 8 * cfg.channels[0]  # ResNet-18 widths channels[0] x (1, 2, 4, 8)
    assert model.ehr is not None
    # every weight is a head weight (trained at the full rate); none is left out of the optimiser
    assert model.backbone_parameters() == []
    assert {id(p) for p in model.head_parameters()} == {id(p) for p in model.parameters()}
    groups = param_groups(model, 1e-3, 0.05)
    assert {id(p) for g in groups if g["lr"] == 1e-3 for p in g["params"]} == {id(p) for p in model.parameters()}
    x = torch.randn(2, 1, *cfg.input_shape)
    assert model({p: x for p in PLANES}).shape == (2, 8)

    for name in ("monai_unet", "monai_segresnet"):
        seg_cfg = model_config({**TINY.to_dict(), "segmenter_backbone": name})
        seg = make_segmenter(seg_cfg, NUM_SEG_CLASSES)
        assert isinstance(seg, MonaiSegmenter) and seg.head_kind == name
        assert seg(x).shape == (2, NUM_SEG_CLASSES, *seg_cfg.input_shape)
        assert {id(p) for p in seg.head_parameters()} == {id(p) for p in seg.parameters()}
        with pytest.raises(ValueError, match="spatial shape"):
            seg(torch.randn(1, 1, 8, 16, 16))
    assert isinstance(make_segmenter(TINY), OrthoDiffusionSegmenter)


def test_a_baseline_refuses_pretrained_weights(tmp_path: Path) -> None:
    from training.pretrain import PretrainedBackbone

    fake = PretrainedBackbone(plane="sagittal", state_dict={}, model_config=TINY.to_dict(), step=1, source=tmp_path)
    with pytest.raises(ValueError, match="--from-scratch"):
        build_classifier(_cfg({"classifier_backbone": "monai_resnet18"}), ["sagittal"], 2, False, {"sagittal": fake})
    with pytest.raises(ValueError, match="--from-scratch"):
        build_segmenter(_cfg({"segmenter_backbone": "monai_unet"}), fake)


def test_baseline_classifier_trains_round_trips_and_serves_a_missing_plane(knee_records: list, tmp_path: Path) -> None:
    cfg = _cfg({"classifier_backbone": "monai_resnet18"}, classify={"steps": 3, "val_fraction": 0.0})
    torch.manual_seed(0)
    initial = build_classifier(cfg, PLANES, 8, True, {})
    result = finetune_classifier(cfg, knee_records, list(PLANES), use_ehr=True, pretrained=None, seed=0, progress=False)
    assert result.init == "scratch" and result.history[-1]["steps"] == 3
    assert np.isfinite(result.history[-1]["train_loss"])
    # the CNN itself was trained (at the full rate), not only the fusion head
    before = initial.encoders["sagittal"].net.conv1.weight
    after = result.model.encoders["sagittal"].net.conv1.weight
    assert not torch.equal(before, after)

    bundle = make_bundle(cfg, classifier=result, name="baseline-test", version="1")
    assert bundle.card.model["classifier_backbone"] == "monai_resnet18"
    bundle.save(tmp_path / "model.pt")
    loaded = ModelBundle.load(tmp_path / "model.pt")
    assert isinstance(loaded.classifier.encoders["coronal"], ResNetPlaneEncoder)
    record = knee_records[0]
    volumes = {p: record.planes[p].load() for p in PLANES}
    expected = bundle.predict_proba(volumes, record.ehr)
    assert loaded.predict_proba(volumes, record.ehr) == expected  # bit for bit
    assert set(expected) == set(bundle.card.labels)
    without_axial = loaded.predict_proba({p: volumes[p] for p in ("sagittal", "coronal")}, record.ehr)
    assert set(without_axial) == set(expected) and all(0.0 <= v <= 1.0 for v in without_axial.values())
    assert without_axial != expected  # the missing plane's features are replaced by their mean, not ignored silently
    assert loaded.predict_proba(volumes, None).keys() == expected.keys()  # EHR all missing: masked


@pytest.mark.parametrize("network", ["monai_unet", "monai_segresnet"])
def test_baseline_segmenter_trains_round_trips_and_segments(knee_records: list, tmp_path: Path, network: str) -> None:
    cfg = _cfg({"segmenter_backbone": network}, segment={"steps": 3, "val_fraction": 0.0})
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in build_segmenter(cfg, None).state_dict().items()}
    result = finetune_segmenter(cfg, knee_records, plane="sagittal", pretrained=None, seed=0, progress=False)
    assert isinstance(result.model, MonaiSegmenter) and result.init == "scratch"
    assert result.history[-1]["steps"] == 3 and np.isfinite(result.history[-1]["train_loss"])
    changed = [k for k, v in result.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert changed, "training changed no weight"

    bundle = make_bundle(cfg, segmenter=result, name="baseline-seg", version="1")
    assert bundle.card.model["segmenter_backbone"] == network
    bundle.save(tmp_path / "seg.pt")
    loaded = ModelBundle.load(tmp_path / "seg.pt")
    assert isinstance(loaded.segmenter, MonaiSegmenter) and loaded.segmenter.head_kind == network
    volume = knee_records[0].planes["sagittal"].load()
    labels = loaded.segment(volume)
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, bundle.segment(volume))


def test_a_checkpoint_whose_weights_do_not_match_its_network_is_refused(knee_records: list, tmp_path: Path) -> None:
    """A card naming the MONAI UNet with the diffusion segmenter's weights does not load."""
    from inference.checkpoint import CheckpointError

    cfg = _cfg({}, segment={"steps": 1, "val_fraction": 0.0})
    result = finetune_segmenter(cfg, knee_records, plane="sagittal", pretrained=None, from_scratch=True, seed=0,
                                progress=False)
    bundle = make_bundle(cfg, segmenter=result, name="x", version="1")
    bundle.save(tmp_path / "a.pt")
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    payload["card"]["model"]["segmenter_backbone"] = "monai_unet"
    torch.save(payload, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        ModelBundle.load(tmp_path / "b.pt")
