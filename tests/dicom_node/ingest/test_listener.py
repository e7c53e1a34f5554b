"""The DICOM listener on loopback, with dcmtk (storescu, echoscu) and pynetdicom as senders."""
from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, sop_class
from sqlalchemy import func, select, text

from dicom_node import db
from dicom_node.config import NodeConfig
from dicom_node.db import ASSOCIATION_REJECTED_PREFIX
from dicom_node.ingest import AssociationHolds, CallerPolicy, GroupRecorder, Listener, StoreReceiver, StoreStatus
from dicom_node.storage import Storage
from tests.support.node import receive_file, wait_for
from tests.inference.dicom_factory import (
    Geometry,
    SeriesHeader,
    pattern_volume,
    write_classic_series,
    write_enhanced_series,
)

needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk (storescu/echoscu) is not installed")


@dataclass
class Node:
    """A running listener with its storage, database and the study-assembly hook's calls."""

    config: NodeConfig
    listener: Listener
    storage: Storage
    factory: Any
    engine: Any
    stored_calls: list[tuple[str, str]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.config.listener.port

    def count(self, model: type) -> int:
        with db.session_scope(self.factory) as s:
            return int(s.execute(select(func.count()).select_from(model)).scalar_one())

    def instance(self, sop_uid: str) -> db.Instance | None:
        with db.session_scope(self.factory) as s:
            return s.execute(select(db.Instance).where(db.Instance.sop_instance_uid == sop_uid)).scalar_one_or_none()

    def files(self) -> list[Path]:
        return sorted(p for p in self.storage.root.rglob("*") if p.is_file())

    def rejections(self) -> list[tuple[str, str]]:
        """(kind, message) of the association rejections in the audit trail, oldest first."""
        with db.session_scope(self.factory) as s:
            rows = s.execute(
                select(db.EventRecord.kind, db.EventRecord.message)
                .where(db.EventRecord.kind.startswith(ASSOCIATION_REJECTED_PREFIX))
                .order_by(db.EventRecord.id)
            ).all()
        return [(kind.removeprefix(ASSOCIATION_REJECTED_PREFIX), message) for kind, message in rows]


@pytest.fixture
def start_node(make_config: Callable[..., NodeConfig]) -> Iterator[Callable[..., Node]]:
    """``start_node(listener={...}, storage={...}, hook=...)``: a running node on a free port."""
    nodes: list[Node] = []

    def start(hook: Callable[[str, str], None] | None = None, holds: AssociationHolds | None = None,
              **sections: Any) -> Node:
        config = make_config(**sections)
        db.upgrade_database(config.database_url)
        engine = db.make_engine(config.database_url)
        factory = db.make_session_factory(engine)
        storage = Storage(config.data_dir / "incoming", config.storage.min_free_mb)
        calls: list[tuple[str, str]] = []
        listener = Listener(config, storage, factory, on_instance_stored=hook or (lambda st, se: calls.append((st, se))),
                            study_holds=holds)
        node = Node(config, listener, storage, factory, engine, calls)
        listener.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.listener.stop(timeout=2)
        node.engine.dispose()


# --------------------------------------------------------------------------- helpers


def _series(folder: Path, syntax: str = ExplicitVRLittleEndian, slices: int = 2, **header: Any) -> list[Path]:
    return write_classic_series(folder, pattern_volume(slices, 64, 64), Geometry(), SeriesHeader(**header), transfer_syntax=syntax)


def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file: what follows the preamble and the file meta group."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    # (0002,0000) UL, explicit VR little endian: tag 4 + VR 2 + length 2 + value 4 bytes
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length :]


