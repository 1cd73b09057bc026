"""The main job on the embedded defaults: fine-tune SmolLM2-135M on the bundled extraction
sample, then show what the tuned model answers next to what the base answers."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunery.settings import get_settings


def write_sample(folder: Path) -> tuple[Path, Path]:
    from tunery.samples.extraction import splits

    folder.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = splits()
    paths = []
    for name, rows in (("train.jsonl", train_rows), ("test.jsonl", test_rows)):
        p = folder / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1]


def run_demo(*, output_dir: Path | None = None, max_steps: int = -1, n_predictions: int = 5,
             console: Console | None = None) -> dict:
    from tunery.infer.predict import Predictor, SamplingParams
    from tunery.train.recipe import train

    console = console or Console(stderr=True)
    settings = get_settings()
    run_dir = Path(output_dir) if output_dir else settings.runs_dir / time.strftime("demo-%Y%m%d-%H%M%S")
    train_file, test_file = write_sample(run_dir / "data")
    console.print(f"[bold]tunery demo[/]: LoRA fine-tune of smollm2-135m on {train_file}")
    inputs = {
        "train_data": str(train_file),
        "num_train_epochs": 3,
        "train_batch_size": 8,
        "micro_batch_size": 8,
        "num_validation_samples": 20,
        "learning_rate": 1e-3,
        "max_steps": max_steps,
        "validation_prompt": json.loads(test_file.read_text().splitlines()[0])["prompt"],
    }
    result = train(inputs, base="smollm2-135m", output_dir=run_dir)

    rows = [json.loads(line) for line in test_file.read_text().splitlines()[:n_predictions]]
    predictor = Predictor("smollm2-135m")
    params = SamplingParams(temperature=0, max_new_tokens=32, stop_sequences="\n")
    table = Table(title="base vs tuned on held-out messages", show_lines=True)
    for col in ("message", "expected", "base", "tuned"):
        table.add_column(col, overflow="fold")
    correct = 0
    for r in rows:
        base_out = predictor.generate(r["prompt"], params=params).strip()
        tuned_out = predictor.generate(r["prompt"], weights=result.run_dir, params=params).strip()
        correct += tuned_out == r["completion"].strip()
        message = r["prompt"].split("Message: ", 1)[-1].rsplit("\nBooking:", 1)[0]
        table.add_row(message, r["completion"].strip(), base_out, tuned_out)
    console.print(table)
    console.print(f"tuned exact match on these {len(rows)}: {correct}/{len(rows)}; run directory: {result.run_dir}")
    return {"run_dir": str(result.run_dir), "correct": correct, "n": len(rows)}
