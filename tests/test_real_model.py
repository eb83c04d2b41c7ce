"""SLIM on the embedded SmolLM2-135M-Instruct: a short real training run lowers the loss."""

from __future__ import annotations

import pytest
import torch

import slim_peft as sp

EXAMPLES = [  # OpenBookQA-style questions, written by hand
    ("Which of these would let the most heat travel through?", ["a steel spoon", "a wooden spoon",
     "a plastic spoon", "a paper cup"], 0),
    ("What do plants need to make food?", ["sunlight", "darkness", "sand", "plastic"], 0),
    ("A magnet will stick to", ["a rubber ball", "an iron nail", "a glass jar", "a wool sock"], 1),
    ("Which is a source of renewable energy?", ["coal", "oil", "wind", "natural gas"], 2),
    ("Water turns to ice when it is", ["heated", "stirred", "poured", "cooled below zero"], 3),
    ("Which animal is a mammal?", ["a shark", "a whale", "a trout", "a frog"], 1),
    ("The moon shines because it", ["makes light", "reflects sunlight", "burns gas", "is hot"], 1),
    ("What part of the body pumps blood?", ["the lungs", "the stomach", "the heart", "the skin"], 2),
]


def encode(tokenizer, question: str, choices: list[str], label: int) -> tuple[list[int], list[int]]:
    letters = "ABCD"
    body = question + "\n" + "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": body + "\nAnswer with the letter."}],
                                           tokenize=False, add_generation_prompt=True)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(letters[label] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p + a, [-100] * len(p) + a


@pytest.mark.slow
def test_slim_training_on_the_embedded_model_lowers_the_loss():
    torch.manual_seed(0)
    base, tok = sp.load_base_model("smollm2-135m")
    model = sp.get_adapter_model(base, sp.SlimConfig())
    rows = [encode(tok, *ex) for ex in EXAMPLES]
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.train()
    losses = []
    for step in range(40):
        sl = slice(4 * (step % 2), 4 * (step % 2) + 4)
        out = model(input_ids=input_ids[sl], attention_mask=mask[sl], labels=labels[sl])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    # measured: the first 6 steps average 1.71, the last 6 average 0.016; at least half of that drop
    assert last < first - 0.85, losses
    stats = model.routing_stats()
    assert len(stats["sites"]) == base.config.num_hidden_layers
    assert all(site["tokens"] > 0 for site in stats["sites"].values())
