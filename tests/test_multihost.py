"""Multi-process training: 2 processes on localhost (2 CPU devices each, gloo collectives) run the
real training loop data-parallel; the result must equal one process training on the same global
batches, and the checkpoint they wrote together must restore."""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import multihost_worker as worker
from dsjax import checkpoint as checkpoint_lib
from dsjax import parallel as sharding
from dsjax.data import make_dataset
from dsjax.model import param_shardings
from dsjax.parallel import distributed
from dsjax.recipes import from_iterable, pretrain
from dsjax.train import loop
from dsjax.train import metrics as metrics_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(process_id: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "JAX_", "DSJAX_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={worker.DEVICES_PER_PROCESS}",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(worker.NUM_PROCESSES),
               JAX_PROCESS_ID=str(process_id), PYTHONPATH=str(REPO_ROOT))
    return env


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    children = [subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "multihost_worker.py"), str(workdir)],
                                 env=_child_env(i, port), cwd=str(REPO_ROOT), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
                 for i in range(worker.NUM_PROCESSES)]
    outputs = []
    try:
        for child in children:
            outputs.append(child.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for child in children:
            child.kill()
        outputs = [child.communicate()[0] for child in children]
        pytest.fail("the processes did not finish in time:\n" + "\n".join(
            f"--- process {i}:\n{out[-4000:]}" for i, out in enumerate(outputs)))
    if any(child.returncode for child in children):
        pytest.fail("a process failed:\n" + "\n".join(
            f"--- process {i} (exit {child.returncode}):\n{out[-4000:]}"
            for i, (child, out) in enumerate(zip(children, outputs))))
    return workdir, outputs


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The same 4 steps in this process on one device, each global batch = process 0's rows then process 1's."""
    config = worker.train_config()
    rows = config.batch_size // worker.NUM_PROCESSES
    iterators = [iter(make_dataset(config.data, seq_len=config.seq_len, batch_size=rows, seed=config.seed,
                                   process_index=i, process_count=worker.NUM_PROCESSES))
                 for i in range(worker.NUM_PROCESSES)]
    batches = [jax.tree.map(lambda *parts: np.concatenate(parts), *[next(it) for it in iterators])
               for _ in range(config.num_steps)]
    workdir = tmp_path_factory.mktemp("one_process")
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    recipe = dataclasses.replace(pretrain.recipe(config), batches=lambda *args: from_iterable(batches))
    return workdir, loop.train(config, str(workdir), recipe, mesh=mesh, print_fn=None)


def test_two_processes_train_like_one(two_process_run, one_process_run):
    workdir, _ = two_process_run
    reports = [json.loads((workdir / f"process_{i}.json").read_text()) for i in range(worker.NUM_PROCESSES)]
    for i, report in enumerate(reports):
        assert report["process_index"] == i and report["process_count"] == worker.NUM_PROCESSES
        assert report["device_count"] == worker.NUM_PROCESSES * worker.DEVICES_PER_PROCESS
        assert report["step"] == 4
    # Each process read its own rows (grain shards the documents by process).
    assert reports[0]["first_rows"] != reports[1]["first_rows"]
    assert len(reports[0]["first_rows"]) == worker.train_config().batch_size // worker.NUM_PROCESSES
    # Only process 0 writes metrics.jsonl / config.json; its losses are those of one process on the global batches.
    got = {e["step"]: e["loss"] for e in metrics_lib.read_metrics(str(workdir))}
    want = {e["step"]: e["loss"] for e in metrics_lib.read_metrics(str(one_process_run[0]))}
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5)
    assert reports[1]["loss"] == reports[0]["loss"]  # the metrics are global


def test_checkpoint_written_by_two_processes_restores(two_process_run, one_process_run):
    workdir, _ = two_process_run
    reference = one_process_run[1].state
    assert checkpoint_lib.complete_steps(workdir / "checkpoints") == [2, 4]
    # Each process saved its own data-iterator state.
    assert len(list((workdir / "checkpoints" / "4" / "data").iterdir())) >= worker.NUM_PROCESSES
    mesh = sharding.make_mesh({"expert": 4, "data": 2})  # any mesh: here all 8 devices of this process
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), reference)
    shardings = sharding.state_shardings(
        abstract, param_shardings(one_process_run[1].model_config, mesh, like=abstract["params"]), mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    with checkpoint_lib.Checkpointer(str(workdir)) as checkpointer:
        restored = checkpointer.restore(4, target)
    assert int(restored["step"]) == 4
    for got, want in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    # Resuming (data position included) in one process is refused with the reason, not a grain error.
    data = iter(make_dataset(None, seq_len=16, batch_size=2, seed=0))
    with checkpoint_lib.Checkpointer(str(workdir)) as checkpointer:
        with pytest.raises(ValueError, match=r"process_0-of-1.json: it was written by another number of processes"):
            checkpointer.restore(4, target, data_iterator=data)


def test_cluster_detection_from_the_environment():
    assert distributed.cluster_arguments({}) is None
    assert distributed.cluster_arguments(dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="4",
                                              JAX_PROCESS_ID="2")) == dict(
        coordinator_address="h:1", num_processes=4, process_id=2)
    assert distributed.cluster_arguments(dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="1",
                                              JAX_PROCESS_ID="0")) is None
    # SLURM, one task per GPU: JAX's own detection (it gives task SLURM_LOCALID its GPU).
    per_gpu = dict(SLURM_NTASKS="16", SLURM_PROCID="3", SLURM_STEP_NUM_NODES="2", SLURM_GPUS_ON_NODE="8")
    assert distributed.cluster_arguments(per_gpu) == {}
    # SLURM, one task per node: that task gets all the node's GPUs.
    per_node = dict(per_gpu, SLURM_NTASKS="2")
    assert distributed.cluster_arguments(per_node) == dict(local_device_ids=list(range(8)))
    assert distributed.cluster_arguments(dict(SLURM_NTASKS="1", SLURM_PROCID="0")) is None
    assert distributed.cluster_arguments(dict(TPU_WORKER_HOSTNAMES="a,b,c,d")) == {}
    assert distributed.cluster_arguments(dict(per_gpu, DSJAX_DISTRIBUTED="0")) is None
    assert distributed.cluster_arguments(dict(DSJAX_DISTRIBUTED="1")) == {}
