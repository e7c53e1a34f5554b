"""Operating the node: /healthz and /metrics of a running node, and the ``status``, ``retry``
and ``echo`` commands."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from dicom_node.cli import main
from dicom_node.config import parse_config
from dicom_node.db import Export, ExportState, JobState, Study, session_scope
from dicom_node.health import check_disk
from dicom_node.node import Node
from dicom_node.services.export import queue_exports
from dicom_node.services.jobs import enqueue_if_changed
from tests.support.node import free_port, make_node_config, run_storescu, write_node_yaml


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, sample: str) -> float | None:
    """The value of one sample line, e.g. ``orthonode_up`` or ``orthonode_jobs{state="done"}``."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture()
def running_node(tmp_path: Path, tiny_checkpoint: Path):
    """A node with long quiet periods (nothing gets processed while the test looks at it)."""
    data = make_node_config(tmp_path, tiny_checkpoint, quiet=60, forced=600, extra_callers=("ORTHONODE",),
                            retry={"max_attempts": 10, "initial_delay_seconds": 5, "max_delay_seconds": 60})
    data["export"]["destinations"]["self"] = {"type": "dimse", "ae_title": "ORTHONODE", "host": "127.0.0.1",
                                              "port": data["listener"]["port"]}
    path = write_node_yaml(tmp_path, data)
    node = Node(parse_config(data, base_dir=tmp_path), poll_seconds=0.2)
    node.start()
    node.config_path = path
    yield node
    node.stop()


