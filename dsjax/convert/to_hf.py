"""dsjax Orbax checkpoint (converted, or a training run's params) -> official HF layout, streamed."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import json
import math
import os
import re
import sys
import time

import numpy as np

from dsjax.convert import layout
from dsjax.convert.fp8 import E4M3, all_finite, dequantize_kernel, quantize_fp8
from dsjax.convert.orbax_stream import default_workers
from dsjax.convert.progress import Progress
from dsjax.convert.staging import staged_directory
from dsjax.hf.checkpoint import SCALE_SUFFIX, CheckpointFormatError, FP8Format, check_names, check_tensors
from dsjax.hf.config import from_hf, to_hf
from dsjax.hf.names import MTP_SHARED_COPIES, leaf_maps
from dsjax.hf.safetensors_io import CheckpointReader, write_safetensors_stream

DTYPES = ("bfloat16", "float32")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)


def parse_size(text) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '123' -> 123 bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size such as 5GB or 500MB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if "I" in unit else 1000
    size = int(number * base ** powers[unit.rstrip("B").rstrip("I")])
    if size <= 0:
        raise ValueError(f"{text!r}: the shard size must be positive")
    return size


def _nbytes(dtype, shape) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _is_pow2(scale: np.ndarray) -> bool:
    mantissa, _ = np.frexp(scale)
    return bool(np.all(mantissa == 0.5))


def orbax_to_hf(ckpt: str, out: str, *, fp8: bool = False, dtype: str = "bfloat16", scale_fmt: str | None = None,
                max_shard_size="5GB", model_config: str | None = None, overwrite: bool = False,
                stream=sys.stderr, workers: int | None = None) -> dict:
    """Write the params of `ckpt` (a converted checkpoint, a training workdir or step dir) as an
    official-layout HF checkpoint at `out`; returns a summary. `fp8`: quantise exactly the tensors
    the official checkpoints quantise to E4M3 with 128x128 `weight_scale_inv` (FP8-kept inputs are
    passed through bit-exactly). Memory: `workers` tensors being converted (in threads) and the
    chunk-aligned block of the param they come from, whatever the model size."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {DTYPES}")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"--scale_fmt {scale_fmt!r}: expected 'ue8m0' or nothing")
    if scale_fmt and not fp8:
        raise ValueError("--scale_fmt needs --fp8")
    shard_limit = parse_size(max_shard_size)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(out)} already exists (pass --overwrite to replace it)")
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"{ckpt}: no such directory")
    started = time.monotonic()
    source = layout.ParamsSource(ckpt, model_config)
    config = source.config.copy_and_resolve_references()
    config.param_dtype = dtype
    maps = leaf_maps(config)
    fmt = FP8Format(scale_fmt=scale_fmt) if fp8 else None
    out_dtype = layout.np_dtype(dtype)

    # The plan: every output tensor in write order, grouped by the param it comes from.
    groups = []
    for leaf in maps:
        full = source.full(leaf.path)
        order = source.arrays.slice_order(full, leaf.stack_ndim)
        quantize = fmt is not None and leaf.fp8
        entries = []
        for index in order:
            name = str(leaf.hf_names[index])
            if quantize:
                rows, cols = leaf.hf_shape
                entries.append((name, E4M3, leaf.hf_shape))
                entries.append((name + SCALE_SUFFIX, np.dtype(np.float32),
                                (math.ceil(rows / fmt.block[0]), math.ceil(cols / fmt.block[1]))))
            else:
                entries.append((name, layout.leaf_dtype(leaf.path, dtype), leaf.hf_shape))
        groups.append((entries, leaf, quantize))
    by_path = {m.path: m for m in maps}
    for k in range(config.num_mtp_layers):
        for suffix, target in MTP_SHARED_COPIES.items():
            if target in by_path:
                name = f"model.layers.{config.num_layers + k}.{suffix}"
                groups.append(([(name, out_dtype, by_path[target].hf_shape)], by_path[target], False))
    entries = [entry for group in groups for entry in group[0]]
    weights = sum(1 for name, _, _ in entries if not name.endswith(SCALE_SUFFIX))
    total_bytes = sum(_nbytes(d, s) for _, d, s in entries)

    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = _nbytes(entry[1], entry[2])
        if current and size + nbytes > shard_limit:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current:
        shards.append(current)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    progress = Progress("orbax-to-hf", weights, total_bytes, stream=stream)
    arrays = _in_order(_jobs(source, groups, fmt, dtype, progress), workers or default_workers())
    with staged_directory(out, overwrite=overwrite) as tmp:
        weight_map = {}
        for shard_name, shard in zip(names, shards):
            write_safetensors_stream(os.path.join(tmp, shard_name), shard, itertools.islice(arrays, len(shard)),
                                     metadata={"format": "pt"})
            weight_map.update({name: shard_name for name, _, _ in shard})
        if next(arrays, None) is not None:
            raise AssertionError("more tensors produced than planned")
        progress.done()
        with open(os.path.join(tmp, CheckpointReader.INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
        hf_config = to_hf(config)
        if fmt is not None:
            hf_config["quantization_config"] = fmt.to_hf()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
            f.write("\n")
        _verify(tmp, config, hf_config, fmt, len(entries))
    summary = dict(out=os.path.abspath(out), tensors=len(entries), shards=len(shards), bytes=total_bytes,
                   seconds=time.monotonic() - started, source=source.description)
    if stream is not None:
        stream.write(f"orbax-to-hf: wrote {summary['out']} ({len(entries):,} tensors in {len(shards)} shard(s), "
                     f"{total_bytes / 1e9:,.2f} GB, {summary['seconds']:.1f} s) from {source.description}\n")
    return summary


def _jobs(source, groups, fmt, dtype, progress):
    """One callable per planned HF weight (returning it, and its scale when quantised), in plan
    order, reading one chunk-aligned block of one param at a time."""
    for entries, leaf, quantize in groups:
        full = source.full(leaf.path)
        src_fp8 = source.is_fp8(leaf.path)
        scales = source.scales.read(leaf.path) if src_fp8 else None
        target = layout.leaf_dtype(leaf.path, dtype)
        for index, data in source.arrays.slices(full, leaf.stack_ndim):
            name = entries[0][0] if len(entries) == 1 else str(leaf.hf_names[index])
            scale = scales[index] if src_fp8 else None
            yield functools.partial(_convert, leaf, data, scale, name, quantize, src_fp8, target, fmt,
                                    tuple(source.fp8_block), progress)


def _convert(leaf, data, scale, name, quantize, src_fp8, target, fmt, src_block, progress) -> list[np.ndarray]:
    if quantize and src_fp8 and src_block == tuple(fmt.block) and (fmt.scale_fmt is None or _is_pow2(scale)):
        # FP8-kept input, FP8 output: the very same bytes and scales.
        return _emit(progress, leaf.to_hf(data), np.ascontiguousarray(scale.T, dtype=np.float32))
    if src_fp8:
        data = dequantize_kernel(leaf, data, scale, src_block)
    if quantize:
        q, new_scale = quantize_fp8(leaf.to_hf(np.asarray(data, np.float32)), fmt.block, E4M3, fmt.scale_fmt)
        return _emit(progress, q, new_scale, check=data, name=name)
    tensor = leaf.to_hf(data).astype(target)
    return _emit(progress, tensor, check=tensor, name=name)


def _in_order(jobs, workers: int):
    """Runs the callables on `workers` threads (numpy releases the GIL), at most `workers` ahead,
    and yields their results' arrays in the original order."""
    if workers <= 1:
        for job in jobs:
            yield from job()
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dsjax-convert") as pool:
        queue = collections.deque()
        try:
            for job in jobs:
                queue.append(pool.submit(job))
                if len(queue) >= workers:
                    yield from queue.popleft().result()
            while queue:
                yield from queue.popleft().result()
        finally:
            for future in queue:
                future.cancel()


def _emit(progress, tensor, scale=None, check=None, name="") -> list[np.ndarray]:
    if check is not None and not all_finite(np.asarray(check)):
        raise CheckpointFormatError(f"{name}: the checkpoint holds NaN/inf values")
    progress.update(1, tensor.nbytes + (scale.nbytes if scale is not None else 0))
    return [tensor] if scale is None else [tensor, scale]


def _verify(tmp, config, hf_config, fmt, expected_count) -> None:
    """Re-read the written headers: every tensor of the model present (and nothing else), with the
    shape its config.json implies and a dtype it allows, and the config.json itself round-trips."""
    reader = CheckpointReader(tmp)
    again = from_hf(hf_config, source=os.path.join(tmp, "config.json"))
    again.num_mtp_layers = config.num_mtp_layers
    maps = leaf_maps(again)
    check_names(reader, again, maps)
    check_tensors(reader, maps, fmt, "config.json")
    if len(reader.names()) != expected_count:
        raise CheckpointFormatError(f"verification failed: {len(reader.names())} tensors written, expected {expected_count}")
    if [m.stack_shape + m.slice_shape for m in maps] != [m.stack_shape + m.slice_shape for m in leaf_maps(config)]:
        raise CheckpointFormatError("verification failed: the written config.json describes other shapes than the checkpoint")
