"""Shared test helpers, plain functions the test modules import (`from conftest import tiny_llama, batch`):
tiny random Llama / Qwen2 models, token batches, a few-step training loop, logits, a plain greedy decoding loop,
random adapter weights, a tiny tokenizer, a counter of reads back to the host, and `load_benchmark`."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
VOCAB = 128
IGNORE = -100
# the config fields of the models the trainer and the CLI tests train and save: special token ids (row 0 of the
# embedding, the padding row, starts at zero), a longer position range, untied embeddings
SAVED_LLAMA = dict(max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   tie_word_embeddings=False)


def load_benchmark(name: str) -> ModuleType:
    """Import `benchmarks/<name>.py` (not a package) as module `<name>_script`."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"{name}_script"] = mod
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------- models


def tiny_llama(seed: int = 0, *, vocab_size: int = VOCAB, hidden: int = 32, layers: int = 2, **config):
    """A Llama with `layers` decoder layers of width `hidden` (MLP 2 x hidden, 4 heads, 2 KV heads), random
    weights fixed by `seed`, in eval mode. `config`: further LlamaConfig fields (e.g. `pad_token_id=0`, which
    also zeroes that embedding row at initialisation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, **config)
    return LlamaForCausalLM(cfg).eval()


def embedded_tokenizer():
    """The embedded SmolLM2 tokenizer (ChatML template)."""
    from transformers import AutoTokenizer

    from slim_peft.assets import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def sharp_tiny_llama(tokenizer, *, tie_word_embeddings: bool = True, **config):
    """A 2-layer Llama (width 64) over `tokenizer`'s vocabulary whose embeddings (and untied head) are drawn from
    N(0, 1): sharp distributions, so choices and greedy tokens differ clearly (no near-ties between a batched
    and a plain computation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=tie_word_embeddings, **config)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
        if not tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0, 1.0)
    return model


def tiny_qwen2(seed: int = 0, *, vocab_size: int = VOCAB, **config):
    """A 2-layer Qwen2 of width 32 (MLP 64, 4 heads, 2 KV heads), random weights fixed by `seed`, in eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **config)
    return Qwen2ForCausalLM(cfg).eval()


def method_configs(**common):
    """One small config per method (and per routing variant), fresh on every call: name -> AdapterConfig.
    `common`: fields every config takes (e.g. `r=4`, `lora_dropout=0.1`)."""
    import slim_peft as sp

    return {
        "lora": sp.LoraConfig(**common),
        "dora": sp.DoraConfig(**common),
        "slim": sp.SlimConfig(**common),
        "slim-linear-routing": sp.SlimConfig(routing="linear", target_modules="all-linear", **common),
        "mixlora": sp.MixLoraConfig(num_experts=4, **common),
        "mixlora-dynamic": sp.MixLoraConfig(num_experts=4, top_p=0.8, **common),
        "loramoe": sp.LoraMoeConfig(num_experts=4, **common),
        "mola": sp.MolaConfig(experts_per_layer="2,4", **common),
        "ilora": sp.ILoraConfig(**common),
        "er": sp.ErConfig(replay_from="seen", **common),  # replay from the second step, as I-LoRA's default
    }


# ------------------------------------------------------------------------------------------------ batches


def batch(seed: int = 1, b: int = 2, s: int = 12, *, low: int = 0, vocab_size: int = VOCAB, padding: int = 3,
          pad_token_id: int | None = None, prompt: int | None = None, labels: bool = True) -> dict[str, torch.Tensor]:
    """`b` rows of `s` random token ids in [low, vocab_size), drawn from a generator seeded with `seed`. The
    second row ends in `padding` padded positions (mask 0; id `pad_token_id` there when given). Labels (unless
    `labels` is false): the ids, with the first `prompt` positions (default s // 2) and the padding ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab_size, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if padding:
        mask[1, -padding:] = 0
    if pad_token_id is not None:
        ids[mask == 0] = pad_token_id
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        lab = ids.clone()
        lab[:, : s // 2 if prompt is None else prompt] = IGNORE
        lab[mask == 0] = IGNORE
        out["labels"] = lab
    return out


# ------------------------------------------------------------------------------------- training, outputs


def train_steps(model, steps: int = 5, lr: float = 1e-2, data: dict[str, torch.Tensor] | None = None) -> list[float]:
    """`steps` AdamW steps on one batch (default `batch()`) in training mode; the model is left in eval mode.
    Returns the loss of each step (before its update)."""
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    data = batch() if data is None else data
    losses = []
    for _ in range(steps):
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step()
        losses.append(loss.item())
    model.eval()
    return losses


def logits(model, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on `data`'s ids and mask, without gradients."""
    with torch.no_grad():
        return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


def greedy(model, ids: torch.Tensor, n: int, banned: tuple[int, ...] = ()) -> torch.Tensor:
    """`n` greedy tokens appended to `ids` (all positions attended), each the argmax of a full forward pass over
    everything so far (no cache, no `generate`); `banned` token ids are never chosen (as `min_new_tokens`
    keeps eos out)."""
    with torch.no_grad():
        for _ in range(n):
            last = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].clone()
            last[:, list(banned)] = -float("inf")
            ids = torch.cat([ids, last.argmax(-1)[:, None]], dim=1)
    return ids


def randomize(model, seed: int = 0, std: float = 0.2) -> None:
    """Every trainable parameter drawn from N(0, std^2) (seeded): B starts at zero, so without this an
    adapter adds nothing and a wrong key, layout or path would not show in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------------------------- tokenizer

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish"]


def save_tiny_model(path: Path) -> Path:
    """A 2-layer Llama (hidden 32) with a byte-level BPE tokenizer and a ChatML template, saved to `path`."""
    texts = [f"Question: which {a} is {b}? A. {a} B. {b} C. {c} Answer: B" for a, b, c in
             zip(WORDS, WORDS[3:] + WORDS[:3], WORDS[6:] + WORDS[:6], strict=True)] * 3
    tok = make_tiny_tokenizer(texts)
    model = tiny_llama(vocab_size=len(tok), **SAVED_LLAMA)
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path



def make_tiny_tokenizer(texts: list[str] | None = None):
    """A byte-level BPE tokenizer trained on a few strings, with a ChatML template (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or ["Question: which answer is right? A. yes B. no C. maybe D. never Answer: B"] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                 unk_token="<unk>", bos_token="<|im_start|>")
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return hf


# ------------------------------------------------------------------------------------------- host reads


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values back to the host: `.item()`, `bool(t)`, `int(t)` (all
    `_local_scalar_dense`) and `.tolist()` (patched by `host_reads`: it bypasses the dispatcher)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads(monkeypatch) -> Iterator[HostReads]:
    """A `HostReads` counter active inside the block."""
    mode = HostReads()
    tolist = torch.Tensor.tolist

    def counted(t):
        mode.count += 1
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with mode:
        yield mode
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
