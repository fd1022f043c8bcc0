"""Decode throughput: dsjax's jitted latent-cache loop against HF transformers' `generate`.

    python benchmarks/decode.py [--model small_v32] [--batch_sizes 1,16] [--prompt_len 32] [--new_tokens 64]

Both run the same random checkpoint (built by `tests/hf_reference.py` in the official layout and
loaded with `dsjax.load`), in float32, greedy, without stop tokens, on whatever devices the
processes see (CPU for torch here; JAX's default backend). HF uses eager attention and eager
experts, as the parity tests do (its grouped-mm experts need 16-byte-aligned sizes).

Decode tokens/s = batch x (N - 1) / (time(N new tokens) - time(1 new token)): the prefill and the
first token are subtracted, so it measures the per-token loop. dsjax times exclude compilation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (_ROOT, os.path.join(_ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import dsjax  # noqa: E402
from hf_reference import HFReference  # noqa: E402


def _best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) if repeats < 3 else statistics.median(times)


def bench_dsjax(lm, prompts, new_tokens: int, repeats: int) -> tuple[float, float]:
    def run(n):
        out = lm.generate(prompts, n, temperature=0.0)
        jax.block_until_ready(out.tokens)

    run(1), run(new_tokens)  # compile both
    return _best_time(lambda: run(1), repeats), _best_time(lambda: run(new_tokens), repeats)


def bench_hf(model, prompts, new_tokens: int, repeats: int) -> tuple[float, float]:
    ids = torch.as_tensor(prompts, dtype=torch.long)

    def run(n):
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=0)

    run(2)  # warm-up
    return _best_time(lambda: run(1), repeats), _best_time(lambda: run(new_tokens), repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small_v32", help="a dsjax preset (tiny_v3, tiny_v32, small_v32, ...)")
    parser.add_argument("--batch_sizes", default="1,16")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--moe_impl", default=None, help="dsjax's MoE for prefill and large decode batches: "
                        "ragged or dense (decode steps with tokens x k < experts gather the chosen experts)")
    args = parser.parse_args(argv)

    config = dsjax.make_config(args.model, num_mtp_layers=0)
    with tempfile.TemporaryDirectory() as directory:
        reference = HFReference(config, directory, seed=0)
        lm = dsjax.load(directory, num_mtp_layers=0, **({"moe_impl": args.moe_impl} if args.moe_impl else {}))
    reference.model.generation_config.eos_token_id = None
    print(f"model {args.model}: {sum(p.numel() for p in reference.model.parameters()) / 1e6:.1f}M parameters, "
          f"float32, dsjax moe_impl={lm.config.moe_impl}; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)); "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"{'batch':>5}  {'dsjax tok/s':>12}  {'HF tok/s':>10}  {'ratio':>7}   (decode only; end-to-end dsjax / HF)")
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = rng.integers(0, config.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        ours_first, ours_all = bench_dsjax(lm, prompts, args.new_tokens, args.repeats)
        hf_first, hf_all = bench_hf(reference.model, prompts, args.new_tokens, args.repeats)
        decoded = batch * (args.new_tokens - 1)
        ours, theirs = decoded / (ours_all - ours_first), decoded / (hf_all - hf_first)
        end_to_end = (batch * args.new_tokens / ours_all) / (batch * args.new_tokens / hf_all)
        print(f"{batch:>5}  {ours:>12.1f}  {theirs:>10.1f}  {ours / theirs:>6.2f}x   "
              f"(end-to-end {batch * args.new_tokens / ours_all:.1f} / {batch * args.new_tokens / hf_all:.1f} tok/s, "
              f"{end_to_end:.2f}x)")


if __name__ == "__main__":
    main()
