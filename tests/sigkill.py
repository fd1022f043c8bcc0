"""Killing a training process with SIGKILL right after it saved a given checkpoint (resume tests)."""

import pathlib
import signal
import subprocess
import time

from dsjax import checkpoint as ckpt


def kill_once_saved(process: subprocess.Popen, step_dir: pathlib.Path, timeout_s: float = 300) -> tuple[bool, str]:
    """SIGKILL ``process`` as soon as the checkpoint ``step_dir`` is complete; returns (whether the
    process was still running at that moment, its output)."""
    deadline = time.time() + timeout_s
    while not (step_dir / ckpt.COMMIT_MARKER).exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    alive = process.poll() is None
    process.send_signal(signal.SIGKILL)
    return alive, process.communicate()[0]
