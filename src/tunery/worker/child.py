"""The child process that runs one training: `python -m tunery.worker.child ARGS.json`.

The worker starts it in its own process group, so that a cancel can stop it with everything
it started, and so that a crash or an out-of-memory kill fails the job, not the worker. Its
argument file (`ChildArgs`) holds the run's URL (whose job.json is the typed `TrainingJob`),
whether to resume, where to write events, the settings, the worker's pid, and the file whose
appearance pauses the training. Exit status 0 means the training succeeded, PAUSED that it saved a
checkpoint and stopped on request.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tunery.process import freeze_at_exit
from tunery.settings import Settings

PAUSED = 75  # EX_TEMPFAIL: stopped on request, to be resumed


class ChildArgs(BaseModel):
    """What the worker tells the training process of one attempt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str  # the run's URL; its job.json is the TrainingJob
    resume: bool
    events: str  # the file the training appends its events to
    settings: Settings
    parent_pid: int
    pause: str | None = None  # the file whose appearance asks the training to checkpoint and stop


def _die_with_worker(worker_pid: int, interval: float = 0.5) -> None:
    """Stop this process when its worker is gone (killed with SIGKILL, say): another worker
    resumes the job after the lease expires, and must not find this one still writing. Under
    `accelerate launch` the launcher sits between, so this watches the worker's pid itself."""

    def alive() -> bool:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a killed worker not yet reaped by its parent is a zombie: as good as gone
            state = Path(f"/proc/{worker_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state != "Z"

    def watch() -> None:
        while True:
            if not alive():
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(interval)

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tunery.worker.child ARGS.json", file=sys.stderr)
        return 2
    args = ChildArgs.model_validate_json(Path(argv[0]).read_text(encoding="utf-8"))
    _die_with_worker(args.parent_pid)

    from tunery.train.recipe import Paused, train

    settings = args.settings
    run = settings.run(args.run)
    job = run.read_job()
    inputs = job.training_inputs()
    try:
        train(
            inputs,
            given=job.given(),
            base=job.base,
            output_dir=run.url,
            resume=args.resume,
            events=args.events,
            progress=False,
            settings=settings,
            # As on Azure's fine-tune + evaluate, and for every training: tuned vs base after the last
            # step, on the rows held out for validation (validation_data's, else train_data's tail);
            # the numbers land in training.metrics["eval"].
            evaluate_held_out=True,
            pause_file=args.pause,
        )
    except Paused:  # the checkpoint of the step it stopped at is saved (and in the storage)
        return PAUSED
    return 0


if __name__ == "__main__":
    # An exception's traceback goes to stderr, which the worker keeps; the `failed` event has
    # already been written by train() itself.
    freeze_at_exit()
    sys.exit(main(sys.argv[1:]))
