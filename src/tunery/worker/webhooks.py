"""Delivers the webhook outbox: POSTs each due delivery, signed the way Replicate signs them.

Headers (the Standard Webhooks scheme Replicate uses): `webhook-id` (the same on every retry of
a delivery, so a receiver can drop duplicates), `webhook-timestamp` (Unix seconds) and
`webhook-signature` = "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), the key
being the base64-decoded part of the secret after "whsec_". A 2xx answer is a delivery; anything
else is retried with backoff by the store (see store/outbox.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
import time
from urllib.parse import urlsplit

import httpx

from tunery.store.models import WebhookDelivery
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
    """A thread that delivers due webhooks every `interval` seconds until `stop()`."""

    def __init__(self, store: Store, *, interval: float = 0.5, timeout: float = 10.0):
        self.store = store
        self.interval = interval
        self.timeout = timeout
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
        with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
            while not self._stop.is_set():
                try:
                    sent = self.deliver_due(client)
                except Exception:  # the database went away, say: try again later
                    log.exception("delivering webhooks failed")
                    sent = 0
                if not sent:
                    self._stop.wait(self.interval)

    def deliver_due(self, client: httpx.Client) -> int:
        """Attempt every delivery due now; returns how many were attempted."""
        due = self.store.due_webhooks()
        if not due:
            return 0
        secret = self.store.webhook_secret()
        for delivery in due:
            self._deliver(client, secret, delivery)
        return len(due)

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
