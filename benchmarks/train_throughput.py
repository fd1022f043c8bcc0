"""Training throughput of dsjax's jitted train step, and the same step in HF transformers (PyTorch).

    python benchmarks/train_throughput.py [--model small_v32] [--batch_size 2] [--seq_len 256]
                                          [--steps 3] [--mtp] [--skip_hf]

Prints, for one optimizer step (forward, backward, AdamW) on one batch of random tokens:
  * tokens/s of dsjax's jitted step (`dsjax.train.step.make_train_step`: pre-training loss, global
    norm, clipping, AdamW, router-bias update), float32, on the default JAX device;
  * model FLOPs utilisation: model FLOPs per step / step time / the matmul peak measured in this
    run (the best of several large float32 `jnp.dot`s on the same device);
  * the same for HF `transformers`' `DeepseekV32ForCausalLM` (or `DeepseekV3ForCausalLM` for a V3
    config) built from the same config by `tests/hf_reference.py`'s `hf_config_for` (eager experts,
    eager attention), float32, `torch.optim.AdamW`, gradient clipping at 1.0, and the ratio dsjax/HF.

HF has no MTP module, so the compared model has `num_mtp_layers = 0` unless `--mtp` is given (then
only dsjax runs it and no ratio is printed).

Model FLOPs (per token, training = 3x forward; a matmul of an m-vector with an [m, n] weight counts
2mn): every projection of MLA and of the indexer, the dense MLPs, the router, the shared expert and
the k routed experts a token uses, the output head (and the MTP modules' layer, projection and head),
plus attention: 2 x (qk + v dims) x heads x keys for the main attention, where keys is the causal
mean (T + 1) / 2, capped at `index_topk` with the indexer, and 2 x index_dim x index_heads x
(T + 1) / 2 for the indexer's scores. Not counted: norms, softmax, rope, elementwise work, the
optimizer update.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


# ---------------------------------------------------------------------------------------------
# FLOPs


def _layer_forward_flops(c, seq_len: int, moe: bool) -> float:
    """Forward FLOPs per token of one decoder layer."""
    d, h = c.hidden_size, c.num_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    macs = 0
    if c.q_lora_rank:
        macs += d * c.q_lora_rank + c.q_lora_rank * h * qk
    else:
        macs += d * h * qk
    macs += d * (c.kv_lora_rank + c.qk_rope_head_dim)
    macs += c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    macs += h * c.v_head_dim * d
    causal_keys = (seq_len + 1) / 2
    keys = min(causal_keys, c.index_topk) if c.use_indexer else causal_keys
    macs += keys * h * (qk + c.v_head_dim)
    if c.use_indexer:
        macs += c.q_lora_rank * c.index_num_heads * c.index_head_dim  # wq_b
        macs += d * c.index_head_dim + d * c.index_num_heads  # wk, weights_proj
        macs += causal_keys * c.index_num_heads * c.index_head_dim  # scores
    if moe:
        macs += d * c.num_routed_experts  # router
        macs += 3 * d * c.moe_intermediate_size * (c.num_experts_per_token + c.num_shared_experts)
    else:
        macs += 3 * d * c.dense_intermediate_size
    return 2.0 * macs


def train_flops_per_token(c, seq_len: int) -> float:
    """Model FLOPs of one training step per token (3x the forward FLOPs; see the module doc)."""
    forward = c.num_dense_layers * _layer_forward_flops(c, seq_len, moe=False)
    forward += (c.num_layers - c.num_dense_layers) * _layer_forward_flops(c, seq_len, moe=True)
    head = 2.0 * c.hidden_size * c.vocab_size
    forward += head
    for _ in range(c.num_mtp_layers):
        forward += 2.0 * 2 * c.hidden_size * c.hidden_size + _layer_forward_flops(c, seq_len, moe=True) + head
    return 3.0 * forward


# ---------------------------------------------------------------------------------------------
# Timing helpers


def _best_of(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def jax_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an [n, n] x [n, n] jnp.dot on the default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    dot(a, b).block_until_ready()
    times = _best_of(lambda: dot(a, b).block_until_ready(), repeats)
    return 2.0 * n ** 3 / min(times)


def torch_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = _best_of(lambda: torch.mm(a, b), repeats)
    return 2.0 * n ** 3 / min(times)


# ---------------------------------------------------------------------------------------------
# The two train steps


def time_dsjax(config, tokens: np.ndarray, steps: int, opt_cfg) -> dict:
    import jax
    import jax.numpy as jnp

    import ml_collections

    from dsjax.model import init_params
    from dsjax.recipes.pretrain import pretraining_loss
    from dsjax.train import optim
    from dsjax.train import step as step_lib

    params = jax.jit(lambda rng: init_params(config, rng))(jax.random.key(0))
    tx = optim.make_optimizer(opt_cfg, params)
    state = step_lib.init_train_state(params, tx)
    static = ml_collections.FrozenConfigDict(config)
    step = step_lib.make_train_step(lambda p, frozen, batch, rng: pretraining_loss(p, batch, static), tx,
                                    router_bias_update_rate=1e-3, schedule=optim.make_schedule(opt_cfg))
    batch_size, seq_len = tokens.shape
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    loss_mask = np.zeros(tokens.shape, np.float32)
    loss_mask[:, :-1] = 1.0
    batch = dict(tokens=jnp.asarray(tokens), targets=jnp.asarray(targets),
                 segment_ids=jnp.ones(tokens.shape, jnp.int32),
                 positions=jnp.asarray(np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape)),
                 loss_mask=jnp.asarray(loss_mask))
    start = time.perf_counter()
    state, metrics = step(state, batch)
    first_loss = float(metrics["loss"])
    compile_and_first = time.perf_counter() - start
    holder = {"state": state}

    def one():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m)

    times = _best_of(one, steps)
    return dict(times=times, compile_and_first_s=compile_and_first, first_loss=first_loss)


def time_hf(config, tokens: np.ndarray, steps: int, opt_cfg) -> dict:
    import torch

    from tests.hf_reference import hf_classes, hf_config_for

    torch.manual_seed(0)
    hf_config = hf_config_for(config)
    _, model_cls = hf_classes(config.use_indexer)
    model = model_cls(hf_config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt_cfg.learning_rate, betas=(opt_cfg.b1, opt_cfg.b2),
                                  eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
    ids = torch.as_tensor(tokens, dtype=torch.long)

    def one():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    start = time.perf_counter()
    first_loss = one()
    first = time.perf_counter() - start
    times = _best_of(one, steps)
    return dict(times=times, compile_and_first_s=first, first_loss=first_loss, cls=model_cls.__name__)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small_v32", help="dsjax model preset")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up/compile step)")
    parser.add_argument("--mtp", action="store_true", help="keep the preset's MTP modules (dsjax only)")
    parser.add_argument("--skip_hf", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--moe_impl", choices=("ragged", "dense"), default=None,
                        help="dsjax routed-expert implementation (default: the preset's)")
    args = parser.parse_args(argv)

    import jax
    import torch

    from dsjax.model.config import make_config
    from dsjax.train.config import default_optimizer_config

    overrides = {} if args.mtp else dict(num_mtp_layers=0)
    if args.moe_impl:
        overrides["moe_impl"] = args.moe_impl
    config = make_config(args.model, **overrides)
    opt_cfg = default_optimizer_config()
    opt_cfg.warmup_steps = 0
    opt_cfg.schedule = "constant"
    torch.set_num_threads(args.threads or os.cpu_count())
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch_size, args.seq_len)).astype(np.int32)
    tokens_per_step = tokens.size
    flops_per_step = train_flops_per_token(config, args.seq_len) * tokens_per_step

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"model: {args.model} (num_mtp_layers={config.num_mtp_layers}, indexer={config.use_indexer}, "
          f"moe_impl={config.moe_impl}), "
          f"batch {args.batch_size} x {args.seq_len} tokens, float32")
    print(f"model FLOPs per step: {flops_per_step / 1e9:.1f} GFLOP "
          f"({train_flops_per_token(config, args.seq_len) / 1e6:.1f} MFLOP/token)")
    peak = jax_matmul_peak()
    print(f"matmul peak (jnp.dot 2048^3 f32, best of 5): {peak / 1e9:.1f} GFLOP/s")
    if not args.skip_hf:
        print(f"  (torch.mm on the same matrices: {torch_matmul_peak() / 1e9:.1f} GFLOP/s)")

    results = {}
    ds = time_dsjax(config, tokens, args.steps, opt_cfg)
    results["dsjax"] = ds
    if not args.skip_hf and not args.mtp:
        results["hf"] = time_hf(config, tokens, args.steps, opt_cfg)

    for name, r in results.items():
        step_s = float(np.median(r["times"]))
        r["step_s"] = step_s
        r["tokens_per_s"] = tokens_per_step / step_s
        r["mfu"] = flops_per_step / step_s / peak
        label = "dsjax (jax.jit)" if name == "dsjax" else f"HF {r['cls']} (torch eager)"
        print(f"{label:38s} step {step_s:7.3f} s (median of {len(r['times'])}; first step incl. compile "
              f"{r['compile_and_first_s']:.1f} s, loss {r['first_loss']:.3f}) | {r['tokens_per_s']:8.1f} tokens/s | "
              f"MFU {100 * r['mfu']:.1f}% (steps: {', '.join(f'{t:.2f}' for t in r['times'])} s)")
    if "hf" in results:
        print(f"dsjax / HF: {results['dsjax']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x tokens/s")
    return results


if __name__ == "__main__":
    main()
