"""The DSA training stages, the "dsa" recipe on the shared loop: the dense warm-up (only the
indexers learn, by KL to the attention distribution) and sparse training (LM loss for the model,
detached KL for the indexer), run through the recipe dispatch `experiments.train` uses, on CPU."""

import importlib
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from dsjax import checkpoint as ckpt
from dsjax import parallel as sharding
from dsjax import recipes
from dsjax.recipes import dsa
from dsjax.train import metrics
from dsjax.tree import path_names

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


DENSE_STEPS = 60


def _one_device():
    # conftest fakes 8 CPU devices; these runs test the recipe, not data parallelism (test_sharding.py).
    return sharding.make_mesh({"data": 1}, jax.devices()[:1])


def _config(name, **overrides):
    config = importlib.import_module(f"configs.{name}").get_config()
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    config.async_checkpointing = False
    config.tensorboard = False
    config.data.read_threads = 1
    return config


def _params(workdir):
    return ckpt.restore_params(os.path.join(workdir, "checkpoints", str(ckpt.complete_steps(
        os.path.join(workdir, "checkpoints"))[-1])))


def _flat(params):
    return {"/".join(path_names(path)): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory):
    """configs/dsa_warmup.py as shipped (80 warm-up steps) after a shorter dense phase (CI time)."""
    workdir = str(tmp_path_factory.mktemp("dsa_warmup"))
    lines = []
    config = _config("dsa_warmup", **{"dsa.dense_pretrain_steps": DENSE_STEPS})
    result = recipes.run(config, workdir, print_fn=lines.append, mesh=_one_device())
    return workdir, result, lines


def test_warmup_lowers_indexer_kl_and_raises_recall(warmup_run):
    workdir, result, lines = warmup_run
    assert result.step == 80
    entries = metrics.read_metrics(workdir)
    assert [e["step"] for e in entries][:2] == [1, 10] and entries[-1]["step"] == 80
    first, last = entries[0], entries[-1]
    # The bar: at least 30% lower KL and higher top-k recall after 80 steps.
    assert last["indexer_kl"] <= 0.7 * first["indexer_kl"], (first, last)
    assert last["topk_attention_recall"] > first["topk_attention_recall"], (first, last)
    assert 0.0 < first["topk_attention_recall"] < 1.0
    # The warm-up's loss is the KL itself; the dense phase before it logged none.
    assert last["loss"] == pytest.approx(last["indexer_kl"], rel=1e-6)
    dense_entries = metrics.read_metrics(os.path.join(workdir, dsa.DENSE_PRETRAIN_DIR))
    assert dense_entries[-1]["step"] == DENSE_STEPS and "indexer_kl" not in dense_entries[-1]
    assert dense_entries[-1]["lm_loss"] < dense_entries[0]["lm_loss"] - 1.0
    assert any("dense pre-training first" in line for line in lines)
    assert any("indexer kl" in line and "top-k recall" in line for line in lines)


def test_warmup_trains_only_the_indexers(warmup_run):
    workdir = warmup_run[0]
    before = _flat(_params(os.path.join(workdir, dsa.DENSE_PRETRAIN_DIR)))
    after = _flat(_params(workdir))
    assert before.keys() == after.keys()
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    indexer = {name for name in before if "/indexer/" in name}
    assert indexer and changed == indexer, sorted(changed ^ indexer)[:5]


def test_sparse_stage_from_init_from(warmup_run, tmp_path):
    """dsa_sparse from the warm-up's result: the model learns (LM loss) and the indexer keeps
    tracking the attention over its selection; indexer params move only by their own loss."""
    warm = warmup_run[0]
    lines = []
    config = _config("dsa_sparse", init_from=warm, num_steps=12, log_every=4, checkpoint_every=12,
                     **{"optimizer.decay_steps": 12, "optimizer.warmup_steps": 2})
    result = recipes.run(config, str(tmp_path), print_fn=lines.append, mesh=_one_device())
    assert result.step == 12
    assert not os.path.exists(tmp_path / dsa.DENSE_PRETRAIN_DIR)  # init_from given: no dense phase
    entries = metrics.read_metrics(str(tmp_path))
    for entry in entries:
        assert 0.0 < entry["topk_attention_recall"] <= 1.0
        assert entry["indexer_kl"] >= 0.0
        # The sparse stage minimises LM + MTP + balance + KL.
        assert entry["loss"] > entry["lm_loss"] + entry["indexer_kl"] - 1e-6
    assert entries[-1]["lm_loss"] < entries[0]["lm_loss"]
    before, after = _flat(_params(warm)), _flat(_params(str(tmp_path)))
    assert all(not np.array_equal(before[name], after[name]) for name in before if name.endswith("q_b_proj/kernel"))
    assert all(not np.array_equal(before[name], after[name]) for name in before if name.endswith("indexer/wk/kernel"))


def test_dsa_stage_errors(tmp_path):
    config = _config("dsa_warmup", **{"dsa.stage": "sparce"})
    with pytest.raises(ValueError, match="dsa.stage must be one of"):
        recipes.run(config, str(tmp_path))
    config = _config("smoke", **{"recipe": "dsa", "dsa.stage": "warmup"})
    with pytest.raises(ValueError, match=r"config.dsa.stage='warmup' needs a model with an indexer"):
        recipes.run(config, str(tmp_path))
    config = _config("dsa_warmup", **{"dsa.stage": "dense"})  # a pre-training stage, not a DSA one
    with pytest.raises(ValueError, match=r"the 'dsa' recipe's dsa.stage must be one of"):
        recipes.run(config, str(tmp_path))
    config = _config("dsa_warmup", recipe="pretrain")  # a DSA stage needs the dsa recipe
    with pytest.raises(ValueError, match=r"config.dsa.stage='warmup' is a DSA training stage.*recipe='dsa'"):
        recipes.run(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")
    assert not os.path.exists(tmp_path / dsa.DENSE_PRETRAIN_DIR)
