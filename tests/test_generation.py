"""The generation API (evaluation/generation.py, `slim-peft generate`): batched, left-padded, cached generation
equals a plain greedy loop for every method; a streamed reply is the returned reply; a reply ends at the chat
template's end of turn; a conversation keeps its turns (Python and `--chat` on standard input)."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from conftest import embedded_tokenizer, greedy, method_configs, randomize, save_tiny_model, sharp_tiny_llama

import slim_peft as sp
from slim_peft.cli import main
from slim_peft.data import end_of_turn_text
from slim_peft.evaluation import ChatSession, generate_greedy, generate_text, stop_token_ids
from slim_peft.evaluation.generation import render_prompt


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


def base_model(tokenizer):
    return sharp_tiny_llama(tokenizer, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return base_model(tokenizer)


PROMPTS = ["Name a colour.", "What is the capital of France? Answer in one word, please.", "Hi",
           "Say the word 'tree' twice, then stop."]


def plain_reply(model, tokenizer, prompt: str | list[dict[str, str]], n: int) -> str:
    """`n` greedy tokens by full forwards (no cache, no padding), cut at the first stop token."""
    ids = torch.tensor([tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]])
    new = greedy(model, ids, n)[0, ids.shape[1]:].tolist()
    stop = set(stop_token_ids(tokenizer))
    cut = next((i for i, t in enumerate(new) if t in stop), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True).strip()


def test_stop_tokens_are_eos_and_the_templates_end_of_turn(tokenizer):
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_text(tokenizer))
    assert end_of_turn_text(tokenizer) == "<|im_end|>"
    assert set(stop_token_ids(tokenizer)) == {tokenizer.eos_token_id, eot}


@pytest.mark.parametrize("name", list(method_configs()))
def test_batched_cached_generation_equals_a_plain_greedy_loop_for_every_method(tokenizer, name):
    model = sp.get_adapter_model(base_model(tokenizer), method_configs(r=4)[name])
    randomize(model, std=0.3)
    model.eval()
    prompts = [render_prompt(tokenizer, p) for p in PROMPTS]  # four lengths: left padding in a batch of 3 + 1
    got = generate_greedy(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, stop=None,
                          eos_token_ids=stop_token_ids(tokenizer))
    assert got == [plain_reply(model, tokenizer, p, 5) for p in PROMPTS]
    assert any(got)


def test_streamed_pieces_make_the_returned_reply(tiny, tokenizer):
    pieces: list[str] = []
    streamed = generate_text(tiny, tokenizer, PROMPTS[1], max_new_tokens=12, on_text=pieces.append)
    assert len(pieces) >= 2  # handed over while decoding, not once at the end
    assert "".join(pieces).strip() == streamed
    assert streamed == generate_text(tiny, tokenizer, PROMPTS[1], max_new_tokens=12)
    assert streamed == plain_reply(tiny, tokenizer, PROMPTS[1], 12)


def test_a_reply_ends_at_the_end_of_turn(tokenizer):
    model = base_model(tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    calls = []

    def force_end_of_turn(module, args, out):  # from the third decoding step on, the end of turn wins
        calls.append(1)
        if len(calls) >= 3:
            out[..., eot] = 1e4
        return out

    model.lm_head.register_forward_hook(force_end_of_turn)
    ids = torch.tensor([tokenizer(render_prompt(tokenizer, "Hi"), add_special_tokens=False)["input_ids"]])
    full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=stop_token_ids(tokenizer))
    calls.clear()
    reply = generate_text(model, tokenizer, "Hi", max_new_tokens=8)
    assert full[0, ids.shape[1]:].tolist()[-1] == eot and full.shape[1] == ids.shape[1] + 3  # 2 tokens, then eot
    assert len(calls) == 3  # generation stopped there
    assert reply == tokenizer.decode(full[0, ids.shape[1]:ids.shape[1] + 2]).strip() and "<|im_end|>" not in reply


def test_sampling_is_seeded_and_leaves_the_callers_rng(tiny, tokenizer):
    state = torch.get_rng_state()
    a = generate_text(tiny, tokenizer, PROMPTS[0], max_new_tokens=10, temperature=1.5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == generate_text(tiny, tokenizer, PROMPTS[0], max_new_tokens=10, temperature=1.5, seed=1)
    others = {generate_text(tiny, tokenizer, PROMPTS[0], max_new_tokens=10, temperature=1.5, seed=s)
              for s in (2, 3, 4)}
    assert others - {a}


def test_a_conversation_keeps_its_turns(tiny, tokenizer):
    chat = ChatSession(tiny, tokenizer, system="Be brief.", max_new_tokens=6)
    first = chat.send("Name a colour.")
    second = chat.send("And another one?")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == first and chat.messages[4]["content"] == second
    # the second reply is the one to the whole conversation, not to its last message alone
    assert second == plain_reply(tiny, tokenizer, chat.messages[:4], 6)
    assert first == plain_reply(tiny, tokenizer, chat.messages[:2], 6)
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]


def test_chat_needs_a_template(tiny, tokenizer):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        ChatSession(tiny, plain)


# --- the command ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def test_generate_chat_on_standard_input(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("which one is red?\n/reset\n\nwhich one is blue?\nand red?\n"))
    code = main(["generate", "--model", str(tiny_model_dir), "--chat", "--max-new-tokens", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    replies = out.splitlines()
    assert len(replies) == 3
    base, tok = sp.load_base_model(str(tiny_model_dir))
    chat = ChatSession(base, tok, max_new_tokens=5)
    expected = [chat.send("which one is red?")]
    chat.reset()  # /reset: the second question starts a new conversation
    expected += [chat.send("which one is blue?"), chat.send("and red?")]
    assert [r.strip() for r in replies] == expected


def test_generate_streams_and_refuses_what_it_cannot_do(tiny_model_dir, capsys):
    code = main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "5", "which one is red?"])
    streamed = capsys.readouterr().out
    code2 = main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "5", "--no-stream",
                  "which one is red?"])
    whole = capsys.readouterr().out
    assert code == code2 == 0 and streamed.strip() == whole.strip()
    assert main(["generate", "--model", str(tiny_model_dir)]) != 0
    assert "needs a prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--chat", "--no-chat-template"]) != 0
    assert "drop --no-chat-template" in capsys.readouterr().err
