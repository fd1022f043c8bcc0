"""The notebook/tool API: `lm = dsjax.load(path)`, `logits = lm(input_ids)`."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.hf.checkpoint import count_mtp_layers, has_mtp_tensors, load_params
from dsjax.hf.config import from_hf, read_hf_config
from dsjax.hf.safetensors_io import CheckpointReader
from dsjax.model.transformer import ModelOutput, forward, frozen

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LanguageModel:
    """A config and its parameter pytree, callable on token ids."""

    config: Any  # ml_collections.ConfigDict
    params: dict

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
        return jnp.asarray(tokens, jnp.int32)

    def forward(self, input_ids, *, segment_ids=None, positions=None, forced_routing=None) -> ModelOutput:
        """All outputs: logits, MTP logits, routing statistics, last hidden state."""
        tokens = self._check_tokens(input_ids)
        as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
        return self._forward(self.params, tokens, as_int(segment_ids), as_int(positions), forced_routing)

    def __call__(self, input_ids, *, segment_ids=None, positions=None) -> jax.Array:
        """int [B, T] -> float32 logits [B, T, vocab]."""
        return self.forward(input_ids, segment_ids=segment_ids, positions=positions).logits


def load(path: str, **overrides) -> LanguageModel:
    """Load a checkpoint directory: an HF one (config.json + *.safetensors, official DeepSeek names,
    bf16/fp32 or FP8 with 128x128 block scales). `overrides` set model config fields, e.g.
    `dtype="bfloat16"` or `attention_impl="xla"`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: not an HF checkpoint directory (no config.json)")
    hf_config = read_hf_config(path)
    config = from_hf(hf_config, source=os.path.join(path, "config.json"), **overrides)
    reader = CheckpointReader(path)
    if "num_nextn_predict_layers" not in hf_config and "num_mtp_layers" not in overrides:
        config.num_mtp_layers = count_mtp_layers(reader, config)  # HF's V3.2 config omits the count
    if config.num_mtp_layers and not has_mtp_tensors(reader, config):
        # transformers' save_pretrained drops MTP layers; keep the main model usable.
        log.warning("%s: config.json declares %d MTP module(s) but the checkpoint has no model.layers.%d.* "
                    "tensors; loading without MTP", path, config.num_mtp_layers, config.num_layers)
        config.num_mtp_layers = 0
    params = load_params(reader, config)
    return LanguageModel(config, jax.tree_util.tree_map(jnp.asarray, params))
