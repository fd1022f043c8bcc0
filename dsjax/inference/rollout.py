"""Rollouts for RL, and scoring them again with the training forward pass ("keep routing", "keep
sampling mask"), on the model's one body.

The sampling side sits behind a small interface, :class:`RolloutEngine`: ``sample(params,
prompts, num_samples=G, sampling=..., seed=...) -> Rollouts``. :class:`LocalEngine` implements it
with :func:`dsjax.inference.generate.generate` on the training mesh (expert parallelism included);
an external server (vLLM, SGLang) could implement it too, returning the same record:

    engine = LocalEngine(model_config)
    ro = engine.sample(params, [[1, 5, 9], [1, 7]], num_samples=8,
                       sampling=SamplingParams(max_new_tokens=16, temperature=1.0, stop_tokens=(eos,)), seed=key)
    ro.tokens             # [R, W + N], R = 2 * 8: row i * G + g is sample g of prompt i (left-padded to W)
    ro.old_logprobs       # [R, N] pi_old: log-prob under the distribution the sampler used
    ro.truncation_cutoff  # [R, N] its top-k/top-p kept set is `logits >= cutoff`
    ro.mask               # [R, N] 1 on generated tokens that belong to the output (the stop token included)
    ro.expert_indices     # {"moe_layers": [R, L_moe, W + N - 1, k]}: the experts every input position used

Every field has the row on its leading axis, so a rollout batch slices into mini-batches as is.
The training side: :func:`score` runs ``forward`` on the rollout with the recorded experts
(indices replayed, combine weights from the live router) and :func:`policy_log_probs` takes
pi_theta over the sampler's kept set at the sampler's temperature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import parallel
from dsjax.inference import generate as gen
from dsjax.model.transformer import forward

__all__ = ["SamplingParams", "Rollouts", "RolloutEngine", "LocalEngine", "forced_routing", "score",
           "policy_log_probs", "input_mask", "routing_mismatch"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``prompt_width``: left-pad every prompt batch to this many columns (fixed
    shapes compile once; None: the longest prompt of each call)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_tokens: tuple[int, ...] = ()
    pad_token: int = 0
    prompt_width: int | None = None


class Rollouts(NamedTuple):
    """G samples of each prompt (see the module docstring); host (numpy) arrays."""

    tokens: np.ndarray  # [R, W + N] int32: left-padded prompts, then the generated tokens
    segment_ids: np.ndarray  # [R, W + N] int32: 0 on left padding, 1 elsewhere
    old_logprobs: np.ndarray  # [R, N] float32: pi_old of each generated token (0 where mask is 0)
    truncation_cutoff: np.ndarray  # [R, N] float32
    mask: np.ndarray  # [R, N] float32: 1 on the output's tokens
    lengths: np.ndarray  # [R] int32: output tokens per row (= mask.sum(-1))
    expert_indices: dict  # {"moe_layers": int32 [R, L_moe, W + N - 1, k]}; {} when not recorded

    def completions(self) -> list[list[int]]:
        """Each row's output tokens (the stop token included, when it stopped)."""
        width = self.tokens.shape[1] - self.mask.shape[1]
        return [row[width:width + n].tolist() for row, n in zip(self.tokens, self.lengths)]


class RolloutEngine(Protocol):
    def sample(self, params: Any, prompts: Sequence[Sequence[int]], *, num_samples: int,
               sampling: SamplingParams, seed: Any) -> Rollouts:
        """``num_samples`` completions of each prompt (token lists) from the policy ``params``."""


class LocalEngine:
    """Rollouts with :func:`dsjax.inference.generate.generate`, in this process, on ``mesh`` (None:
    the mesh the params are sharded over, if any). The rows are split over the mesh's batch axes
    (padded with copies of the first prompt to a multiple of them, dropped again afterwards)."""

    def __init__(self, config: Any, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.mesh = mesh

    def sample(self, params: Any, prompts: Sequence[Sequence[int]], *, num_samples: int,
               sampling: SamplingParams, seed: Any) -> Rollouts:
        rows = [list(p) for p in prompts for _ in range(num_samples)]
        padded, lengths = gen.left_pad(rows, sampling.pad_token)
        width = sampling.prompt_width or padded.shape[1]
        if padded.shape[1] > width:
            raise ValueError(f"a prompt has {padded.shape[1]} tokens, more than prompt_width={width}")
        padded = np.pad(padded, ((0, 0), (width - padded.shape[1], 0)), constant_values=sampling.pad_token)
        mesh = self.mesh or _params_mesh(params)
        extra = -len(rows) % (parallel.batch_shards(mesh) if mesh is not None else 1)
        padded = np.concatenate([padded, np.repeat(padded[:1], extra, 0)])
        lengths = np.concatenate([lengths, np.repeat(lengths[:1], extra, 0)])
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                      top_p=sampling.top_p, top_k=sampling.top_k, seed=seed, stop_tokens=sampling.stop_tokens,
                      pad_token=sampling.pad_token)
        if mesh is None:
            out = gen.generate(params, self.config, padded, lengths, **kwargs)
        else:
            placed = parallel.place_batch(dict(prompts=padded, lengths=lengths), mesh)
            with jax.set_mesh(mesh):
                out = gen.generate(params, self.config, placed["prompts"], placed["lengths"], **kwargs)
        out = jax.device_get(out)
        keep = slice(0, len(rows))
        mask = ~np.asarray(out.done[keep])
        return Rollouts(
            tokens=np.asarray(out.tokens[keep], np.int32),
            segment_ids=np.asarray(out.segment_ids[keep], np.int32),
            old_logprobs=np.where(mask, out.sampling_logprobs[keep], 0).astype(np.float32),
            truncation_cutoff=np.asarray(out.truncation_cutoff[keep], np.float32),
            mask=mask.astype(np.float32),
            lengths=np.asarray(out.lengths[keep], np.int32),
            expert_indices={name: np.moveaxis(np.asarray(x), 1, 0)[keep] for name, x in out.expert_indices.items()},
        )


