"""Random-access document sources for grain.

Each source implements grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__`) and
returns one document as a `str`. Sources are cheap to construct (only an index is built), read
lazily, are safe to call from grain's reader threads, and pickle (for grain worker processes).

* `TextFileSource(paths)`: one document per file.
* `JsonlSource(paths, field="text")`: one document per non-blank line of JSON.
* `ArrayRecordSource(paths, field="text")`: one document per ArrayRecord record (raw UTF-8 text,
  or a JSON object holding `field`).
* `stdlib_source()`: the default corpus, the Python standard library's own `.py` files; it is on
  every machine without a download.
* `make_source(data_config)`: one of the above from `data_config.source` / `.paths` / `.field`.

`paths` is a glob pattern (`**` allowed), a comma-separated string of patterns, or a list of
patterns/paths; matches are sorted so the document order never depends on the file system.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from dsjax.tree import config_get

__all__ = [
    "TextFileSource",
    "JsonlSource",
    "ArrayRecordSource",
    "stdlib_source",
    "make_source",
    "expand_paths",
    "SOURCES",
]

SOURCES = ("stdlib", "text", "jsonl", "array_record")

# Subtrees of the standard library left out of the default corpus: third-party packages,
# the test suites (much generated/odd data) and the IDLE / 2to3 applications.
_STDLIB_EXCLUDE = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)

_GLOB_CHARS = frozenset("*?[")
_WHITESPACE = np.frombuffer(b" \t\r\n\f\v", dtype=np.uint8)


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike], *, what: str = "paths") -> list[str]:
    """Expands glob patterns into a sorted, de-duplicated list of existing files.

    A string may hold several comma-separated patterns. A pattern that matches no file is a
    `FileNotFoundError` naming it (`what` names the setting in the message).
    """
    if isinstance(paths, (str, os.PathLike)):
        patterns = [p.strip() for p in os.fspath(paths).split(",") if p.strip()]
    else:
        patterns = [os.fspath(p) for p in paths]
    if not patterns:
        raise ValueError(f"{what} is empty: give a glob pattern, a comma-separated list or a list of files")
    found: set[str] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if any(c in pattern for c in _GLOB_CHARS):
            matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
        else:
            matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            raise FileNotFoundError(f"{what}: no file matches {pattern!r}")
        found.update(matches)
    return sorted(found)


class _FileHandles:
    """Per-process cache of read-only file descriptors, read with `os.pread` (thread-safe)."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def pread(self, file_index: int, offset: int, length: int) -> bytes:
        fd = self._fds.get(file_index)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file_index)
                if fd is None:
                    fd = os.open(self._paths[file_index], os.O_RDONLY)
                    self._fds[file_index] = fd
        chunks = []
        while length > 0:
            chunk = os.pread(fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass

    # Descriptors do not travel to other processes: a copy reopens its files on demand.
    def __getstate__(self):
        return {"paths": self._paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])


class TextFileSource:
    """One document per file; files are read lazily as UTF-8 (undecodable bytes replaced)."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        self.paths: list[str] = expand_paths(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        with open(self.paths[index], "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"TextFileSource({len(self.paths)} files)"


def _line_spans(path: str, block_size: int = 1 << 24) -> np.ndarray:
    """`[n, 2]` int64 (start, end) byte offsets of the non-blank lines of a file.

    One streaming numpy pass: newline positions, and a running count of non-whitespace bytes
    taken at each newline, whose differences tell blank lines apart.
    """
    ends, counts = [], []  # newline offsets; non-whitespace bytes seen up to each newline
    total_nonws = 0
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(block_size)
            if not block:
                break
            arr = np.frombuffer(block, dtype=np.uint8)
            nonws = ~np.isin(arr, _WHITESPACE)
            nl = np.flatnonzero(arr == 0x0A)
            if nl.size:
                cum = np.cumsum(nonws, dtype=np.int64)
                ends.append(nl.astype(np.int64) + size)
                counts.append(cum[nl] + total_nonws)
            total_nonws += int(np.count_nonzero(nonws))
            size += len(block)
    ends_a = np.concatenate(ends) if ends else np.zeros((0,), np.int64)
    counts_a = np.concatenate(counts) if counts else np.zeros((0,), np.int64)
    last_end = int(ends_a[-1]) + 1 if ends_a.size else 0
    if last_end < size:  # a last line without a trailing newline
        ends_a = np.append(ends_a, size)
        counts_a = np.append(counts_a, total_nonws)
    if ends_a.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    starts_a = np.concatenate([[0], ends_a[:-1] + 1]).astype(np.int64)
    nonblank = np.diff(counts_a, prepend=0) > 0
    return np.stack([starts_a, ends_a], axis=1)[nonblank]


def _json_field(record: bytes | str, field: str, where: str) -> str:
    try:
        obj = json.loads(record)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if field not in obj:
        raise KeyError(f"{where}: JSON object has no field {field!r} (keys: {sorted(obj)[:10]})")
    value = obj[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is a {type(value).__name__}, not a string")
    return value


class JsonlSource:
    """One document per non-blank line of JSON-lines files: the string `obj[field]`.

    A byte-offset index of every line is built at construction (numpy scan of the files), so
    random access reads exactly one line.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], field: str = "text"):
        self.paths: list[str] = expand_paths(paths)
        self.field = field
        spans, file_ids = [], []
        for i, path in enumerate(self.paths):
            s = _line_spans(path)
            spans.append(s)
            file_ids.append(np.full(len(s), i, dtype=np.int32))
        self._spans = np.concatenate(spans) if spans else np.zeros((0, 2), np.int64)
        self._file_ids = np.concatenate(file_ids) if file_ids else np.zeros((0,), np.int32)
        self._files = _FileHandles(self.paths)

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, index: int) -> str:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"JsonlSource index {index} out of range [0, {len(self)})")
        start, end = (int(x) for x in self._spans[index])
        file_index = int(self._file_ids[index])
        line = self._files.pread(file_index, start, end - start)
        return _json_field(line, self.field, f"{self.paths[file_index]} (byte offset {start})")

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.paths)} files, {len(self)} lines, field={self.field!r})"


