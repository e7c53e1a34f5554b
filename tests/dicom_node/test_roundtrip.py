"""Round trips with a real PACS: phantom study -> Orthanc -> (Lua OnStableStudy) -> node ->
SEG + SR back in Orthanc under the same study; and dcmtk's storescu sending straight to the
node.  Results never loop back: the node does not accept the SEG/SR SOP classes."""
from __future__ import annotations

import time
import urllib.request
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage, MRImageStorage, SegmentationStorage
from sqlalchemy import func, select

from dicom_node.config import parse_config
from dicom_node.db import Instance, Job, JobState, Series, Study, session_scope
from dicom_node.demo import findings_from_sr
from dicom_node.node import Node
from dicom_node.orthanc import OrthancServer, orthanc_available
from inference.labels import label_keys
from tests.support.node import free_port, make_node_config, run_storescu, wait_for

pytestmark = pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed")


@pytest.fixture(scope="module")
def pacs_and_node(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    """Orthanc forwarding stable MR studies to a running node, which sends its results back."""
    tmp = tmp_path_factory.mktemp("roundtrip")
    node_port = free_port()
    orthanc = OrthancServer(tmp / "orthanc", dicom_port=free_port(), node=("ORTHONODE", "127.0.0.1", node_port),
                            stable_age_seconds=2)
    orthanc.start()
    data = make_node_config(tmp, tiny_checkpoint, port=node_port, quiet=2.0, destinations={
        "pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}})
    node = Node(parse_config(data, base_dir=tmp), poll_seconds=0.2)
    try:
        node.start()
        yield orthanc, node
    finally:
        node.stop()
        orthanc.stop()


def _study_uid(folder: Path) -> str:
    return str(dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _jobs(node: Node, study_uid: str) -> list[tuple[int, JobState]]:
    with session_scope(node.factory) as session:
        return [(j.id, j.state) for j in session.scalars(
            select(Job).join(Study).where(Study.study_instance_uid == study_uid).order_by(Job.id))]


def _results_in(orthanc: OrthancServer, study_uid: str) -> bool:
    """Every result of a phantom study is in: a SEG per plane and the SR."""
    counts = orthanc.modality_counts(study_uid)
    return counts.get("SEG", 0) >= 3 and counts.get("SR", 0) >= 1


def test_study_sent_to_orthanc_comes_back_with_seg_and_sr(pacs_and_node, knee_phantoms: Path) -> None:
    orthanc, node = pacs_and_node
    folder = knee_phantoms / "knee_0001" / "dicom"
    files = sorted(folder.rglob("*.dcm"))
    study_uid = _study_uid(folder)
    run_storescu(orthanc.dicom_port, folder, called_ae="ORTHANC")
    wait_for(lambda: _results_in(orthanc, study_uid), 120, "SEG and SR of the study in Orthanc")

    # every instance Orthanc forwarded is in the node, and the node's results are what Orthanc holds
    with session_scope(node.factory) as session:
        stored = session.scalar(select(func.count(Instance.id)).join(Series).join(Study)
                                .where(Study.study_instance_uid == study_uid))
        job = session.scalars(select(Job).join(Study).where(Study.study_instance_uid == study_uid)).one()
        exported = {e.sop_instance_uid: e.object_path for e in job.exports}
        assert job.state is JobState.DONE and job.study.calling_ae_title == "ORTHANC"
    assert stored == len(files)
    objects = {i["sop_instance_uid"]: i for i in orthanc.instances_of_study(study_uid) if i["modality"] in ("SEG", "SR")}
    assert set(objects) == set(exported)

    segmented_series = []
    for uid, item in objects.items():
        ds = dcmread(BytesIO(orthanc.instance_file(item["id"])))
        assert ds.StudyInstanceUID == study_uid
        if ds.Modality == "SEG":
            seg = hd.seg.Segmentation.from_dataset(ds)
            (referenced,) = seg.ReferencedSeriesSequence
            source_series = {str(dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files}
            assert referenced.SeriesInstanceUID in source_series
            assert seg.number_of_segments >= 1
            segmented_series.append(referenced.SeriesInstanceUID)
        else:
            sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
            assert sr.StudyInstanceUID == study_uid and len(sr.ContentSequence) > 0
            # what `orthonode demo` prints next to the phantom truth: one finding per knee label
            findings = findings_from_sr(orthanc.instance_file(item["id"]))
            assert [f["key"] for f in findings] == list(label_keys("knee"))
            assert all(0.0 <= f["probability"] <= 1.0 and isinstance(f["present"], bool) for f in findings)

    assert len(set(segmented_series)) == 3  # one SEG on each plane's series

    # the results made the study unstable in Orthanc again; nothing must come of it
    time.sleep(2 + 2 + 2)  # StableAge + the node's quiet period + margin
    assert orthanc.modality_counts(study_uid) == {"MR": len(files), "SEG": 3, "SR": 1}
    assert len(_jobs(node, study_uid)) == 1


def test_storescu_straight_to_the_node(pacs_and_node, knee_phantoms: Path) -> None:
    orthanc, node = pacs_and_node
    folder = knee_phantoms / "knee_0002" / "dicom"
    study_uid = _study_uid(folder)
    run_storescu(node.config.listener.port, folder)
    wait_for(lambda: _results_in(orthanc, study_uid), 120, "SEG and SR in Orthanc")
    counts = orthanc.modality_counts(study_uid)
    assert counts == {"SEG": 3, "SR": 1}  # Orthanc never saw the MR images: the node sent only its results
    with urllib.request.urlopen(node.http_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'orthonode_job_duration_seconds_count{outcome="complete",state="done"}' in text
    assert 'orthonode_export_attempts_total{destination="pacs",kind="seg",result="ok"}' in text


def test_results_sent_to_the_node_are_not_accepted(pacs_and_node, knee_phantoms: Path) -> None:
    orthanc, node = pacs_and_node
    # an object of the SOP class the node writes (the content does not matter: the class is
    # refused at negotiation, before any data set is sent)
    seg = dcmread(next((knee_phantoms / "knee_0001" / "dicom").rglob("*.dcm")))
    seg.SOPClassUID = seg.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    seg.Modality = "SEG"
    ae = AE(ae_title="STORESCU")
    for sop_class in (SegmentationStorage, Comprehensive3DSRStorage, MRImageStorage):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", node.config.listener.port, ae_title="ORTHONODE")
    assert assoc.is_established
    try:
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        assert accepted == {str(MRImageStorage)}
        with pytest.raises(ValueError):
            assoc.send_c_store(seg)
    finally:
        assoc.release()
    with session_scope(node.factory) as session:
        classes = set(session.scalars(select(Instance.sop_class_uid).distinct()))
    assert str(SegmentationStorage) not in classes and str(Comprehensive3DSRStorage) not in classes
