"""Table models of the service. The HTTP shapes (Replicate's) live in server/schemas.py; these are rows.

Ids are Replicate-style: 26 lowercase base32 characters for trainings, predictions and files;
64 hex characters for versions. Times are timezone-aware UTC.
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """An ISO 8601 UTC timestamp ending in Z (Replicate's form); naive datetimes (as SQLite
    returns them) are taken to be UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def new_id() -> str:
    """26 characters of base32, like Replicate's prediction/training ids."""
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()[:26]


def new_version_id() -> str:
    return secrets.token_hex(32)


#: Lifecycle of a training or prediction, and who moves it:
#:
#: starting   → processing (a worker claims it), canceled (a cancel before it was claimed),
#:              paused (a pause before it was claimed)
#: processing → succeeded | failed (the worker), canceled (the worker, after a cancel request),
#:              paused (the worker, after a pause request: it stops, keeping the checkpoints);
#:              a processing job whose lease expired is claimed again by any worker and resumed
#: paused     → starting (a resume: a worker claims it and resumes from its last checkpoint),
#:              canceled (a cancel)
#:
#: Only trainings are ever paused. TERMINAL are the final states: nothing moves out of them.
TERMINAL = ("succeeded", "failed", "canceled")
UNFINISHED = ("starting", "processing")


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zones: SQLAlchemy stores its datetimes as naive text (always with
    microseconds, so text order is time order) and gives them back naive. This type stores UTC
    and hands back aware datetimes, so rows compare with `utcnow()` the same way on SQLite
    and on PostgreSQL (whose TIMESTAMPTZ comes back in the session's time zone).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime()}


class Owner(Base):
    __tablename__ = "owners"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


#: What a token may do: `read` (every GET), `predict` (predictions, completions, scoring),
#: `train` (files, trainings, fine-tuning jobs, models: every other write), `admin` (the operator's
#: routes, for an owner named in TUNERY_ADMIN_OWNERS).
SCOPES = ("read", "predict", "train", "admin")


class ApiToken(Base):
    """An API token; only its sha256 is stored, with its first characters to tell it apart."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(ForeignKey("owners.name"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    prefix: Mapped[str | None] = mapped_column(String(16))  # "tny_" and 6 characters; None before 0007
    scopes: Mapped[str] = mapped_column(String(64), default=",".join(SCOPES), server_default=",".join(SCOPES))
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()

    @property
    def scope_set(self) -> frozenset[str]:
        return frozenset(self.scopes.split(","))

    def status(self, now: datetime | None = None) -> str:
        """active, revoked or expired (a revoked token says so even once past its expiry)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return "expired"
        return "active"


#: What one owner may hold at once, and their built-in values; 0 means no limit. An operator
#: changes them for everyone (the DEFAULT_OWNER row) or for one owner (`tunery owners
#: set-limits`); a field left unset falls through owner -> everyone -> built in.
#: - trainings: trainings running at once (more wait in the queue: workers pass them over);
#: - queued_trainings: trainings waiting for a worker (creating more is refused with 429);
#: - predictions: predictions (and completions, scorings) one server runs or queues for the
#:   owner at once, more are refused with 429; built in: the server's `max_queue`, so one owner
#:   alone never takes the last batch's worth of room from the others;
#: - requests_per_minute: authenticated API requests one server answers the owner per minute.
LIMITS: dict[str, int | None] = {"trainings": 4, "queued_trainings": 32, "predictions": None,
                                 "requests_per_minute": 3000}
DEFAULT_OWNER = "*"


class OwnerLimits(Base):
    """An operator's limits for one owner, or for every owner (owner DEFAULT_OWNER); None: not set here."""

    __tablename__ = "owner_limits"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    trainings: Mapped[int | None] = mapped_column(Integer)
    queued_trainings: Mapped[int | None] = mapped_column(Integer)
    predictions: Mapped[int | None] = mapped_column(Integer)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


@dataclass(frozen=True)
class Limits:
    """An owner's limits as they apply (0: none; predictions None: the server's max_queue), and
    where each came from (field -> "owner" | "everyone" | "built in")."""

    trainings: int
    queued_trainings: int
    predictions: int | None
    requests_per_minute: int
    source: dict[str, str]

    @classmethod
    def resolve(cls, own: OwnerLimits | None, everyone: OwnerLimits | None) -> Limits:
        values: dict[str, Any] = {}
        source: dict[str, str] = {}
        for name, built_in in LIMITS.items():
            for row, origin in ((own, "owner"), (everyone, "everyone")):
                if row is not None and getattr(row, name) is not None:
                    values[name], source[name] = getattr(row, name), origin
                    break
            else:
                values[name], source[name] = built_in, "built in"
        return cls(source=source, **values)


class Model(Base):
    """A model: a base model (owner "tunery", listed to everyone) or a user's destination model."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("owner", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    visibility: Mapped[str] = mapped_column(String(16), default="private")
    hardware: Mapped[str] = mapped_column(String(64), default="cpu")
    is_base: Mapped[bool] = mapped_column(Boolean, default=False)
    run_count: Mapped[int] = mapped_column(Integer, default=0)
    # Who registered an operator's base ("owner:<name>" through the API, "cli:<user>" through
    # `tunery bases add`); None for the built-in bases and for users' models.
    registered_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Version(Base):
    """A runnable version of a model: a base model, or an adapter (or full model) trained on one."""

    __tablename__ = "versions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_version_id)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    base_name: Mapped[str] = mapped_column(String(500))  # what models.resolve_base accepts
    run_url: Mapped[str | None] = mapped_column(Text)  # the trained run's URL; None for a base version
    training_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class File(Base):
    """An uploaded file (Replicate's /v1/files)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(500))
    content_type: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    md5: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # OpenAI's file fields (/openai/v1/files): the purpose ("fine-tune", or "fine-tune-results"
    # for a job's metrics CSV), and the outcome of validating a fine-tune file as training data
    # (status "processed" or "error", the bad lines in status_details; the data's format and
    # rows when valid). All None for a file uploaded through Replicate's /v1/files until an
    # OpenAI job uses it (it is validated then).
    purpose: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    data_format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Training(Base):
    """A training job. `lease_owner`/`lease_expires_at` say which worker holds it and until when."""

    __tablename__ = "trainings"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(300))  # "owner/name" of the base being trained
    version_id: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(300))  # "owner/name"
    status: Mapped[str] = mapped_column(String(16), default="starting", index=True)
    input: Mapped[dict[str, Any]] = mapped_column(default=dict)  # as the client sent it
    # What the worker runs: the validated TrainingInputs with train_data/validation_data turned
    # into local paths, plus {"base": <name for models.resolve_base>}.
    job: Mapped[dict[str, Any]] = mapped_column(default=dict)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text)
    logs: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    webhook: Mapped[str | None] = mapped_column(Text)
    webhook_events_filter: Mapped[list | None] = mapped_column(JSON, nullable=True)
    run_url: Mapped[str | None] = mapped_column(Text)  # the run in the storage
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # A pause was asked for (OpenAI's fine_tuning.jobs.pause): the worker stops the training,
    # keeping its checkpoints, and the training waits as "paused" until resumed ("starting" again).
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # A training created through OpenAI's fine-tuning API (/openai/v1/fine_tuning/jobs): what that
    # API shows beyond the training itself (model as given, suffix, metadata, seed, the resolved
    # hyperparameters and method, the file ids, the fine-tuned model's name, pause/resume notes).
    # NULL (SQL NULL, not JSON null) for a training created through Replicate's API.
    openai: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Prediction(Base):
    """A prediction. Run by the prediction runner of the server holding its lease; its output is
    a list of text pieces."""

    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(300))
    version_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="starting", index=True)
    input: Mapped[dict[str, Any]] = mapped_column(default=dict)
    output: Mapped[list | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text)
    logs: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    webhook: Mapped[str | None] = mapped_column(Text)
    webhook_events_filter: Mapped[list | None] = mapped_column(JSON, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The server whose runner holds it, until when (renewed while that server lives); a
    # starting or processing prediction whose lease expired is taken over by another server.
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Secret(Base):
    """Service-wide secrets (the webhook signing key)."""

    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class WorkerPresence(Base):
    """A training worker that is running now, with the devices its trainings get
    (models.memory.Devices): written when it starts, renewed while it runs (`seen_at`), deleted
    when it stops. A row not renewed for a lease belongs to a worker that died. Training creation
    checks a training's estimated peak memory against these; a worker claims only trainings that
    fit its devices."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))  # cuda | cpu
    memory: Mapped[int] = mapped_column(BigInteger)  # bytes one device gives a training
    description: Mapped[str] = mapped_column(Text)
    processes: Mapped[int] = mapped_column(Integer, default=1)
    precision: Mapped[str] = mapped_column(String(8))  # what `precision auto` resolves to there
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    labels: Mapped[dict[str, Any] | None] = mapped_column()  # the operator's (`tunery worker --labels`)

    def devices(self):
        from tunery.models.memory import Devices

        return Devices(self.kind, int(self.memory), self.description, int(self.processes), self.precision)

    def offers(self) -> dict[str, str]:
        """Its labels with the built-in ones: `kind` (cpu | cuda) and `hardware` (see worker_hardware)."""
        return worker_labels(self.labels or {}, self.kind, self.description)


#: A hardware choice that asks for nothing in particular: any worker takes the training. "cpu"
#: is Replicate's cheapest SKU, and what its clients (and tunery's) give a training's destination model.
ANY_HARDWARE = ("", "cpu")
_LABEL = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_GPU_NAMES = re.compile(r"\b(h200|h100|gh200|b200|a100|a40|a10g?|l40s?|l4|t4|v100|rtx\s?\d{4}|\d{4})\b", re.I)


def parse_labels(text: str | None) -> dict[str, str]:
    """`gpu=a100,mem=80g` as {"gpu": "a100", "mem": "80g"}; ValueError naming the bad part (keys:
    lowercase letters, digits, `_.-`; values: letters, digits, `_.-`)."""
    labels: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep or not _LABEL.match(key) or not _VALUE.match(value):
            raise ValueError(f"labels: {part.strip()!r} is not KEY=VALUE (keys: lowercase letters, digits and "
                             "_.-; values: letters, digits and _.-), as in gpu=a100,mem=80g")
        labels[key] = value
    return labels


def worker_labels(labels: dict[str, str], kind: str, description: str = "") -> dict[str, str]:
    """A worker's labels with the built-in ones: `kind` (its device kind) and `hardware`, its SKU
    in Replicate's style: the operator's `hardware` label if given; else `cpu` on a CPU, and on a
    GPU `gpu-` and its `gpu` label or the model in its description (`gpu-h100`), else `gpu`."""
    out = dict(labels)
    out.setdefault("kind", kind)
    if "hardware" not in out:
        if kind != "cuda":
            out["hardware"] = "cpu"
        else:
            found = _GPU_NAMES.search(description)
            name = labels.get("gpu") or (found.group(1).replace(" ", "").lower() if found else "")
            out["hardware"] = f"gpu-{name}" if name else "gpu"
    return out


def hardware_matches(wanted: str | None, offered: dict[str, str]) -> bool:
    """Whether a worker offering `offered` (worker_labels) runs a training that asks for `wanted`:
    anything for ANY_HARDWARE; every KEY=VALUE of a selector (`gpu=a100,mem=80g`); else the SKU
    (`gpu-a100-large`) equal to its `hardware` label."""
    wanted = (wanted or "").strip()
    if wanted in ANY_HARDWARE:
        return True
    if "=" in wanted:
        return all(offered.get(k) == v for k, v in parse_labels(wanted).items())
    return offered.get("hardware") == wanted


class WebhookDelivery(Base):
    """Outbox of webhook calls: written in the same transaction as the state change they report,
    delivered (and retried with backoff) by a sender thread, so none is lost on a restart."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(16))  # start | output | logs | completed
    object_id: Mapped[str] = mapped_column(String(32), index=True)
    body: Mapped[str] = mapped_column(Text)  # the JSON body, exactly as signed and sent
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
