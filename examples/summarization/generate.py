"""Write this folder's train.jsonl and test.jsonl (seeded: the same files every time, no network).

    python examples/summarization/generate.py
"""

from __future__ import annotations

from pathlib import Path

from tunery.samples import write_splits
from tunery.samples.summarization import splits

if __name__ == "__main__":
    for path in write_splits(Path(__file__).resolve().parent, *splits()):
        print(f"{path}: {sum(1 for _ in path.open())} rows")
