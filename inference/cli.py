"""``orthonode predict``: run the model on one DICOM study folder and write its SEG(s) and SR.

The model is ``--model`` or, without it, what node.yaml names (``--config``, default
``./node.yaml``): its ``model.checkpoint``, or with ``model.checkpoints`` the model of the joint
the study's headers name, as the node chooses.  The findings and the files written are printed;
``--preview`` also writes PNGs of key slices per plane with the segmentation overlaid.  As in
the node, every plane gets a SEG: the segmented ones, and the others with the segmented label
map mapped onto their grids (``--overlay-planes`` narrows that, ``none`` turns it off).

Exit status: 0 when the study was interpreted (complete or partial), 3 when it is not supported
(wrong body part, no usable series, a joint without a model: the reason is printed),
2 for a bad argument, an unreadable checkpoint or configuration.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNSUPPORTED = 3


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, type=Path, help="folder with the DICOM files of one study")
    parser.add_argument("--out", required=True, type=Path, help="folder for the SEG/SR files (created if needed)")
    parser.add_argument(
        "--model", type=Path, default=None,
        help="model checkpoint (.pt), used whatever the study's joint; default: the model(s) of --config"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("node.yaml"),
        help="node.yaml that names the default model and the selection rules (default: %(default)s)",
    )
    parser.add_argument("--preview", action="store_true", help="also write PNG previews of key slices per plane")
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA when present), 'cpu' or 'cuda[:N]' (default: %(default)s)"
    )
    parser.add_argument(
        "--segment-planes",
        default=None,
        help="comma-separated planes to segment (default: those the segmenter was trained on)",
    )
    parser.add_argument(
        "--overlay-planes",
        default=None,
        help="comma-separated planes that get a SEG mapped from the segmented plane, or 'none' "
        "(default: every plane not segmented)",
    )


def _planes(value: str | None, option: str) -> list[str] | None:
    """A comma-separated plane list; None when not given, [] for 'none'."""
    from inference.labels import PLANES

    if value is None:
        return None
    planes = [p.strip() for p in value.split(",") if p.strip()]
    if planes == ["none"]:
        return []
    bad = [p for p in planes if p not in PLANES]
    if bad:
        raise ValueError(f"{option}: unknown plane(s) {bad}; planes are {list(PLANES)}")
    return planes


def _settings(args: argparse.Namespace) -> tuple[Any, dict[str, Path], Any]:
    """The models (a :class:`inference.model_set.ModelSet`), their files by joint and the node
    configuration (``None`` when there is no node.yaml).

    ``--model`` wins over node.yaml's models; the series-selection and joint rules come from
    node.yaml when it exists, so ``predict`` chooses series, and the model, as the node does.
    """
    from dicom_node.config import load_config
    from inference.checkpoint import ModelBundle
    from inference.model_set import ModelSet

    config = load_config(args.config) if args.config.is_file() else None
    if args.model is None and config is None:
        raise ValueError(f"no --model given and the node configuration {str(args.config)!r} does not exist")
    if args.model is None and config.checkpoints:
        return ModelSet.load(config.checkpoints), config.checkpoints, config
    path = args.model if args.model is not None else config.checkpoint
    models = ModelSet.single(ModelBundle.load(path))
    return models, {joint: path for joint in models.joints}, config


def run(args: argparse.Namespace) -> int:
    from dicom_node.config import ConfigError
    from inference.checkpoint import CheckpointError
    from inference.pipeline import Outcome, run_study

    if getattr(args, "verbose", 0) < 2:  # highdicom logs every module it copies at INFO
        logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        planes = _planes(args.segment_planes or None, "--segment-planes")
        overlays = _planes(getattr(args, "overlay_planes", None), "--overlay-planes")
    except ValueError as err:
        print(f"orthonode predict: {err}", file=sys.stderr)
        return EXIT_USAGE
    if not args.study.is_dir():
        print(f"orthonode predict: --study {str(args.study)!r} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    try:
        models, files, config = _settings(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"orthonode predict: {err}", file=sys.stderr)
        return EXIT_USAGE
    for joint, bundle in models:
        print(f"model: {bundle.card.name} {bundle.card.version} ({joint}) from {files[joint]}")
    rules = {} if config is None else {"rules": config.series_selection, "joint_rules": config.joints}
    try:
        result = run_study(
            args.study, models, args.out, preview=args.preview, segment_planes=planes, overlay_planes=overlays,
            device=args.device, **rules,
        )
    except ValueError as err:  # e.g. an unusable --device; the message names it
        print(f"orthonode predict: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(result.summary())
    if result.outcome is Outcome.UNSUPPORTED:
        return EXIT_UNSUPPORTED
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items() if v > 0 or k == "total")
    print(f"device: {result.device}; timings: {timings}")
    chosen = models.for_joint(result.joint) if result.joint else None
    if chosen is not None:
        print(chosen.card.intended_use)
    return EXIT_OK
