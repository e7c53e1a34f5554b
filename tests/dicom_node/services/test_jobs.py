"""Jobs: the database queue (claim, heartbeat, leases, re-queue after a crash, attempts limit)
and the worker running the real pipeline on a stored phantom study (results, routes, exports
queued once, superseded jobs, output UIDs)."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.db import ExportState, Job, JobState, Study, StudyState, session_scope, utcnow
from dicom_node.services.jobs import (
    MAX_JOB_ATTEMPTS,
    JobQueue,
    Worker,
    enqueue_if_changed,
    retry_failed_jobs,
    worker_identity,
)
from tests.support.node import NodeParts, add_instance, make_node_config, make_parts, wait_for

STUDY = "1.2.3.300"


def _queue_study(factory, uid: str = STUDY) -> int:
    with session_scope(factory) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        job = enqueue_if_changed(session, study, "test")
        assert job is not None
        return job.id


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- the queue


def test_claim_heartbeat_and_losing_the_job_to_a_newer_one(node_db) -> None:
    for i in (2, 0, 1):
        add_instance(node_db, STUDY, "1.2.3.300.1", f"1.2.3.300.1.{i}")
    job_id = _queue_study(node_db)
    a, b = JobQueue(node_db, "host-a:1:0"), JobQueue(node_db, "host-b:1:0")
    claimed = a.claim()
    assert claimed is not None and claimed.job_id == job_id and claimed.attempt == 1
    assert list(claimed.instance_paths) == sorted(claimed.instance_paths) and len(claimed.instance_paths) == 3
    assert b.claim() is None, "a running job was claimed a second time"
    assert a.heartbeat(job_id, step="inference")
    assert not b.heartbeat(job_id), "another worker refreshed a job it does not own"
    with session_scope(node_db) as session:
        job = session.get(Job, job_id)
        assert job.state is JobState.RUNNING and job.step == "inference" and job.worker_id == "host-a:1:0"
        assert job.study.state is StudyState.PROCESSING
    add_instance(node_db, STUDY, "1.2.3.300.1", "1.2.3.300.1.9")  # a late instance: the study changed
    newer = _queue_study(node_db)
    assert not a.heartbeat(job_id), "a superseded job still accepted heartbeats"
    with session_scope(node_db) as session:
        assert a.owned(session, job_id) is None
        assert session.get(Job, job_id).state is JobState.SUPERSEDED
    assert b.claim().job_id == newer


def test_jobs_of_dead_workers_go_back_to_the_queue(node_db) -> None:
    add_instance(node_db, STUDY, "1.2.3.300.1", "1.2.3.300.1.1")
    job_id = _queue_study(node_db)
    dead_worker = f"{worker_identity().split(':')[0]}:{_dead_pid()}:0"
    dead = JobQueue(node_db, dead_worker)
    assert dead.claim() is not None  # ... and died while loading the model
    assert dead.heartbeat(job_id, step="load model")
    survivor = JobQueue(node_db, worker_identity(), lease_seconds=60)
    # a worker process of this host whose pid is gone loses its job at the next sweep, although
    # its heartbeat is fresh (several worker processes may share a host)
    assert survivor.requeue_abandoned() == [job_id], "the dead local worker's job was not recovered"
    with session_scope(node_db) as session:
        job = session.get(Job, job_id)
        assert job.state is JobState.QUEUED and job.study.state is StudyState.COMPLETE
        assert job.attempts == 0, "a death before the study was processed counted against the study"

    # a live worker process of this host (our parent) with a fresh heartbeat keeps its job
    alive = JobQueue(node_db, f"{worker_identity().split(':')[0]}:{os.getppid()}:0")
    assert alive.claim().job_id == job_id
    assert alive.heartbeat(job_id, step="inference")
    assert survivor.requeue_abandoned() == [], "a job of a live local worker with a fresh heartbeat was taken away"
    with session_scope(node_db) as session:
        job = session.get(Job, job_id)
        job.state, job.attempts = JobState.QUEUED, 0

    # a worker on another host, dying inside the study's processing: only its stale lease frees the job
    other = JobQueue(node_db, "elsewhere:42:0")
    assert other.claim().job_id == job_id
    assert other.heartbeat(job_id, step="inference")
    assert survivor.requeue_abandoned(at_startup=True) == []
    with session_scope(node_db) as session:
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=120)
    assert survivor.requeue_abandoned() == [job_id]

    # a study whose processing keeps killing the node is given up after MAX_JOB_ATTEMPTS
    for attempt in range(2, MAX_JOB_ATTEMPTS):
        assert dead.claim().attempt == attempt
        dead.heartbeat(job_id, step="inference")
        assert survivor.requeue_abandoned(at_startup=True) == [job_id], f"attempt {attempt}"
    assert dead.claim().attempt == MAX_JOB_ATTEMPTS
    dead.heartbeat(job_id, step="inference")
    assert survivor.requeue_abandoned(at_startup=True) == [job_id]
    with session_scope(node_db) as session:
        job = session.get(Job, job_id)
        assert job.state is JobState.FAILED and job.attempts == MAX_JOB_ATTEMPTS
        assert "interrupted" in job.error and job.study.state is StudyState.FAILED

    # the operator queues it again (`orthonode retry --jobs`)
    with pytest.raises(LookupError, match="no job with id 99"):
        retry_failed_jobs(node_db, [99])
    assert retry_failed_jobs(node_db) == [job_id]
    with pytest.raises(ValueError, match="only failed jobs"):
        retry_failed_jobs(node_db, [job_id])
    with session_scope(node_db) as session:
        job = session.get(Job, job_id)
        assert (job.state, job.attempts, job.error) == (JobState.QUEUED, 0, None)
        assert job.study.state is StudyState.COMPLETE


# --------------------------------------------------------------------------- the worker


def _copy_with_new_uids(source: Path, target: Path, series_uid: str, **changes: object) -> Path:
    ds = dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    for key, value in changes.items():
        setattr(ds, key, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def _extra_slice(series_dir: Path, target: Path) -> Path:
    """One more slice of the same series, one slice spacing beyond its last slice."""
    datasets = [dcmread(p, stop_before_pixels=True) for p in sorted(series_dir.glob("*.dcm"))]
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    order = sorted(range(len(datasets)), key=lambda i: float(np.dot(normal, np.array(datasets[i].ImagePositionPatient, float))))
    last, before = (np.array(datasets[order[k]].ImagePositionPatient, float) for k in (-1, -2))
    position = last + (last - before)
    source = sorted(series_dir.glob("*.dcm"))[order[-1]]
    return _copy_with_new_uids(source, target, str(datasets[0].SeriesInstanceUID),
                               ImagePositionPatient=[f"{v:.4f}" for v in position],
                               InstanceNumber=len(datasets) + 1)


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint: Path):
    """The test model, loaded once for the module's workers."""
    from inference.checkpoint import ModelBundle

    return ModelBundle.load(tiny_checkpoint)


