"""The DeepSeek-V3.x model: one module per concept, composed in `transformer.py`."""

from dsjax.model.config import make_config, preset_names
from dsjax.model.transformer import ModelOutput, abstract_params, forward, init_params, logical_axes

__all__ = ["make_config", "preset_names", "ModelOutput", "abstract_params", "forward", "init_params", "logical_axes"]
