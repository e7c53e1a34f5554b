"""SR report templates and SEG segment descriptions, kept as data and validated at load.

Each ``<joint>.yaml`` says how the node reports one joint in a TID 1500 Measurement Report:
the concept of every finding (a standard code where DICOM PS3.16 / SNOMED CT has one, else a
code of the project's private coding scheme), where it sits (finding site), and the words of
the impression.  ``structures.yaml`` describes the SEG segment of every knee structure
(property category/type, display colour).

Labels and structures themselves come from :mod:`inference.labels`; the YAML files only add
the DICOM coding.  Loading fails with an error that names the file and the key when:

- a label of the joint (or a knee structure) is missing, unknown or repeated;
- a code is malformed, or uses a scheme that is neither standard nor the declared private
  scheme;
- a code claims to be SNOMED CT (``SCT``) or DICOM (``DCM``) but is not in the PS3.16 tables
  that pydicom ships (value and meaning must match): this is what keeps invented SNOMED codes
  out of the outputs.
"""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.sr.coding import Code

from inference.config_files import ConfigFileError, error_locations, read_yaml
from inference.labels import JOINT_LABELS, JOINTS, KNEE_STRUCTURES, label_keys

TEMPLATE_DIR = Path(__file__).resolve().parent

#: Schemes whose codes are checked against pydicom's copy of the DICOM PS3.16 tables.
VERIFIED_SCHEMES: frozenset[str] = frozenset({"SCT", "DCM", "UCUM"})

#: PS3.5: Code Value is SH (16 chars); Code Meaning LO (64); scheme designator SH (16).
_PRIVATE_DESIGNATOR = re.compile(r"^99[A-Z0-9_]{1,14}$")
_PRIVATE_VALUE = re.compile(r"^[A-Z0-9][A-Z0-9_.-]{0,15}$")
_NUMERIC_VALUE = re.compile(r"^[0-9]{1,16}$")


class TemplateError(ConfigFileError):
    """A template file is unreadable or invalid; the message names the file and the key."""


@cache
def _standard_meanings(scheme: str) -> dict[str, frozenset[str]]:
    """value -> accepted meanings (lower case) for ``scheme`` from pydicom's PS3.16 tables.

    pydicom builds ``pydicom.sr.codedict.codes`` from this table; reading it directly avoids
    materialising ~11 000 ``Code`` objects just to validate a dozen codes.
    """
    from pydicom.sr._concepts_dict import concepts  # noqa: PLC0415 - only needed at load

    table: dict[str, set[str]] = {}
    for entries in concepts.get(scheme, {}).values():
        for value, (meaning, _cids) in entries.items():
            table.setdefault(value, set()).add(meaning.lower())
    return {value: frozenset(meanings) for value, meanings in table.items()}


class CodeSpec(BaseModel):
    """One coded concept as written in a template: scheme designator, value, meaning."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: str
    value: str
    meaning: Annotated[str, Field(min_length=1, max_length=64)]

    @field_validator("scheme", "value", "meaning")
    @classmethod
    def _no_padding(cls, text: str) -> str:
        if text != text.strip() or not text:
            raise ValueError(f"must be non-empty without leading/trailing blanks, got {text!r}")
        return text

    def code(self) -> Code:
        """The pydicom ``Code`` the writers use."""
        return Code(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)

    def check(self, private_designator: str) -> None:
        """Raise ``ValueError`` if the code is not well formed or not verifiable."""
        if self.scheme == private_designator:
            if not _PRIVATE_VALUE.match(self.value):
                raise ValueError(
                    f"private code value {self.value!r} must be 1-16 upper-case letters, digits, '_', '.', '-'"
                )
            return
        if self.scheme not in VERIFIED_SCHEMES:
            raise ValueError(
                f"coding scheme {self.scheme!r} is neither one of {sorted(VERIFIED_SCHEMES)} "
                f"nor the declared private scheme {private_designator!r}"
            )
        if self.scheme in ("SCT", "DCM") and not _NUMERIC_VALUE.match(self.value):
            raise ValueError(f"{self.scheme} code value must be numeric, got {self.value!r}")
        meanings = _standard_meanings(self.scheme).get(self.value)
        if meanings is None:
            raise ValueError(
                f"{self.scheme} code {self.value!r} ({self.meaning!r}) is not in the DICOM PS3.16 "
                f"tables; use the private coding scheme {private_designator!r} instead of a guessed code"
            )
        if self.meaning.lower() not in meanings:
            raise ValueError(
                f"{self.scheme} code {self.value!r} means {sorted(meanings)}, not {self.meaning!r}"
            )


class CodingSchemeSpec(BaseModel):
    """Declaration of the private coding scheme (PS3.3 C.12.1.1.2, Coding Scheme Identification)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    designator: str
    name: Annotated[str, Field(min_length=1, max_length=64)]
    responsible_organization: Annotated[str, Field(min_length=1, max_length=64)]
    version: Annotated[str, Field(min_length=1, max_length=16)]
    uid: str

    @field_validator("designator")
    @classmethod
    def _private_designator(cls, designator: str) -> str:
        # PS3.16 8.2: private coding scheme designators begin with "99".
        if not _PRIVATE_DESIGNATOR.match(designator):
            raise ValueError(f"private designator must match {_PRIVATE_DESIGNATOR.pattern}, got {designator!r}")
        return designator

    @field_validator("uid")
    @classmethod
    def _valid_uid(cls, uid: str) -> str:
        from pydicom.uid import UID  # noqa: PLC0415

        if not UID(uid).is_valid:
            raise ValueError(f"not a valid UID: {uid!r}")
        return uid

    def dataset(self) -> Any:
        """The Coding Scheme Identification Sequence item for this scheme."""
        from pydicom import Dataset  # noqa: PLC0415

        item = Dataset()
        item.CodingSchemeDesignator = self.designator
        item.CodingSchemeUID = self.uid
        item.CodingSchemeName = self.name
        item.CodingSchemeVersion = self.version
        item.CodingSchemeResponsibleOrganization = self.responsible_organization
        return item