def _outputs(parts: NodeParts, job_id: int) -> dict[str, set[str]]:
    """SOP Instance UIDs of a job's results per kind (``seg``: one per plane, ``sr``: one)."""
    with session_scope(parts.factory) as session:
        out: dict[str, set[str]] = {}
        for export in session.get(Job, job_id).exports:
            out.setdefault(export.object_kind, set()).add(export.sop_instance_uid)
        return out


@pytest.fixture()
def stored_knee(tmp_path: Path, tiny_checkpoint: Path, knee_phantoms: Path):
    """A node's database and storage holding phantom knee_0001 as received from STORESCU."""
    parts = make_parts(
        tmp_path, tiny_checkpoint,
        destinations={"pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 104},
                      "research": {"type": "stowrs", "url": "http://127.0.0.1:9/dicom-web"},
                      "other-site": {"type": "dimse", "ae_title": "OTHER", "host": "127.0.0.1", "port": 105}},
        routes=[{"match": {"calling_ae_title": "MODALITY.*"}, "destinations": ["other-site"]},
                {"match": {"joint": "knee"}, "destinations": ["pacs", "research"]},
                {"match": {}, "destinations": ["pacs"]}],
    )
    study_dir = knee_phantoms / "knee_0001" / "dicom"
    parts.receive(sorted(study_dir.rglob("*.dcm")))
    parts.study_dir = study_dir
    parts.study_uid = str(dcmread(next(study_dir.rglob("*.dcm"))).StudyInstanceUID)
    yield parts
    parts.close()


