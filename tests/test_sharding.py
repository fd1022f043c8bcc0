"""Meshes, logical-axis rules, sharded init, expert parallelism, training, checkpoints and loading on 8 CPU devices."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import sharding
from dsjax.train import checkpoint as checkpoint_lib
from dsjax.train import loop
from dsjax.train import metrics as metrics_lib
from dsjax.train import optim

MESHES = ["fsdp", "fsdp_expert", "expert_tensor", {"data": 2, "expert": 2, "tensor": 2}]


@pytest.fixture(scope="module")
def setup():
    config = dsjax.make_config("tiny_v3", num_layers=2, num_routed_experts=16, num_expert_groups=4, hidden_size=64,
                               num_heads=4)
    params = dsjax.init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (8, 16)))
    want_logits = jax.jit(lambda p, t: dsjax.forward(p, t, config).logits)(params, tokens)
    want_grads = jax.jit(jax.grad(_loss(config)))(params, tokens)
    return config, params, tokens, want_logits, want_grads


def _loss(config):
    def loss(params, tokens):
        out = dsjax.forward(params, tokens, config)
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 3]) + jnp.mean(out.mtp_logits ** 2)
    return loss


def test_mesh_shapes_and_errors():
    assert sharding.resolve_mesh_shape({"fsdp": -1, "expert": 4}, 8) == dict(data=1, fsdp=2, expert=4, tensor=1)
    assert sharding.resolve_mesh_shape("expert_tensor", 8) == dict(data=1, fsdp=1, expert=4, tensor=2)
    with pytest.raises(ValueError, match="mesh axes \\['pipeline'\\]"):
        sharding.resolve_mesh_shape({"pipeline": 2}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.resolve_mesh_shape({"fsdp": -1, "expert": 3}, 8)
    with pytest.raises(ValueError, match="has 4 devices, but 8"):
        sharding.resolve_mesh_shape({"fsdp": 4}, 8)


@pytest.mark.parametrize("mesh_config", MESHES, ids=str)
def test_logits_and_gradients_match_single_device(setup, mesh_config):
    config, params, tokens, want_logits, want_grads = setup
    loss = _loss(config)
    mesh = sharding.make_mesh(mesh_config)
    sharded = jax.device_put(params, sharding.param_shardings(config, mesh))
    batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda p, t: dsjax.forward(p, t, config).logits)(sharded, batch)
        grads = jax.jit(jax.grad(loss))(sharded, batch)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_routed_experts_are_split_over_expert_axis(setup):
    config = setup[0]
    mesh = sharding.make_mesh("fsdp_expert")  # fsdp 2 x expert 4
    params = sharding.init_sharded_params(config, mesh, jax.random.key(1))
    kernel = params["moe_layers"]["mlp"]["experts"]["gate_proj"]["kernel"]  # [L, E, D, F]
    assert kernel.shape[1] == 16 and kernel.shape[0] == 1
    shard_shapes = {s.data.shape for s in kernel.addressable_shards}
    assert shard_shapes == {(kernel.shape[0], 16 // 4, kernel.shape[2] // 2, kernel.shape[3])}
    # Each device holds a distinct quarter of the experts.
    experts_of = {s.device: s.index[1] for s in kernel.addressable_shards}
    assert len({(sl.start, sl.stop) for sl in experts_of.values()}) == 4
    # A dimension the axis does not divide stays replicated rather than failing.
    odd = sharding.physical_spec(jax.sharding.PartitionSpec("embed", "mlp"), (7, 8), mesh)
    assert odd == jax.sharding.PartitionSpec(None, None)


def test_sharded_init_equals_unsharded_init(setup):
    config = setup[0]
    mesh = sharding.make_mesh("expert_tensor")
    sharded = sharding.init_sharded_params(config, mesh, jax.random.key(3))
    plain = dsjax.init_params(config, jax.random.key(3))
    for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_capacity_factor_drops_and_dropless_does_not(setup):
    config, params, tokens, want, _ = setup
    mesh = sharding.make_mesh({"expert": 8})
    from dsjax.model.transformer import build

    def run(cfg):
        with jax.set_mesh(mesh):
            out, state = jax.jit(lambda p, t: build(cfg).apply({"params": p}, t, mutable=["intermediates"]))(
                jax.device_put(params, sharding.param_shardings(cfg, mesh)), tokens)
        dropped = jax.tree_util.tree_leaves(state["intermediates"])
        return out.logits, sum(float(jnp.sum(d)) for d in dropped)

    dropless, dropped = run(config)
    assert dropped == 0
    np.testing.assert_allclose(dropless, want, rtol=1e-5, atol=1e-5)
    tight, dropped_tight = run(dsjax.make_config(config, expert_capacity_factor=0.5))
    assert dropped_tight > 0
    assert float(jnp.max(jnp.abs(tight - want))) > 1e-3


# ------------------------------------------------------------------ the training loop on a mesh

PRESETS = ["fsdp", "fsdp_expert", "expert_tensor"]


def _train_config(**overrides):
    """5 steps of a tiny MoE model (12 routed experts, no MTP) on 8 rows of 16 tokens."""
    config = loop.default_train_config()
    config.model = dsjax.make_config("tiny_v3", hidden_size=32, num_layers=2, num_mtp_layers=0,
                                     dense_intermediate_size=48, moe_intermediate_size=16)
    config.update(dict(num_steps=5, batch_size=8, seq_len=16, log_every=1, checkpoint_every=3, tensorboard=False,
                       async_checkpointing=False))
    config.optimizer.update(dict(learning_rate=3e-3, warmup_steps=2, decay_steps=5))
    config.data.read_threads = 1
    config.update(overrides)
    return config


def _losses(workdir):
    return {entry["step"]: entry["loss"] for entry in metrics_lib.read_metrics(str(workdir))}


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    """preset -> (workdir, TrainResult), each run once; "single" runs on one device."""
    runs = {}

    def run(preset):
        if preset not in runs:
            workdir = tmp_path_factory.mktemp(f"train_{preset}")
            config = _train_config()
            mesh = None
            if preset == "single":
                mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
            else:
                config.mesh.preset = preset
            runs[preset] = workdir, loop.train(config, str(workdir), mesh=mesh, print_fn=None)
        return runs[preset]

    return run


@pytest.mark.parametrize("preset", PRESETS)
def test_training_on_a_mesh_matches_one_device(train_runs, preset):
    want = _losses(train_runs("single")[0])
    workdir, result = train_runs(preset)
    got = _losses(workdir)
    assert sorted(got) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
    mesh = sharding.make_mesh(preset)
    # The trained state stays in its shardings: routed experts split over `expert`, the Adam moments
    # sharded like their parameters.
    params = result.state["params"]
    kernel = params["moe_layers"]["mlp"]["experts"]["gate_proj"]["kernel"]  # [L, E, D, F]
    want_spec = sharding.param_shardings(result.model_config, mesh)["moe_layers"]["mlp"]["experts"]["gate_proj"]
    assert kernel.sharding.spec == want_spec["kernel"].spec
    experts = mesh.shape["expert"]
    assert {s.data.shape[1] for s in kernel.addressable_shards} == {kernel.shape[1] // experts}
    if experts > 1:
        assert kernel.sharding.spec[1] == "expert"
        assert result.metrics["expert_shard_load_max_over_mean"] >= 1.0
    moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(result.state["opt_state"])[0]
               if jax.tree_util.keystr(path).endswith("['moe_layers']['mlp']['experts']['gate_proj']['kernel']")]
    assert len(moments) == 2 and all(m.sharding.spec == kernel.sharding.spec for m in moments)
    assert result.state["step"].sharding.is_fully_replicated


def test_checkpoint_from_one_mesh_resumes_on_another(train_runs, tmp_path):
    want = _losses(train_runs("single")[0])
    source, _ = train_runs("fsdp")  # checkpoints at steps 3 and 5
    workdir = tmp_path / "resumed"
    shutil.copytree(source, workdir)
    shutil.rmtree(workdir / "checkpoints" / "5")
    config = _train_config()
    config.mesh.preset = "expert_tensor"
    lines = []
    result = loop.train(config, str(workdir), print_fn=lines.append)
    assert any("Resuming from step 3" in line for line in lines)
    got = _losses(workdir)
    np.testing.assert_allclose([got[4], got[5]], [want[4], want[5]], rtol=1e-5)
    kernel = result.state["params"]["moe_layers"]["mlp"]["experts"]["down_proj"]["kernel"]
    assert kernel.sharding.mesh.shape["expert"] == 4 and kernel.sharding.spec[1] == "expert"
    # The Checkpointer on its own: the step-5 state restores onto a 2 x 4 mesh as asked.
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), result.state)
    target_shardings = sharding.state_shardings(
        abstract, sharding.shardings_for(abstract["params"], result.model_config, mesh), mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                          target_shardings)
    with checkpoint_lib.Checkpointer(str(workdir)) as checkpointer:
        restored = checkpointer.restore(5, target)
    for got_leaf, want_leaf, s in zip(jax.tree.leaves(restored), jax.tree.leaves(result.state),
                                      jax.tree.leaves(target_shardings)):
        assert got_leaf.sharding == s
        np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))


def test_train_mesh_config_errors():
    config = _train_config(batch_size=4)
    config.mesh.fsdp = -1  # batch split 8 ways
    with pytest.raises(ValueError, match="config.batch_size=4"):
        loop.train(config, "/nonexistent/never/written", print_fn=None)
    config = _train_config()
    config.mesh.preset = "no_such_preset"
    with pytest.raises(ValueError, match="config.mesh.*no_such_preset"):
        loop.validate_train_config(config)
    assert sharding.mesh_sizes_from_config({"preset": "fsdp_expert", "expert": 2}) == {"fsdp": -1, "expert": 2}
    assert sharding.mesh_sizes_from_config({"preset": "fsdp", "expert": -1}) == {"expert": -1}
    assert sharding.mesh_sizes_from_config({"expert": 4}) == {"expert": 4, "data": -1}
    assert sharding.mesh_sizes_from_config(loop.default_train_config().mesh) == {"data": -1}
    with pytest.raises(ValueError, match="mesh.tensor=0"):
        sharding.mesh_sizes_from_config({"tensor": 0})


# ------------------------------------------------------------------ dsjax.load onto a mesh


def test_load_onto_a_mesh(train_runs, tmp_path):
    from dsjax.convert import orbax_to_hf

    workdir, _ = train_runs("single")
    hf_dir = str(tmp_path / "hf")
    orbax_to_hf(str(workdir), hf_dir, dtype="float32", stream=None)
    tokens = np.random.default_rng(1).integers(0, 259, (4, 12))
    plain = dsjax.load(str(workdir))
    want = np.asarray(plain(tokens))
    for path in (str(workdir), hf_dir):  # a training run (Orbax) and an HF checkpoint
        lm = dsjax.load(path, mesh={"expert": 4, "data": 2})
        assert dict(lm.mesh.shape) == dict(data=2, fsdp=1, expert=4, tensor=1)
        kernel = lm.params["moe_layers"]["mlp"]["experts"]["up_proj"]["kernel"]
        assert kernel.sharding.spec[1] == "expert"
        assert {s.data.shape[1] for s in kernel.addressable_shards} == {kernel.shape[1] // 4}
        np.testing.assert_allclose(np.asarray(lm(tokens)), want, rtol=1e-5, atol=1e-5)
    # Generation runs under the mesh too (greedy: the same tokens).
    want_tokens = plain.generate(tokens[:2, :6], max_new_tokens=3, temperature=0.0).tokens
    got_tokens = lm.generate(tokens[:2, :6], max_new_tokens=3, temperature=0.0).tokens
    np.testing.assert_array_equal(np.asarray(got_tokens), np.asarray(want_tokens))


def _toy_moe_loss(params, batch, model_config, rng):
    """A linear 'router' over 8 experts; its aux reports each expert's load in the batch."""
    del model_config, rng
    scores = batch["x"] @ params["moe"]["router"]["kernel"]
    loss = jnp.mean((scores - batch["y"]) ** 2)
    load = jax.nn.one_hot(jnp.argmax(scores, -1), scores.shape[-1]).sum(0)
    return loss, dict(loss=loss), dict(moe=dict(expert_load=load))


