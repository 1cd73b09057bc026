"""The training worker: claims a training, runs it in a child process, reports as it goes.

One worker runs one training at a time. While the child trains, the worker tails its event
file into the training's logs and metrics, and heartbeats to keep its lease; the heartbeat's
answer is how a cancel (or the loss of the job to another worker) reaches it. A worker that
dies stops heartbeating; when its lease expires another worker claims the training again and
the child resumes from the last checkpoint in the same run directory.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunery.artifacts.run import TrainingJob, checkpoint_url
from tunery.models.memory import Devices, available_memory, gib
from tunery.settings import Settings
from tunery.store.models import Training, hardware_matches, parse_labels, worker_labels
from tunery.store.store import Store
from tunery.worker.child import ChildArgs
from tunery.worker.progress import Progress

log = logging.getLogger("tunery.worker")

FLUSH_INTERVAL = 1.0  # seconds between writes of new logs/metrics to the store, at least...
MAX_FLUSH_INTERVAL = 10.0  # ...and at most
# Each write rewrites the row's whole logs and metrics; a long training's grow to megabytes.
# Writes are spaced so that they cost at most about this many bytes a second.
FLUSH_BYTES_PER_SECOND = 100_000
POLL = 0.2  # seconds between looks at the child
PAUSE_GRACE = 300.0  # seconds a paused child has to finish its step and save a checkpoint
CHILD_RETRIES = 2  # a training process the system kills is started again this many times
CRASH_SIGNALS = {signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL}


def flush_interval(row_bytes: int) -> float:
    """Seconds until the next write of a training's logs and metrics, given their size: every
    second while they are small, less often as they grow (a 5,000-step run's are ~0.5 MB)."""
    return min(MAX_FLUSH_INTERVAL, max(FLUSH_INTERVAL, row_bytes / FLUSH_BYTES_PER_SECOND))


def processes_for(job: TrainingJob, settings: Settings) -> tuple[int, str]:
    """(processes to train `job` with, a note on them for the log). One per device named in the
    settings (or `train_processes`), as many of them as split its global batch evenly: the
    global batch is train_batch_size, cut into micro batches shared out over the processes."""
    wanted = settings.train_processes or len(settings.devices) or 1
    if wanted == 1:
        return 1, ""
    inputs = job.training_inputs()
    micro_batches = max(1, inputs.train_batch_size // inputs.micro_batch_size)
    processes = max(p for p in range(1, wanted + 1) if micro_batches % p == 0)
    where = f"GPUs {','.join(settings.devices)}" if settings.devices else "the CPU"
    note = f"{processes} processes on {where}"
    if processes < wanted:
        note += (f" (not {wanted}: train_batch_size {inputs.train_batch_size} / micro_batch_size "
                 f"{inputs.micro_batch_size} = {micro_batches} micro batches a step)")
    return processes, note


def probe_devices(settings: Settings, env: dict[str, str]) -> Devices:
    """The devices a worker's trainings get (models.memory.local_devices in a child process with
    their environment, so this process never holds a CUDA context), with as many processes as
    the worker starts at most."""
    processes = settings.train_processes or len(settings.devices) or 1
    code = ("import dataclasses, json; from tunery.models.load import pick_device; "
            "from tunery.models.memory import local_devices; "
            f"print(json.dumps(dataclasses.asdict(local_devices(pick_device(), {processes}))))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
    return Devices(**json.loads(done.stdout.strip().splitlines()[-1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """Runs trainings from `store`, one at a time, each in its run in the storage (`settings.storage`).

    `heartbeat_interval` defaults to a third of the lease, at most 2 s (the heartbeat is how a
    cancel arrives); `kill_grace` is how long a stopped child gets between SIGTERM and SIGKILL.
    """

    def __init__(self, store: Store, settings: Settings, *, worker_id: str | None = None,
                 poll_interval: float = 1.0, heartbeat_interval: float | None = None,
                 kill_grace: float = 3.0):
        self.store = store
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self.poll_interval = poll_interval
        self.lease_seconds = settings.lease_seconds
        self.heartbeat_interval = heartbeat_interval or max(0.2, min(2.0, self.lease_seconds / 3))
        self.kill_grace = kill_grace
        self.child: subprocess.Popen | None = None  # the training process running now, if any
        self.devices: Devices | None = None  # what its trainings get, once probed (run_forever)
        self.labels = parse_labels(settings.worker_labels)  # the operator's (ValueError when malformed)

    def run_forever(self, stop_event: threading.Event) -> None:
        """Run trainings until `stop_event` is set. A training still running then is stopped and
        handed back at once, for another worker (or this one, restarted) to resume. Meanwhile the
        worker's devices are registered in the store (see `_present`)."""
        log.info("worker %s started", self.worker_id)
        presence = threading.Thread(target=self._present, args=(stop_event,), name=f"{self.worker_id}-presence",
                                    daemon=True)
        presence.start()
        try:
            while not stop_event.is_set():
                try:
                    ran = self.run_once(stop_event)
                except Exception:  # the database went away, say: keep polling until it is back
                    log.exception("worker %s: claiming a training failed", self.worker_id)
                    ran = False
                if not ran:
                    stop_event.wait(self.poll_interval)
        finally:
            presence.join(10)
        log.info("worker %s stopped", self.worker_id)

    def _present(self, stop_event: threading.Event) -> None:
        """Register this worker's devices (probed once in a child process with its trainings'
        environment), renew the registration every heartbeat while it runs (on a CPU, with the
        memory available while no training runs), and delete it when it stops."""
        try:
            self.devices = probe_devices(self.settings, self._child_env())
        except Exception as exc:
            log.warning("worker %s: its devices could not be probed (%s); trainings are checked when they start",
                        self.worker_id, exc)
            return
        host = socket.gethostname()
        interval = max(1.0, min(10.0, self.lease_seconds / 3))
        try:
            while True:
                if self.devices.kind == "cpu" and self.child is None:
                    available = available_memory()
                    self.devices = dataclasses.replace(
                        self.devices, memory=available, description=f"the available memory of {host} ({gib(available)})")
                try:
                    self.store.register_worker(self.worker_id, self.devices, host=host, labels=self.labels)
                except Exception:  # a database hiccup: the next renewal comes before the lease lapses
                    log.exception("worker %s: registering its devices failed", self.worker_id)
                if stop_event.wait(interval):
                    break
        finally:
            try:
                self.store.forget_worker(self.worker_id)
            except Exception:
                log.exception("worker %s: unregistering failed", self.worker_id)

    def _skip(self) -> Callable[[Training], bool]:
        """Which claimable trainings to leave to other workers: those whose hardware (recorded on
        the job) this worker's labels do not match, and those whose estimated peak memory
        (trainings.check_fits, recorded on the job) is more than this worker's devices hold, when
        a running worker's devices hold it. One nobody's devices hold is claimed, and refused by
        the training's own check with the reason."""
        mine = self.devices
        offered = worker_labels(self.labels, mine.kind if mine else "cpu", mine.description if mine else "")
        others: list | None = None

        def skip(row: Training) -> bool:
            nonlocal others
            if not hardware_matches((row.job or {}).get("hardware"), offered):
                return True
            needs = (row.job or {}).get("memory") or {}
            if mine is None or needs.get(mine.key(), 0) <= mine.memory:
                return False
            if others is None:
                others = [w.devices() for w in self.store.live_workers(self.lease_seconds) if w.id != self.worker_id]
            return any(needs.get(d.key(), math.inf) <= d.memory for d in others)

        return skip

    def _child_env(self) -> dict[str, str]:
        """The environment of this worker's training processes: its own devices only."""
        env = dict(os.environ)
        if self.settings.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.settings.devices)
        return env

    def run_once(self, stop_event: threading.Event | None = None) -> bool:
        """Claim one training and run it to its end; False when there was none to claim."""
        training = self.store.claim_training(self.worker_id, self.lease_seconds, skip=self._skip())
        if training is None:
            return False
        log.info("worker %s: running training %s (attempt %d)", self.worker_id, training.id,
                 training.attempts)
        try:
            Attempt(self, training, stop_event or threading.Event()).run()
        except Exception as exc:
            log.exception("worker %s: training %s", self.worker_id, training.id)
            self.store.finish_training(training.id, self.worker_id, status="failed",
                                       error=f"worker error: {type(exc).__name__}: {exc}")
        return True


class Attempt:
    """One attempt at one training, from starting the child to the final state."""

    def __init__(self, worker: Worker, training: Training, stop_event: threading.Event):
        self.worker = worker
        self.store = worker.store
        self.id = training.id
        self.training = training
        self.stop_event = stop_event
        self.artifacts = worker.settings.training_run(training.id)  # the run folder (artifacts.Run)
        self.job_path = self.events_path = self.output_path = self.pause_path = Path()  # the running child's files
        self.processes = 1
        self.progress = Progress(training.metrics)
        # What a write of logs + metrics weighs (logs so far plus the last metrics written).
        self._logs_bytes = len((training.logs or "").encode())
        self._metrics_bytes = len(json.dumps(training.metrics or {}))

    def run(self) -> None:
        worker, training = self.worker, self.training
        # No child of an earlier attempt still runs here: it dies with its worker (see child.py),
        # well before that worker's lease expires and this attempt could begin.
        job = TrainingJob.of(training.input or {}, training.job or {})
        torn = self.artifacts.drop_torn_checkpoints()
        resume = training.attempts > 1 or bool(self.artifacts.checkpoint_names())
        self.artifacts.write_job(job)
        self.store.set_training_run(self.id, worker.worker_id, self.artifacts.url)
        self.processes, spread = processes_for(job, worker.settings)
        how = "resuming from the last checkpoint" if resume else "starting"
        if spread:
            how += f"; {spread}"
        note = "".join(f"dropped the incomplete checkpoint {name}\n" for name in torn)
        header = f"worker {worker.worker_id}: attempt {training.attempts}, {how}\n"
        self.store.append_training_logs(self.id, worker.worker_id, header + note)

        retries = 0
        while True:
            proc = self._start_child(resume)
            worker.child = proc
            try:
                ending = self._watch(proc)
            finally:
                self._kill(proc)
                worker.child = None
            if ending is not None:
                return
            if retries < CHILD_RETRIES and self._crashed(proc.returncode):
                # Killed by the system (the OOM killer, a segfault): the worker is fine, so go on
                # from the last checkpoint here rather than wait for a lease to expire.
                retries += 1
                reason = self._exit_reason(proc.returncode, tail=False)
                torn = self.artifacts.drop_torn_checkpoints()
                self.progress.note(f"{reason}; retrying from the last checkpoint (retry {retries} of {CHILD_RETRIES})"
                                   + "".join(f"; dropped the incomplete checkpoint {name}" for name in torn))
                self._flush()
                resume = True
                continue
            self._finish(proc.returncode, retries)
            return

    def _start_child(self, resume: bool) -> subprocess.Popen:
        """Start the training process for this attempt (each start with files of its own)."""
        prefix = f"{self.training.attempts}-{secrets.token_hex(2)}"
        self.job_path, self.events_path, self.output_path = self.artifacts.attempt_files(prefix)
        self.pause_path = self.job_path.with_suffix(".pause")
        self.events_path.touch()
        self.job_path.write_text(ChildArgs(
            run=self.artifacts.url, resume=resume, events=str(self.events_path), settings=self.worker.settings,
            parent_pid=os.getpid(), pause=str(self.pause_path)).model_dump_json(), encoding="utf-8")
        command, env = self._launch()
        with open(self.output_path, "wb") as output:
            return subprocess.Popen([*command, "-m", "tunery.worker.child", str(self.job_path)], env=env,
                                    stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def _launch(self) -> tuple[list[str], dict[str, str]]:
        """How to start the training: one Python process, or `accelerate launch` with one process
        per device (DDP, or FSDP when the training asks), on the worker's devices only."""
        settings = self.worker.settings
        env = self.worker._child_env()
        processes = self.processes
        if processes == 1:
            return [sys.executable], env
        if not settings.devices:  # CPU processes: share the cores instead of each taking all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                "--num_processes", str(processes), "--main_process_port", str(_free_port()),
                "--dynamo_backend", "no"], env

    def _crashed(self, returncode: int) -> bool:
        """Whether the child died of a signal the system sends (not of its own error or success)."""
        progress = self.progress
        return (returncode < 0 and -returncode in CRASH_SIGNALS
                and progress.succeeded is None and progress.failed_error is None)

    def _watch(self, proc: subprocess.Popen) -> str | None:
        """Follow the child until it exits (None), or until the job is canceled, paused, lost, or
        the worker stops ("canceled", "paused", "lost", "released"), having dealt with each of those."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        worker = self.worker
        next_beat = time.monotonic() + worker.heartbeat_interval
        next_flush = time.monotonic()
        pausing_until: float | None = None  # asked to pause: the child checkpoints and stops by then
        with open(self.events_path, "rb") as events:
            while True:
                exited = proc.poll() is not None
                self.progress.feed_text(decoder.decode(events.read()))
                # Asked to pause, it may have finished (or failed) first: then that is its end.
                ended = self.progress.succeeded is not None or (self.progress.failed_error is not None
                                                                and self.progress.paused is None)
                if exited and (pausing_until is None or ended):
                    self._flush()
                    return None
                if pausing_until is not None and (exited or time.monotonic() >= pausing_until):
                    self._kill(proc)  # when it has not stopped in time: as it is, from its last checkpoint
                    self.progress.feed_text(decoder.decode(events.read()))
                    self._paused()
                    return "paused"
                if time.monotonic() >= next_flush:
                    self._flush()
                    next_flush = time.monotonic() + flush_interval(self._logs_bytes + self._metrics_bytes)
                if self.stop_event.is_set():
                    self._kill(proc)
                    self._flush()
                    self.store.release_training(self.id, worker.worker_id)
                    return "released"
                if time.monotonic() >= next_beat:
                    answer = self._heartbeat()
                    next_beat = time.monotonic() + worker.heartbeat_interval
                    if answer == "lost":
                        log.warning("worker %s: training %s was taken over; stopping it here",
                                    worker.worker_id, self.id)
                        self._kill(proc)
                        return "lost"
                    if answer == "pause" and pausing_until is None:
                        # The child saves a checkpoint after its current step and exits (PAUSED), so
                        # a resume goes on from that step. One that does not stop within
                        # PAUSE_GRACE is stopped as it is, and resumes from its newest checkpoint.
                        self.pause_path.touch()
                        pausing_until = time.monotonic() + PAUSE_GRACE
                        self.progress.note("pausing: saving a checkpoint after the current step")
                        self._flush()
                    if answer == "cancel":
                        self._kill(proc)
                        self.progress.feed_text(decoder.decode(events.read()))
                        self.progress.note("canceled")
                        self._flush()
                        self.store.finish_training(self.id, worker.worker_id, status="canceled")
                        return "canceled"
                time.sleep(POLL)

    def _paused(self) -> None:
        """Record the pause: where a resume goes on from, and the training's state."""
        last = [n for n in self.artifacts.checkpoint_names() if self.artifacts.checkpoint_complete(n)]
        if self.progress.paused:
            self.progress.note(f"paused after saving {self.progress.paused} (resumes from it)")
        else:
            self.progress.note("paused" + (f" (resumes from {last[-1]})" if last else
                                           " (no checkpoint yet: a resume starts over)"))
        self._flush()
        self.store.paused_training(self.id, self.worker.worker_id)

    def _heartbeat(self) -> str:
        try:
            return self.store.heartbeat(self.id, self.worker.worker_id, self.worker.lease_seconds)
        except Exception:  # a database hiccup: try again next time; the lease outlasts a few misses
            log.exception("worker %s: heartbeat for training %s failed", self.worker.worker_id, self.id)
            return "ok"

    def _flush(self) -> None:
        text, metrics = self.progress.take()
        if not (text or metrics):
            return
        try:
            self.store.append_training_logs(self.id, self.worker.worker_id, text, metrics=metrics)
        except Exception:  # a database hiccup must not cost the training: write it next time
            log.exception("worker %s: writing logs of training %s failed", self.worker.worker_id, self.id)
            self.progress.untake(text)
            return
        self._logs_bytes += len(text.encode())
        if metrics:
            self._metrics_bytes = len(json.dumps(metrics))

    def _finish(self, returncode: int, retries: int = 0) -> None:
        worker, progress = self.worker, self.progress
        if progress.succeeded is not None and returncode == 0:
            metrics: dict[str, Any] = {**progress.metrics(), **(progress.succeeded.get("metrics") or {})}
            if self.training.openai is not None:  # a fine-tuning job's results file, there when it succeeds
                self._save_results(metrics)
            checkpoints: list[str] = []
            if (self.training.input or {}).get("keep_checkpoints_as_versions"):
                checkpoints = [checkpoint_url(self.artifacts.url, name) for name in self.artifacts.checkpoint_names()
                               if self.artifacts.checkpoint_complete(name)]
            try:
                done = self.store.succeed_training(
                    self.id, worker.worker_id, run_url=self.artifacts.url,
                    weights_url=f"{self.store.base_url}/v1/trainings/{self.id}/weights", metrics=metrics,
                    checkpoint_urls=checkpoints)
            except LookupError as exc:
                self.store.finish_training(self.id, worker.worker_id, status="failed", error=str(exc))
                return
            if done is not None:
                log.info("worker %s: training %s succeeded: %s", worker.worker_id, self.id, done[0].output)
            return
        error = progress.failed_error or self._exit_reason(returncode)
        if retries and not progress.failed_error:
            error = f"{error} (after {retries} retries from the last checkpoint)"
        self.store.finish_training(self.id, worker.worker_id, status="failed", error=error)
        log.info("worker %s: training %s failed: %s", worker.worker_id, self.id, error)

    def _save_results(self, metrics: dict[str, Any]) -> None:
        from tunery.service.trainings import save_results

        try:
            save_results(self.store, self.worker.settings, self.training, metrics)
        except Exception:  # the storage went away: the training stands, without its results file
            log.exception("worker %s: saving the results file of training %s", self.worker.worker_id, self.id)

    def _exit_reason(self, returncode: int, *, tail: bool = True) -> str:
        """Why the child ended without a `failed` event: its signal or status, and the tail of its output."""
        try:
            text = self.output_path.read_bytes()[-2000:].decode("utf-8", errors="replace").strip() if tail else ""
        except OSError:
            text = ""
        if returncode < 0:
            name = signal.Signals(-returncode).name
            hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
            reason = f"the training process was killed by {name}{hint}"
        else:
            reason = f"the training process exited with status {returncode}"
        return f"{reason}: {text}" if text else reason

    def _kill(self, proc: subprocess.Popen) -> None:
        """Stop the child's whole process group if it still runs: SIGTERM, then SIGKILL for
        whatever is left after the grace period (processes the child started included)."""
        if proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.worker.kill_grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)  # the child leads its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
