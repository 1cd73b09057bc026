"""Untrusted python graders, run isolated: one process per grade, under bubblewrap.

What the grader's code gets, and nothing more:

- a new user, PID, network, IPC, UTS and mount namespace (bubblewrap `--unshare-all`): no
  network at all (not even the host's loopback), no other process to see or signal;
- a file system of the system's libraries and the Python installation, read-only, and an empty
  writable /tmp of `disk_bytes` (its working directory); the server's home, store, database,
  storage and users' files are not in it;
- an environment of PATH, HOME and LANG only: none of the server's variables (bubblewrap, the
  sandbox's PID 1 whose environment is readable inside, starts without them too);
- limits set before its source runs (graders/_runner.py): address space `memory_bytes`, CPU
  `seconds`, file size, 64 open files; a seccomp filter that refuses new processes (fork, clone
  without CLONE_THREAD, exec), sockets and namespace changes;
- a wall-clock limit: the whole sandbox (its PID namespace) is killed after `seconds` + 2.

The answer comes back on the runner's own file descriptor as one JSON line; what the grader
prints comes back capped. A grader that breaks a limit, raises, or returns anything but a finite
number scores 0 with the reason (`PythonResult.error`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from tunery.errors import TuneryError

RUNNER = Path(__file__).with_name("_runner.py")
#: The most source a python grader may have (OpenAI's limit is 256 KB).
MAX_SOURCE_BYTES = 256 * 1024
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt install bubblewrap; Fedora: dnf install bubblewrap)"


class SandboxUnavailable(TuneryError):
    """Python graders cannot run isolated on this machine (no bubblewrap, or no user namespaces)."""


@dataclass(frozen=True)
class Limits:
    seconds: float = 10.0
    memory_bytes: int = 1 << 30
    disk_bytes: int = 16 << 20


@dataclass
class PythonResult:
    score: float | None
    error: str | None = None
    kind: str | None = None  # "invalid" (the source), "runtime" (its run), "limit" (a limit it broke)
    output: str = ""
    seconds: float = 0.0


def _readable_roots() -> list[str]:
    """The folders the grader reads: the system's libraries, the Python installation and the
    environment's site-packages (numpy and the like; never the server's own folders)."""
    roots = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"]
    paths = {sys.base_prefix, sys.prefix, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
             *site.getsitepackages()}
    python = Path(sys.executable).resolve()
    paths.add(str(python.parent))
    found = [r for r in roots if os.path.lexists(r)]
    for p in sorted(paths):
        if p and os.path.isdir(p) and not any(p == r or p.startswith(r + "/") for r in found):
            found.append(p)
    return found


def _command(limits: Limits) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"python graders run isolated under bubblewrap, which is not installed: {INSTALL_HINT}")
    cmd = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--hostname", "grader",
           "--uid", "65534", "--gid", "65534", "--clearenv",
           "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
           "--setenv", "OMP_NUM_THREADS", "1", "--setenv", "OPENBLAS_NUM_THREADS", "1",
           "--proc", "/proc", "--dev", "/dev", "--size", str(limits.disk_bytes), "--tmpfs", "/tmp",
           "--chdir", "/tmp"]
    for root in _readable_roots():
        if os.path.islink(root):
            cmd += ["--symlink", os.readlink(root), root]
        else:
            cmd += ["--ro-bind", root, root]
    if os.path.isfile("/etc/ld.so.cache"):  # where the loader finds libseccomp; nothing else of /etc
        cmd += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    site_dirs = [p for p in site.getsitepackages() if os.path.isdir(p)]
    cmd += ["--ro-bind", str(RUNNER), "/grader/runner.py", "--", str(Path(sys.executable).resolve()), "-I", "-S",
            "-B", "-c", "import sys; sys.path[:0] = " + repr(site_dirs)
            + "; sys.argv = ['runner']; exec(open('/grader/runner.py').read())"]
    return cmd


@functools.lru_cache(maxsize=1)
def check_sandbox() -> None:
    """SandboxUnavailable, with the reason, when graders cannot run isolated here (tried once)."""
    result = run_python("def grade(sample, item):\n    return 1.0\n", {}, {}, Limits(seconds=30), _checked=True)
    if result.score != 1.0:
        raise SandboxUnavailable(f"python graders cannot run isolated on this machine: {result.error}; "
                                 "bubblewrap needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)")


def run_python(source: str, sample: dict, item: dict, limits: Limits = Limits(), *, check_only: bool = False,
               _checked: bool = False) -> PythonResult:
    """Run `grade(sample, item)` of `source` in its own sandbox; `check_only`: just load the source
    and check that it defines grade. Raises SandboxUnavailable when graders cannot be isolated."""
    if not _checked:
        check_sandbox()
    if len(source.encode()) > MAX_SOURCE_BYTES:
        return PythonResult(None, f"the source is {len(source.encode())} bytes, over the {MAX_SOURCE_BYTES} "
                            "allowed", "invalid")
    request = json.dumps({"source": source, "sample": sample, "item": item, "check_only": check_only,
                          "memory_bytes": limits.memory_bytes, "cpu_seconds": max(1, int(limits.seconds + 0.999)),
                          "file_bytes": limits.disk_bytes})
    started = time.monotonic()
    # bubblewrap itself starts with no server variables: it is PID 1 of the sandbox, and its
    # /proc/1/environ is readable from inside.
    proc = subprocess.Popen(_command(limits), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, env={"PATH": "/usr/bin:/bin"})
    try:
        out, err = proc.communicate(request.encode(), timeout=limits.seconds + 2)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return PythonResult(None, f"ran past its time limit of {limits.seconds:g} s", "limit",
                            seconds=time.monotonic() - started)
    seconds = time.monotonic() - started
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = _exit_reason(proc.returncode, err.decode(errors="replace"), limits)
        killed = proc.returncode < 0 or proc.returncode > 128
        return PythonResult(None, reason, "limit" if killed else "runtime", seconds=seconds)
    answer = json.loads(lines[-1])
    output = answer.get("output", "")
    if "error" in answer:
        return PythonResult(None, answer["error"], answer.get("kind", "runtime"), output, seconds)
    if check_only:
        return PythonResult(1.0, None, None, output, seconds)
    return PythonResult(answer["score"], None, None, output, seconds)


def _exit_reason(returncode: int, stderr: str, limits: Limits) -> str:
    import signal

    if returncode < 0 or returncode > 128:
        number = -returncode if returncode < 0 else returncode - 128
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        if name == "SIGXCPU":
            return f"used more than its {max(1, int(limits.seconds + 0.999))} s of CPU time"
        return f"was killed by {name}"
    tail = stderr.strip().splitlines()[-1:] or ["no output"]
    return f"the sandbox failed (exit {returncode}): {tail[0][:300]}"


def _kill(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
