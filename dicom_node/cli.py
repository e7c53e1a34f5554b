"""``orthonode``: the one command-line program in front of the node, the predictor and the trainer.

Each subcommand lives in the package that owns it, as a module with two functions:
``configure(parser)`` adds its arguments and ``run(args) -> int`` does the work.  A module
holding several commands is named ``module:name`` and provides ``configure_<name>`` and
``run_<name>``.  Those
modules import heavy libraries (torch, highdicom) inside ``run`` so that ``orthonode --help``
stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand -> (module with configure/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("training.phantoms.cli", "generate synthetic knee/ankle/shoulder MRI studies with ground truth"),
    "train": ("training.cli", "pretrain, fine-tune and evaluate the OrthoDiffusion models"),
    "predict": ("inference.cli", "run the model on one DICOM study folder and write its SEG and SR"),
    "check-config": ("dicom_node.check_config", "validate a node.yaml and show its main settings"),
    "demo": ("dicom_node.demo", "run the main job end to end on phantom data (what `make demo` runs)"),
    "serve": ("dicom_node.commands:serve", "run the node: DICOM listener, study assembly, jobs, export, /healthz, /metrics"),
    "status": ("dicom_node.commands:status", "studies, jobs, exports and failures recorded in the node's database"),
    "retry": ("dicom_node.commands:retry", "queue failed exports again"),
    "echo": ("dicom_node.commands:echo", "C-ECHO a configured export destination"),
    "purge": ("dicom_node.services.retention.command",
              "delete studies older than the retention policy allows (--dry-run lists them)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orthonode",
        description="DICOM AI node for musculoskeletal MRI (OrthoDiffusion). Not a medical device.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (target, help_text) in COMMANDS.items():
        module_name, _, suffix = target.partition(":")
        module = importlib.import_module(module_name)
        configure = getattr(module, f"configure_{suffix}" if suffix else "configure")
        run = getattr(module, f"run_{suffix}" if suffix else "run")
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        configure(cmd)
        cmd.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
