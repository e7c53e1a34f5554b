"""Generate a phantom data set: DICOM studies, ground-truth masks and a case table.

Output layout (other code and tests rely on it)::

    DIR/cases.csv                                  one row per case: identity, EHR, labels
    DIR/<case_id>/dicom/<SeriesNumber>_<plane>/IMG0001.dcm ...
    DIR/<case_id>/masks/<SeriesInstanceUID>.nii.gz  knee only: structure labels per series grid
    DIR/<case_id>/preview.png                      with ``preview=True``

Every case draws three independent random streams from ``(seed, joint, case index)``: one
for the site (when not fixed), one for the anatomy and one for the acquisition.  Fixing the
site therefore leaves the anatomy and the labels of every case unchanged, and the same seed
always gives identical files (UIDs included).
"""
from __future__ import annotations

import csv
import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from inference.labels import JOINTS, label_keys
from training.phantoms.acquisition import AcquiredSeries, BiasField, SeriesPlan, acquire_series, plan_protocol
from training.phantoms.anatomy import Anatomy, CaseSpec
from training.phantoms.dicom_writer import TRANSFER_SYNTAXES, StudyContext, write_series
from training.phantoms.sites import SITES, SiteProfile, get_site

log = logging.getLogger(__name__)

CASES_CSV = "cases.csv"
CASE_COLUMNS: tuple[str, ...] = ("case_id", "joint", "site", "laterality", "age", "sex", "height_m", "weight_kg")


class CaseSource(Protocol):
    """Where cases come from: :mod:`training.phantoms.cases` or any object with these two functions."""

    def sample_case(self, joint: str, rng: np.random.Generator, case_id: str, site: str) -> CaseSpec: ...

    def build_anatomy(self, spec: CaseSpec) -> Anatomy: ...


def default_case_source() -> CaseSource:
    """The anatomical models of :mod:`training.phantoms.cases`, imported on first use."""
    try:
        return importlib.import_module("training.phantoms.cases")  # type: ignore[return-value]
    except ModuleNotFoundError as exc:
        if exc.name != "training.phantoms.cases":
            raise
        raise RuntimeError("training.phantoms.cases (the anatomical models) is not available in this installation") from exc


@dataclass(eq=False)
class GeneratedCase:
    """One generated case: its spec, its series (pixels and ground truth) and where they went."""

    spec: CaseSpec
    series: list[AcquiredSeries]
    study: StudyContext
    case_dir: Path


def case_id_for(joint: str, index: int) -> str:
    """Identifier of the ``index``-th (0-based) case of a joint: ``knee_0001``, ..."""
    return f"{joint}_{index + 1:04d}"


