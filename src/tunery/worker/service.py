"""Running workers and the webhook sender as a service: inside the API server (EmbeddedWorkers)
or as a process of their own (`run_worker`, behind `tunery worker`)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from tunery.errors import TuneryError
from tunery.settings import Settings
from tunery.store.store import Store
from tunery.worker.runner import Worker
from tunery.worker.webhooks import WebhookSender

log = logging.getLogger("tunery.worker")


def split_devices(settings: Settings, workers: int) -> list[Settings]:
    """Each of `workers` workers' settings, with its own share of `settings.gpus` (0,1,2,3 over two
    workers: 0,1 and 2,3), so that two trainings never land on one device."""
    devices = settings.devices
    if not devices or workers <= 1:
        return [settings] * workers
    if len(devices) < workers:
        raise TuneryError(f"{workers} embedded workers need at least one GPU each, but gpus names {len(devices)} "
                          f"({settings.gpus}); lower --workers or name more GPUs")
    share = len(devices) // workers
    return [settings.model_copy(update={"gpus": ",".join(devices[i * share:(i + 1) * share])})
            for i in range(workers)]


class EmbeddedWorkers:
    """`count` training workers (threads, each running its trainings in child processes) and,
    with `webhooks`, one webhook sender, all in this process. `start()` / `stop()`."""

    def __init__(self, store: Store, settings: Settings, *, count: int | None = None, webhooks: bool = True,
                 poll_interval: float = 1.0):
        self.store = store
        self.settings = settings
        self.count = settings.embedded_workers if count is None else count
        host = f"{socket.gethostname()}-{os.getpid()}"
        self.workers = [Worker(store, own, worker_id=f"{host}-embedded-{i}", poll_interval=poll_interval)
                        for i, own in enumerate(split_devices(settings, self.count))]
        self.sender = WebhookSender(store) if webhooks else None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> EmbeddedWorkers:
        self._stop.clear()
        for worker in self.workers:
            thread = threading.Thread(target=worker.run_forever, args=(self._stop,), name=worker.worker_id,
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.sender is not None:
            self.sender.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop: running trainings are stopped and handed back for the next start to resume."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        if self.sender is not None:
            self.sender.stop()


def run_worker(store: Store, settings: Settings, *, worker_id: str | None = None,
               stop_event: threading.Event | None = None) -> None:
    """Run one worker and a webhook sender in this process until SIGINT/SIGTERM (or `stop_event`).
    On a signal, a running training is stopped and handed back to be resumed, then this returns."""
    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            log.info("got %s: stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    sender = WebhookSender(store).start()
    try:
        Worker(store, settings, worker_id=worker_id).run_forever(stop)
    finally:
        sender.stop()
