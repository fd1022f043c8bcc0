"""Meshes, logical-axis rules, sharded init, expert parallelism, training, checkpoints and loading on 8 CPU devices."""

import functools
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import parallel as sharding
from dsjax.model import init_sharded_params, param_shardings
from dsjax import checkpoint as checkpoint_lib
from dsjax import recipes
from dsjax.train import config as config_lib
from dsjax.train import metrics as metrics_lib
from dsjax.train import optim
from dsjax.train import step as step_lib

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
    sharded = jax.device_put(params, param_shardings(config, mesh))
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
    params = init_sharded_params(config, mesh, jax.random.key(1))
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
    sharded = init_sharded_params(config, mesh, jax.random.key(3))
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
                jax.device_put(params, param_shardings(cfg, mesh)), tokens)
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
    config = config_lib.default_train_config()
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
            runs[preset] = workdir, recipes.run(config, str(workdir), mesh=mesh, print_fn=None)
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
    want_spec = param_shardings(result.model_config, mesh)["moe_layers"]["mlp"]["experts"]["gate_proj"]
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
    result = recipes.run(config, str(workdir), print_fn=lines.append)
    assert any("Resuming from step 3" in line for line in lines)
    got = _losses(workdir)
    np.testing.assert_allclose([got[4], got[5]], [want[4], want[5]], rtol=1e-5)
    kernel = result.state["params"]["moe_layers"]["mlp"]["experts"]["down_proj"]["kernel"]
    assert kernel.sharding.mesh.shape["expert"] == 4 and kernel.sharding.spec[1] == "expert"
    # The Checkpointer on its own: the step-5 state restores onto a 2 x 4 mesh as asked.
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), result.state)
    target_shardings = sharding.state_shardings(
        abstract, param_shardings(result.model_config, mesh, like=abstract["params"]), mesh)
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
        recipes.run(config, "/nonexistent/never/written", print_fn=None)
    config = _train_config()
    config.mesh.preset = "no_such_preset"
    with pytest.raises(ValueError, match="config.mesh.*no_such_preset"):
        config_lib.validate_train_config(config)
    assert sharding.mesh_sizes_from_config({"preset": "fsdp_expert", "expert": 2}) == {"fsdp": -1, "expert": 2}
    assert sharding.mesh_sizes_from_config({"preset": "fsdp", "expert": -1}) == {"expert": -1}
    assert sharding.mesh_sizes_from_config({"expert": 4}) == {"expert": 4, "data": -1}
    assert sharding.mesh_sizes_from_config(config_lib.default_train_config().mesh) == {"data": -1}
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


def _toy_moe_loss(params, frozen, batch, rng):
    """A linear 'router' over 8 experts; its aux reports each expert's load in the batch."""
    del frozen, rng
    scores = batch["x"] @ params["moe"]["router"]["kernel"]
    loss = jnp.mean((scores - batch["y"]) ** 2)
    load = jax.nn.one_hot(jnp.argmax(scores, -1), scores.shape[-1]).sum(0)
    return loss, dict(loss=loss), dict(moe=dict(expert_load=load))


def test_accumulated_step_on_a_mesh_equals_the_plain_step():
    rng = np.random.default_rng(0)
    params = {"moe": {"router": {"kernel": jnp.asarray(rng.standard_normal((3, 8)), jnp.float32),
                                 "e_score_correction_bias": jnp.zeros(8, jnp.float32)}}}
    batch = dict(x=rng.standard_normal((16, 3)).astype(np.float32), y=rng.standard_normal((16, 8)).astype(np.float32))
    opt_cfg = config_lib.default_optimizer_config()
    opt_cfg.update(learning_rate=0.1, warmup_steps=0, schedule="constant")
    tx = optim.make_optimizer(opt_cfg, params)
    common = dict(accumulation_steps=2, router_bias_update_rate=0.01)
    load = np.asarray(jax.nn.one_hot(jnp.argmax(batch["x"] @ params["moe"]["router"]["kernel"], -1), 8).sum(0))
    fresh_state = lambda: step_lib.init_train_state(jax.tree.map(jnp.array, params), tx)  # noqa: E731 (steps donate it)
    want_state, want = step_lib.make_train_step(_toy_moe_loss, tx, **common)(fresh_state(), batch)
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    step = step_lib.make_train_step(_toy_moe_loss, tx, mesh=mesh, **common)
    got_state, got = step(jax.device_put(fresh_state(), sharding.replicated(mesh)), batch)  # 16 host rows in
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)
    # Per expert shard (2 experts each): the busiest shard's load over the mean.
    per_shard = load.reshape(4, 2).sum(-1)
    np.testing.assert_allclose(float(got["expert_shard_load_max_over_mean"]), per_shard.max() / per_shard.mean())
    assert "expert_shard_load_max_over_mean" not in want


# ------------------------------------------------------------------ DSA kernels per batch shard

