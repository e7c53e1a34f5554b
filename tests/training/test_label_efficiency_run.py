"""The label-efficiency benchmark: cell bookkeeping, budgets, the bootstrap, and the smoke scale end to end."""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from benchmarks.label_efficiency.run import (
    REPO,
    SCALES,
    STEP_SECONDS,
    Cell,
    _parse_part,
    all_cells,
    auc_resampled,
    estimate,
    hold_records,
    main,
    share_of_cells,
)


def test_workers_share_every_cell_exactly_once_and_the_longest_cells_are_spread() -> None:
    scale = SCALES["gpu"]
    cells = all_cells([0, 1])
    # per seed: knee classifier and segmenter x (pretrained, scratch, baseline) x (10 %, 100 %) + 2 transfers x 2
    assert len({c.name for c in cells}) == len(cells) == 32
    for parts in (1, 2, 5, 6):
        shares = [share_of_cells(cells, scale, k, parts) for k in range(parts)]
        names = [c.name for share in shares for c in share]
        assert sorted(names) == sorted(c.name for c in cells)  # every cell once, none twice
        loads = [sum(c.cost(scale) for c in share) for share in shares]
        # longest-first to the least loaded worker: no worker carries more than the average plus
        # the longest single cell
        assert max(loads) <= sum(loads) / parts + max(c.cost(scale) for c in cells)
    heaviest = sorted(cells, key=lambda c: (-c.cost(scale), c.name))[:2]
    first = share_of_cells(cells, scale, 0, 2)
    assert (heaviest[0] in first) != (heaviest[1] in first)  # the two heaviest go to different workers


def test_cells_name_their_variant_and_baselines() -> None:
    cells = all_cells([0], classifier_baseline="monai_resnet18", segmenter_baseline="monai_segresnet")
    inits = {(c.task, c.init) for c in cells if c.joint == "knee"}
    assert inits == {("classify", i) for i in ("pretrained", "scratch", "monai_resnet18")} | {
        ("segment", i) for i in ("pretrained", "scratch", "monai_segresnet")}
    transfer = {(c.joint, c.init, c.fraction) for c in cells if c.joint != "knee"}
    assert transfer == {(j, i, 0.1) for j in ("ankle", "shoulder") for i in ("pretrained", "scratch")}
    assert Cell("classify", "knee", "scratch", 0.1, 3).name == "knee_classify_scratch_10pct_seed3"
    assert Cell("segment", "knee", "monai_unet", 1.0, 0).variant == "knee_segment_monai_unet_100pct"
    assert Cell("segment", "knee", "monai_unet", 1.0, 0).baseline
    assert Cell("classify", "knee", "scratch", 0.1, 3).tests == ["knee_test", "knee_held_out"]
    assert Cell("classify", "ankle", "scratch", 0.1, 3).tests == ["ankle_test"]


def test_cells_trained_with_other_steps_or_features_have_their_own_names() -> None:
    plain = all_cells([0])
    tagged = all_cells([0], {"segment": "_steps40"})
    assert [c.name for c in plain if c.task == "classify"] == [c.name for c in tagged if c.task == "classify"]
    seg = [c.name for c in tagged if c.task == "segment"]
    assert seg and all(name.endswith("_steps40") for name in seg)


@pytest.mark.parametrize("text", ["3", "2/2", "-1/4", "a/b"])
def test_cells_option_must_be_k_of_n(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--cells"):
        _parse_part(text)
    assert _parse_part("1/4") == (1, 4)


def test_baselines_get_the_methods_wall_clock_budget_in_steps() -> None:
    cpu = SCALES["cpu"]
    table = STEP_SECONDS[cpu.config]
    for task, joint, base in (("classify", "knee", cpu.classify_steps), ("segment", "knee", cpu.segment_steps)):
        assert cpu.steps(task, joint, "pretrained") == cpu.steps(task, joint, "scratch") == base
    resnet = cpu.steps("classify", "knee", "monai_resnet18")
    unet = cpu.steps("segment", "knee", "monai_unet")
    # the same seconds (within one step) as the method's cell
    assert abs(resnet * table["classify"]["monai_resnet18"] - cpu.classify_steps * table["classify"]["diffusion_unet"]) \
        <= table["classify"]["monai_resnet18"]
    assert abs(unet * table["segment"]["monai_unet"] - cpu.segment_steps * table["segment"]["diffusion_unet"]) \
        <= table["segment"]["monai_unet"]
    assert SCALES["smoke"].steps("segment", "knee", "monai_unet") == SCALES["smoke"].segment_steps  # budget "steps"


def test_the_cpu_scale_is_planned_within_an_hour_and_reads_with_200_exam_test_sets() -> None:
    cpu = SCALES["cpu"]
    assert min(cpu.knee_test, cpu.held_out, cpu.transfer_test) >= 200
    minutes = estimate(cpu, all_cells([0, 1, 2]), cores=2, jobs=cpu.jobs)
    assert minutes["total"] <= 60, minutes
    gpu = SCALES["gpu"]
    assert min(gpu.knee_test, gpu.held_out, gpu.transfer_test) >= 200
    assert SCALES["h200"] is gpu  # the name device_run.sh used


def test_resampled_auc_is_scikit_learns_with_ties_and_unknown_truths() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = (rng.random(60) < 0.3).astype(float)
    p = np.round(rng.random(60), 1)  # many ties
    y[[4, 9]] = np.nan
    idx = rng.integers(0, 60, (5, 60))
    got = auc_resampled(y, p, idx)
    for b in range(5):
        ys, ps = y[idx[b]], p[idx[b]]
        keep = ~np.isnan(ys)
        assert got[b] == pytest.approx(roc_auc_score(ys[keep], ps[keep]))
    assert np.isnan(auc_resampled(np.zeros(5), np.arange(5.0), np.arange(5)[None]))[0]  # one class: undefined


def test_visibility_reports_the_plain_auc_of_one_statistic() -> None:
    from benchmarks.label_efficiency import visibility

    # a finding that lowers the statistic scores below 0.5: it is not folded into 1 - AUC
    assert visibility.auc(np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.1, 0.2])) == 0.0
    assert visibility.auc(np.array([1, 1]), np.array([0.1, 0.2])) is None
    assert visibility.DEFAULT_STATISTIC in visibility.STATS


