"""One-file checkpoints with their model card: round trip, inference helpers, clear errors."""
from __future__ import annotations

import dataclasses
import fractions
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.checkpoint import CHECKPOINT_FORMAT, CheckpointError, ModelBundle, ModelCard, pick_device
from inference.labels import JOINT_LABELS, KNEE_STRUCTURES, label_keys
from inference.model import PRESETS, OrthoDiffusionClassifier, OrthoDiffusionSegmenter
from inference.preprocess import PreprocessConfig

TINY = PRESETS["tiny"]
PLANES = ["sagittal", "coronal"]


def _card(**changes: object) -> ModelCard:
    keys = list(label_keys("knee"))
    card = ModelCard(
        name="orthodiffusion-knee-test",
        version="0.0.1",
        joint="knee",
        labels=keys,
        label_names=[label.name for label in JOINT_LABELS["knee"]],
        structures=[s.key for s in KNEE_STRUCTURES],
        thresholds={k: 0.5 for k in keys},
        planes=PLANES,
        use_ehr=True,
        model=TINY.to_dict(),
        preprocess=PreprocessConfig(depth=8, size=(32, 32)).to_dict(),
        training_data={"description": "synthetic phantoms", "fingerprint": "0" * 64, "counts": {"train": 4}},
        metrics={"macro_auc": np.float64(0.5)},
    )
    return dataclasses.replace(card, **changes) if changes else card


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    torch.manual_seed(0)
    classifier = OrthoDiffusionClassifier(TINY, PLANES, num_labels=8, use_ehr=True)
    with torch.no_grad():  # make the EHR gate and head non-trivial so differences would show
        classifier.ehr.gate.uniform_(-1, 1)
    segmenter = OrthoDiffusionSegmenter(TINY, num_classes=len(KNEE_STRUCTURES) + 1)
    return ModelBundle(_card(), classifier, segmenter)


