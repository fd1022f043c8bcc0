"""Run untrusted Python (model-written solutions) against tests, in a contained child process.

This is a reliability guard against accidents and the obvious abuses of generated code (infinite
loops, memory or disk bombs, fork bombs, stray writes, network calls, peeking at secrets); it is
NOT a security boundary. Run code you must not trust on a disposable VM or container.

Layers, applied by a bootstrap in the child before the user's code runs:
- its own process group and session; the parent kills the whole group at the wall-clock limit;
- rlimits: CPU seconds, address space, file size (which also caps stdout/stderr, both files),
  open files, core dumps, processes (RLIMIT_NPROC is not enforced for root, hence the next item;
  for other users it also stops threads, see `allow_threads`);
- a `sys.addaudithook` hook that refuses fork/exec/spawn/subprocess, sockets, ctypes, signals to
  other processes, raising rlimits, garbage-collector introspection (a way to reach the hook),
  writes, deletions or directory opens outside the working directory, and reads of other
  processes' /proc entries (e.g. the parent's environ); `_posixsubprocess.fork_exec`, which
  raises no audit event, is replaced by a stub;
- a new network namespace (only a loopback that is down) when the kernel permits unshare:
  `isolation` says "netns" (root or CAP_SYS_ADMIN), "userns+netns" (unprivileged user
  namespaces) or "audit-hook" (no namespace; sockets are refused by the hook only);
- `python -I -S -B -X utf8` (isolated mode, no site-packages unless asked, no .pyc writes), a
  fresh temporary working directory removed afterwards, and an environment of PATH, HOME (the
  working directory) and PYTHONDONTWRITEBYTECODE only.
Known gaps: reads anywhere the user may read are allowed (the stdlib must be importable); CPython
internals (e.g. frame introspection) can in principle reach and disable the hook; the rlimits,
the namespace and the wall-clock kill are enforced by the kernel and the parent regardless.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

SOLUTION_FILE = "solution.py"
VIOLATION_MARKER = "SandboxViolation"

# The child's bootstrap, given to `python -c`. argv: status fd, cpu_s, memory bytes, file bytes,
# whether to limit processes (RLIMIT_NPROC = 0).
# It runs before any user code, sets every limit, reports the isolation level on the status pipe,
# closes that pipe, then executes solution.py as __main__.
_BOOTSTRAP = r'''
import os, sys
status_fd, cpu_s, memory_bytes, file_bytes, limit_processes = (int(a) for a in sys.argv[1:6])
sys.argv = ["solution.py"]

def _isolate_network():
    """Enter a new network namespace if the kernel allows it; return the level reached."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except Exception:
        return "audit-hook"
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    if libc.unshare(clone_newnet) == 0:
        return "netns"
    # Unprivileged users may still own a user namespace, and a network namespace inside it.
    if libc.unshare(clone_newuser | clone_newnet) == 0:
        return "userns+netns"
    return "audit-hook"

isolation = _isolate_network() if sys.platform.startswith("linux") else "audit-hook"

import resource
def _limit(kind, soft, hard=None):
    hard = soft if hard is None else hard
    try:
        resource.setrlimit(kind, (soft, hard))
    except (ValueError, OSError):
        pass
# SIGXCPU at the soft limit (Python does not catch it), SIGKILL a second later.
_limit(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)
_limit(resource.RLIMIT_AS, memory_bytes)
_limit(resource.RLIMIT_FSIZE, file_bytes)
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NOFILE, 256)
if limit_processes:
    _limit(resource.RLIMIT_NPROC, 0)  # for non-root users this forbids threads too

import _posixsubprocess, traceback, types