def _params_mesh(params: Any) -> jax.sharding.Mesh | None:
    """The mesh of the first parameter, when it is sharded over more than one device."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


# ----------------------------------------------------------------------------------------------
# Scoring a rollout with the training forward pass
# ----------------------------------------------------------------------------------------------


def forced_routing(expert_indices: Mapping[str, jax.Array]) -> dict:
    """Batch-first recorded experts ``{name: [B, L, T, k]}`` as ``forward(forced_routing=...)`` takes
    them (``[L, B, T, k]``)."""
    return {name: jnp.moveaxis(jnp.asarray(x), 0, 1) for name, x in expert_indices.items()}


def score(params: Any, config: Any, tokens: jax.Array, segment_ids: jax.Array, num_new: int, *,
          expert_indices: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict]:
    """The training forward pass on rollout rows ``tokens`` [B, W + N] (N = ``num_new``) -> (the
    logits that produced the generated tokens, [B, N, V]; the model's aux, whose
    ``aux["moe_layers"]["expert_indices"]`` [L, B, W + N - 1, k] are the experts it used).

    ``expert_indices`` (batch-first, as :class:`Rollouts` holds them): replay them ("keep
    routing"); None: the router chooses afresh.
    """
    routing = None if expert_indices is None else forced_routing(expert_indices)
    out = forward(params, tokens[:, :-1], config, segment_ids=segment_ids[:, :-1], forced_routing=routing)
    return out.logits[:, -num_new:], out.aux


def policy_log_probs(logits: jax.Array, tokens: jax.Array, cutoff: jax.Array | None,
                     temperature: float) -> tuple[jax.Array, jax.Array]:
    """(log pi_theta(tokens) [B, N], entropy of pi_theta [B, N]) with pi_theta = softmax(logits / T)
    over the sampler's kept set ("keep sampling mask"), rebuilt from its ``cutoff``: ``logits >=
    cutoff``, plus the sampled token itself. With the sampler's logits (the first pass over a rollout,
    to rounding) that is exactly the sampler's set; once updates moved the logits, the sampled token
    stays in it, so pi_theta never drops to 0. ``cutoff`` None: the whole vocabulary."""
    if cutoff is None:
        cutoff = jnp.full(logits.shape[:-1], -jnp.inf, jnp.float32)
    log_probs = gen.sampling_log_softmax(logits, cutoff, temperature, keep=tokens)
    picked = jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    kept = jnp.isfinite(log_probs)
    entropy = -jnp.sum(jnp.where(kept, jnp.exp(log_probs) * jnp.where(kept, log_probs, 0), 0), axis=-1)
    return picked, entropy


def input_mask(segment_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, W + N - 1] bool: the forward pass's input positions that hold real tokens (the prompt's,
    and the generated tokens that belong to the output)."""
    width = segment_ids.shape[1] - mask.shape[1]
    return jnp.concatenate([segment_ids[:, :width] > 0, mask[:, :-1] > 0], axis=1)


def routing_mismatch(chosen: jax.Array, recorded: jax.Array, valid: jax.Array) -> jax.Array:
    """Share of token-expert choices in ``chosen`` [L, B, T, k] that ``recorded`` (batch-first, [B, L,
    T, k]) does not hold for the same token, over the ``valid`` [B, T] positions (sets: order free)."""
    recorded = jnp.moveaxis(recorded, 0, 1)
    same = jnp.any(chosen[..., :, None] == recorded[..., None, :], axis=-1)  # [L, B, T, k]
    weights = jnp.broadcast_to(valid[None, :, :, None], same.shape).astype(jnp.float32)
    return 1.0 - jnp.sum(same * weights) / jnp.maximum(jnp.sum(weights), 1.0)
