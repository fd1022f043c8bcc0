"""Orbax PyTree checkpoints written and read one slice at a time.

Writing: a leaf is a `StreamedArray` (shape, dtype, and a function producing one slice of its
leading "stack" dims, e.g. one layer's expert `[D, F]` of a `[L, E, D, F]` kernel). A custom Orbax
`TypeHandler` creates each leaf's zarr array in the checkpoint's OCDBT store with one chunk (shard)
per slice, then produces the slices (a few at a time, in worker threads) and writes each into its
chunk, in an order the caller picks (the source files' byte order), with at most `inflight_bytes`
of produced slices queued in TensorStore. Orbax itself
writes `_METADATA` (type `np.ndarray`), merges the OCDBT files and commits, so the result is an
ordinary Orbax checkpoint: `ocp.StandardCheckpointer().restore(path)` or `PyTreeCheckpointer`
return the full pytree, and a restore onto a mesh reads only the chunks each device needs.

Reading: `OrbaxArrays` opens the arrays of any Orbax PyTree checkpoint (OCDBT or not, zarr2/3)
with TensorStore and reads chunk-aligned blocks, so a leaf never has to fit in memory.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import zlib
from typing import Any, Callable, Sequence

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from dsjax.convert import staging


class Cancelled(RuntimeError):
    pass


class StreamedArray:
    """A leaf written slice by slice: `produce(index)` returns the array `self[index]` for an index
    over the first `stack_ndim` dims. `order(index)` sorts the writes of all leaves (default: index)."""

    def __init__(self, shape, dtype, stack_ndim: int, produce: Callable[[tuple], np.ndarray],
                 order: Callable[[tuple], Any] | None = None, label: str = ""):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.stack_ndim = int(stack_ndim)
        self.produce = produce
        self.order = order or (lambda index: index)
        self.label = label
        self.checksums: dict[tuple, int] = {}  # crc32 of each written slice, for verification

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return self.shape[:self.stack_ndim]

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return self.shape[self.stack_ndim:]

    @property
    def write_shape(self) -> tuple[int, ...]:
        return (1,) * self.stack_ndim + self.slice_shape

    @property
    def slice_nbytes(self) -> int:
        return math.prod(self.slice_shape) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:  # Orbax logs this
        return math.prod(self.shape) * self.dtype.itemsize

    def __repr__(self):
        return f"StreamedArray({self.label or ''} {self.shape} {self.dtype})"


def checksum(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
    """Saves `StreamedArray` leaves; records them as `np.ndarray` so any Orbax restores them."""

    def __init__(self, inflight_bytes: int, workers: int):
        super().__init__(deepcopy_host_arrays=False)
        self._inflight_bytes = inflight_bytes
        self._workers = max(1, workers)

    async def serialize(self, values: Sequence[StreamedArray], infos, args=None):
        args = args or [ocp.type_handlers.SaveArgs()] * len(values)
        return [ocp.future.CommitFutureAwaitingContractedSignals(
            self._write_all(list(values), list(infos), list(args)), name="dsjax_streamed_write")]

    async def _write_all(self, values, infos, args):
        with staging.background_writer():
            stores = []
            for value, info, arg in zip(values, infos, args):
                await info.await_path_creation()
                ocdbt = bool(info.is_ocdbt_checkpoint)
                spec = ocp.type_handlers.get_json_tspec_write(
                    info, use_ocdbt=ocdbt, global_shape=value.shape, local_shape=value.write_shape,
                    dtype=value.dtype, process_index=0 if ocdbt else None, arg=arg)
                stores.append(await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context))
            jobs = sorted(((value.order(index), k, index) for k, value in enumerate(values)
                           for index in np.ndindex(*value.stack_shape)), key=lambda job: (job[0], job[1]))
            pending: collections.deque = collections.deque()  # writes handed to TensorStore
            producing: collections.deque = collections.deque()  # slices being made in worker threads
            pending_bytes = 0
            remaining = collections.deque(jobs)

            def start_more() -> None:
                # Up to `workers` slices at a time, but several only while they are small together.
                while remaining and len(producing) < self._workers:
                    _, k, index = remaining[0]
                    busy = sum(values[j].slice_nbytes for j, _, _ in producing)
                    if producing and busy + values[k].slice_nbytes > self._inflight_bytes:
                        return
                    remaining.popleft()
                    producing.append((k, index, asyncio.ensure_future(asyncio.to_thread(_produce, values[k], index))))

            try:
                start_more()
                while producing:
                    if staging.cancelled.is_set():
                        raise Cancelled("conversion cancelled")
                    k, index, task = producing.popleft()
                    array = await task
                    while pending and pending_bytes + array.nbytes > self._inflight_bytes:
                        future, nbytes = pending.popleft()
                        await future
                        pending_bytes -= nbytes
                    start_more()
                    write = stores[k][index].write(array, can_reference_source_data_indefinitely=True)
                    pending.append((write.commit, array.nbytes))
                    pending_bytes += array.nbytes
                    del array
                while pending:
                    await pending.popleft()[0]
            finally:
                # On an error, let the slices being made and the writes already handed to TensorStore
                # finish, so that nothing writes into the directory after the caller has deleted it.
                for *_, task in producing:
                    try:
                        await task
                    except Exception:  # noqa: BLE001 (the first error is the one reported)
                        pass
                for future, _ in pending:
                    try:
                        await future
                    except Exception:  # noqa: BLE001
                        pass


def _produce(value: StreamedArray, index: tuple) -> np.ndarray:
    array = np.ascontiguousarray(value.produce(index))
    if array.dtype != value.dtype or array.shape != value.slice_shape:
        raise AssertionError(f"{value.label}{list(index)}: produced {array.dtype} {array.shape}, "
                             f"expected {value.dtype} {value.slice_shape}")
    value.checksums[index] = checksum(array)
    return array


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def save_streamed(directory, tree, *, inflight_bytes: int = 128 << 20, workers: int | None = None) -> None:
    """Save a pytree whose leaves are `StreamedArray`s (or numpy arrays) as an Orbax checkpoint at
    `directory` (which must not exist). Blocks until committed.

    Memory: up to `workers` slices being produced (in threads; numpy and file reads release the
    GIL) plus up to `inflight_bytes` of produced slices queued in TensorStore (a slice larger than
    that is written alone), plus TensorStore's own bounded caches."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
        (StreamedArray, _StreamingHandler(inflight_bytes, workers or default_workers())),
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(epath.Path(directory), args=ocp.args.PyTreeSave(tree))


