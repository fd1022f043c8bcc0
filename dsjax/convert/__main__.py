"""dsjax-convert: convert DeepSeek-V3.x checkpoints between the official HF layout and dsjax's Orbax layout.

  hf-to-orbax   official HF directory (config.json, model.safetensors.index.json, shards; bf16 or
                FP8 E4M3 with 128x128 weight_scale_inv) -> Orbax checkpoint of the dsjax param tree
  orbax-to-hf   converted checkpoint, or a training workdir / WORKDIR/checkpoints/<step> -> official
                HF layout (bf16, or --fp8 re-quantised like the released checkpoints)

Both stream tensor by tensor (peak memory ~ a few of the largest single tensors, not the model),
print progress on stderr, write into a temporary directory beside --out and rename it into place
only after verifying the result; on any error nothing is left behind. Load any of these
directories with `dsjax.load(path)`.

Exit status: 0 done; 2 bad input (a missing, malformed or unsupported checkpoint, an existing --out, a bad
argument: one `error: ...` line on stderr, or with --verbose the traceback); 130/143 interrupted (SIGINT/
SIGTERM); anything else is a bug and raises with its traceback (status 1). See dsjax/cli.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from dsjax import cli

_EPILOG = """examples:
  python -m dsjax.convert hf-to-orbax --hf_dir /ckpt/DeepSeek-V3.2 --out /ckpt/v32-orbax
  python -m dsjax.convert hf-to-orbax --hf_dir /ckpt/DeepSeek-V3.2 --out /ckpt/v32-fp8 --keep_fp8
  python -m dsjax.convert orbax-to-hf --ckpt /runs/sft/checkpoints/2000 --out /ckpt/sft-hf --fp8
"""

_MESH_HELP = ("device mesh as AXIS=SIZE pairs, e.g. 'expert=4,data=2'. NOT IMPLEMENTED YET beyond the "
              "single-host default: only an omitted mesh (or all sizes 1) is accepted; a larger mesh is refused "
              "with an error. The output does not depend on it: each layer/expert slice is its own chunk, so "
              "Orbax restores the checkpoint onto any mesh given at load time.")
_VERBOSE_HELP = ("also show Orbax/TensorStore log messages, and on an error the full traceback instead of one "
                 "'error: ...' line")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="dsjax-convert", description=__doc__, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{hf-to-orbax,orbax-to-hf}")

    a = commands.add_parser("hf-to-orbax", help="official HF checkpoint -> dsjax Orbax checkpoint",
                            description="Convert an official-layout HF checkpoint into a dsjax Orbax checkpoint: "
                                        "OUT/params (the dsjax param tree, restorable with "
                                        "ocp.StandardCheckpointer), OUT/fp8_scales (with --keep_fp8), "
                                        "OUT/dsjax_model_config.json, OUT/dsjax_checkpoint.json, OUT/config.json.")
    a.add_argument("--hf_dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output directory (must not exist, unless --overwrite)")
    a.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of the stored params (FP8 weights are dequantised into it); default bfloat16. "
                        "Router e_score_correction_bias always stays float32")
    a.add_argument("--keep_fp8", action="store_true",
                   help="keep FP8 weights as float8_e4m3fn plus float32 scales (OUT/fp8_scales) instead of "
                        "dequantising; dsjax.load dequantises them")
    a.add_argument("--mesh", default=None, help=_MESH_HELP)
    a.add_argument("--verify", default="full", choices=("full", "quick"),
                   help="full (default): read every written slice back and compare checksums; quick: check "
                        "leaf count, shapes and dtypes only (values were checked finite before writing)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new one is complete)")
    a.add_argument("--quiet", action="store_true", help="no progress output")
    a.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)

    b = commands.add_parser("orbax-to-hf", help="dsjax Orbax / training checkpoint -> official HF layout",
                            description="Write the params of a converted checkpoint or of a training run as an "
                                        "official-layout HF checkpoint (sharded safetensors + "
                                        "model.safetensors.index.json + config.json), MTP layers included as "
                                        "model.layers.<num_layers+k>.*.")
    b.add_argument("--ckpt", required=True,
                   help="converted checkpoint dir, or a training WORKDIR, WORKDIR/checkpoints, or "
                        "WORKDIR/checkpoints/<step> (default: the latest complete step)")
    b.add_argument("--out", required=True, help="output directory (must not exist, unless --overwrite)")
    b.add_argument("--fp8", action="store_true",
                   help="quantise the Linears the official checkpoints quantise to float8_e4m3fn with 128x128 "
                        "weight_scale_inv, and add quantization_config to config.json")
    b.add_argument("--scale_fmt", default=None, choices=("ue8m0",),
                   help="with --fp8: power-of-two scales (V3.1/V3.2 'scale_fmt: ue8m0')")
    b.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of the unquantised tensors; default bfloat16 (as released)")
    b.add_argument("--max_shard_size", default="5GB", help="largest shard, e.g. 5GB (default) or 500MB")
    b.add_argument("--model_config", default=None,
                   help="model config when the checkpoint has none saved: a preset name, an HF config.json or a "
                        "dsjax_model_config.json (default: the one stored with the checkpoint)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new one is complete)")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    return parser


def _tune_malloc() -> None:
    """glibc keeps freed blocks below its (self-raising) mmap threshold in per-thread arenas, so
    the RSS of a process that allocates and frees many tensor-sized arrays in worker threads
    creeps up to several hundred MB above what it uses. Serving every allocation of 1 MiB or more
    with mmap (returned to the OS on free) and capping arenas keeps the RSS at what is in use."""
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class _Terminated(BaseException):
    pass


def _terminate(signum, frame):  # noqa: ARG001
    raise _Terminated()  # unwinds through the staging directory's cleanup


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Conversion is host work; don't let JAX grab an accelerator (Orbax imports JAX).
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if argv is None:  # a process of its own (not a call from Python code): tune it
        signal.signal(signal.SIGTERM, _terminate)
        _tune_malloc()
    if not args.verbose:  # Orbax logs a failure from its writer thread with tracebacks; we report it once
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    from dsjax.convert import hf_to_orbax, orbax_to_hf  # noqa: PLC0415
    from dsjax.convert.to_orbax import MeshNotSupportedError  # noqa: PLC0415

    stream = None if args.quiet else sys.stderr

    def convert():
        if args.command == "hf-to-orbax":
            hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype, keep_fp8=args.keep_fp8, mesh=args.mesh,
                        verify=args.verify, overwrite=args.overwrite, stream=stream)
        else:
            orbax_to_hf(args.ckpt, args.out, fp8=args.fp8, dtype=args.dtype, scale_fmt=args.scale_fmt,
                        max_shard_size=args.max_shard_size, model_config=args.model_config,
                        overwrite=args.overwrite, stream=stream)

    try:
        # A --mesh beyond the single-host default is refused like bad input (it is an argument).
        return cli.run_main(convert, verbose=args.verbose,
                            where=args.hf_dir if args.command == "hf-to-orbax" else args.ckpt,
                            errors=cli.BAD_INPUT_ERRORS + (MeshNotSupportedError,))
    except (KeyboardInterrupt, _Terminated) as e:
        print("dsjax-convert: interrupted; the partial output was removed", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143


if __name__ == "__main__":
    sys.exit(main())
