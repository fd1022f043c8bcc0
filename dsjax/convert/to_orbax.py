"""HF checkpoint directory -> dsjax Orbax checkpoint, streamed slice by slice (see `dsjax.convert`)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import numpy as np

from dsjax.convert import layout
from dsjax.convert.fp8 import E4M3, FP8_DTYPES, all_finite, has_nan_fp8
from dsjax.convert.orbax_stream import OrbaxArrays, StreamedArray, checksum, save_arrays, save_streamed
from dsjax.convert.progress import Progress
from dsjax.convert.staging import staged_directory
from dsjax.hf.checkpoint import (SCALE_SUFFIX, CheckpointFormatError, check_names, check_tensors, fp8_format,
                                 read_tensor, resolve_mtp_layers)
from dsjax.hf.config import from_hf, read_hf_config, to_hf
from dsjax.hf.names import leaf_maps, mtp_shared_copy_names
from dsjax.hf.safetensors_io import CheckpointReader
from dsjax.tree import dict_paths

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")


class MeshNotSupportedError(NotImplementedError):
    pass


def parse_mesh(spec: str | None) -> dict[str, int]:
    """`"expert=4,data=2"` -> {"expert": 4, "data": 2}. Only a single-host, single-device conversion
    (no mesh, or every axis of size 1) is implemented; anything else raises MeshNotSupportedError."""
    if not spec:
        return {}
    axes = {}
    for part in spec.split(","):
        name, sep, size = part.strip().partition("=")
        if not sep or not name.isidentifier() or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {spec!r}: expected comma-separated AXIS=SIZE pairs such as 'expert=4,data=2'")
        if name in axes:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} given twice")
        axes[name] = int(size)
    if math.prod(axes.values()) > 1:
        raise MeshNotSupportedError(
            f"--mesh {spec}: converting onto a multi-device mesh is not implemented yet; this version converts on "
            "one host with the single-device default. Its output does not depend on the mesh: every layer (and "
            "expert) slice is its own chunk, so Orbax restores it onto any mesh/sharding you pass at load time. "
            "Omit --mesh (or give every axis size 1).")
    return axes


def _check_shared_copies(reader, config, maps) -> None:
    by_path = {m.path: m for m in maps}
    for name, target in mtp_shared_copy_names(config).items():
        if name in reader and target in by_path and tuple(reader.shape(name)) != by_path[target].hf_shape:
            raise CheckpointFormatError(f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(reader.shape(name))}, "
                                        f"but it copies {'/'.join(target)} of shape {by_path[target].hf_shape}")


def hf_to_orbax(hf_dir: str, out: str, *, dtype: str = "bfloat16", keep_fp8: bool = False, mesh: str | None = None,
                verify: str = "full", overwrite: bool = False, stream=sys.stderr,
                inflight_bytes: int = 128 << 20, workers: int | None = None) -> dict:
    """Convert the HF checkpoint `hf_dir` into a dsjax Orbax checkpoint at `out`; returns a summary.

    Memory: `workers` source tensors (each with its dequantised and converted copies) at a time,
    plus at most `inflight_bytes` of converted slices queued for TensorStore, plus TensorStore's
    bounded caches: a small multiple of the largest tensor, whatever the model size. Nothing is
    written to `out` unless the whole conversion and its verification succeed."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {DTYPES}")
    if verify not in ("full", "quick"):
        raise ValueError(f"verify={verify!r}: expected 'full' or 'quick'")
    parse_mesh(mesh)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(out)} already exists (pass --overwrite to replace it)")
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: no such directory")
    started = time.monotonic()
    config_path = os.path.join(hf_dir, "config.json")
    hf_config = read_hf_config(hf_dir)
    fp8 = fp8_format(hf_config, config_path)
    config = from_hf(hf_config, source=config_path, param_dtype=dtype)
    reader = CheckpointReader(hf_dir)
    resolve_mtp_layers(reader, config, hf_config)
    maps = leaf_maps(config)
    check_names(reader, config, maps)
    check_tensors(reader, maps, fp8, config_path)
    _check_shared_copies(reader, config, maps)
    if keep_fp8 and not any(reader.dtype(str(n)) in FP8_DTYPES for m in maps for n in m.hf_names.flat):
        raise CheckpointFormatError(f"--keep_fp8: {hf_dir} has no FP8 weights to keep "
                                    f"({config_path} declares {'no' if fp8 is None else 'a'} quantization_config)")
    block = fp8.block if fp8 is not None else (128, 128)
    shards = {shard: i for i, shard in enumerate(sorted(reader.shards()))}

    def tensor_bytes(name):
        return reader.nbytes(name) + (reader.nbytes(name + SCALE_SUFFIX) if name + SCALE_SUFFIX in reader else 0)

    total_tensors = sum(m.hf_names.size for m in maps)
    total_bytes = sum(tensor_bytes(str(n)) for m in maps for n in m.hf_names.flat)
    progress = Progress("hf-to-orbax", total_tensors, total_bytes, stream=stream)
    scales: dict = {}
    kept: list[str] = []
    tree: dict = {}
    streamed: dict[tuple, StreamedArray] = {}
    for leaf in maps:
        names = [str(n) for n in leaf.hf_names.flat]
        keep = keep_fp8 and leaf.in_dims > 0 and all(reader.dtype(n) in FP8_DTYPES for n in names)
        if keep_fp8 and leaf.in_dims > 0 and not keep and any(reader.dtype(n) in FP8_DTYPES for n in names):
            log.warning("%s: some but not all slices are FP8; storing it dequantised", "/".join(leaf.path))
        if keep:
            leaf_dtype = reader.dtype(names[0])
            in_size, out_size = leaf.in_out_sizes
            grid = (math.ceil(in_size / block[1]), math.ceil(out_size / block[0]))
            scales_leaf = np.zeros(leaf.stack_shape + grid, np.float32)
            layout._set(scales, leaf.path, scales_leaf)  # noqa: SLF001
            kept.append("/".join(leaf.path))
        else:
            leaf_dtype = layout.leaf_dtype(leaf.path, dtype)
            scales_leaf = None
        array = StreamedArray(leaf.stack_shape + leaf.slice_shape, leaf_dtype, leaf.stack_ndim,
                              _producer(reader, leaf, leaf_dtype, scales_leaf, block, progress, tensor_bytes),
                              order=lambda index, leaf=leaf: _source_order(reader, shards, leaf, index),
                              label="/".join(leaf.path))
        streamed[leaf.path] = array
        layout._set(tree, leaf.path, array)  # noqa: SLF001

    with staged_directory(out, overwrite=overwrite) as tmp:
        save_streamed(os.path.join(tmp, layout.PARAMS_ITEM), tree, inflight_bytes=inflight_bytes, workers=workers)
        progress.done()
        if scales:
            save_arrays(os.path.join(tmp, layout.SCALES_ITEM), scales)
        info = {
            "format": layout.FORMAT_NAME, "version": layout.FORMAT_VERSION,
            "created_by": "python -m dsjax.convert hf-to-orbax", "source": os.path.abspath(hf_dir),
            "param_dtype": dtype, "num_param_leaves": len(maps), "num_hf_tensors": total_tensors,
            "source_bytes": total_bytes,
            "fp8": None if not kept else {
                "leaves": kept, "dtype": str(E4M3 if fp8 is None else fp8.dtype), "block_size": list(block),
                "scale_fmt": None if fp8 is None else fp8.scale_fmt,
                "scale_layout": "per slice [ceil(in/block[1]), ceil(out/block[0])]: the kernel viewed as [in, out] "
                                "is q[i, o] * scale[i // block[1], o // block[0]] (HF's weight_scale_inv transposed)"},
        }
        _write_json(os.path.join(tmp, layout.INFO_FILE), info)
        _write_json(os.path.join(tmp, layout.MODEL_CONFIG_FILE), config.to_dict())
        hf_out = to_hf(config)
        if kept:
            hf_out["quantization_config"] = fp8.to_hf()
        _write_json(os.path.join(tmp, "config.json"), hf_out)
        verified = _verify(tmp, maps, streamed, scales, verify, stream)
    summary = dict(out=os.path.abspath(out), tensors=total_tensors, leaves=len(maps), source_bytes=total_bytes,
                   seconds=time.monotonic() - started, fp8_leaves=len(kept), verified=verified)
    if stream is not None:
        stream.write(f"hf-to-orbax: wrote {summary['out']} ({len(maps)} param leaves from {total_tensors:,} HF tensors, "
                     f"{total_bytes / 1e9:,.2f} GB read, {summary['seconds']:.1f} s, "
                     f"{total_bytes / 1e9 / max(summary['seconds'], 1e-9):.2f} GB/s overall)\n")
    return summary


