"""Readers, subsets, splits and fingerprints of training data (training/datasets.py, training/data.py)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from inference.labels import label_keys
from training import datasets as D
from tests.training import fixtures as fx


# ------------------------------------------------------------------------------------ MRNet


def test_mrnet_read_labels_planes_shapes(tmp_path: Path) -> None:
    cases = fx.make_mrnet(tmp_path, "valid", n_cases=4, size=16, first_case=1130)
    records = D.read_source(f"mrnet:{tmp_path}:valid")
    assert [r.exam_id for r in records] == sorted(cases)
    for r in records:
        assert r.label_keys == ("abnormal", "acl", "meniscus")
        np.testing.assert_array_equal(r.labels, cases[r.exam_id]["labels"])
        assert set(r.planes) == {"sagittal", "coronal", "axial"}
        for plane, source in r.planes.items():
            volume = source.load()
            assert volume.dtype == np.float32
            assert volume.shape == cases[r.exam_id]["shapes"][plane]
            assert source.num_slices() == volume.shape[0]
            raw = np.load(tmp_path / "valid" / plane / f"{r.exam_id}.npy")
            np.testing.assert_array_equal(volume, raw.astype(np.float32))
        assert r.site == "mrnet" and r.source == "mrnet" and r.joint == "knee"


def test_mrnet_errors_name_the_problem(tmp_path: Path) -> None:
    fx.make_mrnet(tmp_path, "train", n_cases=2, size=8)
    with pytest.raises(D.DatasetError, match="give the split"):
        D.read_source(str(tmp_path))
    (tmp_path / "train" / "coronal" / "0001.npy").unlink()
    with pytest.raises(D.DatasetError, match="0001.npy does not exist"):
        D.read_mrnet(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        D.read_mrnet(tmp_path, "test")


# ------------------------------------------------------------------------------------ NIfTI


def test_nifti_folder_reoriented_to_slice_first(tmp_path: Path) -> None:
    cases = fx.make_nifti_folder(tmp_path, D.SLICE_FIRST_AXCODES)
    records = D.read_source(str(tmp_path))  # layout detected
    assert [r.exam_id for r in records] == ["n001", "n002", "n003"]
    for r in records:
        expected = cases[r.exam_id]
        assert set(r.planes) == set(expected["volumes"])
        for plane, source in r.planes.items():
            # stored with scrambled axis orders and flips; must come back as written
            np.testing.assert_allclose(source.load(), expected["volumes"][plane], rtol=1e-6)
            assert source.num_slices() == expected["volumes"][plane].shape[0]
        mask = r.planes["sagittal"].load_mask()
        truth = expected["masks"]["sagittal"].astype(np.int64)
        truth[truth == 255] = -1
        np.testing.assert_array_equal(mask, truth)
        assert r.planes["coronal"].load_mask() is None
        assert r.label_keys == label_keys("knee")
        np.testing.assert_array_equal(np.isnan(r.labels), np.isnan(expected["labels"]))
        np.testing.assert_array_equal(np.nan_to_num(r.labels), np.nan_to_num(expected["labels"]))
    assert records[1].ehr == {"age": None, "sex": "F", "height_m": 1.7, "weight_kg": None}
    assert "axial" not in records[2].planes


def test_nifti_manifest_errors(tmp_path: Path) -> None:
    fx.make_nifti_folder(tmp_path, D.SLICE_FIRST_AXCODES)
    text = (tmp_path / "cases.csv").read_text().replace("n002,knee", "n002,elbow")
    (tmp_path / "cases.csv").write_text(text)
    with pytest.raises(D.DatasetError, match="joint"):
        D.read_nifti_folder(tmp_path)


# ------------------------------------------------------------------------------------ phantom / DICOM


def test_phantom_layout_by_hand_selection_masks_ehr(tmp_path: Path) -> None:
    cases = fx.make_phantom_like_folder(tmp_path / "ph", n_cases=3)
    records = D.read_source(f"phantom:{tmp_path / 'ph'}")
    assert [r.exam_id for r in records] == sorted(cases)
    for r in records:
        expected = cases[r.exam_id]
        assert r.source == "phantom" and r.joint == "knee" and r.site == expected["row"]["site"]
        np.testing.assert_array_equal(r.labels, expected["labels"])
        for plane, written in expected["series"].items():
            source = r.planes[plane]
            assert source.kind == "dicom" and source.series_uid == written.series_uid
            np.testing.assert_array_equal(source.load(), written.volume)
            # masks are stored on the series grid (one case with a reversed slice axis)
            np.testing.assert_array_equal(source.load_mask(), expected["masks"][plane])
        assert any("chose" in line for line in r.selection_log)
    # the distractor T1 sagittal of case001 was considered and passed over
    assert any("T1 SAG" in line for line in records[1].selection_log)
    assert records[0].ehr == {"age": 40.0, "sex": "M", "height_m": 1.75, "weight_kg": None}
    assert records[2].ehr["age"] is None


@pytest.fixture(scope="module")
def generated_knee(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    from training.phantoms.generate import generate_dataset

    root = tmp_path_factory.mktemp("generated")
    specs = generate_dataset(root, "knee", 2, seed=4, matrix=64)
    return root, specs


def test_generated_phantoms_read_with_masks_on_the_series_grid(generated_knee) -> None:
    import SimpleITK as sitk

    from inference.series import load_series

    root, specs = generated_knee
    records = D.read_source(str(root))  # layout detected as phantom
    assert [r.exam_id for r in records] == [s.case_id for s in specs]
    for record, spec in zip(records, specs):
        assert record.source == "phantom" and record.site == spec.site and record.laterality == spec.laterality
        np.testing.assert_array_equal(record.labels, [spec.labels[k] for k in label_keys("knee")])
        assert record.ehr["sex"] == spec.sex
        assert set(record.planes) == {"sagittal", "coronal", "axial"}
        for plane, source in record.planes.items():
            assert source.series.plane == plane
            volume = source.load()
            mask = source.load_mask()
            assert mask.shape == volume.shape and set(np.unique(mask)) <= set(range(12))
            # independent path: SimpleITK resamples the NIfTI onto the DICOM series grid
            reference = load_series(source.series).to_sitk()
            resampled = sitk.Resample(sitk.ReadImage(str(source.mask_path)), reference, sitk.Transform(),
                                      sitk.sitkNearestNeighbor, 0)
            agree = (sitk.GetArrayFromImage(resampled) == mask).mean()
            assert agree > 0.999, f"{record.exam_id} {plane}: mask agrees with SimpleITK on {agree:.4f} of voxels"
        assert (record.planes["sagittal"].load_mask() > 0).any()


def test_phantom_scan_by_a_process_pool_equals_the_serial_scan(generated_knee) -> None:
    root, _ = generated_knee
    serial = D.read_phantom_folder(root, workers=1)
    pooled = D.read_phantom_folder(root, workers=2)
    assert [r.exam_id for r in pooled] == [r.exam_id for r in serial]
    for a, b in zip(serial, pooled):
        assert set(a.planes) == set(b.planes)
        for plane in a.planes:
            assert a.planes[plane].series == b.planes[plane].series
            assert a.planes[plane].mask_path == b.planes[plane].mask_path
        assert a.selection_log == b.selection_log


def test_phantom_mask_on_another_grid_is_an_error(tmp_path: Path) -> None:
    cases = fx.make_phantom_like_folder(tmp_path, n_cases=1)
    written = cases["case000"]["series"]["sagittal"]
    shifted = fx.Geometry(orientation=written.geometry.orientation, origin=(0.0, 0.0, 0.0),
                          pixel_spacing=written.geometry.pixel_spacing, slice_spacing=written.geometry.slice_spacing)
    fx.write_mask_for_series(tmp_path / "case000" / "masks" / f"{written.series_uid}.nii.gz",
                             cases["case000"]["masks"]["sagittal"], shifted)
    record = D.read_phantom_folder(tmp_path)[0]
    with pytest.raises(D.DatasetError, match="shifted"):
        record.planes["sagittal"].load_mask()


def _write_labels(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def test_dicom_folder_with_labels_csv_keys(tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    root = tmp_path / "studies"
    uids = [generate_uid() for _ in range(3)]
    fx.write_study(root / "exam_a", seed=1, study_uid=uids[0], patient_id="P1", accession="ACC-A", distractor=True)
    fx.write_study(root / "exam_b", seed=2, study_uid=uids[1], patient_id="P1", accession="ACC-B")
    fx.write_study(root / "exam_c", seed=3, study_uid=uids[2], patient_id="P2", accession="ACC-C",
                   planes=("sagittal", "coronal"))
    # keyed by folder name, with labels and partial EHR
    _write_labels(tmp_path / "by_case.csv", ["case_id", "site", "age", "acl", "meniscus"],
                  [["exam_a", "s1", "33", "1", "0"], ["exam_b", "s2", "", "0", ""]])
    records = D.read_source(f"dicom:{root}:{tmp_path / 'by_case.csv'}")
    by_id = {r.exam_id: r for r in records}
    assert set(by_id) == {"exam_a", "exam_b", "exam_c"}
    assert by_id["exam_a"].label_keys == ("acl", "meniscus")
    np.testing.assert_array_equal(by_id["exam_a"].labels, [1, 0])
    assert math.isnan(by_id["exam_b"].labels[1])
    assert by_id["exam_c"].labels is None  # no row: unlabeled, kept for pretraining
    assert by_id["exam_a"].patient_id == by_id["exam_b"].patient_id == "P1"  # from the header
    assert by_id["exam_a"].ehr["age"] == 33.0 and by_id["exam_a"].ehr["sex"] == "O"  # CSV, then header
    assert set(by_id["exam_c"].planes) == {"sagittal", "coronal"}
    assert any("no axial series" in line for line in by_id["exam_c"].selection_log)
    unlabeled = D.read_source(f"dicom:{root}")
    assert sorted(r.exam_id for r in unlabeled) == ["exam_a", "exam_b", "exam_c"]
    assert all(r.labels is None for r in unlabeled)
    # the same studies keyed by StudyInstanceUID and by accession number
    _write_labels(tmp_path / "by_uid.csv", ["study_instance_uid", "acl"], [[uids[1], "1"]])
    by_uid = {r.exam_id: r for r in D.read_dicom_folder(root, tmp_path / "by_uid.csv")}
    np.testing.assert_array_equal(by_uid[uids[1]].labels, [1])
    _write_labels(tmp_path / "by_acc.csv", ["accession", "acl"], [["ACC-C", "0"]])
    by_acc = {r.exam_id: r for r in D.read_dicom_folder(root, tmp_path / "by_acc.csv")}
    np.testing.assert_array_equal(by_acc["ACC-C"].labels, [0])
    # a CSV that matches nothing, or has no key column, is an error that names it
    _write_labels(tmp_path / "none.csv", ["case_id", "acl"], [["exam_z", "1"]])
    with pytest.raises(D.DatasetError, match="matches a study"):
        D.read_dicom_folder(root, tmp_path / "none.csv")
    _write_labels(tmp_path / "nokey.csv", ["name", "acl"], [["exam_a", "1"]])
    with pytest.raises(D.DatasetError, match="key column"):
        D.read_dicom_folder(root, tmp_path / "nokey.csv")
    _write_labels(tmp_path / "bad.csv", ["case_id", "acl"], [["exam_a", "yes"]])
    with pytest.raises(D.DatasetError, match="bad.csv line 2: column 'acl'"):
        D.read_dicom_folder(root, tmp_path / "bad.csv")


def test_read_source_rejects_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(D.DatasetError, match="cannot tell the layout"):
        D.read_source(str(tmp_path / "x"))
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.read_source(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------ subsets


def _synthetic_records(n: int, seed: int, keys=("a", "b", "c", "rare")) -> list[D.ExamRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        labels = (rng.random(len(keys)) < [0.5, 0.3, 0.2, 0.0]).astype(np.float32)
        records.append(D.ExamRecord(exam_id=f"e{i:03d}", patient_id=f"p{i // 2:03d}", site=("x", "y", "z")[i % 3],
                                    joint="knee", label_keys=keys, labels=labels))
    for i in (7, 55):  # two positives of the rare label
        records[i].labels[3] = 1.0
    return records


def test_stratified_subset_seeded_sized_keeps_positives() -> None:
    records = _synthetic_records(100, seed=0)
    a = D.stratified_subset(records, 0.1, seed=5)
    b = D.stratified_subset(records, 0.1, seed=5)
    c = D.stratified_subset(records, 0.1, seed=6)
    assert [r.exam_id for r in a] == [r.exam_id for r in b]
    assert [r.exam_id for r in a] != [r.exam_id for r in c]
    assert len(a) == 10 and len({r.exam_id for r in a}) == 10
    for subset in (a, c):
        y = np.stack([r.labels for r in subset])
        assert (y.sum(axis=0) >= 1).all(), "every label keeps a positive"
    # proportional: the label prevalences of the subset follow the pool
    for fraction in (0.3, 0.5):
        sub = D.stratified_subset(records, fraction, seed=1)
        y_all = np.stack([r.labels for r in records]).mean(axis=0)
        y_sub = np.stack([r.labels for r in sub]).mean(axis=0)
        assert np.abs(y_all[:3] - y_sub[:3]).max() < 0.12
    assert D.stratified_subset(records, 1.0, seed=0) == records
    with pytest.raises(ValueError, match="fraction"):
        D.stratified_subset(records, 0.0, seed=0)


def test_splits_by_site_and_patient() -> None:
    records = _synthetic_records(60, seed=2)
    train, test = D.split_by_site(records, "z")
    assert {r.site for r in test} == {"z"} and "z" not in {r.site for r in train}
    assert len(train) + len(test) == 60
    with pytest.raises(ValueError, match="sites are"):
        D.split_by_site(records, "nowhere")
    train, val = D.train_val_split(records, 0.25, seed=0)
    assert {r.patient_id for r in train}.isdisjoint({r.patient_id for r in val})
    assert len({r.patient_id for r in val}) == round(0.25 * 30)
    again, _ = D.train_val_split(records, 0.25, seed=0)
    assert [r.exam_id for r in again] == [r.exam_id for r in train]


def test_fingerprint_tracks_ids_labels_and_files(tmp_path: Path) -> None:
    fx.make_mrnet(tmp_path, "train", n_cases=3, size=8)
    records = D.read_mrnet(tmp_path, "train")
    first = D.fingerprint(records)
    assert first == D.fingerprint(list(reversed(records)))  # order does not matter
    records[0].labels[1] = 1.0 - records[0].labels[1]
    assert D.fingerprint(records) != first
    records = D.read_mrnet(tmp_path, "train")
    np.save(tmp_path / "train" / "axial" / "0000.npy", np.zeros((3, 8, 8), np.uint8))  # content changed size
    assert D.fingerprint(records) != first
    assert D.fingerprint(records[1:]) != D.fingerprint(records)


# ------------------------------------------------------------------------------------ MONAI datasets


def test_classification_dataset_items_and_exclusions(tmp_path: Path) -> None:
    import torch

    from inference.preprocess import PreprocessConfig, preprocess_volume
    from training.data import classification_dataset

    cases = fx.make_nifti_folder(tmp_path / "n", D.SLICE_FIRST_AXCODES)
    records = D.read_nifti_folder(tmp_path / "n")
    cfg = PreprocessConfig(depth=4, size=(8, 8))
    ds = classification_dataset(records, ("sagittal", "coronal", "axial"), cfg, cache="memory")
    assert len(ds) == 2 and ds.excluded == [("n003", "missing plane(s) ['axial']")]
    item = ds[1]
    assert item["exam_id"] == "n002" and item["site"] == "site1"
    for plane in ("sagittal", "coronal", "axial"):
        assert item[plane].shape == (1, 4, 8, 8) and item[plane].dtype == torch.float32
        expected = preprocess_volume(cases["n002"]["volumes"][plane], cfg)  # the node's own path
        np.testing.assert_allclose(item[plane].numpy(), expected)
    assert item["labels"].shape == (8,) and not torch.isnan(item["labels"]).any()
    np.testing.assert_array_equal(item["label_mask"].numpy(), ~np.isnan(cases["n002"]["labels"]))
    assert item["ehr"].shape == (5,) and item["ehr_mask"].tolist() == [0, 1, 0, 1, 1]  # age and weight missing
    # disk cache: a second dataset over the same records reads the cache, a new config does not
    cached = classification_dataset(records, ("sagittal",), cfg, cache_dir=tmp_path / "cache", cache="disk")
    np.testing.assert_allclose(cached[0]["sagittal"].numpy(), ds[0]["sagittal"].numpy())
    n_files = len(list((tmp_path / "cache").iterdir()))
    assert n_files == 1
    other = classification_dataset(records, ("sagittal",), PreprocessConfig(depth=2, size=(8, 8)),
                                   cache_dir=tmp_path / "cache", cache="disk")
    assert other[0]["sagittal"].shape == (1, 2, 8, 8)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    with pytest.raises(ValueError, match="planes"):
        classification_dataset(records, ("oblique",), cfg)
    # batches through MONAI's DataLoader (what the training loops use)
    from monai.data import DataLoader

    batch = next(iter(DataLoader(ds, batch_size=2, shuffle=False, num_workers=0)))
    assert batch["sagittal"].shape == (2, 1, 4, 8, 8) and batch["labels"].shape == (2, 8)
    assert list(batch["exam_id"]) == ["n001", "n002"]


def test_segmentation_dataset_windows_and_unannotated(tmp_path: Path) -> None:
    from inference.preprocess import PreprocessConfig, slice_windows
    from training.data import pretrain_dataset, segmentation_dataset

    cases = fx.make_nifti_folder(tmp_path / "n", D.SLICE_FIRST_AXCODES)
    records = D.read_nifti_folder(tmp_path / "n")
    cfg = PreprocessConfig(depth=4, size=(12, 14))  # source in-plane size: masks keep their values
    central = segmentation_dataset(records, "sagittal", cfg, windows="central", cache=None)
    assert len(central) == 3
    item = central[0]
    assert item["image"].shape == (1, 4, 12, 14) and item["mask"].shape == (4, 12, 14)
    truth = cases["n001"]["masks"]["sagittal"].astype(np.int64)
    truth[truth == 255] = -1
    np.testing.assert_array_equal(item["mask"].numpy(), truth[2:6])  # central 4 of 9 slices
    windows = segmentation_dataset(records, "sagittal", cfg, windows="all", cache=None)
    assert len(windows) == 3 * len(slice_windows(9, 4))
    first = windows[0]
    assert (first["mask"][0] == -1).all() and (first["mask"][1:] >= 0).all()  # slice 0 not annotated
    with pytest.raises(ValueError, match="no exam has a coronal series with a mask"):
        segmentation_dataset(records, "coronal", cfg, cache=None)
    pre = pretrain_dataset(records, "axial", cfg, cache=None)
    assert len(pre) == 2 and pre.excluded == [("n003", "no axial series")]
    assert set(pre[0]) == {"image", "exam_id", "site"} and pre[0]["image"].shape == (1, 4, 12, 14)
