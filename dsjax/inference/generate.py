"""Autoregressive generation: a jitted prefill + `lax.while_loop` decode, both the model's one forward
pass (`dsjax.model.forward`) over MLA's latent cache (`dsjax.model.cache`).

    out = generate(params, config, prompts, max_new_tokens=64, temperature=0.7, top_p=0.95, seed=0)
    out.tokens              # [B, T + N]: the (left-padded) prompts, then the generated tokens

Conventions (chosen for RL post-training, where the output is scored again by `forward`):

* **Left padding.** `prompts` is [B, T] with row b's prompt in its *last* `prompt_lengths[b]`
  columns; `left_pad` builds that from ragged lists. Every row then generates into the same
  columns T, T+1, ..., so a decode step writes one cache column for the whole batch. Positions
  restart at 0 at each row's first prompt token; padding is never attended to.
* **Log-probabilities.** `logprobs[b, j]` is the log-probability of the sampled token under the
  *model* distribution: `log_softmax(logits)` at temperature 1, untruncated (what a plain
  `forward` gives). `sampling_logprobs[b, j]` is its log-probability under the distribution the
  sampler *actually used*: logits / temperature, restricted to the top-k/top-p kept set and
  renormalised (GRPO's pi_old). Greedy decoding (temperature 0) samples a point mass:
  `sampling_logprobs` is 0.
* **Truncation mask, stored compactly.** The kept set of a step is always a prefix of the
  vocabulary sorted by logit, so it is stored as one float per step: `truncation_cutoff[b, j]`,
  a threshold on the (temperature-1) logits; the kept set is exactly `logits >= cutoff`
  (`truncation_mask` rebuilds it). The cutoff lies halfway between the last kept and the first
  dropped logit, so logits recomputed by a training forward pass (which differ from the
  sampler's by rounding) give the same set unless they move by half that gap. -inf: nothing
  was truncated. `kept_count[b, j]` is the size of the set.
* **Stopping.** A row ends at the first token in `stop_tokens` (that token is part of its
  output). `done[b, j]` is True where the row had already ended before step j: token j is
  `pad_token` and not part of the output; `lengths[b]` counts the generated tokens that are.
  The loop exits early once every row has ended.
* **Routing.** `expert_indices` = {"moe_layers": int [L_moe, B, T + N - 1, k]}: the routed experts
  of every position of `tokens[:, :-1]` (prompt positions from the prefill, generated ones from
  the decode steps), i.e. of the inputs of the forward pass that scores the generated tokens:

      fwd = forward(params, out.tokens[:, :-1], config, segment_ids=out.segment_ids[:, :-1],
                    forced_routing=out.expert_indices)
      fwd.logits[:, T - 1:]      # [B, N, V]: the logits that produced out.tokens[:, T:]

  (MTP modules are not run while generating; their routing stays free.) Positions after the loop
  exited early hold experts 0..k-1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.model.cache import init_cache
from dsjax.model.transformer import forward, frozen


class SampleResult(NamedTuple):
    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] float32, model log-prob (temperature 1, untruncated)
    sampling_logprobs: jax.Array  # [B] float32, under the truncated, temperature-scaled distribution
    cutoff: jax.Array  # [B] float32, kept set = logits >= cutoff (-inf: untruncated)
    kept_count: jax.Array  # [B] int32


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [B, T + N] int32: prompts (left-padded) then generated tokens (pad_token after a stop)
    logprobs: jax.Array  # [B, N] float32: log p_model(token), temperature 1, no truncation
    sampling_logprobs: jax.Array  # [B, N] float32: log-prob under the sampling distribution used (pi_old)
    done: jax.Array  # [B, N] bool: True where the row ended before step j (token j is padding)
    lengths: jax.Array  # [B] int32: generated tokens per row, the stop token included
    truncation_cutoff: jax.Array  # [B, N] float32: kept set of step j = logits >= cutoff
    kept_count: jax.Array  # [B, N] int32: size of the kept set
    expert_indices: dict  # {"moe_layers": int [L_moe, B, T + N - 1, k]}, the routing of tokens[:, :-1]
    segment_ids: jax.Array  # [B, T + N] int32: 0 on left padding, 1 elsewhere (for `forward`)
    prompt_lengths: jax.Array  # [B] int32
    logits: jax.Array | None = None  # [B, N, V] float32 model logits of every step (only with return_logits=True)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def truncation_cutoff(logits: jax.Array, *, temperature: float, top_p: float, top_k: int) -> jax.Array:
    """The kept-set threshold of top-k then top-p (nucleus) truncation, per row of [..., V] logits.

    Order as in HF transformers: temperature, then top-k (keep the k largest), then top-p on the
    top-k distribution renormalised (keep the smallest prefix of the sorted tokens whose mass
    reaches top_p; a token is kept when the mass strictly before it is below top_p). Greedy
    (temperature 0) keeps the argmax. Returns the midpoint between the last kept and the first
    dropped logit (temperature-1 units), or -inf when nothing is dropped.
    """
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        keep_static = 1
    else:
        keep_static = top_k if 0 < top_k < vocab else vocab
        if top_p >= 1.0 and keep_static == vocab:
            return jnp.full(logits.shape[:-1], -jnp.inf, jnp.float32)
    need = min(keep_static + 1, vocab)
    ordered, _ = jax.lax.top_k(logits, need)  # descending
    if temperature != 0 and top_p < 1.0:
        probs = jax.nn.softmax(ordered[..., :keep_static] / temperature, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = jnp.sum(mass_before < top_p, axis=-1).clip(1, keep_static)
    else:
        keep = jnp.full(logits.shape[:-1], keep_static, jnp.int32)
    last_kept = jnp.take_along_axis(ordered, (keep - 1)[..., None], axis=-1)[..., 0]
    first_dropped = jnp.take_along_axis(ordered, jnp.minimum(keep, need - 1)[..., None], axis=-1)[..., 0]
    return jnp.where(keep < vocab, 0.5 * last_kept + 0.5 * first_dropped, -jnp.inf)


def truncation_mask(logits: jax.Array, cutoff: jax.Array) -> jax.Array:
    """Boolean [..., V]: the tokens a step's top-k/top-p truncation kept (`logits >= cutoff`).

    `logits` are temperature-1 model logits (e.g. `forward(...).logits[:, T - 1:]`, [B, N, V]),
    `cutoff` the matching `GenerateOutput.truncation_cutoff` ([B, N]).
    """
    return logits >= cutoff[..., None]


def sampling_log_softmax(logits: jax.Array, cutoff: jax.Array, temperature: float,
                         keep: jax.Array | None = None) -> jax.Array:
    """The whole sampling distribution, [..., V] log-probs: log_softmax(logits / T) over the kept set
    (`logits >= cutoff`), -inf outside it. Temperature 0 (greedy) scales by 1. `keep` (token ids
    [...]): tokens kept whatever their logit, e.g. the sampled ones once the logits moved since."""
    scale = temperature if temperature > 0 else 1.0
    kept = truncation_mask(logits, cutoff)
    if keep is not None:
        kept = kept | (jnp.arange(logits.shape[-1]) == keep[..., None])
    masked = jnp.where(kept, logits.astype(jnp.float32) / scale, -jnp.inf)
    return jax.nn.log_softmax(masked, axis=-1)


def sampling_log_probs(logits: jax.Array, tokens: jax.Array, cutoff: jax.Array, temperature: float) -> jax.Array:
    """log-prob of `tokens` under the sampling distribution: softmax(logits / T) over the kept set.

    The pi_theta of GRPO with the sampler's truncation applied ("keep sampling mask"); with the
    sampler's own logits it reproduces `GenerateOutput.sampling_logprobs`. Differentiable in logits.
    """
    logp = sampling_log_softmax(logits, cutoff, temperature)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sample(logits: jax.Array, rng: jax.Array, *, temperature: float = 1.0, top_p: float = 1.0,
           top_k: int = 0) -> SampleResult:
    """Sample one token per row of float logits [B, V] (temperature 0: greedy, lowest index on ties)."""
    logits = logits.astype(jnp.float32)
    cutoff = truncation_cutoff(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    kept = truncation_mask(logits, cutoff)
    if temperature == 0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        masked = jnp.where(kept, logits / temperature, -jnp.inf)
        tokens = jax.random.categorical(rng, masked, axis=-1).astype(jnp.int32)
    model_logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    sampler_logp = sampling_log_probs(logits, tokens, cutoff, temperature)
    return SampleResult(tokens, model_logp, sampler_logp, cutoff, kept.sum(-1).astype(jnp.int32))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def left_pad(prompts: Sequence[Sequence[int]], pad_token: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token lists -> (int32 [B, max_len] left-padded, int32 [B] lengths)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    out = np.full((len(prompts), int(lengths.max())), pad_token, np.int32)
    for row, prompt in enumerate(prompts):
        out[row, out.shape[1] - len(prompt):] = np.asarray(prompt, np.int32)
    return out, lengths


def _as_key(seed):
    """A typed PRNG key from an int seed, a typed key, or a legacy uint32 [2] `PRNGKey`."""
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    if isinstance(seed, (jax.Array, np.ndarray)) and seed.dtype == jnp.uint32 and seed.shape == (2,):
        return jax.random.wrap_key_data(seed)
    return jax.random.key(seed)


def generate(params, config, prompts, prompt_lengths=None, *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed=0, stop_tokens: Sequence[int] = (), pad_token: int = 0,
             callback: Callable | None = None, return_logits: bool = False) -> GenerateOutput:
    """Generate `max_new_tokens` tokens after each prompt (pure; jitted; callable inside jit).

    Args:
      params, config: the model (config: a ConfigDict or FrozenConfigDict).
      prompts: int [B, T], left-padded (row b's prompt in its last prompt_lengths[b] columns).
      prompt_lengths: int [B] (each in [1, T]); None: every prompt fills all T columns.
      max_new_tokens: N >= 1 (static).
      temperature: 0 for greedy; top_p in (0, 1]; top_k (0: off). Static: each value compiles once.
      seed: int or a `jax.random.key`; step j uses `fold_in(key, j)`.
      stop_tokens: token ids that end a row (static).
      pad_token: written after a row has ended.
      callback: optional host function `callback(step, tokens, done)` called once per step (in
        order) with that step's sampled tokens [B] and done mask [B] (for streaming). Static.
      return_logits: also return every step's model logits [B, N, V] (tests, distillation). Static.

    See the module docstring for what the outputs mean.
    """
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [batch, length], got shape {prompts.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got temperature={temperature}, "
                         f"top_p={top_p}, top_k={top_k}")
    if prompt_lengths is None:
        prompt_lengths = jnp.full(prompts.shape[:1], prompts.shape[1], jnp.int32)
    stop_tokens = tuple(int(t) for t in stop_tokens)
    return _generate(params, prompts, jnp.asarray(prompt_lengths, jnp.int32), _as_key(seed), frozen(config),
                     int(max_new_tokens), float(temperature), float(top_p), int(top_k), stop_tokens, int(pad_token),
                     callback, bool(return_logits))


@functools.partial(jax.jit, static_argnums=tuple(range(4, 13)))
def _generate(params, prompts, prompt_lengths, rng, config, max_new_tokens, temperature, top_p, top_k, stop_tokens,
              pad_token, callback, return_logits):
    c = config
    batch, prompt_len = prompts.shape
    steps = max_new_tokens
    starts = prompt_len - prompt_lengths
    total_inputs = prompt_len + steps - 1  # cache columns = positions of tokens[:, :-1]
    cache = init_cache(c, batch, total_inputs)
    num_moe = c.num_layers - c.num_dense_layers
    stop_ids = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    def advance(tokens, cache):
        """The model on new tokens [B, Tq] at the cache's next columns -> (last logits [B, V], cache,
        their routed experts [L_moe, B, Tq, k] or None)."""
        columns = cache.index + jnp.arange(tokens.shape[1])
        real = columns[None, :] >= starts[:, None]  # left padding is segment 0
        positions = jnp.where(real, columns[None, :] - starts[:, None], columns[None, :])
        out = forward(params, tokens, c, segment_ids=real.astype(jnp.int32), positions=positions, cache=cache,
                      last_only=True)
        routing = out.aux["moe_layers"]["expert_indices"] if num_moe else None
        return out.logits[:, -1], out.cache, routing

    logits, cache, routing = advance(prompts, cache)
    experts = {}
    if num_moe:
        filler = jnp.broadcast_to(jnp.arange(c.num_experts_per_token, dtype=jnp.int32),
                                  (num_moe, batch, total_inputs, c.num_experts_per_token))
        experts["moe_layers"] = jax.lax.dynamic_update_slice_in_dim(filler, routing, 0, axis=2)

    buffers = dict(
        tokens=jnp.full((batch, steps), pad_token, jnp.int32),
        logprobs=jnp.zeros((batch, steps), jnp.float32),
        sampling_logprobs=jnp.zeros((batch, steps), jnp.float32),
        done=jnp.ones((batch, steps), bool),
        cutoff=jnp.zeros((batch, steps), jnp.float32),
        kept_count=jnp.zeros((batch, steps), jnp.int32),
    )
    if return_logits:
        buffers["logits"] = jnp.zeros((batch, steps, c.vocab_size), jnp.float32)

    def record(step, logits, ended, buffers):
        """Sample step `step` from logits [B, V]; rows that `ended` before it get padding."""
        result = sample(logits, jax.random.fold_in(rng, step), temperature=temperature, top_p=top_p, top_k=top_k)
        token = jnp.where(ended, pad_token, result.tokens)
        values = dict(tokens=token, logprobs=jnp.where(ended, 0.0, result.logprobs),
                      sampling_logprobs=jnp.where(ended, 0.0, result.sampling_logprobs), done=ended,
                      cutoff=jnp.where(ended, 0.0, result.cutoff), kept_count=jnp.where(ended, 0, result.kept_count))
        if return_logits:
            values["logits"] = logits
        buffers = {k: jax.lax.dynamic_update_index_in_dim(buffers[k], values[k].astype(buffers[k].dtype), step, 1)
                   for k in buffers}
        if callback is not None:
            jax.debug.callback(callback, step, token, ended, ordered=True)
        return token, ended | jnp.isin(token, stop_ids), buffers

    token, ended, buffers = record(0, logits, jnp.zeros((batch,), bool), buffers)

    def cond(state):
        step, _, ended, *_ = state
        return (step < steps) & ~jnp.all(ended)

    def body(state):
        step, token, ended, cache, experts, buffers = state
        column = cache.index  # where the previous token goes: prompt_len + step - 1
        logits, cache, routing = advance(token[:, None], cache)
        if num_moe:
            experts = {"moe_layers": jax.lax.dynamic_update_slice_in_dim(experts["moe_layers"], routing, column, axis=2)}
        token, ended, buffers = record(step, logits, ended, buffers)
        return step + 1, token, ended, cache, experts, buffers

    state = (jnp.int32(1), token, ended, cache, experts, buffers)
    _, _, _, _, experts, buffers = jax.lax.while_loop(cond, body, state)

    valid = ~buffers["done"]
    columns = jnp.arange(prompt_len + steps)
    return GenerateOutput(
        tokens=jnp.concatenate([prompts, buffers["tokens"]], axis=1),
        logprobs=buffers["logprobs"],
        sampling_logprobs=buffers["sampling_logprobs"],
        done=buffers["done"],
        lengths=valid.sum(-1).astype(jnp.int32),
        truncation_cutoff=buffers["cutoff"],
        kept_count=buffers["kept_count"],
        expert_indices=experts,
        segment_ids=(columns[None, :] >= starts[:, None]).astype(jnp.int32),
        prompt_lengths=prompt_lengths,
        logits=buffers.get("logits"),
    )