def _install_guard(workdir, own_pid):
    """Audit hook that refuses what a solution has no business doing; see the module docstring."""
    path_events = {  # event -> (indices of path arguments, indices of dir_fd arguments)
        "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.link": ((0, 1), (2, 3)),
        "os.mkdir": ((0,), (2,)), "os.remove": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
        "os.rmdir": ((0,), (1,)), "os.symlink": ((1,), (2,)), "os.truncate": ((0,), ()),
        "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
        "shutil.rmtree": ((0,), (1,)), "shutil.copyfile": ((1,), ()), "shutil.copytree": ((1,), ()),
        "shutil.move": ((0, 1), ()), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
    }
    refused = ("os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.system", "os.spawn",
               "subprocess.Popen", "pty.spawn", "os.setns", "os.unshare", "resource.setrlimit",
               "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
               "sys.remote_exec")
    refused_prefixes = ("socket.", "ctypes.")
    refused_imports = ("_posixsubprocess", "_ctypes")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    proc_self = ("/proc/%d" % own_pid, "/proc/self", "/proc/thread-self")

    class SandboxViolation(PermissionError):
        pass

    def resolve(path):
        path = os.fsdecode(os.fspath(path))
        return os.path.realpath(os.path.join(os.getcwd(), path))

    def inside(resolved):
        return resolved == workdir or resolved.startswith(workdir + os.sep)

    def refuse(event, detail=""):
        raise SandboxViolation("sandbox refused %s%s" % (event, detail))

    def check_open(event, args):
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        if isinstance(path, int) or path is None:
            return  # an already open descriptor: its own open was checked
        resolved = resolve(path)
        if inside(resolved):
            return
        writing = isinstance(flags, int) and flags & write_flags
        writing = writing or (isinstance(mode, str) and any(c in mode for c in "wax+"))
        if writing:
            refuse(event, " for writing outside the working directory: %r" % (path,))
        if os.path.isdir(resolved):
            # A descriptor of an outside directory would let dir_fd= calls write there.
            refuse(event, " of a directory outside the working directory: %r" % (path,))
        parts = resolved.split("/")
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != own_pid:
            refuse(event, " of another process's /proc entry: %r" % (path,))

    def hook(event, args):
        if event == "open":
            check_open(event, args)
        elif event in path_events:
            path_indices, dir_fd_indices = path_events[event]
            for i in dir_fd_indices:
                if i < len(args) and args[i] is not None and args[i] != -1:
                    refuse(event, " with dir_fd")
            for i in path_indices:
                if i < len(args) and not isinstance(args[i], int) and not inside(resolve(args[i])):
                    refuse(event, " outside the working directory: %r" % (args[i],))
        elif event in refused or event.startswith(refused_prefixes):
            refuse(event)
        elif event == "import" and args and args[0] in refused_imports:
            refuse(event, " of %s" % args[0])
        elif event == "os.kill" and args[0] not in (own_pid, 0):
            refuse(event, " of another process")
        elif event == "os.killpg" and args[0] not in (os.getpgrp(), 0):
            refuse(event, " of another process group")

    sys.addaudithook(hook)
    return SandboxViolation

def _no_fork_exec(*args, **kwargs):
    raise PermissionError("sandbox refused _posixsubprocess.fork_exec")
_posixsubprocess.fork_exec = _no_fork_exec  # raises no audit event of its own

with open(SOLUTION_FILE_NAME, "rb") as f:
    source = f.read()
violation = _install_guard(os.path.realpath(os.getcwd()), os.getpid())
violation.__module__ = "sandbox"
violation.__qualname__ = violation.__name__ = "SandboxViolation"
os.write(status_fd, isolation.encode())
os.close(status_fd)

main = types.ModuleType("__main__")
main.__file__ = "solution.py"
main.__builtins__ = __builtins__
sys.modules["__main__"] = main
del _isolate_network, _install_guard, _limit
try:
    exec(compile(source, "solution.py", "exec"), main.__dict__)
except SystemExit:
    raise
except BaseException as error:
    # Drop the bootstrap's own frame from the traceback.
    traceback.print_exception(type(error), error, error.__traceback__.tb_next)
    sys.exit(1)
