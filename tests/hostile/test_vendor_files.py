"""Real scanners' files through the listener and the pipeline.

The files come from pydicom's test data set (the ``pydicom-data`` package): an Enhanced MR
multi-frame object (de-identified, 10 frames of 64 x 64, its functional groups stripped) in
five encodings plus a copy cut short inside its JPEG 2000 pixel data, a Siemens Avanto MR
slice with overlays, and Philips MR slices of 1024 x 1024 uncompressed and in JPEG 2000
(lossless and lossy).  What they test beyond the synthetic corpus: real vendor headers, a real
Enhanced MR object, and the same instance arriving again in another encoding, as a PACS
re-sending it compressed or not does.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from dicom_node import db
from dicom_node.ingest import StoreStatus
from inference.checkpoint import ModelBundle
from inference.pipeline import Outcome, run_study
from inference.series import SeriesError, load_series, scan_folder_report
from tests.hostile.corpus import body_of, echo, send_files
from tests.support.hostile import RunningListener, hostile_config, start_listener

ENHANCED = "emri_small.dcm"
#: the same Enhanced MR instance in other encodings, all lossless
ENHANCED_OTHER_ENCODINGS = (
    "emri_small_RLE.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "emri_small_big_endian.dcm",
)
ENHANCED_CUT_SHORT = "emri_small_jpeg_2k_lossless_too_short.dcm"
SIEMENS = "MR-SIEMENS-DICOM-WithOverlays.dcm"
#: Philips: reversible JPEG 2000 and its uncompressed twin; irreversible JPEG 2000 and its twin
PHILIPS = ("MR2_J2KR.dcm", "MR2_UNCR.dcm", "MR2_J2KI.dcm", "MR2_UNCI.dcm")


def vendor_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is missing: the tests need the pydicom-data package (setup.cfg, extra 'dev')"
    return Path(path)


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[RunningListener]:
    node = start_listener(hostile_config(tmp_path))
    try:
        yield node
    finally:
        node.stop()


def _events(node: RunningListener, kind: str) -> list[str]:
    with db.session_scope(node.factory) as s:
        return list(
            s.execute(select(db.EventRecord.sop_instance_uid).where(db.EventRecord.kind == kind)).scalars()
        )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_vendor_files_are_stored_byte_for_byte_and_a_cut_short_one_is_refused(
    node: RunningListener, caplog: Any
) -> None:
    names = [ENHANCED, SIEMENS, *PHILIPS[::2]]
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        result = send_files(node.port, [vendor_file(n) for n in [*names, ENHANCED_CUT_SHORT]])
    assert result.statuses == [StoreStatus.SUCCESS] * len(names) + [StoreStatus.UNPARSABLE_DATASET]
    assert "holds no data element that could be read (it is empty, or cut short inside its encapsulated" in caplog.text
    for name in names:
        sent = vendor_file(name).read_bytes()
        sop = str(pydicom.dcmread(vendor_file(name), stop_before_pixels=True).SOPInstanceUID)
        row = node.row(sop)
        assert row is not None, f"{name}: no row"
        stored = node.storage.resolve(row.path).read_bytes()
        # the data set byte for byte (the file meta is the node's own, naming the sender)
        assert body_of(stored) == body_of(sent), f"{name}: the stored data set differs from the one sent"
        assert hashlib.sha256(stored).hexdigest() == row.sha256
    assert node.temporaries() == [] and echo(node.port)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_same_instance_in_another_lossless_encoding_is_accepted_and_the_first_copy_kept(
    node: RunningListener, caplog: Any
) -> None:
    """A PACS may send an instance compressed once and uncompressed later.  Under the default
    duplicate policy (reject_if_different) the node compares header and decoded pixels: the same
    instance in another encoding succeeds and leaves the first copy; changed content is refused."""
    first = vendor_file(ENHANCED)
    sop = str(pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    assert send_files(node.port, [first]).statuses == [StoreStatus.SUCCESS]
    with caplog.at_level(logging.INFO, logger="dicom_node.ingest"):
        result = send_files(node.port, [vendor_file(n) for n in ENHANCED_OTHER_ENCODINGS])
    assert result.statuses == [StoreStatus.SUCCESS] * len(ENHANCED_OTHER_ENCODINGS)
    assert caplog.text.count("already stored in another encoding with the same header and pixels") == 4
    row = node.row(sop)
    stored = node.storage.resolve(row.path) if row is not None else None
    assert stored is not None and body_of(stored.read_bytes()) == body_of(first.read_bytes())
    assert _events(node, "duplicate_other_encoding") == [sop] * 4

    # the same UID with one pixel changed, and with another patient name: refused, first copy kept
    ds = pydicom.dcmread(first)
    pixels = ds.pixel_array.copy()
    pixels[3, 10, 10] += 1
    ds.PixelData = pixels.tobytes()
    changed_pixels = node.storage.root.parent / "changed_pixels.dcm"
    ds.save_as(changed_pixels)
    ds = pydicom.dcmread(vendor_file("emri_small_RLE.dcm"))
    ds.PatientName = "Other^Patient"
    changed_header = node.storage.root.parent / "changed_header.dcm"
    ds.save_as(changed_header)
    result = send_files(node.port, [changed_pixels, changed_header])
    assert result.statuses == [StoreStatus.DUPLICATE_SOP_INSTANCE] * 2
    assert body_of(stored.read_bytes()) == body_of(first.read_bytes())
    assert _events(node, "duplicate_refused") == [sop] * 2


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_philips_lossless_and_lossy_copies(node: RunningListener) -> None:
    """Philips' slices: the reversible JPEG 2000 and its uncompressed twin are two instances (own
    UIDs); the irreversible JPEG 2000 has its own UID too, as lossy compression must; its
    uncompressed twin shares that UID and holds exactly the decoded lossy pixels, so it is the
    same instance in another encoding and succeeds without replacing the first copy."""
    j2kr, uncr, j2ki, unci = (pydicom.dcmread(vendor_file(n)) for n in PHILIPS)
    assert j2kr.SOPInstanceUID != uncr.SOPInstanceUID and j2kr.SOPInstanceUID != j2ki.SOPInstanceUID
    assert j2ki.SOPInstanceUID == unci.SOPInstanceUID
    assert send_files(node.port, [vendor_file(n) for n in PHILIPS]).statuses == [StoreStatus.SUCCESS] * 4
    assert _events(node, "duplicate_other_encoding") == [str(j2ki.SOPInstanceUID)]
    row = node.row(str(j2ki.SOPInstanceUID))
    assert row is not None and row.transfer_syntax_uid == str(j2ki.file_meta.TransferSyntaxUID)
    assert echo(node.port)


def test_the_real_enhanced_mr_without_geometry_is_read_and_reported_unsupported(
    tiny_checkpoint: Path, tmp_path: Path  # noqa: F811
) -> None:
    """The real Enhanced MR object lost its functional groups in de-identification, so its frames
    have no orientation or position: the scan reads it as one 10-frame multi-frame series, the
    load names the reason, and the pipeline reports the study unsupported without an exception."""
    study = tmp_path / "study"
    study.mkdir()
    shutil.copyfile(vendor_file(ENHANCED), study / "enhanced.dcm")
    shutil.copyfile(vendor_file(SIEMENS), study / "siemens.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = scan_folder_report(study)
        assert report.skipped == []
        by_frames = {info.num_frames: info for info in report.series}
        assert by_frames[10].is_multiframe and by_frames[10].sop_class_uid.endswith(".4.1")  # Enhanced MR
        with pytest.raises(SeriesError, match="10 slice\\(s\\) without ImageOrientationPatient"):
            load_series(by_frames[10])
        siemens = load_series(by_frames[1])
        assert siemens.pixels.shape == (1, 484, 484)
        np.testing.assert_array_equal(siemens.pixels[0], pydicom.dcmread(study / "siemens.dcm").pixel_array)

        # the two files are different studies; each alone goes through run_study
        bundle = ModelBundle.load(tiny_checkpoint)
        (tmp_path / "alone").mkdir()
        shutil.move(study / "enhanced.dcm", tmp_path / "alone" / "enhanced.dcm")
        result = run_study(tmp_path / "alone", bundle, tmp_path / "out", device="cpu")
    assert result.outcome is Outcome.UNSUPPORTED and result.reason
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.dcm"))


def test_the_first_enhanced_file_is_the_uncompressed_little_endian_one() -> None:
    """The Enhanced MR file used first is the uncompressed little-endian one the others re-encode."""
    meta = pydicom.dcmread(vendor_file(ENHANCED), stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
