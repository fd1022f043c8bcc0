"""Will it fit? Per-device memory of a training run on a mesh, from abstract shapes only.

    python -m dsjax.plan --model v3_671b --mesh fsdp=32,expert=8 --devices 256 --hbm_gb 80 \\
        --batch_size 256 --seq_len 4096
    python -m dsjax.plan --config configs/quickstart.py --mesh fsdp=-1 --devices 8 --hbm_gb 16

Parameters and optimizer state are counted exactly, leaf by leaf, with the sharding rules of
`dsjax.parallel` (a dimension an axis does not divide stays replicated). Activations are an estimate
for one micro-batch: with rematerialisation each layer keeps its input, plus one layer's working set
(attention scores, MLP and expert buffers) and the logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys

import jax
from jax.sharding import PartitionSpec

from dsjax.model.config import make_config
from dsjax.model.transformer import abstract_params, logical_axes
from dsjax.parallel.mesh import BATCH_AXES, MESH_PRESETS, RULES, mesh_sizes_from_config, resolve_mesh_shape

GB = 1024 ** 3


def _shard_elements(shape, spec: PartitionSpec, sizes: dict[str, int], rules=RULES) -> int:
    """Elements of one device's shard (replicating dims an axis size does not divide)."""
    used, elements = set(), 1
    for dim, name in zip(shape, tuple(spec)):
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = [a for a in axes if sizes[a] > 1 and a not in used]
        divisor = math.prod(sizes[a] for a in axes)
        if axes and dim % divisor:
            axes = [a for a in axes if dim % sizes[a] == 0][:1]
            divisor = math.prod(sizes[a] for a in axes)
        used.update(axes)
        elements *= math.ceil(dim / divisor)
    return elements


_BYTES = {"float32": 4, "bfloat16": 2}


def plan(model_config, sizes: dict[str, int], *, batch_size: int, seq_len: int, hbm_gb: float,
         param_dtype: str = "float32", moment_dtype: str = "float32", remat: bool = True) -> dict:
    c = model_config
    shapes, specs = abstract_params(c), logical_axes(c)
    pairs = zip(jax.tree_util.tree_leaves(shapes),
                jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)))
    param_elements = sum(_shard_elements(leaf.shape, spec, sizes) for leaf, spec in pairs)
    total_params = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))
    params_bytes = param_elements * _BYTES[param_dtype]
    optimizer_bytes = param_elements * _BYTES[moment_dtype] * 2  # AdamW's two moments
    grads_bytes = param_elements * _BYTES[param_dtype]

    act = 2 if c.dtype in ("bfloat16", "float16") else 4
    data_ways = math.prod(sizes[a] for a in BATCH_AXES)
    local_batch = max(1, math.ceil(batch_size / data_ways))
    tokens = local_batch * seq_len
    heads = math.ceil(c.num_heads / sizes["tensor"])
    keys = min(seq_len, c.index_topk) if c.use_indexer else seq_len
    layers = c.num_layers + c.num_mtp_layers
    kept = (layers if remat else layers * 12) * tokens * c.hidden_size * act  # layer inputs (x12: no remat)
    attention = local_batch * heads * seq_len * keys * 4 * 2  # scores + probabilities, float32
    expert_rows = tokens * c.num_experts_per_token
    mlp = max(tokens * math.ceil(c.dense_intermediate_size / sizes["tensor"]),
              expert_rows * math.ceil(c.moe_intermediate_size / sizes["tensor"])) * act * 3
    dispatch = expert_rows * c.hidden_size * act * 2 * (sizes["expert"] if sizes["expert"] > 1 else 1)
    logits = tokens * math.ceil(c.vocab_size / sizes["tensor"]) * 4 * 2
    activations_bytes = kept + attention + mlp + dispatch + logits
    total = params_bytes + optimizer_bytes + grads_bytes + activations_bytes
    return dict(devices=math.prod(sizes.values()), mesh=sizes, total_params=total_params,
                params_gb=params_bytes / GB, optimizer_gb=optimizer_bytes / GB, grads_gb=grads_bytes / GB,
                activations_gb=activations_bytes / GB, total_gb=total / GB, hbm_gb=hbm_gb, fits=total <= hbm_gb * GB * 0.9,
                local_batch=local_batch, param_dtype=param_dtype, moment_dtype=moment_dtype)


