"""Export: routes, backoff, retries kept in the database across a restart, failed exports and
``orthonode retry``, and real sends of a study's results (a SEG per plane and an SR) to Orthanc over
DIMSE and STOW-RS."""
from __future__ import annotations

import shutil
from io import BytesIO
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.config import RetrySection, Route, parse_config
from dicom_node.db import EventRecord, Export, ExportState, Study, make_engine, make_session_factory, session_scope, utcnow
from dicom_node.orthanc import DICOMWEB_PLUGIN
from dicom_node.services.export import (ExportError, Exporter, backoff_delay, outcome_unknown, queue_exports,
                                        retry_failed, route_destinations, verify_held)
from dicom_node.services.jobs import enqueue_if_changed
from tests.support.node import NodeParts, add_instance, free_port, make_node_config, wait_for

STUDY_ROUTES = [
    Route(match={"calling_ae_title": "CT_.*"}, destinations=("ct-archive",)),
    Route(match={"joint": "shoulder|ankle", "calling_ae_title": "ORTHANC"}, destinations=("research", "pacs")),
    Route(match={}, destinations=("pacs",)),
]


def test_routes_first_match_wins_and_patterns_match_whole_values() -> None:
    assert route_destinations(STUDY_ROUTES, "CT_1", "knee") == ("ct-archive",)
    assert route_destinations(STUDY_ROUTES, "orthanc", "Ankle") == ("research", "pacs")  # case-insensitive
    assert route_destinations(STUDY_ROUTES, "ORTHANC", "knee") == ("pacs",)
    assert route_destinations(STUDY_ROUTES, "XCT_1", None) == ("pacs",)  # "CT_.*" must match the whole title
    assert route_destinations(STUDY_ROUTES[:2], "ORTHANC", None) == ()  # an unknown joint fits no joint rule
    assert route_destinations((), "ORTHANC", "knee") == ()


def test_backoff_doubles_up_to_the_limit() -> None:
    retry = RetrySection(max_attempts=8, initial_delay_seconds=30, max_delay_seconds=900)
    assert [backoff_delay(n, retry) for n in range(1, 8)] == [30, 60, 120, 240, 480, 900, 900]
    with pytest.raises(ValueError, match="attempts"):
        backoff_delay(0, retry)


@pytest.fixture(scope="module")
def result_objects(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, knee_phantoms: Path) -> list[Path]:
    """The SEGs (one per plane) and the SR the pipeline writes for phantom knee_0002 (real objects to send)."""
    from inference.checkpoint import ModelBundle
    from inference.pipeline import run_study

    out = tmp_path_factory.mktemp("export_objects")
    result = run_study(knee_phantoms / "knee_0002" / "dicom", ModelBundle.load(tiny_checkpoint), out, device="cpu")
    assert len(result.files) == 4, result.summary()
    assert [dcmread(p, stop_before_pixels=True).Modality for p in result.files] == ["SEG", "SEG", "SEG", "SR"]
    return result.files


def _setup(tmp_path: Path, checkpoint: Path, objects: list[Path], destinations: dict, **options) -> tuple:
    """A node database with one finished-job's exports (SEGs + SR to every destination)."""
    config = parse_config(make_node_config(tmp_path, checkpoint, destinations=destinations,
                                           routes=[{"match": {}, "destinations": list(destinations)}], **options),
                          base_dir=tmp_path)
    parts = NodeParts(config)
    study_uid = str(dcmread(objects[0], stop_before_pixels=True).StudyInstanceUID)
    add_instance(parts.factory, study_uid, study_uid + ".1", study_uid + ".1.1")
    results = config.data_dir / "results" / study_uid
    results.mkdir(parents=True)
    rows = []
    for path in objects:
        target = results / path.name
        shutil.copy(path, target)
        ds = dcmread(target, stop_before_pixels=True)
        rows.append((str(target.relative_to(config.data_dir)), str(ds.Modality).lower(), str(ds.SOPInstanceUID)))
    with session_scope(parts.factory) as session:
        study = session.scalars(select(Study)).one()
        job = enqueue_if_changed(session, study, "test")
        queue_exports(session, job, rows, list(destinations))
    return parts, study_uid, {sop for _, _, sop in rows}


def _exports(factory) -> list[Export]:
    with session_scope(factory) as session:
        return list(session.scalars(select(Export).order_by(Export.id)))


