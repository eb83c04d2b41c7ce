"""Training loop: exact resume after SIGKILL, DDP (2 processes, gloo) vs one process, NaN stop, config
fingerprints, output-dir safety, data order and batching. Tiny random Llama models, so it runs in seconds.

Also a script: the tests start it as a child process (``python tests/test_train.py train OUT ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from slim_peft.data import IGNORE_INDEX, encode_example, end_of_turn_text
from slim_peft.errors import ConfigError, DataError, NonFiniteLossError, OutputDirError, ResumeError
from slim_peft.training import TrainingArguments, read_metrics
from slim_peft.training.checkpoint import list_checkpoints, resolve_checkpoint
from slim_peft.training.trainer import (
    Collator,
    SeededBatchOrder,
    TokenizedExample,
    Trainer,
    build_scheduler,
    seed_everything,
    shard,
)

HERE = Path(__file__).resolve()
VOCAB = 64


# ------------------------------------------------------------------------------------------ fixtures


def tiny_llama(vocab_size: int = VOCAB, seed: int = 0):
    """A 2-layer Llama with hidden size 32, random weights fixed by ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def tiny_examples(n: int = 64, seed: int = 0) -> list[TokenizedExample]:
    """Random prompts of 6-20 tokens; the answer (2 labelled tokens: a "letter" and eos) depends on the
    first prompt token, so the loss can fall."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(6, 20)
        ids = [rng.randint(3, VOCAB - 1) for _ in range(length)]
        target = 3 + ids[0] % 4
        out.append(TokenizedExample(tuple(ids + [target, 2]), tuple([IGNORE_INDEX] * length + [target, 2]), i % 2))
    return out


def tiny_adapter_model(method: str = "lora", **overrides):
    import slim_peft as sp

    seed_everything(0)
    cfg = {"method": method, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    if method == "slim":
        cfg.update(num_lora_experts=3, num_identity_experts=1, top_k=2, num_clusters=2)
    cfg.update(overrides)
    return sp.get_adapter_model(tiny_llama(), sp.config_from_dict(cfg))


def tiny_args(out: Path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=8, learning_rate=5e-3,
                logging_steps=1, save_steps=4, save_total_limit=None, warmup_ratio=0.1, seed=0,
                disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def read_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def read_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("LOCAL_WORLD_SIZE", None)
    return env


# ------------------------------------------------------------------------------- data and batching


def test_collator_pads_right_and_carries_sample_type():
    a = TokenizedExample((5, 6, 7), (IGNORE_INDEX, 7, 2), 0)
    b = TokenizedExample((5, 6), (IGNORE_INDEX, 2), 1)
    batch = Collator(pad_token_id=0)([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 7, 2], [IGNORE_INDEX, 2, IGNORE_INDEX]]
    assert batch["sample_type"].tolist() == [0, 1]


def test_batch_order_is_seeded_restorable_and_sharded():
    lengths = list(range(5, 45))
    a = SeededBatchOrder(lengths, batch_size=8, seed=3)
    b = SeededBatchOrder(lengths, batch_size=8, seed=3)
    assert a.batches_per_epoch == 5
    assert a.epoch_batches(0) == b.epoch_batches(0)  # a pure function of (seed, epoch)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert a.batch_at(1, 3) == b.epoch_batches(1)[3]  # any position can be restored directly
    flat = sorted(i for batch in a.epoch_batches(0) for i in batch)
    assert flat == sorted(set(flat)) and len(flat) == 40
    assert shard(a.batch_at(0, 0), 0, 2) + shard(a.batch_at(0, 0), 1, 2) == a.batch_at(0, 0)
    g = SeededBatchOrder(lengths, batch_size=8, seed=3, group_by_length=True)
    spreads = [max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in g.epoch_batches(0)]
    assert max(spreads) <= 7  # sorted within the mega-batch: neighbours in length
    with pytest.raises(DataError, match="fewer than one batch"):
        SeededBatchOrder([3, 4], batch_size=8, seed=0)


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


def test_encode_labels_only_the_answer_and_end_of_turn():
    tok = make_tiny_tokenizer()
    assert end_of_turn_text(tok) == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "which? A. yes B. no"}], tokenize=False,
                                     add_generation_prompt=True)
    ex, cut = encode_example(tok, prompt, "B", max_seq_length=256, sample_type=1)
    assert not cut
    supervised = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(supervised) == "B<|im_end|>"
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == (IGNORE_INDEX,) * n_prompt
    short, cut = encode_example(tok, prompt, "B", max_seq_length=8)
    assert cut and len(short) == 8 and short.labels[-2:] == ex.labels[-2:]  # prompt cut from the left


# ---------------------------------------------------------------------------------- arguments, schedule


@pytest.mark.parametrize("field,value,match", [
    ("learning_rate", 0.0, "learning_rate"),
    ("per_device_train_batch_size", 0, "per_device_train_batch_size"),
    ("warmup_ratio", 1.5, "warmup_ratio"),
    ("lr_scheduler_type", "cosin", "did you mean 'cosine'"),
    ("report_to", "tensorbord", "did you mean 'tensorboard'"),
    ("max_grad_norm", -1.0, "max_grad_norm"),
])
def test_training_arguments_out_of_range(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainingArguments(**{field: value})


def test_scheduler_warmup_then_decay():
    p = torch.nn.Parameter(torch.zeros(1))
    for kind, end in (("cosine", 0.0), ("linear", 0.0), ("constant", 1.0)):
        opt = torch.optim.SGD([p], lr=1.0)
        sched = build_scheduler(opt, TrainingArguments(lr_scheduler_type=kind, warmup_ratio=0.1), total_steps=100)
        lrs = []
        for _ in range(100):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        assert lrs[0] < lrs[5] < lrs[10] and lrs[10] == pytest.approx(1.0)
        assert sched.get_last_lr()[0] == pytest.approx(end)


# ------------------------------------------------------------------------------------- runs in-process


def test_training_lowers_loss_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    res = Trainer(tiny_adapter_model(), tiny_args(out, max_steps=30, learning_rate=2e-2, save_steps=10,
                                                  save_total_limit=1, report_to="tensorboard"),
                  tiny_examples(), eval_dataset=tiny_examples(16, seed=1),
                  eval_fn=lambda m: {"answer_tokens": 2.0}).train()
    losses = read_losses(out)
    assert sorted(losses) == list(range(1, 31))
    assert sum(list(losses.values())[-5:]) < sum(list(losses.values())[:5])
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-20"]  # save_total_limit=1
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    assert json.loads((out / "run_status.json").read_text())["status"] == "completed"
    assert "eval/loss" in res.metrics and res.metrics["eval/answer_tokens"] == 2.0
    records = read_metrics(out / "metrics.jsonl")
    assert {"lr", "grad_norm", "tokens_per_s", "tokens_seen"} <= set(records[0])


def test_gradient_accumulation_matches_one_larger_batch(tmp_path):
    """2 accumulated micro-batches of 4 = 1 batch of 8 (same examples; each has 2 supervised tokens, so the
    mean of the micro-batch means is the batch mean); up to float rounding."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    Trainer(tiny_adapter_model(), tiny_args(one, max_steps=6, save_steps=0), tiny_examples()).train()
    Trainer(tiny_adapter_model(), tiny_args(two, max_steps=6, save_steps=0, per_device_train_batch_size=4,
                                            gradient_accumulation_steps=2), tiny_examples()).train()
    a, b = read_losses(one), read_losses(two)
    assert list(a) == list(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


def test_latest_checkpoint_ignores_unfinished_writes(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_adapter_model(), tiny_args(out, max_steps=8, save_steps=4), tiny_examples()).train()
    (out / ".tmp-checkpoint-12").mkdir()  # a write killed half-way
    (out / "checkpoint-16").mkdir()  # no trainer_state.json: incomplete
    assert resolve_checkpoint("latest", out).name == "checkpoint-4"
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        resolve_checkpoint("latest", tmp_path / "empty")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    # a learning rate of 1e30 makes the adapter weights, then the loss, non-finite after a few steps
    trainer = Trainer(tiny_adapter_model(), tiny_args(out, max_steps=40, save_steps=1, learning_rate=1e30,
                                                      warmup_ratio=0.0, max_grad_norm=0.0, save_total_limit=2),
                      tiny_examples())
    with pytest.raises(NonFiniteLossError, match=r"became (nan|inf|-inf).*Last good checkpoint: .*checkpoint-\d+"):
        trainer.train()
    ckpts = list_checkpoints(out)
    assert ckpts, "the checkpoints written before the failure are kept"
    assert json.loads((out / "run_status.json").read_text())["status"] == "failed"
    assert not (out / "adapter").exists()


def test_resume_with_another_config_is_refused(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_adapter_model(), tiny_args(out, max_steps=8), tiny_examples()).train()
    trainer = Trainer(tiny_adapter_model(), tiny_args(out, max_steps=8, learning_rate=1e-3,
                                                      resume_from_checkpoint="latest"), tiny_examples())
    with pytest.raises(ResumeError, match=r"another configuration[\s\S]*learning_rate: 0.005 in the checkpoint"):
        trainer.train()
    other_data = Trainer(tiny_adapter_model(), tiny_args(out, max_steps=8, resume_from_checkpoint="latest"),
                         tiny_examples(seed=5))
    with pytest.raises(ResumeError, match="data"):
        other_data.train()
    other_rank = Trainer(tiny_adapter_model(r=8), tiny_args(out, max_steps=8, resume_from_checkpoint="latest"),
                         tiny_examples())
    with pytest.raises(ResumeError, match="adapter.r: 4 in the checkpoint, 8 now"):
        other_rank.train()


def test_failed_run_never_overwrites_a_good_output_dir(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_adapter_model(), tiny_args(out, max_steps=4, save_steps=0), tiny_examples()).train()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # 1) a second run into the same directory is refused
    with pytest.raises(OutputDirError, match="already holds files"):
        Trainer(tiny_adapter_model(), tiny_args(out, max_steps=4), tiny_examples()).train()
    # 2) with overwrite it runs in a staging directory; it fails (NaN), the good directory is untouched
    bad = tiny_args(out, max_steps=40, learning_rate=1e30, warmup_ratio=0.0, max_grad_norm=0.0,
                    overwrite_output_dir=True)
    with pytest.raises(NonFiniteLossError) as info:
        Trainer(tiny_adapter_model(), bad, tiny_examples()).train()
    assert "left untouched" in "".join(getattr(info.value, "__notes__", []))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    # 3) a successful overwrite replaces it
    Trainer(tiny_adapter_model(), tiny_args(out, max_steps=6, save_steps=0, overwrite_output_dir=True),
            tiny_examples()).train()
    assert json.loads((out / "final_state.json").read_text())["global_step"] == 6
    assert not any(p.name.startswith(".run.") for p in tmp_path.iterdir())


# -------------------------------------------------------------------------- SIGKILL, then exact resume


def _train_child(argv: list[str]) -> None:
    """Child process: train a tiny model; optionally hang after a step so the parent can SIGKILL it."""
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--method", default="lora")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hang-after", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--dropout", type=float, default=0.0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    def hang(trainer: Trainer) -> None:
        if trainer.state.global_step == a.hang_after:
            print(f"HANG at {a.hang_after}", flush=True)
            while True:
                time.sleep(1)

    model = tiny_adapter_model(a.method, lora_dropout=a.dropout)
    args = tiny_args(Path(a.out), max_steps=a.steps, per_device_train_batch_size=a.batch,
                     resume_from_checkpoint=a.resume, torch_num_threads=1)
    Trainer(model, args, tiny_examples(), callbacks=[hang] if a.hang_after else []).train()


def _run_child(*args: str, timeout: float = 120) -> None:
    subprocess.run([sys.executable, str(HERE), "train", *args], check=True, env=child_env(), timeout=timeout,
                   capture_output=True)


def _kill_after_hang(*args: str, timeout: float = 120) -> None:
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty child never blocks on it
    proc = subprocess.Popen([sys.executable, str(HERE), "train", *args], stdout=subprocess.PIPE,
                            stderr=errors, env=child_env(), text=True)
    deadline = time.time() + timeout
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("HANG") or time.time() > deadline:
                break
        errors.seek(0)
        assert proc.poll() is None, f"the child ended before the kill: {errors.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("method,dropout", [("lora", 0.1), ("slim", 0.0)])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, method, dropout):
    """Bitwise equality on CPU: the resumed run restores the adapter weights and buffers (SLIM's cluster
    state), AdamW moments, scheduler, RNG states (dropout, SLIM's random merge masks) and the data position,
    and repeats the same float operations in the same order on the same thread count."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = ["--method", method, "--dropout", str(dropout)]
    _run_child(str(full), *common)
    _kill_after_hang(str(killed), *common, "--hang-after", "6")  # checkpoint-4 written, steps 5-6 lost
    assert [p.name for p in list_checkpoints(killed)] == ["checkpoint-4"]
    assert not (killed / "adapter").exists()
    _run_child(str(killed), *common, "--resume", "latest")
    assert read_losses(killed) == read_losses(full)  # every step's loss, bit for bit
    a, b = read_adapter(full), read_adapter(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------- DDP with 2 processes


def test_accelerate_launch_two_processes_matches_one_process(tmp_path):
    """2 processes x batch 4 (gloo, CPU) follow the same loss curve as 1 process x batch 8.

    Launched with ``accelerate launch --multi_gpu --num_processes 2``: on a machine without GPUs the
    trainer's ``Accelerator(cpu=True)`` joins the two processes into a gloo group. (``accelerate launch
    --cpu --num_processes 2`` would start a single process in accelerate 1.x: its CPU path is the simple
    launcher unless mpirun is used.)

    Every example has the same number of supervised tokens (2), so the mean of the per-process mean losses
    equals the global mean; what differs is padding (each process pads to its own longest sequence) and
    the order of float reductions (gradient all-reduce), so the curves agree to float rounding: relative
    tolerance 1e-4 per step (observed: 2e-7; adapter weights within 3e-7)."""
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
        pytest.skip("accelerate CLI not installed")
    one, two = tmp_path / "one", tmp_path / "two"
    _run_child(str(one), "--batch", "8", "--steps", "10")
    launcher = str(Path(sys.executable).parent / "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
           str(HERE), "train", str(two), "--batch", "4", "--steps", "10"]
    res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((two / "final_state.json").read_text())["num_processes"] == 2
    a, b = read_losses(one), read_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    wa, wb = read_adapter(one), read_adapter(two)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        _train_child(sys.argv[2:])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} train OUT [options]")
