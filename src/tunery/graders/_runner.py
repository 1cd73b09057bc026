"""Runs one python grader inside the sandbox (graders/sandbox.py starts it under bubblewrap).

Trusted code: it reads the request from stdin, then, before the grader's source runs, sets the
process's limits (address space, CPU seconds, file size, open files) and loads a seccomp filter
that refuses new processes, sockets, exec and namespace changes. The answer, one JSON line, goes
to the stdout it kept aside; the grader's own prints go to a capped buffer that comes back as
its output."""

import io
import json
import math
import os
import resource
import sys


def _limit(request: dict) -> None:
    memory = int(request["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = int(request["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    disk = int(request["file_bytes"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (disk, disk))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _seccomp() -> None:
    import errno

    import pyseccomp as sc

    clone_thread = 0x00010000
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in ("fork", "vfork", "execve", "execveat", "socket", "socketpair", "ptrace", "unshare", "setns",
                 "mount", "umount2", "pivot_root", "chroot", "process_vm_writev", "process_vm_readv", "bpf",
                 "userfaultfd", "perf_event_open", "keyctl", "add_key", "request_key"):
        try:
            f.add_rule(deny, name)
        except Exception:  # a syscall this architecture does not have (fork on arm64, say)
            pass
    # New threads (numpy's) are allowed; new processes are not. clone3's flags live in memory the
    # filter cannot read: it answers "not implemented", and the C library falls back to clone.
    f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, clone_thread, 0))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.load()


def main() -> None:
    request = json.loads(sys.stdin.read())
    answer_fd = os.dup(1)
    os.dup2(2, 1)  # the grader's writes to fd 1 land with its stderr
    printed = io.StringIO()
    sys.stdout = sys.stderr = printed
    answer: dict = {}
    try:
        _limit(request)
        _seccomp()
        code = compile(request["source"], "<grader>", "exec")
        namespace: dict = {"__name__": "grader"}
        exec(code, namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            answer = {"error": "the source defines no function grade(sample, item)", "kind": "invalid"}
        elif request.get("check_only"):
            answer = {"ok": True}
        else:
            value = grade(request["sample"], request["item"])
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                answer = {"error": f"grade returned {type(value).__name__} {str(value)[:80]!r}, not a number",
                          "kind": "runtime"}
            elif not math.isfinite(value):
                answer = {"error": f"grade returned {value}, not a finite number", "kind": "runtime"}
            else:
                answer = {"score": float(value)}
    except SyntaxError as exc:
        answer = {"error": f"does not compile: line {exc.lineno}: {exc.msg}", "kind": "invalid"}
    except MemoryError:
        answer = {"error": f"ran out of memory (the limit is {int(request['memory_bytes']) >> 20} MiB)",
                  "kind": "limit"}
    except BaseException as exc:  # noqa: BLE001 - anything the grader raises is its own error
        answer = {"error": f"{type(exc).__name__}: {str(exc)[:500]}", "kind": "runtime"}
    answer["output"] = printed.getvalue()[-4000:]
    os.write(answer_fd, (json.dumps(answer) + "\n").encode())


if __name__ == "__main__":
    main()
