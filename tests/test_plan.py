"""The memory planner: exact per-device parameter bytes from abstract shapes and sharding rules."""

import math
import subprocess
import sys

import jax
import pytest

import dsjax
from dsjax.plan import GB, plan
from dsjax.parallel import resolve_mesh_shape


def test_parameter_bytes_follow_the_mesh():
    config = dsjax.make_config("v3_671b")
    total = sum(math.prod(l.shape) for l in jax.tree_util.tree_leaves(dsjax.abstract_params(config)))
    one = plan(config, resolve_mesh_shape({}, 1), batch_size=1, seq_len=128, hbm_gb=1e6)
    assert one["params_gb"] == pytest.approx(total * 4 / GB)
    sharded = plan(config, resolve_mesh_shape({"fsdp": 32, "expert": 8}, 256), batch_size=256, seq_len=4096,
                   hbm_gb=80, param_dtype="bfloat16", moment_dtype="bfloat16")
    # Nearly everything shards 256 ways; a few small dims (norm scales, biases) stay replicated.
    assert total * 2 / 256 / GB < sharded["params_gb"] < 1.01 * total * 2 / 256 / GB
    assert sharded["optimizer_gb"] == pytest.approx(2 * sharded["params_gb"])


def test_cli_documented_671b_plan_fits_and_single_gpu_does_not():
    run = lambda *a: subprocess.run([sys.executable, "-m", "dsjax.plan", "--model", "v3_671b", *a],  # noqa: E731
                                    capture_output=True, text=True)
    ok = run("--mesh", "fsdp=16,expert=8,tensor=2", "--devices", "256", "--hbm_gb", "80", "--batch_size", "128",
             "--seq_len", "4096", "--param_dtype", "bfloat16", "--moment_dtype", "bfloat16")
    assert ok.returncode == 0 and "-> fits" in ok.stdout, ok.stderr
    no = run("--mesh", "fsdp=-1", "--devices", "8", "--hbm_gb", "80", "--batch_size", "8", "--seq_len", "4096")
    assert "DOES NOT FIT" in no.stdout
    bad = run("--mesh", "fsdp=3", "--devices", "8", "--hbm_gb", "80", "--batch_size", "8", "--seq_len", "8")
    assert bad.returncode != 0 and "has 3 devices, but 8" in bad.stderr
