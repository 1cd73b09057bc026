"""OpenAI's names for tunery's models: a fine-tuning job's model `ft:<base>:<owner>:<suffix>:<job>`
(and each checkpoint its run keeps, `...:ckpt-step-<N>`), and Replicate's names ("owner/name",
"owner/name:<version>") for every other model."""

from __future__ import annotations

from tunery.artifacts.run import checkpoint_name, checkpoint_url
from tunery.server.openai.errors import OpenAIError
from tunery.settings import Settings
from tunery.store.models import Model, Training, Version
from tunery.store.store import Store

#: The models fine-tuning jobs push their versions to are named this, then the training's id.
FT_MODEL_PREFIX = "ftjob-"


def fine_tuned_name(job: Training) -> str | None:
    """The `ft:` name of a fine-tuning job's model (whatever the job's state); None for a training
    created through Replicate's API."""
    return (job.openai or {}).get("fine_tuned_model")


def resolve_fine_tuned(store: Store, owner: str, model_id: str,
                       settings: Settings | None = None) -> tuple[Training, Model, Version]:
    """(training, model row, version row) of a fine-tuned model: `ft:<base>:<owner>:<suffix>:<job>`
    (the job's id is the training's), or one of its checkpoints `...:ckpt-step-<N>`: the final
    one is the job's version; an earlier one the run still keeps is served from the run's
    checkpoint folder (a version row made for the request, not stored). OpenAIError 404 when
    there is no such model of the caller's (not succeeded, deleted, or a checkpoint not kept)."""
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
    dest_owner, _, dest_name = job.destination.partition("/")
    model = store.get_model(owner, dest_owner, dest_name)
    version = store.get_version(model.id, str(job.output.get("version", "")).rpartition(":")[2]) if model else None
    if model is None or version is None:
        raise missing
    if step is not None and step != final_step(job):
        name = checkpoint_name(step)
        if not job.run_url or (settings is not None and not settings.run(job.run_url).checkpoint_complete(name)):
            raise OpenAIError(404, f"The model '{model_id}' does not exist: the job's run keeps only its newest "
                              "checkpoints (GET /fine_tuning/jobs/{id}/checkpoints lists them)", param="model",
                              code="model_not_found")
        version = Version(id=version.id, model_id=model.id, base_name=version.base_name, training_id=job.id,
                          run_url=checkpoint_url(job.run_url, name), created_at=version.created_at)
    return job, model, version


def final_step(job: Training) -> int | None:
    """The last optimizer step a training reported."""
    steps = [h["step"] for h in (job.metrics or {}).get("history") or [] if isinstance(h.get("step"), int)]
    return max(steps) if steps else (job.metrics or {}).get("step")


def resolve_model(store: Store, owner: str, model_id: str, settings: Settings | None = None) -> tuple[Model, Version]:
    """(model row, version row) of "owner/name" (its latest version) or "owner/name:version", or a
    fine-tuned model's `ft:` name (`settings` finds its checkpoints in storage)."""
    if model_id.startswith("ft:"):
        _, model, version = resolve_fine_tuned(store, owner, model_id, settings)
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
