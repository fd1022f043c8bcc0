"""dsjax: a JAX/Flax framework for DeepSeek-V3.x (V3, V3.1, V3.2) research and training."""

from dsjax.api import LanguageModel, load
from dsjax.model import ModelOutput, abstract_params, forward, init_params, logical_axes, make_config

__version__ = "0.1.0"
__all__ = ["LanguageModel", "load", "ModelOutput", "abstract_params", "forward", "init_params", "logical_axes",
           "make_config"]
