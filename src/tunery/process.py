"""What every tunery entry point does to its own process (the CLI, the worker's training child)."""

from __future__ import annotations

import atexit
import gc


def freeze_at_exit() -> None:
    """Make this process's exit skip the interpreter's final garbage collection over the objects
    alive then (`gc.freeze`, registered now, runs after the exit handlers registered later). With
    torch, transformers and peft loaded that collection took 1.3 s of a command's 1.8 s exit, and
    a worker waits for its training's child process to end; nothing it would free matters once
    the process ends (open files are flushed and closed regardless). For entry points only."""
    atexit.register(gc.freeze)
