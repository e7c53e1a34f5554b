"""Phantom generation: geometry, masks, contrast, labels, determinism, output layout, CLI."""
from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.labels import STRUCTURE_INDEX, label_keys
from training.phantoms import generate as generate_module
from training.phantoms.acquisition import (
    DISTRACTOR_PROBABILITY,
    BiasField,
    acquire_series,
    fat_sat_failure_map,
    knee_condylar_yaw_deg,
    oblique_angle_deg,
    plan_protocol,
    sample_stack,
    truncate_phase_encoding,
)
from training.phantoms.anatomy import Tissue
from training.phantoms.contrast import fat_signal_table, signal_table
from training.phantoms.generate import CASE_COLUMNS, generate_case, generate_dataset
from training.phantoms.sites import SITES, get_site


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in sorted(folder.glob("IMG*.dcm"))]


def _series_folders(case_dir: Path) -> list[Path]:
    return sorted(p for p in (case_dir / "dicom").iterdir() if p.is_dir())


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _mask_for(case_dir: Path, folder: Path) -> Path:
    uid = pydicom.dcmread(folder / "IMG0001.dcm", stop_before_pixels=True).SeriesInstanceUID
    return case_dir / "masks" / f"{uid}.nii.gz"


def _volume(folder: Path) -> np.ndarray:
    """(slices, rows, cols) pixels in InstanceNumber order (which is the stack order)."""
    datasets = sorted(_read_series(folder), key=lambda ds: int(ds.InstanceNumber))
    return np.stack([ds.pixel_array for ds in datasets]).astype(np.float32)


def _mask_volume(path: Path) -> np.ndarray:
    """NIfTI (col, row, slice) -> (slices, rows, cols)."""
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)


def test_series_geometry(knee_case) -> None:
    case_dir = knee_case.case_dir
    folders = _series_folders(case_dir)
    planes = {folder.name.split("_", 1)[1] for folder in folders}
    assert {"sagittal", "coronal", "axial", "localizer"} <= planes
    frames, studies = set(), set()
    oblique_angles = {}
    for folder in folders:
        datasets = sorted(_read_series(folder), key=lambda ds: int(ds.InstanceNumber))
        frames |= {ds.FrameOfReferenceUID for ds in datasets}
        studies |= {ds.StudyInstanceUID for ds in datasets}
        assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
        for ds in datasets:
            row, col = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
            assert abs(np.linalg.norm(row) - 1) < 1e-5 and abs(np.linalg.norm(col) - 1) < 1e-5
            assert abs(np.dot(row, col)) < 1e-5
        if folder.name.endswith("localizer"):
            orientations = {tuple(np.round(np.asarray(ds.ImageOrientationPatient, float), 3)) for ds in datasets}
            assert len(orientations) == 3 and "LOCALIZER" in datasets[0].ImageType
            continue
        iop = np.asarray(datasets[0].ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        positions = np.array([np.asarray(ds.ImagePositionPatient, float) for ds in datasets])
        steps = np.diff(positions, axis=0)
        spacing = float(knee_case.series[[s.plan.folder_name for s in knee_case.series].index(folder.name)].plan.stacks[0].slice_spacing)
        thickness = float(datasets[0].SliceThickness)
        assert spacing > thickness  # a gap between slices
        # every step goes exactly one spacing along the normal, nothing in-plane
        np.testing.assert_allclose(steps @ normal, spacing, atol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1), 0.0, atol=2e-3)
        if "SpacingBetweenSlices" in datasets[0]:
            assert float(datasets[0].SpacingBetweenSlices) == pytest.approx(spacing, abs=1e-3)
        locations = np.array([float(ds.SliceLocation) for ds in datasets])
        np.testing.assert_allclose(np.diff(locations), spacing, atol=2e-3)
        oblique_angles[folder.name.split("_", 1)[1]] = oblique_angle_deg(normal)
    assert len(frames) == 1 and len(studies) == 1
    # oblique=True asked for sagittal and coronal planes tilted to the anatomy (the rotated
    # stand-in joint); an ACL tilt can cancel the joint's rotation, so one of them at least
    assert max(oblique_angles["sagittal"], oblique_angles["coronal"]) > 3.0
    assert all(angle < 20.0 for angle in oblique_angles.values())


