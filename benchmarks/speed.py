"""Speed benchmark: what the mixtures cost against LoRA, the base model and the peer implementation.

On the embedded SmolLM2-135M-Instruct (fp32), batch 8 x 128 tokens, it measures, as ratios:

a. train step (forward + backward + AdamW step) of SLIM (8 LoRA + 2 identity experts, r=16, top_k=2, FFN
   targets) and of every other method in `slim_peft.METHODS`, each over peft's LoRA r=16 on the same target
   modules. Loss on the answer tokens only (the last 32 of each 128-token row, as the trainer's data), logits
   computed only there, for both sides of every ratio;
b. inference prefill (8 x 128 prompt, KV cache on, logits of the last position) and 32-token greedy decode
   time of SLIM over the base model;
c. our MixLoRA forward over the `mixlora` package's MixLoraModelForCausalLM forward on the same weights
   (exported with `slim_peft.integrations.moe_peft.save_moe_peft`; logits checked equal within 1e-4);
d. SLIM's fast dynamic merge (row/column masks of B and A) over the exact elementwise DARE merge on one layer
   (layer 0 up_proj, 1024 tokens, training mode: a fresh mask per call; forward + backward);
e. peak RSS of each configuration, each in a subprocess of its own (ru_maxrss after loading and two train
   steps, or after the timed inference calls);
f. the dense / grouped dispatch crossover of `layers/experts.py` (one linear, 1024 rows).

Timing: both sides of a ratio live in one process and alternate step by step after warm-up, so load from other
processes hits both alike; each number is the median of >= 5 repeats with min-max. Targets (PASS/FAIL):
SLIM train step <= 1.3x LoRA; SLIM prefill <= 1.15x base; our MixLoRA >= 1.5x faster than the peer; fast merge
>= 5x faster than exact. Where SLIM misses a target a torch.profiler run says where the time goes.

    python benchmarks/speed.py                 # full run, writes benchmarks/results/speed.{md,json}
    python benchmarks/speed.py --quick         # smoke run (small, 3 repeats), writes to a temp dir
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ANSWER_TOKENS = 32
NEW_TOKENS = 32

# (method, config overrides, reference target set); every method at r=16 over peft LoRA r=16 on its targets
FFN = ["gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
TRAIN_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "slim": ("slim", dict(r=16, num_lora_experts=8, num_identity_experts=2, top_k=2, target_modules=FFN)),
    "lora (ours)": ("lora", dict(r=16, target_modules=FFN)),
    "dora": ("dora", dict(r=16, target_modules=FFN)),
    "loramoe": ("loramoe", dict(r=16, num_experts=8, target_modules=FFN)),
    "mixlora": ("mixlora", dict(r=16, num_experts=8, top_k=2, target_modules=ATTN + FFN)),
    "mola": ("mola", dict(r=16, experts_per_layer="2,4,6,8", top_k=2, target_modules=ATTN + FFN)),
    "ilora": ("ilora", dict(r=16, target_modules=ATTN)),
}
QUICK_TRAIN = ("slim",)
TARGETS = {"slim_train": 1.3, "slim_prefill": 1.15, "mixlora_vs_peer": 1.5, "fast_merge": 5.0}


# --- shared helpers ---------------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def interleave(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str) -> dict[str, list[float]]:
    """Warm each up, then time them round-robin `repeats` times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return times


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def batch(args: argparse.Namespace, device: str):
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : args.seq - min(ANSWER_TOKENS, args.seq // 2)] = -100
    return ids, mask, labels


def load_base(device: str):
    import slim_peft as sp
    model, _ = sp.load_base_model("smollm2-135m")
    return model.to(device)


def randomize_adapter(model, seed: int = 0, std: float = 0.02) -> None:
    """Small non-zero adapter weights (B starts at zero), so that routing and experts do real work."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "router" in name):
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.device))


def peft_lora(base, targets: list[str]):
    import peft
    return peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets))


def train_step_fn(model, ids, mask, labels, is_peft: bool) -> Callable[[], None]:
    """One optimizer step. Both kinds compute logits only at the supervised positions."""
    import torch
    import torch.nn.functional as F
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    if is_peft:
        inner = model.base_model.model

        def loss_fn():
            hidden = inner.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            targets = labels[:, 1:]
            keep = targets != -100
            return F.cross_entropy(inner.get_output_embeddings()(hidden[:, :-1][keep]).float(), targets[keep])
    else:
        def loss_fn():
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not is_peft:
            model.after_optimizer_step()
    return step


def build_train(name: str, device: str, ids, mask, labels) -> Callable[[], None]:
    """The train step of a TRAIN_CONFIGS entry, or of "peft:<comma-separated targets>"."""
    import slim_peft as sp
    if name.startswith("peft:"):
        return train_step_fn(peft_lora(load_base(device), name[5:].split(",")), ids, mask, labels, True)
    method, kw = TRAIN_CONFIGS[name]
    model = sp.get_adapter_model(load_base(device), sp.config_from_dict({"method": method, **kw}))
    randomize_adapter(model)
    return train_step_fn(model, ids, mask, labels, False)


def reference_for(name: str) -> str:
    return "peft:" + ",".join(TRAIN_CONFIGS[name][1]["target_modules"])


def slim_inference_model(device: str, ids, mask, name: str = "slim"):
    """An adapter model of `name` (a TRAIN_CONFIGS method; "slim (all identity)": SLIM with every token's weight
    forced onto its two identity experts) with non-zero experts and routers, SLIM's clusters initialised on the
    batch, in eval mode (fixed eval masks)."""
    import torch

    import slim_peft as sp
    method = "slim" if name.startswith("slim") else name
    model = sp.get_adapter_model(load_base(device), sp.config_from_dict({"method": TRAIN_CONFIGS[method][0],
                                                                         **TRAIN_CONFIGS[method][1]}))
    randomize_adapter(model)
    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, labels=ids)
    if name == "slim (all identity)":
        model.force_routing([0.0] * 8 + [0.5, 0.5])
    return model.eval()


def prefill_and_decode(model, ids, mask, device: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(prefill, decode): prefill fills a KV cache and returns the last logits; decode runs NEW_TOKENS greedy
    steps from a fresh prefill's cache (only the steps are timed by the caller's split)."""
    import torch
    state: dict[str, Any] = {}

    @torch.no_grad()
    def prefill():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        state["cache"], state["next"] = out.past_key_values, out.logits[:, -1].argmax(-1)

    @torch.no_grad()
    def decode():
        cache, nxt, m = state["cache"], state["next"], mask
        for _ in range(NEW_TOKENS):
            m = torch.cat([m, m.new_ones(m.shape[0], 1)], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=m, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    return prefill, decode


# --- workers (each runs in a subprocess of its own) ---------------------------------------------------------

def worker_train_pair(args, name: str) -> dict[str, Any]:
    ids, mask, labels = batch(args, args.device)
    ref = reference_for(name)
    fns = {"ref": build_train(ref, args.device, ids, mask, labels), "method": build_train(name, args.device, ids, mask,
                                                                                          labels)}
    times = interleave(fns, args.warmup, args.repeats, args.device)
    return {"name": name, "reference": ref, "times": times}


def worker_rss(args, what: str) -> dict[str, Any]:
    """Peak RSS of one configuration alone: "train:<name>", "infer:base", "infer:slim", "peer:ours",
    "peer:theirs"."""
    import torch
    kind, _, name = what.partition(":")
    ids, mask, labels = batch(args, args.device)
    before = peak_rss_mb()
    if kind == "train":
        step = build_train(name, args.device, ids, mask, labels)
        for _ in range(2):
            step()
    elif kind == "infer":
        model = load_base(args.device).eval() if name == "base" else slim_inference_model(args.device, ids, mask)
        prefill, decode = prefill_and_decode(model, ids, mask, args.device)
        prefill()
        decode()
    else:
        ours, theirs = peer_models(args, only=name)
        model = ours if name == "ours" else theirs
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    out = {"what": what, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}
    if args.device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


INFER_MODELS = ("slim", "slim (all identity)", "mixlora", "loramoe", "mola")


def worker_infer(args) -> dict[str, Any]:
    """Prefill and decode of the base model and of each of INFER_MODELS, interleaved; the KV-cache check on
    SLIM."""
    import torch
    ids, mask, _ = batch(args, args.device)
    base = load_base(args.device).eval()
    # the control: a second copy of the base model, the same computation on other memory; its ratio to the base
    # is the null ratio, what this machine's noise and memory placement alone make of two equal sides
    models = {"base": base, "base (second copy)": load_base(args.device).eval()}
    for name in (INFER_MODELS if not args.quick else INFER_MODELS[:2]):
        models[name] = slim_inference_model(args.device, ids, mask, name)
    slim = models["slim"]
    fns = {key: prefill_and_decode(model, ids, mask, args.device) for key, model in models.items()}
    for prefill, decode in fns.values():
        for _ in range(args.warmup):
            prefill()
            decode()
    times: dict[str, list[float]] = {f"{key}_{phase}": [] for key in fns for phase in ("prefill", "decode")}
    for _ in range(args.repeats):
        for key, (prefill, decode) in fns.items():
            times[f"{key}_prefill"].append(timed(prefill, args.device))
            times[f"{key}_decode"].append(timed(decode, args.device))
    # the decode loop really used the cache and matches the full forward at the first step
    with torch.no_grad():
        out = slim(input_ids=ids, attention_mask=mask, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
        m2 = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        step = slim(input_ids=nxt[:, None], attention_mask=m2, past_key_values=out.past_key_values, use_cache=True)
        full = slim(input_ids=torch.cat([ids, nxt[:, None]], 1), attention_mask=m2)
        err = (step.logits[:, -1] - full.logits[:, -1]).abs().max().item()
    identity = models["slim (all identity)"]
    with torch.no_grad():
        same = torch.equal(identity(input_ids=ids, attention_mask=mask).logits,
                           base(input_ids=ids, attention_mask=mask).logits)
    return {"times": times, "kv_cache_step_vs_full_max_abs": err, "flops": flop_budget(base.config),
            "batch": args.batch, "all_identity_equals_base": same}


def flop_budget(cfg) -> dict[str, float]:
    """Multiply-adds per token of the decoder's linears and of SLIM's mixture (dense: all E experts; ideal
    sparse: the K picks) on the FFN projections, from the model config."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head
    attn = d * d * 2 + d * kv * 2
    ffn = 3 * d * f
    _, kw = TRAIN_CONFIGS["slim"]
    rank = kw["num_lora_experts"] * kw["r"]
    dense = rank * (d + f) * 3
    return {"attention_linears": L * attn, "ffn_linears": L * ffn, "slim_dense_mixture": L * dense,
            "slim_top_k_mixture": L * kw["top_k"] * kw["r"] * (d + f) * 3}


def peer_models(args, only: str | None = None):
    """(ours, theirs): our MixLoRA with non-zero weights, and the same weights loaded by the `mixlora`
    package (exported with interop.save_moe_peft). `only` keeps one side (the other is freed first)."""
    import mixlora

    import slim_peft as sp
    from slim_peft.assets import embedded_model_dir
    from slim_peft.integrations.moe_peft import save_moe_peft
    ours = sp.get_adapter_model(load_base(args.device), sp.config_from_dict({"method": "mixlora",
                                                                          **TRAIN_CONFIGS["mixlora"][1]}))
    randomize_adapter(ours, std=0.05)
    ours.eval()
    if only == "ours":
        return ours, None
    with tempfile.TemporaryDirectory() as tmp:
        save_moe_peft(ours, Path(tmp) / "adapter", base_model_name_or_path=str(embedded_model_dir()))
        if only == "theirs":
            ours = None
        theirs, _ = mixlora.MixLoraModelForCausalLM.from_pretrained(str(Path(tmp) / "adapter"))
    theirs = theirs.to(args.device).eval()
    for layer in theirs.model.layers:  # their expert LoRAs sit in plain dicts: model.eval() misses them
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return ours, theirs


def worker_peer(args) -> dict[str, Any]:
    import torch
    ids, mask, _ = batch(args, args.device)
    ours, theirs = peer_models(args)

    def fwd(model):
        @torch.no_grad()
        def run():
            return model(input_ids=ids, attention_mask=mask).logits
        return run
    base = load_base(args.device).eval()  # the floor: no adapter at all
    a, b = fwd(ours)(), fwd(theirs)()
    err = (a - b).abs().max().item()
    times = interleave({"ours": fwd(ours), "theirs": fwd(theirs), "base": fwd(base)}, args.warmup, args.repeats,
                       args.device)
    # Which side is closer to the exact value: our model rerun in float64 (on the CPU).
    with torch.no_grad():
        truth = ours.to("cpu", torch.float64)(input_ids=ids.cpu(), attention_mask=mask.cpu()).logits
    to_truth = {k: (v.to("cpu", torch.float64) - truth).abs().max().item() for k, v in (("ours", a), ("theirs", b))}
    per_position = (a - b).abs().amax(-1).flatten()
    return {"times": times, "logits_max_abs_diff": err, "max_abs_diff_to_fp64": to_truth,
            "positions_over_1e-4": int((per_position > 1e-4).sum()), "positions": per_position.numel(),
            "median_position_max_abs_diff": per_position.median().item()}


def worker_merge(args) -> dict[str, Any]:
    """One SlimLinear (layer 0 up_proj) with the fast and the exact merge form, same weights and routing."""
    import torch

    import slim_peft as sp
    from slim_peft.adapters.methods.slim.layer import ForwardContext, SlimLinear, SlimRouter
    base = load_base(args.device)
    linear = base.model.layers[0].mlp.up_proj
    T = args.batch * args.seq
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, linear.in_features, generator=g).to(args.device).requires_grad_()
    layers = {}
    for form in ("fast", "exact"):
        cfg = sp.SlimConfig(r=16, merge_form=form, lora_dropout=0.0)
        router = SlimRouter(linear.in_features, cfg, device=args.device)
        layer = SlimLinear(linear, cfg, ForwardContext(), "model.layers.0.mlp.up_proj", router).train()
        with torch.no_grad():
            layer.experts.lora_B.normal_(0, 0.02, generator=None)
        layers[form] = (layer, router)
    layers["exact"][0].experts.load_state_dict(layers["fast"][0].experts.state_dict())
    logits = torch.randn(T, 10, generator=g).to(args.device)
    routing = torch.topk(logits, 2, dim=-1)
    current = (routing.indices, torch.softmax(routing.values, -1))

    def step(form):
        layer, router = layers[form]

        def run():
            router.current = current
            layer(x).square().mean().backward()
        return run
    times = interleave({f: step(f) for f in layers}, args.warmup, args.repeats, args.device)
    return {"times": times, "tokens": T, "shape": [linear.in_features, linear.out_features]}


def worker_dispatch(args) -> dict[str, Any]:
    """Dense vs grouped dispatch on one linear, with and without autograd, min of the repeats."""
    import torch

    from slim_peft.adapters.modules.experts import dense_gates, dense_mixture, grouped_mixture
    T = args.batch * args.seq
    rows = []
    cases = [(8, 16, 2), (8, 32, 2), (16, 16, 2), (8, 64, 2), (32, 16, 2), (8, 16, 1), (4, 16, 1)]
    for E, r, K in cases[: 3 if args.quick else None]:
        for d_in, d_out in ((576, 1536), (1536, 576)):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(T, d_in, generator=g).to(args.device).requires_grad_()
            A = (torch.randn(E, r, d_in, generator=g) * 0.05).to(args.device).requires_grad_()
            B = (torch.randn(E, d_out, r, generator=g) * 0.05).to(args.device).requires_grad_()
            idx = torch.rand(T, E + (2 if K > 1 else 0), generator=g).topk(K, -1).indices.to(args.device)
            w = torch.rand(T, K, generator=g).to(args.device)
            out = torch.randn(T, d_out, generator=g).to(args.device)
            a = (x, A, B, idx, w, out)  # `out` is accumulated into in place: each call gets a fresh copy
            paths = {"dense": lambda a=a: dense_mixture(*a[:3], dense_gates(a[3], a[4], a[1].shape[0]), a[5].clone()),
                     "grouped": lambda a=a: grouped_mixture(*a[:5], a[5].clone())}
            row = {"E": E, "r": r, "K": K, "d_in": d_in, "d_out": d_out}
            for mode in ("train", "infer"):
                for name, f in paths.items():
                    if mode == "train":
                        def fn(f=f):
                            f().sum().backward()
                    else:
                        def fn(f=f):
                            with torch.no_grad():
                                f()
                    ts = interleave({name: fn}, 2, max(args.repeats, 5), args.device)[name]
                    row[f"{mode}_{name}_ms"] = min(ts) * 1e3
            rows.append(row)
    return {"rows": rows, "tokens": T}


def worker_profile(args, what: str) -> dict[str, Any]:
    """Where the time goes: SLIM train step ("train") or prefill ("prefill") against its reference, or our
    MixLoRA forward against the peer's ("peer"): labelled regions and top ops."""
    from torch.profiler import profile, record_function

    import slim_peft.adapters.methods.slim.layer as S
    wrapped = {"route": (S.SlimRouter, "route"), "cluster distance": (S.SlimRouter, "distance"),
               "identity-row check": (S.SlimRouter, "lora_rows"), "mixture (dense/grouped)": (S, "mix_experts"),
               "mask drawing": (S.SlimLinear, "masks"), "masked factors": (S.SlimLinear, "factors"),
               "SLIM layers (whole)": (S.SlimLinear, "forward")}
    for label, (obj, attr) in wrapped.items():
        fn = getattr(obj, attr)

        def wrap(*a, _fn=fn, _label=label, **k):
            with record_function("##" + _label):
                return _fn(*a, **k)
        setattr(obj, attr, wrap)
    ids, mask, labels = batch(args, args.device)
    if what == "train":
        run = build_train("slim", args.device, ids, mask, labels)
        ref = build_train(reference_for("slim"), args.device, ids, mask, labels)
    elif what == "peer":
        import torch
        ours, theirs = peer_models(args)
        run, ref = ((lambda m=m: torch.no_grad()(m)(input_ids=ids, attention_mask=mask)) for m in (ours, theirs))
    elif what == "generate":  # a prefill and its 32 decoded tokens
        slim = slim_inference_model(args.device, ids, mask)
        pairs = [prefill_and_decode(m, ids, mask, args.device) for m in (slim, load_base(args.device).eval())]
        run, ref = ((lambda pf=pf, dec=dec: (pf(), dec())) for pf, dec in pairs)
    else:
        slim = slim_inference_model(args.device, ids, mask)
        run = prefill_and_decode(slim, ids, mask, args.device)[0]
        ref = prefill_and_decode(load_base(args.device).eval(), ids, mask, args.device)[0]
    out: dict[str, Any] = {}
    for key, fn in (("slim", run), ("reference", ref)):
        fn()
        fn()
        with profile() as prof:
            fn()
        ka = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ka) / 1e3
        regions = {e.key[2:]: e.cpu_time_total / 1e3 for e in ka if e.key.startswith("##")}
        ops = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in ka if not e.key.startswith("##")),
                     key=lambda t: -t[1])[:12]
        out[key] = {"total_ms": total, "regions_ms": regions, "top_ops": ops}
    return out


