"""Parameter counts of a model preset, computed from abstract shapes (nothing is allocated).

    python -m dsjax.model.summary --model v3_671b
"""

from __future__ import annotations

import argparse
import math

import jax

from dsjax.model.config import make_config, preset_names
from dsjax.model.cache import cache_bytes_per_token
from dsjax.model.transformer import abstract_params


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def parameter_counts(config) -> dict[str, int]:
    """total (main model), mtp (the MTP modules' own weights), active (main model, per token)."""
    params = abstract_params(config)
    main = {k: v for k, v in params.items() if not k.startswith("mtp_")}
    mtp = {k: v for k, v in params.items() if k.startswith("mtp_")}
    total = _count(main)
    routed = _count(main.get("moe_layers", {}).get("mlp", {}).get("experts", {}))
    # A token runs num_experts_per_token of the routed experts; everything else is always active.
    inactive = routed * (1 - config.num_experts_per_token / config.num_routed_experts) if routed else 0
    # The HF checkpoint stores a copy of the embedding and output head in every MTP layer.
    shared_copies = _count(main["embed"]) + (_count(main["lm_head"]) if "lm_head" in main else 0)
    return dict(total=total, mtp=_count(mtp), mtp_stored=_count(mtp) + config.num_mtp_layers * shared_copies,
                active=int(round(total - inactive)))


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n:,} B ({n / size:,.1f} {unit})"
    return f"{n:,} B"


def format_summary(name: str, config) -> str:
    counts = parameter_counts(config)
    b = lambda n: f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.3f}M"  # noqa: E731
    lines = [
        f"model: {name}",
        f"  layers: {config.num_layers} ({config.num_dense_layers} dense, {config.num_layers - config.num_dense_layers} MoE)"
        f" + {config.num_mtp_layers} MTP; hidden {config.hidden_size}; heads {config.num_heads}; vocab {config.vocab_size}",
        f"  routed experts: {config.num_routed_experts} ({config.num_experts_per_token} per token, "
        f"{config.num_expert_groups} groups, {config.num_selected_groups} kept); shared experts: {config.num_shared_experts}",
        f"  sparse attention (DSA indexer): {'yes, top-%d keys' % config.index_topk if config.use_indexer else 'no'}",
        f"  total parameters:        {b(counts['total'])}",
        f"  active per token:        {b(counts['active'])}",
        f"  MTP modules (extra):     {b(counts['mtp'])} ({b(counts['mtp_stored'])} as stored in HF checkpoints, "
        "with their copies of the embedding and head)",
    ]
    cache = cache_bytes_per_token(config, "bfloat16")
    parts = f"MLA latent {config.kv_lora_rank} + rope key {config.qk_rope_head_dim}"
    if cache["indexer"]:
        parts += f" + indexer key {config.index_head_dim}"
    key_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    per_head = f"{config.num_heads} heads x (K {key_dim} + V {config.v_head_dim})"
    lines += [
        f"  KV cache per token (bf16, {config.num_layers} layers): {_bytes(cache['total'])}: {parts} per layer",
        f"    uncompressed per-head K and V:  {_bytes(cache['uncompressed'])}: {per_head} per layer,"
        f" {cache['uncompressed'] / cache['total']:.1f}x more",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="v3_671b", help=f"a preset: {', '.join(preset_names())}")
    args = parser.parse_args(argv)
    print(format_summary(args.model, make_config(args.model)))


if __name__ == "__main__":
    main()