def test_knee_planes_follow_the_condylar_axis(stand_in) -> None:
    spec = stand_in.sample_case("knee", np.random.default_rng(1), "knee_0001", "siemens_3t_a")
    anatomy = stand_in.build_anatomy(spec)
    assert knee_condylar_yaw_deg(anatomy) == pytest.approx(anatomy.yaw_deg, abs=1.5)
    plans = plan_protocol(anatomy, spec, get_site("siemens_3t_a"), np.random.default_rng(2), matrix=64, oblique=True)
    stacks = {p.plane: p.stacks[0] for p in plans if p.role == "primary"}
    coronal_row = stacks["coronal"].row_dir
    coronal_yaw = np.degrees(np.arctan2(coronal_row[1], coronal_row[0]))
    assert coronal_yaw == pytest.approx(anatomy.yaw_deg, abs=6.0)  # parallel to the posterior condylar line
    sagittal_normal = stacks["sagittal"].normal
    sagittal_yaw = np.degrees(np.arctan2(-sagittal_normal[1], -sagittal_normal[0]))  # normal runs -x
    lateral_swing = (sagittal_yaw - anatomy.yaw_deg) * (1.0 if spec.laterality == "R" else -1.0)
    assert 4.0 < lateral_swing < 13.0  # the ACL tilt, relative to the condyles


def test_cardinal_when_oblique_disabled(stand_in) -> None:
    spec = stand_in.sample_case("knee", np.random.default_rng(1), "knee_0001", "siemens_3t_a")
    anatomy = stand_in.build_anatomy(spec)
    plans = plan_protocol(anatomy, spec, get_site("siemens_3t_a"), np.random.default_rng(2), matrix=64, oblique=False)
    assert [p.oblique_deg for p in plans if p.role == "primary"] == [0.0, 0.0, 0.0]


def test_masks_share_dicom_geometry(knee_case) -> None:
    case_dir = knee_case.case_dir
    checked = 0
    for folder in _series_folders(case_dir):
        mask_path = _mask_for(case_dir, folder)
        if folder.name.endswith("localizer"):
            assert not mask_path.exists()  # three planes: no single voxel grid
            continue
        image = _sitk_series(folder)
        mask = sitk.ReadImage(str(mask_path))
        assert mask.GetSize() == image.GetSize()
        np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-5)
        assert sitk.GetArrayViewFromImage(mask).dtype == np.uint8
        checked += 1
    assert checked == 3


