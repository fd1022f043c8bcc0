"""Meshes, logical-axis rules, sharded init and expert parallelism on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import sharding

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
