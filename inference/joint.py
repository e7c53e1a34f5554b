"""Which joint a study shows (knee, ankle, shoulder), from its headers, with the reason.

Evidence is weighed by how much it can be trusted: BodyPartExamined is a coded-ish field
filled from the scanner's anatomy selection, so it decides alone when it is specific; many
sites write a generic value ("EXTREMITY", "LEG") or nothing, and then the StudyDescription
(from the order) decides, and then the SeriesDescription/ProtocolName of the series (the
scanner protocol tree is usually organised by joint).  Conflicting evidence at one level
is reported, not resolved by guessing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inference.labels import JOINTS
from inference.selection import check_patterns
from inference.series import SeriesInfo

_B = r"(?<![a-z0-9])"
_E = r"(?![a-z0-9])"


class JointPatterns(BaseModel):
    """Case-insensitive regular expressions that name one joint in each header field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    body_part: list[str] = Field(default_factory=list)
    study_description: list[str] = Field(default_factory=list)
    series_description: list[str] = Field(default_factory=list)
    protocol_name: list[str] = Field(default_factory=list)

    @field_validator("body_part", "study_description", "series_description", "protocol_name")
    @classmethod
    def _valid(cls, value: list[str], info: object) -> list[str]:
        return check_patterns(value, getattr(info, "field_name", "pattern"))

    def matches(self, field_name: str, text: str) -> bool:
        """True when any pattern of ``field_name`` is found in ``text``."""
        return bool(text) and any(re.search(p, text, re.IGNORECASE) for p in getattr(self, field_name))


class JointRules(BaseModel):
    """Patterns per joint; keys must be joints of :data:`inference.labels.JOINTS`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    joints: dict[str, JointPatterns]

    @model_validator(mode="after")
    def _known_joints(self) -> JointRules:
        unknown = sorted(set(self.joints) - set(JOINTS))
        if unknown:
            raise ValueError(f"joints has unknown key(s) {unknown}; joints must be among {list(JOINTS)}")
        if not self.joints:
            raise ValueError("joints must define patterns for at least one joint")
        return self


# short tokens (ACL, OSG) need an end boundary too: "Osgood-Schlatter" is a knee question
_KNEE = [
    rf"{_B}(knee|knie|genou|rodilla|ginocchio|joelho|kolano)",
    rf"{_B}(menisc\w*|patell\w*|acl|pcl){_E}",
]
_ANKLE = [
    rf"{_B}(ankle|sprunggelenk|cheville|tobillo|caviglia|tornozelo|hindfoot|talus|achill)",
    rf"{_B}(osg|foot[ _&-]*(and|&)?[ _-]*ankle){_E}",
]
_SHOULDER = [
    rf"{_B}(shoulder|schulter|epaule|épaule|hombro|spalla|ombro|skulder)",
    rf"{_B}(rotator|glenoh|labrum|supraspin)",
]

DEFAULT_JOINT_RULES = JointRules(
    joints={
        "knee": JointPatterns(
            body_part=[r"^\s*(knee|knie|genou)\s*$"],
            study_description=_KNEE,
            series_description=_KNEE,
            protocol_name=_KNEE,
        ),
        "ankle": JointPatterns(
            body_part=[r"^\s*(ankle|sprunggelenk|cheville|foot ?and ?ankle|ankle ?foot)\s*$"],
            study_description=_ANKLE,
            series_description=_ANKLE,
            protocol_name=_ANKLE,
        ),
        "shoulder": JointPatterns(
            body_part=[r"^\s*(shoulder|schulter|epaule)\s*$"],
            study_description=_SHOULDER,
            series_description=_SHOULDER,
            protocol_name=_SHOULDER,
        ),
    }
)


def _votes(
    series: list[SeriesInfo], rules: JointRules, field_name: str, value: Callable[[SeriesInfo], str]
) -> tuple[Counter[str], list[str]]:
    """Per joint, how many series have a ``field_name`` that names it; and the values seen."""
    votes: Counter[str] = Counter()
    seen: list[str] = []
    for info in series:
        text = value(info)
        if not text:
            continue
        seen.append(text)
        for joint, patterns in rules.joints.items():
            if patterns.matches(field_name, text):
                votes[joint] += 1
    return votes, seen


def detect_joint(series: list[SeriesInfo], rules: JointRules = DEFAULT_JOINT_RULES) -> tuple[str | None, str]:
    """``(joint, reason)``, or ``(None, reason)`` when the headers do not say or disagree."""
    if not series:
        return None, "no series to look at"
    levels: list[tuple[str, str, Callable[[SeriesInfo], str]]] = [
        ("BodyPartExamined", "body_part", lambda s: s.body_part),
        ("StudyDescription", "study_description", lambda s: s.study_description),
        ("SeriesDescription", "series_description", lambda s: s.series_description),
        ("ProtocolName", "protocol_name", lambda s: s.protocol_name),
    ]
    notes: list[str] = []
    for tag, field_name, value in levels:
        votes, seen = _votes(series, rules, field_name, value)
        if not votes:
            if seen:
                distinct = sorted(set(seen))[:4]
                notes.append(f"{tag} {distinct} names no joint")
            continue
        if len(votes) > 1:
            detail = ", ".join(f"{joint} in {count} series" for joint, count in votes.most_common())
            return None, f"{tag} names different joints ({detail}); not guessing"
        joint, count = next(iter(votes.items()))
        examples = sorted({value(s) for s in series if rules.joints[joint].matches(field_name, value(s))})[:3]
        reason = f"{tag} {examples} names the {joint} in {count} of {len(series)} series"
        if notes:
            reason += " (" + "; ".join(notes) + ")"
        return joint, reason
    return None, "no header names a joint" + (" (" + "; ".join(notes) + ")" if notes else "")
