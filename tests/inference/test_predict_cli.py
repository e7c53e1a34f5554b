"""``orthonode predict``: arguments, the model named by node.yaml, previews, exit status."""
from __future__ import annotations

import argparse
from pathlib import Path

import pydicom
import pytest

from inference import cli


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="orthonode predict")
    cli.configure(parser)
    return cli.run(parser.parse_args(argv))


def test_predict_with_model_and_preview(
    tiny_checkpoint: Path, knee_studies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    rc = _run(["--study", str(knee_studies / "knee_0002" / "dicom"), "--out", str(out), "--model",
               str(tiny_checkpoint), "--preview", "--config", str(tmp_path / "absent.yaml")])
    printed = capsys.readouterr().out
    assert rc == cli.EXIT_OK, printed
    assert "test-knee 0.1-test (knee)" in printed and ": complete:" in printed
    assert "Joint effusion:" in printed and "probability" in printed  # the findings
    for name in ("seg_sagittal.dcm", "seg_coronal.dcm", "seg_axial.dcm", "sr.dcm", "preview/sagittal.png",
                 "preview/coronal.png", "preview/axial.png"):
        assert (out / name).is_file(), name
        assert str(out / name) in printed  # every file written is listed
    assert pydicom.dcmread(out / "sr.dcm").Modality == "SR"
    # a PNG, not an empty file
    assert (out / "preview" / "sagittal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_defaults_to_the_checkpoint_of_node_yaml(
    tiny_checkpoint: Path, knee_studies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"model:\n  checkpoint: {tiny_checkpoint}\n", encoding="utf-8")
    rc = _run(["--study", str(knee_studies / "knee_0002" / "dicom"), "--out", str(tmp_path / "out"),
               "--config", str(config), "--segment-planes", "coronal", "--overlay-planes", "none"])
    printed = capsys.readouterr().out
    assert rc == cli.EXIT_OK, printed
    assert f"from {tiny_checkpoint}" in printed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seg_coronal.dcm", "sr.dcm"]
    rc = _run(["--study", str(knee_studies / "knee_0002" / "dicom"), "--out", str(tmp_path / "b"),
               "--config", str(config), "--overlay-planes", "axial"])
    assert rc == cli.EXIT_OK
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["seg_axial.dcm", "seg_sagittal.dcm", "sr.dcm"]
    assert _run(["--study", str(tmp_path), "--out", str(tmp_path / "c"), "--overlay-planes", "oblique"]) == cli.EXIT_USAGE
    assert "--overlay-planes: unknown plane" in capsys.readouterr().err


def test_unsupported_study_and_bad_arguments(
    tiny_checkpoint: Path, ankle_study: Path, knee_studies: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = _run(["--study", str(ankle_study), "--out", str(tmp_path / "a"), "--model", str(tiny_checkpoint)])
    assert rc == cli.EXIT_UNSUPPORTED
    assert "unsupported" in capsys.readouterr().out
    study = str(knee_studies / "knee_0002" / "dicom")
    # no --model and no node.yaml: the error names the configuration file it looked for
    rc = _run(["--study", study, "--out", str(tmp_path / "b"), "--config", str(tmp_path / "none.yaml")])
    assert rc == cli.EXIT_USAGE and "none.yaml" in capsys.readouterr().err
    rc = _run(["--study", study, "--out", str(tmp_path / "c"), "--model", str(tmp_path / "missing.pt")])
    assert rc == cli.EXIT_USAGE and "missing.pt" in capsys.readouterr().err
    rc = _run(["--study", study, "--out", str(tmp_path / "d"), "--model", str(tiny_checkpoint),
               "--segment-planes", "sagittal,oblique"])
    assert rc == cli.EXIT_USAGE and "oblique" in capsys.readouterr().err
    rc = _run(["--study", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e"), "--model", str(tiny_checkpoint)])
    assert rc == cli.EXIT_USAGE and "nowhere" in capsys.readouterr().err


def test_predict_is_registered_in_the_orthonode_command() -> None:
    from dicom_node.cli import COMMANDS

    assert COMMANDS["predict"][0] == "inference.cli"