def test_worker_runs_the_study_and_queues_each_result_once_per_routed_destination(stored_knee: NodeParts, bundle) -> None:
    parts = stored_knee
    job_id = _queue_study(parts.factory, parts.study_uid)
    worker = Worker(parts.config, parts.factory, parts.storage.resolve, bundle=bundle)
    claimed = worker.queue.claim()
    outcome = worker.run_job(claimed)
    assert (outcome.state, outcome.outcome) == ("done", "complete")
    with session_scope(parts.factory) as session:
        job = session.get(Job, job_id)
        assert job.state is JobState.DONE and job.step == "done" and job.study.state is StudyState.DONE
        summary = job.result_summary
        exports = [(e.destination, e.object_kind, e.state, e.object_path) for e in job.exports]
    assert summary["outcome"] == "complete" and summary["joint"] == "knee"
    assert set(summary["chosen"]) == {"sagittal", "coronal", "axial"} and summary["findings"]
    # the knee route (second rule) matched a study sent by STORESCU: a SEG per plane + SR to pacs and research
    assert sorted((d, k) for d, k, _, _ in exports) == [
        *[("pacs", "seg")] * 3, ("pacs", "sr"), *[("research", "seg")] * 3, ("research", "sr")
    ]
    assert len({relative for _, _, _, relative in exports}) == 4
    assert all(state is ExportState.PENDING for _, _, state, _ in exports)
    for _, kind, _, relative in exports:
        ds = dcmread(parts.config.data_dir / relative)
        assert ds.StudyInstanceUID == parts.study_uid and ds.Modality == kind.upper()

    # a study sent by a modality follows the first route instead
    with session_scope(parts.factory) as session:
        session.scalars(select(Study)).one().calling_ae_title = "MODALITY7"
    axial = next(d for d in parts.study_dir.iterdir() if d.name.endswith("axial"))
    add_files = [_copy_with_new_uids(next(axial.glob("*.dcm")), parts.config.data_dir.parent / "loc.dcm",
                                     generate_uid(), SeriesDescription="Localizer", SeriesNumber=99)]
    parts.receive(add_files, calling_ae_title="MODALITY7")
    second = _queue_study(parts.factory, parts.study_uid)
    worker.run_job(worker.queue.claim())
    with session_scope(parts.factory) as session:
        new_exports = {(e.destination, e.object_kind) for e in session.get(Job, second).exports}
        old = session.get(Job, job_id)
        assert old.state is JobState.SUPERSEDED, "the earlier results were not replaced"
        assert all(e.state is ExportState.FAILED and "withdrawn" in e.last_error for e in old.exports), \
            "unsent exports of the replaced job could still reach a PACS"
    assert new_exports == {("other-site", "seg"), ("other-site", "sr")}
    # the added localizer changes no input of the SEG or the SR: same objects, same UIDs
    assert _outputs(parts, second) == _outputs(parts, job_id)
    assert {kind: len(sops) for kind, sops in _outputs(parts, job_id).items()} == {"seg": 3, "sr": 1}


def test_the_worker_reads_the_recorded_instances_and_nothing_else_in_their_folder(
    stored_knee: NodeParts, bundle, knee_phantoms: Path
) -> None:
    """The job's input is the rows of the claim, not a folder scan: a file of another study
    lying in the study's instance folder (put there by hand, never received) changes nothing."""
    parts = stored_knee
    stray_source = next((knee_phantoms / "knee_0002" / "dicom").rglob("*.dcm"))
    series_folder = next(p for p in (parts.config.data_dir / "instances" / parts.study_uid).iterdir() if p.is_dir())
    shutil.copy(stray_source, series_folder / "stray.dcm")
    assert str(dcmread(series_folder / "stray.dcm").StudyInstanceUID) != parts.study_uid
    _queue_study(parts.factory, parts.study_uid)
    worker = Worker(parts.config, parts.factory, parts.storage.resolve, bundle=bundle)
    outcome = worker.run_job(worker.queue.claim())
    assert (outcome.state, outcome.outcome) == ("done", "complete"), outcome
    assert not (parts.config.data_dir / "work").exists() or not any((parts.config.data_dir / "work").iterdir())


