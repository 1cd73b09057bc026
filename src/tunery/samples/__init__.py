"""Bundled sample datasets, generated deterministically (seeded, no network)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path


def generate(make_example: Callable[[random.Random], dict], n: int, seed: int) -> list[dict]:
    """`n` rows from a sample's example maker, reproducible from `seed`."""
    rng = random.Random(seed)
    return [make_example(rng) for _ in range(n)]


def disjoint_splits(make_example: Callable[[random.Random], dict], n_train: int, n_test: int,
                    seed: int) -> tuple[list[dict], list[dict]]:
    """Train and test splits of a sample, with no prompt shared between them."""
    train = generate(make_example, n_train, seed)
    seen = {r["prompt"] for r in train}
    test = [r for r in generate(make_example, n_test * 2, seed + 1) if r["prompt"] not in seen][:n_test]
    return train, test


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
