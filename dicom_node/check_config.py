"""``orthonode check-config FILE``: validate node.yaml and print the settings that matter."""
from __future__ import annotations

import argparse
import sys


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
    print(f"{args.config}: OK")
    print(f"  listener   {', '.join(listener.ae_titles)} on {listener.bind_address}:{listener.port}"
          f" (max {listener.max_associations} associations, TLS {'on' if listener.tls.enabled else 'off'})")
    callers = "any caller" if listener.allow_any_caller else ", ".join(c.ae_title for c in listener.allowed_callers) or "nobody"
    print(f"  callers    {callers}")
    print(f"  data       {cfg.data_dir}")
    print(f"  database   {cfg.database_url}")
    print(f"  model      {cfg.checkpoint}{'' if cfg.checkpoint.exists() else ' (missing)'}")
    for name, dest in cfg.export.destinations.items():
        where = f"{dest.ae_title}@{dest.host}:{dest.port}" if dest.type == "dimse" else dest.url
        print(f"  export     {name}: {dest.type} {where}")
    if args.show_rules:
        import yaml

        rules = {"series_selection": cfg.series_selection.model_dump(mode="json"), "joints": cfg.joints.model_dump(mode="json")}
        print(yaml.safe_dump(rules, sort_keys=False, allow_unicode=True, width=120))
    return 0