def save_arrays(directory, tree) -> None:
    """Save an ordinary pytree of numpy arrays as an Orbax checkpoint (small items such as scales)."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(epath.Path(directory), tree)


def _flatten_metadata(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten_metadata(value, prefix + (str(key),))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _flatten_metadata(value, prefix + (str(i),))
    elif tree is not None:
        yield prefix, tree


class OrbaxArrays:
    """The arrays of one Orbax PyTree checkpoint directory (an item such as `params/` or `state/`),
    opened lazily with TensorStore; nothing is read until `read`/`slices` is called."""

    def __init__(self, directory):
        self.directory = epath.Path(directory)
        handler = ocp.PyTreeCheckpointHandler()
        try:
            metadata = handler.metadata(self.directory)
        finally:
            handler.close()
        self.use_zarr3 = bool(getattr(metadata, "use_zarr3", False))
        self.ocdbt = bool(ocp.type_handlers.is_ocdbt_checkpoint(self.directory))
        self.leaves: dict[tuple[str, ...], Any] = {
            path: meta for path, meta in _flatten_metadata(metadata.tree)
            if hasattr(meta, "shape") and hasattr(meta, "dtype") and getattr(meta, "name", None)}
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self.ocdbt)
        self._stores: dict[tuple[str, ...], Any] = {}

    def shape(self, path) -> tuple[int, ...]:
        return tuple(self.leaves[tuple(path)].shape)

    def dtype(self, path) -> np.dtype:
        return np.dtype(self.leaves[tuple(path)].dtype)

    def store(self, path):
        path = tuple(path)
        if path not in self._stores:
            meta = self.leaves[path]
            info = ocp.type_handlers.ParamInfo(name=meta.name, parent_dir=self.directory,
                                               is_ocdbt_checkpoint=self.ocdbt, use_zarr3=self.use_zarr3,
                                               ts_context=self._context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self.ocdbt)
            self._stores[path] = ts.open(ts.Spec(spec), open=True, context=self._context).result()
        return self._stores[path]

    def read(self, path, index: tuple = ()) -> np.ndarray:
        return np.asarray(self.store(path)[tuple(index)].read().result())

    def block_shape(self, path, stack_ndim: int) -> tuple[int, ...]:
        """How many slices of the leading `stack_ndim` dims one chunk-aligned read covers."""
        chunk = self.store(path).chunk_layout.read_chunk.shape
        shape = self.shape(path)
        return tuple(max(1, min(int(c or s), s)) for c, s in zip(chunk[:stack_ndim], shape[:stack_ndim]))

    def slice_order(self, path, stack_ndim: int) -> list[tuple]:
        """The order `slices` yields indices in: chunk-aligned blocks, each in row-major order."""
        stack = self.shape(path)[:stack_ndim]
        block = self.block_shape(path, stack_ndim)
        order = []
        for start in np.ndindex(*[math.ceil(s / b) for s, b in zip(stack, block)]):
            lo = [i * b for i, b in zip(start, block)]
            hi = [min(l + b, s) for l, b, s in zip(lo, block, stack)]
            order.extend(tuple(l + o for l, o in zip(lo, offset))
                         for offset in np.ndindex(*[h - l for l, h in zip(lo, hi)]))
        return order

    def slices(self, path, stack_ndim: int):
        """Yields (index, slice) over the leading `stack_ndim` dims in `slice_order`, reading one
        chunk-aligned block at a time (a block holds whole chunks, so each chunk is decoded once)."""
        stack = self.shape(path)[:stack_ndim]
        block = self.block_shape(path, stack_ndim)
        store = self.store(path)
        for start in np.ndindex(*[math.ceil(s / b) for s, b in zip(stack, block)]):
            lo = [i * b for i, b in zip(start, block)]
            hi = [min(l + b, s) for l, b, s in zip(lo, block, stack)]
            data = np.asarray(store[tuple(slice(l, h) for l, h in zip(lo, hi))].read().result())
            for offset in np.ndindex(*data.shape[:stack_ndim]):
                yield tuple(l + o for l, o in zip(lo, offset)), data[offset]
            del data
