"""Peak memory and throughput of `python -m dsjax.convert` on a synthetic FP8 checkpoint.

Builds a wide, shallow DeepSeek-V3 checkpoint in the official layout (FP8 E4M3 Linears with
128x128 float32 `weight_scale_inv`, bf16 embeddings/norms/router, fp32 router bias, an MTP layer
with its embed/head copies, several shards), then runs each conversion in its own subprocess and
reports that subprocess's peak RSS next to the largest shard and the checkpoint size:

    python benchmarks/convert_memory.py [--gb 2] [--workdir /tmp/dsjax-convert-bench] [--keep]

The checkpoint is written tensor by tensor (values are random bytes: conversion speed does not
depend on them), so building it needs little memory either.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dsjax.hf.config import to_hf  # noqa: E402
from dsjax.hf.names import leaf_maps, mtp_shared_copy_names  # noqa: E402
from dsjax.hf.safetensors_io import write_safetensors_stream  # noqa: E402
from dsjax.model.config import make_config  # noqa: E402

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)


def bench_config(experts: int):
    # Wide and shallow: 1 dense + 2 MoE layers + 1 MTP layer, many experts.
    return make_config(
        "tiny_v3", vocab_size=8192, hidden_size=2048, num_layers=3, num_dense_layers=1,
        dense_intermediate_size=5632, num_heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, num_routed_experts=experts, num_experts_per_token=8,
        num_expert_groups=8, num_selected_groups=4, moe_intermediate_size=1024, num_mtp_layers=1,
        max_position_embeddings=4096)


def plan_tensors(config):
    """(name, dtype, shape) of every tensor of the official layout, in layer order."""
    entries = []
    for leaf in leaf_maps(config):
        for name in leaf.hf_names.flat:
            name = str(name)
            if leaf.fp8:
                rows, cols = leaf.hf_shape
                entries.append((name, E4M3, leaf.hf_shape))
                entries.append((name + "_scale_inv", np.dtype(np.float32), (math.ceil(rows / 128), math.ceil(cols / 128))))
            elif name.endswith("e_score_correction_bias"):
                entries.append((name, np.dtype(np.float32), leaf.hf_shape))
            else:
                entries.append((name, BF16, leaf.hf_shape))
    by_path = {m.path: m for m in leaf_maps(config)}
    for name, target in mtp_shared_copy_names(config).items():
        entries.append((name, BF16, by_path[target].hf_shape))

    def layer(name):
        parts = name.split(".")
        return int(parts[2]) if parts[1] == "layers" else (-1 if "embed" in name else 10 ** 6)

    return sorted(entries, key=lambda e: (layer(e[0]), e[0]))


def random_tensor(rng, dtype, shape):
    if dtype == E4M3:
        raw = rng.integers(0, 256, size=shape, dtype=np.uint8)
        raw[(raw & 0x7F) == 0x7F] = 0x7E  # no NaN codes
        return raw.view(E4M3)
    if dtype == np.dtype(np.float32):
        return rng.uniform(1e-4, 1e-3, size=shape).astype(np.float32)
    return (rng.standard_normal(size=shape, dtype=np.float32) * 0.02).astype(BF16)


def build(directory, config, shard_bytes):
    entries = plan_tensors(config)
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_stream(os.path.join(directory, name), shard,
                                 (random_tensor(rng, d, s) for _, d, s in shard), metadata={"format": "pt"})
        weight_map.update({n: name for n, _, _ in shard})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    hf = to_hf(config)
    hf["dtype"] = "bfloat16"
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": [128, 128]}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)
    largest = max(math.prod(s) * d.itemsize for _, d, s in entries)
    return len(entries), largest


_MEASURE = ("import resource, subprocess, sys, time; t = time.time(); "
            "rc = subprocess.run(sys.argv[1:]).returncode; u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print(rc, time.time() - t, u.ru_maxrss, u.ru_utime + u.ru_stime)")


def measure(command) -> tuple[float, float, float]:
    """Runs `command` in a child of a fresh process: (seconds, peak RSS in bytes, CPU seconds) of it alone."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, env=env)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines or lines[-1].split()[0] != "0":
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    _, seconds, rss_kib, cpu = lines[-1].split()
    return float(seconds), int(rss_kib) * 1024, float(cpu)


