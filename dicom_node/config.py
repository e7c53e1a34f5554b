"""node.yaml, parsed into typed, frozen objects at start-up.

Every section is a pydantic model that forbids unknown keys, so a typo is an error rather
than a silently ignored setting.  :func:`load_config` reports every problem with the dotted
key and the file it came from.  Relative paths are resolved against the folder of the file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_node.layout import DataLayout
from dicom_node.roles import ALL, parse_roles
from inference.config_files import ConfigFileError, error_locations, read_yaml
from inference.joint import DEFAULT_JOINT_RULES, JointRules
from inference.labels import JOINTS
from inference.selection import DEFAULT_RULES, SelectionRules

_AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")


class ConfigError(ConfigFileError):
    """A node.yaml problem; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or value.strip() == "" or "\\" in value:
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


class NodeSection(_Section):
    name: str = "orthonode"
    data_dir: Path = Path("./data")
    institution: str = ""
    #: what this process runs: ``all`` (the default), or some of ``listener``, ``worker``,
    #: ``exporter`` (comma-separated); ``orthonode serve --role`` overrides it
    role: str = ALL

    @field_validator("role")
    @classmethod
    def _known_roles(cls, value: str) -> str:
        parse_roles(value)
        return value.strip()

    @property
    def roles(self) -> tuple[str, ...]:
        return parse_roles(self.role)


class AllowedCaller(_Section):
    ae_title: str
    hosts: tuple[str, ...] = ()  # empty = any host

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value)


class TLSSection(_Section):
    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _files_when_enabled(self) -> "TLSSection":
        if self.enabled:
            for key in ("certificate", "private_key"):
                if not getattr(self, key):
                    raise ValueError(f"{key} is required when tls.enabled is true")
        return self


class ListenerSection(_Section):
    ae_titles: tuple[str, ...] = ("ORTHONODE",)
    bind_address: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(8, ge=1)
    allow_any_caller: bool = False
    allowed_callers: tuple[AllowedCaller, ...] = (
        AllowedCaller(ae_title="ORTHANC", hosts=("127.0.0.1",)),
        AllowedCaller(ae_title="STORESCU", hosts=("127.0.0.1",)),
    )
    accept_sop_classes: tuple[str, ...] = ("MRImageStorage", "EnhancedMRImageStorage")
    ignore_sop_classes: tuple[str, ...] = ("GrayscaleSoftcopyPresentationStateStorage",)
    duplicate_policy: Literal["keep_first", "overwrite", "reject_if_different"] = "reject_if_different"
    tls: TLSSection = TLSSection()

    @field_validator("ae_titles")
    @classmethod
    def _titles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one AE title is required")
        return tuple(_check_ae(v) for v in value)

    @field_validator("accept_sop_classes", "ignore_sop_classes")
    @classmethod
    def _sop_classes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from pydicom.uid import UID
        from pynetdicom import sop_class

        resolved = []
        for name in value:
            if re.match(r"^[0-9.]+$", name):
                resolved.append(name)
            elif isinstance(getattr(sop_class, name, None), UID):
                resolved.append(name)
            else:
                raise ValueError(f"{name!r} is neither a SOP Class UID nor a pynetdicom SOP class name")
        return tuple(resolved)


class StorageSection(_Section):
    min_free_mb: int = Field(2048, ge=0)


class DatabaseSection(_Section):
    url: str = ""  # empty: SQLite (WAL) in data_dir


