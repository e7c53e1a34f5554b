"""The same SEG job two ways: ``orthonode predict`` against a MONAI Deploy App SDK application.

Install (benchmark only; nothing in the test suite needs the SDK)::

    python3 -m venv /tmp/venv-md
    /tmp/venv-md/bin/pip install torch==2.13.0          # the CPU build first, as in the Makefile
    /tmp/venv-md/bin/pip install -e '.[dev,monai-deploy]'

Run (repository root; ``ulimit -s`` only silences Holoscan's stack-size warning)::

    ulimit -s 32768; /tmp/venv-md/bin/python benchmarks/monai_deploy.py --studies 5 --threads 2 \\
        --out benchmarks/results/monai_deploy.md

What runs, in one process:

- ``--studies`` phantom knee studies (``training.phantoms.generate.generate_dataset``, matrix
  ``--matrix``, seed ``--seed``) and one model: ``--model PATH`` or, by default, a ``--preset``
  bundle with seeded random weights saved as a checkpoint (timings do not depend on what the
  weights learned).  The checkpoint is loaded once per side; load times are reported apart.
- **orthonode, SEG only**: :func:`inference.pipeline.run_study` (what ``orthonode predict``
  calls) with the same segmenter in a bundle without classifier, SEG of the segmented
  (sagittal) series only: scan, select, load, segment, write SEG.  Per-stage seconds are
  ``StudyResult.timings``.
- **MONAI Deploy app**: ``DICOMDataLoaderOperator`` -> ``DICOMSeriesSelectorOperator`` (rules
  for the sagittal series built from the node's own default preferences) ->
  ``DICOMSeriesToVolumeOperator`` -> an operator that calls ``ModelBundle.segment`` (the
  project's preprocessing, sliding windows and network, so the content is the same) ->
  ``DICOMSegmentationWriterOperator`` with the 11 knee structures of
  ``sr_templates/structures.yaml``.  Each operator's ``compute`` is timed; the rest of the
  wall time (building the application, Holoscan's graph set-up and scheduling) is reported as
  framework time.  One application is built and run per study, as the SDK runs an app per input.
- **orthonode, full predict**: ``run_study`` with the whole bundle (three-plane classifier,
  SEG on every plane, SR), as ``orthonode predict`` runs it.
- Per study the order is SEG only, SDK app, full predict (interleaved, so drift of a shared
  machine touches both sides); one warm-up round on the first study comes first and is
  reported apart.  Torch runs at ``--threads`` on both sides (set again inside the SDK
  operator, which Holoscan calls from its own thread).  At the end one cold
  ``orthonode predict`` process runs on the first study, as a user would start it.
- Content: both SEGs are read with highdicom and compared segment by segment (Dice), on the
  instances of the source series they reference.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

#: table rows: (label, orthonode StudyResult.timings keys, SDK operator stage)
STAGES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("read/load", ("scan",), "load"),
    ("select", ("select",), "select"),
    ("to volume", ("load",), "to_volume"),
    ("preprocess+network", ("preprocess", "model"), "segment"),
    ("write SEG", ("write",), "write"),
)

#: seconds per SDK operator of the application being run (reset for every run)
SDK_CLOCK: dict[str, float] = {}


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("monai-deploy-app-sdk", "holoscan-cu13", "monai", "highdicom", "pydicom", "torch", "numpy",
                 "SimpleITK", "orthonode"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def thread_check(threads: int) -> dict[str, str]:
    """One fixed torch workload (3D convolutions and group norms) in the main thread and in a second
    thread at ``threads`` torch threads: wall milliseconds and CPU over wall.  The SDK operator runs
    in Holoscan's scheduler thread, orthonode in the main thread; this shows whether torch uses the
    same number of cores in both."""
    import threading

    import torch

    conv = torch.nn.Conv3d(16, 16, 3, padding=1)
    norm = torch.nn.GroupNorm(4, 16)
    x = torch.randn(1, 16, 16, 64, 64)
    results: dict[str, str] = {}

    def work(where: str) -> None:
        torch.set_num_threads(threads)
        with torch.no_grad():
            norm(conv(x))  # warm
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(5):
                norm(conv(x))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        results[where] = f"{wall / 5 * 1000:.0f} ms, CPU/wall {cpu / wall:.2f}"

    work("main thread")
    worker = threading.Thread(target=work, args=("second thread",))
    worker.start()
    worker.join()
    return results


# --------------------------------------------------------------------------- model


def seeded_bundle_file(preset: str, seed: int, path: Path) -> Path:
    """A knee bundle of ``preset`` with seeded random weights, saved where the project loads it."""
    from benchmarks.predict import build_bundle

    build_bundle(preset, seed).save(path)
    return path


def segmenter_only(bundle: Any) -> Any:
    """The same segmenter (the same module, so the same weights) in a bundle without classifier,
    whose card names the segmented plane only: ``run_study`` then reads, segments and writes the
    SEG of that plane and nothing else."""
    from inference.checkpoint import ModelBundle, ModelCard

    plane = bundle.card.segmenter_plane() or "sagittal"
    card = ModelCard.from_dict({**bundle.card.to_dict(), "planes": [plane], "segmentation_plane": plane})
    return ModelBundle(card, None, bundle.segmenter)


def instrument(bundle: Any) -> list[tuple[float, float]]:
    """Record (wall, process CPU) seconds of every ``bundle.segment`` call; the list is returned.

    CPU over wall shows how many cores the segmenter really used: on the SDK side it runs in
    Holoscan's scheduler thread, on orthonode's in the main thread."""
    calls: list[tuple[float, float]] = []
    segment = bundle.segment

    def timed_segment(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return segment(*args, **kwargs)
        finally:
            calls.append((time.perf_counter() - wall, time.process_time() - cpu))

    bundle.segment = timed_segment
    return calls


# --------------------------------------------------------------------------- the SDK application


def sagittal_rules() -> str:
    """Selection rules for the SDK selector: the node's default sagittal preferences, in order.

    The SDK takes the first series that matches a selection, and the volume and SEG writer
    operators use the first selection that matched; so one selection per preferred pattern
    (fat-suppressed PD, then T2, STIR, DESS, PD, T2, T1, then any sagittal), each excluding the
    node's ``avoid`` patterns (localizers, reformats, ...) with a negative look-ahead.  The plane
    is the SDK's own orientation test (dominant axis of the slice normal).
    """
    from inference.selection import DEFAULT_RULES

    rule = DEFAULT_RULES.sagittal
    avoid = "|".join(f"(?:{p})" for p in rule.avoid)
    patterns = [*rule.prefer, ".*"]
    selections = []
    for i, pattern in enumerate(patterns):
        selections.append({
            "name": f"sagittal-{i + 1}",
            "conditions": {
                "Modality": "(?i)^MR$",
                "ImageOrientationPatient": "Sagittal",
                "SeriesDescription": f"^(?!.*(?:{avoid})).*(?:{pattern})",
            },
        })
    return json.dumps({"selections": selections})


def segment_descriptions(card: Any) -> list[Any]:
    """The SDK's segment descriptions of the card's structures, from sr_templates/structures.yaml:
    label, category, type and anatomic region as the node writes them (the SDK's description has
    no type modifier and no colour: see the notes of the results)."""
    from monai.deploy.operators.dicom_seg_writer_operator import SegmentDescription

    from sr_templates import load_structures

    templates = {t.key: t for t in load_structures()}
    descriptions = []
    for key in card.structures:
        tpl = templates[key]
        descriptions.append(SegmentDescription(
            segment_label=tpl.label,
            segmented_property_category=tpl.category.code(),
            segmented_property_type=tpl.type.code(),
            algorithm_name=card.name,
            algorithm_version=card.version,
            tracking_id=key,
            anatomic_regions=[tpl.anatomic_region.code()] if tpl.anatomic_region else None,
        ))
    return descriptions


def _timed(base: type, stage: str) -> type:
    """``base`` whose ``compute`` adds its seconds to ``SDK_CLOCK[stage]``."""

    def compute(self: Any, op_input: Any, op_output: Any, context: Any) -> None:
        started = time.perf_counter()
        try:
            base.compute(self, op_input, op_output, context)
        finally:
            SDK_CLOCK[stage] = SDK_CLOCK.get(stage, 0.0) + time.perf_counter() - started

    return type(f"Timed{base.__name__}", (base,), {"compute": compute})


def build_sdk_app(study: Path, out: Path, bundle: Any, threads: int, descriptions: list[Any]) -> Any:
    """One MONAI Deploy application for one study folder (built per study, as the SDK runs an app
    per input)."""
    import numpy as np
    import torch
    from monai.deploy.conditions import CountCondition
    from monai.deploy.core import Application, Operator
    from monai.deploy.operators import (
        DICOMDataLoaderOperator,
        DICOMSegmentationWriterOperator,
        DICOMSeriesSelectorOperator,
        DICOMSeriesToVolumeOperator,
    )
    from monai.deploy.operators.dicom_utils import ModelInfo

    class OrthonodeSegmentOperator(Operator):
        """The project's segmenter on the SDK's volume: ``ModelBundle.segment`` (the same
        windows, scaling, network and resizing back as ``orthonode predict``)."""

        def __init__(self, fragment: Any, *args: Any, **kwargs: Any) -> None:
            self.bundle = bundle
            super().__init__(fragment, *args, **kwargs)

        def setup(self, spec: Any) -> None:
            spec.input("image")
            spec.output("seg_image")

        def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
            image = op_input.receive("image")
            torch.set_num_threads(threads)  # Holoscan calls compute from its own thread
            SDK_CLOCK["threads"] = torch.get_num_threads()
            volume = np.asarray(image.asnumpy(), dtype=np.float32)  # (slices, rows, columns), sorted
            op_output.emit(self.bundle.segment(volume, timings=SDK_CLOCK.setdefault("segment_parts", {})),
                           "seg_image")

    card = bundle.card

    class KneeSegApp(Application):
        def compose(self) -> None:
            loader = _timed(DICOMDataLoaderOperator, "load")(
                self, CountCondition(self, 1), input_folder=study, name="loader")
            selector = _timed(DICOMSeriesSelectorOperator, "select")(self, rules=sagittal_rules(), name="selector")
            to_volume = _timed(DICOMSeriesToVolumeOperator, "to_volume")(self, name="to_volume")
            segment = _timed(OrthonodeSegmentOperator, "segment")(self, name="segment")
            writer = _timed(DICOMSegmentationWriterOperator, "write")(
                self,
                segment_descriptions=descriptions,
                output_folder=out,
                model_info=ModelInfo(creator="orthonode", name=card.name, version=card.version),
                omit_empty_frames=False,  # as the node writes (every frame kept)
                name="seg_writer",
            )
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(to_volume, segment, {("image", "image")})
            self.add_flow(segment, writer, {("seg_image", "seg_image")})
            self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})

    return KneeSegApp()


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One side's run on one study: wall seconds, seconds per table stage, the SEG written."""

    side: str
    case: str
    wall: float
    stages: dict[str, float]
    network: float
    seg: Path | None
    series_uid: str | None = None
    #: process CPU seconds over wall seconds: of the whole run, and of the segmenter calls
    cpu_ratio: float = 0.0
    segment_cpu_ratio: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def other(self) -> float:
        return self.wall - sum(self.stages.values())


