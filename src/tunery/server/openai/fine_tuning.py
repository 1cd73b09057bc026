"""OpenAI's fine-tuning API under /openai/v1, on tunery's own files, trainings and models: point the
official `openai` client at `<server>/openai/v1` with a tunery token and follow OpenAI's
fine-tuning guide. (Its files are in files.py.)

- `/fine_tuning/jobs`: create, list (`after`, `limit`, `metadata[k]=v`), retrieve, cancel, pause,
  resume, `/events`, `/checkpoints`. A job `ftjob-<id>` IS the tunery training `<id>` (same row,
  workers, storage and webhooks); its version is pushed to a private model `ftjob-<id>` of the
  caller, and served under the job's `fine_tuned_model` name `ft:<base>:<owner>:<suffix>:<id>`.
- `DELETE /models/{ft:...}`: delete a fine-tuned model.

Status mapping (tunery training → OpenAI job): starting → queued; processing → running; paused →
paused; succeeded → succeeded; failed → failed; canceled → cancelled. (The files are validated
before the job is created, so a job is never seen in `validating_files`.)
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from tunery.server.deps import Owner, RunnerDep, SettingsDep, StoreDep
from tunery.server.openai.errors import OpenAIError, from_service
from tunery.server.openai.files import FILE, file_row, ts
from tunery.server.openai.names import FT_MODEL_PREFIX, final_step, fine_tuned_name, resolve_fine_tuned
from tunery.service import graders, models, trainings
from tunery.service.errors import InvalidData, ServiceError, Unavailable
from tunery.service.files import RESULTS
from tunery.service.trainings import reward_columns
from tunery.store.models import TERMINAL, Training
from tunery.store.store import BASE_OWNER

router = APIRouter(prefix="/openai/v1", tags=["openai"])

JOB = "ftjob-"
CHECKPOINT = "ftckpt-"
EVENT = "ftevent-"
MAX_METADATA = 16

STATUS = {"starting": "queued", "processing": "running", "paused": "paused", "succeeded": "succeeded",
          "failed": "failed", "canceled": "cancelled"}


# -- hyperparameters ---------------------------------------------------------------------------------

#: learning_rate = learning_rate_multiplier × BASE_LEARNING_RATE
BASE_LEARNING_RATE = 1e-3


def resolve_hyperparameters(rows: int, given: dict[str, Any], method: str) -> dict[str, Any]:
    """Each hyperparameter given as a number is used as it is; "auto" (or leaving it out) is
    resolved from the number of rows in the training file, `rows`:

    - n_epochs: 3, unless 3 passes would show the model fewer than 100 examples in all (then
      ceil(100 / rows), at most 25) or more than 25,000 (then floor(25,000 / rows), at least 1)
      -- the rule of OpenAI's fine-tuning data-preparation cookbook.
    - batch_size: about 0.2% of the rows, rounded down to a power of two, between 1 and 256
      (1 up to 999 rows, 2 from 1,000, 4 from 2,000, ... 256 from 128,000).
    - learning_rate_multiplier: 0.1. tunery's learning rate is the multiplier × 0.001, so "auto"
      is tunery's own default of 1e-4 for LoRA; OpenAI's advice of 0.02 to 0.2 maps to 2e-5 to 2e-4.
    - beta (DPO only): 0.1.

    The job shows the resolved numbers."""
    n_epochs = given.get("n_epochs")
    if n_epochs in (None, "auto"):
        n_epochs = 3
        if rows * n_epochs < 100:
            n_epochs = min(25, math.ceil(100 / max(rows, 1)))
        elif rows * n_epochs > 25_000:
            n_epochs = max(1, 25_000 // rows)
    batch_size = given.get("batch_size")
    if batch_size in (None, "auto"):
        batch_size = min(256, 2 ** int(math.log2(max(1.0, rows * 0.002))))
    multiplier = given.get("learning_rate_multiplier")
    if multiplier in (None, "auto"):
        multiplier = 0.1
    out: dict[str, Any] = {"batch_size": int(batch_size), "learning_rate_multiplier": float(multiplier),
                           "n_epochs": int(n_epochs)}
    if method == "dpo":
        beta = given.get("beta")
        out["beta"] = 0.1 if beta in (None, "auto") else float(beta)
    return out


def _micro_batch(batch_size: int) -> int:
    """Examples per forward pass: the largest divisor of the batch up to 8 (the rest accumulates)."""
    return max(d for d in range(1, min(8, batch_size) + 1) if batch_size % d == 0)


# -- jobs ----------------------------------------------------------------------------------------------

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] | None = None
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] | None = None
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] | None = None
    beta: Auto | Annotated[float, Field(gt=0, le=10)] | None = None


class _MethodHyper(BaseModel):
    model_config = ConfigDict(extra="ignore")

    hyperparameters: Hyperparameters | None = None


#: reasoning_effort -> the longest sampled answer, in tokens: how long the model may think.
REASONING_TOKENS = {"low": 256, "medium": 512, "high": 1024}


class RFTHyperparameters(BaseModel):
    """OpenAI's reinforcement hyperparameters, and num_generations (answers sampled per prompt),
    which OpenAI derives from compute_multiplier and tunery also takes as it is."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] | None = None
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] | None = None
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] | None = None
    compute_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] | None = None
    eval_interval: Auto | Annotated[int, Field(ge=1)] | None = None
    eval_samples: Auto | Annotated[int, Field(ge=1, le=64)] | None = None
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = None
    num_generations: Auto | Annotated[int, Field(ge=2, le=64)] | None = None


