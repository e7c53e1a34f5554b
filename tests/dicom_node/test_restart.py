"""Killing the node (SIGKILL: no clean-up runs) in the middle of a study, of a job and of an
export, then starting it again: every acknowledged instance is kept, and every study reaches
the receiving PACS exactly once (counted in Orthanc).

The node runs as ``orthonode serve`` in a subprocess, as in production; the test reads its
SQLite database directly to pick the moment to kill it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from dicom_node.config import parse_config
from dicom_node.db import (
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    make_engine,
    make_session_factory,
    session_scope,
)
from dicom_node.layout import INSTANCES_DIR
from dicom_node.orthanc import OrthancServer, orthanc_available
from tests.support.node import free_port, make_node_config, run_storescu, wait_for, write_node_yaml

pytestmark = pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed")


class Observer:
    """Read-only look into a node's database from the test."""

    def __init__(self, config_path: Path) -> None:
        from dicom_node.config import load_config

        self.config = load_config(config_path)
        self.engine = make_engine(self.config.database_url)
        self.factory = make_session_factory(self.engine)

    def instances(self, study_uid: str) -> list[tuple[str, str]]:
        with session_scope(self.factory) as session:
            return list(session.execute(
                select(Instance.sop_instance_uid, Instance.path).join(Series).join(Study)
                .where(Study.study_instance_uid == study_uid)
            ).all())

    def jobs(self) -> list[tuple[int, JobState, str | None, int]]:
        with session_scope(self.factory) as session:
            return [(j.id, j.state, j.step, j.attempts) for j in session.scalars(select(Job).order_by(Job.id))]

    def exports(self) -> list[tuple[ExportState, int, str | None]]:
        with session_scope(self.factory) as session:
            return [(e.state, e.attempts, e.last_error) for e in session.scalars(select(Export).order_by(Export.id))]

    def close(self) -> None:
        self.engine.dispose()


def _config(tmp_path: Path, checkpoint: Path, pacs_port: int, **options) -> tuple[Path, int]:
    """node.yaml for the subprocess, and its HTTP port."""
    data = make_node_config(tmp_path, checkpoint, destinations={
        "pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}}, **options)
    config = parse_config(data, base_dir=tmp_path)  # fail here, not in the subprocess, on a bad test config
    return write_node_yaml(tmp_path, data), config.http.port


def test_kill_mid_study_and_mid_job(tmp_path: Path, tiny_checkpoint: Path, knee_phantoms: Path, orthanc,
                                    serve_process) -> None:
    folder = knee_phantoms / "knee_0003" / "dicom"
    files = sorted(folder.rglob("*.dcm"))
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    config, http_port = _config(tmp_path, tiny_checkpoint, orthanc.dicom_port, quiet=3.0)
    observer = Observer(config)
    first, second = files[: len(files) // 2], files[len(files) // 2:]
    try:
        node = serve_process(config)
        node.wait_healthy(http_port)
        run_storescu(observer.config.listener.port, first)
        node.kill()  # within the quiet period: the study is half there, no job yet
        acknowledged = observer.instances(study_uid)
        assert len(acknowledged) == len(first), "an instance acknowledged with success was lost"
        for _, relative in acknowledged:
            assert (observer.config.data_dir / INSTANCES_DIR / relative).is_file()
        assert observer.jobs() == []

        node = serve_process(config)
        node.wait_healthy(http_port)
        run_storescu(observer.config.listener.port, second)
        wait_for(lambda: any(state is JobState.RUNNING for _, state, _, _ in observer.jobs()), 60,
                 "the job to start")
        node.kill()  # in the middle of the job
        (killed,) = [job_id for job_id, state, _, _ in observer.jobs() if state is JobState.RUNNING]

        node = serve_process(config)
        node.wait_healthy(http_port)
        wait_for(lambda: orthanc.modality_counts(study_uid).get("SR", 0) >= 1
                 and orthanc.modality_counts(study_uid).get("SEG", 0) >= 3, 120, "the SEGs and the SR in Orthanc")
        wait_for(lambda: all(state is ExportState.DONE for state, _, _ in observer.exports()), 30, "exports done")
        node.terminate()
    finally:
        observer.close()
    assert len(observer.instances(study_uid)) == len(files)
    # The killed job was resumed, not lost and not finished twice.  (Whether the resumed run
    # already covers the second half depends on whether the restarted worker claims it before
    # the assembler re-checks the study; if not, a newer job supersedes it.  Either way exactly
    # one job finishes.)
    jobs = observer.jobs()
    done = [(job_id, attempts) for job_id, state, _, attempts in jobs if state is JobState.DONE]
    assert len(done) == 1, jobs
    assert all(state in (JobState.DONE, JobState.SUPERSEDED) for _, state, _, _ in jobs), jobs
    final = {job_id: (state, attempts) for job_id, state, _, attempts in jobs}
    assert final[killed][0] in (JobState.DONE, JobState.SUPERSEDED), f"killed job {killed}: {jobs}"
    assert orthanc.modality_counts(study_uid) == {"SEG": 3, "SR": 1}  # a SEG per plane
    assert len(observer.exports()) == 4


def test_kill_mid_export_with_retries_kept_across_the_restart(tmp_path: Path, tiny_checkpoint: Path,
                                                              knee_phantoms: Path, serve_process) -> None:
    pacs = OrthancServer(tmp_path / "orthanc", dicom_port=free_port(), stable_age_seconds=2)  # not started: down
    folder = knee_phantoms / "knee_0002" / "dicom"
    study_uid = str(dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    config, http_port = _config(tmp_path, tiny_checkpoint, pacs.dicom_port, quiet=1.0,
                                retry={"max_attempts": 20, "initial_delay_seconds": 1, "max_delay_seconds": 2})
    observer = Observer(config)
    try:
        node = serve_process(config)
        node.wait_healthy(http_port)
        run_storescu(observer.config.listener.port, folder)
        wait_for(lambda: (rows := observer.exports()) and all(attempts >= 2 for _, attempts, _ in rows), 120,
                 "two failed attempts of every export")
        node.kill()
        before = observer.exports()
        assert all(state in (ExportState.PENDING, ExportState.SENDING) for state, _, _ in before)
        assert all("ORTHANC@127.0.0.1" in (error or "") for state, _, error in before if state is ExportState.PENDING)

        with pacs:
            node = serve_process(config)
            node.wait_healthy(http_port)
            wait_for(lambda: all(state is ExportState.DONE for state, _, _ in observer.exports()), 60,
                     "the exports to reach the PACS after the restart")
            after = observer.exports()
            # the attempt count went on from where it was: the schedule survived the restart
            assert all(a_after > a_before for (_, a_after, _), (_, a_before, _) in zip(after, before))
            assert pacs.modality_counts(study_uid) == {"SEG": 3, "SR": 1}
            node.terminate()
        with session_scope(observer.factory) as session:
            assert session.scalar(select(func.count(Job.id))) == 1
    finally:
        observer.close()
    # `orthonode serve` keeps what it wrote (database, instances, results) from other users
    data_dir = observer.config.data_dir
    opened = [str(p.relative_to(data_dir)) for p in [data_dir, *data_dir.rglob("*")]
              if not p.is_symlink() and p.stat().st_mode & 0o007]
    assert opened == [], opened
