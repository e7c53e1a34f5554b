"""One study on disk -> planes -> volumes -> model -> DICOM SEG + SR: what the node runs per study.

Why one module of about 760 lines: the stages share one ``_Run`` and read top to bottom as the
pipeline, with the result types the node and evaluation consume defined beside them.

:func:`run_study` is the whole flow, a pure function of its inputs (the study folder, the
model bundle, the rules, the node identity): the same inputs give the same outputs, byte for
byte up to the creation timestamps, and the same UIDs (see :mod:`inference.uids`).

Steps, each a function of the stages section below (``_scan``, ``_choose``, ``_load``,
``_classify``, ``_segment``, ``_map``, ``_report``, ``_preview``) that reads and extends one
``_Run``; each is timed and each decision written to the log that comes back with the result:

1. **scan** the folder (:func:`inference.series.scan_folder_report`), or exactly the files a
   :class:`StudyFiles` names (the node's worker passes those its database records for the
   job); unreadable files are listed, never fatal.
2. **joint**: :func:`inference.joint.detect_joint` on the headers chooses the model (one per
   joint, :class:`inference.model_set.ModelSet`).  A study whose headers name no joint, or a
   joint without a model, is *unsupported*: it gets a reason, no output.
3. **select** one series per plane (:func:`inference.selection.select_series`).
4. **load** the chosen series as volumes (decoding compressed pixel data).  A chosen series
   that cannot be read is reported and its plane treated as missing.
5. **classify** on the planes the model has.  *Missing planes*: the fused classifier
   concatenates one standardised pooled feature vector per plane.  A plane without a series
   contributes its standardised features' expected value (zero: the neutral input of
   the linear head) and the result is flagged ``PARTIAL``; the SR states the missing planes in
   its text and impression.  A study with none of the model's planes is unsupported.
6. **segment** every slice of each segmented source series with sliding windows
   (:func:`inference.preprocess.segment_series`); the logits are resized back onto the source
   series' own rows and columns, and the slice axis never leaves the source grid (windows
   cover the source slices one to one), so the label map *is* on the source grid, oblique
   series included.
7. **map** the label map of the first segmented plane (the segmenter's own, sagittal) into
   every other chosen series of the same Frame of Reference
   (:func:`inference.plane_mapping.map_label_map`, SimpleITK resampling with that series'
   geometry, the rule measured best against phantom masks), so the radiologist gets an overlay
   on each plane read.  A plane without a series, or of another Frame of Reference, gets none.
8. **write** one SEG per series (segmented or mapped, each on its own grid) and one SR (TID
   1500) for the study.  The SR's structure volumes and outlines reference the SEG the
   segmenter produced, never a mapped one.

EHR values come from the headers (PatientAge, PatientSex, PatientSize, PatientWeight); a
missing or implausible value is masked as missing, never guessed, and the log says which.

On CUDA, models run under autocast (bfloat16 where supported, else float16); on CPU in float32.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from inference.joint import DEFAULT_JOINT_RULES, JointRules, detect_joint
from inference.labels import KNEE_STRUCTURES, PLANES, Structure
from inference.model_set import ModelSet
from inference.selection import DEFAULT_RULES, SelectionRules, select_series
from inference.series import (
    SeriesError,
    SeriesInfo,
    SeriesVolume,
    complete_slice_thickness,
    load_series,
    scan_files_report,
    scan_folder_report,
)

if TYPE_CHECKING:  # heavy imports stay inside functions
    from inference.checkpoint import ModelBundle
    from inference.sr_writer import Finding
    from inference.uids import NodeInfo

__all__ = [
    "SEG_SERIES_NUMBER",
    "SR_SERIES_NUMBER",
    "ChosenSeries",
    "Outcome",
    "StudyResult",
    "WrittenObject",
    "ehr_from_header",
    "run_study",
]

log = logging.getLogger(__name__)

#: Series Number of the SEG of each plane: 9101 sagittal, 9102 coronal, 9103 axial.  Fixed
#: numbers (not derived from the source) keep the AI series together at the end of a PACS list.
SEG_SERIES_NUMBER: dict[str, int] = {plane: 9101 + i for i, plane in enumerate(PLANES)}
#: Series Number of the SR.
SR_SERIES_NUMBER = 9200

#: the stages reported in :attr:`StudyResult.timings`, in pipeline order
STAGES: tuple[str, ...] = ("scan", "select", "load", "preprocess", "model", "map", "write", "preview")


class Outcome(str, enum.Enum):
    """How a study ended."""

    #: every plane the model uses was present
    COMPLETE = "complete"
    #: reported from the planes present; the missing ones are named in the result and the SR
    PARTIAL = "partial"
    #: not interpreted (wrong body part, no usable series, another joint than the model's)
    UNSUPPORTED = "unsupported"


class WrittenObject(NamedTuple):
    """One DICOM object :func:`run_study` wrote: its file, ``"seg"`` or ``"sr"``, its SOP Instance UID."""

    path: Path
    kind: str
    sop_instance_uid: str


@dataclass(frozen=True)
class StudyFiles:
    """The files of one study as a caller already knows them (the node's database): the scan
    reads exactly these instead of walking a folder.  ``root`` names the study in messages and
    the result."""

    root: Path
    files: tuple[Path, ...]

    def __post_init__(self) -> None:
        missing = [str(f) for f in self.files if not Path(f).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FileNotFoundError(f"instance file {missing[0]}{more} of the study is missing")


@dataclass(frozen=True)
class ChosenSeries:
    """The series used for one plane, as an administrator would name it."""

    plane: str
    series_instance_uid: str
    series_number: int | None
    description: str
    num_slices: int
    obliquity_deg: float | None
    transfer_syntaxes: tuple[str, ...]
    is_multiframe: bool

    @classmethod
    def from_info(cls, plane: str, info: SeriesInfo) -> ChosenSeries:
        return cls(
            plane=plane,
            series_instance_uid=info.series_instance_uid,
            series_number=info.series_number,
            description=info.series_description,
            num_slices=info.num_frames,
            obliquity_deg=info.obliquity_deg,
            transfer_syntaxes=info.transfer_syntaxes,
            is_multiframe=info.is_multiframe,
        )


@dataclass
class StudyResult:
    """Everything :func:`run_study` decided and wrote for one study.

    ``log`` holds every choice and rejection in order (joint, each series chosen or not and
    why, EHR values masked, planes missing, objects written).  ``segmentations`` maps each
    plane with a SEG to its file (segmented, or mapped from the plane ``mapped_from`` names);
    ``volumes_ml`` holds the volumes measured on the segmented planes; ``report`` is the SR
    file (None without a classifier or when unsupported).  ``timings`` are seconds per stage of :data:`STAGES` plus ``total``.
    """

    study_dir: Path
    outcome: Outcome
    reason: str
    joint: str | None = None
    study_instance_uid: str | None = None
    chosen: dict[str, ChosenSeries] = field(default_factory=dict)
    missing_planes: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    volumes_ml: dict[str, dict[str, float]] = field(default_factory=dict)
    segmentations: dict[str, Path] = field(default_factory=dict)
    #: planes whose SEG holds a label map mapped from another plane's series -> that plane
    mapped_from: dict[str, str] = field(default_factory=dict)
    report: Path | None = None
    previews: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    #: the model that interpreted the study ("name version"), None when none was chosen
    model: str | None = None
    #: SOP Instance UID of each DICOM file written, as it was written
    sop_instance_uids: dict[Path, str] = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        return self.outcome is not Outcome.UNSUPPORTED

    @property
    def files(self) -> list[Path]:
        """Every DICOM file written: the SEGs in plane order, then the SR."""
        files = [self.segmentations[p] for p in PLANES if p in self.segmentations]
        return files + ([self.report] if self.report is not None else [])

    @property
    def outputs(self) -> list[WrittenObject]:
        """:attr:`files` with what a sender needs to know of each (kind, SOP Instance UID), without reading them."""
        return [WrittenObject(path, "sr" if path == self.report else "seg", self.sop_instance_uids[path])
                for path in self.files]

    def summary(self) -> str:
        """Readable multi-line summary (what ``orthonode predict`` prints)."""
        lines = [f"study {self.study_instance_uid or '?'} in {self.study_dir}: {self.outcome.value}: {self.reason}"]
        if self.joint:
            lines.append(f"joint: {self.joint}" + (f"; model {self.model}" if self.model else ""))
        for plane in PLANES:
            if plane in self.chosen:
                chosen = self.chosen[plane]
                number = "?" if chosen.series_number is None else chosen.series_number
                lines.append(f"{plane}: series {number} {chosen.description!r} ({chosen.num_slices} slices)")
        if self.missing_planes:
            lines.append(f"missing planes: {', '.join(self.missing_planes)}")
        if self.findings:
            lines.append("findings:")
            lines.extend(f"  {finding.text()}" for finding in self.findings)
        for plane, volumes in self.volumes_ml.items():
            measured = ", ".join(f"{k} {v:.1f} mL" for k, v in volumes.items() if v > 0) or "no structure found"
            lines.append(f"structure volumes ({plane}): {measured}")
        if self.files or self.previews:
            lines.append("files written:")
            lines.extend(f"  {path}" for path in [*self.files, *self.previews])
        return "\n".join(lines)


# --------------------------------------------------------------------------- EHR


def ehr_from_header(ds: Any) -> tuple[dict[str, Any], list[str]]:
    """EHR inputs from a source header: :func:`inference.model.ehr_from_dicom`, the one reader."""
    from inference.model import ehr_from_dicom

    return ehr_from_dicom(ds)


# --------------------------------------------------------------------------- helpers


class _Clock:
    """Accumulates seconds per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {stage: 0.0 for stage in STAGES}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds


def _card_structures(card: Any) -> tuple[Structure, ...]:
    """The card's structures as label-table entries, class ``i + 1`` = ``card.structures[i]``."""
    by_key = {s.key: s for s in KNEE_STRUCTURES}
    structures = []
    for i, key in enumerate(card.structures):
        structure = by_key[key]  # ModelCard validated the keys
        if structure.index != i + 1:
            raise ValueError(
                f"model {card.name!r}: card.structures must follow inference.labels.KNEE_STRUCTURES from the "
                f"first one (SEG segment numbers are structure indices); {key!r} is class {i + 1} but structure "
                f"{structure.index}"
            )
        structures.append(structure)
    return tuple(structures)


def _segmented_planes(bundle: ModelBundle, requested: Sequence[str] | None) -> tuple[str, ...]:
    """Planes whose chosen series get a SEG: as requested, else those the segmenter was trained on."""
    if bundle.segmenter is None:
        return ()
    if requested is not None:
        bad = [p for p in requested if p not in PLANES]
        if bad:
            raise ValueError(f"segment_planes: unknown plane(s) {bad}; planes are {PLANES}")
        return tuple(requested)
    plane = bundle.card.segmenter_plane()
    return (plane,) if plane is not None else tuple(bundle.card.planes)


def _overlay_planes(segmented: Sequence[str], requested: Sequence[str] | None) -> tuple[str, ...]:
    """Planes that get a SEG mapped from the segmented plane: as requested, else every other plane."""
    if not segmented:
        return ()
    if requested is None:
        return tuple(p for p in PLANES if p not in segmented)
    bad = [p for p in requested if p not in PLANES]
    if bad:
        raise ValueError(f"overlay_planes: unknown plane(s) {bad}; planes are {PLANES}")
    return tuple(p for p in PLANES if p in requested and p not in segmented)


def _read_previous_reports(paths: Sequence[Path], notes: list[str]) -> list[Any]:
    """Headers of the earlier reports (see ``run_study(previous_reports=...)``)."""
    from pydicom import dcmread

    headers = []
    for path in paths:
        try:
            headers.append(dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - a lost or damaged earlier report must not stop the new one
            notes.append(f"report: the earlier report {Path(path).name} cannot be read ({exc}); not named as replaced")
    return headers


def _evidence(volume: SeriesVolume) -> Any:
    """The dataset that stands for ``volume`` in the SR's evidence and Image Library.

    highdicom's Image Library (TID 1600) reads Pixel Spacing, Image Orientation/Position and
    Slice Thickness from the top level of the dataset, where an Enhanced (multi-frame) MR object
    has none (they sit in its functional groups), so it fails on such a source.  For a
    multi-frame source the SR gets a header-only copy with those four attributes of its first
    slice (in slice order) lifted to the top level; identity (SOP Class/Instance, series,
    study) is unchanged, so the references are those of the real object.
    """
    from pydicom import Dataset

    first = volume.datasets[0]
    if not volume.info.is_multiframe:
        return first
    proxy = Dataset()
    proxy.preamble = getattr(first, "preamble", None)
    for element in first:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            proxy.add(element)
    if hasattr(first, "file_meta"):
        proxy.file_meta = first.file_meta
    row_mm, col_mm, slice_mm = volume.spacing
    proxy.PixelSpacing = [f"{row_mm:.10g}", f"{col_mm:.10g}"]
    proxy.ImageOrientationPatient = [f"{v:.10g}" for v in volume.orientation]
    proxy.ImagePositionPatient = [f"{v:.10g}" for v in volume.positions[0]]
    thickness = volume.info.slice_thickness if volume.info.slice_thickness is not None else slice_mm
    proxy.SliceThickness = f"{thickness:.10g}"
    return proxy


def _laterality(chosen: Mapping[str, SeriesInfo], notes: list[str]) -> str | None:
    values = {info.laterality for info in chosen.values() if info.laterality in ("L", "R")}
    if len(values) == 1:
        return values.pop()
    if len(values) > 1:
        notes.append(f"laterality: the chosen series disagree ({sorted(values)}); reported as unknown")
    return None


# --------------------------------------------------------------------------- the stages


class _Unsupported(Exception):
    """A stage found the study uninterpretable: :func:`run_study` reports ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Run:
    """One :func:`run_study` call as the stages see it: its inputs, then what each stage adds.

    Stages run in order, each reading what earlier stages set: scan -> choose (joint, model,
    series) -> load -> classify -> segment -> map -> report -> preview.  A stage that finds the
    study uninterpretable raises :class:`_Unsupported`.
    """

    # inputs
    study_dir: Path
    #: the files to scan, or None: every file under study_dir
    files: tuple[Path, ...] | None
    out_dir: Path
    models: ModelSet
    rules: SelectionRules
    joint_rules: JointRules
    node_info: NodeInfo
    segment_planes: Sequence[str] | None
    overlay_planes: Sequence[str] | None
    mapping_rule: str | None
    previous_reports: Sequence[Path]
    result: StudyResult
    clock: _Clock
    # scan
    series: list[SeriesInfo] = field(default_factory=list)
    # choose
    bundle: Any = None  # ModelBundle (heavy import kept out of module level)
    to_segment: tuple[str, ...] = ()
    to_map: tuple[str, ...] = ()
    structures: tuple[Structure, ...] = ()
    chosen: dict[str, SeriesInfo] = field(default_factory=dict)
    # load
    volumes: dict[str, SeriesVolume] = field(default_factory=dict)
    laterality: str | None = None
    # segment, map
    segs: dict[str, Any] = field(default_factory=dict)  # the SEGs of the segmented planes (the SR references these)
    label_maps: dict[str, np.ndarray] = field(default_factory=dict)
    overlays: dict[str, np.ndarray] = field(default_factory=dict)  # the mapped label maps, for the previews

    @property
    def algorithm(self) -> Any:
        from inference.uids import AlgorithmInfo

        return AlgorithmInfo(name=self.bundle.card.name, version=self.bundle.card.version)


def _scan(run: _Run) -> None:
    """Read every file's header; one study of one patient, or unsupported."""
    result, study_dir = run.result, run.study_dir
    with run.clock.stage("scan"):
        scan = scan_folder_report(study_dir) if run.files is None else scan_files_report(run.files)
    for skipped in scan.skipped:
        result.log.append(f"file {skipped.path.name}: skipped: {skipped.reason}")
    if not scan.series:
        raise _Unsupported(f"no readable DICOM image series in {study_dir}")
    studies = sorted({uid for info in scan.series for uid in (info.study_instance_uids or (info.study_instance_uid,))})
    if len(studies) > 1:
        mixed = [info.label() for info in scan.series if len(info.study_instance_uids) > 1]
        within = f"; {', '.join(mixed)} mixes instances of several studies" if mixed else ""
        raise _Unsupported(f"the folder holds {len(studies)} studies ({', '.join(studies)}){within}; one expected")
    result.study_instance_uid = studies[0]
    patients = {pid for info in scan.series for pid in (info.patient_ids or (info.patient_id,))}
    if len(patients) > 1:
        # A study UID reused for two patients: reporting it would attach one patient's findings
        # to another's images.  The IDs themselves stay out of the reason (it is logged).
        raise _Unsupported(
            f"the study's series belong to {len(patients)} different patients (Patient ID differs between "
            "series); one patient per study expected"
        )
    run.series = scan.series


def _choose(run: _Run) -> None:
    """The study's joint, the model of that joint, the planes to segment and map, a series per plane."""
    result, rules = run.result, run.rules
    with run.clock.stage("select"):
        mr_series = [s for s in run.series if s.modality.upper() in {m.upper() for m in rules.modalities}]
        if not mr_series:
            modalities = sorted({s.modality or "missing" for s in run.series})
            raise _Unsupported(f"no series of modality {sorted(rules.modalities)} (the study has {modalities})")
        joint, why = detect_joint(mr_series, run.joint_rules)
        result.log.append(f"joint: {joint or 'unknown'}: {why}")
        result.joint = joint
        if joint is None:
            raise _Unsupported(f"the study's joint is not recognised: {why}")
        bundle = run.models.for_joint(joint)
        if bundle is None:
            raise _Unsupported(run.models.missing_reason(joint))
        run.bundle = bundle
        result.model = f"{bundle.card.name} {bundle.card.version}"
        if len(run.models) > 1:
            result.log.append(f"model: {result.model} (the {joint} model)")
        run.to_segment = _segmented_planes(bundle, run.segment_planes)
        run.to_map = _overlay_planes(run.to_segment, run.overlay_planes)
        run.structures = _card_structures(bundle.card) if bundle.segmenter is not None else ()
        selection = select_series(run.series, rules)
        result.log.extend(selection.log)
        run.chosen = dict(selection.chosen)


def _load(run: _Run) -> None:
    """Decode the chosen series the model uses into volumes; a plane that cannot be read is missing."""
    result, bundle, volumes = run.result, run.bundle, run.volumes
    wanted = set(bundle.card.planes) | set(run.to_segment) | set(run.to_map)
    with run.clock.stage("load"):
        for plane in PLANES:
            info = run.chosen.get(plane)
            if info is None or plane not in wanted:
                continue
            try:
                volumes[plane] = load_series(info)
            except SeriesError as err:
                result.log.append(f"{plane}: {info.label()} cannot be read ({err.reason}); this plane is missing")
                continue
            result.chosen[plane] = ChosenSeries.from_info(plane, info)
            if not info.is_multiframe:
                stand_in = complete_slice_thickness(volumes[plane].datasets)
                if stand_in is not None:
                    result.log.append(
                        f"{plane}: {info.label()} has no Slice Thickness; the distance between its slices "
                        f"({stand_in:g} mm) stands in for it in the SEG and SR"
                    )
    result.missing_planes = [p for p in bundle.card.planes if p not in volumes]
    for plane in result.missing_planes:
        result.log.append(f"model: plane {plane} is missing; the fused head decides from the other planes (its standardised features are set to their mean) and the report says so")
    if bundle.classifier is not None and len(result.missing_planes) == len(bundle.card.planes):
        raise _Unsupported(f"no usable series for any plane the model uses ({', '.join(bundle.card.planes)})")
    if bundle.classifier is None and not any(p in volumes for p in run.to_segment):
        raise _Unsupported(f"no usable series for the segmented plane(s) {list(run.to_segment)}")
    notes: list[str] = []
    run.laterality = _laterality(run.chosen, notes)
    result.log.extend(notes)


def _classify(run: _Run) -> None:
    """The fused classifier's probability and decision per finding (with the header's EHR values)."""
    bundle, result = run.bundle, run.result
    if bundle.classifier is None:
        return
    from inference.sr_writer import Finding

    ehr: dict[str, Any] = {}
    if bundle.card.use_ehr:
        first = next(iter(run.volumes.values())).datasets[0]
        ehr, ehr_notes = ehr_from_header(first)
        result.log.extend(ehr_notes)
    probabilities = bundle.predict_proba({p: v.pixels for p, v in run.volumes.items()}, ehr, timings=run.clock.seconds)
    names = dict(zip(bundle.card.labels, bundle.card.label_names))
    result.findings = [
        Finding.at_threshold(key, names[key], probabilities[key], bundle.card.thresholds[key])
        for key in bundle.card.labels
    ]


def _segment(run: _Run) -> None:
    """Segment each plane to segment and write its SEG on the series' own grid."""
    from inference.seg_writer import structure_volumes_ml, write_segmentation

    result, bundle = run.result, run.bundle
    run.out_dir.mkdir(parents=True, exist_ok=True)  # the first stage that writes; map, report, preview follow
    for plane in run.to_segment:
        if plane not in run.volumes:
            result.log.append(f"segmentation: no {plane} series; no SEG for that plane")
            continue
        volume = run.volumes[plane]
        if not volume.info.frame_of_reference_uid:
            result.log.append(
                f"segmentation: {plane} {volume.info.label()} has no Frame of Reference UID; a SEG cannot be "
                "placed on it, no SEG for that plane"
            )
            continue
        run.label_maps[plane] = bundle.segment(volume.pixels, timings=run.clock.seconds)
        with run.clock.stage("write"):
            seg = write_segmentation(
                volume.datasets, run.label_maps[plane], run.algorithm, SEG_SERIES_NUMBER[plane], run.structures,
                run.node_info, plane=plane,
            )
            path = run.out_dir / f"seg_{plane}.dcm"
            seg.save_as(path)
            result.sop_instance_uids[path] = str(seg.SOPInstanceUID)
            result.volumes_ml[plane] = structure_volumes_ml(volume.datasets, run.label_maps[plane], run.structures)
        run.segs[plane] = seg
        result.segmentations[plane] = path
        result.log.append(f"segmentation: {plane} {volume.info.label()} -> {path.name}")


def _map(run: _Run) -> None:
    """Carry the first segmented plane's label map into the other planes' series and write their SEGs."""
    from inference.plane_mapping import DEFAULT_RULE, MappingError, map_label_map
    from inference.seg_writer import MappedFrom, write_segmentation

    result = run.result
    segmented = next((p for p in PLANES if p in run.label_maps), None)
    for plane in run.to_map:
        if plane in result.segmentations:
            continue
        if segmented is None:
            if run.to_segment:
                result.log.append(f"segmentation: nothing segmented to map into the {plane} series; no SEG for it")
            continue
        if plane not in run.volumes:
            result.log.append(f"segmentation: no {plane} series; no SEG for that plane")
            continue
        source, target, rule = run.volumes[segmented], run.volumes[plane], run.mapping_rule or DEFAULT_RULE
        try:
            with run.clock.stage("map"):
                run.overlays[plane] = map_label_map(run.label_maps[segmented], source, target, rule)
        except MappingError as err:
            result.log.append(f"segmentation: the {segmented} label map cannot be placed on {plane} "
                              f"{target.info.label()} ({err}); no SEG for that plane")
            continue
        with run.clock.stage("write"):
            seg = write_segmentation(
                target.datasets, run.overlays[plane], run.algorithm, SEG_SERIES_NUMBER[plane], run.structures,
                run.node_info, plane=plane, mapped_from=MappedFrom(segmented, source.datasets, rule),
            )
            path = run.out_dir / f"seg_{plane}.dcm"
            seg.save_as(path)
            result.sop_instance_uids[path] = str(seg.SOPInstanceUID)
        result.segmentations[plane] = path
        result.mapped_from[plane] = segmented
        result.log.append(f"segmentation: {plane} {target.info.label()} -> {path.name} (the {segmented} label "
                          f"map resampled onto its grid, rule {rule})")


def _report(run: _Run) -> None:
    """Write the SR (TID 1500) of the findings, referencing the first segmented plane's SEG."""
    bundle, result, volumes = run.bundle, run.result, run.volumes
    if bundle.classifier is None:
        return
    from inference.sr_writer import write_report
    from inference.uids import instances_fingerprint
    from sr_templates import load_template

    with run.clock.stage("write"):
        # the SR's volume groups measure the first segmented plane (sagittal before coronal, axial)
        referenced = next((p for p in PLANES if p in run.segs), None)
        used = {p: (v.info.series_instance_uid, v.info.series_description) for p, v in volumes.items()
                if p in bundle.card.planes}
        evidence = [_evidence(volumes[p]) for p in PLANES if p in used]
        if referenced is not None and referenced not in used:
            evidence.append(_evidence(volumes[referenced]))
        previous = _read_previous_reports(run.previous_reports, result.log)
        sr = write_report(
            load_template(bundle.card.joint),
            evidence,
            list(result.findings),
            used,
            list(result.missing_planes),
            run.laterality,
            run.algorithm,
            run.segs.get(referenced) if referenced else None,
            result.volumes_ml.get(referenced) if referenced else None,
            SR_SERIES_NUMBER,
            run.node_info,
            input_fingerprint=instances_fingerprint(
                [ds for p in sorted(set(used) | set(run.segs)) for ds in volumes[p].datasets]
            ),
            previous_versions=previous,
            # findings and structures are placed on the key slices of the SEG's own series
            label_map=run.label_maps.get(referenced) if referenced else None,
            segmented_series=volumes[referenced].datasets if referenced else None,
        )
        result.report = run.out_dir / "sr.dcm"
        sr.save_as(result.report)
        result.sop_instance_uids[result.report] = str(sr.SOPInstanceUID)
    result.log.append(f"report: {result.report.name}")
    for item in sr.get("PredecessorDocumentsSequence", []):
        for series in item.ReferencedSeriesSequence:
            for instance in series.ReferencedSOPSequence:
                result.log.append(f"report: replaces the earlier report {instance.ReferencedSOPInstanceUID}")


def _preview(run: _Run) -> None:
    """PNGs of key slices per plane with the masks and findings."""
    from inference.preview import write_previews

    with run.clock.stage("preview"):
        run.result.previews = write_previews(
            run.out_dir / "preview", run.volumes, {**run.overlays, **run.label_maps}, run.result.findings,
            run.result.missing_planes,
        )


#: the stages of :func:`run_study`, in order (``_preview`` runs after them when asked for)
_STAGE_FUNCTIONS = (_scan, _choose, _load, _classify, _segment, _map, _report)


# --------------------------------------------------------------------------- the pipeline


def run_study(
    study_dir: str | Path | StudyFiles,
    bundle: ModelBundle | ModelSet,
    out_dir: str | Path,
    rules: SelectionRules = DEFAULT_RULES,
    joint_rules: JointRules = DEFAULT_JOINT_RULES,
    node_info: NodeInfo | None = None,
    preview: bool = False,
    *,
    segment_planes: Sequence[str] | None = None,
    overlay_planes: Sequence[str] | None = None,
    mapping_rule: str | None = None,
    device: str = "auto",
    previous_reports: Sequence[Path] = (),
) -> StudyResult:
    """Interpret the study in ``study_dir`` with ``bundle`` and write its SEG(s) and SR to ``out_dir``.

    Args:
        study_dir: folder holding the DICOM files of one study (any layout, any file names),
            or a :class:`StudyFiles` naming exactly the files to read.
        bundle: the model, or a :class:`inference.model_set.ModelSet` of one model per joint
            (the study's joint chooses; a joint without a model is unsupported); moved to
            ``device``.
        out_dir: where the SEG and SR files (and previews) are written; created if needed.
        rules: series selection per plane.
        joint_rules: how headers name the joint; the study's joint must be the model's.
        node_info: the writing node; defaults to the installed package.
        preview: also write PNGs of key slices per plane with the masks and findings.
        segment_planes: planes whose chosen series are segmented; default: the planes the
            segmenter was trained on (``card.segmenter_plane()``).
        overlay_planes: planes, besides the segmented ones, whose chosen series get a SEG
            mapped from the first segmented plane's label map; default: every other plane;
            ``()`` writes SEGs of the segmented planes only.
        mapping_rule: the resampling rule of that mapping (see
            :data:`inference.plane_mapping.RULES`); default
            :data:`inference.plane_mapping.DEFAULT_RULE`.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:N]"``.
        previous_reports: SR files of this study delivered earlier; the new report names those
            it replaces in its Predecessor Documents Sequence (see
            :func:`inference.sr_writer.write_report`).  A file that cannot be read is left out
            and the log says so.

    Returns:
        A :class:`StudyResult`.  An uninterpretable study is ``Outcome.UNSUPPORTED`` with its
        reason, not an exception; errors in the arguments or bugs still raise.
    """
    from inference.checkpoint import pick_device
    from inference.uids import default_node_info

    started = time.perf_counter()
    files: tuple[Path, ...] | None = None
    if isinstance(study_dir, StudyFiles):
        study_dir, files = Path(study_dir.root), tuple(Path(f) for f in study_dir.files)
    study_dir, out_dir = Path(study_dir), Path(out_dir)
    if files is None and not study_dir.is_dir():
        raise FileNotFoundError(f"study_dir {str(study_dir)!r} does not exist or is not a folder")
    target = pick_device(device)
    models = bundle if isinstance(bundle, ModelSet) else ModelSet.single(bundle, release_memory=False)
    models.to(target)
    for _, candidate in models:  # argument errors raise before any work, whichever model is chosen
        _overlay_planes(_segmented_planes(candidate, segment_planes), overlay_planes)
    if mapping_rule is not None:
        from inference.plane_mapping import RULES

        if mapping_rule not in RULES:
            raise ValueError(f"mapping_rule must be one of {RULES}, got {mapping_rule!r}")
    run = _Run(
        study_dir=study_dir, files=files, out_dir=out_dir, models=models, rules=rules, joint_rules=joint_rules,
        node_info=node_info or default_node_info(), segment_planes=segment_planes, overlay_planes=overlay_planes,
        mapping_rule=mapping_rule, previous_reports=previous_reports,
        result=StudyResult(study_dir=study_dir, outcome=Outcome.UNSUPPORTED, reason="", device=str(target)),
        clock=_Clock(),
    )
    result = run.result

    def finish(outcome: Outcome, reason: str) -> StudyResult:
        result.outcome, result.reason = outcome, reason
        result.timings = {**run.clock.seconds, "total": time.perf_counter() - started}
        log_fn = log.warning if outcome is Outcome.UNSUPPORTED else log.info
        log_fn("%s: %s: %s", study_dir, outcome.value, reason)
        return result

    try:
        for stage in _STAGE_FUNCTIONS:
            stage(run)
    except _Unsupported as unsupported:
        return finish(Outcome.UNSUPPORTED, unsupported.reason)
    if preview:
        _preview(run)
    planes = run.bundle.card.planes
    if result.missing_planes:
        return finish(
            Outcome.PARTIAL,
            f"reported from {', '.join(p for p in planes if p in run.volumes)}; missing {', '.join(result.missing_planes)}",
        )
    return finish(Outcome.COMPLETE, f"all planes present ({', '.join(planes)})")
