"""The label-efficiency feature probe, end to end on a tiny generated WORK, and its probe on a planted signal."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.label_efficiency import probe as P  # noqa: E402
from inference.labels import label_keys  # noqa: E402


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run.py-shaped WORK: smoke configuration, 4 + 2 + 2 knee phantoms, checkpoints of steps 1 and 2 per plane."""
    from benchmarks.label_efficiency.run import SCALES, effective_config
    from training.cli import read_records
    from training.config import load_config
    from training.data import pretrain_dataset
    from training.demo import HELD_OUT_SITE, make_phantom_set, training_sites
    from training.distributed import DistContext
    from training.pretrain import cache_kwargs, preprocess_config, pretrain

    work = tmp_path_factory.mktemp("le_work")
    cfg = load_config(effective_config(SCALES["smoke"], work))
    sites = training_sites()
    ph = work / "phantoms"
    make_phantom_set(ph / "knee_pool", "knee", range(0, 4), sites, 0, 32)
    make_phantom_set(ph / "knee_test", "knee", range(4, 6), sites, 0, 32)
    make_phantom_set(ph / "knee_held_out", "knee", range(6, 8), [HELD_OUT_SITE], 0, 32)
    records = read_records([f"phantom:{ph / 'knee_pool'}"])
    short = cfg.with_overrides(pretrain={"steps": 2, "checkpoint_every": 1, "batch_size": 2})
    for plane in P.PLANES:
        ds = pretrain_dataset(records, plane, preprocess_config(cfg), **cache_kwargs(cfg, None))
        pretrain(short, ds, plane, work / "pretrain" / plane, ctx=DistContext(), progress=False)
    return work


def _check_auc(value: float | None) -> None:
    assert value is None or (0.0 <= value <= 1.0 and not math.isnan(value))


def test_probe_end_to_end(tiny_work: Path, tmp_path: Path) -> None:
    report = tmp_path / "probe.md"
    out = tmp_path / "probe.json"
    rc = P.main(["--work", str(tiny_work), "--timesteps", "200", "--blocks", "up_0", "--fractions", "0.5,1.0",
                 "--jobs", "1", "--report", str(report), "--json", str(out), "--raw-grid", "2x4x4"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["status"] == "complete"
    # raw + (2 checkpoints + random init) x one (t, block)
    assert res["planned_extractions"] == 1 + 3 == len(res["extractions"])
    assert res["label_keys"] == list(label_keys("knee"))
    assert res["sets"]["knee_pool"]["n"] == 4 and res["subsets"]["0.5"]["n"] == 2
    sources = {(r["source"], r["step"]) for r in res["rows"]}
    assert sources == {("raw", None), ("pretrained", 1), ("pretrained", 2), ("random", None)}
    groups = {r["features"] for r in res["rows"]}
    assert groups == {"fused", *P.PLANES}
    raw = [r for r in res["rows"] if r["source"] == "raw" and r["features"] == "fused"]
    assert {r["dim"] for r in raw} == {3 * 2 * 4 * 4}
    gap_std = [r for r in res["rows"] if r["pooling"] == "gap_std"]
    assert gap_std and {r["features"] for r in gap_std} == {"fused"}  # per plane for the first pooling only
    for r in res["rows"]:
        assert set(r["per_label"]) == set(res["label_keys"])
        for test in P.TEST_SETS:
            assert set(r[test]["auc"]) == set(res["label_keys"])
            for value in r[test]["auc"].values():
                _check_auc(value)
            _check_auc(r[test]["macro_auc"])
            assert r[test]["n_labels"] == sum(v is not None for v in r[test]["auc"].values())
    # some label has both classes in the 4-exam pool, so some probe is really fitted with a C of the grid
    assert any(info["C"] in P.C_GRID for r in res["rows"] if r["fraction"] == 1.0 for info in r["per_label"].values())
    text = report.read_text()
    assert "| raw input |" in text and "random init" in text and "pretrained, step 2" in text
    assert res["command"] in text


def test_time_budget_still_writes(tiny_work: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    report = tmp_path / "probe.md"
    rc = P.main(["--work", str(tiny_work), "--checkpoints", "last", "--time-budget", "0", "--jobs", "1",
                 "--report", str(report), "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["status"].startswith("stopped by --time-budget") and res["extractions"] == []
    assert res["planned_extractions"] == 1 + 2 * 6 * 6  # last checkpoint + random init, default grid
    assert "stopped by --time-budget" in report.read_text()


def test_bad_arguments_name_the_option(tiny_work: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="block 'down_9'"):
        P.main(["--work", str(tiny_work), "--blocks", "down_9", "--json", str(tmp_path / "j"),
                "--report", str(tmp_path / "r")])
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        P.main(["--work", str(tmp_path), "--json", str(tmp_path / "j"), "--report", str(tmp_path / "r")])


def _planted_set(name: str, n: int, seed: int) -> P.ExamSet:
    """Volumes of noise; label 0 is a bright block in one quadrant of the sagittal volume, label 1 pure chance."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 2), dtype=np.float32)
    labels[:, 0] = np.arange(n) % 2
    labels[:, 1] = rng.random(n) < 0.5
    volumes = {p: rng.normal(size=(n, 1, 8, 32, 32)).astype(np.float32) for p in P.PLANES}
    volumes["sagittal"][labels[:, 0] == 1, :, :, :16, :16] += 1.0
    return P.ExamSet(name, [f"{name}_{i}" for i in range(n)], volumes, labels, np.ones_like(labels), ("lesion", "chance"))


def test_raw_probe_finds_a_planted_signal() -> None:
    train, test = _planted_set("train", 24, 1), _planted_set("test", 20, 2)
    x = {s.name: np.concatenate([P.raw_features(s.volumes[p], (1, 2, 2)) for p in P.PLANES], axis=1)
         for s in (train, test)}
    rows = np.arange(len(train))
    out = P.probe(x["train"], train, rows, {"test": (test, x["test"])}, seed=0)
    assert out["test"]["auc"]["lesion"] > 0.95
    assert out["per_label"]["lesion"]["C"] in P.C_GRID
    assert out["test"]["auc"]["chance"] < 0.9  # no planted signal: the probe does not invent one
    assert out["test"]["n_labels"] == 2
    # a label with one class in the training rows is not fitted and scores nothing
    only_neg = rows[train.labels[:, 0] == 0]
    out = P.probe(x["train"][only_neg], train, only_neg, {"test": (test, x["test"])}, seed=0)
    assert out["test"]["auc"]["lesion"] is None and "no positive" in out["per_label"]["lesion"]["note"]
