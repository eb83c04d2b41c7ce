"""Planning a run at real size without its weights (`slim_peft.training.plan`): every method injects into Llama-3-8B,
Qwen2.5-7B and Mistral-7B built on the meta device, trainable counts equal closed forms written here from the
config numbers, no storage is allocated, the activation closed form agrees with the bytes autograd saves (tiny
models for every method; the embedded model for LoRA and SLIM), and `slim-peft plan` prints it all."""

from __future__ import annotations

import json
import resource

import pytest
import torch
from conftest import tiny_llama

import slim_peft as sp
from slim_peft.adapters import config_from_dict
from slim_peft.cli.main import main
from slim_peft.errors import ConfigError
from slim_peft.training.plan import (
    MODEL_SHAPES,
    Workload,
    adapter_bytes,
    estimate_activations,
    exact_merge_memory,
    injected_meta_model,
    load_model_config,
    measure_activation_bytes,
    plan,
)

# the published config.json numbers of each model and its published parameter count
MODELS = {
    "llama-3-8b": dict(d=4096, f=14336, L=32, H=32, kv=8, hd=128, V=128256, qkv_bias=False, params=8_030_261_248),
    "qwen2.5-7b": dict(d=3584, f=18944, L=28, H=28, kv=4, hd=128, V=152064, qkv_bias=True, params=7_615_616_512),
    "mistral-7b": dict(d=4096, f=14336, L=32, H=32, kv=8, hd=128, V=32000, qkv_bias=False, params=7_241_732_096),
}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
ALL = ATTN + FFN
METHODS = [("lora", {}), ("dora", {}), ("slim", {}), ("mixlora", {}), ("mixlora", {"top_p": 0.8}), ("loramoe", {}),
           ("mola", {}), ("ilora", {}), ("er", {})]
METHOD_IDS = ["lora", "dora", "slim", "mixlora", "mixlora-top_p", "loramoe", "mola", "ilora", "er"]


def linears(m: dict) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each projection of one decoder layer."""
    q, kv = m["H"] * m["hd"], m["kv"] * m["hd"]
    return {"q_proj": (m["d"], q), "k_proj": (m["d"], kv), "v_proj": (m["d"], kv), "o_proj": (q, m["d"]),
            "gate_proj": (m["d"], m["f"]), "up_proj": (m["d"], m["f"]), "down_proj": (m["f"], m["d"])}


def lora_per_layer(m: dict, r: int, names: tuple[str, ...]) -> int:
    """r (d_in + d_out) summed over the adapted projections of one layer."""
    return sum(r * (i + o) for n, (i, o) in linears(m).items() if n in names)


def base_params(m: dict) -> int:
    """Untied embedding and head V d each, per layer the 7 projections (+ q, k, v biases) and 2 norms, final norm."""
    lin = linears(m)
    bias = sum(lin[n][1] for n in ("q_proj", "k_proj", "v_proj")) if m["qkv_bias"] else 0
    per_layer = sum(i * o for i, o in lin.values()) + bias + 2 * m["d"]
    return 2 * m["V"] * m["d"] + m["L"] * per_layer + m["d"]


def expected_trainable(method: str, m: dict) -> int:
    """Default configs: r 16 (I-LoRA 8); SLIM 8 LoRA + 2 identity experts on the FFN with one router of 10 rows per
    layer; MixLoRA LoRA on attention, 8 FFN experts, a router of 8 rows; LoRAMoE 8 experts and a router on each FFN
    projection; MoLA 2/4/6/8 experts by layer quarter on all 7 projections, each with a router; I-LoRA's fast
    learner on attention (the slow one is buffers)."""
    L, d = m["L"], m["d"]
    lin = linears(m)
    if method in ("lora", "er"):  # ER is LoRA trained with replay
        return L * lora_per_layer(m, 16, ALL)
    if method == "dora":
        return L * (lora_per_layer(m, 16, ALL) + sum(o for _, o in lin.values()))
    if method == "slim":
        return L * (8 * lora_per_layer(m, 16, FFN) + 10 * d)
    if method == "mixlora":
        return L * (lora_per_layer(m, 16, ATTN) + 8 * lora_per_layer(m, 16, FFN) + 8 * d)
    if method == "loramoe":
        return L * 8 * (lora_per_layer(m, 16, FFN) + sum(lin[n][0] for n in FFN))
    if method == "mola":
        per_expert = lora_per_layer(m, 16, ALL) + sum(i for i, _ in lin.values())
        return sum([2, 4, 6, 8][layer * 4 // L] * per_expert for layer in range(L))
    if method == "ilora":
        return L * lora_per_layer(m, 8, ATTN)
    raise AssertionError(method)


def expected_buffer_bytes(method: str, m: dict, trainable: int) -> int:
    """Persistent buffers saved with the adapter: SLIM's clusters (8 centres and variances of d fp32, tau, a flag)
    per router; I-LoRA's slow learner (as large as the fast one) and an int64 step per adapted linear."""
    if method == "slim":
        return m["L"] * (2 * 8 * m["d"] * 4 + 4 + 1)
    if method == "ilora":
        return 4 * trainable + 8 * len(ATTN) * m["L"]
    return 0


