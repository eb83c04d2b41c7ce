"""Training (slim_peft.training): arguments and the schedule, the trainer's outputs, gradient accumulation,
checkpoints (unfinished writes, NaN stop, config fingerprints on resume, output-dir safety), exact resume after
SIGKILL, and DDP (2 processes, gloo) vs one process. Tiny random Llama models, so it runs in seconds.

Also a script: the tests start it as a child process (``python tests/test_training.py train OUT ...``).
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
from conftest import SAVED_LLAMA, tiny_llama

from slim_peft.data import IGNORE_INDEX, TokenizedExample
from slim_peft.errors import ConfigError, NonFiniteLossError, OutputDirError, ResumeError
from slim_peft.training import TrainingArguments, read_metrics
from slim_peft.training.checkpoint import list_checkpoints, resolve_checkpoint
from slim_peft.training.trainer import Trainer, build_scheduler, seed_everything

HERE = Path(__file__).resolve()
VOCAB = 64


# ------------------------------------------------------------------------------------------ fixtures


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
    if method == "mixlora-dynamic":
        cfg.update(method="mixlora", top_p=0.8)
    if method == "mola":
        cfg.update(experts_per_layer="2,4")  # one count per layer of the 2-layer model
    if method == "slim":
        cfg.update(num_lora_experts=3, num_identity_experts=1, top_k=2, num_clusters=2)
    cfg.update(overrides)
    return sp.get_adapter_model(tiny_llama(vocab_size=VOCAB, **SAVED_LLAMA), sp.config_from_dict(cfg))


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
    curve = [losses[step] for step in range(1, 31)]
    # the mean of the last 5 steps is 0.20 below that of the first 5 (without learning: 0.0003); half of it
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.1, curve
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
    p.add_argument("--mask-ratio", type=float, default=None)
    p.add_argument("--checkpointing", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    def hang(trainer: Trainer) -> None:
        if trainer.state.global_step == a.hang_after:
            print(f"HANG at {a.hang_after}", flush=True)
            while True:
                time.sleep(1)

    overrides = {} if a.mask_ratio is None else {"mask_ratio": a.mask_ratio}
    model = tiny_adapter_model(a.method, lora_dropout=a.dropout, **overrides)
    args = tiny_args(Path(a.out), max_steps=a.steps, per_device_train_batch_size=a.batch,
                     resume_from_checkpoint=a.resume, torch_num_threads=1, gradient_checkpointing=a.checkpointing)
    trainer = Trainer(model, args, tiny_examples(), callbacks=[hang] if a.hang_after else [])
    trainer.train()
    acc = trainer.accelerator
    param = next(p for p in model.parameters() if p.requires_grad)
    print(f"DISTRIBUTED {acc.distributed_type} rank {acc.process_index} {type(param).__name__}", flush=True)


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


@pytest.mark.parametrize("method,dropout", [("lora", 0.1), ("slim", 0.1), ("dora", 0.1),
                                            ("mixlora", 0.1), ("mixlora-dynamic", 0.1), ("loramoe", 0.1),
                                            ("mola", 0.1), ("ilora", 0.1), ("er", 0.1)])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, method, dropout):
    """Bitwise equality on CPU, every method: the resumed run restores the adapter weights and buffers (SLIM's
    cluster state), AdamW moments, scheduler, RNG states (dropout, SLIM's random merge masks), the method's
    training state (I-LoRA's replay buffer, its generator and task id) and the data position, and repeats the
    same float operations in the same order on the same thread count."""
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


@pytest.mark.parametrize("options", [(), ("--method", "slim", "--mask-ratio", "0", "--checkpointing")],
                         ids=["lora", "slim-clusters-checkpointing"])
def test_accelerate_launch_two_processes_matches_one_process(tmp_path, options):
    """2 processes x batch 4 (gloo, CPU) follow the same loss curve as 1 process x batch 8, and end with the
    same adapter: for SLIM with gradient checkpointing that includes the clusters (initialised from the global
    batch, identical on both ranks; moved once per step by all-reduced sums, outside any forward).
    SLIM's merge masks are off here: they are drawn per process (like dropout), so with them two processes
    see other masks than one.

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
    _run_child(str(one), "--batch", "8", "--steps", "10", *options)
    launcher = str(Path(sys.executable).parent / "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
           str(HERE), "train", str(two), "--batch", "4", "--steps", "10", *options]
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