def _segment_ratio(calls: list[tuple[float, float]], before: int) -> float:
    wall = sum(w for w, _ in calls[before:])
    return sum(c for _, c in calls[before:]) / wall if wall > 0 else 0.0


def run_orthonode(case: str, study: Path, bundle: Any, out: Path, seg_only: bool,
                  calls: list[tuple[float, float]]) -> Run:
    from inference.pipeline import Outcome, run_study

    before = len(calls)
    started, cpu = time.perf_counter(), time.process_time()
    result = run_study(study, bundle, out, device="cpu", overlay_planes=() if seg_only else None)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    if result.outcome is not Outcome.COMPLETE:
        raise RuntimeError(f"{case}: orthonode did not interpret the study: {result.outcome.value}: {result.reason}")
    t = result.timings
    stages = {label: sum(t[k] for k in keys) for label, keys, _ in STAGES}
    if not seg_only:
        stages["map"] = t["map"]
    chosen = result.chosen.get("sagittal")
    return Run(
        side="orthonode SEG only" if seg_only else "orthonode full predict",
        case=case, wall=wall, stages=stages, network=t["model"],
        seg=result.segmentations.get("sagittal"),
        series_uid=chosen.series_instance_uid if chosen else None,
        cpu_ratio=cpu / wall, segment_cpu_ratio=_segment_ratio(calls, before),
        extra={"timings": t, "files": len(result.files), "slices": chosen.num_slices if chosen else None},
    )