def test_failed_sends_back_off_in_the_database_across_a_restart_then_fail_and_are_retried(
    tmp_path: Path, tiny_checkpoint: Path, result_objects: list[Path], orthanc
) -> None:
    down = {"pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": free_port()}}
    retry = {"max_attempts": 3, "initial_delay_seconds": 1.5, "max_delay_seconds": 2}
    parts, study_uid, sops = _setup(tmp_path, tiny_checkpoint, result_objects, down, retry=retry)
    n = len(result_objects)
    exporter = Exporter(parts.config, parts.factory)
    before = utcnow()
    assert exporter.run_once()
    rows = _exports(parts.factory)
    assert [(r.state, r.attempts) for r in rows] == [(ExportState.PENDING, 1)] * n
    for row in rows:
        assert "ORTHANC@127.0.0.1" in row.last_error
        assert before + timedelta(seconds=1.5) <= row.next_attempt_at <= utcnow() + timedelta(seconds=1.5)
    assert not exporter.run_once(), "an export was sent again before its backoff ran out"

    # the node restarts: a new engine, a new exporter; the schedule comes from the database
    parts.engine.dispose()
    factory = make_session_factory(make_engine(parts.config.database_url))
    restarted = Exporter(parts.config, factory)
    assert restarted.recover() == 0
    assert [r.next_attempt_at for r in _exports(factory)] == [r.next_attempt_at for r in rows]
    wait_for(restarted.run_once, 5, "the second attempt once the backoff ran out")
    second = _exports(factory)
    assert [r.attempts for r in second] == [2] * n
    assert all(1.9 <= (r.next_attempt_at - r.updated_at).total_seconds() <= 2.1 for r in second), "backoff not capped"
    wait_for(restarted.run_once, 5, "the last attempt")
    failed = _exports(factory)
    assert [(r.state, r.attempts) for r in failed] == [(ExportState.FAILED, 3)] * n
    assert all(r.next_attempt_at is None and r.last_error for r in failed), "a failed export must stay visible"

    # `orthonode retry`, with the destination back up
    assert sorted(retry_failed(factory)) == [r.id for r in failed]
    assert [(r.state, r.attempts) for r in _exports(factory)] == [(ExportState.PENDING, 0)] * n
    up = parse_config(make_node_config(tmp_path, tiny_checkpoint, retry=retry, destinations={
        "pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}}),
        base_dir=tmp_path)
    sender = Exporter(up, factory, poll_seconds=0.2)
    sender.start()
    try:
        wait_for(lambda: all(r.state is ExportState.DONE for r in _exports(factory)), 30, "the exports to be sent")
    finally:
        sender.stop()
    stored = {i["sop_instance_uid"] for i in orthanc.instances_of_study(study_uid)}
    assert stored == sops
    assert orthanc.modality_counts(study_uid) == {"SEG": 3, "SR": 1}
    # this Orthanc does not know the node's AE, so it refuses the C-FIND that guards a resend after an
    # unknown outcome: the answer is "could not tell", and the exporter falls back to resending
    files = [up.data_dir / r.object_path for r in _exports(factory)]
    answers = verify_held(up.export.destinations["pacs"], files, "ORTHONODE")
    assert [p.held for p in answers] == [None] * n, answers


def test_orthanc_answers_the_c_find_of_a_node_it_knows(
    tmp_path: Path, tiny_checkpoint: Path, result_objects: list[Path]
) -> None:
    from dicom_node.services.export import send_dimse
    from dicom_node.orthanc import OrthancServer, orthanc_available

    if not orthanc_available():
        pytest.skip("Orthanc is not installed (/usr/sbin/Orthanc)")
    # as `orthonode demo` configures it: the node is one of Orthanc's DICOM modalities
    with OrthancServer(tmp_path / "orthanc", dicom_port=free_port(), node=("ORTHONODE", "127.0.0.1", free_port()),
                       dicomweb=False) as server:
        config = parse_config(make_node_config(tmp_path, tiny_checkpoint, destinations={
            "pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": server.dicom_port}}),
            base_dir=tmp_path)
        pacs = config.export.destinations["pacs"]
        others = [False] * (len(result_objects) - 1)
        assert [p.held for p in verify_held(pacs, result_objects, "ORTHONODE")] == [False, *others]
        assert [o.ok for o in send_dimse(pacs, result_objects[:1], "ORTHONODE")] == [True]
        answers = verify_held(pacs, result_objects, "ORTHONODE")
        assert [p.held for p in answers] == [True, *others], answers


def test_an_interrupted_send_is_sent_again_and_missing_files_are_reported(
    tmp_path: Path, tiny_checkpoint: Path, result_objects: list[Path], orthanc
) -> None:
    pacs = {"pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}}
    parts, study_uid, sops = _setup(tmp_path, tiny_checkpoint, result_objects, pacs)
    rows = _exports(parts.factory)
    with session_scope(parts.factory) as session:  # the node died in the middle of sending a SEG
        seg = session.get(Export, rows[0].id)
        seg.state, seg.attempts = ExportState.SENDING, 1
    (parts.config.data_dir / rows[-1].object_path).unlink()  # and the SR file was lost
    exporter = Exporter(parts.config, parts.factory)
    assert exporter.recover() == 1
    assert exporter.run_once()
    seg_row, *other_segs, sr_row = _exports(parts.factory)
    assert (seg_row.state, seg_row.attempts) == (ExportState.DONE, 2)
    assert [(r.state, r.attempts) for r in other_segs] == [(ExportState.DONE, 1)] * 2
    assert sr_row.state is ExportState.PENDING and "missing" in sr_row.last_error
    assert orthanc.modality_counts(study_uid).get("SEG") == 3
    with pytest.raises(ExportError, match="only failed exports"):
        retry_failed(parts.factory, [sr_row.id])


@pytest.mark.skipif(not DICOMWEB_PLUGIN.exists(), reason="Orthanc's DICOMweb plug-in is not installed")
def test_stow_rs_to_orthanc(tmp_path: Path, tiny_checkpoint: Path, result_objects: list[Path], orthanc) -> None:
    orthanc.wipe()
    web = {"web": {"type": "stowrs", "url": orthanc.dicomweb_url}}
    parts, study_uid, sops = _setup(tmp_path, tiny_checkpoint, result_objects, web)
    n = len(result_objects)
    assert Exporter(parts.config, parts.factory).run_once()
    assert [r.state for r in _exports(parts.factory)] == [ExportState.DONE] * n
    assert {i["sop_instance_uid"] for i in orthanc.instances_of_study(study_uid)} == sops
    # Orthanc files them under the source study
    for instance in orthanc.instances_of_study(study_uid):
        ds = dcmread(BytesIO(orthanc.instance_file(instance["id"])))
        assert ds.StudyInstanceUID == study_uid and ds.Modality in ("SEG", "SR")
    # QIDO-RS tells whether a resend is needed after an unknown outcome
    files = [parts.config.data_dir / r.object_path for r in _exports(parts.factory)]
    destination = parts.config.export.destinations["web"]
    assert [p.held for p in verify_held(destination, files, "ORTHONODE")] == [True] * n
    orthanc.wipe()
    assert [p.held for p in verify_held(destination, files, "ORTHONODE")] == [False] * n
    unreachable = destination.model_copy(update={"qido_url": f"http://127.0.0.1:{free_port()}/dicom-web"})
    answers = verify_held(unreachable, files, "ORTHONODE")
    assert [p.held for p in answers] == [None] * n and "QIDO-RS" in answers[0].detail


# --------------------------------------------------------------------------- exactly once


class FlakyPacs:
    """A pynetdicom PACS whose C-STORE answers can be lost: the first ``lose`` requests are
    stored (or not, ``store_then_abort=False``) and the association is aborted instead of
    answering, as when a response is lost under load.  ``find`` adds a Study Root C-FIND SCP
    over what it holds; ``refuse`` answers every C-STORE with that failure status instead."""

    def __init__(self, *, lose: int = 0, store_then_abort: bool = True, find: bool = True,
                 refuse: int | None = None) -> None:
        self.lose = lose
        self.store_then_abort = store_then_abort
        self.find = find
        self.refuse = refuse
        self.deliveries: list[str] = []  # SOP Instance UIDs stored, one entry per storage
        self.store_requests = 0
        self.queries: list[str] = []  # SOP Instance UIDs asked for by C-FIND
        self.port = free_port()
        self._server = None

    def _store(self, event) -> int:
        self.store_requests += 1
        if self.refuse is not None:
            return self.refuse
        if self.lose > 0:
            self.lose -= 1
            if self.store_then_abort:
                self.deliveries.append(str(event.dataset.SOPInstanceUID))
            event.assoc.abort()
            return 0x0000  # never reaches the node: the association is gone
        self.deliveries.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    def _find(self, event):
        identifier = event.identifier
        sop = str(identifier.SOPInstanceUID)
        self.queries.append(sop)
        if identifier.QueryRetrieveLevel != "IMAGE":
            yield 0xA900, None
            return
        if sop in self.deliveries:
            match = type(identifier)()
            match.QueryRetrieveLevel = "IMAGE"
            match.StudyInstanceUID, match.SeriesInstanceUID = identifier.StudyInstanceUID, identifier.SeriesInstanceUID
            match.SOPInstanceUID = sop
            yield 0xFF00, match

    def __enter__(self) -> "FlakyPacs":
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        ae = AE(ae_title="FLAKY")
        ae.supported_contexts = AllStoragePresentationContexts
        handlers = [(evt.EVT_C_STORE, self._store)]
        if self.find:
            ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
            handlers.append((evt.EVT_C_FIND, self._find))
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()

    def destination(self, **options) -> dict:
        return {"pacs": {"type": "dimse", "ae_title": "FLAKY", "host": "127.0.0.1", "port": self.port, **options}}


QUICK_RETRY = {"max_attempts": 4, "initial_delay_seconds": 0.1, "max_delay_seconds": 0.2}


def _send_until_settled(exporter: Exporter, factory, attempts: int = 3) -> list[Export]:
    """Run the exporter until no export is pending (each retry is due after a short backoff)."""
    for _ in range(attempts):
        if all(r.state is not ExportState.PENDING for r in _exports(factory)):
            break
        wait_for(exporter.run_once, 5, "a due export")
    return _exports(factory)


def test_a_lost_c_store_answer_is_verified_and_not_resent(
    tmp_path: Path, tiny_checkpoint: Path, result_objects: list[Path]
) -> None:
    with FlakyPacs(lose=1) as pacs:
        parts, study_uid, sops = _setup(tmp_path, tiny_checkpoint, result_objects, pacs.destination(),
                                        retry=QUICK_RETRY)
        n = len(result_objects)
        exporter = Exporter(parts.config, parts.factory)
        assert exporter.run_once()
        first = _exports(parts.factory)
        # the first object was stored but its answer never came; the association went with it
        assert [(r.state, r.attempts) for r in first] == [(ExportState.PENDING, 1)] * n
        assert outcome_unknown(first[0].last_error) and "no C-STORE response" in first[0].last_error
        assert not any(outcome_unknown(r.last_error) for r in first[1:]), "the other objects never went out"
        assert pacs.deliveries == [first[0].sop_instance_uid]

        done = _send_until_settled(exporter, parts.factory)
        assert [(r.state, r.attempts, r.last_error) for r in done] == [(ExportState.DONE, 2, None)] * n
        assert sorted(pacs.deliveries) == sorted(sops), "an object was delivered twice or not at all"
        assert pacs.queries == [first[0].sop_instance_uid], "only the object of unknown outcome is looked up"
        assert pacs.store_requests == n
    with parts.factory() as session:
        messages = [e.message for e in session.scalars(select(EventRecord).where(EventRecord.kind == "export_done"))]
    assert any("already held by pacs from an earlier attempt, not resent" in m for m in messages), messages


def test_a_lost_request_is_looked_up_then_sent_once(
    tmp_path: Path, tiny_checkpoint: Path, result_objects: list[Path]
) -> None:
    with FlakyPacs(lose=1, store_then_abort=False) as pacs:
        parts, study_uid, sops = _setup(tmp_path, tiny_checkpoint, result_objects, pacs.destination(),
                                        retry=QUICK_RETRY)
        exporter = Exporter(parts.config, parts.factory)
        done = _send_until_settled(exporter, parts.factory)
        assert [r.state for r in done] == [ExportState.DONE] * len(result_objects)
        assert sorted(pacs.deliveries) == sorted(sops)
        assert pacs.queries == [done[0].sop_instance_uid]  # asked, not held, sent again


@pytest.mark.parametrize("verify", [True, False], ids=["query-fails", "verification-off"])
def test_without_an_answer_to_the_query_the_object_is_resent_and_the_log_says_so(
    tmp_path: Path, tiny_checkpoint: Path, result_objects: list[Path], caplog: pytest.LogCaptureFixture,
    verify: bool
) -> None:
    with FlakyPacs(lose=1, find=False) as pacs:
        parts, study_uid, sops = _setup(tmp_path, tiny_checkpoint, result_objects,
                                        pacs.destination(verify_before_resend=verify), retry=QUICK_RETRY)
        exporter = Exporter(parts.config, parts.factory)
        with caplog.at_level("WARNING", logger="dicom_node.services.export"):
            done = _send_until_settled(exporter, parts.factory)
        assert [r.state for r in done] == [ExportState.DONE] * len(result_objects)
        # the documented fallback: delivered, possibly twice, and said so
        assert pacs.deliveries.count(done[0].sop_instance_uid) == 2
        expected = "may now hold it twice" if verify else "may be delivered twice"
        assert expected in caplog.text
        if verify:
            assert "does the peer accept Study Root C-FIND?" in caplog.text


def test_a_refusal_is_retried_without_a_query(tmp_path: Path, tiny_checkpoint: Path, result_objects: list[Path]) -> None:
    with FlakyPacs(refuse=0xA700) as pacs:
        parts, study_uid, sops = _setup(tmp_path, tiny_checkpoint, result_objects, pacs.destination(),
                                        retry={"max_attempts": 2, "initial_delay_seconds": 0.1, "max_delay_seconds": 0.1})
        exporter = Exporter(parts.config, parts.factory)
        failed = _send_until_settled(exporter, parts.factory)
        assert [(r.state, r.attempts) for r in failed] == [(ExportState.FAILED, 2)] * len(result_objects)
        assert all("0xA700" in r.last_error and not outcome_unknown(r.last_error) for r in failed)
        assert pacs.queries == [] and pacs.store_requests == 2 * len(result_objects)


def test_an_export_interrupted_by_a_restart_is_not_resent_when_the_pacs_holds_it(
    tmp_path: Path, tiny_checkpoint: Path, result_objects: list[Path]
) -> None:
    with FlakyPacs() as pacs:
        parts, study_uid, sops = _setup(tmp_path, tiny_checkpoint, result_objects, pacs.destination(),
                                        retry={"max_attempts": 1, "initial_delay_seconds": 1, "max_delay_seconds": 1})
        rows = _exports(parts.factory)
        pacs.deliveries.append(rows[0].sop_instance_uid)  # the node sent the SEG, then died before recording it
        with session_scope(parts.factory) as session:
            for row in session.scalars(select(Export)):
                row.state, row.attempts = ExportState.SENDING, 1
        n = len(result_objects)
        exporter = Exporter(parts.config, parts.factory)
        assert exporter.recover() == n
        assert all(outcome_unknown(r.last_error) for r in _exports(parts.factory))
        assert exporter.run_once()
        assert [r.state for r in _exports(parts.factory)] == [ExportState.DONE] * n
        assert sorted(pacs.deliveries) == sorted(sops) and pacs.store_requests == n - 1
        assert sorted(pacs.queries) == sorted(sops)


def test_a_failed_export_of_unknown_outcome_keeps_its_check_after_orthonode_retry(
    tmp_path: Path, tiny_checkpoint: Path, result_objects: list[Path]
) -> None:
    with FlakyPacs(lose=1) as pacs:
        parts, study_uid, sops = _setup(tmp_path, tiny_checkpoint, result_objects, pacs.destination(),
                                        retry={"max_attempts": 1, "initial_delay_seconds": 1, "max_delay_seconds": 1})
        exporter = Exporter(parts.config, parts.factory)
        assert exporter.run_once()
        seg, *others = _exports(parts.factory)
        assert seg.state is ExportState.FAILED and outcome_unknown(seg.last_error)
        assert retry_failed(parts.factory) == [seg.id, *(r.id for r in others)]
        requeued = _exports(parts.factory)
        assert outcome_unknown(requeued[0].last_error) and all(r.last_error is None for r in requeued[1:])
        done = _send_until_settled(exporter, parts.factory)
        assert [r.state for r in done] == [ExportState.DONE] * len(result_objects)
        assert sorted(pacs.deliveries) == sorted(sops)
        assert pacs.queries == [seg.sop_instance_uid]


def test_which_http_failures_leave_a_stow_rs_outcome_unknown() -> None:
    import requests
    from urllib3.exceptions import MaxRetryError, NewConnectionError

    from dicom_node.services.export import _request_never_arrived

    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(f"{status}", response=response)

    refused = requests.ConnectionError(MaxRetryError(None, "/studies", NewConnectionError(None, "refused")))
    assert _request_never_arrived(refused)
    assert _request_never_arrived(requests.ConnectTimeout("connect timed out"))
    assert _request_never_arrived(http_error(400)) and _request_never_arrived(http_error(409))
    # the request may have been stored: verify before resending
    assert not _request_never_arrived(requests.ReadTimeout("read timed out"))
    assert not _request_never_arrived(requests.ConnectionError("Connection reset by peer"))
    assert not _request_never_arrived(http_error(502))
    assert not _request_never_arrived(OSError("broken pipe"))