@pytest.mark.slow
def test_smoke_scale_end_to_end_runs_every_variant_and_reports_the_baselines(tmp_path: Path) -> None:
    """The smoke scale end to end: knee and ankle, one seed (about a minute on two shared cores).

    One test, so that parallel test workers never run the benchmark twice."""
    work = tmp_path / "le_smoke"
    results_dir = REPO / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results_dir.iterdir()}
    rc = main(["--scale", "smoke", "--work", str(work), "--seeds", "0", "--joints", "knee,ankle", "--workers", "2",
               "--threads", "1", "--no-progress"])
    assert rc == 0
    assert {p.name: p.stat().st_mtime_ns for p in results_dir.iterdir()} == before  # smoke never writes results/

    results = json.loads((work / "results.json").read_text())
    assert not results["missing_cells"]
    names = {r["name"] for r in results["rows"]}
    assert names == {c.name for c in all_cells([0]) if c.joint in ("knee", "ankle")}
    networks = {(r["task"], r["init"]): r["network"] for r in results["rows"]}
    assert networks[("classify", "monai_resnet18")] == "monai_resnet18"
    assert networks[("segment", "monai_unet")] == "monai_unet"
    assert networks[("classify", "pretrained")] == networks[("classify", "scratch")] == "diffusion_unet"
    for row in results["rows"]:
        for test in row["tests"]:
            assert (work / "runs" / row["name"] / f"eval_{test}" / "metrics.json").is_file()
    variants = {(v["variant"], v["test"]) for v in results["summary"]["variants"]}
    assert ("knee_classify_monai_resnet18_10pct", "knee_held_out") in variants
    assert ("ankle_classify_pretrained_10pct", "ankle_test") in variants
    comparisons = {(c["task"], c["a"], c["b"], c["label_fraction"], c["test"]) for c in results["summary"]["comparisons"]}
    assert ("classify", "pretrained", "monai_resnet18", 0.1, "knee_held_out") in comparisons
    assert ("segment", "pretrained", "scratch", 1.0, "knee_test") in comparisons

    report = (work / "report.md").read_text()
    for text in ("MONAI ResNet-18 (supervised)", "MONAI UNet (supervised)", "OrthoDiffusion, pretrained",
                 "same architecture, scratch", "Synthetic", "## Commands", "## Machine and time", "held-out",
                 "pretrained − monai_resnet18", "Dice per structure", "AUC per label", "Transfer"):
        assert text in report, text
    assert "python benchmarks/label_efficiency/run.py --scale smoke" in report
    assert "--from-scratch --label-fraction 0.1 --seed 0 --config" in report

    # the test sets held in memory give exactly the readers' arrays
    records = pickle.loads((work / "records" / "knee_test.pkl").read_bytes())
    held = hold_records(records, pickle.loads((work / "arrays" / "knee_test.pkl").read_bytes()))
    for original, copy in zip(records, held):
        assert copy.exam_id == original.exam_id
        for plane, source in original.planes.items():
            volume = copy.planes[plane].load()
            assert volume.dtype == np.float32
            np.testing.assert_array_equal(volume, source.load())
            if source.mask_path is not None:
                np.testing.assert_array_equal(copy.planes[plane].load_mask(), source.load_mask())
            assert copy.planes[plane].series_uid == source.series_uid