def _send(
    port: int,
    items: Sequence[Path | Dataset],
    *,
    calling: str = "TESTSCU",
    called: str = "ORTHONODE",
    bind_address: tuple[str, int] | None = None,
    extra_contexts: Sequence[tuple[str, str]] = (),
) -> list[int]:
    """C-STORE each item (a file is sent as its encoded bytes, not re-encoded) on one association."""
    ae = AE(ae_title=calling)
    contexts: set[tuple[str, str]] = set(extra_contexts)
    for item in items:
        ds = pydicom.dcmread(item, stop_before_pixels=True) if isinstance(item, Path) else item
        contexts.add((str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    for abstract, syntax in sorted(contexts):
        ae.add_requested_context(abstract, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, bind_address=bind_address)
    assert assoc.is_established, f"association not established (rejected={assoc.is_rejected})"
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        assoc.release()


def _small_dataset(sop_class_uid: str, **values: Any) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PHANTOM9"
    for key, value in values.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- association


@needs_dcmtk
def test_echo(start_node: Callable[..., Node]) -> None:
    node = start_node()
    proc = _run(["echoscu", "-aet", "ECHOSCU", "-aec", "ORTHONODE", "127.0.0.1", str(node.port)])
    assert proc.returncode == 0, proc.stderr


@needs_dcmtk
def test_unknown_called_and_calling_titles_are_rejected(start_node: Callable[..., Node], caplog: Any) -> None:
    node = start_node()
    with caplog.at_level(logging.WARNING, logger="dicom_node.ingest"):
        wrong_called = _run(["echoscu", "-aet", "ECHOSCU", "-aec", "NOTME", "127.0.0.1", str(node.port)])
        wrong_calling = _run(["echoscu", "-aet", "STRANGER", "-aec", "ORTHONODE", "127.0.0.1", str(node.port)])
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
    assert wrong_calling.returncode != 0 and "Calling AE Title Not Recognized" in wrong_calling.stderr
    assert "calling AE title 'STRANGER' is not in listener.allowed_callers" in caplog.text
    # counted by reason in the audit trail (what /metrics reports), with who tried
    assert [kind for kind, _ in node.rejections()] == ["called_ae_title", "calling_ae_title"]
    assert node.rejections()[1][1].startswith("STRANGER@127.0.0.1 to ORTHONODE: calling AE title")


def test_unknown_host_is_rejected(start_node: Callable[..., Node], caplog: Any) -> None:
    # STORESCU may call from 127.0.0.1 only; 127.0.0.2 is loopback too but another host
    node = start_node()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(sop_class.Verification)
    with caplog.at_level(logging.WARNING, logger="dicom_node.ingest"):
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ORTHONODE", bind_address=("127.0.0.2", 0))
    assert assoc.is_rejected and not assoc.is_established
    assert "host 127.0.0.2 is not among the hosts allowed for calling AE title 'STORESCU'" in caplog.text
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ORTHONODE", bind_address=("127.0.0.1", 0))
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    assert [kind for kind, _ in node.rejections()] == ["host"]


def test_any_caller_and_several_titles(start_node: Callable[..., Node]) -> None:
    node = start_node(listener={"allow_any_caller": True, "ae_titles": ["ORTHONODE", "KNEE_AI"]})
    for called in ("ORTHONODE", "KNEE_AI"):
        ae = AE(ae_title="ANYBODY")
        ae.add_requested_context(sop_class.Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
        assert assoc.is_established
        assert assoc.acceptor.ae_title == called  # answered under the title it called
        assoc.release()


def test_max_associations(start_node: Callable[..., Node]) -> None:
    node = start_node(listener={"max_associations": 1})
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class.Verification)
    first = ae.associate("127.0.0.1", node.port, ae_title="ORTHONODE")
    assert first.is_established
    assert node.listener.active_associations == 1
    second = ae.associate("127.0.0.1", node.port, ae_title="ORTHONODE")
    assert second.is_rejected
    # rejected-transient, service-provider (presentation), local limit exceeded
    assert (second.acceptor.primitive.result, second.acceptor.primitive.result_source) == (0x02, 0x03)
    assert second.acceptor.primitive.diagnostic == 0x02
    first.release()
    assert node.rejections() == [
        ("too_many_associations", "TESTSCU@127.0.0.1 to ORTHONODE: 1 associations are open, listener.max_associations is 1")
    ]


def test_caller_policy_without_network() -> None:
    from dicom_node.config import parse_config

    listener = parse_config(
        {
            "listener": {
                "allowed_callers": [
                    {"ae_title": "PACS", "hosts": ["10.1.0.0/16", "192.168.1.5"]},
                    {"ae_title": "ANYHOST"},
                ]
            }
        }
    ).listener
    policy = CallerPolicy(listener)
    assert policy.check("ORTHONODE", "PACS", "10.1.200.3") is None
    assert policy.check("ORTHONODE", "PACS", "::ffff:192.168.1.5") is None  # IPv4-mapped IPv6
    assert policy.check("ORTHONODE", "ANYHOST", "203.0.113.9") is None
    rejected = policy.check("ORTHONODE", "PACS", "10.2.0.1")
    assert rejected is not None and rejected.diagnostic == 0x03 and "host 10.2.0.1" in rejected.reason
    rejected = policy.check("OTHER", "PACS", "10.1.0.1")
    assert rejected is not None and rejected.diagnostic == 0x07
    bad = parse_config({"listener": {"allowed_callers": [{"ae_title": "PACS", "hosts": ["pacs.example.org"]}]}}).listener
    with pytest.raises(ValueError, match=r"listener.allowed_callers\[0\].hosts: 'pacs.example.org'"):
        CallerPolicy(bad)


# --------------------------------------------------------------------------- C-STORE


@needs_dcmtk
def test_storescu_series_rows_and_files_exist_when_storescu_returns(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node()
    files = _series(tmp_path / "in", JPEGLSLossless, slices=3)
    enhanced = write_enhanced_series(tmp_path / "in" / "enhanced.dcm", pattern_volume(3, 64, 64), Geometry())
    proc = _run(["storescu", "-aet", "STORESCU", "-aec", "ORTHONODE", "-xt", "127.0.0.1", str(node.port), *map(str, files)])
    assert proc.returncode == 0, proc.stderr
    proc = _run(["storescu", "-aet", "STORESCU", "-aec", "ORTHONODE", "127.0.0.1", str(node.port), str(enhanced)])
    assert proc.returncode == 0, proc.stderr
    # no waiting: success was answered only after the file and the row were committed
    for path in [*files, enhanced]:
        sent = pydicom.dcmread(path)
        row = node.instance(sent.SOPInstanceUID)
        assert row is not None, f"no row for {path.name}"
        stored = node.storage.resolve(row.path)
        assert stored == node.storage.path_for(sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
        assert row.size_bytes == stored.stat().st_size and row.calling_ae_title == "STORESCU"
        assert row.peer_host == "127.0.0.1" and row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
        back = pydicom.dcmread(stored)
        assert back.PixelData == sent.PixelData  # the compressed stream, untouched
    assert node.count(db.Study) == 2 and node.count(db.Series) == 2 and node.count(db.Instance) == 4
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    assert node.stored_calls.count((study_uid, pydicom.dcmread(files[0]).SeriesInstanceUID)) == 3
    with db.session_scope(node.factory) as s:
        series = s.execute(select(db.Series).where(db.Series.instance_count == 3)).scalar_one()
        assert series.modality == "MR" and series.series_description == "PD FS SAG" and series.series_number == 3
        assert series.study.patient_id_hash == db.hash_patient_id("PHANTOM001")
        assert series.study.accession_number == "ACC001"


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless, ExplicitVRLittleEndian])
def test_transfer_syntaxes_stored_byte_identical(start_node: Callable[..., Node], tmp_path: Path, syntax: str) -> None:
    node = start_node()
    files = _series(tmp_path / "in", syntax, slices=1)
    assert _send(node.port, files) == [0x0000]
    sent = pydicom.dcmread(files[0], stop_before_pixels=True)
    stored = node.storage.path_for(sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
    assert _dataset_bytes(stored) == _dataset_bytes(files[0])
    back = pydicom.dcmread(stored)
    assert back.file_meta.TransferSyntaxUID == syntax
    assert back.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert node.instance(sent.SOPInstanceUID).transfer_syntax_uid == syntax


def test_unsupported_sop_class_is_refused_at_negotiation(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node()
    ct = _small_dataset(sop_class.CTImageStorage)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class.CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(sop_class.Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ORTHONODE")
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [sop_class.CTImageStorage]
        assert assoc.rejected_contexts[0].result == 0x03  # abstract syntax not supported
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(ct)
    finally:
        assoc.release()
    assert node.files() == [] and node.count(db.Instance) == 0


def test_ignored_sop_class_is_acknowledged_and_dropped(start_node: Callable[..., Node], caplog: Any) -> None:
    node = start_node()
    gsps = _small_dataset(sop_class.GrayscaleSoftcopyPresentationStateStorage, Modality="PR")
    with caplog.at_level(logging.INFO, logger="dicom_node.ingest"):
        assert _send(node.port, [gsps]) == [0x0000]
    assert node.files() == [] and node.count(db.Instance) == 0 and node.stored_calls == []
    assert f"ignored SOP instance {gsps.SOPInstanceUID}" in caplog.text


@pytest.mark.parametrize(
    "policy, second_status, kept",
    [
        ("keep_first", 0x0000, "first"),
        ("overwrite", 0x0000, "second"),
        ("reject_if_different", 0x0111, "first"),
    ],
)
def test_duplicate_policies(
    start_node: Callable[..., Node], tmp_path: Path, policy: str, second_status: int, kept: str
) -> None:
    node = start_node(listener={"duplicate_policy": policy})
    first = _series(tmp_path / "a", slices=1)[0]
    ds = pydicom.dcmread(first)
    ds.SeriesDescription = "PD FS SAG corrected"  # same UIDs, different bytes
    second = tmp_path / "second.dcm"
    ds.save_as(second)
    assert _send(node.port, [first]) == [0x0000]
    assert _send(node.port, [first]) == [0x0000]  # identical resend: acknowledged under every policy
    assert _send(node.port, [second]) == [second_status]
    expected = first if kept == "first" else second
    stored = node.storage.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert _dataset_bytes(stored) == _dataset_bytes(expected)
    assert node.instance(ds.SOPInstanceUID).sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert node.count(db.Instance) == 1 and len(node.files()) == 1
    # the hook fires for new content only: the first store, and the overwrite
    assert len(node.stored_calls) == (2 if policy == "overwrite" else 1)


def test_duplicate_uid_in_another_series(start_node: Callable[..., Node], tmp_path: Path) -> None:
    """A SOP Instance UID that arrives again under another series: refused, or moved by overwrite."""
    for policy, status in (("reject_if_different", 0x0111), ("overwrite", 0x0000)):
        node = start_node(listener={"duplicate_policy": policy}, node={"data_dir": str(tmp_path / policy / "data")})
        first = _series(tmp_path / policy / "in", slices=1)[0]
        ds = pydicom.dcmread(first)
        ds.SeriesInstanceUID = generate_uid()
        moved = tmp_path / f"{policy}-moved.dcm"
        ds.save_as(moved)
        assert _send(node.port, [first, moved]) == [0x0000, status]
        files = node.files()
        assert len(files) == 1 and node.count(db.Instance) == 1
        row = node.instance(ds.SOPInstanceUID)
        expected_series = ds.SeriesInstanceUID if policy == "overwrite" else pydicom.dcmread(first).SeriesInstanceUID
        assert row.path.split("/")[1] == expected_series and files[0] == node.storage.resolve(row.path)


def test_disk_reserve_refuses_with_a700(start_node: Callable[..., Node], tmp_path: Path, caplog: Any) -> None:
    node = start_node(storage={"min_free_mb": 10**9})
    files = _series(tmp_path / "in", slices=1)
    with caplog.at_level(logging.ERROR, logger="dicom_node.ingest"):
        assert _send(node.port, files) == [0xA700]
    assert node.files() == [] and node.count(db.Instance) == 0 and node.count(db.Study) == 0
    assert "out of space" in caplog.text and "storage.min_free_mb" in caplog.text


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize(
    "values",
    [
        {"StudyInstanceUID": "1.2.3/../../../etc"},
        {"SeriesInstanceUID": "../1.2.3"},
        {"SeriesInstanceUID": None},
        {"StudyInstanceUID": "1.2." + "3" * 70},
    ],
)
def test_unsafe_or_missing_uids_are_refused(start_node: Callable[..., Node], values: dict[str, Any], caplog: Any) -> None:
    node = start_node()
    ds = _small_dataset(sop_class.MRImageStorage, **values)
    with caplog.at_level(logging.WARNING, logger="dicom_node.ingest"):
        assert _send(node.port, [ds]) == [StoreStatus.INVALID_UIDS]
    assert node.files() == [] and node.count(db.Instance) == 0
    assert f"refused SOP instance {ds.SOPInstanceUID}" in caplog.text
    assert [p for p in node.config.data_dir.parent.rglob("*") if p.name in ("etc", "1.2.3")] == []


def test_database_failure_keeps_nothing(start_node: Callable[..., Node], tmp_path: Path, caplog: Any) -> None:
    node = start_node()
    with node.engine.begin() as conn:  # the commit of the row fails: no events table
        conn.execute(text("DROP TABLE events"))
    files = _series(tmp_path / "in", slices=1)
    with caplog.at_level(logging.ERROR, logger="dicom_node.ingest"):
        assert _send(node.port, files) == [StoreStatus.DATABASE_UNAVAILABLE]
    assert node.files() == [] and node.count(db.Instance) == 0 and node.count(db.Study) == 0
    assert node.stored_calls == []
    assert "the database is unavailable, the file was not kept" in caplog.text


def test_unexpected_error_answers_processing_failure_and_keeps_nothing(
    start_node: Callable[..., Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A bug between writing the file and committing its row (here: building the row raises)
    does not end the association or pass for "cannot understand": the sender gets 0x0110, the
    log has the traceback, the file is removed, and the next instance is stored."""
    import dicom_node.ingest.receiver as receiver_module

    node = start_node()
    real = receiver_module.ReceivedInstance
    calls = {"n": 0}

    def failing_once(**fields: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault while building the row")
        return real(**fields)

    monkeypatch.setattr(receiver_module, "ReceivedInstance", failing_once)
    files = _series(tmp_path / "in", slices=2)
    with caplog.at_level(logging.ERROR, logger="dicom_node.ingest"):
        assert _send(node.port, files) == [StoreStatus.PROCESSING_FAILURE, StoreStatus.SUCCESS]
    assert "unexpected error in the node" in caplog.text and "injected fault while building the row" in caplog.text
    assert len(node.files()) == 1 and node.count(db.Instance) == 1


def test_unreachable_database(make_config: Callable[..., NodeConfig], tmp_path: Path) -> None:
    from tests.support.node import free_port

    config = make_config()
    # nothing listens on that port: every connection attempt fails at once
    engine = db.make_engine(f"postgresql+psycopg2://nobody@127.0.0.1:{free_port()}/none")
    storage = Storage(tmp_path / "incoming", 0)
    receiver = StoreReceiver.from_config(config, storage, db.make_session_factory(engine))
    file = _series(tmp_path / "in", slices=1)[0]
    status = receive_file(receiver, file)
    assert status == StoreStatus.DATABASE_UNAVAILABLE
    assert [p for p in storage.root.rglob("*") if p.is_file()] == []


def test_hook_failure_does_not_fail_the_store(start_node: Callable[..., Node], tmp_path: Path, caplog: Any) -> None:
    def broken(study: str, series: str) -> None:
        raise RuntimeError("assembler is down")

    node = start_node(hook=broken)
    files = _series(tmp_path / "in", slices=1)
    with caplog.at_level(logging.ERROR, logger="dicom_node.ingest"):
        assert _send(node.port, files) == [0x0000]
    assert node.count(db.Instance) == 1
    assert "on_instance_stored failed" in caplog.text


def test_receiver_checks_without_network(make_config: Callable[..., NodeConfig], tmp_path: Path) -> None:
    config = make_config()
    engine = db.make_engine(config.database_url)
    db.upgrade_database(engine)
    receiver = StoreReceiver.from_config(config, Storage(tmp_path / "incoming", 0), db.make_session_factory(engine))
    file = _series(tmp_path / "in", slices=1)[0]
    ds = pydicom.dcmread(file, stop_before_pixels=True)
    data = file.read_bytes()

    def receive(payload: bytes = data, **kw: Any) -> int:
        return receive_file(receiver, file, payload, **kw)

    try:
        assert receive(affected_sop_instance_uid="1.2.3.4") == StoreStatus.SOP_INSTANCE_UID_MISMATCH
        assert receive(context_sop_class_uid=sop_class.EnhancedMRImageStorage) == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert receive(context_sop_class_uid=sop_class.CTImageStorage) == StoreStatus.SOP_CLASS_NOT_SUPPORTED
        assert receive(b"not DICOM at all") == StoreStatus.UNPARSABLE_DATASET
        assert [p for p in receiver.storage.root.rglob("*") if p.is_file()] == []
        assert receive() == StoreStatus.SUCCESS
        assert receiver.storage.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID).read_bytes() == data
    finally:
        engine.dispose()


def test_concurrent_associations(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node()
    header = {"study_uid": generate_uid()}
    batches = [_series(tmp_path / f"s{i}", slices=3, series_uid=generate_uid(), **header) for i in range(3)]
    results: list[list[int]] = []

    def send(batch: list[Path]) -> None:
        results.append(_send(node.port, batch))

    threads = [threading.Thread(target=send, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [[0, 0, 0]] * 3
    assert node.count(db.Study) == 1 and node.count(db.Series) == 3 and node.count(db.Instance) == 9


def test_stop_closes_the_port(start_node: Callable[..., Node]) -> None:
    node = start_node()
    node.listener.stop()
    assert not node.listener.running and node.listener.active_associations == 0
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class.Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ORTHONODE")
    assert not assoc.is_established
    node.listener.start()  # restartable on the same port
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ORTHONODE")
    assert assoc.is_established
    assoc.release()


# --------------------------------------------------------------------------- TLS


def test_tls(start_node: Callable[..., Node], tls_files: dict[str, Path]) -> None:
    import ssl

    node = start_node(
        listener={
            "tls": {
                "enabled": True,
                "certificate": str(tls_files["server.pem"]),
                "private_key": str(tls_files["server.key"]),
                "ca_certificates": str(tls_files["ca.pem"]),
                "require_client_certificate": True,
            }
        }
    )

    def echo(context: ssl.SSLContext | None) -> bool:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(sop_class.Verification)
        ae.acse_timeout = ae.network_timeout = 5
        tls_args = (context, "127.0.0.1") if context is not None else None
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ORTHONODE", tls_args=tls_args)
        if not assoc.is_established:
            return False
        ok = int(assoc.send_c_echo().Status) == 0
        assoc.release()
        return ok

    with_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_files["ca.pem"]))
    with_cert.load_cert_chain(str(tls_files["client.pem"]), str(tls_files["client.key"]))
    without_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_files["ca.pem"]))
    assert echo(with_cert)
    assert not echo(without_cert)  # the client certificate is required
    assert not echo(None)  # plain DICOM on a TLS port


def test_tls_configuration_errors_name_the_key(make_config: Callable[..., NodeConfig], tmp_path: Path) -> None:
    from dicom_node.ingest import make_ssl_context

    config = make_config(
        listener={"tls": {"enabled": True, "certificate": "missing.pem", "private_key": "missing.key"}}
    )
    with pytest.raises(FileNotFoundError, match=r"listener.tls.certificate: .*missing.pem"):
        make_ssl_context(config)


@needs_dcmtk
def test_storescu_unsupported_sop_class(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node()
    ct = _small_dataset(sop_class.CTImageStorage, Modality="CT")
    path = tmp_path / "ct.dcm"
    ct.save_as(path, enforce_file_format=True)
    proc = _run(["storescu", "-aet", "STORESCU", "-aec", "ORTHONODE", "127.0.0.1", str(node.port), str(path)])
    assert proc.returncode != 0
    assert "no presentation context" in (proc.stdout + proc.stderr).lower()
    assert node.files() == [] and node.count(db.Instance) == 0


@pytest.mark.parametrize("log_phi", [False, True])
def test_patient_data_stays_out_of_logs_unless_asked(
    start_node: Callable[..., Node], tmp_path: Path, caplog: Any, log_phi: bool
) -> None:
    node = start_node(logging={"log_phi": log_phi})
    files = _series(tmp_path / "in", slices=1, patient_id="PATIENT4711")
    sent = pydicom.dcmread(files[0], stop_before_pixels=True)
    with caplog.at_level(logging.DEBUG, logger="dicom_node"):
        assert _send(node.port, files) == [0x0000]
    assert sent.SOPInstanceUID in caplog.text and sent.StudyInstanceUID in caplog.text
    assert ("PATIENT4711" in caplog.text) is log_phi
    assert ("Phantom^Knee" in caplog.text) is log_phi


def test_file_without_row_is_recorded_when_resent(make_config: Callable[..., NodeConfig], tmp_path: Path) -> None:
    """The node stopped after writing a file and before committing its row: the sender got no
    success and sends again; the file is found identical and the row is written."""
    config = make_config()
    engine = db.make_engine(config.database_url)
    db.upgrade_database(engine)
    calls: list[tuple[str, str]] = []
    storage = Storage(tmp_path / "incoming", 0)
    receiver = StoreReceiver.from_config(config, storage, db.make_session_factory(engine), lambda a, b: calls.append((a, b)))
    file = _series(tmp_path / "in", slices=1)[0]
    ds = pydicom.dcmread(file, stop_before_pixels=True)
    storage.store(file.read_bytes(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, "keep_first")
    try:
        status = receive_file(receiver, file)
        assert status == StoreStatus.SUCCESS
        assert calls == [(ds.StudyInstanceUID, ds.SeriesInstanceUID)]
        with db.session_scope(db.make_session_factory(engine)) as s:
            row = s.execute(select(db.Instance)).scalar_one()
            assert row.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    finally:
        engine.dispose()


def test_group_recorder_commits_concurrent_instances_together(
    make_config: Callable[..., NodeConfig], tmp_path: Path
) -> None:
    """Instances that wait while another transaction holds the database are committed in one
    transaction; each caller gets its own outcome, a refused one does not refuse the others,
    and every folder entry is durable (fsynced) before the rows commit."""
    config = make_config()
    db.upgrade_database(config.database_url)
    engine = db.make_engine(config.database_url)
    factory = db.make_session_factory(engine)
    storage = Storage(tmp_path / "incoming", 0)
    recorder = GroupRecorder(factory)
    study, other_study = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.20"
    series = "1.2.826.0.1.3680043.8.498.11"

    def stored_info(study_uid: str, sop_uid: str) -> tuple[db.ReceivedInstance, Any]:
        stored = storage.store(sop_uid.encode(), study_uid, series, sop_uid, "keep_first", sync_directory=False)
        assert stored.directory_pending
        info = db.ReceivedInstance(
            study_instance_uid=study_uid, series_instance_uid=series, sop_instance_uid=sop_uid,
            sop_class_uid=sop_class.MRImageStorage, transfer_syntax_uid=ExplicitVRLittleEndian,
            path=stored.relative_path, size_bytes=stored.size_bytes, sha256=stored.sha256, received_at=db.utcnow(),
        )
        return info, stored

    first = stored_info(study, f"{series}.1")
    waiting = [stored_info(study, f"{series}.{i}") for i in range(2, 6)]
    # the series now belongs to `study`; this one claims it for another study and is refused
    waiting.append(stored_info(other_study, f"{series}.9"))
    outcomes: dict[str, Any] = {}

    def record(item: tuple[db.ReceivedInstance, Any]) -> None:
        try:
            outcomes[item[0].sop_instance_uid] = recorder.record(item[0], item[1], move=False)
        except db.SeriesStudyMismatchError as exc:
            outcomes[item[0].sop_instance_uid] = exc

    try:
        with engine.connect() as blocker:  # holds the write lock: the first leader waits on it
            blocker.exec_driver_sql("SELECT 1")  # the engine begins every transaction with BEGIN IMMEDIATE
            leader = threading.Thread(target=record, args=(first,))
            leader.start()
            deadline = time.monotonic() + 20
            while not recorder._leading and time.monotonic() < deadline:
                time.sleep(0.01)
            others = [threading.Thread(target=record, args=(item,)) for item in waiting]
            for thread in others:
                thread.start()
            while len(recorder._queue) < len(waiting) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(recorder._queue) == len(waiting)
            blocker.rollback()
        for thread in [leader, *others]:
            thread.join(30)
        assert (recorder.batches, recorder.instances) == (2, 6)
        assert isinstance(outcomes[f"{series}.9"], db.SeriesStudyMismatchError)
        recorded = [outcomes[f"{series}.{i}"] for i in range(1, 6)]
        assert all(isinstance(r, db.RecordResult) and r.inserted for r in recorded)
        assert all(not stored.directory_pending for _, stored in [first, *waiting])
        with db.session_scope(factory) as s:
            assert s.execute(select(db.Series.instance_count)).scalar_one() == 5
            assert s.execute(select(func.count()).select_from(db.Study)).scalar_one() == 1
    finally:
        recorder.close()
        engine.dispose()


def test_group_recorder_falls_back_to_one_transaction_each(
    make_config: Callable[..., NodeConfig], tmp_path: Path
) -> None:
    """A batch whose transaction fails is retried instance by instance, so only the instance
    that cannot be recorded is refused."""
    config = make_config()
    db.upgrade_database(config.database_url)
    engine = db.make_engine(config.database_url)
    factory = db.make_session_factory(engine)
    storage = Storage(tmp_path / "incoming", 0)
    recorder = GroupRecorder(factory)
    study, series = "1.2.826.0.1.3680043.8.498.30", "1.2.826.0.1.3680043.8.498.31"
    pending = []
    for i in range(3):
        sop = f"{series}.{i + 1}"
        stored = storage.store(sop.encode(), study, series, sop, "keep_first")
        # the second one has a naive timestamp, which the column type refuses when the statement runs
        received_at = db.utcnow().replace(tzinfo=None) if i == 1 else db.utcnow()
        info = db.ReceivedInstance(
            study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop,
            sop_class_uid=sop_class.MRImageStorage, transfer_syntax_uid=ExplicitVRLittleEndian,
            path=stored.relative_path, size_bytes=stored.size_bytes, sha256=stored.sha256, received_at=received_at,
        )
        pending.append((info, stored))
    from dicom_node.ingest.group_commit import _Pending

    items = [_Pending(info, stored, move=False) for info, stored in pending]
    try:
        recorder._commit(items)
        assert items[0].result is not None and items[2].result is not None
        assert items[1].result is None and items[1].error is not None
        assert "has no timezone" in str(items[1].error)
        with db.session_scope(factory) as s:
            assert s.execute(select(func.count()).select_from(db.Instance)).scalar_one() == 2
    finally:
        recorder.close()
        engine.dispose()


def test_open_association_holds_its_studies_until_the_connection_closes(start_node: Callable[..., Node],
                                                                        tmp_path: Path) -> None:
    """Each study an association delivers to is held once while it is open and released once when
    it closes, by release or by abort, so that a sender's pause never gets a partial study queued."""
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(kind: str) -> Callable[[str], None]:
        def call(study_uid: str) -> None:
            with lock:
                events.append((kind, study_uid))
        return call

    holds = AssociationHolds(record("hold"), record("release"))
    node = start_node(holds=holds)
    study_a = _series(tmp_path / "a", slices=3)
    study_b = _series(tmp_path / "b", slices=1)
    uid_a = str(pydicom.dcmread(study_a[0], stop_before_pixels=True).StudyInstanceUID)
    uid_b = str(pydicom.dcmread(study_b[0], stop_before_pixels=True).StudyInstanceUID)

    ae = AE(ae_title="TESTSCU")
    ds = pydicom.dcmread(study_a[0], stop_before_pixels=True)
    ae.add_requested_context(str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ORTHONODE")
    assert assoc.is_established
    assert [int(assoc.send_c_store(p).Status) for p in study_a[:2] + study_b] == [0, 0, 0]
    with lock:  # held while the association is open, once per study however many instances came
        assert sorted(events) == sorted([("hold", uid_a), ("hold", uid_b)])
    assert holds.open_studies() == 2
    assoc.release()
    wait_for(lambda: holds.open_studies() == 0, 5, "the association's studies to be released")
    with lock:
        assert sorted(e for e in events if e[0] == "release") == sorted([("release", uid_a), ("release", uid_b)])

    # an aborted association releases too
    events.clear()
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ORTHONODE")
    assert int(assoc.send_c_store(study_a[2]).Status) == 0
    assoc.abort()
    wait_for(lambda: holds.open_studies() == 0, 5, "the aborted association's study to be released")
    with lock:
        assert events == [("hold", uid_a), ("release", uid_a)]


# --------------------------------------------------------------------------- folder fsync and commit


class _HeldFolderSync:
    """Stands in for ``listener.sync_directories``: each call waits until ``release`` (or
    raises ``error``), so a test can look at the database while a folder fsync is in flight."""

    def __init__(self, error: OSError | None = None) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.error = error
        self.calls = 0

    def __call__(self, stored: Any) -> None:
        from dicom_node.storage import sync_directories

        self.calls += 1
        self.started.set()
        assert self.release.wait(30), "the test never released the folder fsync"
        if self.error is not None:
            raise self.error
        sync_directories(stored)


def _receiver_parts(make_config: Callable[..., NodeConfig], tmp_path: Path, policy: str = "reject_if_different",
                    config: NodeConfig | None = None) -> tuple[StoreReceiver, Any, Any, Storage]:
    config = config or make_config(listener={"duplicate_policy": policy})
    engine = db.make_engine(config.database_url)
    db.upgrade_database(engine)
    factory = db.make_session_factory(engine)
    storage = Storage(tmp_path / "incoming", 0)
    return StoreReceiver.from_config(config, storage, factory), factory, engine, storage


def _instances_in_db(factory: Any) -> dict[str, str]:
    """SOP Instance UID -> sha256 of the committed instance rows, read outside any transaction
    (the engine's sessions begin with BEGIN IMMEDIATE and would queue behind the recorder's)."""
    import sqlite3
    from contextlib import closing

    database = factory.kw["bind"].url.database
    with closing(sqlite3.connect(database)) as conn:
        return dict(conn.execute("SELECT sop_instance_uid, sha256 FROM instances").fetchall())


def _receive_in_thread(receiver: StoreReceiver, file: Path,
                       data: bytes | None = None) -> tuple[threading.Thread, list[int]]:
    statuses: list[int] = []
    thread = threading.Thread(target=lambda: statuses.append(receive_file(receiver, file, data)))
    thread.start()
    return thread, statuses


def test_new_rows_commit_while_their_folder_is_fsynced_and_the_answer_waits_for_both(
    make_config: Callable[..., NodeConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit of a new row overlaps its folder fsync (the row is committed while the fsync
    is still held), but the C-STORE is answered only once the fsync is done."""
    import dicom_node.ingest.group_commit as group_commit

    receiver, factory, engine, storage = _receiver_parts(make_config, tmp_path)
    held = _HeldFolderSync()
    monkeypatch.setattr(group_commit, "sync_directories", held)
    file = _series(tmp_path / "in", slices=1)[0]
    sop = str(pydicom.dcmread(file, stop_before_pixels=True).SOPInstanceUID)
    try:
        thread, statuses = _receive_in_thread(receiver, file)
        assert held.started.wait(20)
        wait_for(lambda: sop in _instances_in_db(factory), 20, "the row committed while its folder fsync is held")
        time.sleep(0.1)
        assert statuses == [] and thread.is_alive(), "answered before the folder fsync finished"
        held.release.set()
        thread.join(20)
        assert statuses == [StoreStatus.SUCCESS]
    finally:
        held.release.set()
        receiver.close()
        engine.dispose()


def test_next_batch_commits_while_the_previous_folder_fsync_runs(
    make_config: Callable[..., NodeConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose rows are committed hands the lead on before waiting for its folder fsync:
    another association's instance is committed meanwhile, and each is answered only after
    the folder fsyncs (its own included) are done."""
    import dicom_node.ingest.group_commit as group_commit

    receiver, factory, engine, storage = _receiver_parts(make_config, tmp_path)
    held = _HeldFolderSync()
    monkeypatch.setattr(group_commit, "sync_directories", held)
    first, second = _series(tmp_path / "a", slices=1)[0], _series(tmp_path / "b", slices=1)[0]
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in (first, second)]
    try:
        thread1, statuses1 = _receive_in_thread(receiver, first)
        assert held.started.wait(20)
        wait_for(lambda: sops[0] in _instances_in_db(factory), 20, "the first row committed")
        thread2, statuses2 = _receive_in_thread(receiver, second)
        wait_for(lambda: sops[1] in _instances_in_db(factory), 20, "the second row committed during the first fsync")
        time.sleep(0.1)
        assert statuses1 == statuses2 == [], "answered before the folder fsync finished"
        held.release.set()
        thread1.join(20)
        thread2.join(20)
        assert statuses1 == statuses2 == [StoreStatus.SUCCESS]
        assert held.calls == 2 and receiver.recorder.batches == 2
    finally:
        held.release.set()
        receiver.close()
        engine.dispose()


def test_an_overwrite_commits_only_after_the_folder_fsync(
    make_config: Callable[..., NodeConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update of an acknowledged row (``overwrite`` with other bytes) keeps the old order:
    the row changes only once the new file's folder entry is durable."""
    import dicom_node.ingest.group_commit as group_commit

    receiver, factory, engine, storage = _receiver_parts(make_config, tmp_path, policy="overwrite")
    file = _series(tmp_path / "in", slices=1)[0]
    sop = str(pydicom.dcmread(file, stop_before_pixels=True).SOPInstanceUID)
    try:
        assert receive_file(receiver, file) == StoreStatus.SUCCESS
        first_sha = _instances_in_db(factory)[sop]
        changed = file.read_bytes()[:-2] + b"\x01\x02"  # same header, other last pixel
        held = _HeldFolderSync()
        monkeypatch.setattr(group_commit, "sync_directories", held)
        thread, statuses = _receive_in_thread(receiver, file, changed)
        assert held.started.wait(20)
        time.sleep(0.3)
        assert _instances_in_db(factory)[sop] == first_sha, "the row changed before the new file's entry was durable"
        held.release.set()
        thread.join(20)
        assert statuses == [StoreStatus.SUCCESS]
        assert _instances_in_db(factory)[sop] == hashlib.sha256(changed).hexdigest()
    finally:
        receiver.close()
        engine.dispose()


def test_failed_folder_fsync_after_the_commit_removes_the_rows(
    make_config: Callable[..., NodeConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """The rows committed before the folder fsync failed are removed again, the file too: the
    instance is refused with A701 and the database is as before (no study, series or row)."""
    import dicom_node.ingest.group_commit as group_commit

    receiver, factory, engine, storage = _receiver_parts(make_config, tmp_path)
    held = _HeldFolderSync(error=OSError(5, "Input/output error"))
    monkeypatch.setattr(group_commit, "sync_directories", held)
    file = _series(tmp_path / "in", slices=1)[0]
    sop = str(pydicom.dcmread(file, stop_before_pixels=True).SOPInstanceUID)
    try:
        with caplog.at_level(logging.ERROR, logger="dicom_node.ingest"):
            thread, statuses = _receive_in_thread(receiver, file)
            assert held.started.wait(20)
            wait_for(lambda: sop in _instances_in_db(factory), 20, "the row committed before the fsync fails")
            held.release.set()
            thread.join(20)
        assert statuses == [StoreStatus.STORAGE_WRITE_FAILED]
        assert "making the file's folder entry durable failed" in caplog.text
        assert _instances_in_db(factory) == {}
        assert [p for p in storage.root.rglob("*") if p.is_file()] == []
        with db.session_scope(factory) as s:
            assert s.execute(select(func.count()).select_from(db.Study)).scalar_one() == 0
            assert s.execute(select(func.count()).select_from(db.Series)).scalar_one() == 0
            kinds = s.execute(select(db.EventRecord.kind).order_by(db.EventRecord.id)).scalars().all()
        assert kinds == ["instance_stored", db.EventKind.INSTANCE_FORGOTTEN]
        # the sender's retry stores it (with a working fsync)
        monkeypatch.undo()
        assert receive_file(receiver, file) == StoreStatus.SUCCESS
        assert sop in _instances_in_db(factory)
    finally:
        held.release.set()
        receiver.close()
        engine.dispose()


def test_start_up_forgets_rows_whose_file_name_was_lost(
    make_config: Callable[..., NodeConfig], tmp_path: Path, caplog: Any
) -> None:
    """After a crash between a commit and the end of its folder fsync, a row may name a file
    whose entry was lost.  Creating the listener removes such rows among the newest (and a
    series and study left empty); the others stay, and a resend stores the instance again."""
    config = make_config()
    receiver, factory, engine, storage = _receiver_parts(make_config, tmp_path, config=config)
    kept = _series(tmp_path / "kept", slices=3)
    lost_alone = _series(tmp_path / "alone", slices=1)  # a study of its own: one series, one instance
    try:
        for file in [*kept, *lost_alone]:
            assert receive_file(receiver, file) == StoreStatus.SUCCESS
    finally:
        receiver.close()
    # the power went off: the last names never reached the disk
    lost = [kept[-1], lost_alone[0]]
    lost_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in lost}
    for path in storage.root.rglob("*.dcm"):
        if path.stem in lost_uids:
            path.unlink()
    try:
        with caplog.at_level(logging.WARNING, logger="dicom_node.ingest"):
            listener = Listener(config, storage, factory)
        assert set(_instances_in_db(factory)) == {
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in kept[:-1]
        }
        assert all(uid in caplog.text for uid in lost_uids) and "missing at start-up" in caplog.text
        with db.session_scope(factory) as s:
            assert s.execute(select(db.Series.instance_count)).scalars().all() == [2]
            assert s.execute(select(func.count()).select_from(db.Study)).scalar_one() == 1
            forgotten = s.execute(
                select(db.EventRecord.sop_instance_uid).where(db.EventRecord.kind == db.EventKind.INSTANCE_FORGOTTEN)
            ).scalars().all()
        assert set(forgotten) == lost_uids
        assert listener.receiver.forget_rows_without_files() == 0  # nothing left to remove
        for file in lost:
            assert receive_file(listener.receiver, file) == StoreStatus.SUCCESS
        assert len(_instances_in_db(factory)) == 4
    finally:
        listener.receiver.close()
        engine.dispose()


def test_commit_before_folder_sync_only_for_new_rows_on_sqlite(tmp_path: Path) -> None:
    """The rule itself: new rows with a pending folder entry may commit first on SQLite; an
    updated row, or any batch on PostgreSQL (where the newest rows may be another node's, so
    the start-up check cannot repair them), waits for the fsync."""
    from dicom_node.ingest.group_commit import _may_commit_before_folder_sync, _Pending

    storage = Storage(tmp_path / "incoming", 0)
    study, series = "1.2.826.0.1.3680043.8.498.40", "1.2.826.0.1.3680043.8.498.41"

    def pending(sop: str) -> _Pending:
        stored = storage.store(sop.encode(), study, series, sop, "keep_first", sync_directory=False)
        info = db.ReceivedInstance(
            study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop,
            sop_class_uid=sop_class.MRImageStorage, transfer_syntax_uid=ExplicitVRLittleEndian,
            path=stored.relative_path, size_bytes=stored.size_bytes, sha256=stored.sha256, received_at=db.utcnow(),
        )
        return _Pending(info, stored, move=False)

    new, updated = pending(f"{series}.1"), pending(f"{series}.2")
    inserted = db.RecordResult(1, inserted=True, changed=True, previous_path=None)
    replaced = db.RecordResult(2, inserted=False, changed=True, previous_path=None)
    mismatch = db.SeriesStudyMismatchError(series, "1.2.3", study)
    assert _may_commit_before_folder_sync([new], [inserted], "sqlite")
    assert _may_commit_before_folder_sync([new, updated], [inserted, mismatch], "sqlite")  # nothing written for it
    assert not _may_commit_before_folder_sync([new, updated], [inserted, replaced], "sqlite")
    assert not _may_commit_before_folder_sync([new], [inserted], "postgresql")
    updated.stored.sync_directory()  # its entry is durable already: an update of it may commit first
    assert _may_commit_before_folder_sync([new, updated], [inserted, replaced], "sqlite")


def test_start_up_check_leaves_what_a_crash_cannot_explain(
    make_config: Callable[..., NodeConfig], tmp_path: Path, caplog: Any
) -> None:
    """Rows are kept when their folder is gone too (storage not mounted, a study deleted by
    hand), when more files are missing than a crash can leave (one per association), and when
    the study's retention purge was interrupted (the purge finishes it)."""
    import shutil

    receiver, factory, engine, storage = _receiver_parts(make_config, tmp_path)
    studies = [_series(tmp_path / f"s{i}", slices=2) for i in range(3)]
    try:
        for files in studies:
            for file in files:
                assert receive_file(receiver, file) == StoreStatus.SUCCESS
        uids = [str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID) for files in studies]
        # study 0: its whole folder is gone; study 1: files gone, its purge marked and not finished
        shutil.rmtree(storage.root / uids[0])
        for path in (storage.root / uids[1]).rglob("*.dcm"):
            path.unlink()
        with db.session_scope(factory) as s:  # the purge's mark (retention.Purger._mark)
            marked = s.scalars(select(db.Study).where(db.Study.study_instance_uid == uids[1])).one()
            marked.purge_started_at, marked.purge_reason, marked.purge_age_days = db.utcnow(), "delivered", 31.0
        with caplog.at_level(logging.WARNING, logger="dicom_node.ingest"):
            assert receiver.forget_rows_without_files() == 0
        assert len(_instances_in_db(factory)) == 6
        assert "its row is kept" in caplog.text
        # study 2: both files gone from their folder, more than the one a single association can leave
        for path in (storage.root / uids[2]).rglob("*.dcm"):
            path.unlink()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="dicom_node.ingest"):
            assert receiver.forget_rows_without_files(at_most=1) == 0
        assert "nothing is removed, check the storage" in caplog.text
        assert len(_instances_in_db(factory)) == 6
        assert receiver.forget_rows_without_files(at_most=2) == 2  # within what a crash can leave
        assert len(_instances_in_db(factory)) == 4
    finally:
        receiver.close()
        engine.dispose()