def test_a_job_taken_over_after_a_crash_is_finished_once(stored_knee: NodeParts, bundle) -> None:
    parts = stored_knee
    job_id = _queue_study(parts.factory, parts.study_uid)
    dead = Worker(parts.config, parts.factory, parts.storage.resolve, bundle=bundle)
    dead.worker_id = dead.queue.worker_id = f"{worker_identity().split(':')[0]}:{_dead_pid()}:0"
    stale_claim = dead.queue.claim()  # ... and the process died here
    # the restarted node's worker thread: recovers the job at start-up and runs it
    finished = []
    survivor = Worker(parts.config, parts.factory, parts.storage.resolve, bundle=bundle, poll_seconds=0.2,
                      on_finished=finished.append)
    survivor.start()
    try:
        assert survivor.alive
        wait_for(lambda: finished, 120, "the restarted worker to finish the recovered job")
    finally:
        survivor.stop()
    assert not survivor.alive
    assert (finished[0].job_id, finished[0].state) == (job_id, "done")
    # the first worker comes back to life and finishes its copy: it must not count
    late = dead.run_job(stale_claim)
    assert late.state == "discarded"
    with session_scope(parts.factory) as session:
        job = session.get(Job, job_id)
        # the first worker died before processing the study: that start does not count
        assert job.state is JobState.DONE and job.worker_id == survivor.worker_id and job.attempts == 1
        assert len(job.exports) == 8  # 3 SEGs + SR to pacs and research, once


def test_changed_inputs_give_new_output_uids(stored_knee: NodeParts, bundle, tmp_path: Path) -> None:
    parts = stored_knee
    worker = Worker(parts.config, parts.factory, parts.storage.resolve, bundle=bundle)
    first = _queue_study(parts.factory, parts.study_uid)
    worker.run_job(worker.queue.claim())
    sagittal = next(d for d in (parts.study_dir).iterdir() if d.name.endswith("sagittal"))
    parts.receive([_extra_slice(sagittal, tmp_path / "extra.dcm")])
    second = _queue_study(parts.factory, parts.study_uid)
    worker.run_job(worker.queue.claim())
    before, after = _outputs(parts, first), _outputs(parts, second)
    # a new sagittal slice changes every SEG (the coronal and axial ones are mapped from the sagittal)
    assert len(before["seg"]) == len(after["seg"]) == 3 and not before["seg"] & after["seg"]
    assert before["sr"] != after["sr"]
    # the first report was never delivered (its exports were withdrawn): nothing to replace
    assert "PredecessorDocumentsSequence" not in _report(parts, second)


def _report(parts: NodeParts, job_id: int):
    with session_scope(parts.factory) as session:
        (relative,) = {e.object_path for e in session.get(Job, job_id).exports if e.object_kind == "sr"}
    return dcmread(parts.config.data_dir / relative)


@pytest.mark.dicomtools
def test_a_new_report_names_the_delivered_one_it_replaces(stored_knee: NodeParts, bundle, tmp_path: Path) -> None:
    """Once a report reached the PACS, the next version of it (new inputs) lists it in the
    Predecessor Documents Sequence, so viewers show which report is current."""
    import highdicom as hd

    from tests.inference.output_factory import dciodvfy_errors

    parts = stored_knee
    worker = Worker(parts.config, parts.factory, parts.storage.resolve, bundle=bundle)
    first = _queue_study(parts.factory, parts.study_uid)
    worker.run_job(worker.queue.claim())
    with session_scope(parts.factory) as session:  # the exporter delivered the first results to one PACS
        for export in session.get(Job, first).exports:
            if export.destination == "pacs":
                export.state = ExportState.DONE
    sagittal = next(d for d in parts.study_dir.iterdir() if d.name.endswith("sagittal"))
    parts.receive([_extra_slice(sagittal, tmp_path / "extra.dcm")])
    second = _queue_study(parts.factory, parts.study_uid)
    worker.run_job(worker.queue.claim())
    (old_sr,), (new_sr,) = _outputs(parts, first)["sr"], _outputs(parts, second)["sr"]
    report = _report(parts, second)
    (item,) = report.PredecessorDocumentsSequence
    assert item.StudyInstanceUID == parts.study_uid
    assert [i.ReferencedSOPInstanceUID for s in item.ReferencedSeriesSequence for i in s.ReferencedSOPSequence] == [old_sr]
    assert report.SOPInstanceUID == new_sr != old_sr
    assert isinstance(hd.sr.srread(report.filename), hd.sr.Comprehensive3DSR)
    assert dciodvfy_errors(report.filename) == []
    with session_scope(parts.factory) as session:
        log = session.get(Job, second).result_summary["log"]
    assert f"report: replaces the earlier report {old_sr}" in log


