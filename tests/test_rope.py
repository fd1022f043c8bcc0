"""YaRN frequencies and scaling against HF, and the two rotary layouts."""

import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.model.mla import softmax_scale
from dsjax.model.rope import apply_rope, inverse_frequencies, rope_tables


@pytest.mark.parametrize("preset", ["tiny_v3", "v3_671b", "small_v32"])
def test_yarn_frequencies_and_softmax_scale_match_hf(preset):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
    from hf_reference import hf_config_for

    config = dsjax.make_config(preset)
    hf_config = hf_config_for(config)
    want_freqs, want_magnitude = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    np.testing.assert_allclose(inverse_frequencies(config.qk_rope_head_dim, config.rope_theta, dict(config.rope_scaling),
                                                   config.max_position_embeddings), want_freqs.numpy(), rtol=1e-6)
    cos, _ = rope_tables(jnp.zeros((1, 1)), config)
    np.testing.assert_allclose(float(cos[0, 0, 0]), want_magnitude, rtol=1e-6)
    if preset != "v3_671b":  # building the full-size HF attention layer would allocate GBs
        assert softmax_scale(config) == pytest.approx(DeepseekV3Attention(hf_config, 0).scaling, rel=1e-6)
    # YaRN with factor > 1 really changes the low frequencies and the scale.
    plain = inverse_frequencies(config.qk_rope_head_dim, config.rope_theta, None, config.max_position_embeddings)
    assert plain[-1] > want_freqs.numpy()[-1] * 1.5
    assert softmax_scale(config) > (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5


def test_interleaved_is_half_split_on_deinterleaved_dims():
    rng = np.random.default_rng(0)
    config = dsjax.make_config("tiny_v3")
    x = jnp.asarray(rng.normal(size=(2, 5, 3, config.qk_rope_head_dim)), jnp.float32)
    cos, sin = rope_tables(jnp.asarray(rng.integers(0, 100, (2, 5))), config)
    perm = np.concatenate([np.arange(0, x.shape[-1], 2), np.arange(1, x.shape[-1], 2)])
    interleaved = apply_rope(x, cos, sin, interleaved=True)
    half = apply_rope(x[..., perm], cos, sin, interleaved=False)
    np.testing.assert_allclose(interleaved[..., perm], half, rtol=1e-6, atol=1e-6)
    # The first pair rotates by angle position * freq_0 = position (freq_0 = 1).
    pos = 7
    c, s = rope_tables(jnp.full((1, 1), pos), config)
    pair = apply_rope(jnp.asarray([[[1.0, 0.0] + [0.0] * (x.shape[-1] - 2)]]), c, s, interleaved=True)
    np.testing.assert_allclose(np.asarray(pair)[0, 0, :2], [np.cos(pos), np.sin(pos)], atol=1e-6)


@pytest.mark.parametrize("interleaved", [True, False])
def test_scores_depend_only_on_relative_position(interleaved):
    rng = np.random.default_rng(1)
    config = dsjax.make_config("tiny_v3", rope_scaling=None)
    q = jnp.asarray(rng.normal(size=(1, 1, config.qk_rope_head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, config.qk_rope_head_dim)), jnp.float32)

    def score(m, n):
        cq, sq = rope_tables(jnp.full((1, 1), m), config)
        ck, sk = rope_tables(jnp.full((1, 1), n), config)
        return float(jnp.sum(apply_rope(q, cq, sq, interleaved=interleaved) * apply_rope(k, ck, sk, interleaved=interleaved)))

    assert score(10, 3) == pytest.approx(score(27, 20), abs=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)