class FindingSiteSpec(BaseModel):
    """TID 1501 finding site: an anatomic location with an optional topographical modifier."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    location: CodeSpec
    modifier: CodeSpec | None = None


class LabelTemplate(BaseModel):
    """How one diagnostic label is reported."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    #: display name, filled from :mod:`inference.labels` (never written in the YAML)
    name: str = ""
    concept: CodeSpec
    finding_site: FindingSiteSpec | None = None
    #: the segmented structure (inference.labels.KNEE_STRUCTURES key) the finding concerns: the
    #: SR places the finding on that structure's key slice when the label map holds it
    structure: str | None = None
    impression_present: Annotated[str, Field(min_length=1)]
    impression_absent: Annotated[str, Field(min_length=1)]


class JointTemplate(BaseModel):
    """The report template of one joint, validated against :mod:`inference.labels`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    joint: str
    title: Annotated[str, Field(min_length=1)]
    procedure: CodeSpec
    finding_site: CodeSpec
    coding_scheme: CodingSchemeSpec
    labels: tuple[LabelTemplate, ...]
    impression_normal: Annotated[str, Field(min_length=1)]

    @model_validator(mode="after")
    def _check(self) -> JointTemplate:
        if self.joint not in JOINTS:
            raise ValueError(f"joint must be one of {JOINTS}, got {self.joint!r}")
        designator = self.coding_scheme.designator
        for where, spec in (("procedure", self.procedure), ("finding_site", self.finding_site)):
            _checked(spec, designator, where)
        seen: set[str] = set()
        for item in self.labels:
            if item.key in seen:
                raise ValueError(f"label {item.key!r} is given twice")
            seen.add(item.key)
            _checked(item.concept, designator, f"label {item.key!r} concept")
            if item.structure is not None and item.structure not in {s.key for s in KNEE_STRUCTURES}:
                raise ValueError(
                    f"label {item.key!r} structure {item.structure!r} is not a structure of "
                    f"inference.labels.KNEE_STRUCTURES"
                )
            if item.finding_site is not None:
                _checked(item.finding_site.location, designator, f"label {item.key!r} finding_site.location")
                if item.finding_site.modifier is not None:
                    _checked(item.finding_site.modifier, designator, f"label {item.key!r} finding_site.modifier")
        expected = label_keys(self.joint)
        missing = [key for key in expected if key not in seen]
        if missing:
            raise ValueError(
                f"labels of joint {self.joint!r} missing key(s) {', '.join(map(repr, missing))} "
                f"(inference.labels requires {list(expected)})"
            )
        unknown = [key for key in seen if key not in expected]
        if unknown:
            raise ValueError(
                f"label key(s) {', '.join(map(repr, unknown))} are not labels of joint {self.joint!r} "
                f"(inference.labels: {list(expected)})"
            )
        return self

    def label(self, key: str) -> LabelTemplate:
        """The template of label ``key``."""
        for item in self.labels:
            if item.key == key:
                return item
        raise KeyError(f"joint {self.joint!r} has no label {key!r}; labels: {[i.key for i in self.labels]}")


class StructureTemplate(BaseModel):
    """SEG segment description of one knee structure (PS3.3 C.8.20.2 Segment Description)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    key: str
    label: Annotated[str, Field(min_length=1, max_length=64)]
    category: CodeSpec
    type: CodeSpec
    type_modifier: CodeSpec | None = None
    anatomic_region: CodeSpec | None = None
    color_rgb: tuple[int, int, int]

    @field_validator("color_rgb")
    @classmethod
    def _rgb(cls, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in rgb):
            raise ValueError(f"colour components must be 0-255, got {rgb}")
        return rgb


