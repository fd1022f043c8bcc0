"""DSA scaling: sparse MLA attention (O(L k)) against dense MLA attention (O(L^2)), fwd+bwd.

For each length L and top-k k, in one process and one run:
  - sparse: `dsjax.kernels.sparse_mla` forward+backward (grads to q and kv) over k selected rows
    per query (the gather-based XLA path on CPU; the Pallas kernel when a GPU/TPU is present,
    plus its TFLOP/s);
  - dense: MLA attention in MQA form (same q, kv, scale), causal masked [T, S] softmax,
    forward+backward. "dense" materialises [B, H, T, S]; where that does not fit in
    --dense-mem-gb it is replaced by "dense-chunked" (the same math over query chunks under
    jax.checkpoint: O(L^2) time, O(L) memory), and the table says which ran.
Times are the best of --repeats runs after a compile+warm-up run; memory is XLA's compiled
memory analysis of the jitted fwd+bwd (arguments + outputs + temporaries; deterministic, no
allocator noise), not a measured RSS.

Dense runs stop when the next one is predicted (L^2 scaling of the last measured one) to take
longer than --dense-max-s; the output then prints the prediction, marked "est.". Dense runs
predicted to be long, or at L >= --dense-cold-from, are timed once without a warm-up run (the
function is compiled ahead of time; marked "*").

Usage: PYTHONPATH=. python benchmarks/dsa_scaling.py [--dims small_v32|v32_671b] [--lengths 2048,4096]
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp

from dsjax import make_config
from dsjax.kernels import sparse_mla


def spread_indices(length: int, k: int) -> jax.Array:
    """[1, L, k] causal indices without an indexer: query t takes k keys spread evenly over
    [0, t] (all of them, then -1 slots, while t < k). Rows are scattered, as top-k rows are."""
    t = jnp.arange(length, dtype=jnp.int32)[:, None]
    j = jnp.arange(k, dtype=jnp.int32)[None, :]
    spread = (j * (t + 1)) // k  # distinct when t + 1 >= k
    early = jnp.where(j <= t, j, -1)
    return jnp.where(t + 1 >= k, spread, early)[None]


def dense_mqa(q, kv, scale, dv):
    s = jnp.einsum("bthd,bsd->bhts", q, kv, preferred_element_type=jnp.float32) * scale
    length, keys = q.shape[1], kv.shape[1]
    causal = jnp.arange(keys)[None, :] <= jnp.arange(length)[:, None]
    s = jnp.where(causal, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(kv.dtype)
    return jnp.einsum("bhts,bsd->bthd", p, kv[..., :dv])


def dense_mqa_chunked(q, kv, scale, dv, chunk=512):
    batch, length, heads, dk = q.shape
    chunks = length // chunk
    keys = jnp.arange(kv.shape[1])

    @jax.checkpoint
    def one(args):
        qc, start = args
        s = jnp.einsum("bthd,bsd->bhts", qc, kv, preferred_element_type=jnp.float32) * scale
        causal = keys[None, :] <= (start + jnp.arange(chunk))[:, None]
        p = jax.nn.softmax(jnp.where(causal, s, jnp.finfo(jnp.float32).min), axis=-1).astype(kv.dtype)
        return jnp.einsum("bhts,bsd->bthd", p, kv[..., :dv])

    qs = jnp.moveaxis(q.reshape(batch, chunks, chunk, heads, dk), 1, 0)
    out = jax.lax.map(one, (qs, jnp.arange(chunks) * chunk))
    return jnp.moveaxis(out, 0, 1).reshape(batch, length, heads, dv)


def fwd_bwd(attention):
    """jit(value_and_grad) of sum(attention(q, kv, *extra) * cot) w.r.t. q and kv; `extra`
    (e.g. the indices) are arguments, not closed-over constants XLA would try to fold."""
    def loss(q, kv, cot, *extra):
        return jnp.sum(attention(q, kv, *extra).astype(jnp.float32) * cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def compiled_bytes(compiled) -> int | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def timed(compiled, args, repeats, warm_up=True):
    if warm_up:
        jax.block_until_ready(compiled(*args))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return best


def sparse_flops(indices, heads, dk, dv):
    """Useful fwd+bwd FLOPs: per valid slot and head 2*(Dk + Dv) forward and
    2*(3 Dk + 2 Dv) backward (recomputed scores, dP, dQ, dK, dV)."""
    slots = float(jnp.sum(indices >= 0))
    return slots * heads * 2 * (4 * dk + 3 * dv)


def gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="small_v32", help="model preset giving H, kv_lora_rank, rope dim")
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    parser.add_argument("--topks", default="512,2048")
    parser.add_argument("--impl", default="auto", help="sparse impl: auto (pallas on GPU/TPU, xla on CPU), ...")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dense-max-s", type=float, default=400.0,
                        help="skip a dense run predicted to take longer than this (seconds)")
    parser.add_argument("--dense-cold-from", type=int, default=16384,
                        help="from this L on, time dense with one run and no warm-up (it is already compiled)")
    parser.add_argument("--dense-mem-gb", type=float, default=12.0,
                        help="use dense-chunked where the naive dense fwd+bwd needs more (compiled analysis)")
    parser.add_argument("--sparse-mem-gb", type=float, default=16.0, help="skip sparse runs needing more")
    parser.add_argument("--budget-s", type=float, default=900.0, help="stop starting new lengths after this")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (accelerator default)")
    args = parser.parse_args()

    cfg = make_config(args.dims)
    heads, dv, rope = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    dk = dv + rope
    scale = (cfg.qk_nope_head_dim + rope) ** -0.5
    platform = jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("float32" if platform == "cpu" else "bfloat16"))
    lengths = [int(x) for x in args.lengths.split(",")]
    topks = [int(x) for x in args.topks.split(",")]
    print(f"# platform {platform} ({jax.devices()[0].device_kind}), jax {jax.__version__}, dims {args.dims}: "
          f"H={heads} Dk={dk} Dv={dv}, batch 1, {dtype.name}, sparse impl={args.impl}")
    print("# time: best of %d fwd+bwd runs after a warm-up run (dense '*': a single run, no warm-up, as it is "
          "long); mem: compiled memory analysis (args+out+temp), GiB" % args.repeats)
    header = (f"{'L':>6} {'k':>5} | {'sparse s':>9} {'sparse GiB':>10} | {'dense kind':>13} {'dense s':>14} "
              f"{'dense GiB':>9} | {'time ratio':>10} {'mem ratio':>9}" + (" | TFLOP/s" if platform != "cpu" else ""))
    print(header)
    print("-" * len(header))

    started = time.perf_counter()
    last_dense = None  # (L, seconds)
    rows = []
    for length in lengths:
        if time.perf_counter() - started > args.budget_s:
            print(f"# stopped before L={length}: --budget-s {args.budget_s:.0f} s spent")
            break
        key_q, key_kv, key_c = jax.random.split(jax.random.PRNGKey(length), 3)
        q = jax.random.normal(key_q, (1, length, heads, dk), jnp.float32).astype(dtype)
        kv = jax.random.normal(key_kv, (1, length, dk), jnp.float32).astype(dtype)
        cot = jax.random.normal(key_c, (1, length, heads, dv), jnp.float32)

        # dense, once per length
        dense_kind, dense_s, dense_mem, dense_note = "dense", None, None, ""
        compiled = fwd_bwd(lambda q, kv: dense_mqa(q, kv, scale, dv)).lower(q, kv, cot).compile()
        dense_mem = compiled_bytes(compiled)
        if dense_mem is not None and dense_mem > args.dense_mem_gb * 2**30:
            dense_kind = "dense-chunked"
            compiled = fwd_bwd(lambda q, kv: dense_mqa_chunked(q, kv, scale, dv)).lower(q, kv, cot).compile()
            dense_mem = compiled_bytes(compiled)
        predicted = None if last_dense is None else last_dense[1] * (length / last_dense[0]) ** 2
        if predicted is not None and predicted > args.dense_max_s:
            dense_s, dense_note = predicted, " est."
        elif length >= args.dense_cold_from or (predicted is not None
                                                 and predicted * (args.repeats + 1) > args.dense_max_s):
            dense_s, dense_note = timed(compiled, (q, kv, cot), 1, warm_up=False), "*"  # one cold run
            last_dense = (length, dense_s)
        else:
            dense_s = timed(compiled, (q, kv, cot), args.repeats)
            last_dense = (length, dense_s)
        del compiled

        for k in topks:
            if k >= length:
                continue
            indices = spread_indices(length, k)
            sparse_fn = fwd_bwd(lambda q, kv, idx: sparse_mla(q, kv, idx, scale=scale, dv=dv, impl=args.impl))
            compiled = sparse_fn.lower(q, kv, cot, indices).compile()
            sparse_mem = compiled_bytes(compiled)
            if sparse_mem is not None and sparse_mem > args.sparse_mem_gb * 2**30:
                print(f"{length:>6} {k:>5} | sparse run skipped: needs {gib(sparse_mem)} GiB")
                continue
            sparse_s = timed(compiled, (q, kv, cot, indices), args.repeats)
            mem_ratio = (sparse_mem / dense_mem) if (sparse_mem and dense_mem) else float("nan")
            line = (f"{length:>6} {k:>5} | {sparse_s:>9.3f} {gib(sparse_mem):>10} | {dense_kind:>13} "
                    f"{dense_s:>9.3f}{dense_note:<5} {gib(dense_mem):>9} | {sparse_s / dense_s:>10.3f} "
                    f"{mem_ratio:>9.3f}")
            if platform != "cpu":
                line += f" | {sparse_flops(indices, heads, dk, dv) / sparse_s / 1e12:.1f}"
            print(line, flush=True)
            rows.append((length, k, sparse_s, sparse_mem, dense_kind, dense_s, dense_note, dense_mem))
            del compiled

    print("# sparse memory growth (per doubling of L, same k; linear = 2.0):")
    for k in topks:
        series = [(r[0], r[3]) for r in rows if r[1] == k and r[3]]
        growth = ", ".join(f"{b[0]}: x{b[1] / a[1]:.2f}" for a, b in zip(series, series[1:]) if b[0] == 2 * a[0])
        print(f"#   k={k}: {growth or 'n/a'}")
    target = [r for r in rows if r[0] == 16384 and r[1] == 2048]
    if target:
        r = target[0]
        print(f"# done-when check L=16K k=2048: sparse/dense time = {r[2] / r[5]:.3f} (target <= 0.25)"
              f" vs {r[4]}{' (dense time predicted, not measured)' if r[6] == ' est.' else ''}")
    else:
        print("# done-when check L=16K k=2048: not reached in this run")


if __name__ == "__main__":
    main()
