"""Crash consistency of ``orthonode serve`` under SIGKILL, and exactly-once delivery across a
PACS outage.

Scenario ``kill`` (the default): several senders store phantom knee studies (pynetdicom, each
data set sent byte for byte, each sender resending from its first unacknowledged file after a
failure) while the node is killed with SIGKILL at random moments and restarted.  After every
kill, with the node down, the checks are:

* every instance a sender saw acknowledged is on disk at its path, its data set byte-identical
  to what was sent, and in the database with the checksum of the file on disk;
* every file visible under the storage root (temporaries are dot-files) is complete: its data
  set equals what was sent for that SOP Instance UID.

With ``--drop-unacknowledged-names``, after each kill the files of the newest recorded but
unacknowledged instances are deleted before the restart, as a power loss may drop folder entries
that were not fsynced yet (the node commits a batch's new rows while their folders are fsynced);
SIGKILL alone cannot lose them.  The restarted node must forget those rows, and the senders
store the instances again.

At the end the node runs undisturbed until every job and export settled; then every study
must have been processed by exactly one finished job and its results delivered to the PACS
(an in-process pynetdicom receiver) exactly once per object, and each delivered object counted.

Scenario ``outage``: the PACS is down while the studies are processed, the node is killed
during the outage and restarted, then the PACS comes back; every result must arrive, none twice.

    .venv/bin/python benchmarks/crash_consistency.py --scenario kill --kills 24 --studies 6 --senders 3 \\
        --checkpoint /path/to/model.pt --out benchmarks/results/crash_consistency.md
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

MATRIX = 64


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def body_of(data: bytes) -> bytes:
    """The encoded data set of a DICOM file (what follows the file meta group)."""
    if data[128:132] != b"DICM":
        raise ValueError("no DICM prefix")
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM ``proc`` and wait for it (30 s), then SIGKILL it: a clean stop of ``orthonode serve``."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class Study:
    uid: str
    files: list[Path]


def copy_with_new_uids(source: Path, target: Path, patient_id: str) -> list[Path]:
    """Every ``.dcm`` under ``source`` copied to the same relative path under ``target`` with fresh
    Study, Series, SOP Instance and Frame of Reference UIDs (one new UID per old one, so the
    series structure holds) and ``patient_id``: to the node, a new study.  Returns the copies."""
    import pydicom
    from pydicom.uid import generate_uid

    mapping: dict[str, str] = {}

    def new(uid: object) -> str:
        return mapping.setdefault(str(uid), generate_uid())

    files = []
    for path in sorted(source.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = new(ds.StudyInstanceUID)
        ds.SeriesInstanceUID = new(ds.SeriesInstanceUID)
        ds.SOPInstanceUID = new(ds.SOPInstanceUID)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = new(ds.FrameOfReferenceUID)
        ds.PatientID = patient_id
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    return files


def make_studies(root: Path, count: int, seed: int = 5) -> list[Study]:
    """``count`` knee studies: three generated phantom knees, copied with fresh UIDs (study,
    series, instances, frame of reference) and patient IDs."""
    import pydicom

    from training.phantoms.generate import generate_dataset

    source = root / "phantoms"
    if not (source / "cases.csv").exists():
        generate_dataset(source, "knee", 3, seed=seed, matrix=MATRIX)
    cases = sorted(p / "dicom" for p in source.glob("knee_*") if p.is_dir())
    studies = []
    for i in range(count):
        files = copy_with_new_uids(cases[i % len(cases)], root / "studies" / f"study{i:03d}", f"CRASH{i:04d}")
        studies.append(Study(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files))
    return studies


# --------------------------------------------------------------------------- the node


class Serve:
    """``orthonode serve`` as a subprocess that can be SIGKILLed and restarted."""

    def __init__(self, work: Path, checkpoint: Path, pacs_port: int, *, quiet: float = 3.0,
                 retry: dict[str, Any] | None = None) -> None:
        import yaml

        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        self.data = work / "data"
        config = {
            "node": {"name": "orthonode-crash", "data_dir": str(self.data)},
            "listener": {"port": self.port, "max_associations": 16,
                         "allowed_callers": [{"ae_title": "SENDER", "hosts": ["127.0.0.1"]}]},
            "storage": {"min_free_mb": 1},
            "study_assembly": {"series_quiet_seconds": quiet, "study_quiet_seconds": quiet,
                               "forced_after_seconds": 600},
            "jobs": {"device": "cpu"},
            "model": {"checkpoint": str(checkpoint)},
            "export": {
                "destinations": {"pacs": {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
                "retry": retry or {"max_attempts": 20, "initial_delay_seconds": 1, "max_delay_seconds": 3},
            },
            "http": {"port": self.http_port},
            "logging": {"level": "INFO"},
        }
        self.config_path = work / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.peak_rss_kib = 0

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(self.work / "serve.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.starts += 1

        from dicom_node.health import answers_healthy

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"orthonode serve exited with {self.proc.returncode}; see {self.work / 'serve.log'}")
            return answers_healthy(self.http_port)

        wait_for(healthy, 120, "orthonode serve to become healthy")

    def sample_rss(self) -> int:
        """Current VmHWM (peak RSS, KiB) of the running process; kept as the maximum seen."""
        if self.proc is None or self.proc.poll() is not None:
            return self.peak_rss_kib
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
        except OSError:
            pass
        return self.peak_rss_kib

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.sample_rss()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.sample_rss()
            stop_process(self.proc)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.data / 'orthonode.sqlite'}?mode=ro", uri=True, timeout=30)


# --------------------------------------------------------------------------- PACS


class Pacs:
    """A pynetdicom storage SCP that records every object it is sent (the node's destination)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[str, str, str]] = []  # (study, SOP class, SOP instance)
        self._server: Any = None
        self._lock = threading.Lock()

    def _store(self, event: Any) -> int:
        ds = event.dataset
        with self._lock:
            self.received.append((str(ds.StudyInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        return 0x0000

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


# --------------------------------------------------------------------------- senders


@dataclass
class Sender:
    """Sends its studies, resending after failures, and records what was acknowledged."""

    name: str
    port: int
    studies: list[Study]
    acknowledged: dict[str, str] = field(default_factory=dict)  # SOP -> sha of the data set sent
    failures: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    done: bool = False

    def run(self, stop: threading.Event) -> None:
        from pydicom.filereader import read_file_meta_info
        from pynetdicom import AE

        queue = [f for s in self.studies for f in s.files]
        contexts = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                           for m in (read_file_meta_info(f) for f in queue)})
        ae = AE(ae_title="SENDER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for abstract, syntax in contexts:
            ae.add_requested_context(abstract, syntax)
        i = 0
        while i < len(queue) and not stop.is_set():
            assoc = ae.associate("127.0.0.1", self.port, ae_title="ORTHONODE")
            if not assoc.is_established:
                self.failures += 1
                time.sleep(0.5)
                continue
            try:
                while i < len(queue) and assoc.is_established:
                    path = queue[i]
                    response = assoc.send_c_store(path)
                    status = response.get("Status") if response is not None else None
                    if status is None:
                        self.failures += 1
                        break
                    self.statuses[int(status)] += 1
                    if int(status) == 0:
                        self.acknowledged[str(read_file_meta_info(path).MediaStorageSOPInstanceUID)] = sha(
                            body_of(path.read_bytes()))
                        i += 1
                    else:  # a refusal (e.g. out of resources during shutdown): try again later
                        time.sleep(0.2)
            except (OSError, RuntimeError):  # the node went away mid-association: resend from file i
                self.failures += 1
            finally:
                if assoc.is_established:
                    assoc.release()
        self.done = i == len(queue)


# --------------------------------------------------------------------------- checks


def check_storage(serve: Serve, senders: list[Sender], sent_bodies: dict[str, str]) -> list[str]:
    """With the node down: what every acknowledged instance and every visible file must satisfy."""
    problems: list[str] = []
    storage = serve.data / "instances"
    with serve.db() as conn:
        rows = {sop: (path, digest) for sop, path, digest in conn.execute(
            "SELECT sop_instance_uid, path, sha256 FROM instances")}
    for sender in senders:
        for sop, body_sha in list(sender.acknowledged.items()):
            if sop not in rows:
                problems.append(f"acknowledged {sop} has no database row")
                continue
            path = storage / rows[sop][0]
            if not path.is_file():
                problems.append(f"acknowledged {sop}: {path} is missing")
                continue
            data = path.read_bytes()
            if sha(data) != rows[sop][1]:
                problems.append(f"acknowledged {sop}: file checksum differs from the database")
            if sha(body_of(data)) != body_sha:
                problems.append(f"acknowledged {sop}: stored data set differs from the one sent")
    for path in storage.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        sop = path.stem
        try:
            body_sha = sha(body_of(path.read_bytes()))
        except ValueError:
            problems.append(f"visible file {path} is not a complete DICOM file")
            continue
        if sent_bodies.get(sop) != body_sha:
            problems.append(f"visible file {path} is not byte-complete")
    return problems


def drop_unacknowledged_names(serve: Serve, senders: list[Sender], newest: int = 64) -> int:
    """With the node down: delete the files of the newest recorded instances that no sender saw
    acknowledged, as a power loss may drop folder entries that were not fsynced yet.

    The node commits a batch's new rows while their folder fsync runs and answers after both,
    so after a machine crash the rows of the last batch (``newest``: the group-commit maximum)
    may name files whose entries were lost.  SIGKILL alone never loses an entry (the page cache
    survives), so this emulates it; the restarted node must forget those rows and the senders
    store the instances again.  Returns how many files were deleted."""
    time.sleep(0.5)  # answers already in the senders' sockets are read (the node is down: no new ones)
    acknowledged = {sop for s in senders for sop in s.acknowledged}
    with serve.db() as conn:
        rows = conn.execute("SELECT sop_instance_uid, path FROM instances ORDER BY id DESC LIMIT ?",
                            (newest,)).fetchall()
    dropped = 0
    for sop, path in rows:
        file = serve.data / "instances" / path
        if sop not in acknowledged and file.is_file():
            file.unlink()
            dropped += 1
    return dropped


def settle(serve: Serve, studies: list[Study], timeout: float) -> None:
    """Wait until every study has a job that ended (done, or failed: a job interrupted
    ``MAX_JOB_ATTEMPTS`` times is not started again) and no job or export is pending."""
    wanted = {s.uid for s in studies}

    def settled() -> bool:
        serve.sample_rss()
        with serve.db() as conn:
            done = {row[0] for row in conn.execute(
                "SELECT s.study_instance_uid FROM jobs j JOIN studies s ON s.id = j.study_id "
                "WHERE j.state IN ('done', 'failed')")}
            busy = conn.execute("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]
            exporting = conn.execute("SELECT count(*) FROM exports WHERE state IN ('pending', 'sending')").fetchone()[0]
        return wanted <= done and busy == 0 and exporting == 0

    wait_for(settled, timeout, "every study processed and exported", interval=1.0)


def delivery_report(serve: Serve, pacs: Pacs, studies: list[Study]) -> dict[str, Any]:
    with serve.db() as conn:
        jobs = Counter(row[0] for row in conn.execute(
            "SELECT s.study_instance_uid FROM jobs j JOIN studies s ON s.id = j.study_id WHERE j.state = 'done'"))
        superseded = conn.execute("SELECT count(*) FROM jobs WHERE state = 'superseded'").fetchone()[0]
        failed_jobs = conn.execute("SELECT count(*) FROM jobs WHERE state = 'failed'").fetchone()[0]
        interrupted = conn.execute(
            "SELECT count(*) FROM jobs WHERE state = 'failed' AND error LIKE 'interrupted %'").fetchone()[0]
        expected = {row[0] for row in conn.execute("SELECT sop_instance_uid FROM exports WHERE state = 'done'")}
        failed_exports = conn.execute("SELECT count(*) FROM exports WHERE state = 'failed'").fetchone()[0]
    deliveries = Counter(sop for _, _, sop in pacs.received)
    return {
        "studies": len(studies),
        "studies with exactly one finished job": sum(1 for s in studies if jobs.get(s.uid) == 1),
        "superseded jobs": superseded,
        "failed jobs": failed_jobs,
        "of which failed for being interrupted too often": interrupted,
        "result objects": len(expected),
        "delivered objects": len(set(deliveries) & expected),
        "objects delivered more than once": sum(1 for sop in expected if deliveries.get(sop, 0) > 1),
        "deliveries in all": sum(deliveries.values()),
        "failed exports": failed_exports,
    }


# --------------------------------------------------------------------------- scenarios


def scenario_kill(args: argparse.Namespace, work: Path, checkpoint: Path) -> dict[str, Any]:
    import pydicom

    studies = make_studies(work, args.studies)
    sent_bodies = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): sha(body_of(p.read_bytes()))
                   for s in studies for p in s.files}
    pacs = Pacs(free_port())
    pacs.start()
    serve = Serve(work / "node", checkpoint, pacs.port, quiet=args.quiet)
    rng = random.Random(args.seed)
    senders = [Sender(f"sender{k}", serve.port, studies[k :: args.senders]) for k in range(args.senders)]
    stop = threading.Event()
    problems: list[str] = []
    kills = dropped = 0
    serve.start()
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in senders]
    started = time.monotonic()
    for t in threads:
        t.start()
    while kills < args.kills:
        time.sleep(rng.uniform(args.min_gap, args.max_gap))
        serve.kill()
        kills += 1
        found = check_storage(serve, senders, sent_bodies)
        problems += [f"after kill {kills}: {p}" for p in found]
        if args.drop_unacknowledged_names:
            dropped += drop_unacknowledged_names(serve, senders)
        acked = sum(len(s.acknowledged) for s in senders)
        print(f"kill {kills}: {acked} acknowledged, {len(found)} problem(s), {dropped} name(s) dropped so far",
              flush=True)
        serve.start()
    for t in threads:
        t.join(timeout=args.timeout)
    stop.set()
    settle(serve, studies, args.timeout)
    serve.terminate()
    problems += [f"at the end: {p}" for p in check_storage(serve, senders, sent_bodies)]
    pacs.stop()
    report = delivery_report(serve, pacs, studies)
    with serve.db() as conn:
        forgotten = conn.execute("SELECT count(*) FROM events WHERE kind = 'instance_forgotten'").fetchone()[0]
    report.update({
        "kills": kills,
        "unacknowledged file names dropped after kills (--drop-unacknowledged-names)": dropped,
        "rows forgotten at start-up (file missing)": forgotten,
        "node starts": serve.starts,
        "instances": len(sent_bodies),
        "instances acknowledged": sum(len(s.acknowledged) for s in senders),
        "senders finished": sum(s.done for s in senders),
        "sender reconnects/failures": sum(s.failures for s in senders),
        "non-success statuses": dict(sum((Counter({k: v for k, v in s.statuses.items() if k}) for s in senders),
                                         Counter())),
        "consistency problems": len(problems),
        "wall seconds": round(time.monotonic() - started, 1),
        "peak RSS of serve (MiB, sampled)": round(serve.sample_rss() / 1024),
    })
    for line in problems[:20]:
        print("PROBLEM", line)
    return report


def scenario_outage(args: argparse.Namespace, work: Path, checkpoint: Path) -> dict[str, Any]:
    studies = make_studies(work, args.studies)
    pacs = Pacs(free_port())  # not started: the PACS is down
    serve = Serve(work / "node", checkpoint, pacs.port, quiet=args.quiet,
                  retry={"max_attempts": 50, "initial_delay_seconds": 1, "max_delay_seconds": 4})
    serve.start()
    started = time.monotonic()
    senders = [Sender(f"sender{k}", serve.port, studies[k :: args.senders]) for k in range(args.senders)]
    stop = threading.Event()
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.timeout)

    def exports_failing() -> bool:
        with serve.db() as conn:
            jobs_done = conn.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0]
            tried = conn.execute("SELECT count(*) FROM exports WHERE attempts > 0 AND state != 'done'").fetchone()[0]
        return jobs_done >= len(studies) and tried > 0

    wait_for(exports_failing, args.timeout, "every study processed and its exports failing")
    serve.kill()  # the node goes down during the outage
    serve.start()
    time.sleep(args.outage_after_restart)
    with serve.db() as conn:
        attempts_down = conn.execute("SELECT coalesce(sum(attempts), 0) FROM exports").fetchone()[0]
    pacs.start()  # the PACS is back
    outage_s = time.monotonic() - started
    settle(serve, studies, args.timeout)
    serve.terminate()
    pacs.stop()
    report = delivery_report(serve, pacs, studies)
    report.update({"node starts": serve.starts, "PACS down for (s, from the first instance sent)": round(outage_s, 1),
                   "failed export attempts during the outage": attempts_down,
                   "wall seconds": round(time.monotonic() - started, 1),
                   "senders finished": sum(s.done for s in senders)})
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=["kill", "outage"], default="kill")
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--min-gap", type=float, default=1.0, help="seconds between healthy and the next kill")
    parser.add_argument("--max-gap", type=float, default=6.0)
    parser.add_argument("--quiet", type=float, default=3.0, help="series/study quiet seconds of the node")
    parser.add_argument("--outage-after-restart", type=float, default=8.0)
    parser.add_argument("--drop-unacknowledged-names", action="store_true",
                        help="kill: after each kill, delete the files of the newest unacknowledged rows (a power "
                        "loss dropping folder entries not yet fsynced)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--checkpoint", type=Path, default=None, help="model bundle (default: the tiny preset with seeded random weights)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the result to this markdown file")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="orthonode-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        # the node's plumbing is measured, not what the model says: seeded random weights
        from benchmarks.predict import build_bundle

        checkpoint = work / "model.pt"
        build_bundle("tiny").save(checkpoint)
    run = scenario_kill if args.scenario == "kill" else scenario_outage
    report = run(args, work, checkpoint)
    write_report("crash_consistency.py", argv, report, args.out, heading=f"### scenario {args.scenario}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def write_report(script: str, argv: list[str] | None, report: dict[str, Any], out: Path | None, heading: str = "") -> None:
    """Print the measure table of one run and append it to ``out`` (the results file) when given."""
    command = f".venv/bin/python benchmarks/{script} {' '.join(argv if argv is not None else sys.argv[1:])}"
    lines = ([heading, ""] if heading else []) + [f"Command: `{command}`", "", "| measure | value |", "| --- | ---: |"]
    lines += [f"| {key} | {value} |" for key, value in report.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
