"""Experiment tracking (the `report_to` input): the Trainer's own TensorBoard, W&B and MLflow
integrations log the metrics; this module points them into the run's tracking folder, keeps them
off the network unless the user configured a server, and logs tunery's inputs beside the
Trainer's arguments.

W&B and MLflow runs are opened here, before the Trainer's callbacks would open theirs, so they
carry the run's name and inputs, stay open through the validation after the last step, and are
closed (marked failed when the training failed) when the training ends. Only the main process
reports; under several processes the others do nothing here (and the Trainer's callbacks log
from the main process only).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any, Literal

from transformers import TrainerCallback

from tunery.spec import TrainingInputs

PROJECT = "tunery"  # W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise


def tracked_inputs(inputs: TrainingInputs, base: str) -> dict[str, Any]:
    """What a tracker records as the run's configuration: every training input in force and the base."""
    return {**inputs.model_dump(), "base": base}


@contextlib.contextmanager
def tracking(run, inputs: TrainingInputs, *, base: str, run_name: str) -> Iterator[None]:
    """Open the W&B and MLflow runs `inputs.report_to` asks for (TensorBoard needs nothing here)
    for the duration of the block; close them at its end, as failed if it raised."""
    trackers = inputs.trackers
    if not trackers or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    config = tracked_inputs(inputs, base)
    closers = []
    try:
        if "wandb" in trackers:
            closers.append(_start_wandb(run, run_name, config))
        if "mlflow" in trackers:
            closers.append(_start_mlflow(run, run_name, config))
        yield
    except BaseException:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                close(False)
        raise
    for close in reversed(closers):
        close(True)


def _start_wandb(run, run_name: str, config: dict):
    import wandb

    run.tracking.mkdir(parents=True, exist_ok=True)
    # Offline unless the user chose a mode or gave a key: `wandb sync` uploads the run later.
    configured = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
    mode: Literal["offline"] | None = None if configured else "offline"
    wb = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_name, dir=str(run.tracking),
                    mode=mode, config={"tunery": config}, reinit="finish_previous")

    def close(ok: bool) -> None:
        wb.finish(exit_code=0 if ok else 1)

    return close


def _start_mlflow(run, run_name: str, config: dict):
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file:{run.mlruns.resolve()}"
    if uri.startswith("file:"):
        # A local store: no reason to reach anything (MLflow otherwise sends usage telemetry).
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # MLflow 3 keeps its folder store in maintenance mode and refuses it unless told otherwise;
        # it is the store that needs no server and travels with the run folder.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT)
    active = mlflow.start_run(run_name=run_name)
    # Prefixed: the Trainer logs its own arguments as parameters, some under the same names.
    mlflow.log_params({f"tunery.{k}": _param(v) for k, v in config.items()})

    def close(ok: bool) -> None:
        current = mlflow.active_run()
        if current is not None and current.info.run_id == active.info.run_id:
            mlflow.end_run(status="FINISHED" if ok else "FAILED")

    return close


def _param(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class InputsToTensorBoard(TrainerCallback):
    """Writes tunery's inputs as a text summary through the Trainer's TensorBoard writer, once it
    is open (the Trainer writes its own arguments there as `args`)."""

    def __init__(self, tensorboard_callback, config: dict):
        self.tensorboard = tensorboard_callback
        self.config = config

    def on_train_begin(self, args, state, control, **kwargs):
        writer = getattr(self.tensorboard, "tb_writer", None)
        if state.is_world_process_zero and writer is not None:
            writer.add_text("tunery/inputs", "```\n" + json.dumps(self.config, indent=2) + "\n```")


def add_tensorboard(trainer, run, inputs: TrainingInputs, base: str) -> None:
    """Point the Trainer's TensorBoard callback (when report_to has one) at the run's tracking
    folder, and log tunery's inputs there."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(run.tensorboard)
            trainer.add_callback(InputsToTensorBoard(callback, tracked_inputs(inputs, base)))
