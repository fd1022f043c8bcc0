"""Parameter counts, logical axes, stacking and compile size, config validation."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.model.summary import parameter_counts


def test_671b_presets_have_published_sizes():
    # DeepSeek-V3 report: 671B total, 37B activated per token, plus 14B for the MTP module as stored.
    for preset in ("v3_671b", "v31_671b", "v32_671b"):
        counts = parameter_counts(dsjax.make_config(preset))
        assert 670e9 < counts["total"] < 673e9, (preset, counts)
        assert 36.5e9 < counts["active"] < 39e9, (preset, counts)
        assert 13e9 < counts["mtp_stored"] < 14.5e9, (preset, counts)


def test_small_preset_is_benchmark_sized():
    assert 100e6 < parameter_counts(dsjax.make_config("small_v32"))["total"] < 300e6


def test_summary_cli_prints_counts():
    out = subprocess.run([sys.executable, "-m", "dsjax.model.summary", "--model", "v3_671b"],
                         capture_output=True, text=True, check=True).stdout
    assert "671.03B" in out and "active per token:        37.55B" in out


def test_every_parameter_has_logical_axes():
    config = dsjax.make_config("tiny_v32")
    shapes = dsjax.abstract_params(config)
    axes = dsjax.logical_axes(config)
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    flat_axes = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    assert len(flat_shapes) == len(flat_axes)
    for path, leaf in flat_shapes:
        spec = flat_axes[path]
        assert len(spec) == leaf.ndim and all(name is not None for name in spec), (jax.tree_util.keystr(path), spec)
    experts = axes["moe_layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
    assert tuple(experts) == ("layers", "expert", "embed", "mlp")


def test_compile_size_does_not_grow_with_depth():
    def hlo_size(layers):
        config = dsjax.make_config("tiny_v3", num_layers=layers, num_mtp_layers=0)
        params = dsjax.abstract_params(config)
        lowered = jax.jit(lambda p, t: dsjax.forward(p, t, config).logits).lower(params, jnp.zeros((1, 8), jnp.int32))
        return len(lowered.as_text())

    assert hlo_size(12) < 1.1 * hlo_size(3)


def test_padding_does_not_change_real_tokens():
    config = dsjax.make_config("tiny_v32")
    params = dsjax.init_params(config, jax.random.key(0))
    forward = jax.jit(lambda p, t, s: dsjax.forward(p, t, config, segment_ids=s))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 259, (1, 12)))
    alone = forward(params, tokens, None).logits
    padded = jnp.concatenate([tokens, jnp.zeros((1, 5), jnp.int32)], 1)
    segments = jnp.asarray([[1] * 12 + [0] * 5])
    out = forward(params, padded, segments)
    np.testing.assert_allclose(out.logits[:, :12], alone, rtol=1e-5, atol=1e-5)
    # Padding tokens are not counted as routed load.
    load = out.aux["moe_layers"]["expert_load"]
    assert np.allclose(np.asarray(load).sum(-1), 12 * config.num_experts_per_token)


@pytest.mark.parametrize("field,value,message", [
    ("num_expert_groups", 5, "divisible by num_expert_groups"),
    ("num_selected_groups", 9, "num_selected_groups"),
    ("qk_rope_head_dim", 7, "must be even"),
    ("dtype", "float64", "dtype"),
])
def test_bad_config_is_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        dsjax.make_config("tiny_v3", **{field: value})


def test_unknown_preset_and_field_are_named():
    with pytest.raises(ValueError, match="unknown model preset 'v4'"):
        dsjax.make_config("v4")
    with pytest.raises(ValueError, match="hidden_sise"):
        dsjax.make_config("tiny_v3", hidden_sise=3)