def run_sdk(case: str, study: Path, bundle: Any, out: Path, threads: int, descriptions: list[Any],
            calls: list[tuple[float, float]]) -> Run:
    import pydicom

    SDK_CLOCK.clear()
    out.mkdir(parents=True, exist_ok=True)
    before = len(calls)
    started, cpu = time.perf_counter(), time.process_time()
    app = build_sdk_app(study, out, bundle, threads, descriptions)
    app.run()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    written = sorted(out.glob("*.dcm"))
    if len(written) != 1:
        raise RuntimeError(f"{case}: the SDK application wrote {len(written)} SEG files in {out}, expected 1")
    header = pydicom.dcmread(written[0], stop_before_pixels=True)
    stages = {label: SDK_CLOCK.get(stage, 0.0) for label, _, stage in STAGES}
    parts = SDK_CLOCK.get("segment_parts", {})
    return Run(
        side="MONAI Deploy app", case=case, wall=wall, stages=stages, network=parts.get("model", 0.0),
        seg=written[0], series_uid=str(header.ReferencedSeriesSequence[0].SeriesInstanceUID),
        cpu_ratio=cpu / wall, segment_cpu_ratio=_segment_ratio(calls, before),
        extra={"threads_in_operator": SDK_CLOCK.get("threads")},
    )


