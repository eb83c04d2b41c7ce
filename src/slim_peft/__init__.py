"""slim-peft: fine-tune LLMs that learn more and forget less.

SLIM (Soft LoRA and Identity Mixture) and the LoRA / MoE-LoRA baselines on one API.
"""

from .adapters import (
    METHODS,
    AdapterConfig,
    AdapterModel,
    DoraConfig,
    ErConfig,
    ILoraConfig,
    LoraConfig,
    LoraMoeConfig,
    MixLoraConfig,
    MolaConfig,
    SlimConfig,
    config_from_dict,
    get_adapter_model,
    selected_logits,
)
from .errors import AdapterError, ConfigError, DataError, SlimPeftError, TargetModuleError, TrainingError


def load_dataset(*args, **kwargs):
    """Instruction / chat / text rows of files, save_to_disk dirs, embedded names or Hub ids (parsed and
    validated); with a tokenizer, their training sequences (`slim_peft.data.load_dataset`)."""
    from .data import load_dataset as _load

    return _load(*args, **kwargs)


def load_base_model(*args, **kwargs):
    """(model, tokenizer) for the embedded "smollm2-135m" or any Hugging Face id / local path."""
    from .assets import load_base_model as _load

    return _load(*args, **kwargs)


__all__ = [
    "METHODS", "AdapterConfig", "AdapterError", "AdapterModel", "ConfigError", "DataError", "DoraConfig", "ErConfig",
    "ILoraConfig", "LoraConfig", "LoraMoeConfig", "MixLoraConfig", "MolaConfig", "SlimConfig", "SlimPeftError",
    "TargetModuleError", "TrainingError", "config_from_dict", "get_adapter_model", "load_base_model", "load_dataset",
    "selected_logits",
]
__version__ = "0.1.0"
