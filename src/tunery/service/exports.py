"""Exports of a succeeded training (merged, GGUF, Ollama), made by the API server: one background
thread per export (the exporter runs one at a time per process), their progress kept here, their
results in the run's storage."""

from __future__ import annotations

import logging
import threading
from typing import Any

from tunery.errors import TuneryError
from tunery.service.errors import Invalid, NotFound
from tunery.service.trainings import exported_run, get_training
from tunery.settings import Settings
from tunery.store.store import Store

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


def export_name(fmt: str, *, dtype: str, quant: str) -> str:
    """The export's name (format and type); Invalid naming what is wrong."""
    from tunery.export.exporter import export_name as name_of

    try:
        return name_of(fmt, dtype=dtype, quant=quant)
    except TuneryError as exc:
        raise Invalid(str(exc), field="format", title="Invalid export",
                      errors=[{"field": "format", "reason": str(exc)}]) from None


def start_export(store: Store, settings: Settings, exports: Exports, owner: str, training_id: str, fmt: str, *,
                 dtype: str, quant: str) -> dict[str, Any]:
    """Export a succeeded training unless that export exists; its state (name, format, status, ...)."""
    from tunery.export.exporter import list_exports

    name = export_name(fmt, dtype=dtype, quant=quant)
    row, run = exported_run(store, settings, owner, training_id)
    done = {e["name"]: e for e in list_exports(run)}
    if name in done:
        return {**done[name], "status": "succeeded"}
    return exports.start(training_id, row.run_url, fmt, dtype=dtype, quant=quant)


def training_exports(store: Store, settings: Settings, exports: Exports, owner: str,
                     training_id: str) -> list[dict[str, Any]]:
    """The training's exports by name: those in its run (succeeded) and those this server is making or failed."""
    from tunery.export.exporter import list_exports

    row = get_training(store, owner, training_id)
    done = {e["name"]: {**e, "status": "succeeded"} for e in list_exports(settings.run(row.run_url))} \
        if row.run_url and row.status == "succeeded" else {}
    merged = {**exports.states(training_id), **done}
    return [merged[name] for name in sorted(merged)]


def export_file(store: Store, settings: Settings, owner: str, training_id: str, name: str):
    """The local copy of a finished export's file (a .zip or a .gguf)."""
    from tunery.export.exporter import file_name, list_exports

    _, run = exported_run(store, settings, owner, training_id)
    if name not in {e["name"] for e in list_exports(run)}:
        raise NotFound(f"export {name} of training {training_id} not found")
    return run.pull(run.export_entry(file_name(name)))
