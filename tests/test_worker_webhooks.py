"""Webhook delivery over real HTTP on loopback: signed so that the official replicate client's
validator accepts it, retried with backoff after a failure, never sent to non-http(s) URLs; and
the event stream → logs/metrics bookkeeping the worker does."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import replicate
from replicate.webhook import InvalidSignatureError, WebhookSigningSecret

from tunery.server.replicate.shapes import webhook_body
from tunery.store import Store, base_version_id
from tunery.worker.progress import Progress, step_line
from tunery.worker.webhooks import WebhookSender, sign


class Receiver:
    """A loopback HTTP server that records each POST and answers with the next queued status."""

    def __init__(self, statuses: list[int], delay: float = 0.0):
        self.statuses = list(statuses)
        self.delay = delay
        self.requests: list[tuple[float, dict[str, str], str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                time.sleep(receiver.delay)
                receiver.requests.append((time.monotonic(), dict(self.headers), body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'tunery.db'}", base_url="http://tunery.test", webhook_body=webhook_body)
    s.create_model("alice", "dest")
    yield s
    s.close()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_webhooks_are_signed_and_retried_until_delivered(store):
    receiver = Receiver([500, 200])
    sender = WebhookSender(store, interval=0.05).start()
    try:
        training = store.create_training("alice", model="tunery/tiny", version_id=base_version_id("tiny"),
                                         destination="alice/dest", input={}, job={}, webhook=receiver.url,
                                         webhook_events_filter=["start"])
        store.claim_training("w1", 30)
        wait_for(lambda: len(receiver.requests) == 2, 10, "a failed delivery and its retry")
    finally:
        sender.stop()
        receiver.close()

    (first_at, first, body), (retry_at, headers, retry_body) = receiver.requests
    assert retry_at - first_at >= 0.9  # the first backoff is a second
    assert body == retry_body and first["webhook-id"] == headers["webhook-id"]  # the same message
    obj = json.loads(body)
    assert (obj["id"], obj["status"]) == (training.id, "processing")
    assert headers["content-type"] == "application/json"

    secret = WebhookSigningSecret(key=store.webhook_secret())
    assert replicate.webhooks.validate(headers=headers, body=body, secret=secret, tolerance=60) is None
    with pytest.raises(InvalidSignatureError):
        forged = body.replace("processing", "succeeded")
        replicate.webhooks.validate(headers=headers, body=forged, secret=secret)
    other = WebhookSigningSecret(key="whsec_" + "A" * 44)
    with pytest.raises(InvalidSignatureError):
        replicate.webhooks.validate(headers=headers, body=body, secret=other)

    (delivery,) = store.webhook_deliveries(training.id)
    assert delivery.delivered_at is not None and delivery.attempts == 2


def test_only_http_urls_are_called(store):
    training = store.create_training("alice", model="m/n", version_id="v", destination="alice/dest", input={},
                                     job={}, webhook="file:///etc/passwd", webhook_events_filter=["start"])
    store.claim_training("w1", 30)
    sender = WebhookSender(store)
    import httpx

    with httpx.Client() as client:
        assert sender.deliver_due(client) == 1
        assert sender.deliver_due(client) == 0
    (delivery,) = store.webhook_deliveries(training.id)
    assert delivery.delivered_at is None and "http(s)" in delivery.last_error


def test_a_slow_receiver_holds_up_only_its_own_webhooks(store):
    slow, fast = Receiver([], delay=3.0), Receiver([])
    ids = {}
    for name, receiver in (("slow", slow), ("fast", fast)):
        ids[name] = store.create_training("alice", model="m/n", version_id="v", destination="alice/dest", input={},
                                          job={}, webhook=receiver.url, webhook_events_filter=["start"]).id
        store.claim_training(f"w-{name}", 30)
    sender = WebhookSender(store, interval=0.05).start()
    try:
        wait_for(lambda: len(fast.requests) == 1, 2.5, "the fast receiver's webhook while the slow one answers")
        (pending,) = store.webhook_deliveries(ids["slow"])
        assert pending.delivered_at is None
        wait_for(lambda: store.webhook_deliveries(ids["slow"])[0].delivered_at is not None, 10, "the slow one")
    finally:
        sender.stop()
        slow.close()
        fast.close()
    assert len(slow.requests) == 1 and len(fast.requests) == 1


def test_old_deliveries_are_pruned(store):
    from datetime import timedelta

    from tunery.store.models import WebhookDelivery, utcnow

    now = utcnow()
    long_ago = now - timedelta(days=30)
    rows = {
        "delivered long ago": dict(delivered_at=long_ago, attempts=1, created_at=long_ago),
        "given up long ago": dict(delivered_at=None, attempts=8, created_at=long_ago),
        "still retrying": dict(delivered_at=None, attempts=3, created_at=long_ago),
        "delivered just now": dict(delivered_at=now, attempts=1, created_at=now),
    }
    with store.session() as s:
        for name, fields in rows.items():
            s.add(WebhookDelivery(url="http://127.0.0.1:9/hook", event="start", object_id=name, body="{}",
                                  next_attempt_at=now + timedelta(hours=1), **fields))
    assert WebhookSender(store).prune() == 2
    left = {name for name in rows if store.webhook_deliveries(name)}
    assert left == {"still retrying", "delivered just now"}


def test_signature_matches_the_documented_scheme():
    # whsec_ + base64 of the key bytes b"k" * 32; signature = base64 HMAC-SHA256 of "id.ts.body".
    import base64
    import hashlib
    import hmac

    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    expected = base64.b64encode(hmac.new(b"k" * 32, b"msg_1.1700000000.{}", hashlib.sha256).digest()).decode()
    assert sign(secret, "msg_1", 1700000000, "{}") == f"v1,{expected}"


def test_progress_turns_events_into_logs_and_metrics():
    earlier = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.4}]
    progress = Progress({"history": earlier, "loss": 2.4, "step": 3})
    lines = [
        {"type": "log", "message": "resuming from checkpoint-2"},
        {"type": "step", "step": 3, "loss": 2.0, "learning_rate": 1e-4, "tokens_per_second": 12.34,
         "max_steps": 40},
        {"type": "validation", "step": 3, "val_loss": 2.2},
        {"type": "warning", "message": "3 rows were truncated"},
    ]
    text = "".join(json.dumps(e) + "\n" for e in lines)
    progress.feed_text(text[:50])  # a line split across two reads
    progress.feed_text(text[50:] + '{"type": "step", "st')
    logs, metrics = progress.take()
    assert logs == ("resuming from checkpoint-2\nstep 3/40 loss 2.0000 lr 1.00e-04 12.3 tok/s\n"
                    "step 3 validation loss 2.2000\nwarning: 3 rows were truncated\n")
    # Step 3 ran again after the resume: its new numbers replace the lost run's.
    assert metrics["history"] == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
                                  {"step": 3, "loss": 2.0, "learning_rate": 1e-4, "tokens_per_second": 12.34,
                                   "val_loss": 2.2}]
    assert (metrics["loss"], metrics["val_loss"], metrics["step"], metrics["max_steps"]) == (2.0, 2.2, 3, 40)
    assert progress.take() == ("", None)  # nothing new

    progress.feed_text('ep": 4}\n{"type": "failed", "error": "CUDA out of memory"}\n')
    assert progress.failed_error == "CUDA out of memory"
    assert step_line({"step": 7, "loss": None}) == "step 7 loss ? lr ?"