class ArrayRecordSource:
    """One document per ArrayRecord record.

    A record is either raw UTF-8 text, or a JSON object (UTF-8) from which `field` is taken.
    Reading goes through grain's `ArrayRecordDataSource` (the `array_record` package).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], field: str = "text"):
        self.paths: list[str] = expand_paths(paths)
        self.field = field
        try:
            from grain.sources import ArrayRecordDataSource
            import array_record.python.array_record_module  # noqa: F401  (fail early, clearly)
        except ImportError as e:
            raise ImportError(
                "ArrayRecordSource needs the `array_record` package (pip install array-record); "
                f"it could not be imported: {e}"
            ) from e
        self._source = ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        record = self._source[int(index)]
        if isinstance(record, str):
            record = record.encode("utf-8")
        head = record.lstrip()[:1]
        if head == b"{":
            try:
                obj = json.loads(record)
            except (json.JSONDecodeError, UnicodeDecodeError):
                obj = None  # raw text that merely starts with "{"
            if isinstance(obj, dict):
                return _json_field(record, self.field, f"ArrayRecord record {index} of {self.paths}")
        return record.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records, field={self.field!r})"


def stdlib_dir() -> str:
    """Directory of this interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_source() -> TextFileSource:
    """The default corpus: every `.py` file of the Python standard library.

    Third-party packages and the `test`/`tests`/`idlelib`/`lib2to3` subtrees are left out, so the
    corpus is ordinary library code. Paths are sorted, so the corpus is the same on every machine
    with the same Python version; nothing is downloaded.
    """
    root = stdlib_dir()
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Python standard library directory not found: {root!r}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDE]
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library directory {root!r}")
    return TextFileSource(sorted(files))


def _get(config: Any, key: str, default: Any) -> Any:
    value = config_get(config, key, default)
    return default if value is None else value


def make_source(data_config: Any) -> TextFileSource | JsonlSource | ArrayRecordSource:
    """Builds the document source that `data_config.source` names.

    `source`: "stdlib" (default corpus; `paths` ignored), "text", "jsonl" or "array_record";
    `paths`: glob pattern / comma-separated patterns / list of files; `field`: JSON field holding
    the text (jsonl, and JSON records of array_record).
    """
    kind = _get(data_config, "source", "stdlib")
    paths = _get(data_config, "paths", "")
    field = _get(data_config, "field", "text")
    if kind not in SOURCES:
        raise ValueError(f"data_config.source={kind!r} is not one of {list(SOURCES)}")
    if kind == "stdlib":
        return stdlib_source()
    if isinstance(paths, (str, os.PathLike)):
        empty = not os.fspath(paths).strip()
    else:
        paths = list(paths)
        empty = not paths
    if empty:
        raise ValueError(f"data_config.paths is empty but data_config.source={kind!r} needs files")
    try:
        expand_paths(paths, what="data_config.paths")  # error names the config key + pattern
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (data_config.source={kind!r})") from None
    if kind == "text":
        return TextFileSource(paths)
    if not isinstance(field, str) or not field:
        raise ValueError(f"data_config.field={field!r} must be a non-empty string")
    if kind == "jsonl":
        return JsonlSource(paths, field=field)
    return ArrayRecordSource(paths, field=field)
