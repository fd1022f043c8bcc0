"""Progress lines on stderr: items done/total, GB done/total, GB/s and ETA."""

from __future__ import annotations

import sys
import threading
import time


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Thread-safe progress of one phase. `stream=None` keeps it silent (the totals are still kept)."""

    def __init__(self, label: str, total_items: int, total_bytes: int, unit: str = "tensors", stream=sys.stderr,
                 interval: float | None = None):
        self.label, self.unit = label, unit
        self.total_items, self.total_bytes = total_items, total_bytes
        self.items = self.bytes = 0
        self.stream = stream
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self._tty else 10.0)
        self.start = time.monotonic()
        self._last = self.start
        self._lock = threading.Lock()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.bytes / elapsed
        eta = (self.total_bytes - self.bytes) / rate if rate > 0 else float("nan")
        div, unit = (1e9, "GB") if self.total_bytes >= 1e9 else (1e6, "MB")
        return (f"{self.label}: {self.items:,}/{self.total_items:,} {self.unit} | "
                f"{self.bytes / div:,.2f}/{self.total_bytes / div:,.2f} {unit} | {rate / 1e9:,.3f} GB/s | "
                f"elapsed {_duration(elapsed)} | ETA {_duration(eta)}")

    def update(self, items: int = 1, nbytes: int = 0) -> None:
        with self._lock:
            self.items += items
            self.bytes += nbytes
            now = time.monotonic()
            if self.stream is not None and now - self._last >= self.interval:
                self._last = now
                self._emit(final=False)

    def done(self) -> None:
        if self.stream is not None:
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.line() + (" | done" if final else "")
        if self._tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start