def _write_json(path, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _source_order(reader, shards, leaf, index):
    shard, offset = reader.offset(str(leaf.hf_names[index]))
    return shards[shard], offset


def _producer(reader, leaf, leaf_dtype, scales_leaf, block, progress, tensor_bytes):
    def produce(index):
        name = str(leaf.hf_names[index])
        if scales_leaf is not None:
            q = reader.read(name)
            scale = reader.read(name + SCALE_SUFFIX).astype(np.float32)
            if has_nan_fp8(q) or not np.isfinite(scale).all():
                raise CheckpointFormatError(f"{reader.file_of(name)}: tensor {name!r} (or its scale) has NaN/inf values")
            scales_leaf[index] = scale.T
            out = np.ascontiguousarray(leaf.to_dsjax(q))
        else:
            tensor = read_tensor(reader, name, block=block, copy=True)
            out = np.ascontiguousarray(leaf.to_dsjax(tensor).astype(leaf_dtype, copy=False))
            if not all_finite(out):
                problem = "has NaN/inf values" if not all_finite(tensor) else f"overflows {leaf_dtype.name}"
                raise CheckpointFormatError(f"{reader.file_of(name)}: tensor {name!r} {problem}")
        progress.update(1, tensor_bytes(name))
        return out

    return produce


def _verify(tmp, maps, streamed, scales, verify, stream) -> str:
    """Re-open what was written: every leaf present with its shape and dtype, nothing else; with
    verify='full' also read every slice back (bounded memory) and compare its checksum and finiteness."""
    arrays = OrbaxArrays(os.path.join(tmp, layout.PARAMS_ITEM))
    want = {leaf.path: streamed[leaf.path] for leaf in maps}
    have = set(arrays.leaves)
    if have != set(want):
        raise CheckpointFormatError(f"verification failed: the written checkpoint has {len(have)} param leaves, "
                                    f"expected {len(want)} (missing {sorted(set(want) - have)[:3]}, "
                                    f"unexpected {sorted(have - set(want))[:3]})")
    for path, array in want.items():
        if arrays.shape(path) != array.shape or arrays.dtype(path) != array.dtype:
            raise CheckpointFormatError(f"verification failed: {'/'.join(path)} was written as {arrays.dtype(path)} "
                                        f"{arrays.shape(path)}, expected {array.dtype} {array.shape}")
    if scales:
        written = OrbaxArrays(os.path.join(tmp, layout.SCALES_ITEM))
        expected = dict(dict_paths(scales))
        if set(written.leaves) != set(expected):
            raise CheckpointFormatError("verification failed: the fp8_scales item does not match the FP8 leaves")
        for path, value in expected.items():
            if not np.array_equal(written.read(path), value):
                raise CheckpointFormatError(f"verification failed: scales of {'/'.join(path)} differ after writing")
    if verify != "full":
        return "quick"
    total_bytes = sum(a.nbytes for a in want.values())
    progress = Progress("verify", sum(math.prod(a.stack_shape) for a in want.values()), total_bytes,
                        unit="slices", stream=stream)
    for path, array in want.items():
        for index, data in arrays.slices(path, array.stack_ndim):
            if checksum(data) != array.checksums.get(index):
                raise CheckpointFormatError(f"verification failed: {'/'.join(path)}{list(index)} reads back different "
                                            "bytes than were written")
            if not all_finite(data):
                raise CheckpointFormatError(f"verification failed: {'/'.join(path)}{list(index)} is not finite")
            progress.update(1, data.nbytes)
    progress.done()
    return "full"