WORKERS = {"infer": worker_infer, "peer": worker_peer, "merge": worker_merge, "dispatch": worker_dispatch}


def run_worker(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    kind, _, rest = args.worker.partition("=")
    if kind == "train":
        result = worker_train_pair(args, rest)
    elif kind == "rss":
        result = worker_rss(args, rest)
    elif kind == "profile":
        result = worker_profile(args, rest)
    else:
        result = WORKERS[kind](args)
    Path(args.worker_out).write_text(json.dumps(result))


# --- orchestration -----------------------------------------------------------------------------------------

def spawn(args, worker: str, batch: int | None = None) -> dict[str, Any]:
    """Run one worker in a fresh interpreter (at `batch` rows, default --batch); its result is kept in the work
    dir (reused with --resume)."""
    batch = batch or args.batch
    suffix = "" if batch == args.batch else f"_b{batch}"
    path = args.work_dir / (worker.replace("/", "_").replace(":", "_").replace(",", "_") + suffix + ".json")
    if args.resume and path.is_file():
        print(f"  {worker:28s} (reused from {path})", flush=True)
        return json.loads(path.read_text())
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--worker-out", str(path),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--batch", str(batch), "--seq", str(args.seq), "--device", args.device]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    # torch's allocator asks for transparent huge pages on large tensors: without it, two copies of the same model
    # decoded up to 15% apart on one VM (whichever loaded first was faster), which biased every ratio to the base
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker {worker} failed (exit {proc.returncode})")
    result = json.loads(path.read_text())
    print(f"  {worker:28s} {time.perf_counter() - t:6.1f} s", flush=True)
    return result


def ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Ratio of medians, with the min-max of the step-by-step (interleaved) ratios."""
    paired = [a / b for a, b in zip(num, den, strict=True)]
    return {"ratio": statistics.median(num) / statistics.median(den), "paired_min": min(paired),
            "paired_max": max(paired)}


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    import peft
    import torch
    import transformers
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "mixlora": version("mixlora"), "load_avg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: smaller batch, 3 repeats, SLIM only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default=None, help="comma-separated TRAIN_CONFIGS names (default: all)")
    p.add_argument("--out", type=Path, default=None, help="results dir (default: benchmarks/results; quick: temp)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-configuration RSS subprocesses")
    p.add_argument("--only", choices=["infer"], default=None,
                   help="infer: only the inference section (batch --batch and batch 1), written to "
                        "speed_inference.md/json")
    p.add_argument("--resume", action="store_true", help="reuse the worker results of an interrupted run with the "
                                                         "same settings (kept in the work dir)")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY of the workers (default PASSIVE: on a loaded machine OpenMP's spin-waiting "
                        "makes small ops 10x slower; '' keeps the environment's)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch
    args.threads = args.threads or torch.get_num_threads()
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.batch = args.batch or (2 if args.quick else 8)
    args.seq = args.seq or (64 if args.quick else 128)
    if args.worker:
        run_worker(args)
        return
    names = args.methods.split(",") if args.methods else list(QUICK_TRAIN if args.quick else TRAIN_CONFIGS)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="slim-speed-")) if args.quick else RESULTS)
    key = f"b{args.batch}-s{args.seq}-t{args.threads}-r{args.repeats}-w{args.warmup}-{args.device}"
    args.work_dir = Path(tempfile.gettempdir()) / "slim-peft-speed" / key
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        for old in args.work_dir.glob("*.json"):
            old.unlink()
    started = time.perf_counter()
    meta = machine()
    meta.update(command="python benchmarks/speed.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), threads=args.threads,
                batch=args.batch, seq=args.seq, repeats=args.repeats, warmup=args.warmup, device=args.device,
                quick=args.quick, omp_wait_policy=args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY"),
                thp_mem_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE", "1"),
                answer_tokens=min(ANSWER_TOKENS, args.seq // 2), new_tokens=NEW_TOKENS)
    print(f"speed benchmark: {args.batch} x {args.seq} tokens, {args.threads} threads, {args.repeats} repeats",
          flush=True)
    if args.only == "infer":
        res = {"infer": spawn(args, "infer"), "infer_b1": spawn(args, "infer", batch=1),
               "profile_b1": spawn(args, "profile=generate", batch=1)}
        meta["load_avg_end"] = os.getloadavg()
        meta["wall_s"] = time.perf_counter() - started
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "speed_inference.json").write_text(json.dumps({"meta": meta, "results": res}, indent=2))
        (out_dir / "speed_inference.md").write_text(inference_report(meta, res, out_dir / "speed.json"))
        print(f"wrote {out_dir / 'speed_inference.md'} in {meta['wall_s']:.0f} s")
        return
    res = {"train": {}, "rss": {}}
    for name in names:
        res["train"][name] = spawn(args, f"train={name}")
    res["infer"] = spawn(args, "infer")
    res["peer"] = spawn(args, "peer")
    res["merge"] = spawn(args, "merge")
    res["dispatch"] = spawn(args, "dispatch")
    if not args.no_rss:
        refs = sorted({reference_for(n) for n in names})
        for what in [f"train:{r}" for r in refs] + [f"train:{n}" for n in names] + \
                ["infer:base", "infer:slim", "peer:ours", "peer:theirs"]:
            res["rss"][what] = spawn(args, f"rss={what}")
    checks = evaluate(res)
    res["profiles"] = {}
    for key, what in (("slim_train", "train"), ("slim_prefill", "prefill"), ("mixlora_vs_peer", "peer")):
        if not checks[key]["pass"]:
            res["profiles"][what] = spawn(args, f"profile={what}")
    meta["load_avg_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "speed.json").write_text(json.dumps({"meta": meta, "results": res, "targets": checks}, indent=2))
    (out_dir / "speed.md").write_text(report(meta, res, checks))
    for c in checks.values():
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['label']}: {c['value']:.3f} (target {c['target']})")
    print(f"wrote {out_dir / 'speed.md'} and speed.json in {meta['wall_s']:.0f} s")


def evaluate(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    t = res["infer"]["times"]
    checks = {
        "slim_prefill": dict(label="SLIM prefill / base prefill", target=f"<= {TARGETS['slim_prefill']}",
                             **ratio(t["slim_prefill"], t["base_prefill"])),
        "mixlora_vs_peer": dict(label="peer MixLoRA forward / our MixLoRA forward",
                                target=f">= {TARGETS['mixlora_vs_peer']}",
                                **ratio(res["peer"]["times"]["theirs"], res["peer"]["times"]["ours"])),
        "fast_merge": dict(label="exact DARE merge / fast merge (one layer, fwd+bwd)",
                           target=f">= {TARGETS['fast_merge']}",
                           **ratio(res["merge"]["times"]["exact"], res["merge"]["times"]["fast"])),
    }
    if "slim" in res["train"]:
        tr = res["train"]["slim"]["times"]
        checks["slim_train"] = dict(label="SLIM train step / peft LoRA train step",
                                    target=f"<= {TARGETS['slim_train']}", **ratio(tr["method"], tr["ref"]))
    else:
        checks["slim_train"] = dict(label="SLIM train step (not run)", target="-", ratio=float("nan"))
    for key, c in checks.items():
        c["value"] = c["ratio"]
        if key in ("slim_train", "slim_prefill"):
            c["pass"] = c["ratio"] <= TARGETS[key]
        else:
            c["pass"] = c["ratio"] >= TARGETS[key]
    checks["mixlora_vs_peer"]["pass"] &= res["peer"]["logits_max_abs_diff"] <= 1e-4
    return dict(sorted(checks.items(), key=lambda kv: list(TARGETS).index(kv[0])))


INFER_TARGETS = {"prefill": 1.10, "decode": 1.15}  # SLIM over the base model, at batch 8 and at batch 1


def inference_report(meta: dict[str, Any], res: dict[str, Any], previous: Path) -> str:
    """speed_inference.md: every mixture's prefill and decode over the base model at both batch sizes, SLIM's
    targets, and the previous full run's SLIM figures (speed.json) beside them."""
    L = ["# Speed: inference of the mixtures over the base model", "",
         f"Command: `{meta['command']}`  ", f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['threads']} torch "
         f"threads, THP_MEM_ALLOC_ENABLE={meta.get('thp_mem_alloc', 'unset')}, torch {meta['torch']}, transformers "
         f"{meta['transformers']}; {meta['date']}; load average at start "
         f"{tuple(round(x, 2) for x in meta['load_avg_start'])}, at end "
         f"{tuple(round(x, 2) for x in meta['load_avg_end'])}; run time {meta['wall_s']:.0f} s", "",
         f"Model: the embedded SmolLM2-135M-Instruct in fp32, prompts of {meta['seq']} tokens; prefill = the prompt "
         f"with the KV cache on and the last logits, decode = {NEW_TOKENS} greedy tokens from that cache. Adapters "
         "at r=16 with non-zero weights (`TRAIN_CONFIGS`), eval mode, SLIM's fixed eval masks. All models run in one "
         f"process, alternating call by call: median of {meta['repeats']} repeats after {meta['warmup']} warm-up "
         "(min-max), ms; ratio = ratio of medians (min-max of the call-by-call ratios). `base (second copy)` is "
         "the control: the same model loaded twice, so its ratio is what noise and memory placement alone give "
         "two equal sides on this machine.", ""]
    old = json.loads(previous.read_text()) if previous.is_file() else None
    L += ["## SLIM's targets", "", "| batch | phase | SLIM / base | paired min-max | goal | result | previous run |",
          "|---|---|---|---|---|---|---|"]
    for key in ("infer", "infer_b1"):
        r = res[key]
        for phase, goal in INFER_TARGETS.items():
            rr = ratio(r["times"][f"slim_{phase}"], r["times"][f"base_{phase}"])
            before = "-"
            if old and key == "infer" and old["meta"]["batch"] == r["batch"]:
                t = old["results"]["infer"]["times"]
                before = f"{ratio(t[f'slim_{phase}'], t[f'base_{phase}'])['ratio']:.3f} ({old['meta']['cpu']}, " \
                         f"{old['meta']['date'][:10]})"
            L.append(f"| {r['batch']} | {phase} | {rr['ratio']:.3f} | {rr['paired_min']:.3f}-{rr['paired_max']:.3f} | "
                     f"<= {goal} | {'PASS' if rr['ratio'] <= goal else 'FAIL'} | {before} |")
    for key in ("infer", "infer_b1"):
        r = res[key]
        t = r["times"]
        L += ["", f"## Batch {r['batch']}", "", "| model | prefill ms | / base | decode ms | / base |",
              "|---|---|---|---|---|"]
        for name in dict.fromkeys(k.rsplit("_", 1)[0] for k in t):
            cells = []
            for phase in ("prefill", "decode"):
                rr = ratio(t[f"{name}_{phase}"], t[f"base_{phase}"])
                cells += [fmt(t[f"{name}_{phase}"]), f"{rr['ratio']:.3f}"]
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        L += ["", f"KV-cache check (SLIM): one cached step vs the full forward, max |logit diff| "
                  f"{r['kv_cache_step_vs_full_max_abs']:.2e}. SLIM with all weight on identity experts gives the base "
                  f"model's logits exactly: {r['all_identity_equals_base']}."]
    prof = res.get("profile_b1")
    if prof:
        L += ["", "## Where SLIM's time goes: a prefill and 32 decoded tokens at batch 1 (torch.profiler, CPU ms)", "",
              f"SLIM total {prof['slim']['total_ms']:.0f} ms vs the base model {prof['reference']['total_ms']:.0f} ms. "
              "Regions (inclusive; route includes the cluster distance and the identity-row check; the SLIM layers "
              "include their base linear and the mixture): " + ", ".join(
                  f"{k} {v:.0f}" for k, v in prof["slim"]["regions_ms"].items()), "",
              "| op | SLIM self ms | calls | base self ms |", "|---|---|---|---|"]
        ref_ops = {k: v for k, v, _ in prof["reference"]["top_ops"]}
        for k, v, n in prof["slim"]["top_ops"]:
            L.append(f"| {k} | {v:.0f} | {n} | {ref_ops.get(k, float('nan')):.0f} |")
    return "\n".join(L) + "\n"


