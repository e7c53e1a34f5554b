"""Choose one series per plane (sagittal, coronal, axial) from a study, with reasons.

The rules are data (``node.yaml`` holds them) parsed into frozen pydantic models.  The plane
of a series comes from its geometry (:func:`inference.planes.nearest_plane`), never from its
description; descriptions only rank the candidates of a plane (``prefer``: earlier patterns
win) or exclude them (``avoid``).  Every choice and every rejection is written to the log
in words an administrator can act on: which series (number and description), which rule,
which value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inference.labels import PLANES
from inference.planes import is_localizer, nearest_plane
from inference.series import SeriesInfo


def check_patterns(patterns: Sequence[str], key: str) -> list[str]:
    """``patterns`` as a list when each compiles as a case-insensitive regular expression;
    otherwise a ``ValueError`` naming ``key[index]`` (a configuration error)."""
    for index, pattern in enumerate(patterns):
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(
                f"{key}[{index}] is not a valid regular expression ({pattern!r}): {exc}"
            ) from None
    return list(patterns)


class PlaneRule(BaseModel):
    """How to pick the series of one plane.

    ``prefer`` and ``avoid`` are case-insensitive regular expressions searched in
    SeriesDescription and ProtocolName.  A candidate matching ``prefer[0]`` beats one
    matching ``prefer[1]``, which beats one matching none.  Ties go to thinner slices, then
    to the smaller obliquity, then to the higher series number (a repeated acquisition
    usually replaces a moved one).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefer: list[str] = Field(default_factory=list)
    avoid: list[str] = Field(default_factory=list)
    min_slices: int = Field(default=8, ge=1)
    max_slice_thickness_mm: float = Field(default=6.0, gt=0)
    max_obliquity_deg: float = Field(default=40.0, ge=0, le=90)

    @field_validator("prefer")
    @classmethod
    def _check_prefer(cls, value: list[str]) -> list[str]:
        return check_patterns(value, "prefer")

    @field_validator("avoid")
    @classmethod
    def _check_avoid(cls, value: list[str]) -> list[str]:
        return check_patterns(value, "avoid")


