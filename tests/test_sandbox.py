"""The code sandbox: each abuse is contained, scores 0, and the next normal run still passes."""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from dsjax.rl.sandbox import check_code, normalise_output, run_python

ADD_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4", "output": "6"}]
# Short limits keep the file quick on two cores.
FAST = dict(timeout_s=2.0, memory_mb=256)


def assert_still_works():
    """After any abuse, an ordinary program must run and score as usual."""
    assert check_code(ADD_PROGRAM, ADD_TESTS, **FAST) == 1.0


def process_count() -> int:
    return sum(name.isdigit() for name in os.listdir("/proc"))


def test_correct_solution_scores_one_and_wrong_scores_zero():
    assert check_code(ADD_PROGRAM, ADD_TESTS, **FAST) == 1.0
    assert check_code("a, b = map(int, input().split())\nprint(a - b)\n", ADD_TESTS, **FAST) == 0.0
    half = [ADD_TESTS[0], {"input": "1 1", "output": "3"}]
    assert check_code(ADD_PROGRAM, half, **FAST) == 0.5
    assert check_code("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\n", **FAST) == 1.0
    assert check_code("def add(a, b):\n    return a * b\n", "assert add(2, 3) == 5\n", **FAST) == 0.0
    assert check_code(ADD_PROGRAM, [], **FAST) == 0.0
    assert normalise_output("3  \n\n") == normalise_output("3")


def test_result_fields():
    result = run_python("import sys\nprint(input().upper())\nprint('oops', file=sys.stderr)\n", stdin="hi\n", **FAST)
    assert result.ok and result.reason == "ok" and result.returncode == 0 and not result.timed_out
    assert result.stdout == "HI\n" and "oops" in result.stderr
    assert result.isolation in ("netns", "userns+netns", "audit-hook")
    failed = run_python("raise ValueError('boom')", **FAST)
    assert not failed.ok and failed.reason == "exit 1" and "ValueError: boom" in failed.stderr
    assert "solution.py" in failed.stderr
    assert run_python("import sys; sys.exit(3)", **FAST).reason == "exit 3"


def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert time.monotonic() - start < 3.0
    assert result.timed_out and result.reason == "timeout" and not result.ok
    assert check_code("while True:\n    pass\n", ADD_TESTS[:1], timeout_s=1.0) == 0.0
    assert_still_works()


def test_cpu_time_limit():
    # A CPU limit below the wall-clock one: the kernel stops the program (SIGXCPU) first.
    result = run_python("while True:\n    pass\n", timeout_s=5.0, cpu_s=1)
    assert result.reason == "cpu_time" and not result.timed_out and result.wall_s < 4.0


def test_memory_bomb_fails():
    result = run_python("block = bytearray(10 * 2**30)\nprint('allocated')\n", **FAST)
    assert not result.ok and result.reason == "memory" and "allocated" not in result.stdout
    assert check_code("block = bytearray(10 * 2**30)\n" + ADD_PROGRAM, ADD_TESTS, **FAST) == 0.0
    assert_still_works()


def test_fork_bomb_is_blocked_before_the_first_fork():
    # Guard: a single fork whose child exits at once must already be refused; only then is the
    # real bomb (2**1000 processes if forks worked) worth running.
    probe = "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nprint('forked')\n"
    result = run_python(probe, **FAST)
    assert result.reason == "blocked" and "forked" not in result.stdout, result
    before = process_count()
    bomb = "import os\n[os.fork() for _ in range(1000)]\nprint(3)\n"
    result = run_python(bomb, **FAST)
    assert result.reason == "blocked" and "os.fork" in result.stderr
    assert check_code(bomb, ADD_TESTS[:1], **FAST) == 0.0
    for spawn in ("import subprocess\nsubprocess.run(['true'])\n", "import os\nos.system('true')\n",
                  "import os\nos.execv('/bin/true', ['true'])\n", "import _posixsubprocess\n"
                  "_posixsubprocess.fork_exec(*[None] * 23)\n", "import multiprocessing\nmultiprocessing.Pool(2)\n",
                  "import os\nos.posix_spawn('/bin/true', ['true'], {})\n", "import pty\npty.fork()\n"):
        result = run_python(spawn, **FAST)
        assert not result.ok and ("sandbox refused" in result.stderr), (spawn, result)
    assert process_count() <= before + 2  # the machine is fine: nothing left behind
    assert_still_works()


