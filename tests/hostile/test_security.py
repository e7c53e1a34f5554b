"""Security properties of the node: who may connect, TLS end to end, private files, no patient
data in logs, services on loopback unless configured otherwise."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, sop_class
from sqlalchemy import select

from dicom_node import db
from dicom_node.ingest import Listener
from dicom_node.storage import Storage
from tests.support.node import wait_for
from tests.hostile.corpus import echo, encode, mr_dataset, send_files
from tests.support.hostile import hostile_config

PHI_NAME = "Geheim^Patientin"
PHI_ID = "PHI-4711-SECRET"


def _listener(tmp_path: Path, **listener: Any) -> tuple[Listener, Any, Storage]:
    config = hostile_config(tmp_path, **listener)
    db.upgrade_database(config.database_url)
    engine = db.make_engine(config.database_url)
    storage = Storage(config.data_dir / "instances", 0)
    node = Listener(config, storage, db.make_session_factory(engine))
    node.start()
    return node, engine, storage


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    node, engine, _ = _listener(tmp_path)
    try:
        yield node
    finally:
        node.stop(timeout=2)
        engine.dispose()


def _associate(port: int, calling: str, called: str, bind: str = "127.0.0.1") -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(sop_class.Verification)
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=(bind, 0))


def test_unknown_titles_and_hosts_are_rejected_and_logged(listener: Listener, caplog: Any) -> None:
    port = listener.config.listener.port
    with caplog.at_level(logging.WARNING, logger="dicom_node.ingest"):
        attempts = {
            "unknown called title": _associate(port, "TESTSCU", "NOT_THE_NODE"),
            "unknown calling title": _associate(port, "INTRUDER", "ORTHONODE"),
            "known title, other host": _associate(port, "TESTSCU", "ORTHONODE", bind="127.0.0.2"),
            "title in other case": _associate(port, "testscu", "ORTHONODE"),
        }
    for what, assoc in attempts.items():
        assert assoc.is_rejected and not assoc.is_established, what
    assert "called AE title 'NOT_THE_NODE' is not one of" in caplog.text
    assert "calling AE title 'INTRUDER' is not in listener.allowed_callers" in caplog.text
    assert "host 127.0.0.2 is not among the hosts allowed for calling AE title 'TESTSCU'" in caplog.text
    # a refused caller cannot store either: nothing reaches the C-STORE handler
    path = listener.config.data_dir.parent / "probe.dcm"
    path.write_bytes(encode(mr_dataset()))
    with pytest.raises(ConnectionError):
        send_files(port, [path], calling="INTRUDER")
    assert [p for p in listener.receiver.storage.root.rglob("*.dcm")] == []
    assert echo(port)


def _client_context(files: dict[str, Path], with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files["ca.pem"]))
    if with_certificate:
        context.load_cert_chain(str(files["client.pem"]), str(files["client.key"]))
    return context


def test_tls_store_end_to_end(tmp_path: Path, tls_files: dict[str, Path]) -> None:  # noqa: F811
    """C-STORE over TLS from pynetdicom and from dcmtk's storescu: stored byte for byte; without
    a client certificate, or in plain DICOM, nothing gets through."""
    tls = {"enabled": True, "certificate": str(tls_files["server.pem"]), "private_key": str(tls_files["server.key"]),
           "ca_certificates": str(tls_files["ca.pem"]), "require_client_certificate": True}
    node, engine, storage = _listener(tmp_path, tls=tls)
    port = node.config.listener.port
    try:
        ds = mr_dataset()
        path = tmp_path / "tls.dcm"
        path.write_bytes(encode(ds))
        ae = AE(ae_title="TESTSCU")
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
        # the file's own transfer syntax only: this test is about TLS, not about negotiation
        ae.add_requested_context(sop_class.MRImageStorage, str(pydicom.dcmread(path).file_meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", port, ae_title="ORTHONODE",
                             tls_args=(_client_context(tls_files, True), "127.0.0.1"))
        assert assoc.is_established
        assert int(assoc.send_c_store(path).Status) == 0
        assoc.release()
        stored = storage.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert pydicom.dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID

        for context in (_client_context(tls_files, False), None):
            ae = AE(ae_title="TESTSCU")
            ae.acse_timeout = ae.network_timeout = 5
            ae.add_requested_context(sop_class.MRImageStorage)
            args = (context, "127.0.0.1") if context is not None else None
            refused = ae.associate("127.0.0.1", port, ae_title="ORTHONODE", tls_args=args)
            assert not refused.is_established

        if shutil.which("storescu") is not None:
            other = mr_dataset()
            dcmtk_file = tmp_path / "dcmtk.dcm"
            dcmtk_file.write_bytes(encode(other))
            tls_options = ["+tls", str(tls_files["client.key"]), str(tls_files["client.pem"]),
                           "+cf", str(tls_files["ca.pem"]), "-ic"]
            proc = subprocess.run(["storescu", "-aet", "TESTSCU", "-aec", "ORTHONODE", *tls_options, "127.0.0.1",
                                   str(port), str(dcmtk_file)], capture_output=True, text=True, timeout=60)
            if "unrecognized option" in proc.stderr or "TLS support is not compiled" in proc.stderr:
                pytest.skip("dcmtk was built without TLS")
            assert proc.returncode == 0, proc.stderr
            assert storage.path_for(other.StudyInstanceUID, other.SeriesInstanceUID, other.SOPInstanceUID).is_file()
            plain = subprocess.run(["storescu", "-aet", "TESTSCU", "-aec", "ORTHONODE", "127.0.0.1", str(port),
                                    str(dcmtk_file)], capture_output=True, text=True, timeout=60)
            assert plain.returncode != 0
    finally:
        node.stop(timeout=2)
        engine.dispose()


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            if len(address) == 8:
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
            else:
                found.add("ipv6:" + address)
    return found


def _world_accessible(root: Path) -> list[str]:
    """Files under ``root`` readable by others, and folders others may list or enter."""
    bad = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IXOTH):
            bad.append(f"{path.relative_to(root.parent)} {stat.filemode(mode)}")
    return bad


def _rewrite_patient(source: Path, target: Path) -> list[Path]:
    """Copy a phantom study, giving it a recognisable patient name and ID."""
    files = []
    for path in sorted(source.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = PHI_NAME, PHI_ID
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
        files.append(out)
    return files


@dataclass
class ServedRun:
    """What one ``orthonode serve`` run left: its configuration, log and listening sockets."""

    config: Any
    log_text: str
    listening: dict[str, set[str]]


@pytest.fixture(scope="module")
def served_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, knee_phantoms: Path  # noqa: F811
) -> ServedRun:
    """``orthonode serve`` with the default logging and bind settings, started under umask 022
    (what a service usually gets): one study with a recognisable patient received and
    processed, then stopped."""
    from dicom_node.config import load_config
    from tests.support.node import ServeProcess, make_node_config, run_storescu, write_node_yaml

    tmp = tmp_path_factory.mktemp("served")
    config_path = write_node_yaml(tmp, make_node_config(tmp, tiny_checkpoint))
    config = load_config(config_path)
    files = _rewrite_patient(sorted(knee_phantoms.glob("knee_*"))[0] / "dicom", tmp / "study")
    old_umask = os.umask(0o022)
    try:
        proc = ServeProcess(config_path, tmp / "serve.log").start()
    finally:
        os.umask(old_umask)
    try:
        proc.wait_healthy(config.http.port)
        run_storescu(config.listener.port, files)
        engine = db.make_engine(config.database_url)
        factory = db.make_session_factory(engine)
        try:
            def finished() -> bool:
                with db.session_scope(factory) as s:
                    jobs = list(s.execute(select(db.Job)).scalars())
                    return bool(jobs) and all(j.state in (db.JobState.DONE, db.JobState.FAILED) for j in jobs)

            wait_for(finished, 150, "the study's job to finish")
        finally:
            engine.dispose()
        listening = {"http": _listening_addresses(config.http.port), "dicom": _listening_addresses(config.listener.port)}
        proc.terminate()
    finally:
        proc.kill()
    return ServedRun(config, proc.log_path.read_text(errors="replace"), listening)


def test_served_node_keeps_patient_data_private(served_run: ServedRun) -> None:
    """One served run (the fixture runs once per module, so these checks share it)."""
    log_text = served_run.log_text
    assert "node orthonode-test up" in log_text, log_text[-2000:]
    assert "created study" in log_text  # the instances were logged, by UID only
    for secret in (PHI_ID, PHI_NAME, "Geheim", "Patientin"):
        assert secret not in log_text, f"{secret!r} appears in the node's log"

    assert served_run.listening == {"http": {"127.0.0.1"}, "dicom": {"127.0.0.1"}}

    # received instances, the database, results and work folders: nothing open to other users
    assert any((served_run.config.data_dir / "instances").rglob("*.dcm"))
    assert any((served_run.config.data_dir / "results").rglob("sr.dcm"))
    exposed = _world_accessible(served_run.config.data_dir)
    assert exposed == [], "\n".join(exposed)