class StudyAssemblySection(_Section):
    series_quiet_seconds: float = Field(30, gt=0)
    study_quiet_seconds: float = Field(60, gt=0)
    forced_after_seconds: float = Field(900, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "StudyAssemblySection":
        if self.forced_after_seconds < self.study_quiet_seconds:
            raise ValueError("forced_after_seconds must be at least study_quiet_seconds")
        return self


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


def check_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else raises :class:`ValueError`."""
    if not _DEVICE_RE.match(value):
        raise ValueError(f"device {value!r}: use auto, cpu, cuda or cuda:N (one GPU per worker process: cuda:0, "
                         f"cuda:1, ..., or CUDA_VISIBLE_DEVICES)")
    return value


class JobsSection(_Section):
    #: the torch device of this process's workers: auto, cpu, cuda or cuda:N
    device: str = "auto"
    workers: int = Field(1, ge=1)
    #: CPU threads torch may use for the networks (None: torch's default, one per core).  On a
    #: machine shared with other services fewer threads are often faster.
    torch_threads: int | None = Field(None, ge=1)
    #: load the model when the node starts rather than at the first study
    preload_model: bool = True
    #: a running job whose heartbeat (every 5 s) is older than this belongs to a dead worker and
    #: is queued again; at least 15 s
    lease_seconds: float = Field(60.0, ge=15.0)
    #: interruptions of one job while processing its study before it is marked failed
    max_attempts: int = Field(3, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)


#: the models of a node.yaml that names none: the demo model of each joint (`orthonode train demo`)
DEFAULT_CHECKPOINTS = {joint: Path(f"./models/demo-{joint}.pt") for joint in JOINTS}


class ModelSection(_Section):
    """Which model reads which study.

    Either one ``checkpoint`` (any joint: studies of the other joints are unsupported), or
    ``checkpoints``, one per joint (``{knee: ..., ankle: ..., shoulder: ...}``): the joint the
    headers name chooses the model, and a joint without an entry is unsupported.  Each card's
    joint must be its key; ``orthonode serve`` and ``orthonode check-config`` check that.
    """

    checkpoint: Path | None = None
    checkpoints: dict[str, Path] = Field(default_factory=lambda: dict(DEFAULT_CHECKPOINTS))

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, value: object) -> object:
        """``checkpoint`` alone replaces the per-joint default; both together are refused."""
        if isinstance(value, dict) and value.get("checkpoint") is not None:
            if value.get("checkpoints"):
                raise ValueError("give model.checkpoint (one model) or model.checkpoints (one per joint), not both")
            value = {**value, "checkpoints": {}}
        return value

    @field_validator("checkpoints")
    @classmethod
    def _joints(cls, value: dict[str, Path]) -> dict[str, Path]:
        unknown = sorted(set(value) - set(JOINTS))
        if unknown:
            raise ValueError(f"unknown joint(s) {unknown}; joints are {list(JOINTS)}")
        return value

    @model_validator(mode="after")
    def _some_model(self) -> "ModelSection":
        if self.checkpoint is None and not self.checkpoints:
            raise ValueError("name a model: model.checkpoint, or model.checkpoints with one entry per joint")
        return self


class QueryAE(_Section):
    """The C-FIND SCP asked whether a DIMSE destination already holds an object (when the PACS
    answers queries on another AE title, host or port than the one it stores on)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value)


class Destination(_Section):
    type: Literal["dimse", "stowrs"]
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    url: str | None = None  # STOW-RS base URL, e.g. http://127.0.0.1:8042/dicom-web
    username: str | None = None
    password: str | None = None
    #: after a send whose outcome is unknown (the request went out, no response came back), ask
    #: the destination whether it holds the object before sending it again (C-FIND at IMAGE
    #: level for dimse, QIDO-RS for stowrs), so that a result is not delivered twice
    verify_before_resend: bool = True
    #: dimse only: where to send that C-FIND (default: the destination's own AE)
    query: QueryAE | None = None
    #: stowrs only: the QIDO-RS base URL (default: ``url``)
    qido_url: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> "Destination":
        if self.type == "dimse":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) in (None, "")]
            if missing:
                raise ValueError(f"a dimse destination needs {', '.join(missing)}")
            _check_ae(self.ae_title or "")
            if self.qido_url is not None:
                raise ValueError("qido_url is for stowrs destinations; a dimse destination is queried "
                                 "by C-FIND (set query: {ae_title, host, port} to use another AE)")
        else:
            if not self.url:
                raise ValueError("a stowrs destination needs url")
            if self.query is not None:
                raise ValueError("query (a C-FIND AE) is for dimse destinations; a stowrs destination is "
                                 "queried by QIDO-RS (set qido_url to use another base URL)")
        if not self.verify_before_resend and (self.query is not None or self.qido_url is not None):
            which = "query" if self.query is not None else "qido_url"
            raise ValueError(f"{which} is set but verify_before_resend is false, so it would never be used")
        return self


class Route(_Section):
    match: dict[str, str] = {}
    destinations: tuple[str, ...]

    @field_validator("match")
    @classmethod
    def _keys(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = set(value) - {"calling_ae_title", "joint"}
        if unknown:
            raise ValueError(f"unknown match keys {sorted(unknown)} (allowed: calling_ae_title, joint)")
        for key, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"match.{key} is not a valid regular expression: {exc}") from None
        return value


class RetrySection(_Section):
    max_attempts: int = Field(5, ge=1)
    initial_delay_seconds: float = Field(30, gt=0)
    max_delay_seconds: float = Field(900, gt=0)


