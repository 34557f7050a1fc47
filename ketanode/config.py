"""Typed settings: one TOML file, environment overrides, validated once at start.

Every key is documented, with its default, in ``config.example.toml``.
Environment variables override file values: ``KETANODE__SECTION__KEY=value``
(for example ``KETANODE__NODE__PORT=11113``); a value that parses as JSON is
taken as JSON (numbers, booleans, lists), anything else as a string.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "KETANODE__"
CONFIG_ENV = "KETANODE_CONFIG"

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII but backslash


class ConfigError(Exception):
    """A configuration problem, with a message that names the source and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_ae(value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value):
        raise ValueError("an AE title of 1 to 16 printable characters without backslash")
    return value


class AllowedCaller(_Section):
    ae_title: str
    address: str | None = None

    _ae = field_validator("ae_title")(_check_ae)


class TLSSettings(_Section):
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled:
            for name in ("certificate", "private_key"):
                value = getattr(self, name)
                if value is None:
                    raise ValueError(f"{name} is required when TLS is enabled")
                if not Path(value).is_file():
                    raise ValueError(f"{name} file {value} does not exist")
            if self.require_client_certificate and self.ca_certificates is None:
                raise ValueError("ca_certificates is required when require_client_certificate")
        return self


class NodeSettings(_Section):
    ae_title: str = "KETANODE"
    bind_address: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    require_allowed_caller: bool = True
    allowed_callers: list[AllowedCaller] = Field(
        default_factory=lambda: [
            AllowedCaller(ae_title="STORESCU", address="127.0.0.1"),
            AllowedCaller(ae_title="KETANODE_SCU", address="127.0.0.1"),
        ]
    )
    max_associations: int = Field(default=16, ge=1)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    # Seconds a new connection may take to send its A-ASSOCIATE-RQ (and for the ACSE
    # exchange): short, so an idle or half-open connection cannot hold a slot.
    acse_timeout_seconds: float = Field(default=5.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    max_pdu_bytes: int = Field(default=262144, ge=0)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    # What answers C-STOREs. "pynetdicom": this process; the answer waits for the file and
    # its row, and every check the node makes is answered with its DIMSE status. "dcmtk":
    # the native front end (ketanode-scp, built by scripts/build-frontend.sh), about twice
    # as fast: it answers once the file is durable, and this process indexes the file
    # after (its row follows; checks that only the node makes become stored refusals of an
    # instance already acknowledged). docs/architecture.md, "The native front end".
    receiver: Literal["pynetdicom", "dcmtk"] = "pynetdicom"
    # The front end's program: a name looked up on PATH, or a path.
    receiver_program: str = "ketanode-scp"
    # Threads that index the front end's files (their row transactions commit together).
    receiver_indexers: int = Field(default=2, ge=1, le=16)

    _ae = field_validator("ae_title")(_check_ae)

    @model_validator(mode="after")
    def _receiver_supports(self) -> NodeSettings:
        if self.receiver == "dcmtk" and self.tls.enabled:
            raise ValueError(
                "node.receiver = 'dcmtk' does not support node.tls: use 'pynetdicom' for TLS"
            )
        return self


class SpoolSettings(_Section):
    path: Path = Path("ketanode-data/spool")
    min_free_mb: float = Field(default=1024.0, ge=0)
    keep_rejected: bool = True
    # Quota of the refused datasets kept in <spool>/rejected (MiB); past it they are not kept
    # (the refusal is still recorded). 0: none are kept.
    rejected_max_mb: float = Field(default=512.0, ge=0)


class DatabaseSettings(_Section):
    url: str = "sqlite:///ketanode-data/ketanode.db"
    auto_upgrade: bool = True

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError("a sqlite:/// or postgresql:// URL")
        return value


_BOUNDARY_L = r"(?<![a-z0-9])"
_BOUNDARY_R = r"(?![a-z0-9])"


class SelectionRules(_Section):
    modalities: list[str] = Field(default_factory=lambda: ["MR"])
    sop_classes: list[str] = Field(
        default_factory=lambda: [MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE]
    )
    min_slices: int = Field(default=100, ge=1)
    accept_3d_acquisition: bool = True
    max_voxel_mm: float = Field(default=1.5, gt=0)
    excluded_image_types: list[str] = Field(
        default_factory=lambda: [
            "DERIVED",
            "SECONDARY",
            "LOCALIZER",
            "MPR",
            "PROJECTION IMAGE",
            "REFORMATTED",
            "DIFFUSION",
            "ADC",
            "TRACEW",
        ]
    )
    include_pattern: str = r"mp-?rage|mp_rage|mp2rage|bravo|spgr|tfe|tfl|" + _BOUNDARY_L + r"t1"
    exclude_pattern: str = (
        _BOUNDARY_L
        + r"(dwi|dti|diff|diffusion|adc|trace|flair|t2|pd|localizer|loc|scout|survey|3-plane|"
        r"perfusion|bold|fmri|swi|post|gad|gd|\+c|c\+)" + _BOUNDARY_R
    )

    @field_validator("include_pattern", "exclude_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"a valid regular expression ({exc})") from exc
        return value


class SeriesSettings(_Section):
    grace_seconds: float = Field(default=1.0, ge=0)
    quiet_seconds: float = Field(default=60.0, gt=0)
    check_interval_seconds: float = Field(default=0.5, gt=0)
    selection: SelectionRules = Field(default_factory=SelectionRules)


class QCSettings(_Section):
    """Quality-control thresholds: each check warns past ``*_warn`` and fails past ``*_fail``
    (a minimum, a maximum, or a [low, high] range)."""

    min_brain_in_fov_warn: float = Field(default=0.98, ge=0, le=1)
    min_brain_in_fov_fail: float = Field(default=0.90, ge=0, le=1)
    max_voxel_mm_warn: float = Field(default=1.3, gt=0)
    max_voxel_mm_fail: float = Field(default=3.5, gt=0)
    min_extent_mm_warn: float = Field(default=160.0, ge=0)
    min_extent_mm_fail: float = Field(default=120.0, ge=0)
    min_snr_warn: float = Field(default=8.0, ge=0)
    min_snr_fail: float = Field(default=4.0, ge=0)
    min_gm_wm_contrast_warn: float = Field(default=0.12, ge=0)
    min_gm_wm_contrast_fail: float = Field(default=0.05, ge=0)
    min_registration_dice_warn: float = Field(default=0.90, ge=0, le=1)
    min_registration_dice_fail: float = Field(default=0.85, ge=0, le=1)
    gm_fraction_warn: tuple[float, float] = (0.35, 0.58)
    gm_fraction_fail: tuple[float, float] = (0.25, 0.68)
    wm_fraction_warn: tuple[float, float] = (0.25, 0.45)
    wm_fraction_fail: tuple[float, float] = (0.15, 0.55)
    tiv_ml_warn: tuple[float, float] = (1100.0, 1950.0)
    tiv_ml_fail: tuple[float, float] = (800.0, 2400.0)


class PipelineSettings(_Section):
    workers: int = Field(default=1, ge=1, le=64)
    work_dir: Path = Path("ketanode-data/work")
    lease_seconds: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    job_timeout_seconds: float = Field(default=1800.0, gt=0)
    # Measure every selected series (N4, registration, segmentation, regional volumes, QC);
    # off: convert only (the ingest tests run that way).
    measure: bool = True
    # affine at registration_resolution_mm, then (syn) SyN at syn_resolution_mm
    registration: Literal["affine", "syn"] = "syn"
    # Voxels finer than this (mm) are resampled to it before the heavy steps.
    grid_mm: float = Field(default=1.0, ge=0.5, le=2.0)
    registration_resolution_mm: float = Field(default=2.0, ge=1.0, le=6.0)
    syn_resolution_mm: float = Field(default=4.0, ge=1.0, le=8.0)
    syn_iterations: list[int] = Field(default_factory=lambda: [40, 20])
    segmentation: Literal["em", "atropos"] = "em"
    prior_weight: float = Field(default=0.25, ge=0, le=1)
    atropos_iterations: int = Field(default=5, ge=1, le=50)
    qc: QCSettings = Field(default_factory=QCSettings)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Path | None = None
    library_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


class ModelSettings(_Section):
    """The classifier run after measurement (the active model of the registry,
    `ketanode model activate`)."""

    # Predict for every series that passed QC.
    predict: bool = True
    # With no active model, score with the demonstration model shipped in the package
    # (trained on synthetic phantoms; every output says DEMO). Off by default: a series
    # then gets a NOT SCORED "no active model" result. `ketanode demo` turns it on.
    demo_when_none_active: bool = False


class Destination(_Section):
    """A DICOM peer that receives the SR and the report image (C-STORE SCP, e.g. the PACS)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    # Calling AE title the node uses towards this peer; empty: the node's own AE title.
    calling_ae_title: str | None = None
    tls: bool = False
    # With tls: CA bundle to verify the peer, and the node's client certificate and key.
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None

    _ae = field_validator("ae_title")(_check_ae)

    @field_validator("calling_ae_title")
    @classmethod
    def _calling_ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae(value)

    @model_validator(mode="after")
    def _tls_files(self) -> Destination:
        for name in ("ca_certificates", "certificate", "private_key"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{name} file {value} does not exist")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class DispatchSettings(_Section):
    """Sending the SR and report image: one outbox row per object per destination."""

    # How often the dispatcher looks for due rows (it is also woken when a job finishes).
    interval_seconds: float = Field(default=5.0, gt=0)
    # Tries before a row is marked dead (``ketanode dispatch retry`` re-queues it).
    max_attempts: int = Field(default=8, ge=1)
    # Wait before try n+1: initial * 2**(n-1), at most max.
    backoff_initial_seconds: float = Field(default=10.0, ge=0)
    backoff_max_seconds: float = Field(default=900.0, ge=0)
    # Objects sent on one association at most.
    batch_size: int = Field(default=50, ge=1)
    timeout_seconds: float = Field(default=30.0, gt=0)


class ReportsSettings(_Section):
    """The SR and the report image written for each job (then sent by the dispatcher)."""

    path: Path = Path("ketanode-data/reports")
    # Also report a series that quality control stopped ("NOT SCORED" and why).
    not_scored: bool = True
    # A PNG copy of the report page next to the DICOM files (for admins and the dashboard).
    png: bool = True


class RetentionSettings(_Section):
    """Removing files the node no longer needs; rows (results, audit) are always kept."""

    enabled: bool = True
    # Spool files of a series whose job finished (done or failed) or that was ignored, this
    # many hours after it finished; never while a job is queued or running.
    spool_hours: float = Field(default=168.0, gt=0)
    # The SR / report-image files, this many hours after every outbox row of the object is
    # sent or dead; never while one is pending or retrying.
    reports_hours: float = Field(default=720.0, gt=0)
    # Refused datasets kept in <spool>/rejected, this many hours after they were refused.
    rejected_hours: float = Field(default=168.0, gt=0)
    # How often the retention sweep runs.
    interval_minutes: float = Field(default=60.0, gt=0)


class WebSettings(_Section):
    """The read-only dashboard, /metrics and /health (HTTP); off by default."""

    enabled: bool = False
    bind_address: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Secret that signs session cookies; empty: a random one per start (logins end on restart).
    session_secret: str = ""
    session_hours: float = Field(default=12.0, gt=0)
    # Serve /metrics without login (for a Prometheus scraper on the same host / network).
    metrics_public: bool = True
    # HTTPS: certificate and key files (PEM); both or neither.
    certificate: Path | None = None
    private_key: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> WebSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        for name in ("certificate", "private_key"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{name} file {value} does not exist")
        return self


class ClusterSettings(_Section):
    """Cluster mode: the roles run apart (listeners, one active scheduler, Celery workers,
    the dashboard), on PostgreSQL and RabbitMQ. Off: ``ketanode serve`` is the embedded
    all-in-one node (docs/scaling.md)."""

    enabled: bool = False
    # The Celery broker (RabbitMQ); a message carries only a job id.
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    # The work queue (a RabbitMQ priority queue: live scans before batch reprocessing).
    queue: str = Field(default="ketanode.jobs", min_length=1, max_length=200)
    # Message priority of a live scan and of batch reprocessing (0..9, higher first).
    live_priority: int = Field(default=9, ge=0, le=9)
    batch_priority: int = Field(default=1, ge=0, le=9)
    # Jobs one `ketanode worker` runs at once (one Celery prefork process each).
    worker_concurrency: int = Field(default=1, ge=1, le=64)
    # How often the scheduler publishes queued jobs, and when it publishes a job again that
    # no worker claimed (the broker may have dropped the message; a duplicate changes
    # nothing, the claim is a conditional UPDATE). With the queue empty, after
    # ``republish_idle_seconds``; else after ``republish_seconds``.
    publish_interval_seconds: float = Field(default=1.0, gt=0)
    republish_idle_seconds: float = Field(default=10.0, gt=0)
    republish_seconds: float = Field(default=600.0, gt=0)
    # Every role process writes a heartbeat row; it counts as alive for 3 heartbeats.
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    # A standby scheduler tries to become the active one this often.
    standby_poll_seconds: float = Field(default=2.0, gt=0)
    # How often the active scheduler runs the recovery sweep (expired leases re-queued).
    recovery_interval_seconds: float = Field(default=15.0, gt=0)


class Settings(_Section):
    node: NodeSettings = Field(default_factory=NodeSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    series: SeriesSettings = Field(default_factory=SeriesSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    reports: ReportsSettings = Field(default_factory=ReportsSettings)
    destinations: list[Destination] = Field(default_factory=list)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"destination names must be unique (repeated: {', '.join(dup)})")
        return self


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name}: conflicts with another override")
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(item)
    return ".".join(parts)


def _describe(exc: ValidationError, source: str, env_keys: set[str]) -> str:
    lines = []
    for err in exc.errors():
        key = _key_path(tuple(err["loc"]))
        where = source
        env_name = ENV_PREFIX + "__".join(str(p).upper() for p in err["loc"] if isinstance(p, str))
        if env_name in env_keys:
            where = f"environment variable {env_name}"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = "expected " + msg[len("Value error, ") :]
        got = err.get("input")
        got_text = (
            ""
            if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict)
            else f" (got {got!r})"
        )
        lines.append(f"{where}: key '{key}': {msg}{got_text}")
    return "configuration error:\n  " + "\n  ".join(lines)


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read, merge and validate the settings once. Raises ConfigError with a readable message."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_ENV):
        path = environ[CONFIG_ENV]
    data: dict[str, Any] = {}
    source = "embedded defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration error: {path}: file not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration error: {path}: not valid TOML: {exc}") from exc
    env_keys = {k for k in environ if k.startswith(ENV_PREFIX)}
    data = merge(data, _env_overrides(environ))
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, env_keys)) from exc
