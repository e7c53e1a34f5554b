"""One node, three joints: ``model.checkpoints`` gives a model per joint, the study's joint
chooses it, identical backbones are kept once, and a card of another joint is refused at the
configuration check and at start-up.

The ankle and shoulder models here are the knee test model's classifier backbones, frozen,
under new heads for their joint's labels (the transfer the demo trains); their heads are
untrained, which is enough to check what reaches the PACS for each joint.
"""
from __future__ import annotations

import argparse
import dataclasses
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.config import ConfigError, parse_config
from dicom_node.demo import findings_from_sr
from dicom_node.node import Node
from dicom_node.orthanc import OrthancServer, orthanc_available
from inference.labels import JOINT_LABELS, label_keys
from tests.support.node import MATRIX, free_port, make_node_config, run_storescu, wait_for, write_node_yaml


def transfer_bundle(knee_path: Path, joint: str):
    """A classifier for ``joint`` on the knee model's (frozen) classifier backbones."""
    import torch

    from inference.checkpoint import ModelBundle
    from inference.model import OrthoDiffusionClassifier

    knee = ModelBundle.load(knee_path)
    keys = list(label_keys(joint))
    card = dataclasses.replace(
        knee.card, name=f"test-{joint}", joint=joint, labels=keys,
        label_names=[label.name for label in JOINT_LABELS[joint]], structures=[],
        thresholds={k: 0.5 for k in keys}, segmentation_plane=None, metrics={}, backbones={},
    )
    torch.manual_seed(len(joint))
    classifier = OrthoDiffusionClassifier(knee.card.model_config(), knee.card.planes, len(keys), knee.card.use_ehr)
    for plane, backbone in knee.classifier.backbones.items():
        classifier.backbones[plane].load_state_dict(backbone.state_dict())
    return ModelBundle(card, classifier, None)


