"""Memory-mapped safetensors reading and atomic writing, with bf16 and fp8 via ml_dtypes.

The format: an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
raw little-endian tensor bytes. Reading maps the file, so a tensor costs memory only when used.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointFormatError(ValueError):
    """A checkpoint file or index that is malformed, truncated or inconsistent."""


class SafetensorsFile:
    """Lazy, read-only view of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointFormatError(f"{path}: truncated (no safetensors header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointFormatError(f"{path}: truncated (header of {header_len} bytes, file of {size})")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointFormatError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        self._entries = {}
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            dtype = DTYPES[info["dtype"]]
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise CheckpointFormatError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} {info['dtype']}")
            if self._data_start + end > size:
                raise CheckpointFormatError(
                    f"{path}: truncated: tensor {name!r} ends at byte {self._data_start + end}, file has {size}")
            self._entries[name] = (dtype, shape, begin)
        self._map = None

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name):
        return name in self._entries

    def shape(self, name) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name) -> np.dtype:
        return self._entries[name][0]

    def nbytes(self, name) -> int:
        dtype, shape, _ = self._entries[name]
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def read(self, name: str) -> np.ndarray:
        """The tensor copied into a fresh array with positioned reads (no memory map).

        Streaming converters use this: a map keeps every page it touched resident (and counted
        in the process's RSS) until it is closed, a copy is freed as soon as it is dropped."""
        dtype, shape, begin = self._entries[name]
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            offset, done = self._data_start + begin, 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise CheckpointFormatError(f"{self.path}: truncated while reading tensor {name!r}")
                done += n
        finally:
            os.close(fd)
        return out

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only array backed by the file (no copy until used)."""
        dtype, shape, begin = self._entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape, dtype=np.int64))
        start = self._data_start + begin
        return self._map[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def _header_bytes(path, entries, metadata) -> tuple[bytes, int]:
    header, offset = {}, 0
    for name, dtype, shape in entries:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype} that safetensors cannot store")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded, offset


def write_safetensors_stream(path: str, entries, tensors, metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file whose tensors arrive one at a time, atomically; returns bytes written.

    `entries` lists (name, dtype, shape) in file order; `tensors` yields the arrays in that order.
    Only one tensor is held at a time, so a shard larger than memory can be written."""
    entries = [(name, np.dtype(dtype), tuple(shape)) for name, dtype, shape in entries]
    head, data_bytes = _header_bytes(path, entries, metadata)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            iterator = iter(tensors)
            for name, dtype, shape in entries:
                array = next(iterator, None)
                if array is None:
                    raise ValueError(f"{path}: no data given for tensor {name!r}")
                array = np.ascontiguousarray(array)
                if array.dtype != dtype or tuple(array.shape) != shape:
                    raise ValueError(f"{path}: tensor {name!r} is {array.dtype} {tuple(array.shape)}, "
                                     f"the header says {dtype} {shape}")
                f.write(memoryview(array.reshape(-1).view(np.uint8)))
            if next(iterator, None) is not None:
                raise ValueError(f"{path}: more tensors given than the {len(entries)} entries")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return len(head) + data_bytes


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write tensors to `path` atomically (a temporary file renamed into place). Returns bytes written."""
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    entries = [(name, array.dtype, array.shape) for name, array in arrays.items()]
    return write_safetensors_stream(path, entries, arrays.values(), metadata)


class CheckpointReader:
    """All tensors of an HF checkpoint directory: `model.safetensors.index.json` + shards, or one file."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, self.INDEX)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        self.unindexed: dict[str, str] = {}
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointFormatError(f"{index_path}: not a safetensors index ({e!r})") from None
            for shard in sorted(set(weight_map.values())):
                shard_path = os.path.join(directory, shard)
                if not os.path.isfile(shard_path):
                    raise CheckpointFormatError(f"{index_path}: shard {shard!r} is missing from {directory}")
                self._files[shard] = SafetensorsFile(shard_path)
            for name, shard in weight_map.items():
                if name not in self._files[shard]:
                    raise CheckpointFormatError(f"{index_path}: tensor {name!r} is not in its shard {shard}")
                self._where[name] = shard
            # Tensors a shard holds that the index does not list (invisible to readers that trust the index).
            self.unindexed = {name: shard for shard, file in self._files.items()
                              for name in file.keys() if name not in self._where}
        else:
            shards = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not shards:
                raise FileNotFoundError(f"{directory}: no *.safetensors files and no {self.INDEX}")
            for shard in shards:
                self._files[shard] = SafetensorsFile(os.path.join(directory, shard))
                for name in self._files[shard].keys():
                    self._where[name] = shard

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name):
        return name in self._where

    def file_of(self, name: str) -> str:
        return os.path.join(self.directory, self._where[name])

    def shape(self, name):
        return self._files[self._where[name]].shape(name)

    def dtype(self, name):
        return self._files[self._where[name]].dtype(name)

    def nbytes(self, name) -> int:
        return self._files[self._where[name]].nbytes(name)

    def shards(self) -> list[str]:
        return list(self._files)

    def offset(self, name) -> tuple[str, int]:
        """(shard, byte offset) of a tensor: sorting by it reads the shards sequentially."""
        return self._where[name], self._files[self._where[name]]._entries[name][2]

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"{self.directory}: tensor {name!r} not found in the checkpoint")
        return self._files[self._where[name]].get(name)

    def read(self, name: str) -> np.ndarray:
        """Like `get`, but a private copy read without a memory map (see `SafetensorsFile.read`)."""
        if name not in self._where:
            raise KeyError(f"{self.directory}: tensor {name!r} not found in the checkpoint")
        return self._files[self._where[name]].read(name)