def test_accumulated_step_on_a_mesh_equals_the_plain_step():
    rng = np.random.default_rng(0)
    params = {"moe": {"router": {"kernel": jnp.asarray(rng.standard_normal((3, 8)), jnp.float32),
                                 "e_score_correction_bias": jnp.zeros(8, jnp.float32)}}}
    batch = dict(x=rng.standard_normal((16, 3)).astype(np.float32), y=rng.standard_normal((16, 8)).astype(np.float32))
    opt_cfg = optim.default_optimizer_config()
    opt_cfg.update(learning_rate=0.1, warmup_steps=0, schedule="constant")
    tx = optim.make_optimizer(opt_cfg, params)
    common = dict(accumulation_steps=2, router_bias_update_rate=0.01)
    load = np.asarray(jax.nn.one_hot(jnp.argmax(batch["x"] @ params["moe"]["router"]["kernel"], -1), 8).sum(0))
    fresh_state = lambda: loop.init_train_state(jax.tree.map(jnp.array, params), tx)  # noqa: E731 (steps donate it)
    want_state, want = loop.make_train_step(None, _toy_moe_loss, tx, **common)(fresh_state(), batch)
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    step = loop.make_train_step(None, _toy_moe_loss, tx, mesh=mesh, **common)
    got_state, got = step(jax.device_put(fresh_state(), sharding.replicated(mesh)), batch)  # 16 host rows in
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)
    # Per expert shard (2 experts each): the busiest shard's load over the mean.
    per_shard = load.reshape(4, 2).sum(-1)
    np.testing.assert_allclose(float(got["expert_shard_load_max_over_mean"]), per_shard.max() / per_shard.mean())
    assert "expert_shard_load_max_over_mean" not in want