def _centroid_lps(mask_path: Path, label: int) -> np.ndarray:
    image = nib.load(str(mask_path))
    ijk = np.argwhere(np.asarray(image.dataobj) == label)
    assert len(ijk) > 0, f"label {label} missing from {mask_path.name}"
    ras = ijk.mean(axis=0) @ image.affine[:3, :3].T + image.affine[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def test_mask_centroids_agree_across_planes(knee_case, stand_in) -> None:
    case_dir = knee_case.case_dir
    folders = [folder for folder in _series_folders(case_dir) if not folder.name.endswith("localizer")]
    # structures that lie wholly inside every field of view (the long bones are cut off at
    # different levels by different stacks, which moves their centroids)
    for structure in ("patella", "medial_meniscus", "lateral_meniscus"):
        centroids = np.array([_centroid_lps(_mask_for(case_dir, folder), STRUCTURE_INDEX[structure]) for folder in folders])
        spread = np.max(np.linalg.norm(centroids - centroids.mean(axis=0), axis=1))
        assert spread < 3.0, f"{structure} centroid differs by {spread:.1f} mm between planes"
    # and the meniscal ring (symmetric about the joint centre) sits where the stand-in put it
    expected = stand_in.build_anatomy(knee_case.spec).center + np.array([0.0, 0.0, -1.0])
    for folder in folders:
        mask = nib.load(str(_mask_for(case_dir, folder)))
        data = np.asarray(mask.dataobj)
        ijk = np.argwhere((data == STRUCTURE_INDEX["medial_meniscus"]) | (data == STRUCTURE_INDEX["lateral_meniscus"]))
        ring = (ijk.mean(axis=0) @ mask.affine[:3, :3].T + mask.affine[:3, 3]) * np.array([-1.0, -1.0, 1.0])
        assert np.linalg.norm(ring - expected) < 1.5, folder.name


def test_femur_is_bright_on_t1_and_dark_on_fat_sat(tmp_path: Path, stand_in) -> None:
    # a second sagittal series with the other contrast gives both on the same anatomy
    case = generate_case(tmp_path, "knee", 1, seed=11, matrix=64, case_source=stand_in, distractor="second_sagittal")
    sagittals = [s for s in case.series if s.plan.plane == "sagittal"]
    by_sequence = {s.plan.sequence: s for s in sagittals}
    assert "T1" in by_sequence and len(by_sequence) == 2
    for sequence, series in by_sequence.items():
        folder = case.case_dir / "dicom" / series.plan.folder_name
        pixels = _volume(folder)
        mask = _mask_volume(_mask_for(case.case_dir, folder))
        femur = np.median(pixels[mask == STRUCTURE_INDEX["femur"]])
        scale = np.percentile(pixels, 99.5)
        if sequence == "T1":
            assert femur / scale > 0.5, "fatty marrow must be bright on T1"
        else:
            assert femur / scale < 0.2, f"fatty marrow must be suppressed on {sequence}"


def _bright_fluid_ml(case_dir: Path, series_folder: Path) -> float:
    """Volume (ml) of voxels brighter than fluid-like signal on a fat-suppressed series.

    The reference is the series' own hyaline cartilage (from the mask): fluid is about 1.7x
    cartilage on PD fat-sat, so 1.3x cartilage separates fluid from everything but edema.
    """
    pixels = _volume(series_folder)
    mask = _mask_volume(_mask_for(case_dir, series_folder))
    cartilage = [STRUCTURE_INDEX[k] for k in ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage")]
    bright = pixels > 1.3 * np.median(pixels[np.isin(mask, cartilage)])
    ds = pydicom.dcmread(series_folder / "IMG0001.dcm", stop_before_pixels=True)
    voxel_ml = float(ds.PixelSpacing[0]) * float(ds.PixelSpacing[1]) * float(ds.SliceThickness) / 1000.0
    return float(bright.sum()) * voxel_ml


def test_effusion_is_visible_on_sagittal_fat_sat(tmp_path: Path, stand_in) -> None:
    volumes: dict[int, float] = {}
    index = 0
    while len(volumes) < 2 and index < 20:
        rng = generate_module._streams(5, "knee", index)[1]
        label = stand_in.sample_case("knee", rng, "x", "siemens_3t_a").labels["effusion"]
        if label not in volumes:
            case = generate_case(tmp_path, "knee", index, seed=5, site="siemens_3t_a", matrix=64, case_source=stand_in, distractor="none")
            assert case.spec.labels["effusion"] == label
            sagittal = next(s for s in case.series if s.plan.plane == "sagittal")
            assert sagittal.plan.sequence in ("PD_FS", "T2_FS")
            volumes[label] = _bright_fluid_ml(case.case_dir, case.case_dir / "dicom" / sagittal.plan.folder_name)
        index += 1
    assert set(volumes) == {0, 1}
    assert volumes[1] > 2.0 * volumes[0] + 2.0, volumes


@pytest.mark.parametrize("site", sorted(SITES))
def test_contrast_tables_follow_reading_rules(site: str) -> None:
    profile = get_site(site)
    t1, pdfs, t2fs = (signal_table(seq, profile, np.random.default_rng(0)) for seq in ("T1", "PD_FS", "T2_FS"))
    for table in (t1, pdfs, t2fs):
        assert table[Tissue.AIR] == 0.0
        dark = max(table[Tissue.CORTEX], table[Tissue.LIGAMENT], table[Tissue.FIBROCARTILAGE])
        assert dark < 0.5 * table[Tissue.MUSCLE]  # cortex, ligaments, menisci dark everywhere
    assert t1[Tissue.FAT] > 2 * t1[Tissue.MUSCLE] and t1[Tissue.MARROW] > 2 * t1[Tissue.FLUID]
    assert t1[Tissue.MARROW_EDEMA] < 0.5 * t1[Tissue.MARROW]  # edema replaces fatty marrow on T1
    for fat_sat in (pdfs, t2fs):
        # suppressed fat and fatty marrow below muscle, even with the poorer 1.5 T suppression
        assert fat_sat[Tissue.FAT] < 0.6 * fat_sat[Tissue.MUSCLE] and fat_sat[Tissue.MARROW] < 0.75 * fat_sat[Tissue.MUSCLE]
        assert fat_sat[Tissue.FLUID] > 1.5 * fat_sat[Tissue.CARTILAGE] > 1.5 * fat_sat[Tissue.MARROW]
        assert fat_sat[Tissue.MARROW_EDEMA] > 3 * fat_sat[Tissue.MARROW]
        assert fat_sat[Tissue.TEAR] > 3 * fat_sat[Tissue.LIGAMENT]
    assert pdfs[Tissue.CARTILAGE] > pdfs[Tissue.MUSCLE]  # cartilage intermediate, above muscle
    with pytest.raises(ValueError, match="STIR"):
        signal_table("STIR", profile)


def test_partial_volume_blends_thin_structures(stand_in) -> None:
    """A thick slice mixes tissues: the sampled signal takes values between the table's levels."""
    spec = stand_in.sample_case("knee", np.random.default_rng(3), "knee_0001", "siemens_3t_a")
    anatomy = stand_in.build_anatomy(spec)
    plan = plan_protocol(anatomy, spec, get_site("siemens_3t_a"), np.random.default_rng(4), matrix=64, oblique=False, distractor="none")[0]
    table = signal_table("T1", get_site("siemens_3t_a"))
    sharp, _ = sample_stack(anatomy, plan.stacks[0], table, through_samples=1, inplane_samples=1)
    blended, structure = sample_stack(anatomy, plan.stacks[0], table, through_samples=5, inplane_samples=2)
    levels = np.unique(table)
    assert np.all(np.isin(np.round(sharp, 5), np.round(levels, 5)))  # one tissue per voxel
    off_level = ~np.isin(np.round(blended, 5), np.round(levels, 5))
    assert off_level.mean() > 0.02  # mixtures at every boundary
    assert structure.max() > 0


def test_adaptive_sampling_matches_full_sampling(stand_in) -> None:
    """Sub-sampling only boundary voxels gives (almost) the image of sub-sampling all of them."""
    spec = stand_in.sample_case("knee", np.random.default_rng(8), "knee_0001", "siemens_3t_a")
    anatomy = stand_in.build_anatomy(spec)
    site = get_site("siemens_3t_a")
    plans = plan_protocol(anatomy, spec, site, np.random.default_rng(9), matrix=64, oblique=True, distractor="none")
    table = signal_table("PD_FS", site)
    for plan in plans:
        fast, fast_mask = sample_stack(anatomy, plan.stacks[0], table, through_samples=3)
        full, full_mask = sample_stack(anatomy, plan.stacks[0], table, through_samples=3, adaptive=False)
        assert np.mean(np.abs(fast - full) > 1e-4) < 0.01, plan.plane
        assert np.mean(fast_mask != full_mask) < 0.005, plan.plane


def test_partial_phase_sampling_blurs_only_the_phase_direction() -> None:
    edge = np.zeros((1, 64, 64), dtype=np.float32)
    edge[:, 20:44, 20:44] = 1.0
    real, imag = truncate_phase_encoding(edge, np.zeros_like(edge), axis=2, fraction=0.7)
    magnitude = np.hypot(real, imag)
    # across columns (phase): the edge is no longer sharp and rings (Gibbs) around it
    assert magnitude[0, 32, 19] > 0.1 and magnitude[0, 32, 21] > 1.05  # was 0 and 1
    # along a column inside the square, nothing changes between rows (frequency direction)
    np.testing.assert_allclose(magnitude[0, 25:40, 30], magnitude[0, 25, 30], atol=1e-5)
    assert abs(real.mean() - edge.mean()) < 1e-5  # the k-space centre is kept
    full_real, _ = truncate_phase_encoding(edge, np.zeros_like(edge), axis=2, fraction=1.0)
    np.testing.assert_array_equal(full_real, edge)


def test_fat_suppression_fails_towards_the_edges_of_the_field_of_view(stand_in) -> None:
    spec = stand_in.sample_case("knee", np.random.default_rng(6), "knee_0001", "ge_3t_e")
    anatomy = stand_in.build_anatomy(spec)
    site = get_site("ge_3t_e")
    plan = next(p for p in plan_protocol(anatomy, spec, site, np.random.default_rng(7), matrix=64, oblique=False,
                                         distractor="none") if p.plane == "sagittal" and p.role == "primary")
    assert plan.sequence in ("PD_FS", "T2_FS")
    stack = plan.stacks[0]
    weight = fat_sat_failure_map(stack)
    middle = stack.n_slices // 2
    assert weight[middle, 32, 32] < 0.01 and weight[middle, 0, 0] > 0.5 and weight.max() <= 1.0
    bias = BiasField.random(anatomy.center, 0.0, np.random.default_rng(8))
    perfect = dataclasses.replace(site, fat_sat_edge_failure=0.0)
    with_failure = acquire_series(anatomy, plan, site, bias, np.random.default_rng(9)).pixels[0].astype(float)
    without = acquire_series(anatomy, plan, perfect, bias, np.random.default_rng(9)).pixels[0].astype(float)
    extra = with_failure[middle] - without[middle]  # same noise draws: only the failure differs
    fat_rows = slice(0, 6)  # the limb's fat runs along the top and bottom of the sagittal image
    centre_rows = slice(26, 38)
    assert extra[fat_rows].mean() > 5 * max(extra[centre_rows].mean(), 0.5)
    assert extra.min() >= -1.0  # failing suppression only ever adds fat signal (up to rounding)
    assert fat_signal_table()[Tissue.FAT] > 0.5 and fat_signal_table()[Tissue.FLUID] == 0.0


def test_bias_field_is_smooth_and_bounded() -> None:
    field = BiasField.random(np.zeros(3), 0.3, np.random.default_rng(0))
    line = np.stack([np.linspace(-80, 80, 161), np.zeros(161), np.zeros(161)], axis=1)
    gain = field(line)
    assert gain.min() > 0.5 and gain.max() < 2.0
    assert np.max(np.abs(np.diff(gain))) < 0.02  # under 2 % per millimetre


def test_deterministic_files(tmp_path: Path, stand_in) -> None:
    for name in ("a", "b"):
        generate_dataset(tmp_path / name, "knee", 1, seed=7, matrix=48, case_source=stand_in)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 30
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    generate_dataset(tmp_path / "c", "knee", 1, seed=8, matrix=48, case_source=stand_in)
    uid_a = pydicom.dcmread(next((tmp_path / "a").rglob("IMG0001.dcm"))).StudyInstanceUID
    uid_c = pydicom.dcmread(next((tmp_path / "c").rglob("IMG0001.dcm"))).StudyInstanceUID
    assert uid_a != uid_c


def test_cases_csv_and_header_values(tmp_path: Path, stand_in) -> None:
    specs = generate_dataset(tmp_path, "ankle", 4, seed=2, matrix=40, case_source=stand_in)
    with open(tmp_path / "cases.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CASE_COLUMNS + label_keys("ankle")
        rows = list(reader)
    assert [row["case_id"] for row in rows] == [spec.case_id for spec in specs] == [f"ankle_{i:04d}" for i in range(1, 5)]
    for row, spec in zip(rows, specs):
        assert row["joint"] == "ankle" and row["site"] in SITES and row["laterality"] in ("L", "R")
        assert all(row[key] in ("0", "1") and int(row[key]) == spec.labels[key] for key in label_keys("ankle"))
        ds = pydicom.dcmread(next((tmp_path / spec.case_id).rglob("IMG0001.dcm")), stop_before_pixels=True)
        assert ds.Manufacturer == SITES[spec.site].manufacturer
        assert ds.StudyDescription.upper().startswith(("MRI ANKLE", "MR ANKLE"))
        assert ds.get("Laterality", ds.get("ImageLaterality")) == spec.laterality
        if spec.age is None:
            assert row["age"] == "" and "PatientAge" not in ds
        else:
            assert int(row["age"]) == spec.age and ds.PatientAge == f"{spec.age:03d}Y"
        if spec.height_m is None:
            assert row["height_m"] == "" and "PatientSize" not in ds
        else:
            assert float(row["height_m"]) == pytest.approx(spec.height_m) == float(ds.PatientSize)
        if spec.weight_kg is None:
            assert row["weight_kg"] == "" and "PatientWeight" not in ds
        else:
            assert float(row["weight_kg"]) == pytest.approx(spec.weight_kg) == float(ds.PatientWeight)
        assert row["sex"] == (spec.sex or "") == ds.PatientSex
        assert not (tmp_path / spec.case_id / "masks").exists()  # masks are for the knee only


def test_distractor_series_in_some_cases(stand_in) -> None:
    site = get_site("ge_3t_e")
    kinds = []
    for index in range(300):
        rng = np.random.default_rng(index)
        spec = stand_in.sample_case("shoulder", rng, f"s{index}", site.name)
        plans = plan_protocol(stand_in.build_anatomy(spec), spec, site, rng, matrix=64)
        assert sorted(p.plane for p in plans if p.role == "primary") == ["axial", "coronal", "sagittal"]
        distractors = [p for p in plans if p.role == "distractor"]
        assert len(distractors) <= 1
        kinds.append(distractors[0].plane if distractors else None)
        # the shoulder's coronal plane follows the scapula, far from the patient coronal plane
        coronal = next(p for p in plans if p.plane == "coronal" and p.role == "primary")
        assert 12.0 < coronal.oblique_deg < 28.0
    fraction = sum(kind is not None for kind in kinds) / len(kinds)
    assert abs(fraction - DISTRACTOR_PROBABILITY) < 0.08
    assert {"localizer", "sagittal"} <= set(kinds)


def test_site_held_out_keeps_anatomy(tmp_path: Path, stand_in) -> None:
    fixed = generate_dataset(tmp_path / "fixed", "knee", 2, seed=4, site="philips_3t_c", matrix=40, case_source=stand_in)
    drawn = generate_dataset(tmp_path / "drawn", "knee", 2, seed=4, matrix=40, case_source=stand_in)
    assert {spec.site for spec in fixed} == {"philips_3t_c"}
    assert [s.labels for s in fixed] == [s.labels for s in drawn]
    ds = pydicom.dcmread(next((tmp_path / "fixed").rglob("IMG0001.dcm")), stop_before_pixels=True)
    assert ds.Manufacturer == "Philips" and ds.ManufacturerModelName == "Ingenia" and float(ds.MagneticFieldStrength) == 3.0
    assert "SpacingBetweenSlices" not in ds and ds.BodyPartExamined == "KNEE" and "Laterality" not in ds
    assert int(ds.SeriesNumber) % 100 == 1


def test_generate_rejects_bad_arguments(tmp_path: Path, stand_in) -> None:
    with pytest.raises(ValueError, match="site"):
        generate_dataset(tmp_path, "knee", 1, site="nowhere", case_source=stand_in)
    with pytest.raises(ValueError, match="joint"):
        generate_dataset(tmp_path, "elbow", 1, case_source=stand_in)
    with pytest.raises(ValueError, match="transfer_syntax"):
        generate_dataset(tmp_path, "knee", 1, transfer_syntax="jpeg", case_source=stand_in)
    with pytest.raises(ValueError, match="matrix"):
        generate_dataset(tmp_path, "knee", 1, matrix=8, case_source=stand_in)


def _phantom_parser() -> argparse.ArgumentParser:
    from training.phantoms import cli

    parser = argparse.ArgumentParser(prog="orthonode phantom")
    cli.configure(parser)
    return parser


def test_cli_writes_dataset_and_preview(tmp_path: Path, stand_in, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.phantoms import cli

    monkeypatch.setattr(generate_module, "default_case_source", lambda: stand_in)
    out = tmp_path / "out"
    args = _phantom_parser().parse_args(["--joint", "knee", "--cases", "2", "--out", str(out), "--seed", "1",
                                         "--site", "siemens_1p5t_d", "--transfer-syntax", "rle", "--matrix", "48", "--preview"])
    assert cli.run(args) == 0
    assert (out / "cases.csv").is_file()
    for case_id in ("knee_0001", "knee_0002"):
        preview = out / case_id / "preview.png"
        assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        ds = pydicom.dcmread(next((out / case_id).rglob("IMG0001.dcm")))
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
        assert ds.StationName == "AWP45321" and "BodyPartExamined" not in ds
        assert len(list((out / case_id / "masks").glob("*.nii.gz"))) >= 3


def test_existing_case_folder_is_not_overwritten(tmp_path: Path, stand_in, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from training.phantoms import cli

    (tmp_path / "knee_0001").mkdir()
    (tmp_path / "knee_0001" / "notes.txt").write_text("kept")
    with pytest.raises(FileExistsError, match="knee_0001"):
        generate_dataset(tmp_path, "knee", 1, matrix=40, case_source=stand_in)
    monkeypatch.setattr(generate_module, "default_case_source", lambda: stand_in)
    args = _phantom_parser().parse_args(["--joint", "knee", "--cases", "1", "--out", str(tmp_path), "--matrix", "40"])
    assert cli.run(args) == 1
    assert "already exists" in caplog.text
    assert (tmp_path / "knee_0001" / "notes.txt").read_text() == "kept"


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _phantom_parser()
    for bad, word in ((["--site", "nowhere"], "nowhere"), (["--matrix", "0"], "matrix"), (["--joint", "elbow"], "elbow")):
        argv = ["--joint", "knee", "--cases", "1", "--out", str(tmp_path), *bad]
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert word in capsys.readouterr().err


# --- the real anatomical models (training.phantoms.cases) through the same pipeline ---------


@pytest.fixture(scope="module")
def real_knees(tmp_path_factory: pytest.TempPathFactory):
    """An effusion-negative and a clearly effusion-positive knee from the real models, at one
    site, both with a PD fat-sat primary sagittal series (so the comparison is like for like)
    and a second sagittal T1 series."""
    from training.phantoms.generate import plan_case

    out = tmp_path_factory.mktemp("real_knees")
    chosen: dict[int, int] = {}
    options = dict(seed=13, site="siemens_3t_a", matrix=80, distractor="second_sagittal", oblique=True)
    for index in range(60):
        planned = plan_case("knee", index, **options)
        sagittal = next(p for p in planned.plans if p.plane == "sagittal" and p.role == "primary")
        effusion = planned.spec.labels["effusion"]
        if sagittal.sequence != "PD_FS" or effusion in chosen:
            continue
        if effusion and planned.spec.severity["effusion"] < 0.4:
            continue
        chosen[effusion] = index
        if len(chosen) == 2:
            return {label: generate_case(out, "knee", index, **options) for label, index in chosen.items()}
    pytest.fail("no suitable effusion-positive / effusion-negative pair among 60 knee cases")


def test_real_knee_masks_align_across_planes(real_knees) -> None:
    for case in real_knees.values():
        folders = [f for f in _series_folders(case.case_dir)]
        # at 2 mm pixels and 4 mm slices, thin structures (menisci, cruciates) are voxelised
        # differently by each plane, so they get a wider tolerance than the patella
        for structure, tolerance in (("patella", 2.5), ("medial_meniscus", 4.0), ("lateral_meniscus", 4.0),
                                     ("acl", 4.0), ("pcl", 4.0)):
            centroids = np.array([_centroid_lps(_mask_for(case.case_dir, f), STRUCTURE_INDEX[structure]) for f in folders])
            spread = np.max(np.linalg.norm(centroids - centroids.mean(axis=0), axis=1))
            assert spread < tolerance, f"{case.spec.case_id} {structure}: centroids {spread:.1f} mm apart"


def test_real_knee_masks_share_dicom_geometry(real_knees) -> None:
    case = real_knees[1]
    for folder in _series_folders(case.case_dir):
        image, mask = _sitk_series(folder), sitk.ReadImage(str(_mask_for(case.case_dir, folder)))
        assert mask.GetSize() == image.GetSize()
        np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-5)


def test_real_knee_marrow_contrast(real_knees) -> None:
    for case in real_knees.values():
        sagittals = {s.plan.sequence: s for s in case.series if s.plan.plane == "sagittal"}
        assert "T1" in sagittals and len(sagittals) == 2
        medians = {}
        for sequence, series in sagittals.items():
            folder = case.case_dir / "dicom" / series.plan.folder_name
            pixels = _volume(folder)
            mask = _mask_volume(_mask_for(case.case_dir, folder))
            medians[sequence] = np.median(pixels[mask == STRUCTURE_INDEX["femur"]]) / np.percentile(pixels, 99.5)
        fat_sat = next(value for key, value in medians.items() if key != "T1")
        assert medians["T1"] > 0.45 and fat_sat < 0.25, medians


def test_real_knee_effusion_visible(real_knees) -> None:
    volumes = {}
    for effusion, case in real_knees.items():
        sagittal = next(s for s in case.series if s.plan.plane == "sagittal" and s.plan.role == "primary")
        volumes[effusion] = _bright_fluid_ml(case.case_dir, case.case_dir / "dicom" / sagittal.plan.folder_name)
    assert volumes[1] > 2.0 * volumes[0] + 5.0, volumes


def test_orthonode_phantom_command(tmp_path: Path) -> None:
    """The installed command line, end to end, with the real anatomical models."""
    from dicom_node.cli import main

    out = tmp_path / "ds"
    assert main(["phantom", "--joint", "ankle", "--cases", "1", "--out", str(out), "--seed", "2", "--matrix", "48"]) == 0
    with open(out / "cases.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["case_id"] == "ankle_0001" and rows[0]["joint"] == "ankle"
    folders = _series_folders(out / "ankle_0001")
    assert {"sagittal", "coronal", "axial"} <= {folder.name.split("_", 1)[1] for folder in folders}
    ds = pydicom.dcmread(folders[0] / "IMG0001.dcm")
    assert ds.pixel_array.shape == (48, 48) and ds.PatientID == "ankle_0001"
