"""The webhook outbox: rows written in the transaction of the state change they report.

A sender thread (tunery.worker.webhooks) delivers them later and retries with backoff, so a
webhook is never sent for a change that was rolled back, and none is lost on a restart.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunery.store.models import Prediction, Training, WebhookDelivery, utcnow

EVENTS = ("start", "output", "logs", "completed")
# Replicate sends `output` and `logs` at most every 500 ms; `start` and `completed` always.
THROTTLED = {"output", "logs"}
THROTTLE = timedelta(milliseconds=500)
MAX_ATTEMPTS = 8
# How long a sender may hold a delivery it fetched before another sender may take it.
CLAIM = timedelta(seconds=60)


def wants(row: Training | Prediction, event: str) -> bool:
    """Whether `row` has a webhook that subscribed to `event` (no filter: every event)."""
    if not row.webhook:
        return False
    events = row.webhook_events_filter
    return event in (events if events else EVENTS)


#: Renders a training or prediction as a webhook body: (row, base URL) -> JSON object. The API
#: that owns webhooks (Replicate's) gives it to the Store; the store itself knows no wire shapes.
WebhookBody = Callable[[Training | Prediction, str], dict[str, Any]]


def dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, default=_json_default, separators=(",", ":"), ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def enqueue(session: Session, row: Training | Prediction, event: str, base_url: str,
            render: WebhookBody | None) -> WebhookDelivery | None:
    """Queue `event` for `row` in `session`'s transaction, if its webhook wants it.

    A throttled event (`logs`, `output`) within 500 ms of the last one of its kind either
    refreshes that one's body, when it has not been sent yet, or is dropped: the next event
    (at the latest `completed`) carries the newer state anyway.
    """
    if not wants(row, event):
        return None
    if render is None:
        raise RuntimeError("this Store was opened without webhook_body, so it cannot write webhook bodies")
    session.flush()  # so defaults (created_at, ...) are in the body
    body = dumps(render(row, base_url))
    now = utcnow()
    if event in THROTTLED:
        last = session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.object_id == row.id, WebhookDelivery.event == event)
            .order_by(WebhookDelivery.id.desc())
            .limit(1)
        ).first()
        if last is not None and now - last.created_at < THROTTLE:
            # Refresh it only while no sender holds it (due_webhooks moves next_attempt_at ahead).
            if last.delivered_at is None and last.attempts == 0 and last.next_attempt_at <= now:
                last.body = body
                return last
            return None
    delivery = WebhookDelivery(url=row.webhook, event=event, object_id=row.id, body=body, next_attempt_at=now,
                               created_at=now)
    session.add(delivery)
    return delivery


def backoff(attempts: int) -> timedelta:
    """Delay before retry number `attempts` (1, 2, 4, ... seconds; about 2 minutes in all)."""
    return timedelta(seconds=min(2 ** max(attempts - 1, 0), 600))
