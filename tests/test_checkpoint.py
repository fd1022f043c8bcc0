"""Tests for dsjax.checkpoint."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dsjax import checkpoint as ckpt
from dsjax.train import optim
from dsjax.train.config import default_optimizer_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
    return {
        "embed": {"embedding": normal((7, 4))},
        "layers": {
            "mlp": {"kernel": normal((2, 4, 4))},
            "norm": {"scale": jnp.ones((2, 4), jnp.bfloat16)},
            "gate": {
                "kernel": normal((2, 4, 3)),
                "e_score_correction_bias": jnp.zeros((2, 3)),
            },
        },
    }


def _train_state(n_steps=2, seed=0):
    """A realistic {"params", "opt_state", "step"} after a few updates."""
    params = _params(seed)
    cfg = default_optimizer_config()
    cfg.schedule = "constant"
    cfg.warmup_steps = 0
    cfg.learning_rate = 0.05
    tx = optim.make_optimizer(cfg, params)
    opt_state = tx.init(params)
    for i in range(n_steps):
        grads = jax.tree.map(
            lambda x, i=i: jnp.full_like(x, 0.1 * (i + 1 + seed)), params)
        updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state,
            "step": jnp.asarray(n_steps + seed, jnp.int32)}


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _dirs(workdir):
    return sorted(os.listdir(pathlib.Path(workdir) / "checkpoints"))


def _iterator():
    ds = grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset()
    return iter(ds)


# ------------------------------------------------------------------ basics


@pytest.mark.parametrize("async_save", [True, False])
def test_roundtrip_params_and_optimizer_state(tmp_path, async_save):
    state = _train_state()
    with ckpt.Checkpointer(tmp_path, async_save=async_save) as c:
        assert c.latest_step() is None
        assert c.save(10, state, config={"model": {"n_layers": 2}})
    # Reopen, as a resumed run would.
    with ckpt.Checkpointer(tmp_path) as c:
        assert c.latest_step() == 10
        abstract = jax.eval_shape(lambda: state)
        restored = c.restore(None, abstract)
        assert c.restore_config() == {"model": {"n_layers": 2}}
    _assert_trees_equal(restored, state)
    # NamedTuple optimizer states survive (optax can keep using them).
    assert isinstance(restored["opt_state"], type(state["opt_state"]))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    # The restored optimizer state continues to work.
    tx = optim.make_optimizer(default_optimizer_config(), restored["params"])
    grads = jax.tree.map(jnp.ones_like, restored["params"])
    tx.update(grads, restored["opt_state"], restored["params"])


def test_restore_specific_step_and_changed_values(tmp_path):
    s1, s2 = _train_state(1, seed=1), _train_state(1, seed=2)
    assert not np.allclose(s1["params"]["layers"]["mlp"]["kernel"],
                           s2["params"]["layers"]["mlp"]["kernel"])
    with ckpt.Checkpointer(tmp_path) as c:
        c.save(1, s1)
        c.save(2, s2)
        abstract = jax.eval_shape(lambda: s1)
        _assert_trees_equal(c.restore(1, abstract), s1)
        _assert_trees_equal(c.restore(2, abstract), s2)
        _assert_trees_equal(c.restore(None, abstract), s2)


def test_keep_last_n_and_latest_step(tmp_path):
    state = _train_state(1)
    with ckpt.Checkpointer(tmp_path, keep=2) as c:
        for step in (100, 200, 300, 400):
            assert c.save(step, state)
        c.wait()
        assert c.latest_step() == 400
        assert c.all_steps() == [300, 400]
    assert _dirs(tmp_path) == ["300", "400"]
    assert ckpt.complete_steps(tmp_path / "checkpoints") == [300, 400]


def test_save_every(tmp_path):
    state = _train_state(1)
    with ckpt.Checkpointer(tmp_path, save_every=5, keep=None) as c:
        saved = [s for s in range(1, 13) if c.save(s, state)]
        assert saved == [5, 10]
        assert c.save(12, state, force=True)
        assert not c.save(11, state, force=False)  # not after the latest step
        c.wait()
        assert c.all_steps() == [5, 10, 12]


def test_latest_step_empty_and_restore_missing(tmp_path):
    with ckpt.Checkpointer(tmp_path) as c:
        assert c.latest_step() is None
        with pytest.raises(FileNotFoundError):
            c.restore(None, jax.eval_shape(_train_state))


# -------------------------------------------------------------- atomicity

_KILLED_SAVE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from dsjax import checkpoint as ckpt

    workdir, mode, kill_step = sys.argv[1], sys.argv[2], sys.argv[3]
    cls = {"atomic_rename": atomicity.AtomicRenameTemporaryPath,
           "commit_file": atomicity.CommitFileTemporaryPath}[mode]
    original = cls.finalize

    async def finalize(self):
        # SIGKILL at the last moment: all data of the step is written, only the
        # finalisation (rename / commit marker) is missing.
        if self.get_final().name == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self)

    cls.finalize = finalize
    c = ckpt.Checkpointer(workdir, atomicity=mode)
    for step in (1, 2, 3):
        state = {"params": {"w": {"kernel": jnp.full((3, 2), float(step))}},
                 "step": jnp.asarray(step)}
        c.save(step, state)
        c.wait()
    c.close()
    print("NOT KILLED")
""")