def run_cli(study: Path, model: Path, out: Path, threads: int) -> dict[str, Any]:
    """One cold ``orthonode predict`` process (interpreter start, imports, model load included)."""
    exe = Path(sys.executable).with_name("orthonode")
    command = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "dicom_node.cli"]),
               "predict", "--study", str(study), "--out", str(out), "--model", str(model),
               "--config", str(out.parent / "no-node.yaml"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    timings = next((line for line in done.stdout.splitlines() if line.startswith("device:")), "")
    return {"wall": wall, "rc": done.returncode, "timings": timings, "seg": out / "seg_sagittal.dcm",
            "stderr": done.stderr[-2000:]}


# --------------------------------------------------------------------------- content


def compare_segs(a: Path, b: Path) -> dict[str, Any]:
    """Segment masks of two SEGs on the instances of the source series they reference: Dice per
    segment (by segment label), voxels per segment, and whether the label sets agree."""
    import highdicom as hd
    import numpy as np

    seg_a, seg_b = hd.seg.segread(a), hd.seg.segread(b)
    ref_a = seg_a.ReferencedSeriesSequence[0]
    ref_b = seg_b.ReferencedSeriesSequence[0]
    if ref_a.SeriesInstanceUID != ref_b.SeriesInstanceUID:
        return {"same_series": False}
    uids = [item.ReferencedSOPInstanceUID for item in ref_a.ReferencedInstanceSequence]
    labels_a = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg_a.SegmentSequence}
    labels_b = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg_b.SegmentSequence}

    def masks(seg: Any) -> np.ndarray:
        return seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, assert_missing_frames_are_empty=True, dtype=np.uint8
        ).astype(bool)

    ma, mb = masks(seg_a), masks(seg_b)
    per_segment = {}
    for number, label in labels_a.items():
        x, y = ma[..., number - 1], mb[..., number - 1]
        both = int(np.logical_and(x, y).sum())
        size_a, size_b = int(x.sum()), int(y.sum())
        dice = 1.0 if size_a + size_b == 0 else 2.0 * both / (size_a + size_b)
        per_segment[label] = {"dice": dice, "voxels_a": size_a, "voxels_b": size_b,
                              "differ": int(np.logical_xor(x, y).sum())}
    return {
        "same_series": True,
        "labels_equal": labels_a == labels_b,
        "identical": bool(ma.shape == mb.shape and np.array_equal(ma, mb)),
        "shape": list(ma.shape),
        "per_segment": per_segment,
    }


