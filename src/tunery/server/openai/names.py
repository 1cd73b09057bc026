"""OpenAI's names for tunery's models: a fine-tuning job's model `ft:<base>:<owner>:<suffix>:<job>`
(and its final checkpoint `...:ckpt-step-<N>`), and Replicate's names ("owner/name",
"owner/name:<version>") for every other model."""

from __future__ import annotations

from tunery.server.openai.errors import OpenAIError
from tunery.store.models import Model, Training, Version
from tunery.store.store import Store

#: The models fine-tuning jobs push their versions to are named this, then the training's id.
FT_MODEL_PREFIX = "ftjob-"


def fine_tuned_name(job: Training) -> str | None:
    """The `ft:` name of a fine-tuning job's model (whatever the job's state); None for a training
    created through Replicate's API."""
    return (job.openai or {}).get("fine_tuned_model")


def resolve_fine_tuned(store: Store, owner: str, model_id: str) -> tuple[Training, Model, Version]:
    """(training, model row, version row) of a fine-tuned model: `ft:<base>:<owner>:<suffix>:<job>`
    (the job's id is the training's), or its final checkpoint `...:ckpt-step-<N>`. OpenAIError 404
    when there is no such model of the caller's (not succeeded, deleted, or another checkpoint)."""
    missing = OpenAIError(404, f"The model '{model_id}' does not exist or you do not have access to it.",
                          param="model", code="model_not_found")
    parts = model_id.split(":")
    step = None
    if parts[-1].startswith("ckpt-step-") and parts[-1][len("ckpt-step-"):].isdigit():
        step = int(parts.pop()[len("ckpt-step-"):])
    if len(parts) < 5:
        raise missing
    job = store.get_training(owner, parts[-1])
    if job is None or fine_tuned_name(job) != ":".join(parts) or job.status != "succeeded" or not job.output:
        raise missing
    if step is not None and step != final_step(job):
        raise OpenAIError(404, f"The model '{model_id}' is an intermediate checkpoint: tunery serves a job's "
                          "final checkpoint (its fine_tuned_model) only", param="model", code="model_not_found")
    dest_owner, _, dest_name = job.destination.partition("/")
    model = store.get_model(owner, dest_owner, dest_name)
    version = store.get_version(model.id, str(job.output.get("version", "")).rpartition(":")[2]) if model else None
    if model is None or version is None:
        raise missing
    return job, model, version


def final_step(job: Training) -> int | None:
    """The last optimizer step a training reported."""
    steps = [h["step"] for h in (job.metrics or {}).get("history") or [] if isinstance(h.get("step"), int)]
    return max(steps) if steps else (job.metrics or {}).get("step")


def resolve_model(store: Store, owner: str, model_id: str) -> tuple[Model, Version]:
    """(model row, version row) of "owner/name" (its latest version) or "owner/name:version", or a
    fine-tuned model's `ft:` name."""
    if model_id.startswith("ft:"):
        _, model, version = resolve_fine_tuned(store, owner, model_id)
        return model, version
    name, _, version_id = model_id.partition(":")
    model_owner, slash, model_name = name.partition("/")
    missing = OpenAIError(404, f"The model '{model_id}' does not exist or you do not have access to it.",
                          param="model", code="model_not_found")
    if not slash:
        raise missing
    found = store.get_model(owner, model_owner, model_name)
    if found is None:
        raise missing
    latest = store.get_version(found.id, version_id) if version_id else store.latest_version(found.id)
    if latest is None:
        raise missing
    model, version = found, latest
    return model, version