# 8 rows (one per device of the 2 x 2 x 2 data/fsdp/expert mesh) of T = 12 tokens: packed
# documents, padding, single documents.
DSA_SEGMENTS = np.array([[1] * 5 + [2] * 7] * 4 + [[1] * 12] * 2 + [[0] * 3 + [1] * 9] * 2)
DSA_MESH = {"data": 2, "fsdp": 2, "expert": 2}


def _dsa_config(impl):
    return dsjax.make_config("tiny_v32", num_layers=1, num_mtp_layers=0, index_topk=5, attention_impl=impl)


@functools.lru_cache(maxsize=None)
def _dsa_params():
    """Random parameters without compiling `init_params`: weights ~ N(0, 0.1^2), norm scales ~ 1."""
    from dsjax.model.transformer import abstract_params

    rng = np.random.default_rng(0)

    def draw(path, leaf):
        center = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(center + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(_dsa_config("xla")))


def _dsa_sparse_stage_step(config):
    """jitted params, tokens, segment_ids -> (gradient of LM proxy + indexer KL, (logits, indexer KL))
    in the sparse DSA stage: every kernel but the warm-up's `attention_target` runs."""
    from dsjax.model.transformer import forward

    def loss(params, tokens, segment_ids):
        out = forward(params, tokens, config, segment_ids=segment_ids, dsa_stage="sparse")
        kl = jnp.sum(out.aux["dense_layers"]["indexer_kl"])  # the one layer's
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 3]) + kl, (out.logits, kl)

    return jax.jit(jax.grad(loss, has_aux=True))


def _full_batch_all_gathers(hlo_text, batch, length):
    """(op_name, result shape) of every all-gather in compiled HLO whose result starts with the
    global [batch, length] (all-gathers combined into a tuple: each element)."""
    found = []
    for line in hlo_text.splitlines():
        if " all-gather(" not in line and " all-gather-start(" not in line:
            continue
        result_type = line.split("=", 1)[1].split("all-gather", 1)[0]
        op_name = re.search(r'op_name="([^"]*)"', line)
        for dims in re.findall(r"\[([\d,]*)\]", result_type):
            shape = tuple(int(d) for d in dims.split(",") if d)
            if shape[:2] == (batch, length):
                found.append((op_name.group(1) if op_name else "", shape))
    return found


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_dsa_kernels_run_per_batch_shard(impl):
    """A V3.2 model on an 8-device mesh: the DSA kernels run inside shard_map on each device's rows
    (`dsjax.model.mla._per_batch_shard`), so logits, the sparse stage's indexer KL and all gradients
    equal the one-device run, and XLA gathers no full-batch attention activation to every device
    (without shard_map it gathers the queries, latents and index scores for the kernels)."""
    config, params = _dsa_config(impl), _dsa_params()
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, DSA_SEGMENTS.shape))
    segment_ids = jnp.asarray(DSA_SEGMENTS)
    step = _dsa_sparse_stage_step(config)
    want_grads, (want_logits, want_kl) = step(params, tokens, segment_ids)

    mesh = sharding.make_mesh(DSA_MESH)
    sharded = jax.device_put(params, param_shardings(config, mesh))
    batch = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (tokens, segment_ids)]
    with jax.set_mesh(mesh):
        compiled = step.lower(sharded, *batch).compile()
        grads, (logits, kl) = compiled(sharded, *batch)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5 * float(np.abs(want_logits).max()))
    assert float(want_kl) > 1e-3
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5)
    for path, want in jax.tree_util.tree_leaves_with_path(want_grads):
        got = dict(jax.tree_util.tree_leaves_with_path(grads))[path]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()),
                                   err_msg=jax.tree_util.keystr(path))

    hlo = compiled.as_text()
    assert re.search(r'all-gather.*op_name="[^"]*/attention/', hlo)  # the FSDP weight gathers: names are there
    gathered = _full_batch_all_gathers(hlo, *DSA_SEGMENTS.shape)
    assert not [(name, shape) for name, shape in gathered if "/attention/" in name], gathered


def test_dsa_decoding_on_a_mesh():
    """Generation of a V3.2 model under a mesh: prefill and decode steps run `indexer_topk` /
    `sparse_mla` per batch shard (keyword operands: the key segments and the traced cache column as
    q_offset; 4 rows split over `data` only); greedy tokens and logits equal the one-device run. The
    "xla" kernels: the shard_map path is the same for both impls, and they compile faster."""
    from dsjax.api import LanguageModel
    from dsjax.inference.generate import left_pad

    config, params = _dsa_config("xla"), _dsa_params()
    rng = np.random.default_rng(2)
    prompts, lengths = left_pad([rng.integers(0, 259, n) for n in (9, 5, 7, 6)])
    run = lambda lm: lm.generate(prompts, 4, temperature=0.0, prompt_lengths=lengths, return_logits=True)  # noqa: E731
    want = run(LanguageModel(config, params))
    mesh = sharding.make_mesh({"data": 2, "expert": 4})  # 4 rows: split over `data` only
    got = run(LanguageModel(config, jax.device_put(params, param_shardings(config, mesh)), mesh))
    assert prompts.shape[1] + 4 > config.index_topk
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5 * float(np.abs(want.logits).max()))
