"""Every phantom instance is valid DICOM that the usual toolkits read and send.

dciodvfy (dicom3tools) checks each instance against the MR Image IOD; pydicom, SimpleITK
and dcmdump (dcmtk) read them; storescu sends a study to a real storescp on loopback; the
lossless transfer syntaxes decode to exactly the pixels of the uncompressed files.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tests.training.phantoms.conftest import require_tool
from training.phantoms.dicom_writer import TRANSFER_SYNTAXES
from training.phantoms.generate import generate_case
from training.phantoms.sites import SITES


def _dciodvfy_errors(paths: list[Path]) -> list[str]:
    tool = require_tool("dciodvfy")
    errors = []
    for path in paths:
        result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        output = result.stdout + result.stderr
        errors += [f"{path.parent.name}/{path.name}: {line}" for line in output.splitlines() if line.startswith("Error")]
    return errors


@pytest.fixture(scope="module")
def cases_by_variant(tmp_path_factory: pytest.TempPathFactory, stand_in) -> dict[tuple[str, str], object]:
    """One small case per joint (explicit VR) and one knee case per compressed transfer syntax.

    The compressed knee cases have the seed of the explicit knee case, so their pixels must
    be identical to it; every knee case has a localizer so all series kinds are covered.
    """
    out = tmp_path_factory.mktemp("validity")
    cases = {}
    for joint in ("knee", "ankle", "shoulder"):
        cases[(joint, "explicit")] = generate_case(
            out / f"{joint}-explicit", joint, 0, seed=21, matrix=40, case_source=stand_in,
            distractor="localizer" if joint == "knee" else "second_sagittal",
        )
    for syntax in ("jpeg2000", "jpegls", "rle"):
        cases[("knee", syntax)] = generate_case(
            out / f"knee-{syntax}", "knee", 0, seed=21, transfer_syntax=syntax, matrix=40, case_source=stand_in, distractor="localizer"
        )
    return cases


def _files(case) -> list[Path]:
    return sorted((case.case_dir / "dicom").rglob("IMG*.dcm"))


@pytest.mark.parametrize(
    "variant",
    [("knee", "explicit"), ("ankle", "explicit"), ("shoulder", "explicit"), ("knee", "jpeg2000"), ("knee", "jpegls"), ("knee", "rle")],
    ids=lambda v: f"{v[0]}-{v[1]}",
)
def test_dciodvfy_reports_no_errors(cases_by_variant, variant) -> None:
    files = _files(cases_by_variant[variant])
    assert len({path.parent for path in files}) >= 4  # three planes and a distractor
    errors = _dciodvfy_errors(files)
    assert not errors, "\n".join(errors[:20])


@pytest.mark.parametrize("site", sorted(SITES))
def test_every_site_header_style_is_valid(tmp_path: Path, stand_in, site: str) -> None:
    """Each site writes its own header habits (laterality attribute, body part, spacing, wording)."""
    case = generate_case(tmp_path, "knee", 0, seed=5, site=site, matrix=32, case_source=stand_in, distractor="localizer")
    errors = _dciodvfy_errors(_files(case))
    assert not errors, "\n".join(errors[:20])
    ds = pydicom.dcmread(_files(case)[-1], stop_before_pixels=True)
    profile = SITES[site]
    assert ds.Manufacturer == profile.manufacturer and ds.StationName == profile.station_name
    assert float(ds.MagneticFieldStrength) == profile.field_strength_t
    assert ("SpacingBetweenSlices" in ds) == profile.writes_spacing_between_slices
    assert ds.get("BodyPartExamined") == profile.body_part("knee")


def test_pydicom_sitk_and_dcmdump_read_every_series(cases_by_variant) -> None:
    dcmdump = require_tool("dcmdump")
    for (joint, syntax), case in cases_by_variant.items():
        for folder in sorted((case.case_dir / "dicom").iterdir()):
            files = sorted(folder.glob("IMG*.dcm"))
            datasets = [pydicom.dcmread(path) for path in files]
            assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {TRANSFER_SYNTAXES[syntax]}
            for ds in datasets:
                pixels = ds.pixel_array
                assert pixels.dtype == np.uint16 and pixels.shape == (ds.Rows, ds.Columns) and pixels.max() <= 4095
                assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
                assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
                for keyword in ("ScanningSequence", "SequenceVariant", "MRAcquisitionType", "RepetitionTime", "EchoTime",
                                "EchoTrainLength", "FlipAngle", "ImagingFrequency", "MagneticFieldStrength", "WindowCenter",
                                "WindowWidth", "AcquisitionDate", "AcquisitionTime", "SliceLocation", "StationName"):
                    assert keyword in ds, f"{folder.name}: {keyword} missing"
            result = subprocess.run([dcmdump, "-q", str(files[0]), str(files[-1])], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0 and "MRImageStorage" in result.stdout, result.stderr
            if folder.name.endswith("localizer"):
                continue  # three orientations in one series: not one volume, by design
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(str(folder))
            assert len(names) == len(files)
            reader.SetFileNames(names)
            volume = reader.Execute()
            assert volume.GetSize()[2] == len(files)


@pytest.mark.parametrize("syntax", ["jpeg2000", "jpegls", "rle"])
def test_lossless_syntaxes_round_trip(cases_by_variant, syntax: str) -> None:
    reference = _files(cases_by_variant[("knee", "explicit")])
    compressed = _files(cases_by_variant[("knee", syntax)])
    ref_root = cases_by_variant[("knee", "explicit")].case_dir
    cmp_root = cases_by_variant[("knee", syntax)].case_dir
    assert [p.relative_to(ref_root) for p in reference] == [p.relative_to(cmp_root) for p in compressed]
    for ref_path, cmp_path in zip(reference, compressed):
        ref, cmp = pydicom.dcmread(ref_path), pydicom.dcmread(cmp_path)
        assert cmp.SOPInstanceUID == ref.SOPInstanceUID  # lossless: same image, same identity
        assert cmp.file_meta.TransferSyntaxUID.is_compressed
        np.testing.assert_array_equal(cmp.pixel_array, ref.pixel_array)


def test_storescu_sends_a_case_to_storescp(cases_by_variant, tmp_path: Path, free_port: int) -> None:
    storescp, storescu = require_tool("storescp"), require_tool("storescu")
    case = cases_by_variant[("knee", "jpegls")]
    files = _files(case)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    # dcmtk leaves Nagle's algorithm on unless TCP_NODELAY is set, which costs ~90 ms per
    # instance on loopback (delayed acknowledgements); +xa accepts every transfer syntax
    env = {**os.environ, "TCP_NODELAY": "1"}
    server = subprocess.Popen(
        [storescp, "--aetitle", "PHANTOMSCP", "+xa", "--output-directory", str(inbox), str(free_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        deadline = time.monotonic() + 10.0
        while True:  # wait until the listener accepts associations
            echo = subprocess.run(
                [require_tool("echoscu"), "-aec", "PHANTOMSCP", "127.0.0.1", str(free_port)], capture_output=True, timeout=20, env=env
            )
            if echo.returncode == 0:
                break
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.2)
        result = subprocess.run(
            [storescu, "-aec", "PHANTOMSCP", "-xt", "+sd", "+r", "127.0.0.1", str(free_port), str(case.case_dir / "dicom")],
            capture_output=True, text=True, timeout=120, env=env,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
    received = sorted(inbox.iterdir())
    assert len(received) == len(files)
    sent_uids = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in files}
    got_uids = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in received}
    assert got_uids == sent_uids
