"""``orthonode serve``, ``status``, ``retry`` and ``echo``: running and operating the node.

Each command is a pair ``configure_<name>(parser)`` / ``run_<name>(args)``; the small
``cmd_*`` modules expose them under the ``configure``/``run`` names the CLI expects.  All four
read the same node.yaml (``--config``, default ``./node.yaml``).  ``status`` and ``retry`` work
on the database directly, so they work whether the node is running or not (a running node
picks re-queued exports up at its next poll).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("node.yaml"), metavar="NODE_YAML",
                        help="node configuration (default: ./node.yaml)")


def _load(args: argparse.Namespace) -> Any:
    from dicom_node.config import load_config

    return load_config(args.config)


# --------------------------------------------------------------------------- serve


def configure_serve(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("--preview", action="store_true", help="also write preview PNGs with each result")
    parser.add_argument("--role", metavar="ROLES",
                        help="what this process runs: all (the default), or listener, worker, exporter, "
                             "comma-separated; overrides node.role (roles in separate processes need PostgreSQL)")
    parser.add_argument("--device", metavar="DEVICE",
                        help="torch device of this process's workers: auto, cpu, cuda or cuda:N; overrides jobs.device")


def run_serve(args: argparse.Namespace) -> int:
    """Run the node until SIGTERM or Ctrl-C."""
    from dicom_node.config import ConfigError

    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"orthonode serve: {exc}", file=sys.stderr)
        return 2
    from dicom_node.config import check_device
    from dicom_node.roles import parse_roles

    try:
        role, device = getattr(args, "role", None), getattr(args, "device", None)
        roles = parse_roles(role) if role is not None else config.node.roles
        if device is not None:
            jobs = config.jobs.model_copy(update={"device": check_device(device)})
            config = config.model_copy(update={"jobs": jobs})
    except ValueError as exc:
        print(f"orthonode serve: {exc}", file=sys.stderr)
        return 2
    if not getattr(args, "verbose", 0):  # -v on the command line wins over logging.level
        logging.getLogger().setLevel(getattr(logging, config.logging.level))
        # pynetdicom logs every PDU exchange at INFO; the listener and exporter log each
        # instance and object themselves, with the study and the reason
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from dicom_node.check_config import model_problems

    problems, _ = model_problems(config, args.config) if "worker" in roles else ([], None)
    if problems:
        for problem in problems:
            print(f"orthonode serve: {problem}", file=sys.stderr)
        return 2
    from dicom_node.node import PRIVATE_UMASK, Node

    # Everything the node writes (database, results, work copies, logs) holds patient data:
    # nothing of it for other users, whatever umask the service manager gave us.
    os.umask(PRIVATE_UMASK)
    from dicom_node.cluster import ClusterError

    try:
        node = Node(config, preview=args.preview, roles=roles)
        node.start()
    except ClusterError as exc:
        print(f"orthonode serve: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"orthonode serve: cannot start: {exc} (is another node using port "
              f"{config.listener.port} or {config.http.port}?)", file=sys.stderr)
        return 1
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    from dicom_node.roles import describe_roles

    serving = (f"{'/'.join(config.listener.ae_titles)} on {config.listener.bind_address}:{config.listener.port}"
               if "listener" in roles else f"role {describe_roles(roles)}")
    print(f"orthonode: serving {serving}" + (f", health on {node.http_url}/healthz" if node.http_url else ""),
          flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
    return 0


# --------------------------------------------------------------------------- status


def configure_status(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("--limit", type=int, default=20, help="most recent studies shown (default 20)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def collect_status(factory: Any, limit: int = 20) -> dict[str, Any]:
    """Studies (most recent first) with their latest job and export counts, queue depths and
    the failures an operator has to look at (failed jobs, failed exports not withdrawn)."""
    from sqlalchemy import func, select

    from dicom_node.db import Export, ExportState, Job, JobState, Series, Study, session_scope

    with session_scope(factory) as session:
        studies = []
        for study in session.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(limit)):
            series = session.scalar(select(func.count()).select_from(Series).where(Series.study_id == study.id)) or 0
            instances = session.scalar(select(func.sum(Series.instance_count)).where(Series.study_id == study.id)) or 0
            job = session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc()).limit(1)).first()
            exports: dict[str, int] = {}
            if job is not None:
                for state, count in session.execute(
                    select(Export.state, func.count()).where(Export.job_id == job.id).group_by(Export.state)
                ):
                    exports[state.value] = count
            studies.append({
                "study_instance_uid": study.study_instance_uid,
                "state": study.state.value,
                "series": series,
                "instances": int(instances),
                "last_received": _when(study.last_received_at),
                "calling_ae_title": study.calling_ae_title,
                "job": None if job is None else {
                    "id": job.id, "state": job.state.value, "step": job.step, "attempts": job.attempts,
                    "outcome": (job.result_summary or {}).get("outcome"), "error": job.error,
                },
                "exports": exports,
            })
        jobs = {state.value: count
                for state, count in session.execute(select(Job.state, func.count()).group_by(Job.state))}
        exports_all = {state.value: count for state, count in
                       session.execute(select(Export.state, func.count()).group_by(Export.state))}
        failed_jobs = [
            {"id": j.id, "study_instance_uid": j.study.study_instance_uid, "error": j.error,
             "finished": _when(j.finished_at)}
            for j in session.scalars(select(Job).where(Job.state == JobState.FAILED).order_by(Job.id.desc()).limit(50))
        ]
        failed_exports = [
            {"id": e.id, "job_id": e.job_id, "study_instance_uid": e.job.study.study_instance_uid,
             "destination": e.destination, "kind": e.object_kind, "attempts": e.attempts, "error": e.last_error}
            for e in session.scalars(
                select(Export).join(Job).where(Export.state == ExportState.FAILED, Job.state != JobState.SUPERSEDED)
                .order_by(Export.id.desc()).limit(50)
            )
        ]
        waiting = [
            {"id": e.id, "destination": e.destination, "kind": e.object_kind, "attempts": e.attempts,
             "next_attempt": _when(e.next_attempt_at), "error": e.last_error}
            for e in session.scalars(
                select(Export).where(Export.state == ExportState.PENDING, Export.attempts > 0)
                .order_by(Export.next_attempt_at)
            )
        ]
    return {"studies": studies, "jobs": jobs, "exports": exports_all, "failed_jobs": failed_jobs,
            "failed_exports": failed_exports, "retrying_exports": waiting, **collect_processes(factory)}


def collect_processes(factory: Any) -> dict[str, Any]:
    """The registered node processes, and the workers holding job leases (running jobs): host,
    pid, job, heartbeat age."""
    from sqlalchemy import select

    from dicom_node.cluster import processes
    from dicom_node.db import Job, JobState, session_scope, utcnow

    now = utcnow()
    with session_scope(factory) as session:
        registered = [
            {"process": p.process_id, "host": p.host, "pid": p.pid, "roles": p.roles, "device": p.device,
             "started": _when(p.started_at), "heartbeat_age_seconds": round((now - p.heartbeat_at).total_seconds(), 1),
             "alive": p.alive(now)}
            for p in processes(session)
        ]
        leases = []
        for job in session.scalars(select(Job).where(Job.state == JobState.RUNNING).order_by(Job.id)):
            parts = (job.worker_id or "").rsplit(":", 2)  # host:pid:thread (dicom_node.services.jobs.worker_identity)
            host, pid, index = parts if len(parts) == 3 else (job.worker_id or "?", "?", "?")
            age = None if job.heartbeat_at is None else round((now - job.heartbeat_at).total_seconds(), 1)
            leases.append({"worker": job.worker_id, "host": host, "pid": pid, "thread": index, "job": job.id,
                           "study_instance_uid": job.study.study_instance_uid, "step": job.step,
                           "heartbeat_age_seconds": age})
    return {"processes": registered, "leases": leases}


def format_status(status: dict[str, Any]) -> str:
    lines = [
        "jobs:    " + (", ".join(f"{k} {v}" for k, v in sorted(status["jobs"].items())) or "none"),
        "exports: " + (", ".join(f"{k} {v}" for k, v in sorted(status["exports"].items())) or "none"),
        "",
        f"{'study':<64}  {'state':<10} {'series':>6} {'inst':>5}  {'last received':<19}  job",
    ]
    for s in status["studies"]:
        job = s["job"]
        job_text = "-" if job is None else (
            f"#{job['id']} {job['state']}" + (f" ({job['outcome']})" if job["outcome"] else "")
            + (f" step {job['step']}" if job["state"] == "running" else "")
        )
        if s["exports"]:
            job_text += "; exports " + ", ".join(f"{k} {v}" for k, v in sorted(s["exports"].items()))
        lines.append(f"{s['study_instance_uid']:<64}  {s['state']:<10} {s['series']:>6} {s['instances']:>5}  "
                     f"{s['last_received']:<19}  {job_text}")
    if not status["studies"]:
        lines.append("(no studies received yet)")
    if status.get("processes"):
        lines += ["", "processes:"]
        lines += [f"  {p['host']} pid {p['pid']}: {p['roles']}" + (f" on {p['device']}" if p["device"] else "")
                  + f", heartbeat {p['heartbeat_age_seconds']:.0f} s ago" + ("" if p["alive"] else " (gone)")
                  for p in status["processes"]]
    if status.get("leases"):
        lines += ["", "workers holding jobs:"]
        lines += [f"  {w['host']} pid {w['pid']} thread {w['thread']}: job {w['job']} (study "
                  f"{w['study_instance_uid']}, step {w['step']}), heartbeat "
                  + ("never" if w["heartbeat_age_seconds"] is None else f"{w['heartbeat_age_seconds']:.0f} s ago")
                  for w in status["leases"]]
    if status["retrying_exports"]:
        lines += ["", "exports waiting for a retry:"]
        lines += [f"  export {e['id']} {e['kind']} -> {e['destination']}: attempt {e['attempts']} failed, next at "
                  f"{e['next_attempt']}: {e['error']}" for e in status["retrying_exports"]]
    if status["failed_jobs"] or status["failed_exports"]:
        lines += ["", "FAILURES:"]
        lines += [f"  job {j['id']} study {j['study_instance_uid']}: {j['error']}" for j in status["failed_jobs"]]
        lines += [f"  export {e['id']} (job {e['job_id']}) {e['kind']} -> {e['destination']} after {e['attempts']} "
                  f"attempt(s): {e['error']}" for e in status["failed_exports"]]
        if status["failed_exports"]:
            lines.append("  `orthonode retry` queues failed exports again")
        if status["failed_jobs"]:
            lines.append("  `orthonode retry --jobs` queues failed jobs again")
    return "\n".join(lines)


def _factory(config: Any) -> Any:
    from dicom_node.db import make_engine, make_session_factory, upgrade_database

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its set-up lines would bury the answer
    upgrade_database(config.database_url)
    return make_session_factory(make_engine(config.database_url))


def run_status(args: argparse.Namespace) -> int:
    from dicom_node.config import ConfigError

    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"orthonode status: {exc}", file=sys.stderr)
        return 2
    status = collect_status(_factory(config), limit=args.limit)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


# --------------------------------------------------------------------------- retry


def configure_retry(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("ids", nargs="*", type=int, metavar="ID",
                        help="failed exports (or with --jobs, failed jobs) to queue again (default: all)")
    parser.add_argument("--destination", help="only failed exports to this destination")
    parser.add_argument("--jobs", action="store_true",
                        help="queue failed jobs (studies whose processing failed) instead of exports")


def run_retry(args: argparse.Namespace) -> int:
    from dicom_node.config import ConfigError
    from dicom_node.services.export import ExportError, retry_failed

    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"orthonode retry: {exc}", file=sys.stderr)
        return 2
    if args.jobs:
        from dicom_node.services.jobs import retry_failed_jobs

        if args.destination is not None:
            print("orthonode retry: --destination applies to exports, not to --jobs", file=sys.stderr)
            return 2
        try:
            ids = retry_failed_jobs(_factory(config), args.ids)
        except (LookupError, ValueError) as exc:
            print(f"orthonode retry: {exc}", file=sys.stderr)
            return 1
        print(f"queued again: {len(ids)} job(s)" + (f" ({', '.join(map(str, ids))})" if ids else ""))
        return 0
    if args.destination is not None and args.destination not in config.export.destinations:
        print(f"orthonode retry: --destination {args.destination!r} is not in export.destinations of {args.config} "
              f"({', '.join(config.export.destinations)})", file=sys.stderr)
        return 2
    try:
        ids = retry_failed(_factory(config), args.ids, args.destination)
    except ExportError as exc:
        print(f"orthonode retry: {exc}", file=sys.stderr)
        return 1
    print(f"queued again: {len(ids)} export(s)" + (f" ({', '.join(map(str, ids))})" if ids else ""))
    return 0


# --------------------------------------------------------------------------- echo


def configure_echo(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("destination", help="a name from export.destinations in node.yaml (e.g. pacs)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def run_echo(args: argparse.Namespace) -> int:
    from dicom_node.config import ConfigError
    from dicom_node.services.export import echo

    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"orthonode echo: {exc}", file=sys.stderr)
        return 2
    destination = config.export.destinations.get(args.destination)
    if destination is None:
        print(f"orthonode echo: {args.destination!r} is not in export.destinations of {args.config} "
              f"(configured: {', '.join(config.export.destinations) or 'none'})", file=sys.stderr)
        return 2
    ok, detail = echo(destination, config.listener.ae_titles[0], timeout=args.timeout)
    print(f"{args.destination}: {detail}")
    return 0 if ok else 1