class StructureSet(BaseModel):
    """Content of ``structures.yaml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    coding_scheme: CodingSchemeSpec
    structures: tuple[StructureTemplate, ...]

    @model_validator(mode="after")
    def _check(self) -> StructureSet:
        designator = self.coding_scheme.designator
        for s in self.structures:
            for where in ("category", "type", "type_modifier", "anatomic_region"):
                spec = getattr(s, where)
                if spec is not None:
                    _checked(spec, designator, f"structure {s.key!r} {where}")
        by_key = {s.key: s for s in self.structures}
        if len(by_key) != len(self.structures):
            raise ValueError("a structure key is given twice")
        missing = [s.key for s in KNEE_STRUCTURES if s.key not in by_key]
        if missing:
            raise ValueError(
                f"structures missing key(s) {', '.join(map(repr, missing))} (inference.labels.KNEE_STRUCTURES)"
            )
        known = {s.key for s in KNEE_STRUCTURES}
        unknown = [k for k in by_key if k not in known]
        if unknown:
            raise ValueError(
                f"structure key(s) {', '.join(map(repr, unknown))} are not in inference.labels.KNEE_STRUCTURES"
            )
        return self


def _checked(spec: CodeSpec, designator: str, where: str) -> None:
    try:
        spec.check(designator)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path, TemplateError, "template file")
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _format_validation(path: Path, exc: ValidationError, data: dict[str, Any], list_key: str) -> TemplateError:
    """Turn pydantic locations like ('labels', 2, 'concept') into ("labels[acl].concept")."""
    parts = []
    for loc, message in error_locations(exc):
        if len(loc) >= 2 and loc[0] == list_key and isinstance(loc[1], int):
            items = data.get(list_key) or []
            if loc[1] < len(items) and isinstance(items[loc[1]], dict) and "key" in items[loc[1]]:
                loc[1] = f"[{items[loc[1]]['key']}]"
        where = ".".join(str(p) for p in loc).replace(".[", "[")
        parts.append(f"{where}: {message}" if where else message)
    return TemplateError(f"{path}: " + "; ".join(parts))


def load_template_file(path: str | Path) -> JointTemplate:
    """Load and validate one joint template file; label display names come from inference.labels."""
    path = Path(path)
    data = _read_yaml(path)
    for item in data.get("labels") or []:
        if isinstance(item, dict) and "name" in item:
            raise TemplateError(
                f"{path}: labels[{item.get('key')}].name: display names come from inference.labels; remove it"
            )
    try:
        template = JointTemplate.model_validate(data)
    except ValidationError as exc:
        raise _format_validation(path, exc, data, "labels") from None
    names = {label.key: label.name for label in JOINT_LABELS[template.joint]}
    ordered = sorted(template.labels, key=lambda item: label_keys(template.joint).index(item.key))
    labels = tuple(item.model_copy(update={"name": names[item.key]}) for item in ordered)
    return template.model_copy(update={"labels": labels})


@cache
def load_template(joint: str) -> JointTemplate:
    """The packaged template of ``joint`` (``sr_templates/<joint>.yaml``), labels in model order."""
    if joint not in JOINTS:
        raise ValueError(f"joint must be one of {JOINTS}, got {joint!r}")
    return load_template_file(TEMPLATE_DIR / f"{joint}.yaml")


@cache
def _packaged_structure_set() -> StructureSet:
    return load_structure_set()


def load_structure_set(path: str | Path | None = None) -> StructureSet:
    """Load and validate ``structures.yaml`` (or ``path``); structures in label-map order."""
    path = Path(path) if path is not None else TEMPLATE_DIR / "structures.yaml"
    data = _read_yaml(path)
    raw = data.get("structures")
    if not isinstance(raw, dict):
        raise TemplateError(f"{path}: 'structures' must be a mapping of structure key -> description")
    index = {s.key: s.index for s in KNEE_STRUCTURES}
    items = [
        {"key": key, "index": index.get(key, 0), **(value if isinstance(value, dict) else {"_": value})}
        for key, value in raw.items()
    ]
    flat = {**data, "structures": items}
    try:
        result = StructureSet.model_validate(flat)
    except ValidationError as exc:
        raise _format_validation(path, exc, flat, "structures") from None
    ordered = tuple(sorted(result.structures, key=lambda s: s.index))
    return result.model_copy(update={"structures": ordered})


def load_structures() -> list[StructureTemplate]:
    """Segment descriptions of the knee structures in label-map order (index 1..11)."""
    return list(_packaged_structure_set().structures)


def structures_coding_scheme() -> CodingSchemeSpec:
    """The private coding scheme that ``structures.yaml`` declares."""
    return _packaged_structure_set().coding_scheme


__all__ = [
    "CodeSpec",
    "CodingSchemeSpec",
    "FindingSiteSpec",
    "JointTemplate",
    "LabelTemplate",
    "StructureSet",
    "StructureTemplate",
    "TemplateError",
    "load_structure_set",
    "load_structures",
    "load_template",
    "load_template_file",
    "structures_coding_scheme",
]
