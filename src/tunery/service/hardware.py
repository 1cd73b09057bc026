"""Hardware routing: what the running workers offer (`GET /v1/hardware`, Replicate's list of
`{"name", "sku"}` with the workers and labels behind each), and a training's hardware choice
checked against them when it is created. The matching rule is `store.models.hardware_matches`;
each worker applies it again when it claims (`worker.runner.Worker._skip`)."""

from __future__ import annotations

from typing import Any

from tunery.service.errors import Invalid
from tunery.settings import Settings
from tunery.store.models import ANY_HARDWARE, WorkerPresence, hardware_matches, parse_labels
from tunery.store.store import Store


def _name(worker: WorkerPresence) -> str:
    if worker.kind != "cuda":
        return "CPU"
    gpu = worker.description.split(" (")[0]
    return f"{gpu} ×{worker.processes}" if worker.processes > 1 else gpu


def offered(store: Store, settings: Settings) -> list[dict[str, Any]]:
    """One entry per SKU the running workers offer: Replicate's `name` and `sku`, and how many
    workers offer it with which labels."""
    groups: dict[str, dict[str, Any]] = {}
    for worker in store.live_workers(settings.lease_seconds):
        labels = worker.offers()
        entry = groups.setdefault(labels["hardware"], {"name": _name(worker), "sku": labels["hardware"],
                                                       "workers": 0, "labels": []})
        entry["workers"] += 1
        if labels not in entry["labels"]:
            entry["labels"].append(labels)
    return sorted(groups.values(), key=lambda e: (e["sku"] != "cpu", e["sku"]))


def describe(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "no worker is running"
    return "; ".join(
        f"{e['sku']} ({e['workers']} worker{'s' if e['workers'] != 1 else ''}: "
        + " | ".join(",".join(f"{k}={v}" for k, v in sorted(labels.items())) for labels in e["labels"]) + ")"
        for e in entries)


def check_hardware(store: Store, settings: Settings, wanted: str | None, *, field: str = "hardware") -> str | None:
    """The hardware a training asks for, as it is recorded on the job (None: any worker), once a
    running worker offers it; Invalid naming `field` with what the running workers offer otherwise."""
    wanted = (wanted or "").strip()
    if wanted in ANY_HARDWARE:
        return None
    try:
        if "=" in wanted:
            parse_labels(wanted)
    except ValueError as exc:
        raise Invalid(f"{field}: {str(exc).removeprefix('labels: ')}", field=field) from None
    workers = store.live_workers(settings.lease_seconds)
    if not any(hardware_matches(wanted, w.offers()) for w in workers):
        message = (f"{field}: no running worker offers {wanted!r}, so nothing could run this training; the running "
                   f"workers offer: {describe(offered(store, settings))} (GET /v1/hardware). Start a worker with "
                   f"`tunery worker --labels hardware={wanted}` (or the labels asked for), or choose one of these")
        raise Invalid(message, field=field, title="No worker offers this hardware",
                      errors=[{"field": field, "reason": message}])
    return wanted
