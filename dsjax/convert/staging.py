"""Write a directory next to its destination, then rename it into place; remove it on any error."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading

TMP_MARK = ".dsjax-tmp-"

# Set while a staging directory is being torn down: streaming writers stop at their next slice.
cancelled = threading.Event()
_writers = threading.Condition()
_active = 0


@contextlib.contextmanager
def background_writer():
    """Marks a thread that writes into a staging directory (Orbax commits in its own thread), so an
    abort waits for it before deleting the directory."""
    global _active
    with _writers:
        _active += 1
    try:
        yield
    finally:
        with _writers:
            _active -= 1
            _writers.notify_all()


def _wait_for_writers(timeout: float = 120.0) -> None:
    with _writers:
        _writers.wait_for(lambda: _active == 0, timeout=timeout)


def _check_destination(out: str, overwrite: bool) -> str:
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory")
    return out


@contextlib.contextmanager
def staged_directory(out: str, *, overwrite: bool = False):
    """Yields a fresh temporary directory beside `out`; on success it becomes `out` (atomically on
    POSIX: one rename), on any exception (KeyboardInterrupt included) it is deleted and `out` is
    left as it was."""
    out = _check_destination(out, overwrite)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}{TMP_MARK}", dir=parent)
    cancelled.clear()
    try:
        yield tmp
        if os.path.exists(out):  # overwrite: move the old one aside, put the new one in, drop the old
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(out, os.path.join(old, "previous"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        cancelled.set()
        _wait_for_writers()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
