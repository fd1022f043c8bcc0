"""The DeepSeek-V3.x model: one module per concept, composed in `transformer.py`."""

from dsjax.model.config import make_config, preset_names
from dsjax.model.transformer import (ModelOutput, abstract_params, forward, init_params, init_sharded_params,
                                     logical_axes, param_shardings)

__all__ = ["make_config", "preset_names", "ModelOutput", "abstract_params", "forward", "init_params", "logical_axes",
           "init_sharded_params", "param_shardings"]
