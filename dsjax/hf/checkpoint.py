"""Load an HF DeepSeek-V3.x checkpoint directory (bf16/fp32, or FP8 with block scales) into params."""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import ml_dtypes
import numpy as np

from dsjax.hf.names import leaf_maps, mtp_shared_copy_names
from dsjax.hf.safetensors_io import CheckpointFormatError, CheckpointReader
from dsjax.model.transformer import param_shardings
from dsjax.parallel.mesh import leaf_placer

log = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale_inv"
FP8_BLOCK = 128
_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def _block_pair(block) -> tuple[int, int]:
    return (int(block), int(block)) if np.isscalar(block) else (int(block[0]), int(block[1]))


def _fp8_layout(dtype: np.dtype) -> tuple[int, float, int]:
    """(mantissa shift into float32, 2**(127 - bias), mask of the all-ones exponent) of an FP8 format.

    Moving an FP8 number's exponent|mantissa bits to the top of a float32's gives that number times
    2**(bias - 127) exactly, subnormals included; a multiply by the returned factor undoes it."""
    if dtype == np.dtype(ml_dtypes.float8_e4m3fn):
        return 20, 2.0 ** 120, 0x7F  # NaN is the only all-ones pattern (no infinities)
    return 21, 2.0 ** 112, 0x7C  # e5m2: exponent 11111 holds inf and NaN


def _fp8_band_to_float32(band: np.ndarray, out: np.ndarray, shift: int) -> None:
    """Bit-level decode of a C-contiguous FP8 band into `out` (float32, same shape), times 2**(bias-127).
    ml_dtypes' own cast runs ~10x slower; this stays at a few memory passes over a cache-sized band."""
    bits = out.view(np.int32)
    np.copyto(bits, band.view(np.int8), casting="unsafe")  # sign-extended
    bits <<= shift
    sign = bits & np.int32(-2 ** 31)
    bits &= np.int32(0x7F << shift)  # exponent|mantissa (7 bits in both formats)
    bits |= sign


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block=FP8_BLOCK) -> np.ndarray:
    """W[i, j] = q[i, j] * scale_inv[i // block, j // block] (edge blocks may be partial), float32.

    `block` is one size for square blocks or (rows, cols) (`weight_block_size` of config.json)."""
    rows, cols = weight.shape
    block_rows, block_cols = _block_pair(block)
    expected = (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointFormatError(f"scale_inv of shape {tuple(scale_inv.shape)} for a weight {weight.shape}: expected {expected}")
    out = np.empty((rows, cols), np.float32)
    if weight.dtype not in _FP8:
        np.copyto(out, weight, casting="unsafe")
        factor, shift = 1.0, None
    else:
        shift, factor, special = _fp8_layout(weight.dtype)
        weight = np.ascontiguousarray(weight)
    scales = scale_inv.astype(np.float32)
    # Fold the decode factor into the scales unless that would overflow float32 (scales > 2**7).
    fold = factor == 1.0 or float(np.max(np.abs(scales), initial=0.0)) * factor < 1e38
    if fold:
        scales = scales * np.float32(factor)
    column_scales = np.repeat(scales, block_cols, axis=1)[:, :cols]  # one row-block's worth
    for b in range(expected[0]):
        band = slice(b * block_rows, (b + 1) * block_rows)
        if shift is not None:
            raw = weight[band]
            specials = (raw.view(np.uint8) & special) == special
            if specials.any() or not fold:  # NaN (or e5m2 inf), or huge scales: ml_dtypes decodes exactly
                out[band] = raw.astype(np.float32) * np.float32(1.0 / factor if fold else 1.0)
            else:
                _fp8_band_to_float32(raw, out[band], shift)
        out[band] *= column_scales[b]
    return out


def read_tensor(reader: CheckpointReader, name: str, *, block=FP8_BLOCK, copy: bool = False) -> np.ndarray:
    """One HF tensor as stored, or dequantised to float32 when it is FP8 with a `_scale_inv`.

    `copy=True` reads without the memory map (`CheckpointReader.read`), for streaming converters."""
    fetch = reader.read if copy else reader.get
    tensor = fetch(name)
    if tensor.dtype in _FP8:
        scale_name = name + SCALE_SUFFIX
        if scale_name not in reader:
            raise CheckpointFormatError(f"{reader.file_of(name)}: FP8 tensor {name!r} has no {scale_name!r}")
        try:
            return dequantize_fp8(tensor, fetch(scale_name), block)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{reader.file_of(name)}: {name}: {e}") from None
    return tensor


@dataclasses.dataclass(frozen=True)
class FP8Format:
    """The `quantization_config` of an FP8 checkpoint's config.json."""

    block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)  # weight_block_size: [rows (out), cols (in)]
    fmt: str = "e4m3"
    scale_fmt: str | None = None  # None (any float32 scales) or "ue8m0" (powers of two)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(ml_dtypes.float8_e4m3fn if self.fmt == "e4m3" else ml_dtypes.float8_e5m2)

    def to_hf(self) -> dict:
        config = {"quant_method": "fp8", "fmt": self.fmt, "activation_scheme": "dynamic",
                  "weight_block_size": list(self.block)}
        if self.scale_fmt:
            config["scale_fmt"] = self.scale_fmt
        return config