class Reinforcement(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]
    hyperparameters: RFTHyperparameters | None = None
    response_format: dict[str, Any] | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: _MethodHyper | None = None
    dpo: _MethodHyper | None = None
    reinforcement: Reinforcement | None = None


def resolve_rft(rows: int, given: dict[str, Any]) -> dict[str, Any]:
    """RFT's hyperparameters, "auto" resolved: n_epochs, batch_size and learning_rate_multiplier as
    for supervised jobs (resolve_hyperparameters); compute_multiplier 1, which samples 8 answers per
    prompt (num_generations = 8 × compute_multiplier, at least 2, unless num_generations is given);
    eval_interval: each epoch's end; eval_samples: num_generations; reasoning_effort: default (an
    answer of up to 256 tokens; low 256, medium 512, high 1024)."""
    out = resolve_hyperparameters(rows, given, "reinforcement")
    multiplier = given.get("compute_multiplier")
    multiplier = 1.0 if multiplier in (None, "auto") else float(multiplier)
    generations = given.get("num_generations")
    if generations in (None, "auto"):
        generations = max(2, min(64, round(8 * multiplier)))
    samples = given.get("eval_samples")
    out.update({"compute_multiplier": multiplier, "num_generations": int(generations),
                "eval_interval": None if given.get("eval_interval") in (None, "auto") else int(given["eval_interval"]),
                "eval_samples": int(generations) if samples in (None, "auto") else int(samples),
                "reasoning_effort": given.get("reasoning_effort") or "default"})
    return out


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int | None = Field(None, ge=0, le=2_147_483_647)
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None


def _training_file(store, settings, owner: str, file_id: str, param: str, method: str) -> trainings.Data:
    """The caller's file `file_id` as a training's data, checked (the service's one file check); a
    400 `invalid_<param>` naming its bad lines, or a format the method cannot train on, otherwise."""
    row = file_row(store, owner, file_id, param=param)
    if row.purpose == RESULTS:
        raise OpenAIError(400, f"{file_id} is a job's results file, not training data", param=param,
                          code=f"invalid_{param}")
    field = "train_data" if param == "training_file" else "validation_data"
    data = trainings.data_from_file(store, settings, row, field, label=file_id)
    if not data.check.valid:
        raise OpenAIError(400, f"The file {file_id} is not valid training data:\n{data.check.status_details()}",
                          param=param, code=f"invalid_{param}")
    from tunery.data.jsonl import method_problem

    if problem := method_problem(method, data.check.format or ""):
        raise OpenAIError(400, f"{file_id} {problem}", param=param, code=f"invalid_{param}")
    return data