# ------------------------------------------------------------------------------- real-size models on meta


@pytest.mark.parametrize("name", sorted(MODELS))
def test_built_in_shapes_are_the_published_configs(name):
    m = MODELS[name]
    config = load_model_config(name)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (m["d"], m["f"], m["L"], m["H"], m["kv"], m["V"])
    assert not config.tie_word_embeddings
    assert base_params(m) == m["params"]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("method", "overrides"), METHODS, ids=METHOD_IDS)
def test_every_method_injects_at_real_size_with_the_closed_form_count(name, method, overrides):
    m = MODELS[name]
    p = plan(name, method, overrides)
    expected = expected_trainable(method, m)
    assert p.trainable_parameters == expected
    assert p.total_parameters - p.trainable_parameters == m["params"]
    assert p.base_weight_bytes == 2 * m["params"]  # bf16
    assert p.gradient_bytes == 4 * expected and p.optimizer_bytes == 8 * expected
    header = p.adapter_file_bytes - 4 * expected - expected_buffer_bytes(method, m, expected)
    assert 0 < header < 256 * 1024, header  # the safetensors header: names, shapes, offsets
    assert 0 < p.activation_bytes_checkpointed < p.activation_bytes


def test_meta_models_allocate_no_storage():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for method, overrides in METHODS:
        model = injected_meta_model(load_model_config("llama-3-8b"), config_from_dict({"method": method, **overrides}))
        tensors = [*model.parameters(), *model.buffers()]
        assert tensors and all(t.is_meta for t in tensors)
        assert all(t.is_meta for t in model.adapter_state_dict().values())
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    assert grown_kib < 1024 * 1024  # 15 GiB of bf16 weights, had any been allocated


def test_adapter_file_size_is_the_saved_file(tmp_path):
    for method in ("lora", "slim", "ilora"):
        model = sp.get_adapter_model(tiny_llama(layers=4), config_from_dict({"method": method}))
        model.save_pretrained(tmp_path / method)
        real = (tmp_path / method / "adapter_model.safetensors").stat().st_size
        assert abs(adapter_bytes(model) - real) <= 64, (method, adapter_bytes(model), real)


def test_exact_merge_memory_is_the_largest_projection_in_fp32_with_its_mask():
    cfg = sp.SlimConfig()
    expected = 8 * 4096 * 14336 * (4 + 1)  # E d_out d_in (fp32 update + bool mask) of an FFN projection
    config = load_model_config("llama-3-8b")
    assert exact_merge_memory(config, cfg) == expected
    assert exact_merge_memory(injected_meta_model(config, cfg), cfg) == expected  # injected: from its layers
    assert exact_merge_memory("llama-3-8b", sp.SlimConfig(target_modules=["q_proj"])) == 8 * 4096 * 4096 * 5
    assert exact_merge_memory(config, sp.SlimConfig(mask_ratio=0.0)) == 0
    assert plan("llama-3-8b", "slim").exact_merge_bytes == expected
    assert plan("llama-3-8b", "lora").exact_merge_bytes is None
    fast, exact = plan("llama-3-8b", "slim"), plan("llama-3-8b", "slim", {"merge_form": "exact"})
    assert exact.activation_bytes_checkpointed > fast.activation_bytes_checkpointed + expected // 2


# ------------------------------------------------------------------------- activations: estimate vs measured


def padded_batch(vocab: int, b: int, s: int, pad: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids; the last row ends in `pad` padded positions; every real position after the first supervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, s - pad:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def estimate_for(model, batch: dict[str, torch.Tensor], gradient_checkpointing: bool) -> int:
    b, s = batch["input_ids"].shape
    supervised = (batch["labels"][:, 1:] != -100).float().mean().item()
    est = estimate_activations(model, Workload(b, s, 2, "cpu", supervised, padded=True))
    return est.checkpointed if gradient_checkpointing else est.full


@pytest.mark.parametrize(("method", "overrides"), METHODS, ids=METHOD_IDS)
def test_activation_estimate_matches_the_saved_bytes_on_a_tiny_model(method, overrides):
    torch.manual_seed(0)
    base = tiny_llama(vocab_size=256, hidden=64, layers=4).to(torch.bfloat16)
    model = sp.get_adapter_model(base, config_from_dict({"method": method, **overrides}))
    batch = padded_batch(256, 2, 24, 5)
    if method == "ilora":
        model.train()
        model(**batch)  # fills the replay buffer: the measured step replays, as every later step does
    for checkpointing in (False, True):
        measured = measure_activation_bytes(model, batch, checkpointing)
        estimate = estimate_for(model, batch, checkpointing)
        assert abs(estimate / measured - 1) < 0.25, (checkpointing, estimate, measured)


def test_measurement_counts_each_storage_once_and_no_weights():
    base = tiny_llama(vocab_size=256, hidden=64, layers=2).to(torch.bfloat16)
    model = sp.get_adapter_model(base, sp.LoraConfig(lora_dropout=0.0))
    batch = padded_batch(256, 2, 16, 0)
    seen: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        model.train()
        model(**batch)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    naive = sum(t.untyped_storage().nbytes() for t in seen)
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in seen
              if t.untyped_storage().data_ptr() not in weights}
    assert measure_activation_bytes(model, batch, False) == sum(unique.values()) < naive
    assert measure_activation_bytes(model, batch, True) < sum(unique.values())


