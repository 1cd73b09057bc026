"""The job lifecycle: trainings (claimed by workers under a lease) and predictions.

Who moves a training or a prediction where is written beside `models.TERMINAL`. Every change a webhook reports queues its
delivery in the same transaction (see outbox.py). A worker's writes are ignored once it no
longer holds the lease, so a worker that was presumed dead can not overwrite the work of
the one that took its job over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, func, or_, select, update
from sqlalchemy.orm import Session

from tunery.store import outbox
from tunery.store.models import (
    DEFAULT_OWNER,
    TERMINAL,
    UNFINISHED,
    Limits,
    Model,
    Owner,
    OwnerLimits,
    Prediction,
    Training,
    Version,
    utcnow,
)
from tunery.store.pages import Page, paginate

# A job whose worker died this many times is failed rather than claimed again: it is
# probably what kills them (out of memory, say).
MAX_TRAINING_ATTEMPTS = 5
#: How many of the oldest claimable trainings a worker looks at when it passes some over.
CLAIM_WINDOW = 64


def _running(now: datetime):
    """A training a live worker holds (processing, its lease not yet expired)."""
    return and_(Training.status == "processing", Training.lease_expires_at >= now)


class JobsMixin:
    """Trainings and predictions; mixed into Store, whose sessions and base_url it uses."""

    base_url: str
    webhook_body: outbox.WebhookBody | None

    def session(self) -> contextlib.AbstractContextManager[Session]:  # provided by Store
        raise NotImplementedError

    def _reading(self) -> contextlib.AbstractContextManager[Session]:  # provided by Store
        raise NotImplementedError

    # -- trainings: the API's side ------------------------------------------------------------

    def create_training(self, owner: str, *, model: str, version_id: str, destination: str,
                        input: dict[str, Any], job: dict[str, Any], webhook: str | None = None,
                        webhook_events_filter: Sequence[str] | None = None, training_id: str | None = None,
                        openai: dict[str, Any] | None = None, new_destination: str | None = None) -> Training:
        """Queue a training (status "starting") of `model`'s version `version_id` into `destination`
        ("owner/name"), under `training_id` when given. With `new_destination` (its description) the
        destination is a new private model, created in the same transaction."""
        with self.session() as s:
            if new_destination is not None:
                dest_owner, _, dest_name = destination.partition("/")
                s.add(Model(owner=dest_owner, name=dest_name, visibility="private", description=new_destination))
            row = Training(owner=owner, model=model, version_id=version_id, destination=destination,
                           input=input, job=job, webhook=webhook, webhook_events_filter=webhook_events_filter,
                           openai=openai)
            if training_id is not None:
                row.id = training_id
            s.add(row)
            _count_run(s, model)
        return row

    def list_fine_tuning_jobs(self, owner: str, *, after: str | None = None, limit: int = 20,
                              metadata: dict[str, str] | None = None) -> tuple[list[Training], bool]:
        """(the owner's trainings created through OpenAI's API, newest first, starting after the
        training `after`; whether more follow). With `metadata`, only jobs whose metadata holds
        every one of those pairs (matched here, not in SQL: JSON queries differ between backends)."""
        chunk = max(limit + 1, 100)
        found: list[Training] = []
        with self._reading() as s:
            stmt = select(Training).where(Training.owner == owner, Training.openai.is_not(None))
            mark = s.scalar(select(Training).where(Training.id == after, Training.owner == owner)) if after else None
            at = (mark.created_at, mark.id) if mark is not None else None
            while True:
                page = stmt
                if at is not None:
                    page = page.where(or_(Training.created_at < at[0],
                                          and_(Training.created_at == at[0], Training.id < at[1])))
                rows = list(s.scalars(page.order_by(Training.created_at.desc(), Training.id.desc()).limit(chunk)))
                for row in rows:
                    meta = (row.openai or {}).get("metadata") or {}
                    if all(meta.get(k) == v for k, v in (metadata or {}).items()):
                        found.append(row)
                        if len(found) > limit:
                            return found[:limit], True
                if len(rows) < chunk:
                    return found, False
                at = (rows[-1].created_at, rows[-1].id)

    def get_training(self, owner: str, training_id: str) -> Training | None:
        with self._reading() as s:
            return s.scalar(select(Training).where(Training.id == training_id, Training.owner == owner))

    def load_training(self, training_id: str) -> Training | None:
        """A training whoever owns it (for workers and tests, never for the API)."""
        with self._reading() as s:
            return s.get(Training, training_id)

    def list_trainings(self, owner: str, *, cursor: str | None = None, limit: int = 100) -> Page:
        with self._reading() as s:
            stmt = select(Training).where(Training.owner == owner)
            return paginate(s, stmt, Training.created_at, Training.id, cursor, limit)

    def cancel_training(self, owner: str, training_id: str) -> Training | None:
        """Cancel: a queued training is canceled at once; a running one is flagged, and its worker
        stops it and marks it canceled; a finished one is left as it is. None if not found."""
        with self.session() as s:
            row = s.scalar(select(Training).where(Training.id == training_id, Training.owner == owner)
                           .with_for_update())
            if row is None or row.status in TERMINAL:
                return row
            row.cancel_requested = True
            if row.status in ("starting", "paused"):
                self._end_training(s, row, "canceled")
            return row

    def pause_training(self, owner: str, training_id: str) -> Training | None:
        """Pause: a queued training is paused at once; a running one is flagged, and its worker
        stops it (its checkpoints stay in the run) and marks it paused. Any other state is left as
        it is (the caller tells by the status). None if not found."""
        with self.session() as s:
            row = s.scalar(select(Training).where(Training.id == training_id, Training.owner == owner)
                           .with_for_update())
            if row is None or row.status not in ("starting", "processing") or row.cancel_requested:
                return row
            if row.status == "starting":
                row.status = "paused"
                row.pause_requested = False
            else:
                row.pause_requested = True
            return row

    def resume_training(self, owner: str, training_id: str) -> Training | None:
        """Resume a paused training: queued again ("starting"), for a worker to claim and resume from
        its last checkpoint. Any other state is left as it is. None if not found."""
        with self.session() as s:
            row = s.scalar(select(Training).where(Training.id == training_id, Training.owner == owner)
                           .with_for_update())
            if row is None:
                return None
            if row.status == "paused":
                row.status = "starting"
                row.pause_requested = False
            elif row.status == "processing" and row.pause_requested:  # not stopped yet: stay running
                row.pause_requested = False
            return row

    def set_training_openai(self, training_id: str, changes: dict[str, Any], *,
                            append: dict[str, Any] | None = None) -> Training | None:
        """Merge `changes` into the training's OpenAI fields, and add each value of `append` to the
        list under its key, in one transaction (None for a training without those fields)."""
        with self.session() as s:
            row = s.get(Training, training_id, with_for_update=True)
            if row is None or row.openai is None:
                return None
            fields = {**row.openai, **changes}
            for key, item in (append or {}).items():
                fields[key] = [*(fields.get(key) or []), item]
            row.openai = fields
            return row

    # -- trainings: the worker's side ---------------------------------------------------------

    def claim_training(self, worker_id: str, lease_seconds: float,
                       skip: Callable[[Training], bool] | None = None) -> Training | None:
        """Atomically take the oldest queued training, or a running one whose lease expired (its
        worker died), for `worker_id` until now + `lease_seconds`. None when there is no work.
        `skip` passes over trainings this worker should leave to others (ones that do not fit its
        devices when another worker's do), among the oldest CLAIM_WINDOW.

        Two workers never get the same job: PostgreSQL locks the rows (FOR UPDATE SKIP LOCKED, so
        the other worker takes the next ones), SQLite runs the whole claim under its write lock.
        """
        now = utcnow()
        claimable = or_(Training.status == "starting",
                        and_(Training.status == "processing", Training.lease_expires_at < now))
        with self.session() as s:
            # Each owner's running trainings, against their `trainings` limit (fair share: an
            # owner at the limit waits, and the next owner's training goes first).
            running = dict(s.execute(select(Training.owner, func.count()).where(_running(now))
                                     .group_by(Training.owner)).all())
            limit_rows = {row.owner: row for row in s.scalars(select(OwnerLimits))}
            everyone = limit_rows.get(DEFAULT_OWNER)

            def at_limit(owner: str) -> int:
                """The owner's `trainings` limit when they are at it, else 0."""
                limit = Limits.resolve(limit_rows.get(owner), everyone).trainings
                if not limit or running.get(owner, 0) >= limit:
                    return limit
                # Under the limit: count again holding the owner's row, so that two workers
                # claiming at once on PostgreSQL can not both take the owner's last place.
                s.get(Owner, owner, with_for_update=True)
                running[owner] = s.scalar(select(func.count()).select_from(Training).where(
                    Training.owner == owner, _running(now))) or 0
                return limit if running[owner] >= limit else 0

            while True:
                rows = s.scalars(select(Training).where(claimable).order_by(Training.created_at, Training.id)
                                 .limit(CLAIM_WINDOW).with_for_update(skip_locked=True)).all()
                settled = False
                for row in rows:
                    # Its worker died after a cancel was asked for, or it keeps killing its workers.
                    if row.cancel_requested:
                        self._end_training(s, row, "canceled")
                    elif row.pause_requested:  # its worker died after a pause was asked for
                        self._pause(row)
                    elif row.attempts >= MAX_TRAINING_ATTEMPTS:
                        lost = f"the worker running this training was lost {row.attempts} times"
                        self._end_training(s, row, "failed", error=lost)
                    elif limit := at_limit(row.owner):
                        # Say once why it waits, on the training itself (no webhook: Replicate's
                        # come from "start" on, and the first after it carries these logs).
                        if row.started_at is None and not row.logs:
                            n = running[row.owner]
                            row.logs = (f"waiting: {row.owner} has {n} training{'s' if n != 1 else ''} running, "
                                        f"the most at once for this owner (limit trainings={limit}); "
                                        "this one starts when one of them ends\n")
                        continue
                    elif skip is None or not skip(row):
                        first_start = row.started_at is None
                        row.status = "processing"
                        row.lease_owner = worker_id
                        row.lease_expires_at = now + timedelta(seconds=lease_seconds)
                        row.attempts += 1
                        if first_start:
                            row.started_at = now
                            outbox.enqueue(s, row, "start", self.base_url, self.webhook_body)
                        return row
                    else:
                        continue
                    settled = True
                if not settled:  # nothing left, or all of it for other workers
                    return None

    def training_counts(self, owner: str) -> dict[str, int]:
        """{"running": n, "queued": m}: `owner`'s trainings held by a live worker, and waiting for one."""
        now = utcnow()
        with self._reading() as s:
            running = s.scalar(select(func.count()).select_from(Training).where(Training.owner == owner,
                                                                                _running(now)))
            queued = s.scalar(select(func.count()).select_from(Training).where(
                Training.owner == owner, Training.status == "starting"))
        return {"running": int(running or 0), "queued": int(queued or 0)}

    def _held(self, s: Session, training_id: str, worker_id: str) -> Training | None:
        """The training, locked, if `worker_id` holds its lease and it is still running."""
        row = s.get(Training, training_id, with_for_update=True)
        if row is None or row.status != "processing" or row.lease_owner != worker_id:
            return None
        return row

    def heartbeat(self, training_id: str, worker_id: str, lease_seconds: float) -> str:
        """Extend the worker's lease. Returns "ok"; "cancel" when a cancel was asked for (the lease
        is still extended, to let the worker stop the job); "pause" when a pause was asked for (the
        worker stops the job and calls paused_training); "lost" when the worker no longer holds
        the job (another worker took it over, or it is finished): the worker must drop it."""
        with self.session() as s:
            row = self._held(s, training_id, worker_id)
            if row is None:
                return "lost"
            row.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
            return "cancel" if row.cancel_requested else "pause" if row.pause_requested else "ok"

    def append_training_logs(self, training_id: str, worker_id: str, text: str, *,
                             metrics: dict[str, Any] | None = None) -> None:
        """Append `text` (as is: end lines with "\\n") to the logs and merge `metrics` into the
        metrics; ignored when `worker_id` does not hold the lease."""
        with self.session() as s:
            row = self._held(s, training_id, worker_id)
            if row is None:
                return
            if metrics:
                row.metrics = {**(row.metrics or {}), **metrics}
            if text:
                row.logs = (row.logs or "") + text
                outbox.enqueue(s, row, "logs", self.base_url, self.webhook_body)

    def release_training(self, training_id: str, worker_id: str) -> bool:
        """Give a running training back, for another worker (or this one, restarted) to resume at
        once: the worker is shutting down. Its claim does not count as a lost attempt. False when
        `worker_id` did not hold it."""
        with self.session() as s:
            row = self._held(s, training_id, worker_id)
            if row is None:
                return False
            row.lease_owner = None
            row.lease_expires_at = utcnow()
            row.attempts = max(row.attempts - 1, 0)
            return True

    def paused_training(self, training_id: str, worker_id: str) -> Training | None:
        """The worker stopped a training after a pause request: it waits as "paused", its lease
        released, until resumed. That claim does not count as a lost attempt. None, and nothing
        changed, when `worker_id` does not hold the lease."""
        with self.session() as s:
            row = self._held(s, training_id, worker_id)
            if row is None:
                return None
            self._pause(row)
            return row

    @staticmethod
    def _pause(row: Training) -> None:
        row.status = "paused"
        row.pause_requested = False
        row.lease_owner = None
        row.lease_expires_at = None
        row.attempts = max(row.attempts - 1, 0)

    def set_training_run(self, training_id: str, worker_id: str, run_url: str) -> None:
        """Record where the training's files are (ignored without the lease)."""
        with self.session() as s:
            row = self._held(s, training_id, worker_id)
            if row is not None:
                row.run_url = run_url

    def finish_training(self, training_id: str, worker_id: str, *, status: str, error: str | None = None,
                        metrics: dict[str, Any] | None = None, output: dict[str, Any] | None = None,
                        ) -> Training | None:
        """End the training as `status` (failed, canceled or succeeded) and release its lease.
        None, and nothing changed, when `worker_id` does not hold the lease."""
        if status not in TERMINAL:
            raise ValueError(f"not a final status: {status}")
        with self.session() as s:
            row = self._held(s, training_id, worker_id)
            if row is None:
                return None
            if metrics:
                row.metrics = {**(row.metrics or {}), **metrics}
            if output is not None:
                row.output = output
            self._end_training(s, row, status, error=error)
            return row

    def succeed_training(self, training_id: str, worker_id: str, *, run_url: str, weights_url: str,
                         metrics: dict[str, Any], checkpoint_urls: Sequence[str] = ()
                         ) -> tuple[Training, Version] | None:
        """In one transaction: add a version (the weights of the run at `run_url`) to the destination model,
        set the output to {"weights": weights_url, "version": "owner/name:id"} and mark the training
        succeeded. Each of `checkpoint_urls` (a checkpoint of the run) becomes a version too, older
        than the final one, listed in the output's "checkpoint_versions". None, and nothing changed,
        when `worker_id` does not hold the lease; LookupError when the destination model is gone."""
        with self.session() as s:
            row = self._held(s, training_id, worker_id)
            if row is None:
                return None
            dest_owner, _, dest_name = row.destination.partition("/")
            dest = s.scalar(select(Model).where(Model.owner == dest_owner, Model.name == dest_name))
            if dest is None:
                raise LookupError(f"destination model {row.destination} does not exist")
            trained = s.get(Version, row.version_id)
            base_name = trained.base_name if trained is not None else str(row.job.get("base", ""))
            now = utcnow()
            earlier = [Version(model_id=dest.id, base_name=base_name, run_url=url, training_id=row.id,
                               created_at=now - timedelta(milliseconds=len(checkpoint_urls) - i))
                       for i, url in enumerate(checkpoint_urls)]  # oldest first; the final one stays the latest
            version = Version(model_id=dest.id, base_name=base_name, run_url=run_url, training_id=row.id, created_at=now)
            s.add_all([*earlier, version])
            s.flush()
            row.run_url = run_url
            row.output = {"weights": weights_url, "version": f"{dest.owner}/{dest.name}:{version.id}"}
            if earlier:
                row.output["checkpoint_versions"] = [f"{dest.owner}/{dest.name}:{v.id}" for v in earlier]
            if metrics:
                row.metrics = {**(row.metrics or {}), **metrics}
            self._end_training(s, row, "succeeded")
            return row, version

    def _end_training(self, s: Session, row: Training, status: str, *, error: str | None = None) -> None:
        row.status = status
        if error is not None:
            row.error = error
        row.completed_at = utcnow()
        row.lease_owner = None
        row.lease_expires_at = None
        outbox.enqueue(s, row, "completed", self.base_url, self.webhook_body)

    # -- predictions --------------------------------------------------------------------------

    def create_prediction(self, owner: str, *, model: str, version_id: str, input: dict[str, Any],
                          stream: bool = False, webhook: str | None = None,
                          webhook_events_filter: Sequence[str] | None = None, runner: str | None = None,
                          lease_seconds: float = 30.0) -> Prediction:
        """Queue a prediction (status "starting") on `model`'s version `version_id`, held by the
        prediction runner `runner` for `lease_seconds` (renewed by renew_prediction_leases)."""
        with self.session() as s:
            row = Prediction(owner=owner, model=model, version_id=version_id, input=input, stream=stream,
                             webhook=webhook, webhook_events_filter=webhook_events_filter, lease_owner=runner,
                             lease_expires_at=utcnow() + timedelta(seconds=lease_seconds) if runner else None)
            s.add(row)
            _count_run(s, model)
        return row

    def get_prediction(self, owner: str, prediction_id: str) -> Prediction | None:
        with self._reading() as s:
            return s.scalar(select(Prediction).where(Prediction.id == prediction_id,
                                                     Prediction.owner == owner))

    def list_predictions(self, owner: str, *, cursor: str | None = None, limit: int = 100) -> Page:
        with self._reading() as s:
            stmt = select(Prediction).where(Prediction.owner == owner)
            return paginate(s, stmt, Prediction.created_at, Prediction.id, cursor, limit)

    @staticmethod
    def _runs_here(row: Prediction, runner: str | None) -> bool:
        """Whether `runner` may write `row`: it holds the lease, or the caller does not say (a
        single process, or a test)."""
        return runner is None or row.lease_owner in (None, runner)

    def start_prediction(self, prediction_id: str, runner: str | None = None) -> Prediction | None:
        """starting → processing; None when it is not waiting to start (canceled meanwhile) or
        another runner holds it."""
        with self.session() as s:
            row = s.get(Prediction, prediction_id, with_for_update=True)
            if row is None or not self._runs_here(row, runner) or row.status != "starting":
                return None
            row.status = "processing"
            row.started_at = utcnow()
            outbox.enqueue(s, row, "start", self.base_url, self.webhook_body)
            return row

    def set_predictions_output(self, outputs: dict[str, list[str]], runner: str | None = None, *,
                               watch: Iterable[str] = ()) -> set[str]:
        """Replace the output produced so far of several running predictions this runner holds, in
        one transaction (a server streaming many predictions writes them all at once); returns
        which of them, and of `watch`, have had a cancel asked for (by any server)."""
        ids = set(outputs) | set(watch)
        if not ids:
            return set()
        with self.session() as s:
            rows = s.scalars(select(Prediction).where(Prediction.id.in_(sorted(ids))).with_for_update()).all()
            canceled = set()
            for row in rows:
                if row.cancel_requested:
                    canceled.add(row.id)
                if row.id not in outputs or not self._runs_here(row, runner) or row.status != "processing":
                    continue
                row.output = list(outputs[row.id])
                outbox.enqueue(s, row, "output", self.base_url, self.webhook_body)
            return canceled

    def finish_prediction(self, prediction_id: str, *, status: str, output: list[str] | None = None,
                          error: str | None = None, metrics: dict[str, Any] | None = None,
                          runner: str | None = None) -> Prediction | None:
        """End the prediction as `status`; a prediction already finished is returned unchanged.
        None when it does not exist or another runner took it over (this one lost its lease)."""
        if status not in TERMINAL:
            raise ValueError(f"not a final status: {status}")
        with self.session() as s:
            row = s.get(Prediction, prediction_id, with_for_update=True)
            if row is None or row.status in TERMINAL:
                return row
            if not self._runs_here(row, runner):
                return None
            if output is not None:
                row.output = list(output)
            if metrics:
                row.metrics = {**(row.metrics or {}), **metrics}
            self._end_prediction(s, row, status, error=error)
            return row

    def cancel_prediction(self, owner: str, prediction_id: str) -> Prediction | None:
        """Ask to cancel: a prediction not started yet is canceled at once; a running one is
        flagged for its runner to stop. None if not found."""
        with self.session() as s:
            row = s.scalar(select(Prediction).where(Prediction.id == prediction_id, Prediction.owner == owner)
                           .with_for_update())
            if row is None or row.status in TERMINAL:
                return row
            row.cancel_requested = True
            if row.status == "starting":
                self._end_prediction(s, row, "canceled")
            return row

    def is_cancel_requested_prediction(self, prediction_id: str) -> bool:
        with self._reading() as s:
            return bool(s.scalar(select(Prediction.cancel_requested).where(Prediction.id == prediction_id)))

    def renew_prediction_leases(self, runner: str, lease_seconds: float) -> int:
        """Extend `runner`'s hold on its unfinished predictions; returns how many it holds."""
        return self._set_prediction_leases(runner, utcnow() + timedelta(seconds=lease_seconds))

    def release_predictions(self, runner: str) -> int:
        """Hand back `runner`'s unfinished predictions (a server shutting down): their leases end
        now, so any server takes them over at once. Returns how many."""
        return self._set_prediction_leases(runner, utcnow() - timedelta(seconds=1))

    def _set_prediction_leases(self, runner: str, expires_at: datetime) -> int:
        with self.session() as s:
            result = s.execute(update(Prediction)
                               .where(Prediction.lease_owner == runner, Prediction.status.in_(UNFINISHED))
                               .values(lease_expires_at=expires_at))
            return cast(CursorResult, result).rowcount or 0  # an UPDATE's result is a CursorResult

    def adopt_orphaned_predictions(self, runner: str, lease_seconds: float) -> list[tuple[Prediction, Version]]:
        """Predictions whose server stopped without finishing them (a crash, a kill: their lease
        expired, or they have none): each goes back to "starting" with its output cleared, held by
        `runner` to run again, so none is left hanging; one whose cancel was asked for ends as
        canceled instead. A prediction a live server holds is never taken. Returns them with
        their versions, oldest first.

        Two servers never adopt the same one: PostgreSQL locks the rows (FOR UPDATE SKIP LOCKED),
        SQLite runs the whole step under its write lock."""
        now = utcnow()
        orphaned = and_(Prediction.status.in_(UNFINISHED),
                        or_(Prediction.lease_expires_at.is_(None), Prediction.lease_expires_at < now))
        again: list[tuple[Prediction, Version]] = []
        with self.session() as s:
            rows = s.scalars(select(Prediction).where(orphaned).order_by(Prediction.created_at, Prediction.id)
                             .with_for_update(skip_locked=True)).all()
            for row in rows:
                version = s.get(Version, row.version_id)
                if row.cancel_requested or version is None:
                    self._end_prediction(s, row, "canceled" if row.cancel_requested else "failed",
                                         error=None if row.cancel_requested else "its version was deleted")
                    continue
                row.status, row.output, row.started_at = "starting", None, None
                row.lease_owner, row.lease_expires_at = runner, now + timedelta(seconds=lease_seconds)
                again.append((row, version))
        return again

    def _end_prediction(self, s: Session, row: Prediction, status: str, *, error: str | None = None) -> None:
        row.status = status
        if error is not None:
            row.error = error
        row.completed_at = utcnow()
        outbox.enqueue(s, row, "completed", self.base_url, self.webhook_body)


def _count_run(s: Session, model: str) -> None:
    owner, _, name = model.partition("/")
    s.execute(update(Model).where(Model.owner == owner, Model.name == name)
              .values(run_count=Model.run_count + 1))