def fp8_format(hf_config: dict, source: str = "config.json") -> FP8Format | None:
    """The checkpoint's FP8 format from config.json, None when it declares no quantisation.

    Raises CheckpointFormatError for a quantisation dsjax cannot read (only DeepSeek's block-wise
    FP8 is supported: quant_method fp8, fmt e4m3 or e5m2, scale_fmt absent/float32 or ue8m0)."""
    quant = hf_config.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise CheckpointFormatError(f"{source}: quantization_config must be an object, got {quant!r}")
    method = quant.get("quant_method")
    if method != "fp8":
        raise CheckpointFormatError(
            f"{source}: unsupported quantization_config.quant_method={method!r}: dsjax reads only DeepSeek's "
            "block-wise FP8 checkpoints (quant_method 'fp8'); dequantise the checkpoint first")
    fmt = quant.get("fmt", "e4m3")
    if fmt not in ("e4m3", "e5m2"):
        raise CheckpointFormatError(f"{source}: unsupported quantization_config.fmt={fmt!r} (expected 'e4m3')")
    scale_fmt = quant.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0", "float32", "fp32"):
        raise CheckpointFormatError(f"{source}: unsupported quantization_config.scale_fmt={scale_fmt!r} "
                                    "(expected 'ue8m0' or none)")
    block = quant.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointFormatError(f"{source}: quantization_config.weight_block_size={block!r} must be two positive ints")
    return FP8Format(tuple(block), fmt, "ue8m0" if scale_fmt == "ue8m0" else None)


def check_tensors(reader: CheckpointReader, maps, fp8: FP8Format | None, config_source: str = "config.json") -> None:
    """Every tensor of `maps` has the shape config.json implies and a dtype it allows.

    FP8 tensors need a quantization_config of their format and a `_scale_inv` of the block grid's
    shape; every other tensor must be a float (bf16/fp16/fp32). Reads headers only."""
    floats = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float64))
    config_source = os.path.basename(config_source)  # messages start with the tensor's own file
    for leaf in maps:
        for name in leaf.hf_names.flat:
            name = str(name)
            where = reader.file_of(name)
            shape, dtype = tuple(reader.shape(name)), reader.dtype(name)
            if shape != leaf.hf_shape:
                raise CheckpointFormatError(
                    f"{where}: tensor {name!r} has shape {shape}, but {config_source} implies {leaf.hf_shape}")
            if dtype in _FP8:
                if fp8 is None:
                    raise CheckpointFormatError(
                        f"{where}: tensor {name!r} is {dtype.name}, but {config_source} declares no quantization_config")
                if dtype != fp8.dtype:
                    raise CheckpointFormatError(
                        f"{where}: tensor {name!r} is {dtype.name}, but {config_source} declares fmt={fp8.fmt!r}")
                if leaf.in_dims == 0:
                    raise CheckpointFormatError(f"{where}: tensor {name!r} is {dtype.name}, but only Linear weights "
                                                "can be FP8 (a block-quantised matrix with a _scale_inv)")
                scale_name = name + SCALE_SUFFIX
                if scale_name not in reader:
                    raise CheckpointFormatError(f"{where}: FP8 tensor {name!r} has no {scale_name!r}")
                rows, cols = shape
                want = (math.ceil(rows / fp8.block[0]), math.ceil(cols / fp8.block[1]))
                if tuple(reader.shape(scale_name)) != want or reader.dtype(scale_name) not in floats + (
                        np.dtype(ml_dtypes.float8_e8m0fnu),):
                    raise CheckpointFormatError(
                        f"{reader.file_of(scale_name)}: {scale_name!r} is {reader.dtype(scale_name).name} "
                        f"{tuple(reader.shape(scale_name))}, expected float32 {want} for blocks of {fp8.block}")
            elif dtype not in floats:
                raise CheckpointFormatError(f"{where}: tensor {name!r} has dtype {dtype.name}; expected a float "
                                            "(bfloat16/float32" + (", or FP8 for Linear weights)" if fp8 else ")"))
            elif name + SCALE_SUFFIX in reader:
                raise CheckpointFormatError(
                    f"{where}: tensor {name!r} is {dtype.name} but has a {name + SCALE_SUFFIX!r}: only FP8 weights have scales")