def _exam(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sagittal": rng.normal(size=(19, 48, 40)), "coronal": rng.normal(size=(6, 30, 30)) * 50}


def test_round_trip_gives_identical_outputs_and_card(bundle: ModelBundle, tmp_path: Path) -> None:
    path = tmp_path / "models" / "knee.pt"
    bundle.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["knee.pt"]  # no temporary left behind
    loaded = ModelBundle.load(path)
    assert loaded.card == bundle.card
    assert loaded.card.to_dict()["metrics"] == {"macro_auc": 0.5}
    assert loaded.card.intended_use == "Research use only; not a medical device"
    assert loaded.card.framework["torch"] == str(torch.__version__)
    ehr = {"age": "052Y", "sex": "F", "height_m": None}
    first = bundle.predict_proba(_exam(), ehr)
    assert list(first) == bundle.card.labels and all(0.0 < p < 1.0 for p in first.values())
    assert loaded.predict_proba(_exam(), ehr) == first
    assert bundle.predict_proba(_exam(), ehr) == first  # deterministic features at inference
    volume = _exam()["sagittal"]
    labels = loaded.segment(volume)
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, bundle.segment(volume))
    for a, b in zip(bundle.classifier.state_dict().values(), loaded.classifier.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_file_is_the_documented_format(bundle: ModelBundle, tmp_path: Path) -> None:
    path = tmp_path / "knee.pt"
    bundle.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT
    assert set(raw["state"]) == {"classifier", "segmenter"}
    assert raw["card"]["model"] == TINY.to_dict()


def test_ehr_is_used_and_missing_values_are_accepted(bundle: ModelBundle) -> None:
    with_ehr = bundle.predict_proba(_exam(), {"age": 80, "sex": "M", "height_m": 1.9, "weight_kg": 120})
    without = bundle.predict_proba(_exam(), None)
    assert with_ehr != without
    with pytest.raises(ValueError, match="bmi"):
        bundle.predict_proba(_exam(), {"bmi": 22})
    # a study without some planes is still scored from the planes it has (as the node does) ...
    partial = bundle.predict_proba({"sagittal": _exam()["sagittal"]})
    assert set(partial) == set(without) and partial != without
    # ... but not without any of them
    with pytest.raises(ValueError, match="none of the planes"):
        bundle.predict_proba({})


def test_classifier_only_bundle(tmp_path: Path) -> None:
    card = _card(structures=[], use_ehr=False, planes=["axial"], labels=["a", "b"], label_names=["A", "B"],
                 thresholds={"a": 0.3, "b": 0.7})
    bundle = ModelBundle(card, OrthoDiffusionClassifier(TINY, ["axial"], 2, use_ehr=False))
    bundle.save(tmp_path / "m.pt")
    loaded = ModelBundle.load(tmp_path / "m.pt")
    assert loaded.segmenter is None and loaded.card.thresholds == {"a": 0.3, "b": 0.7}
    with pytest.raises(ValueError, match="no segmenter"):
        loaded.segment(np.zeros((8, 32, 32)))


def test_foreign_and_corrupt_files_give_clear_errors(bundle: ModelBundle, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        ModelBundle.load(garbage)

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt.*format"):
        ModelBundle.load(foreign)

    old = tmp_path / "old.pt"
    torch.save({"format": "orthonode-checkpoint/0", "card": {}, "state": {}}, old)
    with pytest.raises(CheckpointError, match=r"old\.pt.*orthonode-checkpoint/0"):
        ModelBundle.load(old)

    pickled = tmp_path / "pickled.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "card": fractions.Fraction(1, 3)}, pickled)  # code, not data
    with pytest.raises(CheckpointError, match="pickled.pt"):
        ModelBundle.load(pickled)

    good = tmp_path / "good.pt"
    bundle.save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        ModelBundle.load(truncated)

    mismatched = tmp_path / "mismatched.pt"
    raw = torch.load(good, weights_only=True)
    raw["card"]["model"]["channels"] = [8, 8, 16, 32]
    torch.save(raw, mismatched)
    with pytest.raises(CheckpointError, match=r"mismatched\.pt.*classifier weights"):
        ModelBundle.load(mismatched)

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ModelBundle.load(tmp_path / "missing.pt")
    assert zipfile.is_zipfile(good)


def test_card_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="thresholds"):
        _card(thresholds={"acl": 0.5})
    with pytest.raises(ValueError, match="label_names"):
        _card(label_names=["x"])
    with pytest.raises(ValueError, match="joint"):
        _card(joint="hip")
    with pytest.raises(ValueError, match="preprocess"):
        _card(preprocess={"depth": 16, "size": [32, 32]})  # does not match the model input
    with pytest.raises(ValueError, match="structures"):
        _card(structures=["femur", "humerus"])
    with pytest.raises(ValueError, match="lacks"):
        ModelCard.from_dict({"name": "x"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        ModelCard.from_dict({**_card().to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match=r"thresholds\.acl.*got True"):  # a bool is no probability
        _card(thresholds={k: True for k in label_keys("knee")})
    with pytest.raises(ValueError, match="planes.*repeat"):
        _card(planes=["sagittal", "sagittal"])
    with pytest.raises(ValueError, match="backbones.segmenter"):
        _card(backbones={"segmenter": "not a sha256"})
    with pytest.raises(ValueError, match="segmentation_plane"):
        _card(segmentation_plane="axial", structures=[])
    with pytest.raises(ValueError, match="use_ehr"):
        _card(use_ehr="yes")


def test_card_keeps_its_stored_form() -> None:
    """A card stores as the same plain dict as before it was a pydantic dataclass: fields in
    declaration order, thresholds as floats in label order, lists not tuples."""
    keys = list(label_keys("knee"))
    card = _card(thresholds={**{k: 0.5 for k in reversed(keys)}, keys[0]: 1}, planes=("sagittal", "coronal"))
    d = card.to_dict()
    assert list(d) == [f.name for f in dataclasses.fields(ModelCard)]
    assert list(d["thresholds"]) == keys and d["thresholds"][keys[0]] == 1.0
    assert type(d["thresholds"][keys[0]]) is float and d["planes"] == ["sagittal", "coronal"]
    assert ModelCard.from_dict(d) == card


def test_bundle_rejects_a_model_that_disagrees_with_its_card() -> None:
    classifier = OrthoDiffusionClassifier(TINY, PLANES, num_labels=3, use_ehr=True)
    with pytest.raises(ValueError, match="outputs"):
        ModelBundle(_card(structures=[]), classifier)
    with pytest.raises(ValueError, match="structures"):
        ModelBundle(_card(), OrthoDiffusionClassifier(TINY, PLANES, num_labels=8, use_ehr=True))


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="tpu"):
        pick_device("tpu")
