"""Adapters: the method registry, each method's config and layers, and `AdapterModel` (inject, save, load,
merge). Importing this package registers every method of `methods/`."""

from . import methods  # noqa: F401  (fills the registry)
from .config import ALL_PROJ, ATTENTION_PROJ, FFN_PROJ, AdapterConfig
from .context import ForwardContext
from .methods.dora.config import DoraConfig
from .methods.er.config import ErConfig
from .methods.ilora.config import ILoraConfig
from .methods.lora.config import LoraConfig
from .methods.loramoe.config import LoraMoeConfig
from .methods.mixlora.config import MixLoraConfig
from .methods.mola.config import MolaConfig
from .methods.slim.config import SlimConfig
from .model import AdapterModel, causal_lm_output, get_adapter_model, selected_logits
from .modules.dropout import adapter_dropout
from .registry import METHODS, MethodSpec, config_from_dict, get_method, method_names
from .targeting import find_targets

__all__ = [
    "ALL_PROJ", "ATTENTION_PROJ", "FFN_PROJ", "METHODS", "AdapterConfig", "AdapterModel", "DoraConfig",
    "ErConfig", "ForwardContext", "ILoraConfig", "LoraConfig", "LoraMoeConfig", "MethodSpec", "MixLoraConfig",
    "MolaConfig", "SlimConfig", "adapter_dropout", "causal_lm_output", "config_from_dict", "find_targets",
    "get_adapter_model", "get_method", "method_names", "selected_logits",
]
