"""One process of the multi-process training test (`tests/test_multihost.py`).

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 JAX_PLATFORMS=cpu \\
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/multihost_worker.py WORKDIR

Trains `train_config()` with the real loop (which starts JAX's distributed runtime from those
variables) and writes `WORKDIR/process_<i>.json`: what this process saw.
"""

import json
import os
import sys

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2


def train_config():
    """4 data-parallel steps of a tiny MoE model: a data 2 x fsdp 2 mesh over the 4 devices of 2 processes."""
    from dsjax.model import make_config
    from dsjax.train.config import default_train_config

    config = default_train_config()
    config.model = make_config("tiny_v3", hidden_size=32, num_layers=2, num_mtp_layers=0, dense_intermediate_size=48,
                               moe_intermediate_size=16)
    config.update(dict(num_steps=4, batch_size=8, seq_len=16, log_every=1, checkpoint_every=2, tensorboard=False,
                       async_checkpointing=False))
    config.optimizer.update(dict(learning_rate=3e-3, warmup_steps=1, decay_steps=4))
    config.data.read_threads = 1
    config.mesh.fsdp = 2  # `data` takes the rest: one data shard per process
    return config


def main(workdir: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    import dataclasses

    from dsjax.recipes import pretrain
    from dsjax.train import loop

    first_rows = []

    class Remembered:
        """The pre-training batches; the first one's rows are remembered."""

        def __init__(self, inner):
            self.inner = inner

        def next(self, state):
            batch = self.inner.next(state)
            if int(state["step"]) == 0:
                first_rows.append(batch["tokens"].tolist())
            return batch

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, state):
            self.inner.set_state(state)

    config = train_config()
    recipe = dataclasses.replace(pretrain.recipe(config),
                                 batches=lambda *args: Remembered(pretrain.data_batches(*args)))
    result = loop.train(config, workdir, recipe, print_fn=print)
    report = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                  device_count=jax.device_count(), local_device_count=jax.local_device_count(), step=result.step,
                  loss=result.metrics["loss"], first_rows=first_rows[0])
    with open(os.path.join(workdir, f"process_{jax.process_index()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1])
