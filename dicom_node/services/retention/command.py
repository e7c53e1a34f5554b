"""``orthonode purge``: list (``--dry-run``) or delete the studies the retention policy allows."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dicom_node.config import ConfigError, load_config
from dicom_node.db import make_engine, make_session_factory, upgrade_database
from dicom_node.layout import DataDirLock, DataDirLockedError
from dicom_node.services.retention.purge import Purger


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("node.yaml"), metavar="NODE_YAML",
                        help="node configuration (default: ./node.yaml); its retention section sets the ages")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be deleted (study, age, size, reason) and delete nothing")


def _table(rows: list[tuple[str, str, float, int]]) -> list[str]:
    lines = [f"{'study':<64}  {'reason':<44} {'age (days)':>10} {'size (MB)':>10}"]
    lines += [f"{uid:<64}  {reason:<44} {age:>10.1f} {size / 1e6:>10.1f}" for uid, reason, age, size in rows]
    return lines


def run(args: argparse.Namespace) -> int:
    """``orthonode purge``: list (``--dry-run``) or delete the studies the retention policy allows."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"orthonode purge: {exc}", file=sys.stderr)
        return 2
    policy = config.retention
    if not config.data_dir.is_dir():
        print(f"orthonode purge: data directory {config.data_dir} does not exist; nothing to purge")
        return 0
    if not args.dry_run and not policy.enabled:
        print(f"orthonode purge: retention.enabled is false in {args.config}; set it to true to allow deleting "
              f"studies (or run with --dry-run to see what would be deleted)", file=sys.stderr)
        return 2
    lock = DataDirLock(config.data_dir)
    # On PostgreSQL several node processes share the folder; the database's locks guard each
    # study and let one purge run at a time, so a purge may run beside them.  On SQLite the
    # one node holds the folder's lock.
    if config.database_url.startswith("sqlite") and args.dry_run:
        if lock.locked_by_other():
            print(f"note: a node is serving {config.data_dir} ({lock.holder()}); the list may change while it runs")
    elif config.database_url.startswith("sqlite"):
        try:
            lock.acquire("orthonode purge")
        except DataDirLockedError:
            print(f"orthonode purge: a node is serving {config.data_dir} ({lock.holder()}, lock file {lock.path}); "
                  f"stop it first, or let its scheduled purge (retention.interval_minutes) do this",
                  file=sys.stderr)
            return 1
    logging.getLogger("alembic").setLevel(logging.WARNING)
    engine = None
    try:
        upgrade_database(config.database_url)
        engine = make_engine(config.database_url)
        purger = Purger(config, make_session_factory(engine), guard_timeout=None)
        print(f"retention: delivered studies kept {policy.delivered_days:g} days, failed or unsupported "
              f"{policy.failed_days:g} days after their last activity")
        if args.dry_run:
            marks = purger.interrupted()
            for mark in marks:
                print(f"interrupted purge of {mark.study_instance_uid} (marked {mark.time:%Y-%m-%d %H:%M:%S} UTC) "
                      f"would be finished")
            found = purger.candidates()
            if found:
                print("\n".join(_table([(c.study_instance_uid, c.assessment.reason, c.assessment.age_days,
                                         c.size_bytes) for c in found])))
            print(f"would delete {len(found)} study(ies), {sum(c.size_bytes for c in found) / 1e6:.1f} MB "
                  f"(dry run: nothing deleted)")
            return 0
        report = purger.purge()
        if report.purged:
            print("\n".join(_table([(p.study_instance_uid, p.reason + (" (resumed)" if p.resumed else ""),
                                     p.age_days, p.size_bytes) for p in report.purged])))
        for uid, why in report.skipped:
            print(f"kept {uid}: {why}")
        for uid, error in report.failed:
            print(f"FAILED {uid}: {error}", file=sys.stderr)
        print(f"deleted {len(report.purged)} study(ies), {report.size_bytes / 1e6:.1f} MB"
              + (f"; {len(report.failed)} failed (finished at the next run)" if report.failed else ""))
        return 1 if report.failed else 0
    finally:
        if engine is not None:
            engine.dispose()
        lock.release()
