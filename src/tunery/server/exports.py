"""Exports made by the API server: one background thread per export (the exporter runs one at a
time per process), their progress kept here, their results in the run's storage."""

from __future__ import annotations

import logging
import threading
from typing import Any

from tunery.errors import TuneryError

log = logging.getLogger("tunery.exports")


class Exports:
    """Exports in progress or failed on this server, by (training id, export name)."""

    def __init__(self, settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], dict[str, Any]] = {}

    def start(self, training_id: str, run_url: str, fmt: str, *, dtype: str, quant: str) -> dict[str, Any]:
        """Start the export unless it is running already; its state."""
        from tunery.export.exporter import export, export_name

        name = export_name(fmt, dtype=dtype, quant=quant)
        key = (training_id, name)
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job["status"] == "processing":
                return dict(job)
            job = self._jobs[key] = {"name": name, "format": fmt, "status": "processing", "error": None}

        def work() -> None:
            try:
                export(self.settings.run(run_url), fmt, dtype=dtype, quant=quant, settings=self.settings)
            except TuneryError as e:
                self._set(key, status="failed", error=str(e))
            except Exception as e:  # a bug or the machine: the export fails, the server goes on
                log.exception("export %s of training %s", name, training_id)
                self._set(key, status="failed", error=f"{type(e).__name__}: {e}")
            else:
                self._set(key, status="succeeded")

        threading.Thread(target=work, name=f"export-{training_id}-{name}", daemon=True).start()
        return dict(job)

    def _set(self, key: tuple[str, str], **fields: Any) -> None:
        with self._lock:
            self._jobs[key].update(fields)

    def states(self, training_id: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: dict(job) for (tid, name), job in self._jobs.items() if tid == training_id}
