"""Turns a training's event stream into what the API shows: log lines and metrics.

Pure bookkeeping, no I/O: the worker feeds it events as it tails the child's event file, and
writes out what accumulated every so often.
"""

from __future__ import annotations

import json
from typing import Any

# The metrics' history is rewritten with every update; cap it so a long training stays cheap.
MAX_HISTORY = 2000
#: What a step's metrics keep beyond loss and learning rate: supervised tuning's token accuracy, DPO's (how often and by how much the
#: preferred answer wins) and GRPO's (the grader's mean score and spread, the share of prompts whose
#: answers all scored alike, the answers' length, the share the grader failed on); and each named
#: grader's score (grader_<name>).
METHOD_KEYS = ("token_accuracy", "reward_accuracy", "reward_margin", "reward_mean", "reward_std", "no_spread_share",
               "completion_length", "completion_clipped_share", "grader_failed_share", "kl")
HISTORY_KEYS = ("step", "loss", "val_loss", "learning_rate", "tokens_per_second", *METHOD_KEYS,
                *(f"val_{k}" for k in METHOD_KEYS))
#: Warnings kept for the API (the newest); the log has every one.
MAX_WARNINGS = 100


def method_values(event: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The method's metrics in a step (or, with prefix val_, a validation) event."""
    return {k: v for k, v in event.items()
            if (k.removeprefix(prefix) in METHOD_KEYS or k.removeprefix(prefix).startswith("grader_"))
            and k.startswith(prefix) and (prefix or not k.startswith("val_")) and isinstance(v, (int, float))}


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "?"


def step_line(event: dict) -> str:
    """"step 3/40 loss 1.234 lr 1.00e-04 12.3 tok/s" for a `step` event."""
    total = event.get("max_steps")
    line = f"step {event.get('step')}" + (f"/{total}" if total and total > 0 else "")
    line += f" loss {_num(event.get('loss'), '.4f')} lr {_num(event.get('learning_rate'), '.2e')}"
    if event.get("token_accuracy") is not None:
        line += f" acc {_num(event.get('token_accuracy'), '.3f')}"
    if event.get("reward_accuracy") is not None:
        line += f" reward acc {_num(event.get('reward_accuracy'), '.2f')} margin {_num(event.get('reward_margin'), '.3f')}"
    if event.get("reward_mean") is not None:
        line += (f" reward {_num(event.get('reward_mean'), '.3f')}±{_num(event.get('reward_std'), '.3f')}"
                 f" no-spread {_num(event.get('no_spread_share'), '.2f')}"
                 f" length {_num(event.get('completion_length'), '.0f')}")
    if event.get("tokens_per_second") is not None:
        line += f" {_num(event.get('tokens_per_second'), '.1f')} tok/s"
    return line


class Progress:
    """What the events of one training said so far: new log lines since the last `take()`, the
    latest metrics, and the history. `metrics` is the training's metrics from earlier attempts,
    so a resumed run continues them rather than starting over."""

    def __init__(self, metrics: dict[str, Any] | None = None):
        metrics = dict(metrics or {})
        self.history: dict[int, dict[str, Any]] = {
            int(h["step"]): dict(h) for h in metrics.pop("history", []) or [] if "step" in h
        }
        self.latest: dict[str, Any] = {k: v for k, v in metrics.items()
                                       if k in HISTORY_KEYS or k == "max_steps"}
        # The data statistics and the validation_prompt samples, for the dashboard.
        self.data: dict[str, Any] | None = metrics.get("data")
        self.samples: list[dict[str, Any]] = list(metrics.get("samples") or [])
        self.warnings: list[dict[str, Any]] = list(metrics.get("warnings") or [])
        self.lines: list[str] = []
        self.changed = False
        self.failed_error: str | None = None
        self.succeeded: dict[str, Any] | None = None
        self.paused: str | None = None  # the checkpoint a paused training saved last
        self._partial = ""

    def feed_text(self, text: str) -> None:
        """Feed raw bytes of the event file, decoded; a last line without its newline is kept
        for the next call (the child may be half-way through writing it)."""
        text = self._partial + text
        *complete, self._partial = text.split("\n")
        for line in complete:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self.feed(event)

    def feed(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "log":
            self.note(str(event.get("message", "")))
        elif kind == "warning":
            self.note(f"warning: {event.get('message', '')}")
            self.warnings.append({"time": event.get("time"), "step": self.latest.get("step"),
                                  "message": str(event.get("message", ""))})
            del self.warnings[:-MAX_WARNINGS]
        elif kind == "step":
            self._step(event)
            self.note(step_line(event))
        elif kind == "validation":
            self._record(event.get("step"), val_loss=event.get("val_loss"), **method_values(event, "val_"))
            acc = (f" reward acc {_num(event.get('val_reward_accuracy'), '.2f')}"
                   if event.get("val_reward_accuracy") is not None else "")
            self.note(f"step {event.get('step')} validation loss {_num(event.get('val_loss'), '.4f')}{acc}")
        elif kind == "sample":
            self.note(f"sample at step {event.get('step')}: {event.get('output', '')!r}")
            self.samples = [s for s in self.samples if s.get("step") != event.get("step")]
            self.samples.append({"step": event.get("step"), "output": event.get("output", "")})
            self.changed = True
        elif kind == "data":
            self.data = {k: v for k, v in event.items() if k not in ("type", "time")}
            self.changed = True
        elif kind == "checkpoint":
            self.note(f"saved checkpoint at step {event.get('step')}")
        elif kind == "paused":
            self.paused = event.get("checkpoint")
        elif kind == "failed":
            self.failed_error = str(event.get("error") or "training failed")
            self.note(f"failed: {self.failed_error}")
        elif kind == "eval":
            self.note(eval_line(event))
        elif kind == "succeeded":
            self.succeeded = event

    def note(self, text: str) -> None:
        """Add a log line of the worker's own."""
        self.lines.append(text)
        self.changed = True

    def _step(self, event: dict[str, Any]) -> None:
        step = event.get("step")
        if not isinstance(step, int):
            return
        # A resumed run repeats the steps after its checkpoint: forget what the lost run said of them.
        for later in [s for s in self.history if s > step]:
            del self.history[later]
        self._record(step, loss=event.get("loss"), learning_rate=event.get("learning_rate"),
                     tokens_per_second=event.get("tokens_per_second"), time=event.get("time"),
                     **method_values(event))
        if event.get("max_steps"):
            self.latest["max_steps"] = event["max_steps"]

    def _record(self, step: Any, **values: Any) -> None:
        if not isinstance(step, int):
            return
        entry = self.history.setdefault(step, {"step": step})
        entry.update({k: v for k, v in values.items() if v is not None})
        self.latest.update({"step": step, **{k: v for k, v in values.items() if v is not None}})
        if len(self.history) > MAX_HISTORY:
            del self.history[min(self.history)]
        self.changed = True

    def metrics(self) -> dict[str, Any]:
        """The metrics to merge into the training: latest values plus the history, oldest first."""
        extra: dict[str, Any] = {"data": self.data} if self.data is not None else {}
        if self.samples:
            extra["samples"] = self.samples[-20:]
        if self.warnings:
            extra["warnings"] = self.warnings
        return {**self.latest, **extra, "history": [self.history[s] for s in sorted(self.history)]}

    def take(self) -> tuple[str, dict[str, Any] | None]:
        """(new log text, metrics) since the last call; metrics None when nothing changed."""
        text = "".join(line + "\n" for line in self.lines)
        metrics = self.metrics() if self.changed else None
        self.lines.clear()
        self.changed = False
        return text, metrics

    def untake(self, text: str) -> None:
        """Put back what `take()` returned when it could not be written; the next take has it."""
        self.lines[:0] = text.splitlines()
        self.changed = True


def eval_line(event: dict[str, Any]) -> str:
    """One log line for the end-of-training evaluation: each metric as base → tuned."""
    cols = event.get("metrics") or {}
    base, tuned = cols.get("base", {}), cols.get("tuned", {})
    parts = []
    for name in ("loss", "exact_match", "rougeL", "preference_rate", "logp_margin"):
        if name in tuned:
            before = f"{_num(base.get(name), '.4f')} → " if name in base else ""
            parts.append(f"{name} {before}{_num(tuned[name], '.4f')}")
    return f"evaluation on {event.get('test_data')} ({event.get('rows')} rows): " + ", ".join(parts)