@pytest.mark.slow
def test_activation_estimate_matches_the_embedded_model_on_cpu():
    config = load_model_config("smollm2-135m")
    for method in ("lora", "slim"):
        torch.manual_seed(0)
        base, _ = sp.load_base_model("smollm2-135m", dtype="bfloat16")
        c = base.config
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings) == (
            config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings)
        model = sp.get_adapter_model(base, config_from_dict({"method": method}))
        batch = padded_batch(c.vocab_size, 2, 128, 16)
        for checkpointing in (False, True):
            measured = measure_activation_bytes(model, batch, checkpointing)
            estimate = estimate_for(model, batch, checkpointing)
            assert abs(estimate / measured - 1) < 0.25, (method, checkpointing, estimate, measured)


# ----------------------------------------------------------------------------------------------- the CLI


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plan_prints_the_numbers(capsys):
    code, out, err = run_cli(["plan", "--model", "llama-3-8b", "--method", "slim"], capsys)
    assert code == 0, err
    trainable = expected_trainable("slim", MODELS["llama-3-8b"])
    assert f"{trainable:,}" in out
    for label in ("adapter file", "AdamW state", "activations / micro-batch", "with gradient checkpointing", "bf16",
                  "exact DARE form"):
        assert label in out, label

    code, out, err = run_cli(["plan", "--model", "llama-3-8b", "--method", "slim", "--json"], capsys)
    d = json.loads(out)
    assert d["trainable_parameters"] == trainable and d["optimizer_bytes"] == 8 * trainable
    assert d["activation_bytes_checkpointed"] < d["activation_bytes"]
    assert d["peak_bytes"] == d["fixed_bytes"] + d["activation_bytes"]


def test_cli_overrides_batch_and_all_methods(capsys):
    code, out, _ = run_cli(["plan", "--model", "llama-3-8b", "--method", "lora", "--set", "r=8", "--json"], capsys)
    small = json.loads(out)
    assert small["trainable_parameters"] == expected_trainable("lora", MODELS["llama-3-8b"]) // 2
    code, out, _ = run_cli(["plan", "--model", "llama-3-8b", "--method", "lora", "--set", "r=8", "--json",
                            "--batch", "2"], capsys)
    double = json.loads(out)
    assert small["activation_bytes"] < double["activation_bytes"] <= 2 * small["activation_bytes"]
    code, out, err = run_cli(["plan", "--model", "mistral-7b", "--method", "all", "--seq-len", "512"], capsys)
    assert code == 0, err
    rows = out.splitlines()[2:]
    assert sorted(r.split()[0] for r in rows) == sorted(sp.METHODS)


def test_cli_reads_a_local_config(tmp_path, capsys):
    tiny_llama(hidden=32, layers=2).config.save_pretrained(tmp_path)  # hidden 32, MLP 64, 4 heads, 2 KV heads
    m = dict(d=32, f=64, L=2, H=4, kv=2, hd=8)
    for source in (tmp_path, tmp_path / "config.json"):
        code, out, err = run_cli(["plan", "--model", str(source), "--method", "lora", "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["trainable_parameters"] == expected_trainable("lora", m)


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "llama-3-8b", "--method", "slm"], "did you mean 'slim'"),
    (["--model", "llama-3-8c", "--method", "slim"], "did you mean 'llama-3-8b'"),
    (["--model", "./missing/config.json"], "no model config at ./missing/config.json"),
    (["--set", "top_kk=3"], "did you mean 'top_k'"),
    (["--set", "r"], "KEY=VALUE"),
    (["--dtype", "bf16", "--batch", "0"], "at least 1 row"),
])
def test_cli_bad_inputs_are_one_line_errors(argv, message, capsys):
    code, out, err = run_cli(["plan", *argv], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_unreachable_hub_names_the_fix(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ConfigError, match="config.json") as info:
        load_model_config("meta-llama/Meta-Llama-3-8B")
    assert "llama-3-8b" in str(info.value) and "couldn't connect" in str(info.value)


def test_the_embedded_shape_is_a_built_in_name():
    assert "smollm2-135m" in MODEL_SHAPES
    p = plan("smollm2-135m", "lora", micro_batch=2, seq_len=128)
    m = dict(d=576, f=1536, L=30, H=9, kv=3, hd=64)
    assert p.trainable_parameters == expected_trainable("lora", m)
    tied = 49152 * 576 + 30 * (sum(i * o for i, o in linears(m).values()) + 2 * 576) + 576  # one embedding
    assert p.base_weight_bytes == 2 * tied

