"""Reference models from HF transformers (test-only): tiny random DeepSeek-V3/V3.2 checkpoints in
the official layout, and their logits.

HF implements no MTP module, so the MTP reference is assembled from HF's own decoder layer,
RMSNorm and Linear modules following the V3 report's equations.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from dsjax.hf.config import to_hf
from dsjax.hf.safetensors_io import write_safetensors


def hf_classes(v32: bool):
    if v32:
        from transformers import DeepseekV32Config as Config, DeepseekV32ForCausalLM as Model
    else:
        from transformers import DeepseekV3Config as Config, DeepseekV3ForCausalLM as Model
    return Config, Model


def hf_config_for(config):
    """A transformers config object equivalent to a dsjax config."""
    fields = to_hf(config)
    Config, _ = hf_classes(config.use_indexer)
    for key in ("architectures", "model_type", "scoring_func", "topk_method", "num_nextn_predict_layers", "dtype"):
        fields.pop(key)
    hf_config = Config(**fields)
    hf_config._experts_implementation = "eager"  # HF's grouped_mm needs 16-byte aligned sizes
    hf_config._attn_implementation = "eager"
    return hf_config


def _randomise(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.1):
    """Perturb every weight (norm scales, biases and router biases included) so nothing is at its init."""
    with torch.no_grad():
        for name, param in list(module.named_parameters()) + list(module.named_buffers()):
            if "inv_freq" in name:
                continue
            noise = torch.randn(param.shape, generator=generator) * (0.1 if param.ndim == 1 else 0.02)
            if name.endswith("e_score_correction_bias"):
                noise = torch.rand(param.shape, generator=generator) * scale  # changes which experts win
            param.add_(noise.to(param.dtype))


class HFReference:
    """A tiny random HF model plus MTP module(s), saved as an official-layout checkpoint directory."""

    def __init__(self, config, directory: str, seed: int = 0):
        self.config = config
        self.directory = directory
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.hf_config = hf_config_for(config)
        _, Model = hf_classes(config.use_indexer)
        self.model = Model(self.hf_config).eval()
        _randomise(self.model, generator)
        self.model.save_pretrained(directory)
        self.mtp = [self._make_mtp_module(k, generator) for k in range(config.num_mtp_layers)]
        if self.mtp:
            self._write_mtp_tensors()

    def _make_mtp_module(self, k: int, generator):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

        layer_index = self.config.num_layers + k
        if self.config.use_indexer:
            from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32DecoderLayer as Layer
            self.hf_config.mlp_layer_types = list(self.hf_config.mlp_layer_types) + ["sparse"] * (k + 1)
        else:
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer as Layer
        hidden, eps = self.config.hidden_size, self.config.rms_norm_eps
        module = torch.nn.ModuleDict(dict(
            enorm=DeepseekV3RMSNorm(hidden, eps), hnorm=DeepseekV3RMSNorm(hidden, eps),
            eh_proj=torch.nn.Linear(2 * hidden, hidden, bias=False),
            layer=Layer(self.hf_config, layer_index),
            head_norm=DeepseekV3RMSNorm(hidden, eps),
        )).eval()
        with torch.no_grad():
            for name, param in module.named_parameters():
                if name.endswith("e_score_correction_bias") or param.ndim == 1:
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            for name, buf in module.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(0.5 * torch.rand(buf.shape, generator=generator))
        return module

    def _write_mtp_tensors(self):
        """Add the MTP layers as an extra shard, with an index, as the official checkpoints do."""
        tensors = {}
        for k, module in enumerate(self.mtp):
            prefix = f"model.layers.{self.config.num_layers + k}."
            state = module.state_dict()
            for name, value in state.items():
                if name.startswith("layer."):
                    hf_name = prefix + name[len("layer."):]
                    if ".experts." in hf_name and (hf_name.endswith("gate_up_proj") or hf_name.endswith("experts.down_proj")):
                        continue  # HF's fused expert tensors; written per expert below
                else:
                    hf_name = prefix + {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                                        "eh_proj.weight": "eh_proj.weight",
                                        "head_norm.weight": "shared_head.norm.weight"}[name]
                tensors[hf_name] = value.numpy()
            experts = module["layer"].mlp.experts
            inter = self.config.moe_intermediate_size
            for e in range(self.config.num_routed_experts):
                gate_up = experts.gate_up_proj[e].detach().numpy()
                tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate_up[:inter]
                tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"] = gate_up[inter:]
                tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"] = experts.down_proj[e].detach().numpy()
            tensors[prefix + "embed_tokens.weight"] = self.model.model.embed_tokens.weight.detach().numpy()
            tensors[prefix + "shared_head.head.weight"] = self.model.lm_head.weight.detach().numpy()
        write_safetensors(os.path.join(self.directory, "model-mtp.safetensors"), tensors)
        from safetensors import safe_open
        with safe_open(os.path.join(self.directory, "model.safetensors"), "np") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}
        weight_map.update({name: "model-mtp.safetensors" for name in tensors})
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)

    @torch.no_grad()
    def logits(self, tokens: np.ndarray):
        """(main logits [B, T, V], MTP logits [D, B, T, V]) for int tokens [B, T]."""
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        captured = []
        hook = self.model.model.layers[-1].register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            out = self.model(ids)
        finally:
            hook.remove()
        hidden = captured[0]  # the last decoder layer's output, before the final norm
        length = ids.shape[1]
        positions = torch.arange(length)[None]
        rope = self.model.model.rotary_emb(hidden, positions)
        causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
        causal = causal.expand(ids.shape[0], 1, length, length)
        mtp_logits = []
        for k, module in enumerate(self.mtp):
            next_embeddings = self.model.model.embed_tokens(torch.roll(ids, -(k + 1), dims=1))
            x = module["eh_proj"](torch.cat([module["enorm"](next_embeddings), module["hnorm"](hidden)], -1))
            hidden = module["layer"](x, attention_mask=causal, position_embeddings=rope, position_ids=positions)
            mtp_logits.append(self.model.lm_head(module["head_norm"](hidden)).numpy())
        return out.logits.numpy(), (np.stack(mtp_logits) if mtp_logits else None)

    @torch.no_grad()
    def index_scores(self, tokens: np.ndarray) -> list[np.ndarray]:
        """Each layer's indexer scores [B, T, T] (-inf where masked), recomputed from HF's modules."""
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        captured = []
        hooks = []
        for layer in self.model.model.layers:
            def grab(module, args, kwargs, captured=captured):
                captured.append((module, args, kwargs))
            hooks.append(layer.self_attn.indexer.register_forward_pre_hook(grab, with_kwargs=True))
        try:
            self.model(ids)
        finally:
            for hook in hooks:
                hook.remove()
        scores = []
        for indexer, args, kwargs in captured:
            hidden, q_resid, (cos, sin), mask = args[:4]
            from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb
            b, t, _ = hidden.shape
            q = indexer.wq_b(q_resid).view(b, t, indexer.n_heads, indexer.head_dim)
            k = indexer.k_norm(indexer.wk(hidden)).unsqueeze(2)
            r = indexer.qk_rope_head_dim
            q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin, unsqueeze_dim=2)
            q = torch.cat([q_rot, q[..., r:]], -1)
            k = torch.cat([k_rot, k[..., r:]], -1).squeeze(2)
            logits = torch.relu(torch.einsum("bthd,bsd->bths", q, k) * indexer.softmax_scale)
            weights = indexer.weights_proj(hidden) * indexer.n_heads ** -0.5
            s = torch.einsum("bths,bth->bts", logits, weights)
            s = s + mask if mask.dtype != torch.bool else s.masked_fill(~mask, float("-inf"))
            scores.append(s.numpy())
        return scores


def topk_boundary_ties(scores: list[np.ndarray], topk: int) -> int:
    """How many rows have an exact tie at the k-th largest visible score (selection then depends on
    the top-k implementation's tie-breaking, which differs between torch and XLA)."""
    ties = 0
    for layer_scores in scores:
        flat = layer_scores.reshape(-1, layer_scores.shape[-1])
        for row in flat:
            visible = row[np.isfinite(row) & (row > np.finfo(np.float32).min / 2)]
            if len(visible) <= topk:
                continue
            kth = np.sort(visible)[::-1][topk - 1]
            ties += int(np.sum(visible == kth) > 1)
    return ties
