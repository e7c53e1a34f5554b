"""Study latency of a running node: from the last instance received to SEG and SR acknowledged
by the PACS, split by stage, for the small and the paper-size model.

Per preset the benchmark starts a real ``orthonode serve`` (subprocess, SQLite, local storage,
short quiet period) whose checkpoint is :func:`benchmarks.predict.build_bundle` saved to disk
(seeded random weights: timings do not depend on training), and a destination PACS on
loopback (a pynetdicom storage SCP in this process that records when each object arrived).
Then it sends phantom knee studies (one generated study at ``--matrix``, copied with fresh
UIDs per send) with dcmtk ``storescu`` (or pynetdicom, ``--sender``, on a machine without
dcmtk) and waits until the PACS holds every object the node's job queued for export.

Where each time comes from (all wall-clock, one machine):

* last instance acknowledged: ``storescu`` exited 0, or pynetdicom got 0x0000 for the last
  file (the node commits each instance before it answers, so ``max(instances.received_at)``
  is the node's own record of it);
* quiet-period wait: ``jobs.created_at`` minus the node's last ``instances.received_at``
  (reported apart, not counted as overhead: it is configuration);
* queue wait: ``jobs.started_at - jobs.created_at``;
* run_study stages: the job's ``result_summary.timings`` (read/decode, select, preprocess,
  model forward, write) and the rest of ``run_study`` (EHR, template, volume measurements);
* job outside run_study: ``finished_at - started_at - timings.total`` (checking the
  instance files, model load on the first job, reading the results back, the finishing commit);
  the model load is also given on its own from the node's log;
* export: from ``jobs.finished_at`` (exports are queued in that same transaction) until the
  PACS's C-STORE handler returned success for the last of the job's objects.

Overhead = (last PACS acknowledgement - end of the quiet period) - model forward time, given
as a fraction of the model time (the target is under 25 %) and of that whole span.  The first
``--warmup`` studies per node include loading the model and first-call costs; they are shown
but left out of the summary.

    .venv/bin/python benchmarks/latency.py --presets small paper --out benchmarks/results/latency.md
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # the benchmarks' shared pieces
    sys.path.insert(0, str(ROOT / "benchmarks"))

from crash_consistency import Pacs as StoragePacs, stop_process  # noqa: E402

#: the node's AE title, the sender's and the PACS's (the node.yaml written here allows the sender)
NODE_AE, SENDER_AE, PACS_AE = "ORTHONODE", "STORESCU", "PACS"
#: run_study stages of the table, each a sum of ``inference.pipeline.STAGES`` entries
RUN_STUDY_COLUMNS: dict[str, tuple[str, ...]] = {
    "read/decode": ("scan", "load"),
    "select": ("select",),
    "preprocess": ("preprocess",),
    "model": ("model",),
    "write": ("write",),
}
#: the overhead target of the issue: overhead beyond the model's forward passes, as a fraction of them
TARGET = 0.25


class BenchmarkError(RuntimeError):
    """The study did not make it through the node (message says where it stopped)."""


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def epoch(value: str | None) -> float | None:
    """Seconds since the epoch of a timestamp column as SQLite returns it (UTC, maybe no offset)."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        from datetime import timezone

        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


#: ``logging`` asctime of the node's log (local time, milliseconds after a comma)
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_time(line: str) -> float | None:
    """Epoch seconds of a node log line (its asctime is local time of this same machine)."""
    match = _LOG_TIME.match(line)
    if match is None:
        return None
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000