def _state_at(step):
    return {"params": {"w": {"kernel": jnp.full((3, 2), float(step))}},
            "step": jnp.asarray(step)}


@pytest.mark.parametrize("mode", ["atomic_rename", "commit_file"])
def test_save_killed_before_finalisation_is_ignored(tmp_path, mode):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE_SCRIPT, str(tmp_path), mode, "3"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "NOT KILLED" not in proc.stdout

    root = tmp_path / "checkpoints"
    leftovers = sorted(os.listdir(root))
    if mode == "atomic_rename":
        # Orbax wrote step 3 into "3.orbax-checkpoint-tmp" and never renamed it.
        assert "3" not in leftovers
        assert "3" + ocp.step.TMP_DIR_SUFFIX in leftovers
        assert (root / ("3" + ocp.step.TMP_DIR_SUFFIX) / "state").is_dir()
    else:
        # Orbax wrote "3/" in place but not its commit marker.
        assert "3" in leftovers
        assert (root / "3" / "state").is_dir()
        assert not (root / "3" / ckpt.COMMIT_MARKER).exists()
    assert (root / "2" / ckpt.COMMIT_MARKER).exists()

    with ckpt.Checkpointer(tmp_path, atomicity=mode) as c:
        # Opening removes the stale tmp directory.
        assert not any(ocp.step.TMP_DIR_SUFFIX in d for d in _dirs(tmp_path))
        assert c.latest_step() == 2
        restored = c.restore(None, jax.eval_shape(lambda: _state_at(0)))
        _assert_trees_equal(restored, _state_at(2))
        np.testing.assert_array_equal(
            ckpt.restore_params(tmp_path)["w"]["kernel"], np.full((3, 2), 2.0))
        # The interrupted step can be saved again and then becomes the latest.
        assert c.save(3, _state_at(3))
        c.wait()
        assert c.latest_step() == 3
        _assert_trees_equal(c.restore(None, jax.eval_shape(lambda: _state_at(0))),
                            _state_at(3))
    assert not any(ocp.step.TMP_DIR_SUFFIX in d for d in _dirs(tmp_path))


def test_step_dir_without_commit_marker_is_ignored(tmp_path):
    # A plain "<step>/" directory without commit_success.txt: orbax's own
    # atomic-rename check accepts it (it only looks at the name), our guard
    # rejects it.
    with ckpt.Checkpointer(tmp_path, keep=3) as c:
        c.save(1, _state_at(1))
        c.save(2, _state_at(2))
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "2", root / "5")
    os.remove(root / "5" / ckpt.COMMIT_MARKER)
    assert ocp.step.is_path_finalized(root / "5")  # orbax alone would list it
    assert not ckpt.is_complete_step_dir(root / "5")

    with ckpt.Checkpointer(tmp_path, keep=3) as c:
        assert c.latest_step() == 2
        assert c.all_steps() == [1, 2]
        _assert_trees_equal(c.restore(None, jax.eval_shape(lambda: _state_at(0))),
                            _state_at(2))
        with pytest.raises(Exception):
            c.restore(5, jax.eval_shape(lambda: _state_at(0)))
        # Later saves are neither blocked nor garbage-collected on its behalf.
        assert c.save(3, _state_at(3))
        assert c.save(4, _state_at(4))
        c.wait()
        assert c.all_steps() == [2, 3, 4]
        # Re-saving the broken step replaces it.
        assert c.save(5, _state_at(5))
        c.wait()
        assert c.latest_step() == 5
        _assert_trees_equal(c.restore(5, jax.eval_shape(lambda: _state_at(0))),
                            _state_at(5))
    assert _dirs(tmp_path) == ["3", "4", "5"]