def _base(store, settings, owner: str, name: str):
    """(base model, its version) named as /openai/v1/models lists it ("tunery/<name>", or just "<name>")."""
    if name.startswith("ft:"):
        raise OpenAIError(400, f"Fine-tuning a fine-tuned model ('{name}') is not supported yet: fine-tune its "
                          "base model on the combined data instead", param="model", code="model_not_available")
    base_owner, slash, base_name = name.partition("/")
    if not slash:
        base_owner, base_name = BASE_OWNER, name
    model = store.get_model(owner, base_owner, base_name) if base_owner == BASE_OWNER else None
    version = store.latest_version(model.id) if model is not None and model.is_base else None
    if model is None or version is None:
        raise OpenAIError(400, f"Model {name} is not available for fine-tuning or does not exist: fine-tune a "
                          "base model (tunery/<name>, as GET /openai/v1/models lists them)", param="model",
                          code="model_not_available")
    try:
        trainings.check_trainable(settings, model, version)
    except ServiceError as exc:
        raise OpenAIError(400, exc.message, param="model", code="model_not_available") from None
    return model, version


_PARAMS = {"train_data": "training_file", "validation_data": "validation_file"}


@router.post("/fine_tuning/jobs")
def create_job(body: JobCreate, owner: Owner, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """Create a fine-tuning job: the files and every input are checked first, and a bad request
    leaves nothing behind (no job, no model)."""
    from tunery.store.models import new_id

    method = body.method.type if body.method else "supervised"
    rft = body.method.reinforcement if body.method and method == "reinforcement" else None
    if method == "reinforcement" and rft is None:
        raise OpenAIError(400, "method.reinforcement is required with type 'reinforcement': its grader and "
                          "hyperparameters", param="method.reinforcement")
    if rft is not None:  # the grader first: a bad one is refused before anything else is looked at
        try:
            graders.check(settings, rft.grader, field="method.reinforcement.grader", training=True)
        except ServiceError as exc:
            raise OpenAIError(400, f"Invalid grader: {exc.message}", param=exc.field, code="invalid_grader") from None
    if body.integrations:
        raise OpenAIError(400, "Integrations are not supported: set report_to on a tunery training instead",
                          param="integrations")
    if body.metadata and (len(body.metadata) > MAX_METADATA
                          or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
        raise OpenAIError(400, f"metadata holds at most {MAX_METADATA} pairs, keys of up to 64 characters and "
                          "values of up to 512", param="metadata")
    kind = {"dpo": "dpo", "reinforcement": "grpo"}.get(method, "sft")
    given: dict[str, Any] = {}
    if body.hyperparameters:
        given.update(body.hyperparameters.model_dump(exclude_none=True))
    if rft is not None:
        if rft.hyperparameters:
            given.update(rft.hyperparameters.model_dump(exclude_none=True))
    else:
        chosen = body.method and (body.method.dpo if method == "dpo" else body.method.supervised)
        if chosen and chosen.hyperparameters:
            given.update(chosen.hyperparameters.model_dump(exclude_none=True))
    if "beta" in given and kind != "dpo":
        raise OpenAIError(400, "beta is a DPO hyperparameter", param="hyperparameters.beta")
    model, version = _base(store, settings, owner, body.model)
    data = {"train_data": _training_file(store, settings, owner, body.training_file, "training_file", kind)}
    if body.validation_file:
        data["validation_data"] = _training_file(store, settings, owner, body.validation_file, "validation_file",
                                                 kind)
    rows = data["train_data"].check.rows or 0
    hyper = resolve_rft(rows, given) if rft is not None else resolve_hyperparameters(rows, given, kind)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    inputs: dict[str, Any] = {
        "train_data": body.training_file, "num_train_epochs": hyper["n_epochs"],
        "train_batch_size": hyper["batch_size"], "micro_batch_size": _micro_batch(hyper["batch_size"]),
        "learning_rate": hyper["learning_rate_multiplier"] * BASE_LEARNING_RATE, "seed": seed, "method": kind,
        "run_validation": body.validation_file is not None,
    }
    if kind == "dpo":
        inputs["dpo_beta"] = hyper["beta"]
    if rft is not None:
        generations = hyper["num_generations"]
        inputs.update({"grader": rft.grader, "num_generations": generations,
                       "micro_batch_size": _micro_batch(hyper["batch_size"] * generations),
                       "max_completion_length": REASONING_TOKENS.get(hyper["reasoning_effort"], 256),
                       "num_generations_eval": hyper["eval_samples"]})
        if hyper["eval_interval"]:
            inputs["eval_steps"] = hyper["eval_interval"]
        if rft.response_format is not None:
            inputs["response_format"] = rft.response_format
    if body.validation_file:
        inputs["validation_data"] = body.validation_file
        inputs["num_validation_samples"] = data["validation_data"].check.rows or 0
    training_id = new_id()
    base_name = f"{model.owner}/{model.name}"
    fields: dict[str, Any] = {
        "model": base_name, "suffix": body.suffix, "metadata": body.metadata, "seed": seed,
        "hyperparameters": hyper, "method": kind, "training_file": body.training_file,
        **({"grader": rft.grader, "response_format": rft.response_format} if rft is not None else {}),
        "validation_file": body.validation_file,
        "fine_tuned_model": f"ft:{base_name}:{owner}:{body.suffix or ''}:{training_id}", "notes": [],
    }
    try:
        row = trainings.create_training(
            store, settings, owner=owner, base=model, version=version,
            destination=f"{owner}/{FT_MODEL_PREFIX}{training_id}", inputs=inputs, data=data, openai=fields,
            training_id=training_id, new_destination=f"fine-tuned by fine-tuning job {JOB}{training_id}")
    except InvalidData as exc:
        param = _PARAMS.get(exc.field or "", "validation_file")
        raise OpenAIError(400, exc.message, param=param,
                          code=f"invalid_{param}") from None
    except Unavailable as exc:
        raise OpenAIError(400, exc.message, param="model", code="model_not_available") from None
    except ServiceError as exc:
        raise from_service(exc, param="hyperparameters") from None
    return job_object(row)


def _job(store, owner: str, job_id: str) -> Training:
    row = store.get_training(owner, job_id[len(JOB):]) if job_id.startswith(JOB) else None
    if row is None or row.openai is None:
        raise OpenAIError(404, f"Fine-tuning job {job_id} not found", param="fine_tuning_job_id",
                          code="fine_tuning_job_not_found")
    return row


def _hyper_shown(hyper: dict[str, Any]) -> dict[str, Any]:
    return {k: hyper[k] for k in ("batch_size", "learning_rate_multiplier", "n_epochs") if k in hyper}


def job_object(row: Training) -> dict[str, Any]:
    """OpenAI's fine_tuning.job of a training created through this API."""
    o = row.openai or {}
    hyper = o.get("hyperparameters") or {}
    if o.get("method") == "dpo":
        method: dict[str, Any] = {"type": "dpo", "dpo": {"hyperparameters": dict(hyper)}}
    elif o.get("method") == "grpo":
        method = {"type": "reinforcement", "reinforcement": {
            "grader": o.get("grader"), "response_format": o.get("response_format"),
            "hyperparameters": {k: v for k, v in hyper.items() if k != "beta"}}}
    else:
        method = {"type": "supervised", "supervised": {"hyperparameters": _hyper_shown(hyper)}}
    succeeded = row.status == "succeeded"
    metrics = row.metrics or {}
    error = None
    if row.status == "failed":
        error = {"code": "training_failed", "message": row.error or "the training failed", "param": None}
    return {
        "id": JOB + row.id,
        "object": "fine_tuning.job",
        "model": o.get("model", row.model),
        "created_at": ts(row.created_at),
        "finished_at": ts(row.completed_at) if row.status in TERMINAL else None,
        "status": STATUS.get(row.status, row.status),
        "fine_tuned_model": fine_tuned_name(row) if succeeded else None,
        "organization_id": row.owner,
        "trained_tokens": metrics.get("trained_tokens") if succeeded else None,
        "result_files": [_result_file(o["result_file"])] if succeeded and o.get("result_file") else [],
        "error": error,
        "seed": o.get("seed"),
        "estimated_finish": _estimated_finish(row),
        "metadata": o.get("metadata"),
        "hyperparameters": _hyper_shown(hyper),
        "method": method,
        "training_file": o.get("training_file"),
        "validation_file": o.get("validation_file"),
        "integrations": [],
        "user_provided_suffix": o.get("suffix"),
    }


def _estimated_finish(row: Training) -> int | None:
    """A running job's finish, at the pace of its steps so far."""
    metrics = row.metrics or {}
    step, total = metrics.get("step"), metrics.get("max_steps")
    if row.status != "processing" or row.started_at is None or not step or not total:
        return None
    elapsed = time.time() - row.started_at.timestamp()
    return int(row.started_at.timestamp() + elapsed * total / step)


def _result_file(file_id: str) -> str:
    """A results file's OpenAI id (recorded as tunery's file id; older jobs recorded OpenAI's)."""
    return file_id if file_id.startswith(FILE) else FILE + file_id


def _metadata_filter(request: Request) -> dict[str, str]:
    """metadata[k]=v query parameters, as the openai client sends a `metadata` dict."""
    out = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]"):
            out[key[len("metadata["):-1]] = value
    return out


@router.get("/fine_tuning/jobs")
def list_jobs(request: Request, owner: Owner, store: StoreDep, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    """The caller's fine-tuning jobs, newest first, after the job `after`; `metadata[k]=v` keeps the
    jobs whose metadata has each of those pairs."""
    after_id = after[len(JOB):] if after and after.startswith(JOB) else after
    rows, more = store.list_fine_tuning_jobs(owner, after=after_id, limit=limit, metadata=_metadata_filter(request))
    return {"object": "list", "data": [job_object(r) for r in rows], "has_more": more}


@router.get("/fine_tuning/jobs/{job_id}")
def retrieve_job(job_id: str, owner: Owner, store: StoreDep) -> dict[str, Any]:
    return job_object(_job(store, owner, job_id))


def _note(store, row: Training, message: str) -> None:
    """A message event of the job's own (pause, resume, cancel requests), at this moment."""
    store.set_training_openai(row.id, {}, append={"notes": {"at": time.time(), "message": message}})


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, owner: Owner, store: StoreDep) -> dict[str, Any]:
    """Cancel a job in any state but a final one: queued or paused ones at once, a running one within
    seconds (its worker stops it)."""
    row = _job(store, owner, job_id)
    if row.status in TERMINAL:
        raise OpenAIError(400, f"Job {job_id} has already {STATUS[row.status]} and cannot be cancelled",
                          param="fine_tuning_job_id")
    store.cancel_training(owner, row.id)
    _note(store, row, "Fine-tuning job cancellation requested")
    return job_object(_job(store, owner, job_id))


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause_job(job_id: str, owner: Owner, store: StoreDep) -> dict[str, Any]:
    """Pause a queued or running job: a running one is stopped by its worker within seconds, keeping
    its checkpoints; it shows "running" until then, "paused" after."""
    return _move(store, owner, job_id, trainings.can_pause, trainings.pause_training,
                 refusal="only a queued or running job can be paused", note="Fine-tuning job paused")


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume_job(job_id: str, owner: Owner, store: StoreDep) -> dict[str, Any]:
    """Resume a paused job: queued again, and a worker goes on from its newest checkpoint."""
    return _move(store, owner, job_id, trainings.can_resume, trainings.resume_training,
                 refusal="only a paused job can be resumed", note="Fine-tuning job resumed")


def _move(store, owner: str, job_id: str, allowed: Callable[[Training], bool], move: Callable[..., Any], *,
          refusal: str, note: str) -> dict[str, Any]:
    """Pause or resume: the core's rule says whether the job may (a 400 naming its state if not),
    the core moves it, and the job's events get `note`."""
    row = _job(store, owner, job_id)
    if not allowed(row):
        raise OpenAIError(400, f"Job {job_id} is {STATUS.get(row.status, row.status)}: {refusal}",
                          param="fine_tuning_job_id")
    move(store, owner, row)
    _note(store, row, note)
    return job_object(_job(store, owner, job_id))


# -- events and checkpoints ------------------------------------------------------------------------------

def _event(job: Training, key: str, at: float | None, message: str, *, level: str = "info",
           data: dict[str, Any] | None = None, type: str = "message") -> dict[str, Any]:
    return {"id": f"{EVENT}{job.id}-{key}", "object": "fine_tuning.job.event", "created_at": int(at or 0),
            "level": level, "message": message, "data": data or {}, "type": type}


def job_events(job: Training) -> list[dict[str, Any]]:
    """Every event of a job, oldest first: its lifecycle (created, started, paused, resumed, ended)
    as messages, and each step's metrics as OpenAI reports them (step, train_loss, valid_loss,
    total_steps, learning_rate; a DPO job's also train_/valid_reward_accuracy and _reward_margin)."""
    o = job.openai or {}
    created = job.created_at.timestamp()
    events: list[tuple[float, int, dict[str, Any]]] = [
        (created, 0, _event(job, "created", created, f"Created fine-tuning job: {JOB}{job.id}")),
        (created, 1, _event(job, "validated", created, f"Validated training file: {o.get('training_file')}")),
    ]
    if job.started_at is not None:
        at = job.started_at.timestamp()
        events.append((at, 2, _event(job, "started", at, "Fine-tuning job started")))
    metrics = job.metrics or {}
    total = metrics.get("max_steps")
    rewards = reward_columns((job.input or {}).get("method"), metrics.get("history") or [])
    for h in metrics.get("history") or []:
        step = h.get("step")
        if not isinstance(step, int) or ("loss" not in h and "val_loss" not in h):
            continue
        at = float(h.get("time") or (job.started_at or job.created_at).timestamp())
        data: dict[str, Any] = {"step": step, "total_steps": total}
        message = f"Step {step}/{total}:" if total else f"Step {step}:"
        if "loss" in h:
            data["train_loss"] = h["loss"]
            message += f" training loss={h['loss']:.4f}"
        if h.get("token_accuracy") is not None:
            data["train_mean_token_accuracy"] = h["token_accuracy"]
        if "val_loss" in h:
            data["valid_loss"] = h["val_loss"]
            message += f", validation loss={h['val_loss']:.4f}"
        if h.get("val_token_accuracy") is not None:
            data["valid_mean_token_accuracy"] = h["val_token_accuracy"]
        if h.get("learning_rate") is not None:
            data["learning_rate"] = h["learning_rate"]
        for key, name, shown in rewards:  # a DPO or RFT job's
            if h.get(key) is not None:
                data[name] = h[key]
                message += f", {shown}={h[key]:.4f}"
        events.append((at, 3, _event(job, f"step-{step}", at, message, data=data, type="metrics")))
    for i, warning in enumerate(metrics.get("warnings") or []):  # a grader's failures, a truncation, ...
        at = float(warning.get("time") or (job.started_at or job.created_at).timestamp())
        events.append((at, 4, _event(job, f"warning-{i}", at, str(warning.get("message", "")), level="warn")))
    for i, note in enumerate(o.get("notes") or []):
        events.append((note["at"], 4, _event(job, f"note-{i}", note["at"], note["message"])))
    if job.status in TERMINAL and job.completed_at is not None:
        at = job.completed_at.timestamp()
        if job.status == "succeeded":
            if isinstance(metrics.get("eval"), dict):
                events.append((at, 5, _event(job, "eval", at, _eval_message(metrics["eval"]),
                                             data={"eval": metrics["eval"], "eval_seconds": metrics.get("eval_seconds")})))
            events.append((at, 5, _event(job, "model", at, f"New fine-tuned model created: {fine_tuned_name(job)}")))
            events.append((at, 6, _event(job, "done", at, "The job has successfully completed")))
        elif job.status == "failed":
            events.append((at, 6, _event(job, "done", at, f"Fine-tuning job failed: {job.error}", level="error")))
        else:
            events.append((at, 6, _event(job, "done", at, "Fine-tuning job cancelled")))
    events.sort(key=lambda e: (e[0], e[1]))
    return [e[2] for e in events]


def _eval_message(evaluation: dict[str, Any]) -> str:
    """"Evaluated on the held-out rows, base → tuned: loss 2.1 → 0.9, exact_match 0.10 → 0.80"."""
    base, tuned = evaluation.get("base") or {}, evaluation.get("tuned") or {}
    parts = [f"{name} {base[name]:.4g} → {value:.4g}" if isinstance(base.get(name), (int, float)) else f"{name} {value:.4g}"
             for name, value in tuned.items() if isinstance(value, (int, float)) and name != "perplexity"]
    return "Evaluated on the held-out rows, base → tuned: " + ", ".join(parts)


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """Items newest first (given oldest first), those after the one whose id is `after`."""
    newest = items[::-1]
    if after is not None:
        ids = [i["id"] for i in newest]
        newest = newest[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": newest[:limit], "has_more": len(newest) > limit}


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_events(job_id: str, owner: Owner, store: StoreDep, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
    """The job's events, newest first, after the event `after`."""
    return _page(job_events(_job(store, owner, job_id)), after, limit)


def job_checkpoints(job: Training, settings) -> list[dict[str, Any]]:
    """The job's checkpoints, oldest first: those its run holds (the Trainer keeps the newest few),
    and for a succeeded job its final weights, each with the metrics of its step. Each is served
    by its ckpt-step name (the final one also as the job's fine_tuned_model)."""
    history: dict[int, dict[str, Any]] = {}
    for h in (job.metrics or {}).get("history") or []:  # a step's training and validation records, merged
        if isinstance(h.get("step"), int):
            history.setdefault(h["step"], {}).update(h)
    steps: set[int] = set()
    if job.run_url:
        from tunery.artifacts.run import CHECKPOINT_PREFIX

        try:
            names = settings.run(job.run_url).checkpoint_names()
        except Exception:  # a storage hiccup: list what is certain
            names = []
        steps |= {int(n[len(CHECKPOINT_PREFIX):]) for n in names}
    final = final_step(job) if job.status == "succeeded" else None
    if final is not None:
        steps.add(final)
    name = fine_tuned_name(job)
    rewards = reward_columns((job.input or {}).get("method"), list(history.values()))
    out = []
    for step in sorted(steps):
        h = history.get(step, {})
        at = h.get("time") or (job.completed_at or job.created_at).timestamp()
        metrics = {"step": step, "train_loss": h.get("loss"), "valid_loss": h.get("val_loss"),
                   "train_mean_token_accuracy": h.get("token_accuracy"),
                   "valid_mean_token_accuracy": h.get("val_token_accuracy"),
                   "full_valid_loss": h.get("val_loss") if step == final else None,
                   "full_valid_mean_token_accuracy": h.get("val_token_accuracy") if step == final else None,
                   **{name: h[key] for key, name, _ in rewards if h.get(key) is not None}}
        out.append({"id": f"{CHECKPOINT}{job.id}-{step}", "object": "fine_tuning.job.checkpoint",
                    "created_at": int(at), "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{step}",
                    "fine_tuning_job_id": JOB + job.id, "metrics": metrics, "step_number": step})
    return out


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(job_id: str, owner: Owner, store: StoreDep, settings: SettingsDep, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, Any]:
    """The job's checkpoints, newest first, after the checkpoint `after`."""
    page = _page(job_checkpoints(_job(store, owner, job_id), settings), after, limit)
    page["first_id"] = page["data"][0]["id"] if page["data"] else None
    page["last_id"] = page["data"][-1]["id"] if page["data"] else None
    return page


# -- models ----------------------------------------------------------------------------------------------

@router.delete("/models/{model_id:path}")
def delete_model(model_id: str, owner: Owner, store: StoreDep, settings: SettingsDep,
                 runner: RunnerDep) -> dict[str, Any]:
    """Delete a fine-tuned model (`ft:...`) as Replicate's DELETE does (service.models): its weights
    and checkpoints go, the name is no longer served or listed, the job stays. Base models can not
    be deleted (403)."""
    if not model_id.startswith("ft:"):
        model_owner, slash, name = model_id.partition("/")
        if slash and model_owner == BASE_OWNER:
            raise OpenAIError(403, f"You do not have permission to delete the base model '{model_id}'",
                              param="model", code="model_not_deletable")
        raise OpenAIError(400, f"'{model_id}' is not a fine-tuned model: only ft: models can be deleted here",
                          param="model", code="model_not_deletable")
    job, model, _ = resolve_fine_tuned(store, owner, model_id)
    try:
        models.delete_model(store, settings, runner, owner, model)
    except ServiceError as exc:
        raise from_service(exc, param="model") from None
    store.set_training_openai(job.id, {"deleted": True})
    return {"id": model_id, "object": "model", "deleted": True}
