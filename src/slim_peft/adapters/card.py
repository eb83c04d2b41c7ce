"""The model card (README.md) written beside every saved adapter, as PEFT writes one: the base model, the
method and its full config, the trainable parameters, and the sections the trainer and the jobs add (the
training data and steps; the learn/forget table when the run measured one)."""

from __future__ import annotations

from typing import Any

CARD_NAME = "README.md"


def model_card(saved_config: dict[str, Any], trainable: int, total: int, sections: dict[str, str],
               tags: list[str] | None = None) -> str:
    """Markdown with Hugging Face's YAML front matter, from the adapter_config.json contents."""
    cfg = saved_config.get("slim_peft", {}).get("config", {})
    method = cfg.get("method", saved_config.get("peft_type", "adapter"))
    base = saved_config.get("base_model_name_or_path") or "unknown"
    lines = ["---", f"base_model: {base}", "library_name: slim-peft", "tags:", "- slim-peft", f"- {method}",
             *[f"- {t}" for t in tags or [] if t not in ("slim-peft", method)], "---", "",
             f"# {method} adapter for {base}", "",
             f"Made with slim-peft (`{saved_config.get('peft_type')}` in adapter_config.json). Trainable "
             f"parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%).", "",
             "## Method configuration", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in cfg.items()]
    for title, body in sections.items():
        lines += ["", f"## {title}", "", body.rstrip()]
    lines += ["", "## Use", "", "```python", "import slim_peft as sp", "",
              f"base, tokenizer = sp.load_base_model({base!r})",
              "model = sp.AdapterModel.from_pretrained(base, \"path/to/this/adapter\").eval()", "```", ""]
    return "\n".join(lines)
