"""Ingest speed of the node beside other C-STORE receivers, same sender, same machine, one run.

Receivers:

* ``orthonode``: ``orthonode serve`` (subprocess, default logging).  Each instance is written to a
  temporary file, fsynced, linked to its name, its folder fsynced, and its row committed in SQLite
  (WAL, ``synchronous=FULL``) before the success status goes back: *received, durably stored and
  recorded*.  Instances arriving together on several associations share the folder fsyncs and
  the commit (group commit).  Study processing is pushed past the run (long quiet periods), so
  only ingest is measured; the model is not preloaded (``jobs.preload_model: false``), since
  no job runs and importing torch and MONAI in the background would compete with the first
  seconds of the load.
* ``pynetdicom-storescp``: ``python -m pynetdicom storescp`` writing each instance to a folder
  (no fsync, no index), with its defaults (16 KiB maximum PDU).
* ``pynetdicom-storescp-4mib-pdu`` (optional): the same with ``--max-pdu 4194304``, the maximum PDU
  orthonode's listener offers, so the comparison does not hinge on the PDU size.
* ``dcmtk-storescp``: dcmtk's ``storescp -od`` (no fsync, no index).
* ``orthanc``: ``/usr/sbin/Orthanc`` with a temporary configuration (files + SQLite index).
* ``orthonode-baseline`` (optional): ``orthonode serve`` from another source tree given with
  ``--baseline-root`` (e.g. a ``git worktree`` of the commit before a change), so two versions
  are measured interleaved in one run, under the same machine load.

The load is dcmtk's ``storescu`` sending the same folder of generated MR images (one file per
instance, explicit VR little endian), ``--senders`` processes in parallel, each its own share of
the files on one association.  The time is from the first ``storescu`` start to the last exit;
for orthonode the database is then checked to hold every instance.  Each receiver runs
``--repeats`` times (fresh storage each time), interleaved, and the median is reported.

    .venv/bin/python benchmarks/ingest.py --instances 600 --matrix 256 --senders 1 4 --repeats 3 \\
        --out benchmarks/results/ingest.md
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # the benchmarks' shared pieces
    sys.path.insert(0, str(ROOT / "benchmarks"))

from crash_consistency import stop_process  # noqa: E402

RECEIVERS = ("orthonode", "pynetdicom-storescp", "dcmtk-storescp", "orthanc")
#: peers beside the default ones
EXTRA_RECEIVERS = ("pynetdicom-storescp-4mib-pdu",)
#: diagnostic only, not a supported mode: orthonode with Python's os.fsync made a no-op (SQLite
#: still syncs its own commits), to show what the per-instance file and folder fsyncs cost
DIAGNOSTIC_RECEIVERS = ("orthonode-no-file-fsync",)
#: orthonode from another source tree (``--baseline-root``), to compare two versions interleaved
BASELINE_RECEIVER = "orthonode-baseline"


# --------------------------------------------------------------------------- data


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def make_instances(folder: Path, count: int, matrix: int, studies: int, seed: int = 0) -> list[Path]:
    """``count`` MR Image Storage files (uint16 ``matrix``², explicit VR LE) over ``studies``
    studies of three series each; returns the paths."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 4000, (matrix, matrix), dtype=np.uint16)
    study_uids = [generate_uid() for _ in range(studies)]
    series = [(study_uids[i // 3], generate_uid()) for i in range(studies * 3)]
    paths = []
    for i in range(count):
        study_uid, series_uid = series[i % len(series)]
        sop = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.PatientID, ds.PatientName = "MR", f"BENCH{i % studies:04d}", "Bench^Ingest"
        ds.StudyDescription, ds.SeriesDescription = "MRI KNEE", "PD FS SAG"
        ds.SeriesNumber, ds.InstanceNumber = 1 + (i % 3), i + 1
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [float(i), 0.0, 0.0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = matrix
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.roll(base, i, axis=0).tobytes()
        path = folder / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def split(paths: list[Path], senders: int, root: Path) -> list[Path]:
    """Hard-link the files into one folder per sender (round robin); returns the folders."""
    folders = []
    for k in range(senders):
        folder = root / f"sender{k}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for path in paths[k::senders]:
            os.link(path, folder / path.name)
        folders.append(folder)
    return folders


# --------------------------------------------------------------------------- receivers


@dataclass
class Receiver:
    name: str
    port: int
    ae_title: str
    #: returns how many instances the receiver holds (files or index rows) once the run is over
    count: Callable[[], int]
    #: the receiving process, for ``--py-spy`` (orthonode receivers only)
    pid: int | None = None


def _count_files(folder: Path, pattern: str = "*") -> int:
    return sum(1 for p in folder.rglob(pattern) if p.is_file())


@contextmanager
def orthonode_receiver(work: Path, file_fsync: bool = True, root: Path = ROOT,
                       name: str | None = None) -> Iterator[Receiver]:
    """``orthonode serve`` from the source tree ``root`` (another checkout for ``--baseline-root``)."""
    import yaml

    checkpoint = work / "unused-model.pt"  # serve requires the file; no job runs during the benchmark
    checkpoint.write_bytes(b"")
    port, http_port = free_port(), free_port()
    config = {
        "node": {"name": "orthonode-bench", "data_dir": str(work / "data")},
        "listener": {"port": port, "max_associations": 16,
                     "allowed_callers": [{"ae_title": "STORESCU", "hosts": ["127.0.0.1"]}]},
        "storage": {"min_free_mb": 1},
        "study_assembly": {"series_quiet_seconds": 3600, "study_quiet_seconds": 3600, "forced_after_seconds": 7200},
        # no job runs during the benchmark (the checkpoint is an empty placeholder): loading the
        # model at start-up would import torch and MONAI on the node's CPUs while the load is sent
        "jobs": {"device": "cpu", "preload_model": False},
        "model": {"checkpoint": str(checkpoint)},
        "export": {"destinations": {"pacs": {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
                                             "port": free_port()}}},
        "http": {"port": http_port},
        "logging": {"level": "INFO"},
    }
    path = work / "node.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if root != ROOT:  # that tree's dicom_node before the installed one (cwd is first for -m as well)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(path)]
    if not file_fsync:
        command = [sys.executable, "-c", "import os, runpy, sys; os.fsync = lambda fd: None; "
                   f"sys.argv = ['orthonode', 'serve', '--config', {str(path)!r}]; "
                   "runpy.run_module('dicom_node.cli', run_name='__main__')"]
    with open(work / "serve.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
    try:
        wait_port(port, proc=proc)
        wait_port(http_port, proc=proc)

        def count() -> int:
            from sqlalchemy import create_engine, text

            engine = create_engine(f"sqlite:///{work / 'data' / 'orthonode.sqlite'}")
            try:
                with engine.connect() as conn:
                    return int(conn.execute(text("SELECT count(*) FROM instances")).scalar_one())
            finally:
                engine.dispose()

        yield Receiver(name or ("orthonode" if file_fsync else DIAGNOSTIC_RECEIVERS[0]), port, "ORTHONODE", count,
                       pid=proc.pid)
    finally:
        stop_process(proc)


@contextmanager
def pynetdicom_receiver(work: Path, max_pdu: int | None = None) -> Iterator[Receiver]:
    port = free_port()
    out = work / "out"
    out.mkdir()
    command = [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(out), "-aet", "STORESCP"]
    if max_pdu is not None:
        command += ["--max-pdu", str(max_pdu)]
    with open(work / "storescp.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc=proc)
        name = "pynetdicom-storescp" if max_pdu is None else EXTRA_RECEIVERS[0]
        yield Receiver(name, port, "STORESCP", lambda: _count_files(out))
    finally:
        stop_process(proc)


@contextmanager
def dcmtk_receiver(work: Path) -> Iterator[Receiver]:
    port = free_port()
    out = work / "out"
    out.mkdir()
    with open(work / "storescp.log", "wb") as log:
        proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc=proc)
        yield Receiver("dcmtk-storescp", port, "STORESCP", lambda: _count_files(out))
    finally:
        stop_process(proc)


@contextmanager
def orthanc_receiver(work: Path) -> Iterator[Receiver]:
    from dicom_node.orthanc import OrthancServer

    server = OrthancServer(work, dicom_port=free_port(), stable_age_seconds=3600, dicomweb=False)
    with server:
        yield Receiver("orthanc", server.dicom_port, server.ae_title,
                       lambda: int(server.get("/statistics")["CountInstances"]))


FACTORIES: dict[str, Callable[[Path], Any]] = {
    "orthonode": orthonode_receiver,
    "pynetdicom-storescp": pynetdicom_receiver,
    "dcmtk-storescp": dcmtk_receiver,
    "orthanc": orthanc_receiver,
    "orthonode-no-file-fsync": lambda work: orthonode_receiver(work, file_fsync=False),
    "pynetdicom-storescp-4mib-pdu": lambda work: pynetdicom_receiver(work, max_pdu=4 * 1024 * 1024),
}


# --------------------------------------------------------------------------- load


def storescu_load(receiver: Receiver, folders: list[Path]) -> float:
    """Run one ``storescu`` per folder at once; seconds from the first start to the last exit."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", receiver.ae_title, "-nh", "+sd", "127.0.0.1",
                          str(receiver.port), str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for folder in folders
    ]
    failures = []
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            failures.append(err.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"storescu failed against {receiver.name}: {failures[0]}")
    return elapsed


# --------------------------------------------------------------------------- profile


#: innermost frames of a thread that waits rather than works (py-spy counts some of them)
WAIT_BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("waiting: pynetdicom's reactor polling sleeps (1 ms each)", ("dul.py:403)", "dul.py:503)", "association.py:714)")),
    ("waiting: a lock, condition, selector or idle thread pool", ("Condition.wait", "selectors.py", "thread.py:81)",
                                                                  "Event.wait", "Lock.acquire")),
)
#: where a working sample's stack says the receiving process was, first match wins (frames are
#: ``function (file:line)``); what matches none is reported by its innermost frame
PROFILE_BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("folder fsync (storage.fsync_directory)", ("fsync_directory",)),
    ("database commit (SQLAlchemy, SQLite)", ("sqlalchemy/", "sqlite3")),
    ("the file: write, hash, fsync, link (storage.py)", ("storage.py",)),
    ("header parse and checks (pydicom, listener)", ("_parse (", "pydicom/")),
    ("pynetdicom: PDUs, DIMSE, association", ("pynetdicom/",)),
)


def start_py_spy(receiver: Receiver, folder: Path, name: str) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` attached to the receiving process (raw collapsed stacks, all threads)."""
    if receiver.pid is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(receiver.pid), "--rate", "250", "--format", "raw",
                            "--output", str(folder / f"{name}.txt")], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the first association
    return spy


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()


def summarise_profiles(folder: Path) -> str:
    """Share of the samples per :data:`PROFILE_BUCKETS` and the busiest innermost frames, per run file."""
    lines = ["# Where orthonode's receiving process spends its time (py-spy samples of every thread)", "",
             "Rows starting with 'waiting' are threads that sleep or wait (py-spy does not count all of them as idle).",
             ""]
    for path in sorted(folder.glob("*.txt")):
        buckets: dict[str, int] = {}
        leaves: dict[str, int] = {}
        total = 0
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            total += count
            frames = stack.split(";")
            label = next((name for name, keys in WAIT_BUCKETS if any(k in frames[-1] for k in keys)), None)
            label = label or next((name for name, keys in PROFILE_BUCKETS if any(k in stack for k in keys)), None)
            label = label or f"other: {frames[-1]}"
            buckets[label] = buckets.get(label, 0) + count
            leaves[frames[-1]] = leaves.get(frames[-1], 0) + count
        if not total:
            continue
        lines += [f"## {path.stem} ({total} samples)", "", "| where | share of samples |", "| --- | ---: |"]
        lines += [f"| {name} | {100 * n / total:.1f} % |" for name, n in sorted(buckets.items(), key=lambda kv: -kv[1])[:12]]
        lines += ["", "| busiest innermost frames | share |", "| --- | ---: |"]
        lines += [f"| `{name}` | {100 * n / total:.1f} % |" for name, n in sorted(leaves.items(), key=lambda kv: -kv[1])[:10]]
        lines.append("")
    return "\n".join(lines) + "\n"


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        model = "?"
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=600)
    parser.add_argument("--matrix", type=int, default=256, help="rows = columns of each image")
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4], help="parallel storescu processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--receivers", nargs="+", default=list(RECEIVERS),
                        choices=RECEIVERS + EXTRA_RECEIVERS + DIAGNOSTIC_RECEIVERS + (BASELINE_RECEIVER,))
    parser.add_argument("--baseline-root", type=Path, default=None,
                        help=f"source tree of another orthonode version (e.g. `git worktree add` of the commit "
                        f"before a change), run as receiver {BASELINE_RECEIVER}, interleaved with the others")
    parser.add_argument("--nagle", action="store_true",
                        help="leave dcmtk's default (Nagle on); by default TCP_NODELAY=1 is set for dcmtk and Orthanc")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="sample the orthonode receivers with py-spy (pip install py-spy) while they receive; "
                             "raw stacks per run and a summary of where the time goes in DIR/profile.md")
    args = parser.parse_args(argv)
    if (BASELINE_RECEIVER in args.receivers) != (args.baseline_root is not None):
        parser.error(f"--baseline-root and the receiver {BASELINE_RECEIVER} go together")
    if args.baseline_root is not None:
        baseline_root = args.baseline_root.resolve()
        if not (baseline_root / "dicom_node" / "cli.py").is_file():
            parser.error(f"--baseline-root {baseline_root}: no dicom_node/cli.py there")
        FACTORIES[BASELINE_RECEIVER] = lambda work: orthonode_receiver(work, root=baseline_root, name=BASELINE_RECEIVER)

    if not args.nagle:
        # dcmtk (storescu, storescp, and Orthanc, which is built on it) leaves Nagle's algorithm
        # on unless TCP_NODELAY=1; with delayed ACKs every C-STORE then waits ~40 ms on loopback
        os.environ["TCP_NODELAY"] = "1"
    work = Path(args.work or tempfile.mkdtemp(prefix="orthonode-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    files = make_instances(work / "files", args.instances, args.matrix, args.studies)
    size_mib = sum(p.stat().st_size for p in files) / 2**20
    load_before = os.getloadavg()
    rows: list[str] = []
    results: dict[tuple[str, int], list[float]] = {}
    for senders in args.senders:
        folders = split(files, senders, work / "split")
        for repeat in range(args.repeats):
            for name in args.receivers:
                run_dir = work / f"{name}-{senders}-{repeat}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                with FACTORIES[name](run_dir) as receiver:
                    spy = start_py_spy(receiver, args.py_spy, f"{name}-{senders}-{repeat}") if args.py_spy else None
                    seconds = storescu_load(receiver, folders)
                    if spy is not None:
                        stop_py_spy(spy)
                    held = receiver.count()
                if held != len(files):
                    raise RuntimeError(f"{name}: holds {held} instances after the run, {len(files)} were sent")
                results.setdefault((name, senders), []).append(seconds)
                print(f"{name:22s} senders={senders} run {repeat + 1}: {len(files) / seconds:7.1f} instances/s",
                      flush=True)
                shutil.rmtree(run_dir, ignore_errors=True)
    load_after = os.getloadavg()

    rows.append("| receiver | senders | median s | instances/s (median) | runs (instances/s) | MiB/s |")
    rows.append("| --- | ---: | ---: | ---: | --- | ---: |")
    for (name, senders), times in results.items():
        median = statistics.median(times)
        runs = ", ".join(f"{len(files) / t:.0f}" for t in times)
        rows.append(f"| {name} | {senders} | {median:.2f} | {len(files) / median:.0f} | {runs} | {size_mib / median:.1f} |")
    header = [
        f"Machine: {machine()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
        f"Load: {len(files)} MR instances ({args.matrix}x{args.matrix} uint16, {size_mib:.0f} MiB in all, "
        f"{args.studies} studies x 3 series), dcmtk storescu, {args.repeats} runs per receiver, interleaved; "
        f"TCP_NODELAY={os.environ.get('TCP_NODELAY', 'unset')} for the dcmtk programs and Orthanc.",
        f"Command: `.venv/bin/python benchmarks/ingest.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if args.out is not None:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    if args.py_spy is not None:
        summary = summarise_profiles(args.py_spy)
        (args.py_spy / "profile.md").write_text(summary, encoding="utf-8")
        print(summary)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