class SelectionRules(BaseModel):
    """One :class:`PlaneRule` per plane and the modalities considered at all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sagittal: PlaneRule
    coronal: PlaneRule
    axial: PlaneRule
    modalities: list[str] = Field(default_factory=lambda: ["MR"])

    @model_validator(mode="after")
    def _check_modalities(self) -> SelectionRules:
        if not self.modalities:
            raise ValueError("modalities must name at least one modality (e.g. ['MR'])")
        return self

    def rule(self, plane: str) -> PlaneRule:
        """The rule of ``plane``."""
        if plane not in PLANES:
            raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
        return getattr(self, plane)


# Token boundaries: vendors join words with '_' (PD_FS_SAG), which \b treats as a letter.
_B = r"(?<![a-z0-9])"
_E = r"(?![a-z0-9])"
_PD = rf"{_B}(pd|pdw|pd[ _-]?w|dp|proton[ _-]?density){_E}"
_T2 = rf"{_B}(t2|t2w|t2[ _-]?w){_E}"
_FS = rf"({_B}(fs|fat[ _-]?sat|fatsat|fat[ _-]?sup\w*|spair|spir|chess|fsat|f[ _-]?s){_E}|{_B}(fse|tse)[ _-]?fs{_E})"
_STIR = rf"{_B}(stir|tirm){_E}"
_DESS = rf"{_B}(dess|we[ _-]?dess){_E}"
_T1 = rf"{_B}(t1|t1w|t1[ _-]?w){_E}"

_FAT_SAT_PD = rf"{_PD}.*{_FS}|{_FS}.*{_PD}|{_B}(pdfs|pdwfs|dpfs){_E}"
_FAT_SAT_T2 = rf"{_T2}.*{_FS}|{_FS}.*{_T2}|{_B}(t2fs|t2wfs){_E}"

#: series no model should see: scouts, derived projections, subtractions, diffusion maps,
#: coil calibration.  Post-contrast series are not avoided: in an MR arthrogram the
#: fat-suppressed T1 after intra-articular contrast is the fluid-sensitive series.
_AVOID = [
    rf"{_B}(localizer|localiser|loc|scout|survey|tri[ _-]?pilot|3[ _-]?plane){_E}",
    rf"{_B}(mip|mpr|reformat\w*|sub|subtraction){_E}",
    rf"{_B}(dwi|adc|trace|diffusion|dti){_E}",
    rf"{_B}(cal|calibration|asset[ _-]?cal|coil[ _-]?cal){_E}",
]

#: preference order of the defaults: 1 fat-suppressed PD, 2 fat-suppressed T2, 3 STIR,
#: 4 DESS, 5 PD, 6 T2, 7 T1 (then anything else)
_PREFER_FLUID = [_FAT_SAT_PD, _FAT_SAT_T2, _STIR, _DESS, _PD, _T2]

#: sensible for knee, ankle and shoulder: fluid-sensitive fat-suppressed PD/T2 first (what
#: the models were trained on), then STIR/DESS, then plain PD/T2; T1 only when nothing else
DEFAULT_RULES = SelectionRules(
    sagittal=PlaneRule(
        prefer=_PREFER_FLUID + [_T1],
        avoid=_AVOID,
        min_slices=8,
        max_slice_thickness_mm=6.0,
        max_obliquity_deg=40.0,
    ),
    coronal=PlaneRule(
        prefer=_PREFER_FLUID + [_T1],
        avoid=_AVOID,
        min_slices=8,
        max_slice_thickness_mm=6.0,
        max_obliquity_deg=40.0,
    ),
    axial=PlaneRule(
        prefer=_PREFER_FLUID + [_T1],
        avoid=_AVOID,
        min_slices=8,
        max_slice_thickness_mm=6.0,
        max_obliquity_deg=30.0,
    ),
)


@dataclass
class Selection:
    """The series chosen per plane, the planes left without one, and the reasons."""

    chosen: dict[str, SeriesInfo]
    missing: list[str]
    log: list[str] = field(default_factory=list)


def _first_match(patterns: Sequence[str], info: SeriesInfo) -> tuple[int, str] | None:
    """Index of the first pattern found in the description or protocol, and the text it matched.

    Logs quote the matched words ('PD_FS'), not the pattern: an administrator reads the
    former, while the patterns are long regular expressions.
    """
    texts = [t for t in (info.series_description, info.protocol_name) if t]
    for index, pattern in enumerate(patterns):
        regex = re.compile(pattern, re.IGNORECASE)
        for text in texts:
            found = regex.search(text)
            if found is not None:
                return index, found.group(0)
    return None


def _describe(info: SeriesInfo) -> str:
    parts = [info.label()]
    if info.protocol_name and info.protocol_name != info.series_description:
        parts.append(f"(protocol {info.protocol_name!r})")
    return " ".join(parts)


def _geometry_words(info: SeriesInfo, plane: str, obliquity: float) -> str:
    thickness = "unknown thickness" if info.slice_thickness is None else f"{info.slice_thickness:g} mm slices"
    tilt = f"{plane}" if obliquity < 1.0 else f"{plane}-oblique {obliquity:.0f} degrees"
    return f"{info.num_frames} slices, {thickness}, {tilt}"


def select_series(series: list[SeriesInfo], rules: SelectionRules = DEFAULT_RULES) -> Selection:
    """One series per plane by ``rules``; ``missing`` lists planes that got none."""
    log: list[str] = []
    candidates: dict[str, list[tuple[SeriesInfo, float]]] = {plane: [] for plane in PLANES}
    modalities = {m.upper() for m in rules.modalities}
    for info in series:
        name = _describe(info)
        if info.modality.upper() not in modalities:
            log.append(
                f"{name}: not used: modality {info.modality or 'missing'} is not one of {sorted(modalities)}"
            )
            continue
        if is_localizer(info):
            why = "a localizer/scout"
            if "LOCALIZER" in info.image_type:
                why += " (ImageType LOCALIZER)"
            elif info.orientation_count > 1:
                why += f" (slices in {info.orientation_count} different planes)"
            elif info.num_frames <= 3:
                why += f" (only {info.num_frames} slice(s))"
            else:
                why += " (its description names it one)"
            log.append(f"{name}: not used: {why}")
            continue
        if info.orientation is None:
            log.append(f"{name}: not used: no usable ImageOrientationPatient, so its plane is unknown")
            continue
        plane, obliquity = nearest_plane(info.orientation)
        rule = rules.rule(plane)
        reasons = []
        if obliquity > rule.max_obliquity_deg:
            reasons.append(f"{obliquity:.0f} degrees oblique from {plane} (limit {rule.max_obliquity_deg:g})")
        if info.num_frames < rule.min_slices:
            reasons.append(f"{info.num_frames} slices (needs at least {rule.min_slices})")
        if info.slice_thickness is not None and info.slice_thickness > rule.max_slice_thickness_mm:
            reasons.append(f"{info.slice_thickness:g} mm slices (limit {rule.max_slice_thickness_mm:g} mm)")
        avoided = _first_match(rule.avoid, info)
        if avoided is not None:
            reasons.append(f"{avoided[1]!r} matches avoid pattern #{avoided[0] + 1}")
        if reasons:
            log.append(f"{name}: rejected for {plane}: " + "; ".join(reasons))
            continue
        candidates[plane].append((info, obliquity))

    chosen: dict[str, SeriesInfo] = {}
    missing: list[str] = []
    for plane in PLANES:
        rule = rules.rule(plane)
        ranked = []
        for info, obliquity in candidates[plane]:
            match = _first_match(rule.prefer, info)
            rank = match[0] if match is not None else len(rule.prefer)
            thickness = info.slice_thickness if info.slice_thickness is not None else float("inf")
            number = info.series_number if info.series_number is not None else -1
            ranked.append(((rank, thickness, round(obliquity, 1), -number), info, obliquity, match))
        if not ranked:
            missing.append(plane)
            log.append(f"{plane}: no usable series; this plane is missing")
            continue
        ranked.sort(key=lambda item: item[0])
        _, best, best_obliquity, best_match = ranked[0]
        chosen[plane] = best
        why = (
            f"{best_match[1]!r} matches preference #{best_match[0] + 1} of {len(rule.prefer)}"
            if best_match is not None
            else "matches no preference; best by slice thickness, obliquity and series number"
        )
        log.append(f"{plane}: chose {_describe(best)}: {why}; {_geometry_words(best, plane, best_obliquity)}")
        for _rank, info, _obliquity, match in ranked[1:]:
            if match is not None and best_match is not None and match[0] == best_match[0]:
                because = (
                    f"same preference #{match[0] + 1}; the chosen one has thinner slices, "
                    "less obliquity or a later series number"
                )
            elif match is not None:
                because = f"{match[1]!r} matches only preference #{match[0] + 1}"
            else:
                because = "matches no preference"
            log.append(f"{plane}: not chosen: {_describe(info)}: {because}")
    return Selection(chosen=chosen, missing=missing, log=log)
