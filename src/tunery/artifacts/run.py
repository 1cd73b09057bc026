"""A run: one folder, addressed by URL, and the only code that knows what is inside it.

A run's URL is a local path or an fsspec URL (`s3://bucket/prefix/trainings/ID`, `file://…`,
any back end fsspec knows). Everything a training writes and everything later read from it goes
through `Run`: the job, the event stream, checkpoints, the adapter or full model, the tokenizer,
the manifest, the evaluation report, the weights archive and exports. No other module spells a
name inside a run folder.

A training computes on a local disk: `Run.work` is where the Trainer writes. For a local run it
is the run folder itself; for a run in object storage it is a cache folder on this machine,
and `Run` copies to storage what must outlive the machine — each checkpoint as it completes,
then the outputs when the training ends — and copies back what a resume or a prediction needs.

Layout (names relative to the run's URL):

    job.json               the job: the user's inputs as given, the resolved data URLs, the base
    events.jsonl           the training's events (copied to storage at checkpoints and at the end)
    checkpoints/checkpoint-N/   the Trainer's checkpoints; trainer_state.json is written last,
                           so a checkpoint without a readable one is torn and is skipped
    adapter/ or model/     the trained LoRA adapter, or the fully fine-tuned model
    tokenizer/             the tokenizer the training used
    manifest.json          what was trained from what, how, with which results
    eval.json, eval.md, loss.png   the evaluation report, when the training was evaluated
    training_output.zip    adapter or model, tokenizer and manifest in one file (written last)
    exports/               exported models
    tracking/              experiment tracking (report_to): tensorboard/ event files, wandb/ offline
                           runs, mlruns/ (a local MLflow store)
    attempts/              the worker's per-attempt files (local plumbing, never copied)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

from tunery.errors import TuneryError
from tunery.spec import TrainingInputs

JOB = "job.json"
EVENTS = "events.jsonl"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_DONE = "trainer_state.json"  # the Trainer writes it last
ADAPTER = "adapter"
MODEL = "model"
TOKENIZER = "tokenizer"
MANIFEST = "manifest.json"
ARCHIVE = "training_output.zip"
EXPORTS = "exports"
TRACKING = "tracking"
TENSORBOARD, WANDB, MLRUNS = "tensorboard", "wandb", "mlruns"  # inside TRACKING
ATTEMPTS = "attempts"
EVAL_JSON, EVAL_MD, LOSS_PLOT = "eval.json", "eval.md", "loss.png"
REPORT = (EVAL_JSON, EVAL_MD, LOSS_PLOT)
WEIGHTS = (ADAPTER, MODEL)


def checkpoint_url(run_url: str, name: str) -> str:
    """The URL (or path) of the checkpoint `name` of the run at `run_url`."""
    return f"{run_url.rstrip('/')}/{CHECKPOINTS}/{name}"


def split_checkpoint(url: str | Path | None) -> tuple[str, str, int] | None:
    """(run URL, checkpoint name, step) of a checkpoint's URL or path (`<run>/checkpoints/
    checkpoint-<step>`); None for anything else."""
    tail = str(url or "").rstrip("/").rsplit("/", 2)
    if len(tail) == 3 and tail[1] == CHECKPOINTS and tail[2].startswith(CHECKPOINT_PREFIX) \
            and tail[2][len(CHECKPOINT_PREFIX):].isdigit():
        return tail[0], tail[2], int(tail[2][len(CHECKPOINT_PREFIX):])
    return None


def checkpoint_step(url: str | None) -> int | None:
    """The step of a checkpoint's URL; None for anything else."""
    found = split_checkpoint(url)
    return found[2] if found else None


def checkpoint_name(step: int) -> str:
    """The folder the Trainer saves step `step`'s checkpoint in (transformers' naming)."""
    return f"{CHECKPOINT_PREFIX}{step}"


class TrainingJob(BaseModel):
    """What a worker runs, typed: the inputs as the user gave them (the fields set are those given),
    where their data files are now (a URL each: storage, http(s), or a path on a shared disk), and
    the base model. Validated once in each process that reads it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: TrainingInputs = Field(description="the training inputs as the user gave them")
    data: dict[str, str] = Field(default_factory=dict,
                                 description="train_data / validation_data: the URL the training reads")
    base: str

    @classmethod
    def of(cls, given: dict[str, Any], job: dict[str, Any]) -> TrainingJob:
        """The job of a training row: the user's inputs (`given`) and the row's `job` (data, base)."""
        return cls(inputs=TrainingInputs.model_validate(given), data=job.get("data") or {}, base=job["base"])

    def training_inputs(self) -> TrainingInputs:
        """The inputs the training runs with: the user's, with the data at its resolved URLs."""
        return self.inputs.model_copy(update=self.data)

    def given(self) -> dict[str, Any]:
        """The inputs exactly as the user gave them (for the manifest and the `started` event)."""
        return self.inputs.model_dump(mode="json", exclude_unset=True)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_unset=True)


def is_url(location: str | Path) -> bool:
    """Whether `location` is a URL with a scheme fsspec resolves (rather than a local path)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def filesystem(url: str, options: dict | None = None):
    """(fsspec filesystem, path in it) for `url`, with a clear error for an unknown scheme or a
    back end that is not installed (s3:// needs s3fs)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(options or {}))
    except (ImportError, ValueError) as e:
        scheme = url.split("://", 1)[0]
        hint = " (pip install s3fs)" if scheme in ("s3", "s3a") else ""
        raise TuneryError(f"storage {shown(url)}: cannot open the {scheme}:// back end{hint}: {e}") from e


def shown(url: str) -> str:
    """A URL without credentials (user:password@), for messages."""
    scheme, sep, rest = str(url).partition("://")
    if not sep:
        return str(url)
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"


@contextlib.contextmanager
def _storage(url: str, what: str) -> Iterator[None]:
    """Turn a storage back end's failure (botocore, aiohttp, OSError…) into one line naming the
    storage and what was being done."""
    try:
        yield
    except TuneryError:
        raise
    except FileNotFoundError:
        raise
    except Exception as e:
        raise TuneryError(f"storage {shown(url)}: cannot {what}: {type(e).__name__}: {e}") from e


class Run:
    """The run at `url` (see the module docstring). `cache` is the local folder where runs in
    object storage are worked on and copied to (required for those; ignored for local runs);
    `options` are fsspec storage options (e.g. an S3 endpoint and credentials)."""

    def __init__(self, url: str | Path, *, cache: Path | None = None, options: dict | None = None):
        text = str(url)
        if text.startswith("file://"):
            text = text[len("file://"):]
        self.url = text.rstrip("/")
        self.remote = is_url(self.url)
        self.options = options or {}
        if self.remote:
            self.fs, self.root = filesystem(self.url, self.options)
            if cache is None:
                raise TuneryError(f"run {shown(self.url)}: a local cache folder is needed to work on it")
            self.work = Path(cache) / hashlib.sha256(self.url.encode()).hexdigest()[:24]
        else:
            self.fs, self.root = None, self.url
            self.work = Path(self.url).expanduser()

    def __repr__(self) -> str:
        return f"Run({shown(self.url)!r})"

    # -- names (local paths under `work`)
    @property
    def checkpoints(self) -> Path:
        return self.work / CHECKPOINTS

    @property
    def events(self) -> Path:
        return self.work / EVENTS

    @property
    def tokenizer(self) -> Path:
        return self.work / TOKENIZER

    @property
    def exports(self) -> Path:
        return self.work / EXPORTS

    def export_entry(self, filename: str) -> str:
        """The name in the run of the export file `filename`."""
        return f"{EXPORTS}/{filename}"

    @property
    def name(self) -> str:
        """The run's name: the last part of its URL (a run folder's name, a service training's id)."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def tracking(self) -> Path:
        """Where experiment trackers write; W&B makes its own `wandb/` folder in it."""
        return self.work / TRACKING

    @property
    def tensorboard(self) -> Path:
        return self.work / TRACKING / TENSORBOARD

    @property
    def wandb(self) -> Path:
        return self.work / TRACKING / WANDB

    @property
    def mlruns(self) -> Path:
        return self.work / TRACKING / MLRUNS

    def weights_dir(self, full: bool) -> Path:
        return self.work / (MODEL if full else ADAPTER)

    def attempt_files(self, prefix: str) -> tuple[Path, Path, Path]:
        """A worker attempt's job, events and output files (local plumbing)."""
        folder = self.work / ATTEMPTS
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{prefix}.job.json", folder / f"{prefix}.events.jsonl", folder / f"{prefix}.output.log"

    # -- storage primitives
    def _remote(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def exists(self, name: str) -> bool:
        if not self.remote:
            return (self.work / name).exists()
        with _storage(self.url, f"look for {name}"):
            self.fs.invalidate_cache()  # another machine may have written it since we last listed
            return bool(self.fs.exists(self._remote(name)))

    def read_bytes(self, name: str) -> bytes:
        if not self.remote:
            return (self.work / name).read_bytes()
        with self.fs.open(self._remote(name), "rb") as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write one file whole: a reader never sees part of it (rename locally; an object store's
        put is atomic)."""
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        if self.remote:
            with _storage(self.url, f"write {name}"):
                self.fs.pipe_file(self._remote(name), data)

    def push(self, name: str) -> None:
        """Copy the local file or folder `name` to storage (nothing to do for a local run)."""
        if not self.remote:
            return
        path = self.work / name
        with _storage(self.url, f"copy {name} there"):
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file())
                for f in files:
                    self.fs.put_file(str(f), self._remote(f.relative_to(self.work).as_posix()))
            elif path.is_file():
                self.fs.put_file(str(path), self._remote(name))

    def pull(self, name: str) -> Path:
        """The local copy of `name` (a file or folder), fetched from storage when missing here.
        A folder is fetched into a temporary sibling and renamed into place: it is whole or absent."""
        path = self.work / name
        if not self.remote or path.exists():
            return path
        remote = self._remote(name)
        if not self.exists(name):
            raise TuneryError(f"run {shown(self.url)}: no {name} in storage")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with _storage(self.url, f"fetch {name}"):
                if self.fs.isdir(remote):
                    for entry in self.fs.find(remote):
                        target = tmp / entry[len(remote):].lstrip("/")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        self.fs.get_file(entry, str(target))
                else:
                    self.fs.get_file(remote, str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            Path(tmp).unlink(missing_ok=True)
            raise
        try:
            os.replace(tmp, path)
        except OSError:  # another thread or process fetched it first: its copy is the same
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def delete(self) -> None:
        """Remove the whole run: from storage, and its local folder or cached copy."""
        if self.remote:
            with _storage(self.url, "delete it"):
                if self.fs.exists(self.root):
                    self.fs.rm(self.root, recursive=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Remove the file or folder `name`, here and in storage."""
        local = self.work / name
        if local.is_file() or local.is_symlink():
            local.unlink()
        shutil.rmtree(local, ignore_errors=True)
        if self.remote and self.fs.exists(self._remote(name)):
            self.fs.rm(self._remote(name), recursive=True)

    # -- the job
    def write_job(self, job: TrainingJob) -> None:
        self.write_bytes(JOB, job.model_dump_json(indent=2, exclude_unset=True).encode())

    def read_job(self) -> TrainingJob:
        try:
            return TrainingJob.model_validate_json(self.read_bytes(JOB))
        except (OSError, FileNotFoundError) as e:
            raise TuneryError(f"run {shown(self.url)}: cannot read its {JOB}: {e}") from e

    # -- checkpoints
    def checkpoint_names(self) -> list[str]:
        """Checkpoint folder names, in storage for a remote run (the truth that outlives a
        machine), else here; oldest step first."""
        if self.remote:
            with _storage(self.url, "list its checkpoints"):
                listing = self.fs.ls(self._remote(CHECKPOINTS), detail=False) if self.exists(CHECKPOINTS) else []
            names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in listing]
        else:
            names = [p.name for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
        steps = [n for n in names if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit()]
        return sorted(steps, key=lambda n: int(n[len(CHECKPOINT_PREFIX):]))

    def checkpoint_complete(self, name: str) -> bool:
        """Whether a checkpoint was saved (or copied) whole: its trainer_state.json parses."""
        try:
            json.loads(self.read_bytes(f"{CHECKPOINTS}/{name}/{CHECKPOINT_DONE}"))
        except (OSError, ValueError, FileNotFoundError):
            return False
        return True

    def drop_torn_checkpoints(self) -> list[str]:
        """Delete checkpoints a killed training left half-written (here and in storage), so a
        resume starts from the newest complete one. Returns their names."""
        torn = [n for n in self.checkpoint_names() if not self.checkpoint_complete(n)]
        for name in torn:
            self.remove(f"{CHECKPOINTS}/{name}")
        if self.remote:  # local copies of checkpoints storage does not have whole
            kept = set(self.checkpoint_names())
            for local in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*"):
                if local.name not in kept:
                    shutil.rmtree(local, ignore_errors=True)
        return torn

    def newest_checkpoint(self) -> Path | None:
        """The local folder of the newest complete checkpoint (fetched from storage if needed)."""
        complete = [n for n in self.checkpoint_names() if self.checkpoint_complete(n)]
        if not complete:
            return None
        return self.pull(f"{CHECKPOINTS}/{complete[-1]}")

    def push_checkpoint(self, folder: Path) -> None:
        """Copy a just-saved checkpoint to storage, trainer_state.json last (so a copy cut short is
        torn by the same rule as a save cut short), then drop from storage the checkpoints the
        Trainer rotated out here. Also copies the events so far."""
        if not self.remote:
            return
        name = f"{CHECKPOINTS}/{folder.name}"
        files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.name == CHECKPOINT_DONE)
        with _storage(self.url, f"copy {name} there"):
            for f in files:
                self.fs.put_file(str(f), self._remote(f"{name}/{f.relative_to(folder).as_posix()}"))
            here = {p.name for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*")}
            for old in self.checkpoint_names():
                if old not in here:
                    self.fs.rm(self._remote(f"{CHECKPOINTS}/{old}"), recursive=True)
        self.push(EVENTS)

    # -- outputs
    def write_manifest(self, manifest: dict) -> None:
        self.write_bytes(MANIFEST, json.dumps(manifest, indent=2, default=str).encode())

    def read_manifest(self) -> dict:
        return json.loads(self.read_bytes(MANIFEST))

    def write_archive(self, output: str) -> Path:
        """Zip the weights folder (`adapter` or `model`), the tokenizer and the manifest into one
        file, paths relative to the run, so the archive unpacks into a loadable run."""
        path = self.work / ARCHIVE
        tmp = path.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for folder in (output, TOKENIZER):
                for f in sorted((self.work / folder).rglob("*")):
                    if f.is_file():
                        zf.write(f, f.relative_to(self.work).as_posix())
            zf.write(self.work / MANIFEST, MANIFEST)
        os.replace(tmp, path)
        return path

    def publish(self) -> None:
        """Copy a finished training's outputs to storage: weights, tokenizer, report, tracking
        files, events, and the archive last (its presence means the run is whole)."""
        if not self.remote:
            return
        for name in (*WEIGHTS, TOKENIZER, *REPORT, TRACKING, EVENTS, MANIFEST, ARCHIVE):
            self.push(name)

    def push_events(self) -> None:
        self.push(EVENTS)

    def has_archive(self) -> bool:
        return self.exists(ARCHIVE)

    def archive_size(self) -> int:
        if not self.remote:
            return (self.work / ARCHIVE).stat().st_size
        return int(self.fs.size(self._remote(ARCHIVE)))

    def open_archive(self) -> IO[bytes]:
        if not self.remote:
            return open(self.work / ARCHIVE, "rb")
        return self.fs.open(self._remote(ARCHIVE), "rb")

    def local_weights(self) -> Path:
        """A local folder holding the manifest, the weights and the tokenizer: the run itself when
        local, else a copy fetched once from storage."""
        if not self.remote:
            return self.work
        manifest = self.pull(MANIFEST)
        output = json.loads(manifest.read_text()).get("output") or ADAPTER
        self.pull(output)
        if self.exists(TOKENIZER):
            self.pull(TOKENIZER)
        return self.work


def check_storage(url: str, options: dict | None = None) -> None:
    """Write, read back and delete a small object under `url`: a storage that is unreachable, a
    bucket that does not exist or credentials that are wrong fail here, with the reason, before
    any work is taken."""
    probe = f".tunery-probe-{os.getpid()}-{threading.get_ident()}"
    if not is_url(url):
        folder = Path(url.removeprefix("file://")).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / probe).write_bytes(b"ok")
            (folder / probe).unlink()
        except OSError as e:
            raise TuneryError(f"storage {url}: cannot write there: {e}") from e
        return
    fs, root = filesystem(url, options)
    path = f"{root.rstrip('/')}/{probe}"
    try:
        fs.pipe_file(path, b"ok")
        if fs.cat_file(path) != b"ok":
            raise OSError("the object read back differs from the one written")
        fs.rm(path)
    except Exception as e:  # botocore, aiohttp and OSError flavours: all mean "not usable"
        raise TuneryError(f"storage {shown(url)} is not usable: {type(e).__name__}: {e}") from e


class Storage:
    """Objects outside runs (uploaded files, fetched training data) in the configured storage:
    `put` copies a local file there and returns its URL; the others take such a URL (or a local
    path, for a local storage)."""

    def __init__(self, root: str, options: dict | None = None):
        self.root = root.rstrip("/")
        self.remote = is_url(self.root)
        self.options = options or {}

    def put(self, local: Path, name: str) -> str:
        """Copy `local` into the storage under `name`; its URL (for a local storage, its path)."""
        if not self.remote:
            dest = Path(self.root).expanduser() / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            shutil.copyfile(local, tmp)
            os.replace(tmp, dest)
            return str(dest)
        fs, root = filesystem(self.root, self.options)
        with _storage(self.root, f"copy {name} there"):
            fs.put_file(str(local), f"{root}/{name}")
        return f"{self.root}/{name}"

    def open(self, url: str) -> IO[bytes]:
        if not is_url(url):
            return open(url, "rb")
        fs, path = filesystem(url, self.options)
        return fs.open(path, "rb")

    def exists(self, url: str) -> bool:
        if not is_url(url):
            return Path(url).is_file()
        fs, path = filesystem(url, self.options)
        return bool(fs.exists(path))

    def delete(self, url: str) -> None:
        if not is_url(url):
            Path(url).unlink(missing_ok=True)
            return
        fs, path = filesystem(url, self.options)
        if fs.exists(path):
            fs.rm(path)

    def get(self, url: str, cache: Path) -> Path:
        """A local copy of the object at `url`, fetched once into `cache` (under a name made from
        the URL, appearing only once complete)."""
        if not is_url(url):
            return Path(url)
        fs, path = filesystem(url, self.options)
        name = url.rstrip("/").rsplit("/", 1)[-1][-80:]
        dest = Path(cache) / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            fs.get_file(path, str(tmp))
            os.replace(tmp, dest)
        except FileNotFoundError as e:
            raise TuneryError(f"{shown(url)}: no such object in storage") from e
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dest
