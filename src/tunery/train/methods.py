"""The training methods: `inputs.method` -> the module and function that build its trainer.

Each method is one module (train/sft.py, train/dpo.py, train/grpo.py) with a builder of one shape:
`build(model, tokenizer, data, inputs, common, *, run, sink, progress, extra_callbacks,
settings, base) -> (trainer, token meter, events callback)`, on train/trainer.py's shared
parts. Adding a method is one such module and one line in METHODS. The module is imported only
when its method trains (TRL for DPO, say, is not loaded for a supervised run).
"""

from __future__ import annotations

import importlib

from tunery.spec import TrainingInputs
from tunery.train.events import EventSink

METHODS: dict[str, str] = {
    "sft": "tunery.train.sft:build_sft_trainer",
    "dpo": "tunery.train.dpo:build_dpo_trainer",
    "grpo": "tunery.train.grpo:build_grpo_trainer",
}


def build_trainer(model, tokenizer, data, inputs: TrainingInputs, *, run, sink: EventSink,
                  progress: bool, device: str, extra_callbacks: list | None = None,
                  settings=None, run_name: str | None = None, base: str | None = None):
    """A ready trainer for `inputs.method`, plus the token meter and the events callback (whose
    history feeds the manifest). Checkpoints go to the run (artifacts.Run): copied to its storage as
    each completes, and also saved every `settings.checkpoint_minutes` of training (0: only when the
    inputs ask); `settings` (default: the environment's) also hold the python graders' limits. The trackers of `inputs.report_to` get `run_name` (default: the run's name) and
    TensorBoard writes in the run's tracking folder, with the inputs and `base` (train/tracking.py
    opens W&B and MLflow runs)."""
    from tunery.settings import get_settings
    from tunery.train.trainer import training_arguments

    module, _, function = METHODS[inputs.method].partition(":")
    build = getattr(importlib.import_module(module), function)
    common = training_arguments(model, data, inputs, run=run, device=device, run_name=run_name)
    return build(model, tokenizer, data, inputs, common, run=run, sink=sink, progress=progress,
                 extra_callbacks=extra_callbacks, settings=settings or get_settings(), base=base)
