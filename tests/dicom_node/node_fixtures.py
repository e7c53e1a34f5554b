"""Fixtures and helpers for the node's processing-side tests (assembly, jobs, export, round trips).

Import the fixtures into a test module with ``from tests.dicom_node.node_fixtures import *``
(names listed in ``__all__``).

The round trips need a model.  It is trained once per test session (per xdist worker) with the
trainer's own functions at the tiny size on a few phantom knees: a sagittal segmenter and a
fused three-plane classifier, each for a handful of steps.  Its findings are not meant to be
right; the tests check the node's plumbing (what arrives where, how often, after what), and
the pipeline's own tests check what the model says.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.health import answers_healthy

REPO = Path(__file__).resolve().parents[2]
#: phantom matrix for node tests: small files, quick to send and to run the tiny model on
MATRIX = 64

__all__ = [
    "MATRIX",
    "REPO",
    "NodeParts",
    "add_instance",
    "make_parts",
    "node_db",
    "build_small_checkpoint",
    "free_port",
    "knee_phantoms",
    "node_checkpoint",
    "node_yaml",
    "orthanc",
    "make_node_config",
    "run_storescu",
    "serve_process",
    "wait_for",
    "write_node_yaml",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last value {last!r})")


def build_small_checkpoint(root: Path, seg_epochs: int = 2) -> Path:
    """Train the tiny knee bundle used by the node tests into ``root/model.pt``."""
    import torch

    from training.config import load_config
    from training.datasets import read_source
    from training.finetune import finetune_classifier, finetune_segmenter, make_bundle
    from training.phantoms.generate import generate_dataset

    generate_dataset(root / "train", "knee", 3, seed=21, matrix=MATRIX)
    records = read_source(f"phantom:{root / 'train'}")
    cfg = load_config("tiny").with_overrides(
        segment={"epochs": seg_epochs, "batch_size": 4, "lr": 1e-2, "backbone_lr_factor": 1.0, "ce_weight": 1.0},
        classify={"epochs": 1},
    )
    torch.manual_seed(0)
    seg = finetune_segmenter(cfg, records, plane="sagittal", pretrained=None, from_scratch=True, seed=0, progress=False)
    cls = finetune_classifier(cfg, records, ["sagittal", "coronal", "axial"], use_ehr=True, pretrained=None,
                              from_scratch=True, seed=0, progress=False)
    bundle = make_bundle(cfg, classifier=cls, segmenter=seg, name="node-test-knee", version="0.1-nodetest")
    path = root / "model.pt"
    bundle.save(path)
    return path


def _built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """``build(folder)`` once per test run: under pytest-xdist the workers share the result
    through the run's common temporary folder, the first one building it under a file lock."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"node_{name}"
    shared.mkdir(parents=True, exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / ".done"
        if not done.exists():
            result = build(shared)
            done.write_text(str(result))
        return Path(done.read_text())


@pytest.fixture(scope="session")
def node_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained knee bundle (see the module docstring), built once per test run;
    ``ORTHONODE_TEST_NODE_CHECKPOINT`` names an existing one instead."""
    given = os.environ.get("ORTHONODE_TEST_NODE_CHECKPOINT")
    if given:
        return Path(given)
    return _built_once(tmp_path_factory, "model", build_small_checkpoint)


def _generate_knees(folder: Path) -> Path:
    from training.phantoms.generate import generate_dataset

    generate_dataset(folder / "knee", "knee", 3, seed=31, matrix=MATRIX)
    return folder / "knee"


@pytest.fixture(scope="session")
def knee_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom knee studies ``ROOT/knee_000N/dicom/<series>/*.dcm`` and ``ROOT/cases.csv``
    (read-only: tests copy what they change)."""
    return _built_once(tmp_path_factory, "knees", _generate_knees)


def add_instance(
    factory: Any,
    study: str,
    series: str,
    sop: str,
    *,
    sha: str | None = None,
    received_at: Any = None,
    content_changed: bool = True,
    calling_ae_title: str = "STORESCU",
) -> None:
    """Record one instance row as the listener would (no file: for assembly and queue tests)."""
    from dicom_node.db import ReceivedInstance, record_instance, session_scope, utcnow

    info = ReceivedInstance(
        study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"{study}/{series}/{sop}.dcm", size_bytes=100, sha256=sha or ("0" * 63 + "1"),
        received_at=received_at or utcnow(), calling_ae_title=calling_ae_title, peer_host="127.0.0.1",
        modality="MR",
    )
    with session_scope(factory) as session:
        record_instance(session, info, content_changed=content_changed)


class NodeParts:
    """The database, storage and C-STORE receiver of a node, without its threads or network.

    ``receive(paths)`` stores files exactly as the listener's C-STORE handler does.
    """

    def __init__(self, config: Any) -> None:
        from dicom_node.db import make_engine, make_session_factory, upgrade_database
        from dicom_node.listener import StoreReceiver
        from dicom_node.layout import INSTANCES_DIR
        from dicom_node.storage import Storage

        self.config = config
        upgrade_database(config.database_url)
        self.engine = make_engine(config.database_url)
        self.factory = make_session_factory(self.engine)
        self.storage = Storage(config.data_dir / INSTANCES_DIR, config.storage.min_free_mb)
        self.stored: list[tuple[str, str]] = []
        self.receiver = StoreReceiver.from_config(config, self.storage, self.factory,
                                                  on_instance_stored=lambda st, se: self.stored.append((st, se)))

    def receive(self, paths: list[Path], calling_ae_title: str = "STORESCU") -> None:
        for path in paths:
            status = receive_file(self.receiver, path, calling_ae_title=calling_ae_title)
            assert status == 0, f"{path}: C-STORE status 0x{int(status):04X}"

    def close(self) -> None:
        self.engine.dispose()


def receive_file(receiver: Any, path: Path, data: bytes | None = None, **overrides: Any) -> int:
    """``receiver.receive`` of ``path`` (or of ``data`` instead of its bytes) as a C-STORE from
    STORESCU@127.0.0.1 would arrive: presentation context and SOP Instance UID from the file's
    own header unless ``overrides`` name other values.  Returns the DIMSE status."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    args: dict[str, Any] = dict(
        context_sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        affected_sop_instance_uid=str(ds.SOPInstanceUID),
        calling_ae_title="STORESCU",
        peer_host="127.0.0.1",
    )
    args.update(overrides)
    return receiver.receive(Path(path).read_bytes() if data is None else data, **args)


def make_parts(tmp: Path, checkpoint: Path, **options: Any) -> NodeParts:
    """:class:`NodeParts` for a node configured by :func:`make_node_config` ``options``."""
    from dicom_node.config import parse_config

    return NodeParts(parse_config(make_node_config(tmp, checkpoint, **options), base_dir=tmp))


@pytest.fixture()
def node_db(tmp_path: Path) -> Iterator[Any]:
    """A migrated SQLite database in ``tmp_path``; yields its session factory."""
    from dicom_node.db import make_engine, make_session_factory, upgrade_database

    url = f"sqlite:///{tmp_path / 'node.sqlite'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def make_node_config(
    tmp: Path,
    checkpoint: Path,
    *,
    port: int | None = None,
    http_port: int | None = None,
    destinations: dict[str, dict[str, Any]] | None = None,
    routes: list[dict[str, Any]] | None = None,
    quiet: float = 1.0,
    forced: float = 60.0,
    retry: dict[str, Any] | None = None,
    extra_callers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A node.yaml mapping for tests: free ports, short quiet periods, data in ``tmp/data``."""
    callers = [{"ae_title": "ORTHANC", "hosts": ["127.0.0.1"]}, {"ae_title": "STORESCU", "hosts": ["127.0.0.1"]},
               {"ae_title": "PYNETDICOM", "hosts": ["127.0.0.1"]}]
    callers += [{"ae_title": ae, "hosts": ["127.0.0.1"]} for ae in extra_callers]
    return {
        "node": {"name": "orthonode-test", "data_dir": str(tmp / "data")},
        "listener": {"port": port or free_port(), "allowed_callers": callers},
        "storage": {"min_free_mb": 1},
        "study_assembly": {"series_quiet_seconds": quiet, "study_quiet_seconds": quiet, "forced_after_seconds": forced},
        "jobs": {"device": "cpu"},
        "model": {"checkpoint": str(checkpoint)},
        "export": {
            "destinations": destinations or {"pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                                       "port": free_port()}},
            "routes": routes or [{"match": {}, "destinations": ["pacs"]}],
            "retry": retry or {"max_attempts": 3, "initial_delay_seconds": 1, "max_delay_seconds": 4},
        },
        "http": {"port": http_port or free_port()},
        "logging": {"level": "INFO"},
    }


def write_node_yaml(tmp: Path, data: dict[str, Any]) -> Path:
    path = tmp / "node.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture()
def node_yaml(tmp_path: Path, node_checkpoint: Path) -> Callable[..., Path]:
    """Factory: ``node_yaml(**make_node_config options) -> path of a written node.yaml``."""

    def make(**options: Any) -> Path:
        return write_node_yaml(tmp_path, make_node_config(tmp_path, node_checkpoint, **options))

    return make


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Orthanc on loopback (skipped when the package is not installed); no forwarding."""
    from dicom_node.orthanc import OrthancServer, orthanc_available

    if not orthanc_available():
        pytest.skip("Orthanc is not installed (/usr/sbin/Orthanc)")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), dicom_port=free_port(), stable_age_seconds=2)
    with server:
        yield server


def run_storescu(port: int, files: list[Path] | Path, calling_ae: str = "STORESCU", called_ae: str = "ORTHONODE",
                 timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Send files (or a folder, recursively) with dcmtk's storescu; raises on a non-zero exit."""
    args = ["storescu", "-aet", calling_ae, "-aec", called_ae, "-nh"]
    if isinstance(files, Path) and files.is_dir():
        args += ["+sd", "+r"]
        targets = [str(files)]
    else:
        targets = [str(f) for f in (files if isinstance(files, list) else [files])]
    result = subprocess.run([*args, "127.0.0.1", str(port), *targets], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"storescu exited {result.returncode}: {result.stderr[-2000:]}")
    return result


class ServeProcess:
    """``orthonode serve`` in a subprocess (for kill -9 tests)."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ServeProcess":
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        handle = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config_path)],
                stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env,
            )
        finally:
            handle.close()
        return self

    def wait_healthy(self, http_port: int, timeout: float = 60.0) -> None:
        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"orthonode serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            return answers_healthy(http_port)

        wait_for(healthy, timeout, "orthonode serve to answer /healthz")

    def kill(self) -> None:
        """SIGKILL: no clean-up code of the node runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@pytest.fixture()
def serve_process(tmp_path: Path) -> Iterator[Callable[[Path], ServeProcess]]:
    """Factory for ``orthonode serve`` subprocesses; every one started is killed at the end."""
    started: list[ServeProcess] = []

    def make(config_path: Path) -> ServeProcess:
        proc = ServeProcess(config_path, tmp_path / f"serve-{len(started)}.log").start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.kill()