# ------------------------------------------------------------- data state


def test_restore_grain_iterator(tmp_path):
    it = _iterator()
    for _ in range(5):
        next(it)
    state = _state_at(5)
    with ckpt.Checkpointer(tmp_path) as c:
        c.save(5, state, data_iterator=it)
        # Advance right away (the save may still be writing arrays).
        expected = [next(it) for _ in range(4)]
        for _ in range(6):
            next(it)
        c.wait()
        restored = c.restore(5, jax.eval_shape(lambda: state), data_iterator=it)
        _assert_trees_equal(restored, state)
        got = [next(it) for _ in range(4)]
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)
    # A fresh iterator (as in a new process) restores to the same point.
    fresh = _iterator()
    with ckpt.Checkpointer(tmp_path) as c:
        c.restore(None, jax.eval_shape(lambda: state), data_iterator=fresh)
    for e in expected:
        np.testing.assert_array_equal(e, next(fresh))
    # Sanity: the batches after the save point differ from the first ones.
    assert not np.array_equal(expected[0], next(_iterator()))


class _Counter:
    """A data position that is not a grain iterator: any get_state()/set_state() pair."""

    def __init__(self):
        self.position = {"row": 0, "epoch": 0}

    def get_state(self):
        return dict(self.position)

    def set_state(self, state):
        self.position = dict(state)


def test_restore_any_data_state(tmp_path):
    counter = _Counter()
    counter.position = {"row": 17, "epoch": 2}
    with ckpt.Checkpointer(tmp_path) as c:
        c.save(3, _state_at(3), data_iterator=counter)
        counter.position["row"] = 99  # advanced right after the save: the saved state is the earlier one
    # The file is the JSON a grain DatasetIterator would write, one per process.
    data_dir = tmp_path / "checkpoints" / "3" / "data"
    assert [p.name for p in data_dir.iterdir() if p.name.startswith("process_")] == ["process_0-of-1.json"]
    fresh = _Counter()
    with ckpt.Checkpointer(tmp_path) as c:
        c.restore(3, jax.eval_shape(lambda: _state_at(3)), data_iterator=fresh)
    assert fresh.position == {"row": 17, "epoch": 2}


def test_restore_iterator_without_saved_data_raises(tmp_path):
    with ckpt.Checkpointer(tmp_path) as c:
        c.save(1, _state_at(1))
        with pytest.raises(ValueError, match="data-iterator"):
            c.restore(1, jax.eval_shape(lambda: _state_at(1)),
                      data_iterator=_iterator())


# -------------------------------------------------------- restore_params


def test_restore_params(tmp_path):
    s1, s2 = _train_state(1, seed=1), _train_state(1, seed=2)
    with ckpt.Checkpointer(tmp_path) as c:
        c.save(1, s1)
        c.save(2, s2)
    from_step = ckpt.restore_params(tmp_path / "checkpoints" / "1")
    from_workdir = ckpt.restore_params(tmp_path)
    from_root = ckpt.restore_params(tmp_path / "checkpoints")
    _assert_trees_equal(from_step, jax.device_get(s1["params"]))
    _assert_trees_equal(from_workdir, jax.device_get(s2["params"]))
    _assert_trees_equal(from_root, jax.device_get(s2["params"]))
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(from_workdir))
    assert from_workdir["layers"]["norm"]["scale"].dtype == jnp.bfloat16
    with pytest.raises(FileNotFoundError):
        ckpt.restore_params(tmp_path / "nowhere")


def test_restore_into_target_shardings(tmp_path):
    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("x",))
    n = len(devices)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    cols = jax.sharding.NamedSharding(mesh,
                                      jax.sharding.PartitionSpec(None, "x"))
    value = np.arange(n * 2 * n, dtype=np.float32).reshape(2 * n, n)
    state = {"params": {"w": {"kernel": jax.device_put(value, rows)}},
             "step": jnp.asarray(3)}
    with ckpt.Checkpointer(tmp_path) as c:
        c.save(3, state)
        target = {"params": {"w": {"kernel": jax.ShapeDtypeStruct(
            value.shape, value.dtype, sharding=cols)}},
                  "step": jax.ShapeDtypeStruct((), jnp.int32)}
        restored = c.restore(3, target)
    kernel = restored["params"]["w"]["kernel"]
    assert kernel.sharding == cols
    np.testing.assert_array_equal(np.asarray(kernel), value)
    assert int(restored["step"]) == 3