def test_a_failing_study_fails_its_job_with_the_reason(node_db, tmp_path: Path, tiny_checkpoint: Path) -> None:
    from dicom_node.config import parse_config

    # rows whose files are not on disk: the database and the disk disagree, the job must say so
    add_instance(node_db, STUDY, "1.2.3.300.1", "1.2.3.300.1.1")
    job_id = _queue_study(node_db)
    config = parse_config(make_node_config(tmp_path, tiny_checkpoint), base_dir=tmp_path)
    worker = Worker(config, node_db, lambda relative: tmp_path / "instances" / relative, bundle=object())
    outcome = worker.run_job(worker.queue.claim())
    assert outcome.state == "failed"
    with session_scope(node_db) as session:
        job = session.get(Job, job_id)
        assert job.state is JobState.FAILED and job.step == "instances"
        assert "missing" in job.error and "1.2.3.300.1.1.dcm" in job.error
        assert job.study.state is StudyState.FAILED and not job.exports


def test_shared_model_preloads_in_the_background_and_a_missing_file_fails_the_job_not_the_node(
        tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from dicom_node.services.jobs import SharedModel

    threads = torch.get_num_threads()
    try:
        model = SharedModel(tiny_checkpoint, torch_threads=1)
        assert not model.loaded
        model.preload().join(timeout=120)
        assert model.loaded and torch.get_num_threads() == 1
        assert model.get() is model.get()  # loaded once, shared
    finally:
        torch.set_num_threads(threads)

    # with a busy listener the load waits until it has been quiet for quiet_seconds
    busy = [True]
    waiting = SharedModel(tiny_checkpoint)
    thread = waiting.preload(busy=lambda: busy[0], quiet_seconds=0.5, poll_seconds=0.05)
    time.sleep(1.0)
    assert thread.is_alive() and not waiting.loaded, "the model was loaded while the listener was busy"
    busy[0] = False
    thread.join(timeout=120)
    assert waiting.loaded
    stop = threading.Event()
    never = SharedModel(tiny_checkpoint)
    thread = never.preload(busy=lambda: True, poll_seconds=0.05, stop=stop)
    stop.set()  # the node stops before the listener was ever quiet
    thread.join(timeout=5)
    assert not thread.is_alive() and not never.loaded

    missing = SharedModel(tmp_path / "absent.pt")
    with caplog.at_level("ERROR", logger="dicom_node.services.jobs"):
        missing.preload().join(timeout=30)
    assert "could not be loaded at start-up" in caplog.text and "absent.pt" in caplog.text
    assert not missing.loaded
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        missing.get()  # the first job gets the same, specific error


def test_lease_and_attempts_come_from_node_yaml_and_a_lease_shorter_than_three_heartbeats_is_refused(
        node_db, tmp_path: Path) -> None:
    from dicom_node.config import load_config
    from dicom_node.services.jobs import HEARTBEAT_SECONDS

    with pytest.raises(ValueError, match="at least 3 heartbeats"):
        JobQueue(node_db, "host-a:1:0", lease_seconds=2 * HEARTBEAT_SECONDS)
    path = tmp_path / "node.yaml"
    path.write_text("jobs:\n  lease_seconds: 10\n")
    with pytest.raises(Exception, match="lease_seconds"):
        load_config(path)
    path.write_text("jobs:\n  lease_seconds: 120\n  max_attempts: 1\n")
    jobs = load_config(path).jobs
    queue = JobQueue(node_db, "host-a:1:0", jobs.lease_seconds, jobs.max_attempts)
    assert (queue.lease_seconds, queue.max_attempts) == (120.0, 1)
