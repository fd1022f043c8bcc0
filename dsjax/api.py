"""The notebook/tool API: `lm = dsjax.load(path)`, `logits = lm(input_ids)`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.convert.load import as_mesh, read_checkpoint
from dsjax.model.transformer import ModelOutput, forward, frozen
from dsjax.parallel.mesh import batch_shards, batch_sharding, place, replicated

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LanguageModel:
    """A config and its parameter pytree, callable on token ids.

    With a `mesh` (a `jax.sharding.Mesh` the params are sharded on, see `dsjax.parallel`), forward
    and generate run under it: inputs are split over the batch axes when the batch divides, and MoE
    layers use expert parallelism over the `expert` axis."""

    config: Any  # ml_collections.ConfigDict
    params: dict
    mesh: Any = None

    def __post_init__(self):
        static = frozen(self.config)
        self._forward = jax.jit(lambda params, tokens, segment_ids, positions, forced:
                                forward(params, tokens, static, segment_ids=segment_ids, positions=positions,
                                        forced_routing=forced))

    def _check_tokens(self, input_ids) -> jax.Array:
        tokens = np.asarray(input_ids)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"input_ids must be integer [batch, length], got {tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), "
                             f"got values in [{tokens.min()}, {tokens.max()}]")
        return self._place(tokens)

    def _place(self, x):
        """int32 inputs [B, ...] on the devices: on the mesh, rows split over the batch axes."""
        x = np.asarray(x, np.int32)
        if self.mesh is None:
            return jnp.asarray(x)
        splits = x.ndim and x.shape[0] % batch_shards(self.mesh) == 0
        return place(x, batch_sharding(self.mesh, x.ndim) if splits else replicated(self.mesh))

    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def forward(self, input_ids, *, segment_ids=None, positions=None, forced_routing=None) -> ModelOutput:
        """All outputs: logits, MTP logits, routing statistics, last hidden state."""
        tokens = self._check_tokens(input_ids)
        as_int = lambda x: None if x is None else self._place(x)  # noqa: E731
        with self._on_mesh():
            return self._forward(self.params, tokens, as_int(segment_ids), as_int(positions), forced_routing)

    def __call__(self, input_ids, *, segment_ids=None, positions=None) -> jax.Array:
        """int [B, T] -> float32 logits [B, T, vocab]."""
        return self.forward(input_ids, segment_ids=segment_ids, positions=positions).logits

    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed=0, stop_tokens=(), prompt_lengths=None, *, pad_token: int = 0, callback=None,
                 return_logits: bool = False):
        """Sample `max_new_tokens` tokens after each prompt; returns a `dsjax.inference.generate.GenerateOutput`.

        input_ids: int [B, T] (or [T]) with prompts **left-padded** (row b's prompt in its last
        `prompt_lengths[b]` columns; None: all T), or a list of token lists of different lengths
        (left-padded here). temperature 0 is greedy. See `dsjax.inference.generate` for the outputs.
        """
        from dsjax.inference.generate import generate, left_pad  # noqa: PLC0415 (keeps `import dsjax` light)

        if isinstance(input_ids, (list, tuple)) and input_ids and not np.isscalar(input_ids[0]):
            if prompt_lengths is not None:
                raise ValueError("prompt_lengths is implied by a list of token lists; pass one or the other")
            input_ids, prompt_lengths = left_pad(input_ids, pad_token)
        tokens = self._check_tokens(input_ids)
        if prompt_lengths is not None:
            lengths = np.asarray(prompt_lengths).reshape(-1)
            if lengths.shape != (tokens.shape[0],) or lengths.min() < 1 or lengths.max() > tokens.shape[1]:
                raise ValueError(f"prompt_lengths must give one length in [1, {tokens.shape[1]}] per row, "
                                 f"got {prompt_lengths!r}")
        with self._on_mesh():
            return generate(self.params, self.config, tokens, prompt_lengths, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop_tokens=stop_tokens,
                            pad_token=pad_token, callback=callback, return_logits=return_logits)


def load(path: str, mesh=None, **overrides) -> LanguageModel:
    """Load a checkpoint directory: any layout `dsjax.convert.load.read_checkpoint` reads (HF, FP8 HF,
    converted Orbax, a training run).

    `mesh`: load straight onto a device mesh: a `jax.sharding.Mesh`, or axis sizes / a preset name as
    in a training config's `mesh` (e.g. `{"expert": 4, "data": 2}`, "fsdp"; `data` takes the devices
    no axis claims). Each parameter is put into its shards (`dsjax.model.param_shardings`) as it
    is read, so no device ever holds the whole model; the model then runs under the mesh.

    `overrides` set model config fields, e.g. `dtype="bfloat16"` or `attention_impl="xla"`;
    `param_dtype` also casts the loaded parameters (see `dsjax.convert.load.read_checkpoint`)."""
    mesh = as_mesh(mesh)
    config, params = read_checkpoint(path, mesh, **overrides)
    return LanguageModel(config, params, mesh)
