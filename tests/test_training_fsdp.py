"""FSDP2 (torch's `fully_shard`, what accelerate's FSDP version 2 applies: every decoder layer, then the root)
over 2 CPU processes on gloo, against one process at the same global batch: same losses, same adapter
(gathered whole), same SLIM cluster state, and I-LoRA's slow learner identical on both processes.

accelerate itself does not run FSDP on a CPU-only machine (its state falls back to MULTI_CPU / NO there), so
this test shards with torch directly, with the same wrapping accelerate's FSDP2 config gives on GPUs.

Also a script: the test starts it under torchrun (``torchrun --nproc_per_node 2 tests/test_training_fsdp.py OUT``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch, tiny_llama

import slim_peft as sp

HERE = Path(__file__).resolve()
STEPS = 3
CONFIGS = {
    "lora": lambda: sp.LoraConfig(r=4, lora_dropout=0.0),
    "slim": lambda: sp.SlimConfig(r=4, lora_dropout=0.0, num_lora_experts=3, num_identity_experts=1,
                                  num_clusters=2, mask_ratio=0.0),  # masks are drawn per process (as dropout)
    # the Switch balance loss is a product of per-process means (as in every MoE under data parallelism), not
    # the global batch's: off here, so that the two runs must agree
    "mixlora": lambda: sp.MixLoraConfig(r=4, lora_dropout=0.0, num_experts=4, router_aux_loss_coef=0.0),
    "ilora": lambda: sp.ILoraConfig(r=4, lora_dropout=0.0),
}


def global_batch() -> dict[str, torch.Tensor]:
    """4 rows of equal length and equal supervised-token counts: the mean of the two processes' mean losses is
    the global mean loss."""
    return batch(seed=3, b=4, s=12, padding=0)


def build(method: str):
    torch.manual_seed(0)
    return sp.get_adapter_model(tiny_llama(tie_word_embeddings=False), CONFIGS[method]())


def train(model, data: dict[str, torch.Tensor], reduce_loss=None) -> list[float]:
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step()
        value = loss.detach().clone()
        losses.append(float(reduce_loss(value) if reduce_loss else value))
    return losses


def _child(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = {k: v[2 * rank:2 * rank + 2] for k, v in global_batch().items()}

    def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t / world

    results = {}
    for method in CONFIGS:
        model = build(method)
        for layer in model.base_model.get_decoder().layers:
            fully_shard(layer)
        fully_shard(model)
        sharded = any(type(p).__name__ == "DTensor" for p in model.trainable_parameters())
        losses = train(model, data, mean_over_ranks)
        state = model.adapter_state_dict()  # every process gathers
        if rank == 0:
            save_file({k: v.cpu() for k, v in state.items()}, str(out / f"{method}.safetensors"))
        else:
            save_file({k: v.cpu() for k, v in state.items()}, str(out / f"{method}.rank1.safetensors"))
        results[method] = {"losses": losses, "sharded": sharded}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_fsdp2_on_two_cpu_processes_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOCAL_WORLD_SIZE", None)
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(29600 + os.getpid() % 1000), str(HERE),
           str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for method, got in results.items():
        assert got["sharded"], method  # the adapters really were DTensor shards
        two = load_file(str(tmp_path / f"{method}.safetensors"))
        other_rank = load_file(str(tmp_path / f"{method}.rank1.safetensors"))
        for k in two:  # buffers (clusters, I-LoRA's slow learner) and gathered parameters agree across ranks
            torch.testing.assert_close(other_rank[k], two[k], rtol=0, atol=0, msg=f"{method}: {k}")
        if method == "ilora":  # its replay buffer holds each process's own rows: not one process's run
            continue
        model = build(method)
        ref_losses = train(model, global_batch())
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5), method
        ref = model.adapter_state_dict()
        assert ref.keys() == two.keys()
        for k in ref:
            torch.testing.assert_close(two[k], ref[k], rtol=1e-3, atol=1e-5, msg=f"{method}: {k}")  # as DDP's test
        if method == "slim":
            assert any("clusters.centres" in k for k in ref)


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