def _streams(seed: int, joint: str, index: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    sequence = np.random.SeedSequence([int(seed), JOINTS.index(joint), int(index)])
    site_seq, anatomy_seq, acquisition_seq = sequence.spawn(3)
    return np.random.default_rng(site_seq), np.random.default_rng(anatomy_seq), np.random.default_rng(acquisition_seq)


def _check_arguments(joint: str, cases: int, seed: int, site: str | None, transfer_syntax: str, matrix: int) -> None:
    if joint not in JOINTS:
        raise ValueError(f"joint must be one of {JOINTS}, got {joint!r}")
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if site is not None:
        get_site(site)
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")
    if not 32 <= matrix <= 1024:
        raise ValueError(f"matrix must be between 32 and 1024, got {matrix}")


@dataclass(eq=False)
class PlannedCase:
    """A case drawn and planned but not yet imaged: what :func:`generate_case` will acquire."""

    spec: CaseSpec
    anatomy: Anatomy
    site: SiteProfile
    plans: list[SeriesPlan]
    study: StudyContext
    bias: BiasField
    rng: np.random.Generator  # the acquisition stream, positioned after planning


def plan_case(
    joint: str,
    index: int,
    seed: int = 0,
    site: str | None = None,
    matrix: int = 256,
    case_source: CaseSource | None = None,
    oblique: bool | None = None,
    distractor: str | None = None,
) -> PlannedCase:
    """Draw case number ``index`` (0-based) and plan its examination, without imaging it.

    Cheap (no anatomy evaluation), so callers can look at the labels and the protocol of
    many cases before generating some.  ``oblique`` and ``distractor`` override the random
    protocol choices (see :func:`training.phantoms.acquisition.plan_protocol`).
    """
    _check_arguments(joint, 1, seed, site, "explicit", matrix)
    source = case_source if case_source is not None else default_case_source()
    site_rng, anatomy_rng, acq_rng = _streams(seed, joint, index)
    site_name = site if site is not None else str(site_rng.choice(list(SITES)))
    profile = get_site(site_name)
    case_id = case_id_for(joint, index)
    spec = source.sample_case(joint, anatomy_rng, case_id, site_name)
    if spec.joint != joint or spec.case_id != case_id or spec.site != site_name:
        raise ValueError(
            f"sample_case returned joint/case_id/site {spec.joint!r}/{spec.case_id!r}/{spec.site!r}, "
            f"expected {joint!r}/{case_id!r}/{site_name!r}"
        )
    anatomy = source.build_anatomy(spec)
    plans = plan_protocol(anatomy, spec, profile, acq_rng, matrix=matrix, oblique=oblique, distractor=distractor)
    study = StudyContext.create(spec, profile, f"orthonode-phantom/{seed}/{joint}/{case_id}/{site_name}/{matrix}", acq_rng)
    bias = BiasField.random(anatomy.center, profile.bias_strength, acq_rng)
    return PlannedCase(spec=spec, anatomy=anatomy, site=profile, plans=plans, study=study, bias=bias, rng=acq_rng)


def generate_case(
    out: Path,
    joint: str,
    index: int,
    seed: int = 0,
    site: str | None = None,
    transfer_syntax: str = "explicit",
    matrix: int = 256,
    preview: bool = False,
    case_source: CaseSource | None = None,
    oblique: bool | None = None,
    distractor: str | None = None,
) -> GeneratedCase:
    """Generate and write case number ``index`` (0-based) of a data set into ``out/<case_id>/``.

    ``oblique`` and ``distractor`` override the random protocol choices (see
    :func:`training.phantoms.acquisition.plan_protocol`); the defaults draw them.
    """
    _check_arguments(joint, 1, seed, site, transfer_syntax, matrix)
    case_dir = Path(out) / case_id_for(joint, index)
    if case_dir.exists() and any(case_dir.iterdir()):
        # a rerun with other settings would leave stale series next to the new ones
        raise FileExistsError(f"case folder {case_dir} already exists and is not empty; choose another output folder")
    planned = plan_case(joint, index, seed, site, matrix, case_source, oblique, distractor)
    spec, study = planned.spec, planned.study
    series: list[AcquiredSeries] = []
    for plan in planned.plans:
        acquired = acquire_series(planned.anatomy, plan, planned.site, planned.bias, planned.rng)
        write_series(acquired, study, case_dir / "dicom" / plan.folder_name, transfer_syntax)
        if joint == "knee" and len(plan.stacks) == 1:
            write_mask(case_dir / "masks" / f"{study.series_uid(plan.series_number)}.nii.gz", acquired)
        series.append(acquired)
    if preview:
        from training.phantoms.preview import write_preview  # matplotlib only when asked for

        write_preview(case_dir / "preview.png", spec, series)
    return GeneratedCase(spec=spec, series=series, study=study, case_dir=case_dir)


def write_mask(path: Path, series: AcquiredSeries) -> None:
    """Write the structure labels of a single-stack series as NIfTI on that series' grid.

    The array axes are (column, row, slice) and the affine maps them to the same physical
    points as the DICOM images; NIfTI is RAS, so the LPS affine gets its x and y rows negated.
    """
    import nibabel as nib

    if len(series.plan.stacks) != 1:
        raise ValueError(f"series {series.plan.series_number}: a mask needs a single slice stack, got {len(series.plan.stacks)}")
    stack = series.plan.stacks[0]
    data = np.ascontiguousarray(series.structures[0].transpose(2, 1, 0)).astype(np.uint8)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ stack.affine_lps()
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"orthonode phantom knee structures"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.1f}"
    return str(value)


def case_row(spec: CaseSpec) -> dict[str, str]:
    """The cases.csv row of one case (missing EHR values as empty cells)."""
    keys = label_keys(spec.joint)
    missing = [key for key in keys if key not in spec.labels]
    if missing:
        raise ValueError(f"case {spec.case_id}: labels lack {missing}")
    row = {
        "case_id": spec.case_id,
        "joint": spec.joint,
        "site": spec.site,
        "laterality": spec.laterality,
        "age": _csv_value(spec.age),
        "sex": _csv_value(spec.sex),
        "height_m": _csv_value(spec.height_m),
        "weight_kg": _csv_value(spec.weight_kg),
    }
    for key in keys:
        value = int(spec.labels[key])
        if value not in (0, 1):
            raise ValueError(f"case {spec.case_id}: label {key!r} must be 0 or 1, got {spec.labels[key]!r}")
        row[key] = str(value)
    return row


def write_cases_csv(path: Path, specs: list[CaseSpec]) -> None:
    """Write ``cases.csv`` for cases of one joint."""
    if not specs:
        raise ValueError("write_cases_csv: no cases")
    joints = {spec.joint for spec in specs}
    if len(joints) != 1:
        raise ValueError(f"write_cases_csv: cases of one joint expected, got {sorted(joints)}")
    columns = list(CASE_COLUMNS) + list(label_keys(specs[0].joint))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for spec in specs:
            writer.writerow(case_row(spec))


def generate_dataset(
    out: Path,
    joint: str,
    cases: int,
    seed: int = 0,
    site: str | None = None,
    transfer_syntax: str = "explicit",
    matrix: int = 256,
    preview: bool = False,
    *,
    case_source: CaseSource | None = None,
) -> list[CaseSpec]:
    """Generate ``cases`` phantom studies of ``joint`` into ``out`` and return their specs.

    ``site`` fixes one site profile for all cases (to hold a site out); otherwise each case
    draws its site.  ``case_source`` replaces :mod:`training.phantoms.cases` (tests use a
    simpler anatomy).
    """
    _check_arguments(joint, cases, seed, site, transfer_syntax, matrix)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = case_source if case_source is not None else default_case_source()
    specs: list[CaseSpec] = []
    for index in range(cases):
        started = time.perf_counter()
        case = generate_case(out, joint, index, seed, site, transfer_syntax, matrix, preview, case_source=source)
        specs.append(case.spec)
        log.info(
            "%s: %s, %d series, %.1f s", case.spec.case_id, case.spec.site, len(case.series), time.perf_counter() - started
        )
    write_cases_csv(out / CASES_CSV, specs)
    return specs