def test_healthz_and_metrics_of_a_running_node(running_node: Node, knee_phantoms: Path) -> None:
    node = running_node
    status, body = _get(node.http_url + "/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert set(health["checks"]) == {"listener", "database", "worker", "exporter", "assembler", "disk"}
    assert all(check["ok"] for check in health["checks"].values())

    files = sorted((knee_phantoms / "knee_0003" / "dicom").rglob("*.dcm"))[:5]
    run_storescu(node.config.listener.port, files)
    # the same SOP instance again with other content: refused (duplicate_policy reject_if_different)
    changed = dcmread(files[0])
    changed.SeriesDescription = "changed"
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(MRImageStorage, str(changed.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", node.config.listener.port, ae_title="ORTHONODE")
    assert assoc.is_established
    refused = assoc.send_c_store(changed)
    assoc.release()
    assert refused.Status != 0x0000
    # rejected at negotiation: an unknown called AE title, then an unknown calling AE title
    assert ae.associate("127.0.0.1", node.config.listener.port, ae_title="NOT_THE_NODE").is_rejected
    assert AE(ae_title="STRANGER").associate("127.0.0.1", node.config.listener.port, ae_title="ORTHONODE",
                                              contexts=assoc.requestor.requested_contexts).is_rejected

    status, text = _get(node.http_url + "/metrics")
    assert status == 200
    assert _metric(text, "orthonode_instances_received_total") == 5
    assert _metric(text, "orthonode_instances_stored") == 5
    assert _metric(text, 'orthonode_rejections_total{reason="duplicate_refused"}') == 1
    assert _metric(text, 'orthonode_rejections_total{reason="association_rejected_called_ae_title"}') == 1
    assert _metric(text, 'orthonode_rejections_total{reason="association_rejected_calling_ae_title"}') == 1
    assert _metric(text, 'orthonode_rejections_total{reason="association_rejected_host"}') is None
    assert _metric(text, 'orthonode_studies{state="receiving"}') == 1
    assert _metric(text, 'orthonode_queue_depth{queue="jobs"}') == 0
    assert _metric(text, 'orthonode_queue_depth{queue="exports"}') == 0
    assert _metric(text, "orthonode_up") == 1
    assert "# TYPE orthonode_job_duration_seconds histogram" in text
    assert "# TYPE orthonode_export_duration_seconds histogram" in text
    assert node.assembler.pending() == [str(changed.StudyInstanceUID)]

    # a queued export shows in the queue depth at once (read from the database at each scrape)
    with session_scope(node.factory) as session:
        study = session.query(Study).one()
        job = enqueue_if_changed(session, study, "test")
        queue_exports(session, job, [("results/x/sr.dcm", "sr", "1.2.3.4")], ["self"])
        job.state = JobState.DONE  # not for the worker: only the export row matters here
    status, text = _get(node.http_url + "/metrics")
    # its file does not exist, so it stays pending (with a retry time) whatever the sender did meanwhile
    assert _metric(text, 'orthonode_queue_depth{queue="exports"}') == 1
    assert _metric(text, 'orthonode_jobs{state="done"}') == 1
    assert _get(node.http_url + "/nothing")[0] == 404


def test_healthz_fails_and_says_why(running_node: Node) -> None:
    node = running_node
    node.listener.stop()
    status, body = _get(node.http_url + "/healthz")
    health = json.loads(body)
    assert status == 503 and health["status"] == "fail"
    assert not health["checks"]["listener"]["ok"] and "not running" in health["checks"]["listener"]["detail"]
    assert health["checks"]["database"]["ok"] and health["checks"]["worker"]["ok"]
    node.listener.start()
    assert _get(node.http_url + "/healthz")[0] == 200
    node.exporter.stop()
    health = json.loads(_get(node.http_url + "/healthz")[1])
    assert not health["checks"]["exporter"]["ok"] and health["checks"]["listener"]["ok"]


def test_disk_check_against_the_reserve(tmp_path: Path) -> None:
    assert check_disk(tmp_path, 1).ok
    low = check_disk(tmp_path, 10**9)  # more than any disk here
    assert not low.ok and "below storage.min_free_mb 1000000000" in low.detail
    assert not check_disk(tmp_path / "missing", 1).ok


def test_status_retry_and_echo_commands(running_node: Node, knee_phantoms: Path, capsys) -> None:
    node = running_node
    config = str(node.config_path)
    assert main(["echo", "--config", config, "self"]) == 0
    assert "C-ECHO ok" in capsys.readouterr().out
    assert main(["echo", "--config", config, "nowhere"]) == 2
    assert "'nowhere' is not in export.destinations" in capsys.readouterr().err

    run_storescu(node.config.listener.port, sorted((knee_phantoms / "knee_0003" / "dicom").rglob("*.dcm"))[:2])
    with session_scope(node.factory) as session:
        study = session.query(Study).one()
        job = enqueue_if_changed(session, study, "test")
        job.state = JobState.FAILED
        job.error = "RuntimeError: out of memory"
        (export,) = queue_exports(session, job, [("results/x/sr.dcm", "sr", "1.2.3.4")], ["self"])
        export.state, export.attempts, export.last_error = ExportState.FAILED, 5, "ORTHANC@127.0.0.1:4242: association rejected"
        export.next_attempt_at = None
        session.flush()
        export_id, job_id = export.id, job.id
    assert main(["status", "--config", config]) == 0
    out = capsys.readouterr().out
    assert study.study_instance_uid in out and "FAILURES:" in out
    assert "out of memory" in out and f"export {export_id}" in out and "association rejected" in out
    assert main(["status", "--config", config, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["studies"][0]["instances"] == 2 and status["failed_exports"][0]["id"] == export_id

    assert main(["retry", "--config", config, "--destination", "elsewhere"]) == 2
    assert main(["retry", "--config", config, str(export_id + 1)]) == 1
    assert f"no export with id {export_id + 1}" in capsys.readouterr().err
    assert main(["retry", "--config", config]) == 0
    assert f"queued again: 1 export(s) ({export_id})" in capsys.readouterr().out
    assert main(["retry", "--config", config, "--jobs", "--destination", "self"]) == 2
    assert main(["retry", "--config", config, "--jobs", str(job_id + 1)]) == 1
    assert f"no job with id {job_id + 1}" in capsys.readouterr().err
    with session_scope(node.factory) as session:
        row = session.get(Export, export_id)
        # back in the queue with its attempts reset (the running exporter may have tried it once since)
        assert row.state in (ExportState.PENDING, ExportState.SENDING) and row.attempts <= 1


def test_answers_healthy_is_true_only_for_a_200() -> None:
    from dicom_node.health import Check, HealthServer, answers_healthy

    state = {"ok": True}
    port = free_port()
    server = HealthServer("127.0.0.1", port, {"probe": lambda: Check(state["ok"], "probe")}, lambda: b"")
    assert not answers_healthy(port)  # nothing listens yet
    server.start()
    try:
        assert answers_healthy(port)
        state["ok"] = False  # /healthz answers 503
        assert not answers_healthy(port)
    finally:
        server.stop()
