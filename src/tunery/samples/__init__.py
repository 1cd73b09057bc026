"""Bundled sample datasets, generated deterministically (seeded, no network)."""

from __future__ import annotations

import json
from pathlib import Path


def write_splits(folder: str | Path, train: list[dict], test: list[dict]) -> tuple[Path, Path]:
    """Write train.jsonl and test.jsonl into `folder` (created if missing); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]