def same_pixel_data(a: Path, b: Path) -> bool:
    import pydicom

    return pydicom.dcmread(a).PixelData == pydicom.dcmread(b).PixelData


# --------------------------------------------------------------------------- report


def _median_range(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _ratio(numerator: list[float], denominator: list[float]) -> str:
    if not numerator or not denominator:
        return "-"
    top, bottom = statistics.median(numerator), statistics.median(denominator)
    if bottom < 0.005:
        return f"n/a (orthonode {bottom * 1000:.1f} ms)"
    return f"{top / bottom:.2f}x"


def stage_table(a_runs: list[Run], b_runs: list[Run]) -> list[str]:
    lines = [
        "| stage | orthonode SEG only (s) | MONAI Deploy app (s) | app / orthonode |",
        "| --- | ---: | ---: | ---: |",
    ]
    rows = [label for label, _, _ in STAGES]
    for label in rows:
        a = [r.stages[label] for r in a_runs]
        b = [r.stages[label] for r in b_runs]
        lines.append(f"| {label} | {_median_range(a)} | {_median_range(b)} | {_ratio(b, a)} |")
    a, b = [r.network for r in a_runs], [r.network for r in b_runs]
    lines.append(f"| (of which network forward) | {_median_range(a)} | {_median_range(b)} | {_ratio(b, a)} |")
    a, b = [r.other for r in a_runs], [r.other for r in b_runs]
    lines.append(f"| other (orthonode: bookkeeping; app: build + Holoscan graph/scheduling) | {_median_range(a)} | "
                 f"{_median_range(b)} | {_ratio(b, a)} |")
    a, b = [r.wall for r in a_runs], [r.wall for r in b_runs]
    lines.append(f"| **end to end** | **{_median_range(a)}** | **{_median_range(b)}** | **{_ratio(b, a)}** |")
    a, b = [r.segment_cpu_ratio for r in a_runs], [r.segment_cpu_ratio for r in b_runs]
    lines.append(f"| CPU s / wall s of preprocess+network (cores really used) | {_median_range(a)} | "
                 f"{_median_range(b)} | |")
    a, b = [r.cpu_ratio for r in a_runs], [r.cpu_ratio for r in b_runs]
    lines.append(f"| CPU s / wall s end to end | {_median_range(a)} | {_median_range(b)} | |")
    return lines


def full_table(runs: list[Run]) -> list[str]:
    lines = ["| stage | orthonode full predict (s) |", "| --- | ---: |"]
    for label in [*(label for label, _, _ in STAGES), "map"]:
        lines.append(f"| {label if label != 'write SEG' else 'write (3 SEGs + SR)'} | "
                     f"{_median_range([r.stages[label] for r in runs])} |")
    lines.append(f"| (of which network forward: classifier + segmenter) | {_median_range([r.network for r in runs])} |")
    lines.append(f"| other | {_median_range([r.other for r in runs])} |")
    lines.append(f"| **end to end** | **{_median_range([r.wall for r in runs])}** |")
    lines.append(f"| CPU s / wall s end to end | {_median_range([r.cpu_ratio for r in runs])} |")
    return lines


def report(info: dict[str, Any], a_runs: list[Run], b_runs: list[Run], c_runs: list[Run],
           warmup: dict[str, float], content: dict[str, dict[str, Any]], cli: dict[str, Any] | None) -> str:
    v = info["versions"]
    n = len(a_runs)
    a_wall = statistics.median(r.wall for r in a_runs)
    b_wall = statistics.median(r.wall for r in b_runs)
    c_wall = statistics.median(r.wall for r in c_runs)
    lines = [
        "# orthonode predict beside a MONAI Deploy App SDK application (same SEG job)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; load average (1, 5, 15 min) "
        f"{info['load_start']} at the start, {info['load_end']} at the end.",
        f"Command: `{info['command']}` ({info['seconds']:.0f} s in all).",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"Model: {info['model']}; checkpoint load {info['load_a']:.2f} s (orthonode side) and "
        f"{info['load_b']:.2f} s (app side), each once, outside the per-study figures.",
        f"Studies: {n} phantom knees (`generate_dataset(..., 'knee', {n}, seed={info['seed']}, "
        f"matrix={info['matrix']})`); sagittal series of {info['slices']} slices.  Torch at {info['threads']} "
        f"thread(s) on both sides (inside the SDK operator: {info['sdk_threads']}); the same torch workload "
        "(conv3d + group norm, 1x16x16x64x64) at that setting: "
        + "; ".join(f"{k} {v}" for k, v in info["thread_check"].items()) + ".",
        "",
        "## SEG of the sagittal series, per stage (median and range over the studies)",
        "",
        *stage_table(a_runs, b_runs),
        "",
        f"End to end the MONAI Deploy app took {b_wall / a_wall:.2f}x the time of orthonode's SEG-only run "
        f"(median {b_wall:.2f} s against {a_wall:.2f} s). The target (orthonode at least 2x faster end to end "
        f"for SEG output of the same content) is {'met' if b_wall >= 2 * a_wall else 'NOT met'} in this run.",
        "",
        "## orthonode full predict on the same studies (three-plane classifier, SEGs on three planes, SR)",
        "",
        *full_table(c_runs),
        "",
        f"The full predict (median {c_wall:.2f} s) does more than the app: it also classifies the three planes, "
        "maps the label map onto the coronal and axial series and writes their SEGs and the SR. It is "
        f"{c_wall / b_wall:.2f}x the app's time.",
        "",
        "## Same content?",
        "",
        "Both SEGs read with highdicom (`segread`, `get_pixels_by_source_instance` on the instances of the "
        "referenced series); Dice per segment, then voxels per segment (orthonode / app).",
        "",
    ]
    labels = list(next(iter(content.values()))["per_segment"]) if content and all(
        c.get("same_series") for c in content.values()) else []
    if labels:
        lines.append("| segment | " + " | ".join(content) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in content) + " |")
        for label in labels:
            cells = []
            for c in content.values():
                s = c["per_segment"][label]
                cells.append(f"{s['dice']:.4f} ({s['voxels_a']}/{s['voxels_b']})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    for case, c in content.items():
        if not c.get("same_series"):
            lines.append(f"- {case}: the two sides segmented different series (no mask comparison).")
        else:
            lines.append(f"- {case}: masks {'identical' if c['identical'] else 'DIFFER'} "
                         f"({c['shape'][0]} frames x {c['shape'][1]} x {c['shape'][2]} x {c['shape'][3]} segments); "
                         f"segment labels {'the same' if c['labels_equal'] else 'differ'}; full predict's sagittal "
                         f"SEG pixel data {'equal to' if c.get('full_equal') else 'NOT equal to'} the SEG-only run's.")
    lines += [
        "",
        "## Per study (wall seconds)",
        "",
        "| study | orthonode SEG only | MONAI Deploy app | orthonode full predict | sagittal series chosen |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for a, b, c in zip(a_runs, b_runs, c_runs):
        same = "same on both sides" if a.series_uid == b.series_uid else f"DIFFERENT (app: {b.series_uid})"
        lines.append(f"| {a.case} | {a.wall:.2f} | {b.wall:.2f} | {c.wall:.2f} | {same} |")
    lines += [
        "",
        f"Warm-up round on {info['warmup_case']} (not in the figures above): orthonode SEG only "
        f"{warmup['a']:.2f} s, MONAI Deploy app {warmup['b']:.2f} s, full predict {warmup['c']:.2f} s.",
    ]
    if cli is not None:
        lines.append(
            f"Cold `orthonode predict` process on {info['warmup_case']} (interpreter start, imports, model load, "
            f"the full job): {cli['wall']:.2f} s, exit {cli['rc']}; it printed `{cli['timings']}`; its sagittal SEG "
            f"pixel data {'equal to' if cli.get('equal') else 'NOT equal to'} the in-process run's."
        )
    lines += ["", "## Notes", "", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "- Like with like. The SEG-only side is `run_study` (what `orthonode predict` calls) with the same "
    "segmenter module in a bundle without classifier whose card names the sagittal plane only, and "
    "`overlay_planes=()`: it scans every file's header, selects, loads and decodes the sagittal series, "
    "segments it and writes one SEG, as the app does. The full predict row is what the node and "
    "`orthonode predict` do per study.",
    "- Stages do not cut the work at the same places. orthonode's read/load is a header-only scan of "
    "every file and its to-volume reads and decodes only the chosen series; the SDK's loader reads every "
    "file whole (`dcmread`) and its to-volume sorts and decodes the chosen series. orthonode's write also "
    "measures the structure volumes for the SR; the SDK writer reads the file it wrote back once.",
    "- preprocess+network is the same code on both sides (`ModelBundle.segment`: 16-slice windows, "
    "min-max scaling, resizing, the network, averaging, resizing back, arg-max). The SDK operator "
    "converts the SDK's volume to float32 first; the voxel values are those orthonode decodes.",
    "- The SDK's `SegmentDescription` carries label, category, type, anatomic region, tracking ID and "
    "algorithm; it has no segmented property type modifier (the menisci's Medial/Lateral) and no "
    "recommended display colour, and the SDK writer does not declare orthonode's private coding scheme "
    "(used by the cruciate ligaments), so the app's SEG header is thinner; its UIDs are random, "
    "orthonode's are derived from the inputs. `omit_empty_frames=False` on both (the SDK's default drops "
    "empty frames).",
    "- The series choice: the SDK selector takes the first series that matches a selection; the rules "
    "are the node's default sagittal preferences, one selection per pattern in order, each excluding "
    "the node's avoid patterns (see `sagittal_rules`). The per-study table says whether both sides "
    "segmented the same series.",
    "- In an environment with the SDK installed, `import monai` also imports `monai.deploy` and Holoscan "
    "(MONAI loads its submodules at import), so both sides here run with Holoscan loaded; it adds about "
    "4 s to a cold `orthonode predict` start in such an environment, none to the warm figures.",
    "- The app is built and run once per study (a new Holoscan graph each time); its framework time is "
    "the wall time outside the operators' `compute`. Installing the SDK pulls Holoscan (CUDA 13 build, "
    "which runs on a CPU-only machine), CuPy and the Triton client; the node needs none of them.",
    "- Weights are seeded random values unless `--model` is given: the network's time does not depend "
    "on them, and the content comparison holds for any weights (same network, same input).",
]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a knee checkpoint with a segmenter (default: random weights)")
    parser.add_argument("--preset", default="small", help="model preset without --model (default %(default)s)")
    parser.add_argument("--studies", type=int, default=5, help="phantom studies (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="phantom and weight seed (default %(default)s)")
    parser.add_argument("--matrix", type=int, default=256, help="phantom acquisition matrix (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads on both sides (default %(default)s)")
    parser.add_argument("--work", type=Path, help="keep the studies and outputs here (default: a temporary folder)")
    parser.add_argument("--no-cli", action="store_true", help="skip the cold orthonode predict process")
    parser.add_argument("--out", type=Path, help="write the markdown report to this file")
    args = parser.parse_args(argv)
    if args.studies < 1 or args.threads < 1:
        parser.error("--studies and --threads must be at least 1")

    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("highdicom", "monai", "root"):
        logging.getLogger(name).setLevel(logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    checked = thread_check(args.threads)
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "load_start": load_average(), "seed": args.seed,
        "matrix": args.matrix, "threads": args.threads, "versions": versions(),
        "thread_check": checked,
        "command": " ".join(["python benchmarks/monai_deploy.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        info["memory"] = "RAM unknown"

    with tempfile.TemporaryDirectory(prefix="monai-deploy-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        from training.phantoms.generate import generate_dataset

        phantoms = work / "phantoms"
        specs = generate_dataset(phantoms, "knee", args.studies, seed=args.seed, matrix=args.matrix)
        cases = [(spec.case_id, phantoms / spec.case_id / "dicom") for spec in specs]

        from inference.checkpoint import ModelBundle

        if args.model is not None:
            model_path, info["model"] = args.model, f"`{args.model}`"
        else:
            model_path = seeded_bundle_file(args.preset, args.seed, work / f"random-{args.preset}.pt")
            info["model"] = f"`{args.preset}` preset, seeded random weights (seed {args.seed})"
        t = time.perf_counter()
        full_bundle = ModelBundle.load(model_path)
        info["load_a"] = time.perf_counter() - t
        seg_bundle = segmenter_only(full_bundle)
        t = time.perf_counter()
        sdk_bundle = segmenter_only(ModelBundle.load(model_path))
        info["load_b"] = time.perf_counter() - t
        if seg_bundle.segmenter is None:
            raise SystemExit(f"{model_path}: the model has no segmenter")
        descriptions = segment_descriptions(sdk_bundle.card)
        a_calls, b_calls, c_calls = instrument(seg_bundle), instrument(sdk_bundle), instrument(full_bundle)

        # warm-up round (first imports, torch kernels, Holoscan extensions), not in the figures
        case, study = cases[0]
        info["warmup_case"] = case
        warm = work / "out" / "warmup"
        warmup = {
            "a": run_orthonode(case, study, seg_bundle, warm / "a", True, a_calls).wall,
            "b": run_sdk(case, study, sdk_bundle, warm / "b", args.threads, descriptions, b_calls).wall,
            "c": run_orthonode(case, study, full_bundle, warm / "c", False, c_calls).wall,
        }

        a_runs, b_runs, c_runs = [], [], []
        content: dict[str, dict[str, Any]] = {}
        for case, study in cases:
            a = run_orthonode(case, study, seg_bundle, work / "out" / case / "orthonode-seg", True, a_calls)
            b = run_sdk(case, study, sdk_bundle, work / "out" / case / "monai-deploy", args.threads, descriptions,
                        b_calls)
            c = run_orthonode(case, study, full_bundle, work / "out" / case / "orthonode-full", False, c_calls)
            a_runs.append(a), b_runs.append(b), c_runs.append(c)
            print(f"{case}: orthonode SEG only {a.wall:.2f} s, MONAI Deploy app {b.wall:.2f} s, "
                  f"full predict {c.wall:.2f} s", flush=True)
        info["sdk_threads"] = SDK_CLOCK.get("threads")
        for a, b, c in zip(a_runs, b_runs, c_runs):
            content[a.case] = compare_segs(a.seg, b.seg)
            content[a.case]["full_equal"] = same_pixel_data(a.seg, c.seg)
        info["slices"] = ", ".join(str(r.extra["slices"]) for r in a_runs)

        cli = None
        if not args.no_cli:
            cli = run_cli(cases[0][1], model_path, work / "out" / "cli", args.threads)
            cli["equal"] = cli["rc"] == 0 and cli["seg"].exists() and same_pixel_data(cli["seg"], a_runs[0].seg)
            if cli["rc"] != 0:
                print(cli["stderr"], file=sys.stderr)

        info["load_end"] = load_average()
        info["seconds"] = time.perf_counter() - started
        text = report(info, a_runs, b_runs, c_runs, warmup, content, cli)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
