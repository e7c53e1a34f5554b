"""Throughput of 1, 2 and 4 worker processes on one PostgreSQL: studies per minute.

For each worker count, on a fresh database and data folder:

1. one ``orthonode serve --role listener`` receives ``--studies`` phantom knees (dcmtk
   ``storescu``); the study assembler queues a job per study; the listener is then stopped, so
   nothing but the workers uses the CPU while they are timed;
2. that many ``orthonode serve --role worker --device cpu`` processes (one torch thread each,
   the ``small`` preset with seeded random weights, model preloaded) run the queue empty.

Figures, from the jobs' ``started_at`` / ``finished_at`` in the database:

* end to end: studies / (last job finished - worker processes started): includes each
  process's start-up and model load;
* steady state: the jobs finished after the K-th finish, over the time from the K-th finish to
  the last (K = worker processes), so each worker's first job (which waits for its model) is
  left out.

No exporter runs (the results stay in the data folder): this measures the workers.  The
PostgreSQL server is a local throw-away one (:mod:`dicom_node.local_postgres`, ``fsync=off``).

    .venv/bin/python benchmarks/scale_out.py --studies 16 --workers 1 2 4 \\
        --out benchmarks/results/scale_out.md
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def _node_yaml(folder: Path, data_dir: Path, database_url: str, checkpoint: Path, listener_port: int) -> Path:
    data = {
        "node": {"name": "scale-out", "data_dir": str(data_dir)},
        "listener": {"port": listener_port, "allowed_callers": [{"ae_title": "STORESCU", "hosts": ["127.0.0.1"]}]},
        "storage": {"min_free_mb": 1},
        "database": {"url": database_url},
        "study_assembly": {"series_quiet_seconds": 1, "study_quiet_seconds": 1, "forced_after_seconds": 60},
        "jobs": {"device": "cpu", "torch_threads": 1, "preload_model": True, "lease_seconds": 60},
        "model": {"checkpoint": str(checkpoint)},
        "export": {"destinations": {"pacs": {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
                                             "port": _free_port()}},
                   "routes": [{"match": {}, "destinations": ["pacs"]}]},
        "http": {"enabled": False},
        "logging": {"level": "INFO"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _serve(config: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config), "--role", role]
    if role == "worker":
        args += ["--device", "cpu"]
    with open(log, "ab") as handle:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait(predicate: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{what}: a node process exited with {dead[0].returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_one(workers: int, studies: list[Path], checkpoint: Path, server: Any, work: Path) -> dict[str, Any]:
    from sqlalchemy import func, select

    from dicom_node.db import Job, JobState, make_engine, make_session_factory, session_scope

    url = server.create_database("scale_out")
    folder = work / f"workers-{workers}"
    config = _node_yaml(folder, folder / "data", url, checkpoint, _free_port())
    port = yaml.safe_load(config.read_text())["listener"]["port"]
    engine = make_engine(url)
    factory = make_session_factory(engine)

    def count(state: JobState | None = None) -> int:
        with session_scope(factory) as session:
            query = select(func.count()).select_from(Job)
            if state is not None:
                query = query.where(Job.state == state)
            return int(session.scalar(query) or 0)

    listener = _serve(config, "listener", folder / "listener.log")
    try:
        time.sleep(0.5)
        _wait(lambda: _port_open(port), 60, "the listener", [listener])
        sent = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "ORTHONODE", "-nh", "+sd", "+r",
                               "127.0.0.1", str(port), *map(str, studies)], capture_output=True, text=True,
                              timeout=600)
        if sent.returncode != 0:
            raise RuntimeError(f"storescu exited {sent.returncode}: {sent.stderr[-1000:]}")
        _wait(lambda: count(JobState.QUEUED) == len(studies), 120, "a queued job per study", [listener])
    finally:
        _stop([listener])

    started = time.time()
    procs = [_serve(config, "worker", folder / f"worker-{i}.log") for i in range(workers)]
    try:
        _wait(lambda: count(JobState.DONE) == len(studies), 1800, "every job done", procs)
    finally:
        _stop(procs)
    with session_scope(factory) as session:
        rows = session.execute(select(Job.started_at, Job.finished_at, Job.worker_id)).all()
    engine.dispose()
    starts = sorted(r.started_at.timestamp() for r in rows)
    finishes = sorted(r.finished_at.timestamp() for r in rows)
    per_process = {r.worker_id.rsplit(":", 1)[0] for r in rows}
    end_to_end = finishes[-1] - started
    steady_window = finishes[-1] - finishes[workers - 1]
    steady_jobs = len(finishes) - workers
    return {
        "workers": workers,
        "studies": len(rows),
        "processes_used": len(per_process),
        "end_to_end_s": end_to_end,
        "end_to_end_per_min": 60 * len(rows) / end_to_end,
        "steady_per_min": 60 * steady_jobs / steady_window if steady_window > 0 else float("nan"),
        "job_s_median": statistics.median(f - s for f, s in zip(
            [r.finished_at.timestamp() for r in rows], [r.started_at.timestamp() for r in rows])),
        "first_start_s": starts[0] - started,
    }


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--matrix", type=int, default=256, help="phantom matrix (default %(default)s)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from benchmarks.predict import build_bundle
    from dicom_node.local_postgres import LocalPostgres, available
    from training.phantoms.generate import generate_dataset

    why_not = available()
    if why_not:
        print(f"scale_out: {why_not}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
        work = Path(tmp)
        checkpoint = work / f"{args.preset}.pt"
        build_bundle(args.preset).save(checkpoint)
        generate_dataset(work / "knees", "knee", args.studies, seed=5, matrix=args.matrix)
        studies = sorted(p / "dicom" for p in (work / "knees").iterdir() if (p / "dicom").is_dir())
        results = []
        with LocalPostgres() as server:
            for workers in args.workers:
                result = run_one(workers, studies, checkpoint, server, work)
                print(f"{workers} worker process(es): {result['end_to_end_per_min']:.1f} studies/min end to end, "
                      f"{result['steady_per_min']:.1f} steady", flush=True)
                results.append(result)
    base = next((r for r in results if r["workers"] == 1), results[0])
    lines = [
        "# Scale-out: worker processes on one PostgreSQL",
        "",
        f"Command: `.venv/bin/python benchmarks/{Path(__file__).name} {' '.join(argv or sys.argv[1:])}`",
        f"Machine: {_machine()}; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end.",
        f"Model: `{args.preset}` preset, seeded random weights (same compute as a trained one), on the CPU, one "
        f"torch thread per worker process. Studies: {args.studies} phantom knees, matrix {args.matrix}, three "
        f"planes. Each row: a fresh database and data folder; the listener stores every study and is stopped "
        f"before the workers start; no exporter runs.",
        "",
        "| worker processes | studies | end to end s | studies/min, end to end | studies/min, steady state | "
        "x one worker (steady) | median job s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(f"| {r['workers']} | {r['studies']} | {r['end_to_end_s']:.1f} | {r['end_to_end_per_min']:.1f} | "
                     f"{r['steady_per_min']:.1f} | {r['steady_per_min'] / base['steady_per_min']:.2f} | "
                     f"{r['job_s_median']:.2f} |")
    lines += [
        "",
        "End to end counts from the moment the worker processes were started (start-up and model load "
        "included); steady state leaves out each process's first job (see the module docstring).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
