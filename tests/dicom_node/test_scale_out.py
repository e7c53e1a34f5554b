"""The node as separate processes on one PostgreSQL and one shared data folder: one listener,
two workers and one exporter, each a real ``orthonode serve --role ...`` with one torch thread,
Orthanc as the PACS.

A worker is killed with SIGKILL inside a job: the other worker finishes that job, and every
study's SEGs and SR reach Orthanc exactly once (counted in Orthanc).  Then the listener is
killed (SIGKILL) in the middle of a send and started again: every instance acknowledged before
the kill is in the database with its file, the sender (dcmtk's ``storescu``) tries again until
it succeeds, and the study is processed and delivered once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from dicom_node.config import parse_config
from dicom_node.db import Instance, Job, JobState, Series, Study, make_engine, make_session_factory, session_scope
from dicom_node.layout import INSTANCES_DIR
from dicom_node.orthanc import orthanc_available
from tests.support.node import MATRIX, free_port, make_node_config, wait_for, write_node_yaml
from tests.support.shared import built_once

pytestmark = pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed")

STUDIES = 8


def _generate(folder: Path) -> Path:
    from training.phantoms.generate import generate_dataset

    generate_dataset(folder / "knee", "knee", STUDIES + 1, seed=77, matrix=MATRIX)
    return folder / "knee"


@pytest.fixture(scope="module")
def nine_knees(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_once(tmp_path_factory, "nine-knees", _generate)


def _study_uid(folder: Path) -> str:
    return str(dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _configs(tmp_path: Path, checkpoint: Path, pacs_port: int,
             database_url: str) -> tuple[dict[str, tuple[Path, int]], int, Path]:
    """One node.yaml (and HTTP port) per process ("host"), all on one database and one data
    folder; the listener's DICOM port; the data folder."""
    shared = tmp_path / "shared"
    listener_port = free_port()
    out = {}
    for name in ("listener", "worker-a", "worker-b", "exporter"):
        data = make_node_config(shared, checkpoint, port=listener_port, quiet=2.0, destinations={
            "pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}})
        data["database"] = {"url": database_url}
        data["jobs"].update({"torch_threads": 1, "lease_seconds": 15, "preload_model": True})
        folder = tmp_path / name
        folder.mkdir()
        config = parse_config(data, base_dir=folder)
        out[name] = (write_node_yaml(folder, data), config.http.port)
    return out, listener_port, config.data_dir


class Database:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.factory = make_session_factory(self.engine)

    def jobs(self) -> list[tuple[int, str, JobState, str | None, str | None]]:
        with session_scope(self.factory) as session:
            return [(j.id, j.study.study_instance_uid, j.state, j.step, j.worker_id)
                    for j in session.scalars(select(Job).order_by(Job.id))]

    def instances(self, study_uid: str) -> list[str]:
        with session_scope(self.factory) as session:
            return list(session.scalars(select(Instance.path).join(Series).join(Study)
                                        .where(Study.study_instance_uid == study_uid)))

    def count_instances(self, study_uid: str) -> int:
        with session_scope(self.factory) as session:
            return session.scalar(select(func.count()).select_from(Instance).join(Series).join(Study)
                                  .where(Study.study_instance_uid == study_uid)) or 0


def _get_text(http_port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10) as response:
        return response.read().decode()


def _get_json(http_port: int, path: str) -> dict:
    return json.loads(_get_text(http_port, path))


def _storescu(port: int, folders: list[Path], *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["storescu", *options, "-aet", "STORESCU", "-aec", "ORTHONODE", "-nh", "+sd", "+r",
                             "127.0.0.1", str(port), *map(str, folders)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_listener_two_workers_and_exporter_on_postgres(tmp_path: Path, tiny_checkpoint: Path, nine_knees: Path,
                                                       orthanc, postgres_url: str, serve_process) -> None:
    cases = sorted(p / "dicom" for p in nine_knees.iterdir() if (p / "dicom").is_dir())
    assert len(cases) == STUDIES + 1
    first, last = cases[:STUDIES], cases[STUDIES]
    configs, port, data_dir = _configs(tmp_path, tiny_checkpoint, orthanc.dicom_port, postgres_url)
    listener_config, listener_http = configs["listener"]
    db = Database(postgres_url)
    try:
        exporter = serve_process(configs["exporter"][0], "--role", "exporter")
        exporter.wait_healthy(configs["exporter"][1])
        workers = {name: serve_process(configs[name][0], "--role", "worker", "--device", "cpu")
                   for name in ("worker-a", "worker-b")}
        for name, proc in workers.items():
            proc.wait_healthy(configs[name][1])
        listener = serve_process(listener_config, "--role", "listener")
        listener.wait_healthy(listener_http)
        # each process says what it is and checks only its own parts
        for name, role, parts in (("exporter", "exporter", {"database", "exporter", "disk"}),
                                  ("worker-a", "worker", {"database", "worker", "disk"}),
                                  ("listener", "listener", {"listener", "database", "assembler", "disk"})):
            health = _get_json(configs[name][1], "/healthz")
            assert health["roles"] == [role] and set(health["checks"]) == parts, health
            assert f'role="{role}"' in _get_text(configs[name][1], "/metrics")

        sender = _storescu(port, first)
        assert sender.wait(180) == 0, sender.stdout.read() if sender.stdout else ""

        # kill -9 a worker while it is inside a job
        running = wait_for(lambda: [j for j in db.jobs() if j[2] is JobState.RUNNING and j[3] == "inference"],
                           120, "a worker inside a job")
        job_id, _, _, _, worker_id = running[0]
        pid = int(worker_id.split(":")[1])
        victim = next(name for name, proc in workers.items() if proc.proc is not None and proc.proc.pid == pid)
        held = _get_json(configs[victim][1], "/healthz")["holds"]
        assert job_id in held["jobs"] or not [j for j in db.jobs() if j[0] == job_id and j[2] is JobState.RUNNING], held
        os.kill(pid, signal.SIGKILL)
        workers[victim].proc.wait(10)
        survivor = next(name for name in workers if name != victim)
        survivor_pid = workers[survivor].proc.pid

        study_uids = [_study_uid(folder) for folder in first]

        def delivered() -> bool:
            return all(orthanc.modality_counts(uid) == {"SEG": 3, "SR": 1} for uid in study_uids)

        wait_for(delivered, 300, "every study's SEGs and SR in Orthanc")
        jobs = {j[0]: j for j in db.jobs()}
        assert jobs[job_id][2] is JobState.DONE, jobs[job_id]
        assert jobs[job_id][4].split(":")[1] == str(survivor_pid), f"job {job_id} was not finished by the other worker"
        done = [j for j in jobs.values() if j[2] is JobState.DONE]
        assert sorted(j[1] for j in done) == sorted(study_uids), "one finished job per study"

        # kill -9 the listener in the middle of a send and start it again; the sender tries again
        new_uid = _study_uid(last)
        files = sorted(last.rglob("*.dcm"))
        sender = _storescu(port, [last], "-v")
        wait_for(lambda: db.count_instances(new_uid) >= 5, 60, "the send to be under way")
        listener.kill()
        output = sender.stdout.read() if sender.stdout else ""
        assert sender.wait(60) != 0, "the send was not cut by the listener's death"
        acknowledged = output.count("Received Store Response (Success)")
        kept = db.instances(new_uid)
        assert 0 < acknowledged < len(files), output[-2000:]
        assert len(kept) >= acknowledged, f"{acknowledged} instances acknowledged, {len(kept)} kept"
        assert all((data_dir / INSTANCES_DIR / relative).is_file() for relative in kept)
        listener = serve_process(listener_config, "--role", "listener")
        listener.wait_healthy(listener_http)
        for _ in range(5):
            sender = _storescu(port, [last])
            if sender.wait(120) == 0:
                break
        assert sender.returncode == 0, sender.stdout.read() if sender.stdout else ""
        stored = db.instances(new_uid)
        assert len(stored) == len(files), "an instance was lost"
        assert all((data_dir / INSTANCES_DIR / relative).is_file() for relative in stored)
        wait_for(lambda: orthanc.modality_counts(new_uid) == {"SEG": 3, "SR": 1}, 180, "the last study's results")
        assert delivered(), "a study was delivered twice"

        status = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--config",
                                 str(listener_config), "--json"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        live = {p["roles"] for p in report["processes"] if p["alive"]}
        assert live == {"listener", "worker", "exporter"}, report["processes"]
        assert report["leases"] == [], "a job is still held after every study was delivered"
    finally:
        db.engine.dispose()

