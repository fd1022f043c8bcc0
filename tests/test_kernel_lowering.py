"""Every DSA Pallas kernel lowered, not compiled, for the platform its style is written for, on
this accelerator-less machine: `jax.jit(f).trace(*shapes).lower(lowering_platforms=(p,))` runs
the Pallas -> Triton (GPU style, p = "cuda") and Pallas -> Mosaic (TPU style, p = "tpu")
lowerings in Python.

What this catches: primitives a backend cannot lower (custom_jvp ReLU, traced rolls, slices of
register tensors, batched dots on Triton), block-shape rules (powers of two on Triton, (8, 128)
tiles on TPU), and the choice of Triton over Mosaic GPU. What it cannot catch: Triton's and
Mosaic's own compiler passes (register / shared-memory / VMEM budgets, Mosaic vector layouts),
or wrong results on hardware.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import pytest

from dsjax.kernels import attention_lse, attention_target, attention_target_at, indexer_topk, sparse_mla

S = jax.ShapeDtypeStruct

# platform, impl, the lowering module that must import, the custom call each kernel becomes
STYLES = {
    "gpu": ("cuda", "pallas_gpu", "jax._src.pallas.triton.pallas_call_registration", "__gpu$xla.gpu.triton"),
    "tpu": ("tpu", "pallas_tpu", "jax._src.pallas.mosaic.pallas_call_registration", "tpu_custom_call"),
}

# DeepSeek-V3.2: Dk = 512 latent + 64 rope, dv = 512, 128 heads (16 per device under 8-way head
# sharding), 64 index heads of dim 128, top-2048. "odd": T, H, K, d not multiples of any block.
SHAPES = {
    "v32_h128_k2048_bf16": dict(batch=1, length=4096, heads=128, dk=576, dv=512, topk=2048, index_heads=64,
                                index_dim=128, dtype=jnp.bfloat16),
    "v32_h16_k64_f32": dict(batch=2, length=4100, heads=16, dk=576, dv=512, topk=64, index_heads=64,
                            index_dim=128, dtype=jnp.float32),
    "odd": dict(batch=2, length=45, heads=3, dk=24, dv=16, topk=20, index_heads=3, index_dim=12,
                dtype=jnp.float32),
}


def _sparse_fwd(impl, shape):
    b, t, h, dk, dv, k, dt = (shape[n] for n in ("batch", "length", "heads", "dk", "dv", "topk", "dtype"))
    fn = lambda q, kv, idx: sparse_mla(q, kv, idx, scale=0.1, dv=dv, impl=impl, interpret=False)
    return fn, (S((b, t, h, dk), dt), S((b, t, dk), dt), S((b, t, k), jnp.int32)), 1


def _sparse_bwd(impl, shape):
    fn, args, _ = _sparse_fwd(impl, shape)

    def grads(q, kv, idx):
        loss = lambda q, kv: jnp.sum(fn(q, kv, idx).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1))(q, kv)

    return grads, args, 2  # the forward kernel (residuals) and the backward kernel


def _indexer(impl, shape):
    b, t, hi, d, k, dt = (shape[n] for n in ("batch", "length", "index_heads", "index_dim", "topk", "dtype"))
    fn = lambda q, key, w, seg: indexer_topk(q, key, w, seg, topk=k, impl=impl, interpret=False)
    return fn, (S((b, t, hi, d), dt), S((b, t, d), dt), S((b, t, hi), jnp.float32), S((b, t), jnp.int32)), 1


def _dense(fn, kernels):
    def make(impl, shape):
        b, t, h, dk, dt = (shape[n] for n in ("batch", "length", "heads", "dk", "dtype"))
        call = lambda q, kv, seg: fn(q, kv, seg, scale=0.1, impl=impl, interpret=False)
        return call, (S((b, t, h, dk), dt), S((b, t, dk), dt), S((b, t), jnp.int32)), kernels

    return make


def _target_at(given_lse):
    def make(impl, shape):
        b, t, h, dk, k, dt = (shape[n] for n in ("batch", "length", "heads", "dk", "topk", "dtype"))
        args = (S((b, t, h, dk), dt), S((b, t, dk), dt), S((b, t, k), jnp.int32))
        if given_lse:
            call = lambda q, kv, idx, lse: attention_target_at(q, kv, idx, scale=0.1, lse=lse, impl=impl,
                                                               interpret=False)
            return call, args + (S((b, t, h), jnp.float32),), 1
        return (lambda q, kv, idx: attention_target_at(q, kv, idx, scale=0.1, impl=impl, interpret=False)), args, 1

    return make


KERNELS = {
    "sparse_mla_fwd": _sparse_fwd,
    "sparse_mla_bwd": _sparse_bwd,
    "indexer_topk": _indexer,
    "attention_lse": _dense(attention_lse, 1),
    "attention_target": _dense(attention_target, 2),  # lse pass + probability pass
    "attention_target_at": _target_at(False),
    "attention_target_at_lse": _target_at(True),
}


@functools.cache
def _lowering_available(module):
    """None, or why this jaxlib cannot lower Pallas for that platform at all (not our code)."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        return f"{module} cannot be imported in this jaxlib: {err}"
    return None


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("style", list(STYLES))
def test_kernel_lowers(style, kernel, shape):
    platform, impl, module, custom_call = STYLES[style]
    reason = _lowering_available(module)
    if reason:
        pytest.skip(reason)
    fn, args, kernels = KERNELS[kernel](impl, SHAPES[shape])
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    # each Pallas kernel is one custom call (an XLA fallback would have none); on GPU, none of
    # them went to Mosaic GPU
    assert text.count(f"custom_call @{custom_call}") == kernels, text.count(f"custom_call @{custom_call}")
    assert "mosaic_gpu" not in text