def _count(n: int) -> str:
    """671.03B / 170.2M / 1.3M: a parameter count at a readable scale."""
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def format_plan(result: dict) -> str:
    mesh = ", ".join(f"{k}={v}" for k, v in result["mesh"].items() if v > 1) or "single device"
    lines = [
        f"{_count(result['total_params'])} parameters on {result['devices']} devices ({mesh}); "
        f"{result['local_batch']} sequence(s) per data-parallel rank",
        f"  parameters ({result['param_dtype']:8s})       {result['params_gb']:9.2f} GB per device",
        f"  gradients                   {result['grads_gb']:9.2f} GB",
        f"  AdamW moments ({result['moment_dtype']:8s})    {result['optimizer_gb']:9.2f} GB",
        f"  activations (estimate)      {result['activations_gb']:9.2f} GB",
        f"  total                       {result['total_gb']:9.2f} GB of {result['hbm_gb']:g} GB "
        f"-> {'fits' if result['fits'] else 'DOES NOT FIT'} (keeping 10% headroom)",
    ]
    return "\n".join(lines)


def _load_experiment(path: str):
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    if spec is None:
        raise FileNotFoundError(f"{path}: no such config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _parse_mesh(text: str) -> dict[str, int]:
    if text.strip() in MESH_PRESETS:
        return dict(MESH_PRESETS[text.strip()])
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
    except ValueError:
        raise SystemExit(f"--mesh {text!r}: expected axis=size pairs, e.g. fsdp=32,expert=8") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="an experiment config file (configs/NAME.py)")
    parser.add_argument("--model", help="a model preset (instead of --config)")
    parser.add_argument("--mesh", help="axis sizes, e.g. fsdp=32,expert=8 (-1: the rest), or a preset name; "
                        "default: the --config's mesh section if it sets one, else fsdp=-1")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--hbm_gb", type=float, required=True, help="memory per device, GB")
    parser.add_argument("--batch_size", type=int, help="global batch (default: the config's)")
    parser.add_argument("--seq_len", type=int, help="sequence length (default: the config's)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype for activations")
    parser.add_argument("--param_dtype", default="float32", choices=sorted(_BYTES), help="master weights and grads")
    parser.add_argument("--moment_dtype", default="float32", choices=sorted(_BYTES), help="AdamW moments")
    parser.add_argument("--no_remat", action="store_true")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.model):
        parser.error("give exactly one of --config and --model")
    batch_size, seq_len = args.batch_size, args.seq_len
    mesh = _parse_mesh(args.mesh) if args.mesh else {"fsdp": -1}
    if args.config:
        experiment = _load_experiment(args.config)
        model = experiment.model
        overrides = dict(experiment.get("model_overrides", {}) or {})
        config = make_config(model if isinstance(model, str) else model.to_dict(), **overrides)
        batch_size = batch_size or experiment.batch_size
        seq_len = seq_len or experiment.seq_len
        if not args.mesh and experiment.get("mesh") and mesh_sizes_from_config(experiment.mesh) != {"data": -1}:
            mesh = mesh_sizes_from_config(experiment.mesh)  # what the training run would use
    else:
        config = make_config(args.model)
    if not batch_size or not seq_len:
        parser.error("--batch_size and --seq_len are needed with --model")
    config = make_config(config, dtype=args.dtype)
    try:
        sizes = resolve_mesh_shape(mesh, args.devices)
    except ValueError as e:
        raise SystemExit(f"--mesh: {e}") from None
    print(format_plan(plan(config, sizes, batch_size=batch_size, seq_len=seq_len, hbm_gb=args.hbm_gb,
                           param_dtype=args.param_dtype, moment_dtype=args.moment_dtype, remat=not args.no_remat)))


if __name__ == "__main__":
    sys.exit(main())