'''.replace("SOLUTION_FILE_NAME", repr(SOLUTION_FILE))


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one `run_python` call.

    reason: "ok", "timeout" (wall clock), "cpu_time", "memory", "output_limit", "blocked" (the
    guard refused an action and the program failed), "exit <code>", "signal <NAME>" or
    "setup_failed" (the bootstrap itself failed; see stderr). isolation: "netns",
    "userns+netns", "audit-hook" or "none" (bootstrap never got that far).
    """

    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    reason: str
    isolation: str = "none"
    wall_s: float = 0.0
    truncated: bool = False


def run_python(code: str, *, stdin: str = "", timeout_s: float = 5.0, cpu_s: float | None = None,
               memory_mb: int = 512, file_size_mb: int = 16, max_output_bytes: int = 1 << 20,
               site_packages: bool = False, allow_threads: bool = False, python: str | None = None) -> SandboxResult:
    """Run `code` as a Python program in the sandbox and return what happened.

    timeout_s: wall-clock limit, after which the process group is killed. cpu_s: RLIMIT_CPU in
    whole seconds (default ceil(timeout_s)). memory_mb: RLIMIT_AS. file_size_mb: RLIMIT_FSIZE,
    also the most the program may print (stdout and stderr are files). At most max_output_bytes
    of each stream come back (`truncated` says if more was written). site_packages: let the
    program import installed packages (off: the standard library only). allow_threads: skip
    RLIMIT_NPROC = 0, which for non-root users also stops threads (root ignores it, and forks
    stay refused by the audit hook either way); some solutions run main() in a thread for a
    bigger stack. python: the interpreter, by default this one.
    """
    cpu_limit = max(1, math.ceil(timeout_s if cpu_s is None else cpu_s))
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="dsjax-sandbox-"))
    status_read, status_write = os.pipe()
    process = None
    start = time.monotonic()
    try:
        with open(os.path.join(workdir, SOLUTION_FILE), "w", encoding="utf-8") as f:
            f.write(code)
        flags = ["-I", "-B", "-X", "utf8"] + ([] if site_packages else ["-S"])
        argv = [python or sys.executable, *flags, "-c", _BOOTSTRAP, str(status_write), str(cpu_limit),
                str(memory_mb << 20), str(file_size_mb << 20), str(int(not allow_threads))]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "PYTHONDONTWRITEBYTECODE": "1"}
        # Unnamed temporary files: nothing for the program to find by path, and no pipe that a
        # print loop could fill faster than we drain it (RLIMIT_FSIZE bounds them instead).
        with tempfile.TemporaryFile() as stdin_file, tempfile.TemporaryFile() as out_file, \
                tempfile.TemporaryFile() as err_file:
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
            process = subprocess.Popen(argv, stdin=stdin_file, stdout=out_file, stderr=err_file, cwd=workdir,
                                       env=env, close_fds=True, pass_fds=(status_write,), start_new_session=True)
            os.close(status_write)
            status_write = -1
            timed_out = False
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process.pid)
                returncode = process.wait()
            wall_s = time.monotonic() - start
            stdout, out_size = _read_capped(out_file, max_output_bytes)
            stderr, err_size = _read_capped(err_file, max_output_bytes)
        isolation = os.read(status_read, 64).decode(errors="replace") or "none"
    finally:
        if process is not None and process.poll() is None:
            _kill_group(process.pid)
            process.wait()
        for fd in (status_read, status_write):
            if fd >= 0:
                os.close(fd)
        _remove_tree(workdir)
    reason = _reason(returncode, timed_out, stderr, isolation, max(out_size, err_size) >= file_size_mb << 20)
    return SandboxResult(ok=reason == "ok", returncode=returncode, stdout=stdout, stderr=stderr, timed_out=timed_out,
                         reason=reason, isolation=isolation, wall_s=wall_s,
                         truncated=max(out_size, err_size) > max_output_bytes)


def _kill_group(pid: int) -> None:
    """SIGKILL the session's process group (its leader's pid); gone already is fine."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(file: Any, limit: int) -> tuple[str, int]:
    """The first `limit` bytes of a file as text, and the file's full size."""
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    return file.read(limit).decode("utf-8", errors="replace"), size


def _remove_tree(path: str) -> None:
    """Remove the working directory even if the program made parts of it read-only."""
    def make_writable_and_retry(function, failed_path, _):
        parent = os.path.dirname(failed_path)
        for p in (parent, failed_path):
            try:
                os.chmod(p, stat.S_IRWXU)
            except OSError:
                pass
        try:
            function(failed_path)
        except OSError:
            pass
    shutil.rmtree(path, onerror=make_writable_and_retry)


def _reason(returncode: int | None, timed_out: bool, stderr: str, isolation: str, output_full: bool) -> str:
    if timed_out:
        return "timeout"
    if isolation == "none":
        return "setup_failed"
    if returncode == 0:
        return "ok"
    if returncode is not None and returncode < 0:
        signal_number = -returncode
        if signal_number in (signal.SIGXCPU, signal.SIGKILL):
            return "cpu_time"  # the parent only sends SIGKILL on timeout, handled above
        if signal_number == signal.SIGXFSZ:
            return "output_limit"
        return f"signal {signal.Signals(signal_number).name}"
    tail = stderr[-4000:]
    if "MemoryError" in tail:
        return "memory"
    if output_full or "File too large" in tail:
        return "output_limit"
    if VIOLATION_MARKER in tail or "sandbox refused" in tail:
        return "blocked"
    return f"exit {returncode}"


def normalise_output(text: str) -> str:
    """Judge-style comparison form: trailing spaces of each line and trailing blank lines dropped."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def check_code(code: str, tests: Sequence[Mapping[str, Any]] | str, *, timeout_s: float = 5.0,
               stop_on_failure: bool = False, **run_options: Any) -> float:
    """Score `code` in [0, 1] against tests, each run in its own sandbox.

    tests: a list of {"input": stdin text, "output": expected stdout} (score: the share passed;
    outputs compare after `normalise_output`), or a string of assert-based test code appended
    to the program and run once (score 1 or 0). An empty list scores 0. stop_on_failure skips
    the remaining tests after the first failure (a cheaper, lower score). run_options go to
    `run_python`.
    """
    if isinstance(tests, str):
        result = run_python(code + "\n\n" + tests + "\n", timeout_s=timeout_s, **run_options)
        return 1.0 if result.ok else 0.0
    tests = list(tests)
    if not tests:
        return 0.0
    passed = 0
    for test in tests:
        result = run_python(code, stdin=str(test.get("input", "")), timeout_s=timeout_s, **run_options)
        if result.ok and normalise_output(result.stdout) == normalise_output(str(test.get("output", ""))):
            passed += 1
        elif stop_on_failure:
            break
    return passed / len(tests)
