"""``orthonode train``: configuration errors, and pretrain -> finetune -> evaluate on phantoms."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from training import cli
from training.config import ConfigError, config_from_dict, load_config

def train(*argv: str) -> int:
    """Run ``orthonode train ARGV`` (the same configure/run pair the orthonode front calls)."""
    parser = argparse.ArgumentParser(prog="orthonode train")
    cli.configure(parser)
    return cli.run(parser.parse_args([str(a) for a in argv]))


# ----------------------------------------------------------------------------- configuration


def test_builtin_configurations_load() -> None:
    for name in ("paper", "small", "tiny", "demo"):
        cfg = load_config(name)
        assert cfg.name == name and cfg.source.endswith(f"{name}.yaml")
        model = cfg.model_cfg()
        depth, height, width = model.input_shape
        assert (depth, height, width) == tuple(cfg.to_dict()["model"].get("input_shape", model.input_shape))
    paper = load_config("paper")
    assert paper.classify.head_lr == 5e-4 and paper.classify.backbone_lr_factor == 0.05 and paper.classify.epochs == 5
    assert paper.segment.lr == 1e-3 and paper.segment.epochs == 30 and paper.segment.ce_weight == 0.2
    points = paper.model_cfg().feature_points
    assert (points["sagittal"].timestep, points["sagittal"].block) == (200, "mid_0")
    assert (points["axial"].timestep, points["axial"].block) == (50, "mid_2")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("name: x\npretrain: {stepz: 3}\n", "pretrain.stepz"),
        ("name: x\nclassify: {head_lr: -1}\n", "classify.head_lr"),
        ("name: x\nsegment: {plane: oblique}\n", "segment.plane"),
        ("name: x\nmodel: {preset: tiny, channels: [8, 8]}\n", "model"),
        ("name: x\nmodel: {preset: huge}\n", "model"),
        ("name: x\nmodel: {preset: tiny, feature_points: {sagittal: {timestep: 5000, block: mid_2}}}\n", "model"),
        ("name: x\ntraining: {}\n", "training"),
        ("pretrain: {steps: 3}\n", "name"),
    ],
)
def test_configuration_errors_name_the_key_and_the_file(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and f"key '{key}'" in message, message


def test_configuration_is_frozen_and_overrides_validate() -> None:
    cfg = load_config("tiny")
    with pytest.raises(Exception, match="frozen"):
        cfg.pretrain.steps = 10  # type: ignore[misc]
    assert cfg.with_overrides(pretrain={"steps": 9}).pretrain.steps == 9
    with pytest.raises(ConfigError, match="pretrain.steps"):
        cfg.with_overrides(pretrain={"steps": 0})
    # the stored copy rebuilds the same configuration
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="neither a built-in name"):
        load_config("no-such-config")


def test_cli_reports_configuration_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npretrain: {batch_size: 0}\n")
    code = train("pretrain", "--data", f"phantom:{tmp_path}", "--plane", "sagittal", "--config", bad, "--out", tmp_path / "run")
    assert code == 2
    assert "pretrain.batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --pretrained or --from-scratch is required
        train("finetune", "--task", "classify", "--data", f"phantom:{tmp_path}", "--config", "tiny", "--out", tmp_path / "ft")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.demo import make_phantom_set

    root = tmp_path_factory.mktemp("phantoms")
    # four cases over two sites, at the smallest matrix the generator makes
    return make_phantom_set(root / "knee", "knee", range(4), ["siemens_3t_a", "ge_1p5t_b"], seed=0, matrix=32)


def test_pretrain_finetune_evaluate_end_to_end(phantoms: Path, tmp_path: Path) -> None:
    data = f"phantom:{phantoms}"
    run = tmp_path / "pretrain" / "sagittal"
    assert train("pretrain", "--data", data, "--plane", "sagittal", "--config", "tiny", "--out", run,
                 "--steps", "2", "--no-progress") == 0
    assert (run / "ema_backbone.pt").is_file() and (run / "loss.png").is_file() and (run / "log.csv").is_file()
    manifest = json.loads((run / "pretrain.json").read_text())
    assert manifest["plane"] == "sagittal" and manifest["dataset_size"] == 4 and manifest["target_steps"] == 2

    # --pretrained takes the folder of runs (it finds the sagittal one) or the run itself
    assert train("finetune", "--task", "classify", "--data", data, "--pretrained", run.parent, "--planes",
                 "sagittal", "--ehr", "--config", "tiny", "--out", tmp_path / "cls", "--no-progress") == 0
    summary = json.loads((tmp_path / "cls" / "finetune.json").read_text())
    assert summary["init"] == "pretrained" and summary["planes"] == ["sagittal"]
    assert train("finetune", "--task", "segment", "--data", data, "--pretrained", run,
                 "--label-fraction", "0.8", "--seed", "3", "--config", "tiny", "--out", tmp_path / "seg",
                 "--no-progress") == 0

    from inference.checkpoint import ModelBundle

    card = ModelBundle.load(tmp_path / "cls" / "model.pt").card
    assert card.joint == "knee" and card.use_ehr and card.planes == ["sagittal"]
    assert "synthetic phantoms" in card.training_data["description"]
    assert set(card.thresholds) == set(card.labels) == set(summary["thresholds"])

    for name in ("cls", "seg"):
        out = tmp_path / f"eval_{name}"
        assert train("evaluate", "--model", tmp_path / name, "--data", data, "--out", out, "--n-boot", "10") == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert {"model", "data", "classification", "segmentation", "skipped"} <= set(metrics)
        assert metrics["data"]["synthetic_phantoms"] is True
        assert (out / "roc.png").is_file() and (out / "dice.png").is_file()
    cls_metrics = json.loads((tmp_path / "eval_cls" / "metrics.json").read_text())
    assert {"macro_auc", "map", "labels"} <= set(cls_metrics["classification"])
    seg_metrics = json.loads((tmp_path / "eval_seg" / "metrics.json").read_text())
    assert "mean_dice" in seg_metrics["segmentation"] and seg_metrics["segmentation"]["n_exams"] == 4


def test_demo_builds_one_bundle_with_both_networks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from inference.checkpoint import ModelBundle

    out = tmp_path / "models" / "demo-knee.pt"
    assert train("demo", "--config", "tiny", "--train-cases", "4", "--held-out-cases", "1", "--matrix", "32",
                 "--workers", "1", "--out", out, "--work", tmp_path / "work", "--no-progress") == 0
    bundle = ModelBundle.load(out)
    assert bundle.classifier is not None and bundle.segmenter is not None
    assert bundle.card.planes == ["sagittal", "coronal", "axial"] and bundle.card.use_ehr
    assert "not for clinical use" in bundle.card.intended_use
    assert bundle.card.metrics["held_out_site"]["exams"] == 1
    assert "NOT for clinical use" in capsys.readouterr().out
    held_out = json.loads((tmp_path / "work" / "eval_held_out" / "metrics.json").read_text())
    assert held_out["data"]["n_exams"] == 1 and held_out["data"]["synthetic_phantoms"] is True