def directory_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="approximate checkpoint size in GB")
    parser.add_argument("--shard_mb", type=float, default=400.0, help="shard size of the synthetic checkpoint")
    parser.add_argument("--workdir", default="/tmp/dsjax-convert-bench")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args(argv)
    # ~10.5 MB of FP8 per expert per layer (3 x 2048 x 1024 + scales); 3 layers hold experts (2 MoE + MTP).
    experts = max(8, int(round((args.gb * 1e9 - 0.2e9) / (3 * 3 * 2048 * 1024) / 8)) * 8)
    config = bench_config(experts)
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf_dir = os.path.join(args.workdir, "hf")
    start = time.time()
    count, largest_tensor = build(hf_dir, config, int(args.shard_mb * 1e6))
    size = directory_bytes(hf_dir)
    shard = max(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    print(f"synthetic FP8 checkpoint: {count} tensors, {size / 1e9:.2f} GB, {experts} experts x 3 layers, "
          f"largest shard {shard / 1e9:.2f} GB, largest tensor {largest_tensor / 1e6:.0f} MB "
          f"(built in {time.time() - start:.0f} s)")
    idle = measure([sys.executable, "-c", "import dsjax.convert, dsjax.convert.to_orbax"])
    print(f"baseline: python + jax + orbax + dsjax imported: peak RSS {idle[1] / 2**20:.0f} MiB")
    runs = [
        ("hf-to-orbax (bf16, dequantise)", ["hf-to-orbax", "--hf_dir", hf_dir, "--out", os.path.join(args.workdir, "bf16")]),
        ("hf-to-orbax --verify quick", ["hf-to-orbax", "--hf_dir", hf_dir, "--out", os.path.join(args.workdir, "quick"),
                                        "--verify", "quick"]),
        ("hf-to-orbax --keep_fp8", ["hf-to-orbax", "--hf_dir", hf_dir, "--out", os.path.join(args.workdir, "fp8"),
                                    "--keep_fp8"]),
        ("orbax-to-hf --fp8 (from bf16)", ["orbax-to-hf", "--ckpt", os.path.join(args.workdir, "bf16"), "--out",
                                           os.path.join(args.workdir, "hf_fp8"), "--fp8", "--max_shard_size", "400MB"]),
    ]
    print(f"GB/s: checkpoint GB per wall second; GB/cpu-s: per CPU second of the converter (all its threads; "
          f"this shows what it costs when the machine is shared). Load average now: {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"{'conversion':32s} {'wall s':>7s} {'GB/s':>6s} {'cpu s':>6s} {'GB/cpu-s':>8s} {'peak RSS':>10s} "
          f"{'- baseline':>11s} {'/ largest tensor':>17s} {'/ largest shard':>16s} {'/ checkpoint':>13s}")
    for label, command in runs:
        seconds, rss, cpu = measure([sys.executable, "-m", "dsjax.convert", *command, "--quiet"])
        extra = rss - idle[1]
        print(f"{label:32s} {seconds:7.1f} {size / 1e9 / seconds:6.3f} {cpu:6.1f} {size / 1e9 / cpu:8.3f} "
              f"{rss / 2**20:6.0f} MiB {extra / 2**20:7.0f} MiB {extra / largest_tensor:16.1f}x {rss / shard:15.2f}x "
              f"{rss / size:12.2f}x")
    for name in ("bf16", "fp8"):
        print(f"output {name}: {directory_bytes(os.path.join(args.workdir, name)) / 1e9:.2f} GB on disk")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