class ExportSection(_Section):
    destinations: dict[str, Destination] = {
        "pacs": Destination(type="dimse", ae_title="ORTHANC", host="127.0.0.1", port=4242)
    }
    routes: tuple[Route, ...] = (Route(match={}, destinations=("pacs",)),)
    retry: RetrySection = RetrySection()

    @model_validator(mode="after")
    def _routes_name_destinations(self) -> "ExportSection":
        for i, route in enumerate(self.routes):
            for name in route.destinations:
                if name not in self.destinations:
                    raise ValueError(f"routes[{i}] names destination {name!r}, which is not defined")
        return self


class HTTPSection(_Section):
    bind_address: str = "127.0.0.1"
    port: int = Field(8090, ge=1, le=65535)
    enabled: bool = True


class RetentionSection(_Section):
    """When received studies and their results are deleted (:mod:`dicom_node.services.retention`).

    Off by default: deleting patient data is a decision an administrator takes deliberately.
    Ages count from a study's last activity (last instance, job end, export delivery).
    """

    #: delete studies at all (the scheduled purge of ``orthonode serve`` and ``orthonode purge``)
    enabled: bool = False
    #: days a study is kept after its results were delivered to every destination
    delivered_days: float = Field(30.0, gt=0)
    #: days a study is kept when something needs a person to look: processing failed, the study
    #: was unsupported, an export failed for good, or no export route matched
    failed_days: float = Field(90.0, gt=0)
    #: minutes between two scheduled purges of ``orthonode serve``
    interval_minutes: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _failed_kept_longer(self) -> "RetentionSection":
        if self.failed_days < self.delivered_days:
            raise ValueError(f"failed_days ({self.failed_days:g}) must be at least delivered_days "
                             f"({self.delivered_days:g}): failed and unsupported studies are kept longer so that "
                             f"someone can look at them")
        return self


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_phi: bool = False


class NodeConfig(_Section):
    node: NodeSection = NodeSection()
    listener: ListenerSection = ListenerSection()
    storage: StorageSection = StorageSection()
    database: DatabaseSection = DatabaseSection()
    study_assembly: StudyAssemblySection = StudyAssemblySection()
    jobs: JobsSection = JobsSection()
    model: ModelSection = ModelSection()
    export: ExportSection = ExportSection()
    http: HTTPSection = HTTPSection()
    retention: RetentionSection = RetentionSection()
    logging: LoggingSection = LoggingSection()
    series_selection: SelectionRules = DEFAULT_RULES
    joints: JointRules = DEFAULT_JOINT_RULES
    #: folder of the file this came from; relative paths resolve against it
    base_dir: Path = Path(".")

    @field_validator("series_selection", "joints", mode="before")
    @classmethod
    def _over_defaults(cls, value: object, info) -> object:
        """A partial section overrides only the keys it names; the rest keep the built-in rules."""
        if isinstance(value, dict):
            default = DEFAULT_RULES if info.field_name == "series_selection" else DEFAULT_JOINT_RULES
            return _deep_merge(default.model_dump(mode="json"), value)
        return value

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.node.data_dir)

    @property
    def checkpoint(self) -> Path | None:
        """The single model's file, resolved; None when ``model.checkpoints`` names one per joint."""
        return None if self.model.checkpoint is None else self.resolve(self.model.checkpoint)

    @property
    def checkpoints(self) -> dict[str, Path]:
        """The per-joint models' files, resolved (empty with a single ``model.checkpoint``)."""
        return {joint: self.resolve(path) for joint, path in self.model.checkpoints.items()}

    def model_files(self) -> dict[str, Path]:
        """Every configured model file by its key: the joint, or ``checkpoint`` for the single one."""
        return self.checkpoints if self.model.checkpoints else {"checkpoint": self.checkpoint}

    @property
    def layout(self) -> DataLayout:
        """The data folder's paths (:mod:`dicom_node.layout`)."""
        return DataLayout(self.data_dir)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.layout.database}"


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {len(exc.errors())} problem(s) in the node configuration"]
    for loc, msg in error_locations(exc):
        key = ".".join(str(p) for p in loc) or "(top level)"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<config>", base_dir: Path | None = None) -> NodeConfig:
    """Validate an already-parsed mapping; ``source`` names it in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    if "base_dir" in data:
        raise ConfigError(f"{source}: base_dir: not a configuration key")
    try:
        return NodeConfig(**data, base_dir=base_dir or Path("."))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate node.yaml."""
    path = Path(path)
    data = read_yaml(path, ConfigError, "configuration file")
    return parse_config(data, source=str(path), base_dir=path.resolve().parent)
