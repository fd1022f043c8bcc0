"""Load an HF DeepSeek-V3.x checkpoint directory (bf16/fp32, or FP8 with block scales) into params."""

from __future__ import annotations

import logging
import math

import ml_dtypes
import numpy as np

from dsjax.hf.names import leaf_maps, mtp_shared_copy_names
from dsjax.hf.safetensors_io import CheckpointFormatError, CheckpointReader

log = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale_inv"
FP8_BLOCK = 128
_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """W[i, j] = q[i, j] * scale_inv[i // block, j // block] (edge blocks may be partial), float32."""
    rows, cols = weight.shape
    expected = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointFormatError(f"scale_inv of shape {tuple(scale_inv.shape)} for a weight {weight.shape}: expected {expected}")
    scales = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=0), block, axis=1)[:rows, :cols]
    return weight.astype(np.float32) * scales


def read_tensor(reader: CheckpointReader, name: str) -> np.ndarray:
    """One HF tensor as stored, or dequantised to float32 when it is FP8 with a `_scale_inv`."""
    tensor = reader.get(name)
    if tensor.dtype in _FP8:
        scale_name = name + SCALE_SUFFIX
        if scale_name not in reader:
            raise CheckpointFormatError(f"{reader.file_of(name)}: FP8 tensor {name!r} has no {scale_name!r}")
        try:
            return dequantize_fp8(tensor, reader.get(scale_name))
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{reader.file_of(name)}: {name}: {e}") from None
    return tensor


def has_mtp_tensors(reader: CheckpointReader, config) -> bool:
    prefix = f"model.layers.{config.num_layers}."
    return any(name.startswith(prefix) for name in reader.names())


def count_mtp_layers(reader: CheckpointReader, config) -> int:
    """MTP modules present in a checkpoint: consecutive layers past the main ones with an `eh_proj`."""
    count = 0
    while f"model.layers.{config.num_layers + count}.eh_proj.weight" in reader:
        count += 1
    return count


def check_names(reader: CheckpointReader, config, maps=None) -> None:
    """Every expected tensor present and no unknown tensor; errors name the tensor and file."""
    maps = maps or leaf_maps(config)
    expected = {str(n) for m in maps for n in m.hf_names.flat}
    missing = sorted(expected - set(reader.names()))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointFormatError(f"{reader.directory}: tensor(s) missing from the checkpoint: {', '.join(missing[:5])}{more}")
    allowed = expected | set(mtp_shared_copy_names(config))
    unknown = sorted(n for n in reader.names()
                     if n not in allowed and not (n.endswith(SCALE_SUFFIX) and n[:-len(SCALE_SUFFIX)] in allowed))
    if unknown:
        raise CheckpointFormatError(
            f"{reader.file_of(unknown[0])}: unknown tensor {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + " — not part of the model that config.json describes")


def load_params(reader: CheckpointReader, config, dtype=None) -> dict:
    """All parameters of `config` from an HF checkpoint, as numpy arrays in a nested dict."""
    maps = leaf_maps(config)
    check_names(reader, config, maps)
    params: dict = {}
    for leaf in maps:
        stored_dtype = np.float32 if leaf.path[-1] == "e_score_correction_bias" else (dtype or config.param_dtype)
        out = np.empty(leaf.stack_shape + leaf.slice_shape, dtype=_np_dtype(stored_dtype))
        for index in np.ndindex(*leaf.stack_shape):
            name = leaf.hf_names[index]
            if tuple(reader.shape(name)) != leaf.hf_shape:
                raise CheckpointFormatError(
                    f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(reader.shape(name))}, "
                    f"but config.json implies {leaf.hf_shape}")
            out[index] = leaf.to_dsjax(read_tensor(reader, name))
        node = params
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = out
    return params


def _np_dtype(name) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(name) == "bfloat16" else np.dtype(name)
