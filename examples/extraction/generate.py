"""Write this folder's train.jsonl and test.jsonl (seeded: the same files every time, no network).

    python examples/extraction/generate.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tunery.samples.extraction import splits


def main() -> None:
    here = Path(__file__).resolve().parent
    train, test = splits()
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{here / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