@pytest.fixture(scope="module")
def joint_models(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("joint_models")
    paths = {"knee": tiny_checkpoint}
    for joint in ("ankle", "shoulder"):
        paths[joint] = folder / f"{joint}.pt"
        transfer_bundle(tiny_checkpoint, joint).save(paths[joint])
    return paths


@pytest.fixture(scope="module")
def joint_studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from training.phantoms.generate import generate_dataset

    folder = tmp_path_factory.mktemp("joint_studies")
    studies = {}
    for joint in ("knee", "ankle", "shoulder"):
        generate_dataset(folder / joint, joint, 1, seed=41, matrix=MATRIX)
        studies[joint] = next((folder / joint).glob(f"{joint}_*/dicom"))
    return studies


def test_the_model_set_keeps_identical_backbones_once_and_predicts_as_the_separate_models(
        joint_models: dict[str, Path], joint_studies: dict[str, Path], tmp_path: Path) -> None:
    from inference.checkpoint import ModelBundle, read_card
    from inference.model_set import ModelSet
    from inference.pipeline import run_study

    # the cards say which backbones are the same weights: the ankle and shoulder classifiers
    # hold the knee classifier's, the knee segmenter its own
    cards = {joint: read_card(path) for joint, path in joint_models.items()}
    for joint in ("ankle", "shoulder"):
        assert {k: v for k, v in cards[joint].backbones.items()} == {
            k: v for k, v in cards["knee"].backbones.items() if k.startswith("classifier.")}
    assert cards["knee"].backbones["segmenter"] != cards["knee"].backbones["classifier.sagittal"]

    models = ModelSet.load(joint_models)
    assert models.joints == ["knee", "ankle", "shoulder"]
    assert sorted(models.shared) == sorted((j, f"classifier.{p}", "knee", f"classifier.{p}")
                                           for j in ("ankle", "shoulder") for p in ("sagittal", "coronal", "axial"))
    knee, ankle, shoulder = (models.for_joint(j) for j in ("knee", "ankle", "shoulder"))
    for plane in ("sagittal", "coronal", "axial"):
        assert ankle.classifier.backbones[plane] is knee.classifier.backbones[plane]
        assert shoulder.classifier.backbones[plane] is knee.classifier.backbones[plane]
    assert knee.segmenter.backbone is not knee.classifier.backbones["sagittal"]

    # sharing changes nothing in what each model says
    for joint in ("knee", "ankle"):
        shared = run_study(joint_studies[joint], models, tmp_path / f"{joint}_set", device="cpu")
        alone = run_study(joint_studies[joint], ModelBundle.load(joint_models[joint]), tmp_path / f"{joint}_alone",
                          device="cpu")
        assert shared.joint == joint and shared.model.startswith(f"test-{joint}")
        assert [(f.key, f.probability) for f in shared.findings] == [(f.key, f.probability) for f in alone.findings]
        assert [f.key for f in shared.findings] == list(label_keys(joint))
        assert bool(shared.segmentations) == (joint == "knee")


def test_loading_trims_the_heap_once_and_a_study_run_does_not(
        joint_models: dict[str, Path], joint_studies: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import inference.model_set as model_set
    from inference.checkpoint import ModelBundle
    from inference.pipeline import run_study

    calls: list[int] = []
    monkeypatch.setattr(model_set, "_release_freed_memory", lambda: calls.append(1))
    model_set.ModelSet.load(joint_models)
    assert calls == [1]  # after the three models are loaded and their backbones shared
    bundle = ModelBundle.load(joint_models["ankle"])
    calls.clear()
    run_study(joint_studies["ankle"], bundle, tmp_path / "ankle", device="cpu")
    assert calls == []  # a held bundle: no full garbage collection per study
    model_set.ModelSet.single(bundle)
    assert calls == [1]


def test_a_joint_without_a_model_is_unsupported_with_its_reason(
        joint_models: dict[str, Path], joint_studies: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from inference.cli import EXIT_OK, EXIT_UNSUPPORTED, configure, run

    config = tmp_path / "node.yaml"
    config.write_text(f"model:\n  checkpoints:\n    knee: {joint_models['knee']}\n    ankle: {joint_models['ankle']}\n")
    parser = argparse.ArgumentParser()
    configure(parser)
    rc = run(parser.parse_args(["--study", str(joint_studies["shoulder"]), "--out", str(tmp_path / "s"),
                                "--config", str(config)]))
    out = capsys.readouterr().out
    assert rc == EXIT_UNSUPPORTED
    assert "the study is of the shoulder and the node has no model for the shoulder" in out
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("*.dcm"))
    # predict chooses as the node does: the ankle study goes to the ankle model ...
    rc = run(parser.parse_args(["--study", str(joint_studies["ankle"]), "--out", str(tmp_path / "a"),
                                "--config", str(config)]))
    out = capsys.readouterr().out
    assert rc == EXIT_OK and "joint: ankle; model test-ankle" in out
    assert [p.name for p in (tmp_path / "a").glob("*.dcm")] == ["sr.dcm"]
    # ... and --model still forces one: the knee model refuses the ankle, naming itself
    rc = run(parser.parse_args(["--study", str(joint_studies["ankle"]), "--out", str(tmp_path / "k"),
                                "--config", str(config), "--model", str(joint_models["knee"])]))
    assert rc == EXIT_UNSUPPORTED and "is for the knee" in capsys.readouterr().out


def test_a_card_of_another_joint_a_missing_file_or_both_forms_fail_the_configuration_check(
        joint_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.check_config import configure, run
    from dicom_node.commands import run_serve

    parser = argparse.ArgumentParser()
    configure(parser)
    good = make_node_config(tmp_path, joint_models["knee"])
    good["model"] = {"checkpoints": {k: str(v) for k, v in joint_models.items()}}
    assert run(parser.parse_args([str(write_node_yaml(tmp_path, good))])) == 0
    out = capsys.readouterr().out
    assert "model      ankle: test-ankle" in out and "model      shoulder: test-shoulder" in out

    swapped = {**good, "model": {"checkpoints": {"knee": str(joint_models["knee"]), "ankle": str(joint_models["shoulder"])}}}
    path = write_node_yaml(tmp_path, swapped)
    assert run(parser.parse_args([str(path)])) == 2
    err = capsys.readouterr().err
    assert "model.checkpoints.ankle" in err and "for the shoulder, not the ankle" in err
    # orthonode serve refuses to start on it, with the same reason
    assert run_serve(argparse.Namespace(config=path, verbose=1, preview=False)) == 2
    assert "model.checkpoints.ankle" in capsys.readouterr().err

    missing = {**good, "model": {"checkpoints": {"knee": str(joint_models["knee"]), "shoulder": str(tmp_path / "no.pt")}}}
    assert run(parser.parse_args([str(write_node_yaml(tmp_path, missing))])) == 2
    assert "model.checkpoints.shoulder" in capsys.readouterr().err

    with pytest.raises(ConfigError, match="not both"):
        parse_config({"model": {"checkpoint": "a.pt", "checkpoints": {"knee": "b.pt"}}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown joint"):
        parse_config({"model": {"checkpoints": {"hip": "b.pt"}}}, base_dir=tmp_path)
    # the single key keeps working, for whichever joint its card names
    single = parse_config({"model": {"checkpoint": "m.pt"}}, base_dir=tmp_path)
    assert single.checkpoint == tmp_path / "m.pt" and single.checkpoints == {}


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed")
def test_a_node_with_three_models_answers_each_joint_with_its_own_outputs(
        tmp_path: Path, joint_models: dict[str, Path], joint_studies: dict[str, Path]) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc", dicom_port=free_port(), node=None)
    orthanc.start()
    try:
        data = make_node_config(tmp_path, joint_models["knee"], quiet=1.0, destinations={
            "pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}})
        data["model"] = {"checkpoints": {k: str(v) for k, v in joint_models.items()}}
        node = Node(parse_config(data, base_dir=tmp_path), poll_seconds=0.2)
        node.start()
        try:
            expected = {"knee": {"SEG": 3, "SR": 1}, "ankle": {"SR": 1}, "shoulder": {"SR": 1}}
            uids = {}
            for joint, folder in joint_studies.items():
                uids[joint] = str(dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
                run_storescu(node.config.listener.port, folder)
            for joint, uid in uids.items():
                wait_for(lambda uid=uid, joint=joint: orthanc.modality_counts(uid) == expected[joint], 180,
                         f"the {joint} study's results in Orthanc")
            for joint, uid in uids.items():
                (sr,) = [i for i in orthanc.instances_of_study(uid) if i["modality"] == "SR"]
                data_sr = orthanc.instance_file(sr["id"])
                assert [f["key"] for f in findings_from_sr(data_sr)] == list(label_keys(joint))
                # the report names the model that read it
                assert f"test-{joint}" in str(dcmread(BytesIO(data_sr)))
        finally:
            node.stop()
    finally:
        orthanc.stop()