def fmt(s: list[float], scale: float = 1e3) -> str:
    d = summary(s)
    return f"{d['median'] * scale:.1f} ({d['min'] * scale:.1f}-{d['max'] * scale:.1f})"


def report(meta: dict[str, Any], res: dict[str, Any], checks: dict[str, Any]) -> str:
    L = ["# Speed: SLIM and the MoE-LoRA baselines against LoRA, the base model and the peer", ""]
    L += [f"Command: `{meta['command']}`  ", f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['platform']}, "
          f"device {meta['device']}, {meta['threads']} torch threads, OMP_WAIT_POLICY={meta['omp_wait_policy']}  ",
          f"Versions: torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, mixlora "
          f"{meta['mixlora']}, Python {meta['python']}  ",
          f"Date: {meta['date']}; load average (1/5/15 min) at start "
          f"{tuple(round(x, 2) for x in meta['load_avg_start'])}, at end "
          f"{tuple(round(x, 2) for x in meta['load_avg_end'])}; run time {meta['wall_s']:.0f} s", "",
          f"Model: the embedded SmolLM2-135M-Instruct in fp32; batch {meta['batch']} x {meta['seq']} tokens. Times in "
          f"ms: median of {meta['repeats']} repeats after {meta['warmup']} warm-up (min-max). Both sides of a ratio "
          f"run in one process, alternating step by step; the ratio is the ratio of medians, with the min-max of "
          f"the step-by-step ratios. Train steps: loss on the answer tokens only (the last "
          f"{meta['answer_tokens']} of each row), logits only there, for both sides; AdamW; adapters at r=16, "
          f"alpha 32, dropout 0.05, non-zero B.", ""]
    L += ["## Targets", "", "| target | value | paired min-max | goal | result |", "|---|---|---|---|---|"]
    for c in checks.values():
        L.append(f"| {c['label']} | {c['ratio']:.3f} | {c.get('paired_min', float('nan')):.3f}-"
                 f"{c.get('paired_max', float('nan')):.3f} | {c['target']} | {'PASS' if c['pass'] else 'FAIL'} |")
    L += ["", "## a. Train step over peft LoRA r=16 on the same target modules", "",
          "| method | targets | method ms | peft LoRA ms | ratio | paired min-max |", "|---|---|---|---|---|---|"]
    for name, r in res["train"].items():
        rr = ratio(r["times"]["method"], r["times"]["ref"])
        L.append(f"| {name} | {', '.join(TRAIN_CONFIGS[name][1]['target_modules'])} | {fmt(r['times']['method'])} | "
                 f"{fmt(r['times']['ref'])} | {rr['ratio']:.3f} | {rr['paired_min']:.3f}-{rr['paired_max']:.3f} |")
    L += ["", "Settings: " + "; ".join(f"{n}: {TRAIN_CONFIGS[n][0]} {TRAIN_CONFIGS[n][1]}" for n in res["train"]), ""]
    t = res["infer"]["times"]
    L += ["## b. Inference: SLIM over the base model", "",
          "| phase | SLIM ms | base ms | ratio | paired min-max |", "|---|---|---|---|---|"]
    for phase in ("prefill", "decode"):
        rr = ratio(t[f"slim_{phase}"], t[f"base_{phase}"])
        what = "prompt with KV cache, last logits" if phase == "prefill" else f"{NEW_TOKENS} greedy tokens"
        L.append(f"| {phase} ({what}) | {fmt(t[f'slim_{phase}'])} | {fmt(t[f'base_{phase}'])} | {rr['ratio']:.3f} | "
                 f"{rr['paired_min']:.3f}-{rr['paired_max']:.3f} |")
    L += ["", f"KV-cache check: one cached step vs the full forward, max |logit diff| "
              f"{res['infer']['kv_cache_step_vs_full_max_abs']:.2e}.", ""]
    pr = res["peer"]
    rr = ratio(pr["times"]["theirs"], pr["times"]["ours"])
    L += ["## c. Our MixLoRA over the `mixlora` package (same weights, eval forward with full logits)", "",
          "| ours ms | mixlora package ms | speed-up | paired min-max | max abs logit diff |", "|---|---|---|---|---|",
          f"| {fmt(pr['times']['ours'])} | {fmt(pr['times']['theirs'])} | {rr['ratio']:.3f} | "
          f"{rr['paired_min']:.3f}-{rr['paired_max']:.3f} | {pr['logits_max_abs_diff']:.2e} |", ""]
    if "base" in pr["times"]:
        base = statistics.median(pr["times"]["base"])
        truth = pr["max_abs_diff_to_fp64"]
        ours_ms, theirs_ms = (statistics.median(pr["times"][k]) for k in ("ours", "theirs"))
        L += ["The floor, the base model's forward on the same batch (full logits, no adapter): "
              f"{fmt(pr['times']['base'])} ms; ours / base = {ours_ms / base:.3f}, mixlora package / base = "
              f"{theirs_ms / base:.3f}. Max abs logit difference to our model rerun "
              f"in float64: ours {truth['ours']:.2e}, mixlora package {truth['theirs']:.2e}. Positions whose logits "
              f"differ by more than 1e-4 between ours and the package: {pr['positions_over_1e-4']} of "
              f"{pr['positions']} (median per-position max difference {pr['median_position_max_abs_diff']:.1e}); "
              "with random routers a near-tie in a top-2 choice flips on rounding differences (the order of the "
              "sums differs: MixLoRA's code runs W_down per (token, expert) pair, we run it once on the weighted "
              "mix), and the flip then moves the later positions of that row through attention.", ""]
    mg = res["merge"]
    rr = ratio(mg["times"]["exact"], mg["times"]["fast"])
    L += [f"## d. Dynamic merge on one layer ({mg['shape'][0]} -> {mg['shape'][1]}, {mg['tokens']} tokens, 8 LoRA + 2 "
          f"identity experts, top-2, fresh masks, forward + backward)", "",
          "| fast (factor masks) ms | exact (elementwise DARE) ms | speed-up | paired min-max |", "|---|---|---|---|",
          f"| {fmt(mg['times']['fast'])} | {fmt(mg['times']['exact'])} | {rr['ratio']:.2f} | "
          f"{rr['paired_min']:.2f}-{rr['paired_max']:.2f} |", ""]
    if res["rss"]:
        L += ["## e. Peak RSS (each configuration alone in a subprocess: ru_maxrss after loading and two train steps, "
              "or after prefill + decode / one forward)", "", "| configuration | peak RSS MB |", "|---|---|"]
        for what, r in res["rss"].items():
            L.append(f"| {what} | {r['peak_rss_mb']:.0f} |")
        L.append("")
    d = res["dispatch"]
    L += [f"## f. Dispatch crossover (one linear, {d['tokens']} rows; min of the repeats, ms; `auto` rule in "
          f"layers/experts.py)", "", "| E | r | K | d_in -> d_out | train dense | train grouped | infer dense | "
          "infer grouped |", "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        L.append(f"| {r['E']} | {r['r']} | {r['K']} | {r['d_in']} -> {r['d_out']} | {r['train_dense_ms']:.1f} | "
                 f"{r['train_grouped_ms']:.1f} | {r['infer_dense_ms']:.1f} | {r['infer_grouped_ms']:.1f} |")
    L.append("")
    fl = res["infer"].get("flops")
    if fl:
        linears = fl["attention_linears"] + fl["ffn_linears"]
        L += ["## Cost model (multiply-adds per token, from the model config)", "",
              f"Decoder linears: {linears / 1e6:.1f} M (FFN {fl['ffn_linears'] / 1e6:.1f} M). SLIM's dense mixture "
              f"on the FFN projections: {fl['slim_dense_mixture'] / 1e6:.1f} M = "
              f"{100 * fl['slim_dense_mixture'] / linears:.0f}% of the decoder linears (all 8 experts' r=16 factors "
              f"for every token); the top-2 picks alone would be {fl['slim_top_k_mixture'] / 1e6:.1f} M "
              f"({100 * fl['slim_top_k_mixture'] / linears:.0f}%). The dense path runs its two matmuls at the "
              f"same FLOP rate as the base matmuls, so its share of the time is about its share of the FLOPs; the "
              f"grouped path would do the top-2 work only, but its gather of the rows and scatter of the outputs "
              f"(T K x d each, memory-bound) cost more than the saved FLOPs on this machine (table f), so `auto` "
              f"keeps the dense path at E r = 128.", ""]
    for what, prof in res.get("profiles", {}).items():
        if what == "peer":
            title, a, b = "our MixLoRA forward vs the mixlora package", "ours", "mixlora package"
        else:
            title, a, b = f"SLIM {what}", "SLIM", "reference"
        L += [f"## Where the time goes: {title} (torch.profiler, one call, CPU ms)", "",
              f"{a} total {prof['slim']['total_ms']:.0f} ms vs {b} {prof['reference']['total_ms']:.0f} ms."
              + (" Regions (inclusive): " + ", ".join(f"{k} {v:.0f}" for k, v in prof["slim"]["regions_ms"].items())
                 if prof["slim"]["regions_ms"] else ""), "",
              f"| op | {a} self ms | calls | {b} self ms |", "|---|---|---|---|"]
        ref_ops = {k: v for k, v, _ in prof["reference"]["top_ops"]}
        for k, v, n in prof["slim"]["top_ops"]:
            L.append(f"| {k} | {v:.0f} | {n} | {ref_ops.get(k, float('nan')):.0f} |")
        L.append("")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
