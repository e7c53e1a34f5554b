"""``orthonode check-config FILE``: validate node.yaml and print the settings that matter."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def model_problems(cfg: Any, config_name: str, single_must_exist: bool = True) -> tuple[list[str], list[str]]:
    """What is wrong with the configured models, and one line per model.

    A single ``model.checkpoint`` must exist (``single_must_exist``; otherwise its line says
    "missing": ``check-config`` before the demo model is built).  Each ``model.checkpoints`` entry must exist,
    read as a checkpoint, and its card's joint must be its key (the card is read without
    building the networks).
    """
    problems: list[str] = []
    lines: list[str] = []
    if not cfg.model.checkpoints:
        if cfg.checkpoint.is_file() or not single_must_exist:
            lines.append(f"  model      {cfg.checkpoint}{'' if cfg.checkpoint.is_file() else ' (missing)'}")
        else:
            problems.append(f"model.checkpoint {cfg.checkpoint} does not exist; build the demo model with "
                            f"`orthonode train demo --out {cfg.checkpoint}` or set model.checkpoint in {config_name}")
        return problems, lines
    from inference.checkpoint import CheckpointError
    from inference.model_set import ModelSetError, check_cards

    for joint, path in cfg.checkpoints.items():
        try:
            card = check_cards({joint: path})[joint]
        except (FileNotFoundError, CheckpointError, ModelSetError) as err:
            problems.append(str(err))
            continue
        lines.append(f"  model      {joint}: {card.name} {card.version} from {path}")
    return problems, lines


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="node.yaml", help="node configuration file (default: node.yaml)")
    parser.add_argument("--show-rules", action="store_true", help="also print the series-selection and joint rules in force")


def run(args: argparse.Namespace) -> int:
    from dicom_node.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    listener = cfg.listener
    problems, model_lines = model_problems(cfg, args.config, single_must_exist=False)
    print(f"{args.config}: " + (f"{len(problems)} problem(s) with the models (below)" if problems else "OK"))
    print(f"  listener   {', '.join(listener.ae_titles)} on {listener.bind_address}:{listener.port}"
          f" (max {listener.max_associations} associations, TLS {'on' if listener.tls.enabled else 'off'})")
    callers = "any caller" if listener.allow_any_caller else ", ".join(c.ae_title for c in listener.allowed_callers) or "nobody"
    print(f"  callers    {callers}")
    print(f"  data       {cfg.data_dir}")
    print(f"  database   {cfg.database_url}")
    for line in model_lines:
        print(line)
    for name, dest in cfg.export.destinations.items():
        where = f"{dest.ae_title}@{dest.host}:{dest.port}" if dest.type == "dimse" else dest.url
        print(f"  export     {name}: {dest.type} {where}")
    if args.show_rules:
        import yaml

        rules = {"series_selection": cfg.series_selection.model_dump(mode="json"), "joints": cfg.joints.model_dump(mode="json")}
        print(yaml.safe_dump(rules, sort_keys=False, allow_unicode=True, width=120))
    for problem in problems:
        print(f"{args.config}: {problem}", file=sys.stderr)
    return 2 if problems else 0
