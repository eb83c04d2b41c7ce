"""lm-evaluation-harness backend `slim-peft`: a base model plus any of our adapters (every method) inside lm-eval's
`HFLM`, so that every lm-eval task family scores it with lm-eval's own request handling (loglikelihood,
loglikelihood_rolling, generate_until; batching; `--apply_chat_template`).

Importing this module registers the backend (lm-eval is the optional `lm-eval` extra)::

    import lm_eval
    from slim_peft.integrations.lm_eval_backend import SlimPeftLM
    lm_eval.simple_evaluate(model=SlimPeftLM(adapter="out/adapter", batch_size=8), tasks=["arc_easy"])

    slim-peft lm-eval --adapter out/adapter --tasks arc_easy,gsm8k --batch_size 8   # lm-eval's CLI, any option

How: the adapter's layers live inside the base model (`get_adapter_model` injects them in place), so `HFLM`
drives the base `PreTrainedModel` itself: its forward and `generate` (with the KV cache) run the adapters. The
adapter is loaded in eval mode (fixed merge masks, frozen clusters, I-LoRA's `eval_with` learner).
"""

from __future__ import annotations

from typing import Any

import torch

from slim_peft.adapters import AdapterModel
from slim_peft.assets import load_base_model
from slim_peft.errors import ConfigError

from .merged import saved_adapter

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ConfigError("the lm-eval backend needs lm-evaluation-harness: pip install 'slim-peft[bench]' "
                      "(or pip install lm-eval)") from e

BACKEND_NAME = "slim-peft"


@register_model(BACKEND_NAME)
class SlimPeftLM(HFLM):
    """`HFLM` over `pretrained` (default: the adapter's base model; the embedded "smollm2-135m", a local
    directory or a Hugging Face id) with the adapter at `adapter` (none: the base model alone)."""

    def __init__(self, adapter: str | None = None, pretrained: str | None = None, dtype: str = "float32",
                 device: str | None = "cpu", trust_remote_code: bool = False, **kwargs: Any) -> None:
        base_name = pretrained or (saved_adapter(adapter)[1] if adapter else "smollm2-135m")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's default device; its own hf backend falls back the same way
        dtype_name = "float32" if dtype in (None, "auto") else str(dtype)
        base, tokenizer = load_base_model(base_name, dtype=dtype_name, device=device,
                                          trust_remote_code=bool(trust_remote_code))
        self.adapter_model: AdapterModel | None = None
        if adapter:
            self.adapter_model = AdapterModel.from_pretrained(base, adapter).eval()
            self.adapter_model.ctx.begin(None, None, collect_aux=False)  # no stale padding mask, no aux losses
        base.eval()
        super().__init__(pretrained=base, tokenizer=tokenizer, device=device, **kwargs)