def has_mtp_tensors(reader: CheckpointReader, config) -> bool:
    prefix = f"model.layers.{config.num_layers}."
    return any(name.startswith(prefix) for name in reader.names())


def count_mtp_layers(reader: CheckpointReader, config) -> int:
    """MTP modules present in a checkpoint: consecutive layers past the main ones with an `eh_proj`."""
    count = 0
    while f"model.layers.{config.num_layers + count}.eh_proj.weight" in reader:
        count += 1
    return count


def resolve_mtp_layers(reader: CheckpointReader, config, hf_config: dict, *, explicit: bool = False) -> None:
    """Set `config.num_mtp_layers` from what the checkpoint holds.

    HF's V3.2 config.json omits the count (then it is counted from the tensors); transformers'
    `save_pretrained` drops the MTP layers while keeping the count (then the main model loads
    without MTP, with a warning). `explicit`: the caller chose the count; leave it."""
    if explicit:
        return
    if "num_nextn_predict_layers" not in hf_config and "num_mtp_layers" not in hf_config:
        config.num_mtp_layers = count_mtp_layers(reader, config)
    if config.num_mtp_layers and not has_mtp_tensors(reader, config):
        log.warning("%s: config.json declares %d MTP module(s) but the checkpoint has no model.layers.%d.* "
                    "tensors; loading without MTP", reader.directory, config.num_mtp_layers, config.num_layers)
        config.num_mtp_layers = 0


def check_names(reader: CheckpointReader, config, maps=None) -> None:
    """Every expected tensor present and no unknown tensor; errors name the tensor and file."""
    maps = maps or leaf_maps(config)
    expected = {str(n) for m in maps for n in m.hf_names.flat}
    missing = sorted(expected - set(reader.names()))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        unindexed = [n for n in missing if n in reader.unindexed]
        if unindexed:
            raise CheckpointFormatError(
                f"{os.path.join(reader.directory, reader.INDEX)}: tensor {unindexed[0]!r} is missing from the index "
                f"(it is in shard {reader.unindexed[unindexed[0]]}); tensor(s) not indexed: {', '.join(missing[:5])}{more}")
        raise CheckpointFormatError(f"{reader.directory}: tensor(s) missing from the checkpoint: {', '.join(missing[:5])}{more}")
    allowed = expected | set(mtp_shared_copy_names(config))
    unknown = sorted(n for n in reader.names()
                     if n not in allowed and not (n.endswith(SCALE_SUFFIX) and n[:-len(SCALE_SUFFIX)] in allowed))
    if unknown:
        raise CheckpointFormatError(
            f"{reader.file_of(unknown[0])}: unknown tensor {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + " — not part of the model that config.json describes")


def load_params(reader: CheckpointReader, config, dtype=None, fp8: FP8Format | None = None, mesh=None) -> dict:
    """All parameters of `config` from an HF checkpoint, as numpy arrays in a nested dict.

    `fp8`: the checkpoint's FP8 format (`fp8_format(config.json)`); its block size dequantises.
    `mesh`: place each leaf onto this mesh (`dsjax.model.param_shardings`) as soon as it is read,
    so neither the host nor any device ever holds the whole model."""
    maps = leaf_maps(config)
    check_names(reader, config, maps)
    block = fp8.block if fp8 is not None else FP8_BLOCK
    place = leaf_placer(None if mesh is None else param_shardings(config, mesh))
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
            out[index] = leaf.to_dsjax(read_tensor(reader, name, block=block))
        node = params
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = place(leaf.path, out)
    return params


def _np_dtype(name) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(name) == "bfloat16" else np.dtype(name)
