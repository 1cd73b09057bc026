"""Trainings: the one way a training is created, whichever API asks, and the rules of its life.

`create_training` runs every check a worker would otherwise fail on minutes later — the
destination, the base version and that its files are there, the typed inputs, and the data itself
(every line of every file, the method against the rows' format, enough rows left to train on) —
and writes nothing until all passed. The inputs are typed once here (`TrainingInputs`); the row
keeps them as the user gave them, and the worker runs them as a `TrainingJob`.
"""

from __future__ import annotations

import csv
import io
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tunery.service.errors import Conflict, Invalid, InvalidData, NotFound, Unavailable
from tunery.service.files import (
    MAX_LISTED,
    DataCheck,
    check_data,
    check_file,
    file_exists,
    local_copy,
    save_result_file,
)
from tunery.service.hardware import check_hardware
from tunery.service.limits import check_queue
from tunery.settings import Settings
from tunery.spec import TrainingInputs, format_input_errors, input_errors
from tunery.store.models import File, Model, Training, Version, hardware_matches
from tunery.store.store import Store

_FILE_PATH = re.compile(r"^/v1/files/([A-Za-z0-9]+)(?:/download)?/?$")
DATA_FIELDS = ("train_data", "validation_data")
#: A DPO training's reward metrics: (tunery's history key, the name in results files and events, in words).
REWARDS = [("reward_accuracy", "train_reward_accuracy", "reward accuracy"),
           ("reward_margin", "train_reward_margin", "reward margin"),
           ("val_reward_accuracy", "valid_reward_accuracy", "validation reward accuracy"),
           ("val_reward_margin", "valid_reward_margin", "validation reward margin")]
#: A GRPO training's: the grader's mean score and spread over the step's answers, the share of prompts
#: whose answers all scored alike (TRL's frac_reward_zero_std), the answers' mean length, the share of
#: answers the grader failed on; each named grader's score follows (grader_<name>).
GRPO_REWARDS = [("reward_mean", "train_reward_mean", "reward"),
                ("reward_std", "train_reward_std", "reward spread"),
                ("no_spread_share", "train_frac_reward_zero_std", "prompts without spread"),
                ("completion_length", "train_mean_completion_length", "answer length"),
                ("grader_failed_share", "train_grader_failed_share", "grader failed on"),
                ("val_reward_mean", "valid_reward_mean", "validation reward"),
                ("val_reward_std", "valid_reward_std", "validation reward spread")]


