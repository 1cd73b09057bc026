"""The store: every query of the service behind one class, so routes and workers never write SQL.

This module holds the catalog (owners and tokens, models, versions, files), secrets and the
webhook outbox's delivery side; the job lifecycle (trainings, predictions) is in `jobs.py`.
Every method runs in its own transaction and returns rows that stay readable afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import CursorResult, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tunery.store import db, outbox
from tunery.store.jobs import JobsMixin
from tunery.store.models import (
    DEFAULT_OWNER,
    LIMITS,
    SCOPES,
    TERMINAL,
    ApiToken,
    File,
    Limits,
    Model,
    Owner,
    OwnerLimits,
    Prediction,
    Secret,
    Training,
    Version,
    WebhookDelivery,
    WorkerPresence,
    utcnow,
)
from tunery.store.pages import Page, paginate

BASE_OWNER = "tunery"


@dataclass(frozen=True)
class TokenCheck:
    """A token's check: the owner it acts for and its scopes, or (owner None) why it is refused."""

    owner: str | None
    scopes: frozenset[str]
    refused: str | None


class Conflict(Exception):
    """The row already exists (the API answers 409)."""


def base_version_id(name: str) -> str:
    """The version id of a base model: the same on every installation and after every restart."""
    return hashlib.sha256(f"tunery-base:{name}".encode()).hexdigest()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store(JobsMixin):
    """All of the service's state, in the database at `url` (SQLite file or PostgreSQL).

    `base_url` is where clients reach the API; `webhook_body` renders a training or prediction as
    a webhook's body (the API that owns webhooks gives it; a store without it refuses to queue a
    webhook). With `migrate`, the schema is brought to the newest alembic revision before anything
    else happens.
    """

    def __init__(self, url: str, *, base_url: str = "http://127.0.0.1:8000", migrate: bool = True,
                 webhook_body: outbox.WebhookBody | None = None):
        self.url = url
        self.base_url = base_url.rstrip("/")
        self.webhook_body = webhook_body
        self.engine = db.make_engine(url)
        self._read, self._write = db.session_factories(self.engine)
        if migrate:
            db.upgrade(self.engine)

    def close(self) -> None:
        """Close the database connections (the store can not be used afterwards)."""
        self.engine.dispose()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction: commits when the block ends, rolls back if it raises."""
        with db.transaction(self._write) as session:
            yield session

    def _reading(self):
        return db.transaction(self._read)

    # -- owners and tokens -------------------------------------------------------------------

    def create_token(self, owner: str, label: str | None = None, *, scopes: Iterable[str] = SCOPES,
                     expires_at: datetime | None = None) -> str:
        """Create an API token for `owner` (creating the owner if new) with `scopes` (of SCOPES),
        valid until `expires_at` (None: until revoked); returns the token itself, which is never
        stored: only its sha256 and its first characters are."""
        chosen = [scope for scope in SCOPES if scope in set(scopes)]
        unknown = set(scopes) - set(SCOPES)
        if unknown or not chosen:
            raise ValueError(f"scopes: {sorted(unknown) or 'none given'}; choose from {', '.join(SCOPES)}")
        if expires_at is not None and expires_at <= utcnow():
            raise ValueError(f"expires_at: {expires_at.isoformat()} is not in the future")
        token = "tny_" + secrets.token_urlsafe(30)
        with self.session() as s:
            if s.get(Owner, owner) is None:
                s.add(Owner(name=owner))
                s.flush()
            s.add(ApiToken(owner=owner, token_hash=hash_token(token), label=label, prefix=token[:10],
                           scopes=",".join(chosen), expires_at=expires_at))
        return token

    def authenticate(self, token: str) -> TokenCheck:
        """Who a token acts for and what it may do, or why it is refused (unknown, revoked,
        expired): the one check every API's requests pass."""
        with self._reading() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token))) if token else None
            if row is None:
                return TokenCheck(None, frozenset(), "unknown")
            status = row.status()
            if status != "active":
                when = row.revoked_at if status == "revoked" else row.expires_at
                assert when is not None
                return TokenCheck(None, frozenset(), f"{status} at {when.isoformat(timespec='seconds')}")
            return TokenCheck(row.owner, row.scope_set, None)

    def list_tokens(self, owner: str | None = None) -> list[ApiToken]:
        """The tokens of `owner` (every owner's with None), oldest first: their ids, labels,
        prefixes, scopes and dates, never the tokens."""
        with self._reading() as s:
            query = select(ApiToken).order_by(ApiToken.id)
            if owner is not None:
                query = query.where(ApiToken.owner == owner)
            return list(s.scalars(query))

    def revoke_token(self, token_id: int, owner: str | None = None) -> ApiToken | None:
        """Revoke a token (of `owner`, when given) from now on; the row is kept, to list. None when
        there is no such token; revoking twice keeps the first time."""
        with self.session() as s:
            row = s.get(ApiToken, token_id, with_for_update=True)
            if row is None or (owner is not None and row.owner != owner):
                return None
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return row

    # -- limits ------------------------------------------------------------------------------

    def limits(self, owner: str) -> Limits:
        """The limits that apply to `owner`: theirs where set, else everyone's, else built in."""
        with self._reading() as s:
            rows = {row.owner: row for row in s.scalars(
                select(OwnerLimits).where(OwnerLimits.owner.in_([owner, DEFAULT_OWNER])))}
        return Limits.resolve(rows.get(owner) if owner != DEFAULT_OWNER else None, rows.get(DEFAULT_OWNER))

    def limit_rows(self) -> list[OwnerLimits]:
        """The limits an operator set: everyone's row (if any) first, then each owner's by name."""
        with self._reading() as s:
            rows = list(s.scalars(select(OwnerLimits).order_by(OwnerLimits.owner)))
        return sorted(rows, key=lambda row: (row.owner != DEFAULT_OWNER, row.owner))

    def set_limits(self, owner: str, changes: dict[str, int | None]) -> Limits:
        """Set (an int, 0: no limit) or unset (None: fall through to everyone's, then built in) the
        named limits of `owner` (DEFAULT_OWNER: everyone's); the others stay. Returns what applies now."""
        unknown = set(changes) - set(LIMITS)
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: not a limit; the limits are {', '.join(LIMITS)}")
        for name, value in changes.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}: must be a whole number >= 0 (0: no limit), got {value!r}")
        with self.session() as s:
            row = s.get(OwnerLimits, owner, with_for_update=True)
            if row is None:
                row = OwnerLimits(owner=owner)
                s.add(row)
            for name, value in changes.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
            if all(getattr(row, name) is None for name in LIMITS):
                s.delete(row)
        return self.limits(owner)

    # -- models and versions -----------------------------------------------------------------

    def ensure_base_models(self, entries: list[tuple[str, str | None, str]]) -> None:
        """Make sure each (name, description, base_name) exists as a public base model of owner
        "tunery" with one version whose id is `base_version_id(name)`. Safe to call at every start,
        from several processes at once."""
        for name, description, base_name in entries:
            for attempt in range(2):
                try:
                    self._ensure_base_model(name, description, base_name)
                    break
                except IntegrityError:
                    if attempt:  # the other process's insert won twice: something else is wrong
                        raise

    def _ensure_base_model(self, name: str, description: str | None, base_name: str) -> None:
        with self.session() as s:
            model = s.scalar(select(Model).where(Model.owner == BASE_OWNER, Model.name == name))
            if model is None:
                model = Model(owner=BASE_OWNER, name=name, description=description, visibility="public",
                              is_base=True)
                s.add(model)
                s.flush()
            elif description is not None:
                model.description = description
            version = s.get(Version, base_version_id(name))
            if version is None:
                s.add(Version(id=base_version_id(name), model_id=model.id, base_name=base_name))
            else:
                version.base_name = base_name

    def add_base(self, name: str, base_name: str, *, description: str | None, registered_by: str) -> Version:
        """Register an operator's base model: the public model "tunery/<name>" with one version
        whose base_name (what models.resolve_base accepts) is `base_name`. Its version id is new
        each time, so re-registering a name with other weights never reuses an id that trained
        versions or clients recorded. Raises Conflict if a model of that name exists."""
        try:
            with self.session() as s:
                if s.scalar(select(Model.id).where(Model.owner == BASE_OWNER, Model.name == name)) is not None:
                    raise Conflict(f"base model {BASE_OWNER}/{name} already exists")
                model = Model(owner=BASE_OWNER, name=name, description=description, visibility="public",
                              is_base=True, registered_by=registered_by)
                s.add(model)
                s.flush()
                version = Version(model_id=model.id, base_name=base_name)
                s.add(version)
        except IntegrityError as exc:
            raise Conflict(f"base model {BASE_OWNER}/{name} already exists") from exc
        return version

    def registered_base(self, name: str) -> Model | None:
        """The operator-registered base "tunery/<name>"; None for a built-in base or no base."""
        with self._reading() as s:
            return s.scalar(select(Model).where(Model.owner == BASE_OWNER, Model.name == name,
                                                Model.registered_by.is_not(None)))

    def list_bases(self, *, cursor: str | None = None, limit: int = 100) -> Page:
        """The operator-registered bases, newest first."""
        with self._reading() as s:
            stmt = select(Model).where(Model.owner == BASE_OWNER, Model.registered_by.is_not(None))
            return paginate(s, stmt, Model.created_at, Model.id, cursor, limit)

    def remove_base(self, name: str) -> bool:
        """Remove an operator-registered base and its version (versions trained on it keep their own
        base_name and stay usable); False when there is no registered base of that name."""
        with self.session() as s:
            model = s.scalar(select(Model).where(Model.owner == BASE_OWNER, Model.name == name,
                                                 Model.registered_by.is_not(None)))
            return self._drop_model(s, model)

    def create_model(self, owner: str, name: str, *, description: str | None = None,
                     visibility: str = "private", hardware: str = "cpu") -> Model:
        """Create the model `owner/name`; raises Conflict if it exists."""
        try:
            with self.session() as s:
                if s.scalar(select(Model.id).where(Model.owner == owner, Model.name == name)) is not None:
                    raise Conflict(f"model {owner}/{name} already exists")
                model = Model(owner=owner, name=name, description=description, visibility=visibility,
                              hardware=hardware)
                s.add(model)
        except IntegrityError as exc:
            raise Conflict(f"model {owner}/{name} already exists") from exc
        return model

    def all_versions(self, model_id: int) -> list[Version]:
        """Every version of a model, oldest first."""
        with self._reading() as s:
            return list(s.scalars(select(Version).where(Version.model_id == model_id)
                                  .order_by(Version.created_at, Version.id)))

    def versions_in_run(self, run_url: str) -> list[Version]:
        """The versions (of any model) whose weights are in this run: the run itself or one of its
        checkpoints."""
        url = run_url.rstrip("/")
        with self._reading() as s:
            return list(s.scalars(select(Version).where(
                or_(Version.run_url == url, Version.run_url.startswith(url + "/")))))

    def blocking_deletion(self, destination: str, version_ids: list[str], owner: str) -> tuple[list[Training], int]:
        """What stops deleting these versions of the model `destination` ("owner/name"): the
        trainings not yet ended that write to it or train from one of them, and how many
        predictions other owners ran on them."""
        with self._reading() as s:
            writing = list(s.scalars(select(Training).where(
                Training.status.not_in(TERMINAL),
                or_(Training.destination == destination, Training.version_id.in_(version_ids or [""])))))
            foreign = s.scalar(select(func.count()).select_from(Prediction).where(
                Prediction.version_id.in_(version_ids or [""]), Prediction.owner != owner)) or 0
        return writing, int(foreign)

    def delete_versions(self, model_id: int, version_ids: list[str], *, drop_model: bool = False) -> None:
        """Delete these versions of the model, with their predictions, and the model too when
        `drop_model`; one transaction."""
        with self.session() as s:
            if version_ids:
                s.execute(delete(Prediction).where(Prediction.version_id.in_(version_ids)))
                s.execute(delete(Version).where(Version.model_id == model_id, Version.id.in_(version_ids)))
            if drop_model:
                model = s.get(Model, model_id)
                if model is not None:
                    s.delete(model)

    @staticmethod
    def _drop_model(s, model: Model | None) -> bool:
        """Delete `model` and its versions in session `s`; False when there is no model."""
        if model is None:
            return False
        s.execute(delete(Version).where(Version.model_id == model.id))
        s.delete(model)
        return True

    @staticmethod
    def _visible(viewer: str):
        return or_(Model.owner == viewer, Model.visibility == "public")

    def get_model(self, viewer: str, owner: str, name: str) -> Model | None:
        """The model `owner/name`, or None when it does not exist or is private to someone else."""
        with self._reading() as s:
            return s.scalar(select(Model).where(Model.owner == owner, Model.name == name,
                                                self._visible(viewer)))

    def list_models(self, viewer: str, *, cursor: str | None = None, limit: int = 100) -> Page:
        """The models `viewer` may see (its own and public ones), newest first."""
        with self._reading() as s:
            stmt = select(Model).where(self._visible(viewer))
            return paginate(s, stmt, Model.created_at, Model.id, cursor, limit)

    def latest_version(self, model_id: int) -> Version | None:
        """The model's newest version; None when it has none yet."""
        with self._reading() as s:
            return s.scalar(select(Version).where(Version.model_id == model_id)
                            .order_by(Version.created_at.desc(), Version.id.desc()).limit(1))

    def list_versions(self, model_id: int, *, cursor: str | None = None, limit: int = 100) -> Page:
        """The model's versions, newest first."""
        with self._reading() as s:
            stmt = select(Version).where(Version.model_id == model_id)
            return paginate(s, stmt, Version.created_at, Version.id, cursor, limit)

    def get_version(self, model_id: int, version_id: str) -> Version | None:
        """The version `version_id` of this model; None if it belongs to another model."""
        with self._reading() as s:
            return s.scalar(select(Version).where(Version.model_id == model_id, Version.id == version_id))

    def find_version(self, viewer: str, version_id: str) -> tuple[Model, Version] | None:
        """A version by its bare id, with its model, if `viewer` may see that model."""
        with self._reading() as s:
            row = s.execute(select(Model, Version).join(Version, Version.model_id == Model.id)
                            .where(Version.id == version_id, self._visible(viewer))).first()
            return (row[0], row[1]) if row else None

    # -- files -------------------------------------------------------------------------------

    def create_file(self, owner: str, *, name: str, content_type: str, size: int, sha256: str, md5: str,
                    path: str, meta: dict | None = None, file_id: str | None = None,
                    purpose: str | None = None) -> File:
        """Record an uploaded file already written to `path` (under `file_id` when given: Conflict
        if that id exists)."""
        try:
            with self.session() as s:
                row = File(owner=owner, name=name, content_type=content_type, size=size, sha256=sha256, md5=md5,
                           path=path, meta=meta or {}, purpose=purpose)
                if file_id is not None:
                    row.id = file_id
                s.add(row)
        except IntegrityError as exc:
            raise Conflict(f"file {file_id} already exists") from exc
        return row

    def record_file_check(self, file_id: str, *, status: str, details: str | None, data_format: str | None,
                          rows: int | None) -> File | None:
        """Record the outcome of validating a file as training data ("processed" or "error")."""
        with self.session() as s:
            row = s.get(File, file_id, with_for_update=True)
            if row is None:
                return None
            row.status, row.status_details, row.data_format, row.rows = status, details, data_format, rows
            return row

    def list_files_after(self, owner: str, *, purpose: str | None = None, after: str | None = None,
                         order: str = "desc", limit: int = 10000,
                         unset_purpose: str | None = None) -> tuple[list[File], bool]:
        """(files, whether more follow) in created_at order `order` ("asc" or "desc"), starting after
        the file `after` (an id, OpenAI's cursor), only those of `purpose` when given (a file without
        a purpose counting as `unset_purpose`)."""
        with self._reading() as s:
            stmt = select(File).where(File.owner == owner)
            if purpose is not None:
                stmt = stmt.where(or_(File.purpose == purpose, File.purpose.is_(None)) if purpose == unset_purpose
                                  else File.purpose == purpose)
            if after is not None:
                mark = s.scalar(select(File).where(File.id == after, File.owner == owner))
                if mark is not None:
                    if order == "asc":
                        stmt = stmt.where(or_(File.created_at > mark.created_at,
                                              and_(File.created_at == mark.created_at, File.id > mark.id)))
                    else:
                        stmt = stmt.where(or_(File.created_at < mark.created_at,
                                              and_(File.created_at == mark.created_at, File.id < mark.id)))
            keys = (File.created_at.asc(), File.id.asc()) if order == "asc" else (File.created_at.desc(),
                                                                                 File.id.desc())
            rows = list(s.scalars(stmt.order_by(*keys).limit(limit + 1)))
            return rows[:limit], len(rows) > limit

    def get_file(self, owner: str, file_id: str) -> File | None:
        with self._reading() as s:
            return s.scalar(select(File).where(File.id == file_id, File.owner == owner))

    def list_files(self, owner: str, *, cursor: str | None = None, limit: int = 100) -> Page:
        with self._reading() as s:
            stmt = select(File).where(File.owner == owner)
            return paginate(s, stmt, File.created_at, File.id, cursor, limit)

    def delete_file(self, owner: str, file_id: str) -> bool:
        """Delete the file's row (its bytes on disk are the caller's); False if there was none."""
        with self.session() as s:
            row = s.scalar(select(File).where(File.id == file_id, File.owner == owner))
            if row is None:
                return False
            s.delete(row)
            return True

    # -- running workers ----------------------------------------------------------------------

    def register_worker(self, worker_id: str, devices, *, host: str, labels: dict[str, str] | None = None) -> None:
        """Record (or renew) a running worker, its devices (a models.memory.Devices) and its
        operator's labels; rows of workers unseen for a day (they died without a word) go."""
        now = utcnow()
        fields = {"host": host, "kind": devices.kind, "memory": int(devices.memory),
                  "description": devices.description, "processes": int(devices.processes),
                  "precision": devices.precision, "labels": dict(labels or {})}
        with self.session() as s:
            s.execute(delete(WorkerPresence).where(WorkerPresence.seen_at < now - timedelta(days=1)))
            row = s.get(WorkerPresence, worker_id)
            if row is None:
                s.add(WorkerPresence(id=worker_id, started_at=now, seen_at=now, **fields))
                return
            for name, value in fields.items():
                setattr(row, name, value)
            row.seen_at = now

    def forget_worker(self, worker_id: str) -> None:
        with self.session() as s:
            s.execute(delete(WorkerPresence).where(WorkerPresence.id == worker_id))

    def live_workers(self, within_seconds: float) -> list[WorkerPresence]:
        """Workers renewed within the last `within_seconds`, the most memory first."""
        cutoff = utcnow() - timedelta(seconds=within_seconds)
        with self._reading() as s:
            return list(s.scalars(select(WorkerPresence).where(WorkerPresence.seen_at >= cutoff)
                                  .order_by(WorkerPresence.memory.desc(), WorkerPresence.id)))

    # -- secrets and webhook deliveries ------------------------------------------------------

    def webhook_secret(self) -> str:
        """The key webhooks are signed with ("whsec_" + base64 of 32 random bytes), made once."""
        with self._reading() as s:
            row = s.get(Secret, "webhook")
            if row is not None:
                return row.value
        value = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        try:
            with self.session() as s:
                s.add(Secret(name="webhook", value=value))
        except IntegrityError:  # another process made it first: use theirs
            pass
        with self._reading() as s:
            return s.get(Secret, "webhook").value

    def due_webhooks(self, limit: int = 50) -> list[WebhookDelivery]:
        """Deliveries due now, oldest first. Each is held for this caller for a minute, so that
        several senders (server, worker processes) do not post the same one twice."""
        now = utcnow()
        with self.session() as s:
            rows = list(s.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.attempts < outbox.MAX_ATTEMPTS,
                       WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ))
            for row in rows:
                row.next_attempt_at = now + outbox.CLAIM
        return rows

    def mark_webhook(self, delivery_id: int, *, ok: bool, error: str | None = None,
                     final: bool = False) -> None:
        """Record a delivery attempt: done when `ok`, else retried after an exponential backoff,
        and given up after MAX_ATTEMPTS attempts (at once when `final`: retrying can not help)."""
        with self.session() as s:
            row = s.get(WebhookDelivery, delivery_id, with_for_update=True)
            if row is None or row.delivered_at is not None:
                return
            now = utcnow()
            row.attempts += 1
            if ok:
                row.delivered_at = now
                row.last_error = None
            else:
                row.last_error = (error or "failed")[:2000]
                row.next_attempt_at = now + outbox.backoff(row.attempts)
                if final:
                    row.attempts = max(row.attempts, outbox.MAX_ATTEMPTS)

    def release_webhooks(self, ids: list[int]) -> None:
        """Hand undelivered deliveries a sender held back: due again now, for any sender."""
        if not ids:
            return
        with self.session() as s:
            s.execute(update(WebhookDelivery)
                      .where(WebhookDelivery.id.in_(ids), WebhookDelivery.delivered_at.is_(None))
                      .values(next_attempt_at=utcnow()))

    def prune_webhooks(self, before: datetime) -> int:
        """Delete deliveries delivered before `before`, and those given up on (every attempt
        failed) that were created before it; returns how many."""
        with self.session() as s:
            result = s.execute(delete(WebhookDelivery).where(or_(
                WebhookDelivery.delivered_at < before,
                and_(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.attempts >= outbox.MAX_ATTEMPTS,
                     WebhookDelivery.created_at < before),
            )))
            return cast(CursorResult, result).rowcount or 0  # a DELETE's result is a CursorResult

    def webhook_deliveries(self, object_id: str) -> list[WebhookDelivery]:
        """Every delivery queued for a training or prediction, oldest first (for tests and debugging)."""
        with self._reading() as s:
            return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.object_id == object_id)
                                  .order_by(WebhookDelivery.id)))


__all__ = ["BASE_OWNER", "Conflict", "Page", "Store", "TokenCheck", "base_version_id"]
