"""Checkpoint conversion between the official HF layout and dsjax's Orbax layout.

    python -m dsjax.convert hf-to-orbax --hf_dir DIR --out DIR [--dtype bfloat16|float32] [--keep_fp8]
    python -m dsjax.convert orbax-to-hf --ckpt DIR --out DIR [--fp8] [--dtype bfloat16|float32]

(also installed as the `dsjax-convert` console script). `dsjax.load` reads all of these layouts.
The Orbax layout is described in `dsjax.convert.layout`; how memory stays bounded in
`dsjax.convert.orbax_stream`.
"""

__all__ = ["hf_to_orbax", "orbax_to_hf", "parse_mesh", "read_checkpoint", "MeshNotSupportedError"]


def __getattr__(name):
    # Lazy: `dsjax.load` imports `dsjax.convert.layout` without pulling in Orbax/TensorStore.
    if name in ("hf_to_orbax", "parse_mesh", "MeshNotSupportedError"):
        from dsjax.convert import to_orbax  # noqa: PLC0415

        return getattr(to_orbax, name)
    if name == "read_checkpoint":
        from dsjax.convert.load import read_checkpoint  # noqa: PLC0415

        return read_checkpoint
    if name == "orbax_to_hf":
        from dsjax.convert import to_hf  # noqa: PLC0415

        return to_hf.orbax_to_hf
    raise AttributeError(f"module 'dsjax.convert' has no attribute {name!r}")
