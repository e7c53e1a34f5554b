"""Helpers of the node tests and the hostile-input tests: ports, polling, node configurations,
instance rows, the receiver without a network, dcmtk's storescu and ``orthonode serve`` in a
subprocess.  Imported by name; the fixtures built on them are in :mod:`tests.support.fixtures`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dicom_node.health import answers_healthy
from tests.support.tiny_model import MATRIX  # noqa: F401 - the phantom matrix of the node tests

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
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
        from dicom_node.ingest import StoreReceiver
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

    def __init__(self, config_path: Path, log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.config_path = config_path
        self.log_path = log_path
        #: more ``orthonode serve`` options, e.g. ``("--role", "worker")``
        self.args = tuple(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ServeProcess":
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        handle = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config_path), *self.args],
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