def test_write_outside_the_working_directory_is_refused():
    target = f"/tmp/dsjax-sandbox-escape-{uuid.uuid4().hex}"
    attempts = [f"open({target!r}, 'w').write('x')\n",
                f"import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))\n",
                f"import pathlib\npathlib.Path({target!r}).write_text('x')\n",
                f"import os\nos.mkdir({target!r})\n",
                f"import os\nfd = os.open('/tmp', os.O_RDONLY)\nos.mkdir({os.path.basename(target)!r}, dir_fd=fd)\n",
                f"import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')\n"]
    for code in attempts:
        result = run_python(code, **FAST)
        assert result.reason == "blocked", (code, result)
        assert not os.path.exists(target)
        assert check_code(code + "print(3)\n", ADD_TESTS[:1], **FAST) == 0.0
    # Writing inside its own working directory is fine, and the directory is removed afterwards.
    result = run_python("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\n", **FAST)
    assert result.ok and not os.path.exists(result.stdout.strip())
    assert_still_works()


def test_network_is_unreachable():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        connect = ("import socket\nconnection = socket.create_connection(('127.0.0.1', %d), timeout=1)\n"
                   "connection.sendall(b'hello')\nprint(3)\n" % port)
        result = run_python(connect, **FAST)
        assert not result.ok and "3" not in result.stdout
        assert check_code(connect, ADD_TESTS[:1], **FAST) == 0.0
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection ever reached the parent's listener
    finally:
        listener.close()
    outside = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1).close()\nprint(3)\n"
    assert check_code(outside, ADD_TESTS[:1], **FAST) == 0.0
    assert not run_python(outside, **FAST).ok
    assert_still_works()


def test_parent_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("DSJAX_SANDBOX_SECRET", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))\n", **FAST)
    assert result.ok and "DSJAX_SANDBOX_SECRET" not in result.stdout
    assert set(eval(result.stdout)) <= {"PATH", "HOME", "PYTHONDONTWRITEBYTECODE", "LC_CTYPE"}
    leak = "import os\nprint(os.environ['DSJAX_SANDBOX_SECRET'])\n"
    assert check_code(leak, [{"input": "", "output": "hunter2"}], **FAST) == 0.0
    # Nor through /proc: the parent's initial environment block is readable there for root.
    proc = "import os\nprint(open('/proc/%d/environ' % os.getppid()).read())\n"
    result = run_python(proc, **FAST)
    assert result.reason == "blocked" and "hunter2" not in result.stdout
    assert_still_works()


def test_output_flood_is_capped():
    result = run_python("while True:\n    print('x' * 10000)\n", timeout_s=5.0, file_size_mb=2,
                        max_output_bytes=1000)
    assert result.reason == "output_limit" and len(result.stdout) == 1000 and result.truncated
    assert_still_works()


def test_the_guard_cannot_be_lifted():
    for code in ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
                 "import ctypes\nctypes.CDLL('libc.so.6').fork()\n",
                 "import gc\ngc.get_objects()\n",
                 "import os\nos.kill(os.getppid(), 0)\n"):
        result = run_python(code, **FAST)
        assert result.reason == "blocked", (code, result)


def test_threads_when_allowed():
    # The deep-recursion idiom of competitive solutions: main() in a thread with a big stack.
    code = ("import sys, threading\nsys.setrecursionlimit(100000)\nthreading.stack_size(64 * 2**20)\n"
            "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
            "thread = threading.Thread(target=lambda: print(depth(20000)))\nthread.start()\nthread.join()\n")
    result = run_python(code, allow_threads=True, **FAST)
    assert result.ok and result.stdout == "20000\n", result