def reward_columns(method: str | None, history: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The method's metrics as (history key, name in results files and events, in words): DPO's
    four; GRPO's, then each named grader's score found in `history`."""
    if method == "dpo":
        return REWARDS
    if method != "grpo":
        return []
    found = {k for h in history for k in h}
    named = sorted(k for k in found if k.removeprefix("val_").startswith("grader_")
                   and k.removeprefix("val_") != "grader_failed_share")
    return GRPO_REWARDS + [(k, ("valid_" if k.startswith("val_") else "train_") + k.removeprefix("val_"),
                            ("validation " if k.startswith("val_") else "") + k.removeprefix("val_")[7:])
                           for k in named]


# -- what a training is made of -----------------------------------------------------------------------

def check_destination(store: Store, owner: str, destination: str) -> Model:
    """The caller's own model named by `destination` ("owner/name"); Invalid when malformed,
    NotFound when it does not exist or belongs to someone else."""
    dest_owner, slash, dest_name = destination.partition("/")
    if not slash or not dest_owner or not dest_name or "/" in dest_name:
        raise Invalid(f"destination {destination!r} must be 'owner/name'", field="destination",
                      errors=[{"field": "destination", "reason": "must be 'owner/name'"}])
    model = store.get_model(owner, dest_owner, dest_name)
    if model is None or model.owner != owner or model.is_base:
        raise NotFound(f"destination model {destination} (create it first with POST /v1/models; "
                       "it must be one of your own models) not found", field="destination")
    return model


def check_trainable(settings: Settings, base: Model, version: Version) -> None:
    """Invalid when `version` is a trained one (only a base's version trains), Unavailable naming
    the base and the reason when its files are missing (reads no weights)."""
    from tunery.errors import ModelNotFoundError
    from tunery.models.resolve import check_base

    if not base.is_base or version.run_url is not None:
        raise Invalid(f"version {base.owner}/{base.name}:{version.id} is a trained version; "
                      "train a base model's version (GET /v1/models lists them)", field="version")
    try:
        check_base(version.base_name, settings, label=f"{base.owner}/{base.name}")
    except ModelNotFoundError as exc:
        raise Unavailable(str(exc), field="version", errors=[{"field": "version", "reason": str(exc)}]) from None


def parse_inputs(data: dict[str, Any]) -> TrainingInputs:
    """The typed inputs; Invalid listing every bad field (unknown, wrong type, out of range) and
    every inconsistency between fields otherwise."""
    if errors := input_errors(data):
        raise Invalid(format_input_errors(errors), field=errors[0].field, title="Invalid training input",
                      errors=[{"field": e.field, "reason": e.reason} for e in errors])
    return TrainingInputs.model_validate(data)


@dataclass
class Data:
    """One data field's file, found and checked: `label` names it in messages, `local` is a copy
    here, `url` where a worker reads it (None: fetched now, still to be put in the storage)."""

    field: str
    label: str
    local: Path
    url: str | None
    check: DataCheck


def data_from_file(store: Store, settings: Settings, row: File, field: str, *, label: str | None = None) -> Data:
    """An uploaded file as a training's data: checked (and the outcome recorded on the file)."""
    check = check_file(store, settings, row)
    return Data(field, label or row.name, local_copy(settings, row), row.path, check)  # fetched once, by the check


def fetch_data(store: Store, settings: Settings, owner: str, field: str, source: str, *, own_hosts: set[str],
               downloads: Path) -> Data:
    """A data source as a training input names it: one of the caller's uploaded files (by its URL on
    this server), an http(s) URL (downloaded now into `downloads`, size-capped), or a local path if
    the server allows; checked, every line."""
    from tunery.data import fetch
    from tunery.errors import TuneryError

    parts = urlsplit(source) if "://" in source else None
    if parts is not None and parts.scheme in ("http", "https"):
        own = _FILE_PATH.match(parts.path)
        if own and parts.netloc in own_hosts:
            row = store.get_file(owner, own.group(1))
            if row is None or not file_exists(settings, row):
                raise Invalid(f"{field}: no file {own.group(1)} among your uploaded files", field=field,
                              errors=[{"field": field, "reason": f"no uploaded file {own.group(1)}"}])
            return data_from_file(store, settings, row, field)
        # Named in messages without credentials (user:password@, signed-URL query strings).
        shown = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
        try:
            path = fetch(source, downloads, max_bytes=settings.max_upload_bytes, allow_local=False)
        except TuneryError as exc:
            raise Invalid(f"{field}: {exc}", field=field, errors=[{"field": field, "reason": str(exc)}]) from None
        return Data(field, shown, path, None, check_data(path, shown))
    if not settings.allow_local_paths:
        reason = ("local paths are not allowed on this server: upload the file with POST /v1/files and "
                  "pass its URL, or give an http(s):// URL")
        raise Invalid(f"{field}: {reason}", field=field, errors=[{"field": field, "reason": reason}])
    try:
        path = fetch(source, settings.download_dir, allow_local=True)
    except TuneryError as exc:
        raise Invalid(f"{field}: {exc}", field=field, errors=[{"field": field, "reason": str(exc)}]) from None
    return Data(field, source, path, str(path), check_data(path, source))  # on a disk the workers share


def check_training_data(settings: Settings, inputs: TrainingInputs, train: Data, validation: Data | None) -> None:
    """Every line of the data valid, the rows' format one the method trains on, the same format in
    both files, with method=grpo a grader that can run here and every row holding what it reads,
    and enough rows left to train on; InvalidData naming the file and the problem (Invalid naming
    the grader's field)."""
    from tunery.data import split_train_validation
    from tunery.data.jsonl import method_problem
    from tunery.errors import TuneryError

    files = [train] + ([validation] if validation else [])
    bad = [d for d in files if not d.check.valid]
    if bad:
        errors = [e for d in bad for e in d.check.errors]
        raise InvalidData("invalid training data:\n" + "\n".join(d.check.detail for d in bad), field=bad[0].field,
                          errors=errors[:MAX_LISTED], check=bad[0].check)
    for d in files:
        if problem := method_problem(inputs.method, d.check.format or ""):
            message = f"{d.label} ({d.field}) {problem}"
            raise InvalidData(message, field=d.field, reason=problem,
                              errors=[{"file": d.label, "line": None, "field": "method", "reason": message}])
    if validation and validation.check.format != train.check.format:
        reason = (f"{validation.label} has {validation.check.format} rows but {train.label} has "
                  f"{train.check.format} rows; training and validation data must use the same format")
        raise InvalidData(reason, field="validation_data", reason=reason,
                          errors=[{"file": validation.label, "line": None, "field": "validation_data", "reason": reason}])
    if inputs.method == "grpo":
        check_grader_and_rows(settings, inputs, files)
    try:
        split_train_validation(train.check.dataset, validation.check.dataset if validation else None,
                               num_validation_samples=inputs.num_validation_samples,
                               run_validation=inputs.run_validation)
    except TuneryError as exc:
        raise InvalidData(str(exc), field="num_validation_samples", reason=str(exc), errors=[
            {"file": train.label, "line": None, "field": "num_validation_samples", "reason": str(exc)}]) from None


def check_grader_and_rows(settings: Settings, inputs: TrainingInputs, files: list[Data]) -> None:
    """method=grpo: the grader checked (service.graders.check: its python source loaded in the
    sandbox), then each row of each file holding every item field the grader's templates read."""
    from tunery.graders import row_errors
    from tunery.service import graders

    grader = graders.check(settings, inputs.grader_json, training=True)
    for d in files:
        errors = row_errors(grader, d.check.dataset)
        if errors:
            lines = [e.as_dict() | {"file": d.label} for e in errors]
            shown = "\n".join(f"{d.label}:{e['line']}: {e['reason']}" for e in lines[:MAX_LISTED])
            raise InvalidData(f"{len(errors)} rows of {d.label} lack what the grader reads:\n{shown}", field=d.field,
                              errors=lines[:MAX_LISTED])


# -- will it fit? --------------------------------------------------------------------------------------------

#: The longest rows (by characters) tokenized to estimate a training's peak memory at creation.
FIT_SAMPLE = 64


def check_fits(store: Store, settings: Settings, inputs: TrainingInputs, base_name: str, train: Data,
               hardware: str | None = None) -> dict[str, int]:
    """The training's estimated peak memory per device on each kind of running worker that offers `hardware`
    (models.memory.check_training: {Devices.key(): bytes}); Invalid with the one-line reason and
    what to change when it fits none of them. Nothing is estimated (an empty answer) while no
    worker runs, or when the base is not on this server as a folder (a storage URL not downloaded
    here): the worker checks again before it loads the model, and the workers that are running
    only claim trainings their devices hold, when another worker's would."""
    from tunery.models import memory
    from tunery.models.resolve import local_base

    workers = [w for w in store.live_workers(settings.lease_seconds) if hardware_matches(hardware, w.offers())]
    folder = local_base(base_name, settings) if workers else None
    if folder is None:
        return {}
    sequences = _longest_sequences(inputs, folder, train.check.dataset)
    groups: dict[str, list] = {}
    for w in workers:
        groups.setdefault(w.devices().key(), []).append(w)
    needs: dict[str, int] = {}
    fits_somewhere = False
    closest: tuple[int, str] | None = None
    for key, members in groups.items():
        best = max(members, key=lambda w: w.memory)
        estimate, problem = memory.check_training(inputs, folder, sequences, _processes(inputs, best.devices()))
        needs[key] = estimate.total
        if problem is None:
            fits_somewhere = True
            continue
        short = estimate.total - best.memory
        if closest is None or short < closest[0]:
            where = f"{best.description} on worker {best.id}"
            if len(workers) > 1:
                where += f" (the closest to fitting of the {len(workers)} running workers)"
            closest = (short, memory.will_not_fit(estimate, best.memory, where, inputs) or "")
    if not fits_somewhere and closest is not None:
        raise Invalid(closest[1], field="micro_batch_size", title="Training does not fit",
                      errors=[{"field": "micro_batch_size", "reason": closest[1]}])
    return needs


def _processes(inputs: TrainingInputs, devices):
    """`devices` with the processes a training of `inputs` gets there (worker.runner.processes_for:
    as many of the worker's as split the global batch's micro batches evenly)."""
    import dataclasses

    micro_batches = max(1, inputs.gradient_accumulation_steps)
    processes = max(p for p in range(1, devices.processes + 1) if micro_batches % p == 0)
    return dataclasses.replace(devices, processes=processes)


def _longest_sequences(inputs: TrainingInputs, folder: str, dataset) -> list:
    """The training's longest sequences as the trainer will see them, from its FIT_SAMPLE longest
    rows (by characters) and FIT_SAMPLE rows spread over the file, tokenized with the base's
    tokenizer (chat template, truncation at max_seq_length; DPO's two sequences a pair). A packed
    sequence is taken to fill chunk_size as far as the whole file's tokens reach (estimated from
    the sample's tokens per character), labelled as densely as the sample's most labelled row."""
    import json
    import math
    from types import SimpleNamespace

    from tunery.data import IGNORE_INDEX, preference_examples, prompt_examples, tokenize_rows
    from tunery.models.load import load_tokenizer
    from tunery.models.resolve import ResolvedBase

    sizes = [len(json.dumps(row, ensure_ascii=False)) for row in dataset.rows]
    longest = sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True)[:FIT_SAMPLE]
    spread = range(0, len(sizes), max(1, len(sizes) // FIT_SAMPLE))
    order = sorted(set(longest) | set(spread))
    rows = [dataset.rows[i] for i in order]
    tokenizer = load_tokenizer(ResolvedBase(folder, "dir", folder, folder, None), inputs.chat_template)
    if inputs.method == "dpo":
        pairs = preference_examples(rows, tokenizer, max_length=inputs.max_length)
        return [e for p in pairs for e in (p.preferred, p.non_preferred)]
    if inputs.method == "grpo":
        return prompt_examples(rows, tokenizer, answer_tokens=inputs.max_completion_length,
                               schema=inputs.response_schema)[1]
    examples = tokenize_rows(rows, dataset.format, tokenizer, max_length=inputs.max_length,
                             train_on_inputs=inputs.train_on_inputs)
    if not inputs.pack_sequences or not examples:
        return examples
    tokens = sum(len(e.input_ids) for e in examples)
    reach = tokens * sum(sizes) / max(1, sum(sizes[i] for i in order))
    length = int(min(inputs.chunk_size, max(reach, max(len(e.input_ids) for e in examples))))
    share = max(sum(label != IGNORE_INDEX for label in e.labels) / max(1, len(e.labels)) for e in examples)
    labelled = round(share * length)
    packed = SimpleNamespace(input_ids=range(length), labels=[0] * labelled + [IGNORE_INDEX] * (length - labelled))
    return [packed] * max(1, min(inputs.micro_batch_size, math.ceil(reach / inputs.chunk_size)))


# -- creating one -----------------------------------------------------------------------------------------

def create_training(store: Store, settings: Settings, *, owner: str, base: Model, version: Version,
                    destination: str, inputs: dict[str, Any], data: dict[str, Data] | None = None,
                    own_hosts: set[str] = frozenset(), webhook: str | None = None,  # type: ignore[assignment]
                    webhook_events_filter: Sequence[str] | None = None, openai: dict[str, Any] | None = None,
                    training_id: str | None = None, new_destination: str | None = None,
                    hardware: str | None = None) -> Training:
    """Queue a training of `base` at `version`, pushed to `destination`, on the user's `inputs`
    (tunery's names), once every check has passed (the owner's queue first: Busy beyond
    `queued_trainings`); nothing is left behind when one fails.

    The data comes from `data` (files already found, such as OpenAI's file ids) or else from the
    sources the inputs name (train_data, and validation_data when it validates). Data fetched now
    goes into the storage, where a worker on another machine reads it. `destination` must be one
    of the caller's models, unless `new_destination` (its description) asks for a new private one.
    `hardware` (default: the destination's) must be offered by a running worker, unless it asks for
    nothing in particular (store.models.ANY_HARDWARE)."""
    from tunery.store.models import new_id

    check_queue(store, owner)
    if new_destination is None:
        model = check_destination(store, owner, destination)
        hardware = model.hardware if hardware is None else hardware
    hardware = check_hardware(store, settings, hardware)
    check_trainable(settings, base, version)
    typed = parse_inputs(inputs)
    training_id = training_id or new_id()
    downloads = settings.download_dir / secrets.token_hex(8)
    stored: list[str] = []
    try:
        if data is None:
            fields = ["train_data"] + (["validation_data"] if typed.validation_data and typed.run_validation else [])
            data = {f: fetch_data(store, settings, owner, f, getattr(typed, f), own_hosts=own_hosts,
                                  downloads=downloads) for f in fields}
        check_training_data(settings, typed, data["train_data"], data.get("validation_data"))
        needs = check_fits(store, settings, typed, version.base_name, data["train_data"], hardware)
        urls: dict[str, str] = {}
        for field, found in data.items():
            url = found.url
            if url is None:  # fetched now: into the storage, where the worker reads it
                url = settings.objects.put(found.local, f"data/{training_id}/{field}-{found.local.name[-80:]}")
                stored.append(url)
            urls[field] = url
        return store.create_training(
            owner, training_id=training_id, model=f"{base.owner}/{base.name}", version_id=version.id,
            destination=destination, input=inputs, job={"data": urls, "base": version.base_name,
                                                        **({"memory": needs} if needs else {}),
                                                        **({"hardware": hardware} if hardware else {})},
            webhook=webhook, webhook_events_filter=webhook_events_filter, openai=openai,
            new_destination=new_destination)
    except BaseException:
        for url in stored:
            settings.objects.delete(url)
        raise
    finally:
        shutil.rmtree(downloads, ignore_errors=True)


def get_training(store: Store, owner: str, training_id: str) -> Training:
    row = store.get_training(owner, training_id)
    if row is None:
        raise NotFound(f"training {training_id} not found")
    return row


# -- its life -----------------------------------------------------------------------------------------

def can_pause(row: Training) -> bool:
    """Only a queued or running training, not already being canceled, can be paused."""
    return row.status in ("starting", "processing") and not row.cancel_requested


def can_resume(row: Training) -> bool:
    """A paused training, or a running one asked to pause that has not stopped yet."""
    return row.status == "paused" or (row.status == "processing" and bool(row.pause_requested))


def pause_training(store: Store, owner: str, row: Training) -> Training:
    if not can_pause(row):
        raise Conflict(f"training {row.id} is {row.status}: only a queued or running training can be paused")
    return store.pause_training(owner, row.id) or row


def resume_training(store: Store, owner: str, row: Training) -> Training:
    if not can_resume(row):
        raise Conflict(f"training {row.id} is {row.status}: only a paused training can be resumed")
    return store.resume_training(owner, row.id) or row


def exported_run(store: Store, settings: Settings, owner: str, training_id: str):
    """(row, run) of a succeeded training, whose weights can be exported; Conflict otherwise."""
    row = get_training(store, owner, training_id)
    if row.status != "succeeded" or not row.run_url:
        raise Conflict(f"training {training_id} is {row.status}: only a succeeded training can be exported")
    return row, settings.run(row.run_url)


# -- results --------------------------------------------------------------------------------------------

def results_csv(row: Training, metrics: dict[str, Any] | None = None) -> str:
    """The training's step metrics in the columns of OpenAI's results file: step, train_loss,
    train_accuracy, valid_loss, valid_mean_token_accuracy (the accuracies are the mean token
    accuracy: a supervised training's, a DPO training's on its preferred answers; empty for GRPO), and a DPO or GRPO training's
    reward metrics (reward_columns). `metrics` are the training's final metrics (its row's when
    not given)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    history = ((row.metrics if metrics is None else metrics) or {}).get("history") or []
    rewards = [(key, name) for key, name, _ in reward_columns((row.input or {}).get("method"), history)]
    writer.writerow(["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy",
                     *(name for _, name in rewards)])
    for h in history:
        writer.writerow([h.get("step"), h.get("loss", ""), h.get("token_accuracy", ""), h.get("val_loss", ""),
                         h.get("val_token_accuracy", ""),
                         *(h.get(key, "") for key, _ in rewards)])
    return out.getvalue()


def results_file_id(training_id: str) -> str:
    return f"r{training_id}"


def save_results(store: Store, settings: Settings, row: Training, metrics: dict[str, Any]) -> File:
    """Record a finishing training's results file (the step metrics CSV of its final `metrics`)
    among its owner's files, and on the training."""
    file_id = results_file_id(row.id)
    saved = save_result_file(store, settings, row.owner, file_id, name="step_metrics.csv",
                             content=results_csv(row, metrics).encode(), content_type="text/csv")
    store.set_training_openai(row.id, {"result_file": file_id})
    return saved
