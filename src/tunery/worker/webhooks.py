"""Delivers the webhook outbox: POSTs each due delivery, signed the way Replicate signs them.

Headers (the Standard Webhooks scheme Replicate uses): `webhook-id` (the same on every retry of
a delivery, so a receiver can drop duplicates), `webhook-timestamp` (Unix seconds) and
`webhook-signature` = "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), the key
being the base64-decoded part of the secret after "whsec_". A 2xx answer is a delivery; anything
else is retried with backoff by the store (see store/outbox.py).

Deliveries to different objects go out in parallel (a slow receiver holds up only its own
object's webhooks); those of one object go in order. Delivered and abandoned rows are pruned
after `keep`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from urllib.parse import urlsplit

import httpx

from tunery.store import outbox
from tunery.store.models import WebhookDelivery, utcnow
from tunery.store.store import Store

log = logging.getLogger("tunery.webhooks")


def sign(secret: str, webhook_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header value for `body`."""
    key = base64.b64decode(secret.split("_", 1)[1])
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, delivery: WebhookDelivery, timestamp: int | None = None) -> dict[str, str]:
    webhook_id = f"msg_{delivery.object_id}_{delivery.id}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "user-agent": "tunery-webhooks",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, delivery.body),
    }


class WebhookSender:
    """A thread that delivers due webhooks every `interval` seconds until `stop()`, up to
    `concurrency` objects at a time, and prunes rows older than `keep` every `prune_every` s."""

    def __init__(self, store: Store, *, interval: float = 0.5, timeout: float = 10.0, concurrency: int = 8,
                 keep: timedelta = timedelta(days=7), prune_every: float = 3600.0):
        self.store = store
        self.interval = interval
        self.timeout = timeout
        self.concurrency = concurrency
        self.keep = keep
        self.prune_every = prune_every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> WebhookSender:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="tunery-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        pruned_at = 0.0
        with httpx.Client(timeout=self.timeout, follow_redirects=False, limits=limits) as client:
            while not self._stop.is_set():
                try:
                    if time.monotonic() - pruned_at >= self.prune_every:
                        self.prune()
                        pruned_at = time.monotonic()
                    sent = self.deliver_due(client)
                except Exception:  # the database went away, say: try again later
                    log.exception("delivering webhooks failed")
                    sent = 0
                if not sent:
                    self._stop.wait(self.interval)

    def prune(self) -> int:
        """Delete deliveries that were delivered or given up on more than `keep` ago."""
        removed = self.store.prune_webhooks(utcnow() - self.keep)
        if removed:
            log.info("pruned %d old webhook deliveries", removed)
        return removed

    def deliver_due(self, client: httpx.Client) -> int:
        """Attempt every delivery due now; returns how many were claimed."""
        due = self.store.due_webhooks()
        if not due:
            return 0
        claimed_at = time.monotonic()
        secret = self.store.webhook_secret()
        by_object: dict[str, list[WebhookDelivery]] = defaultdict(list)
        for delivery in due:
            by_object[delivery.object_id].append(delivery)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(by_object)),
                                thread_name_prefix="tunery-webhook") as pool:
            futures = [pool.submit(self._deliver_in_order, client, secret, group, claimed_at)
                       for group in by_object.values()]
            for future in futures:
                future.result()
        return len(due)

    def _deliver_in_order(self, client: httpx.Client, secret: str, deliveries: list[WebhookDelivery],
                          claimed_at: float) -> None:
        """One object's deliveries, oldest first. Those that could not start before this
        sender's hold on them might run out are handed back, so that no other sender posts one
        while this one still does."""
        deadline = claimed_at + outbox.CLAIM.total_seconds() - self.timeout - 5
        for i, delivery in enumerate(deliveries):
            if time.monotonic() > deadline:
                self.store.release_webhooks([d.id for d in deliveries[i:]])
                return
            self._deliver(client, secret, delivery)

    def _deliver(self, client: httpx.Client, secret: str, delivery: WebhookDelivery) -> None:
        if urlsplit(delivery.url).scheme not in ("http", "https"):
            self.store.mark_webhook(delivery.id, ok=False, error="only http(s) webhook URLs are called",
                                    final=True)
            return
        try:
            response = client.post(delivery.url, content=delivery.body.encode(),
                                   headers=signed_headers(secret, delivery))
        except httpx.HTTPError as exc:
            self.store.mark_webhook(delivery.id, ok=False, error=f"{type(exc).__name__}: {exc}")
            return
        if response.is_success:
            self.store.mark_webhook(delivery.id, ok=True)
        else:
            self.store.mark_webhook(delivery.id, ok=False, error=f"HTTP {response.status_code}")