def machine_description(device: str) -> str:
    """CPU model and cores, memory, and the GPU when one is used (what the timings depend on)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPU(s){memory}"
    import torch

    text += f"; torch {torch.__version__}"
    if device in ("auto", "cuda") and torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    return text


# --------------------------------------------------------------------------- the PACS


class Pacs(StoragePacs):
    """The benchmarks' loopback storage SCP, also recording when each object arrived.

    The time is taken when the C-STORE handler returns success; pynetdicom sends the response
    right after, so it is the moment the PACS acknowledged the object (to within the time it
    takes to encode one response).
    """

    def __init__(self, port: int) -> None:
        super().__init__(port)
        #: SOP Instance UID -> (arrival time, Modality)
        self.arrivals: dict[str, tuple[float, str]] = {}

    def _store(self, event: Any) -> int:
        ds = event.dataset
        with self._lock:
            self.arrivals.setdefault(str(ds.SOPInstanceUID), (time.time(), str(ds.get("Modality", ""))))
        return super()._store(event)

    def arrival(self, sop_instance_uid: str) -> float | None:
        with self._lock:
            found = self.arrivals.get(sop_instance_uid)
        return None if found is None else found[0]


# --------------------------------------------------------------------------- the node


class NodeProcess:
    """``orthonode serve`` with a node.yaml in ``work``: loopback listener, SQLite, one worker."""

    def __init__(self, work: Path, checkpoint: Path, pacs_port: int, *, quiet: float, device: str,
                 threads: int | None) -> None:
        import yaml

        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.data = work / "data"
        self.port, self.http_port = free_port(), free_port()
        self.threads = threads
        self.log_path = work / "serve.log"
        config = {
            "node": {"name": "orthonode-latency", "data_dir": str(self.data)},
            "listener": {"port": self.port, "ae_titles": [NODE_AE],
                         "allowed_callers": [{"ae_title": SENDER_AE, "hosts": ["127.0.0.1"]}]},
            "storage": {"min_free_mb": 1},
            "study_assembly": {"series_quiet_seconds": quiet, "study_quiet_seconds": quiet,
                               "forced_after_seconds": 600},
            "jobs": {"device": device, "workers": 1},
            "model": {"checkpoint": str(checkpoint)},
            "export": {
                "destinations": {"pacs": {"type": "dimse", "ae_title": PACS_AE, "host": "127.0.0.1",
                                          "port": pacs_port}},
                "retry": {"max_attempts": 3, "initial_delay_seconds": 1, "max_delay_seconds": 2},
            },
            "http": {"port": self.http_port},
            "logging": {"level": "INFO"},
        }
        self.config_path = work / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        from dicom_node.health import answers_healthy

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchmarkError(f"orthonode serve exited with {self.proc.returncode} at start-up:\n"
                                     f"{self.log_tail()}")
            if answers_healthy(self.http_port):
                return
            time.sleep(0.2)
        raise BenchmarkError(f"orthonode serve did not answer /healthz within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection to the node's SQLite database (WAL: it does not block the node)."""
        conn = sqlite3.connect(f"file:{self.data / 'orthonode.sqlite'}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def log_tail(self, lines: int = 12) -> str:
        return "\n".join(self.log_lines()[-lines:]) or "(the node wrote no log)"


# --------------------------------------------------------------------------- studies


def generate_study(root: Path, matrix: int) -> Path:
    """One phantom knee study (three planes, uncompressed) as ``predict.py`` times it."""
    from training.phantoms.generate import generate_dataset

    generate_dataset(root / "knee", "knee", 1, seed=0, matrix=matrix)
    return root / "knee" / "knee_0001" / "dicom"


def fresh_study(source: Path, target: Path, index: int) -> str:
    """``source`` copied to ``target`` with fresh UIDs, so that every send is a new study for the
    node; returns the Study Instance UID."""
    import pydicom

    from crash_consistency import copy_with_new_uids

    files = copy_with_new_uids(source, target, f"LATENCY{index:04d}")
    if not files:
        raise BenchmarkError(f"no .dcm files under {source}")
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def send_study(folder: Path, port: int, timeout: float, sender: str) -> tuple[float, float, int]:
    """Send every file under ``folder`` in one association; (start, end, files) in epoch seconds.

    ``sender`` is ``storescu`` (dcmtk, what a PACS-like sender does) or ``pynetdicom`` (for a
    machine without dcmtk).  ``end`` is when the last instance was acknowledged: storescu exited
    0, or pynetdicom got status 0x0000 for the last file (the release follows).
    """
    files = sorted(folder.rglob("*.dcm"))
    if not files:
        raise BenchmarkError(f"no .dcm files under {folder}")
    started = time.time()
    if sender == "storescu":
        command = ["storescu", "-aet", SENDER_AE, "-aec", NODE_AE, "-nh", "+sd", "+r", "127.0.0.1", str(port),
                   str(folder)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"storescu did not finish sending {folder} within {timeout:.0f} s") from None
        ended = time.time()
        if done.returncode != 0:
            raise BenchmarkError(f"storescu exited {done.returncode} sending {folder}: {done.stderr[-2000:]}")
        return started, ended, len(files)
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE

    metas = [read_file_meta_info(f) for f in files]
    ae = AE(ae_title=SENDER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for abstract, syntax in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(abstract, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        raise BenchmarkError(f"the node at 127.0.0.1:{port} did not accept an association from {SENDER_AE}")
    try:
        for path in files:
            response = assoc.send_c_store(path)
            status = response.get("Status") if response is not None else None
            if status != 0x0000:
                raise BenchmarkError(f"C-STORE of {path} answered {status!r} (expected 0x0000)")
        ended = time.time()
    finally:
        if assoc.is_established:
            assoc.release()
    return started, ended, len(files)


# --------------------------------------------------------------------------- one study


@dataclass
class StudyTiming:
    """Where the time of one study went (seconds) and what the node recorded about it."""

    preset: str
    index: int
    warmup: bool
    instances: int
    device: str
    send: float
    quiet: float
    queue: float
    stages: dict[str, float]
    run_study_rest: float
    job_outside: float
    model_load: float | None
    export: float
    post_quiet: float
    from_last_ack: float
    objects: list[str] = field(default_factory=list)

    @property
    def model(self) -> float:
        return self.stages["model"]

    @property
    def overhead(self) -> float:
        return self.post_quiet - self.model


def wait_for_export(node: NodeProcess, pacs: Pacs, study_uid: str, timeout: float) -> dict[str, Any]:
    """Wait until the study's job is done and the PACS holds every object it queued; the rows read.

    Raises :class:`BenchmarkError` naming where the study stopped (job failed or skipped, an
    export failed for good, the node exited, or the timeout).
    """
    deadline = time.monotonic() + timeout
    state = "the study has not reached the node's database"
    while time.monotonic() < deadline:
        if not node.alive():
            raise BenchmarkError(f"orthonode serve exited ({node.proc.returncode if node.proc else '?'}) while "
                                 f"study {study_uid} was in flight:\n{node.log_tail()}")
        with node.db() as conn:
            study = conn.execute("SELECT * FROM studies WHERE study_instance_uid = ?", (study_uid,)).fetchone()
            job = None if study is None else conn.execute(
                "SELECT * FROM jobs WHERE study_id = ? AND state != 'superseded' ORDER BY id DESC LIMIT 1",
                (study["id"],)).fetchone()
            exports = [] if job is None else conn.execute(
                "SELECT * FROM exports WHERE job_id = ? ORDER BY id", (job["id"],)).fetchall()
        if study is not None:
            state = f"study {study['state']}" + ("" if job is None else f", job {job['id']} {job['state']} "
                                                                       f"(step {job['step']})")
        if job is not None and job["state"] == "failed":
            raise BenchmarkError(f"study {study_uid} was not exported: job {job['id']} failed: {job['error']}")
        if study is not None and study["state"] == "skipped":
            raise BenchmarkError(f"study {study_uid} was not exported: the node skipped it (unsupported); "
                                 f"see {node.log_path}")
        if job is not None and job["state"] == "done":
            if not exports:
                raise BenchmarkError(f"study {study_uid} was not exported: job {job['id']} queued no export "
                                     f"(no route, or no result objects); see {node.log_path}")
            failed = [e for e in exports if e["state"] == "failed"]
            if failed:
                raise BenchmarkError(f"study {study_uid} was not exported: {failed[0]['object_kind']} to "
                                     f"{failed[0]['destination']} failed: {failed[0]['last_error']}")
            kinds = {e["object_kind"] for e in exports}
            if not {"seg", "sr"} <= kinds:
                raise BenchmarkError(f"study {study_uid}: job {job['id']} exported {sorted(kinds)}, "
                                     f"not both a SEG and an SR")
            if all(pacs.arrival(e["sop_instance_uid"]) is not None for e in exports):
                with node.db() as conn:
                    last_received = conn.execute(
                        "SELECT MAX(i.received_at) FROM instances i JOIN series s ON i.series_id = s.id "
                        "WHERE s.study_id = ?", (study["id"],)).fetchone()[0]
                return {"study": dict(study), "job": dict(job), "exports": [dict(e) for e in exports],
                        "last_received": last_received}
        time.sleep(0.1)
    raise BenchmarkError(f"study {study_uid} was not exported within {timeout:.0f} s (last seen: {state}); "
                         f"node log tail:\n{node.log_tail()}")


def model_load_seconds(lines: list[str], job_id: int) -> float | None:
    """From the node log: ``job N started`` to ``model ... loaded`` when job N loaded the model."""
    started = None
    for line in lines:
        if started is None and re.search(rf": job {job_id} started ", line):
            started = log_time(line)
        elif started is not None and re.search(r" model .* loaded from ", line):
            loaded = log_time(line)
            return None if loaded is None else loaded - started
        elif started is not None and re.search(rf": job {job_id} done ", line):
            return None  # the model was already in memory
    return None


def measure_study(node: NodeProcess, pacs: Pacs, folder: Path, study_uid: str, *, preset: str, index: int,
                  warmup: bool, timeout: float, sender: str) -> StudyTiming:
    send_started, acked, instances = send_study(folder, node.port, timeout, sender)
    rows = wait_for_export(node, pacs, study_uid, timeout)
    job = rows["job"]
    summary = job["result_summary"]
    summary = json.loads(summary) if isinstance(summary, str) else summary
    timings: dict[str, float] = summary["timings"]
    last_received = epoch(rows["last_received"])
    created, started, finished = epoch(job["created_at"]), epoch(job["started_at"]), epoch(job["finished_at"])
    if last_received is None or created is None or started is None or finished is None:
        raise BenchmarkError(f"study {study_uid}: job {job['id']} is done but lacks a timestamp (created "
                             f"{job['created_at']}, started {job['started_at']}, finished {job['finished_at']}, "
                             f"last instance {rows['last_received']})")
    pacs_last = max(pacs.arrival(e["sop_instance_uid"]) or 0.0 for e in rows["exports"])
    stages = {name: sum(float(timings.get(s, 0.0)) for s in parts) for name, parts in RUN_STUDY_COLUMNS.items()}
    total = float(timings["total"])
    return StudyTiming(
        preset=preset, index=index, warmup=warmup, instances=instances, device=str(summary.get("device", "?")),
        send=acked - send_started, quiet=created - last_received, queue=started - created, stages=stages,
        run_study_rest=total - sum(stages.values()), job_outside=(finished - started) - total,
        model_load=model_load_seconds(node.log_lines(), int(job["id"])), export=pacs_last - finished,
        post_quiet=pacs_last - created, from_last_ack=pacs_last - acked,
        objects=sorted(e["object_kind"] for e in rows["exports"]),
    )


# --------------------------------------------------------------------------- one preset


def run_preset(preset: str, study: Path, work: Path, args: argparse.Namespace) -> tuple[list[StudyTiming], str]:
    """Start a node with ``preset``, send warm-up and measured studies; timings and load averages."""
    from benchmarks.predict import build_bundle

    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / f"{preset}.pt"
    build_bundle(preset).save(checkpoint)
    pacs = Pacs(free_port())
    pacs.start()
    node = NodeProcess(work / "node", checkpoint, pacs.port, quiet=args.quiet, device=args.device,
                       threads=args.threads)
    load_before = os.getloadavg()
    results: list[StudyTiming] = []
    try:
        node.start()
        for i in range(args.warmup + args.repeat):
            folder = work / "studies" / f"study{i:02d}"
            study_uid = fresh_study(study, folder, i)
            timing = measure_study(node, pacs, folder, study_uid, preset=preset, index=i,
                                   warmup=i < args.warmup, timeout=args.timeout, sender=args.sender)
            results.append(timing)
            print(f"{preset} study {i}{' (warm-up)' if timing.warmup else ''}: {timing.from_last_ack:.1f} s from the "
                  f"last instance to the PACS, model {timing.model:.1f} s, overhead {timing.overhead:.1f} s",
                  flush=True)
    finally:
        node.stop()
        pacs.stop()
    load_after = os.getloadavg()
    return results, f"{load_before[0]:.1f} / {load_after[0]:.1f}"


# --------------------------------------------------------------------------- report


def _python() -> str:
    """How the report names the interpreter: relative to the repository when it is its virtualenv."""
    executable = Path(sys.executable)
    try:
        return str(executable.relative_to(ROOT))
    except ValueError:
        return executable.name


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value: float) -> str:
    return f"{100 * value:.0f} %"


def report(rows: list[StudyTiming], loads: dict[str, str], args: argparse.Namespace, argv: list[str],
           machine: str) -> str:
    from inference.model import PRESETS

    columns = ["send", "quiet wait", "queue wait", *RUN_STUDY_COLUMNS, "rest of run_study", "job outside run_study",
               "export", "after quiet (total)", "overhead", "overhead / model", "overhead / total",
               "last ack -> PACS"]
    lines = [
        "# Study latency: last instance received -> SEG and SR acknowledged by the PACS",
        "",
        f"Machine: {machine}; Python {platform.python_version()}.",
        "Command: `" + " ".join([_python(), "benchmarks/latency.py", *argv]) + "`",
        f"Node: `orthonode serve` (SQLite, local storage, one worker, device `{args.device}`"
        + (f", OMP_NUM_THREADS={args.threads}" if args.threads else ", torch's default threads")
        + f"), quiet period {args.quiet:g} s (series and study); PACS: pynetdicom storage SCP on loopback; "
        f"sender: {'dcmtk storescu' if args.sender == 'storescu' else 'pynetdicom'}, one association.",
        f"Study: one phantom knee (matrix {args.matrix}, three planes, {rows[0].instances} instances, uncompressed; "
        f"results exported: {', '.join(rows[0].objects)}), copied with fresh UIDs per "
        f"send; {args.warmup} warm-up study(ies) per node (model load, first calls), then {args.repeat} measured.",
        "Load average (1 min) before / after each preset: "
        + ", ".join(f"{p} {v}" for p, v in loads.items()) + ".",
        "",
        "All times in seconds. *After quiet (total)* runs from the end of the quiet period (job queued) to the "
        "PACS's acknowledgement of the last of SEG and SR; *overhead* is that minus the model's forward time.",
        "",
        "| preset | study | device | " + " | ".join(columns) + " |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for row in rows:
        cells = [row.send, row.quiet, row.queue, *row.stages.values(), row.run_study_rest, row.job_outside, row.export,
                 row.post_quiet, row.overhead]
        text = [_fmt(c) for c in cells] + [_percent(row.overhead / row.model), _percent(row.overhead / row.post_quiet),
                                           _fmt(row.from_last_ack)]
        label = f"{row.index}" + (" (warm-up)" if row.warmup else "")
        lines.append(f"| {row.preset} | {label} | {row.device} | " + " | ".join(text) + " |")
    lines += ["", "## Summary (measured studies, median)", "",
              "| preset | input | model forward (s) | after quiet (s) | overhead (s) | overhead / model "
              "| overhead / total | target < 25 % of model | model load on the first job (s) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for preset in dict.fromkeys(r.preset for r in rows):
        measured = [r for r in rows if r.preset == preset and not r.warmup] or [r for r in rows if r.preset == preset]
        model = statistics.median(r.model for r in measured)
        post = statistics.median(r.post_quiet for r in measured)
        overhead = statistics.median(r.overhead for r in measured)
        share = statistics.median(r.overhead / r.model for r in measured)
        share_total = statistics.median(r.overhead / r.post_quiet for r in measured)
        loads_model = [r.model_load for r in rows if r.preset == preset and r.model_load is not None]
        shape = "x".join(map(str, PRESETS[preset].input_shape))
        verdict = "met" if share < TARGET else "NOT met"
        lines.append(f"| {preset} | 1x{shape} | {model:.2f} | {post:.2f} | {overhead:.2f} | {_percent(share)} | "
                     f"{_percent(share_total)} | {verdict} | {_fmt(loads_model[0] if loads_model else None)} |")
    lines += [
        "",
        "## Where the times come from",
        "",
        "- *quiet wait*: `jobs.created_at` minus the node's last `instances.received_at` of the study (configured "
        "quiet period plus the assembler's timer latency); not counted as overhead.",
        "- *queue wait*: `jobs.started_at - jobs.created_at`.",
        "- run_study stages: the job's `result_summary.timings` (read/decode = scan + load; model = network "
        "forwards only, synchronised by the copy of the outputs to the host); *rest of run_study*: its total "
        "minus those stages (EHR, template, volume measurements).",
        "- *job outside run_study*: `finished_at - started_at -` run_study's total: checking the instance "
        "files, model load on the first job of a node, reading the results back, result.json and the finishing "
        "transaction that also queues the exports. The node records no time for when run_study starts or ends "
        "(the job's `step` column is overwritten), so this part is not split further; the model load is taken "
        "from the node's log (`job N started` to `model ... loaded`).",
        "- *export*: `jobs.finished_at` (exports are queued in that transaction and the exporter is woken) to the "
        "PACS's C-STORE handler returning success for the last of the job's objects. The node keeps no time "
        "for when the exporter picked an export up (`exports.updated_at` is overwritten when it is done).",
        "- *send*: the sender's whole run (association, every C-STORE). *last ack -> PACS*: from the last "
        "instance acknowledged (`storescu` exited 0, or pynetdicom's last 0x0000) to the last PACS "
        "acknowledgement; it includes the quiet wait.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "paper"], help="model presets (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="node.yaml jobs.device (default %(default)s: CUDA when present)")
    parser.add_argument("--repeat", type=int, default=1, help="measured studies per preset (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="studies sent first to each node and reported apart: model load and first calls "
                             "(default %(default)s)")
    parser.add_argument("--quiet", type=float, default=2.0, help="series and study quiet seconds (default %(default)s)")
    parser.add_argument("--matrix", type=int, default=256, help="phantom acquisition matrix (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the node (default: unset, torch's own default)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for one study to reach the PACS (default %(default)s)")
    parser.add_argument("--sender", choices=("auto", "storescu", "pynetdicom"), default="auto",
                        help="what sends the study: dcmtk storescu, or pynetdicom where dcmtk is missing "
                             "(default %(default)s: storescu when on PATH)")
    parser.add_argument("--work", type=Path, help="keep the node's files here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.quiet <= 0:
        parser.error("--quiet must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    from inference.model import PRESETS

    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        parser.error(f"--presets: unknown preset(s) {unknown}; presets are {sorted(PRESETS)}")
    if args.sender == "auto":
        args.sender = "storescu" if shutil.which("storescu") else "pynetdicom"
    elif args.sender == "storescu" and shutil.which("storescu") is None:
        parser.error("--sender storescu: dcmtk's storescu is not on PATH (use --sender pynetdicom)")

    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty (each run starts fresh nodes and studies there)")
    work = args.work or Path(tempfile.mkdtemp(prefix="orthonode-latency-"))
    rows: list[StudyTiming] = []
    loads: dict[str, str] = {}
    try:
        study = generate_study(work / "phantom", args.matrix)
        for preset in args.presets:
            results, loads[preset] = run_preset(preset, study, work / preset, args)
            rows.extend(results)
    except BenchmarkError as exc:
        print(f"latency benchmark failed: {exc}", file=sys.stderr)
        print(f"node files kept in {work}", file=sys.stderr)
        return 1
    text = report(rows, loads, args, sys.argv[1:] if argv is None else argv, machine_description(args.device))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
