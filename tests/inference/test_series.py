"""Folder scanning and series loading: sorting, geometry, multi-frame, compression, bad files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from inference.series import SeriesError, SeriesInfo, load_series, scan_folder, scan_folder_report
from tests.inference.dicom_factory import (
    Geometry,
    SeriesHeader,
    orientation,
    pattern_volume,
    write_classic_series,
    write_enhanced_series,
    write_junk,
)

OBLIQUE = Geometry(
    orientation=orientation("coronal", 20.0, "z", flip=True),
    origin=(12.5, -30.0, 41.0),
    pixel_spacing=(0.9, 0.6),
    slice_spacing=3.3,
    slice_thickness=3.0,
)


def _only(folder: Path) -> SeriesInfo:
    series = scan_folder(folder)
    assert len(series) == 1, [s.label() for s in series]
    return series[0]


def test_shuffled_files_are_sorted_along_the_normal(tmp_path: Path) -> None:
    volume = pattern_volume(9, 20, 18, seed=1)
    paths = write_classic_series(
        tmp_path / "s", volume, OBLIQUE, SeriesHeader(rescale=(2.0, -100.0)), shuffle_seed=7
    )
    info = _only(tmp_path / "s")
    assert info.num_frames == 9 and info.plane == "coronal"
    assert info.obliquity_deg == pytest.approx(20.0)
    assert (info.rows, info.columns) == (20, 18)
    loaded = load_series(info)

    assert loaded.pixels.dtype == np.float32 and loaded.pixels.shape == (9, 20, 18)
    np.testing.assert_array_equal(loaded.pixels, volume.astype(np.float32) * 2.0 - 100.0)
    expected_refs = [(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), None) for p in paths]
    assert loaded.source_refs == expected_refs
    assert [str(ds.SOPInstanceUID) for ds in loaded.datasets] == [uid for uid, _ in expected_refs]
    projections = loaded.positions @ loaded.normal
    assert np.all(np.diff(projections) > 0)
    assert loaded.spacing == pytest.approx((0.9, 0.6, 3.3))


def test_slices_written_against_the_normal_are_reversed(tmp_path: Path) -> None:
    volume = pattern_volume(6, 16, 16, seed=2)
    flipped = Geometry(orientation=orientation("sagittal", flip=True), slice_spacing=-4.0)
    write_classic_series(tmp_path / "s", volume, flipped, shuffle_seed=3)
    loaded = load_series(_only(tmp_path / "s"))
    np.testing.assert_array_equal(loaded.pixels, volume[::-1].astype(np.float32))
    assert loaded.spacing[2] == pytest.approx(4.0)
    np.testing.assert_allclose(loaded.positions[0], flipped.position(5))


def test_affine_and_sitk_match_simpleitk_reading_of_an_oblique_series(tmp_path: Path) -> None:
    volume = pattern_volume(7, 24, 20, seed=3)
    write_classic_series(tmp_path / "s", volume, OBLIQUE, shuffle_seed=11)
    loaded = load_series(_only(tmp_path / "s"))

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    reference = reader.Execute()
    ours = loaded.to_sitk()
    assert ours.GetSize() == reference.GetSize() == (20, 24, 7)
    np.testing.assert_allclose(ours.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(ours.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reference).astype(np.float32), loaded.pixels)

    affine = loaded.affine()
    for index in [(0, 0, 0), (19, 0, 0), (0, 23, 0), (0, 0, 6), (7, 11, 3), (19, 23, 6)]:
        mine = affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(mine[:3], reference.TransformIndexToPhysicalPoint(index), atol=1e-4)
    # the slice origin of every slice is where the affine puts (0, 0, k)
    for k in range(7):
        np.testing.assert_allclose((affine @ np.array([0, 0, k, 1.0]))[:3], loaded.positions[k], atol=1e-6)


def test_enhanced_multiframe_gives_the_same_volume_as_classic(tmp_path: Path) -> None:
    volume = pattern_volume(8, 20, 22, seed=4)
    header = SeriesHeader(rescale=(1.5, 7.0))
    write_classic_series(tmp_path / "classic", volume, OBLIQUE, header, shuffle_seed=5)
    enhanced_header = SeriesHeader(rescale=(1.5, 7.0), series_number=4)
    write_enhanced_series(
        tmp_path / "enhanced" / "mf.dcm",
        volume,
        OBLIQUE,
        enhanced_header,
        frame_order=[4, 0, 7, 2, 1, 6, 3, 5],
        per_frame_rescale=True,
    )
    classic = load_series(_only(tmp_path / "classic"))
    info = _only(tmp_path / "enhanced")
    assert info.is_multiframe and info.num_frames == 8 and info.plane == "coronal"
    assert info.laterality == "R"  # from the Frame Anatomy functional group
    assert info.pixel_spacing == pytest.approx((0.9, 0.6)) and info.slice_thickness == pytest.approx(3.0)
    enhanced = load_series(info)

    np.testing.assert_array_equal(enhanced.pixels, classic.pixels)
    np.testing.assert_allclose(enhanced.affine(), classic.affine(), atol=1e-9)
    assert enhanced.spacing == pytest.approx(classic.spacing)
    sop = str(enhanced.datasets[0].SOPInstanceUID)
    assert len(enhanced.datasets) == 1
    # slice k came from frame order.index(k) + 1
    assert enhanced.source_refs == [(sop, [4, 0, 7, 2, 1, 6, 3, 5].index(k) + 1) for k in range(8)]


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_compressed_series_decode_exactly(tmp_path: Path, syntax: str) -> None:
    volume = pattern_volume(4, 32, 40, seed=5)
    write_classic_series(tmp_path / "s", volume, OBLIQUE, transfer_syntax=syntax, shuffle_seed=1)
    info = _only(tmp_path / "s")
    assert info.transfer_syntaxes == (syntax,)
    np.testing.assert_array_equal(load_series(info).pixels, volume.astype(np.float32))


def test_lossless_compressed_multiframe_decodes(tmp_path: Path) -> None:
    volume = pattern_volume(4, 32, 40, seed=6)
    write_enhanced_series(
        tmp_path / "mf.dcm", volume, OBLIQUE, transfer_syntax=JPEG2000Lossless, frame_order=[2, 0, 3, 1]
    )
    np.testing.assert_array_equal(load_series(_only(tmp_path)).pixels, volume.astype(np.float32))


def test_jpeg_baseline_series_decodes_close_to_source(tmp_path: Path) -> None:
    volume = (pattern_volume(3, 32, 40, seed=7) // 12).astype(np.uint8)
    write_classic_series(tmp_path / "s", volume, OBLIQUE, transfer_syntax=JPEGBaseline8Bit)
    pixels = load_series(_only(tmp_path / "s")).pixels
    error = np.abs(pixels - volume.astype(np.float32))
    assert error.mean() < 3.0, error.mean()
    # lossy, but slices stay in their place: each decoded slice is nearest its own source
    for k in range(3):
        distances = [np.abs(pixels[k] - volume[j]).mean() for j in range(3)]
        assert int(np.argmin(distances)) == k


def test_junk_dicomdir_and_truncated_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    volume = pattern_volume(5, 16, 16)
    write_classic_series(tmp_path / "study" / "s3", volume, Geometry())
    junk = write_junk(tmp_path / "study")
    report = scan_folder_report(tmp_path)
    assert [s.num_frames for s in report.series] == [5]
    reasons = {item.path: item.reason for item in report.skipped}
    assert set(reasons) == set(junk.values())
    assert reasons[junk["dicomdir"]].startswith("DICOMDIR")
    assert reasons[junk["truncated"]].startswith("truncated")
    assert "not a DICOM file" in reasons[junk["text"]]
    assert "not a DICOM file" in reasons[junk["empty"]]


def test_scan_of_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_folder(tmp_path / "nowhere")


def test_series_grouped_by_uid_with_header_fields(tmp_path: Path) -> None:
    header_a = SeriesHeader(
        series_number=2, series_description="T1 TSE COR", protocol_name="t1_tse_cor", body_part="KNEE"
    )
    header_b = SeriesHeader(series_number=5, series_description="PD FS AX", study_uid=header_a.study_uid)
    write_classic_series(
        tmp_path / "study" / "a",
        pattern_volume(4, 16, 16),
        Geometry(orientation=orientation("coronal")),
        header_a,
    )
    write_classic_series(
        tmp_path / "study" / "b" / "deeper",
        pattern_volume(6, 12, 12),
        Geometry(orientation=orientation("axial")),
        header_b,
    )
    series = scan_folder(tmp_path)
    by_number = {s.series_number: s for s in series}
    assert set(by_number) == {2, 5}
    a = by_number[2]
    assert (a.series_description, a.protocol_name, a.body_part, a.modality) == (
        "T1 TSE COR",
        "t1_tse_cor",
        "KNEE",
        "MR",
    )
    assert a.image_type == ("ORIGINAL", "PRIMARY", "M", "NONE") and a.laterality == "R"
    assert a.study_instance_uid == by_number[5].study_instance_uid
    assert by_number[5].plane == "axial"


def _break(paths: list[Path], edit: Callable[[int, pydicom.Dataset], object]) -> None:
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        edit(i, ds)
        ds.save_as(path)


def test_specific_errors(tmp_path: Path) -> None:
    volume = pattern_volume(5, 16, 16)

    def expect(
        name: str, edit: Callable[[int, pydicom.Dataset], object], message: str, count: int = 5
    ) -> None:
        paths = write_classic_series(tmp_path / name, volume[:count], Geometry())
        _break(paths, edit)
        with pytest.raises(SeriesError, match=message) as caught:
            load_series(_only(tmp_path / name))
        assert caught.value.reason and caught.value.series_uid

    expect(
        "nopos", lambda i, ds: i == 2 and delattr(ds, "ImagePositionPatient"), "without ImagePositionPatient"
    )
    expect(
        "mixedorient",
        lambda i, ds: i == 1 and setattr(ds, "ImageOrientationPatient", list(orientation("axial"))),
        "inconsistent orientation",
    )
    expect(
        "gap",
        lambda i, ds: i == 4 and setattr(ds, "ImagePositionPatient", list(Geometry().position(6))),
        "non-uniform slice spacing",
    )
    expect(
        "dup",
        lambda i, ds: i == 4 and setattr(ds, "ImagePositionPatient", list(Geometry().position(3))),
        "share a position",
    )

    def resize(i: int, ds: pydicom.Dataset) -> None:
        if i == 0:
            ds.Rows, ds.Columns = 8, 32

    expect("mixedsize", resize, "mixed image sizes")


def test_undecodable_pixel_data_is_reported(tmp_path: Path) -> None:
    paths = write_classic_series(
        tmp_path / "s", pattern_volume(4, 32, 32), Geometry(), transfer_syntax=JPEG2000Lossless
    )
    ds = pydicom.dcmread(paths[1])
    data = bytearray(ds.PixelData)
    data[-300:-2] = b"\x00" * 298  # keep the encapsulation intact, destroy the codestream
    data[40:140] = b"\xff" * 100
    ds.PixelData = bytes(data)
    ds.save_as(paths[1])
    with pytest.raises(SeriesError, match="undecodable pixel data"):
        load_series(_only(tmp_path / "s"))


def test_truncated_headers_and_compressed_files(tmp_path: Path) -> None:
    paths = write_classic_series(
        tmp_path / "s", pattern_volume(6, 32, 32), Geometry(), transfer_syntax=RLELossless
    )
    data = paths[0].read_bytes()
    (tmp_path / "header_cut.dcm").write_bytes(data[:400])
    paths[3].write_bytes(paths[3].read_bytes()[:-300])
    report = scan_folder_report(tmp_path)
    reasons = {item.path.name: item.reason for item in report.skipped}
    assert reasons == {
        "header_cut.dcm": "truncated: the file ends inside the header",
        paths[3].name: "truncated: the compressed pixel data has no end-of-sequence delimiter",
    }
    # the slice left out leaves a hole that the loader refuses to paper over
    with pytest.raises(SeriesError, match="non-uniform slice spacing"):
        load_series(_only(tmp_path / "s"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_files_without_a_valid_identity_are_skipped_with_reasons(tmp_path: Path) -> None:
    """The SEG and SR reference every source instance by its UIDs: a file whose SOP Instance
    or SOP Class UID is missing or not a UID is skipped, named, with the reason."""
    paths = write_classic_series(tmp_path / "s", pattern_volume(5, 32, 32), Geometry())
    ds = pydicom.dcmread(paths[1])
    del ds.SOPInstanceUID
    ds.save_as(paths[1], enforce_file_format=False)
    ds = pydicom.dcmread(paths[2])
    ds.SOPClassUID = "ééé"
    ds.save_as(paths[2], enforce_file_format=False)
    report = scan_folder_report(tmp_path)
    reasons = {item.path.name: item.reason for item in report.skipped}
    assert reasons == {paths[1].name: "no SOPInstanceUID", paths[2].name: "SOPClassUID 'ééé' is not a valid UID"}
    assert [len(s.files) for s in report.series] == [3]


def test_a_slice_in_another_frame_of_reference_is_a_load_error(tmp_path: Path) -> None:
    paths = write_classic_series(tmp_path / "s", pattern_volume(4, 32, 32), Geometry())
    ds = pydicom.dcmread(paths[2])
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.save_as(paths[2])
    with pytest.raises(SeriesError, match="2 different frames of reference"):
        load_series(_only(tmp_path / "s"))


def test_file_truncated_after_scan_is_a_load_error(tmp_path: Path) -> None:
    paths = write_classic_series(
        tmp_path / "s", pattern_volume(4, 32, 32), Geometry(), transfer_syntax=JPEGLSLossless
    )
    info = _only(tmp_path / "s")
    paths[2].write_bytes(paths[2].read_bytes()[:-200])
    with pytest.raises(SeriesError, match="truncated file"):
        load_series(info)


def test_header_changed_after_scan_is_converted_again_and_reported(tmp_path: Path) -> None:
    """The load skips converting headers the scan converted, but only while the file is unchanged."""
    paths = write_classic_series(tmp_path / "s", pattern_volume(4, 32, 32), Geometry())
    info = _only(tmp_path / "s")
    assert set(info.scanned_files) == set(paths)
    unchanged = load_series(info)
    assert unchanged.pixels.shape == (4, 32, 32)
    # replace one file after the scan with a header value pydicom cannot convert (a US element
    # of 3 bytes): the load must convert that header again and name the file
    ds = pydicom.dcmread(paths[1])
    ds[0x00280120] = RawDataElement(Tag(0x00280120), "US", 3, b"\x01\x02\x03", 0, False, True)
    ds.save_as(paths[1])
    stat = paths[1].stat()
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(SeriesError, match=f"{paths[1].name}: cannot read"):
        load_series(info)


@pytest.mark.dicomtools
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not on PATH")
def test_factory_objects_are_valid_dicom(tmp_path: Path) -> None:
    """The fixtures other tests rely on are conformant MR and Enhanced MR objects."""
    volume = pattern_volume(3, 32, 32)
    files = [
        write_classic_series(tmp_path / "c", volume, OBLIQUE)[0],
        write_classic_series(tmp_path / "r", volume, OBLIQUE, transfer_syntax=RLELossless)[0],
        write_enhanced_series(tmp_path / "e.dcm", volume, OBLIQUE, SeriesHeader(rescale=(2.0, 1.0))),
    ]
    for path in files:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"
