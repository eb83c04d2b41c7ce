"""benchmarks/gpu_check.py on the CPU: the tiny random Llama, 3 steps, a few methods (no GPU, no embedded model).

The script's CUDA path (bf16 + gradient checkpointing on the GPU, peak memory) is what it exists to run on a GPU
machine; here the same code runs with --device cpu, where the Trainer trains in CPU bf16 autocast."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def gcheck():
    return load_benchmark("gpu_check")


def _simulated_device_failure(gcheck):
    real = gcheck.train_on_device

    def train(setup, cfg, device, steps, row, **kw):
        if cfg["method"] == "slim":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(setup, cfg, device, steps, row, **kw)

    return train


@pytest.fixture(scope="module")
def run(gcheck, tmp_path_factory):
    """One in-process run: lora and mixlora-top-p train; dora has a broken config; slim's training raises."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.md"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(gcheck.METHODS, "dora", {"method": "nosuch"})
        mp.setattr(gcheck, "train_on_device", _simulated_device_failure(gcheck))
        status = gcheck.main(["--device", "cpu", "--tiny", "--steps", "3", "--in-process", "--out", str(out),
                          "--methods", "lora,dora,slim,mixlora-top-p"])
    report = json.loads(out.with_suffix(".json").read_text())
    return status, out.read_text(), report, {r["method"]: r for r in report["rows"]}


def test_methods_that_work_pass_with_finite_losses_and_the_comparison_filled(gcheck, run):
    status, md, report, rows = run
    assert report["finished"] and report["environment"]["torch"] == torch.__version__
    for name in ("lora", "mixlora-top-p"):
        r = rows[name]
        assert r["passed"] and not r["errors"], r
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert r["final_loss"] == r["losses"][-1] and r["device_step1"] == r["losses"][0]
        assert r["rel_diff"] == pytest.approx(abs(r["device_step1"] - r["cpu_fp32_step1"]) / r["cpu_fp32_step1"])
        assert r["rel_diff"] <= r["tolerance"] == gcheck.TOLERANCE
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0 and r["trained_on"] == "cpu"
        cells = f"| {name} | {r['cpu_fp32_step1']:.5f} | {r['device_step1']:.5f} | {r['rel_diff']:.2e} | 2e-02 | PASS |"
        assert cells in md
    assert "| method | step-1 loss CPU fp32 | step-1 loss CPU bf16 | rel diff | tol | pass |" in md


def test_a_failing_method_is_recorded_and_the_others_still_run(run):
    status, md, _, rows = run
    assert status == 1  # not every method passed
    assert list(rows) == ["lora", "dora", "slim", "mixlora-top-p"]  # the one after the failures ran too
    dora, slim = rows["dora"], rows["slim"]
    assert not dora["passed"] and "unknown method 'nosuch'" in dora["errors"][0]
    assert not slim["passed"] and math.isfinite(slim["cpu_fp32_step1"])  # the CPU reference still ran
    assert len(slim["errors"]) == 1 and "CUDA out of memory (simulated)" in slim["errors"][0]
    assert "| slim |" in md and "FAIL" in md and "CUDA out of memory (simulated)" in md


def test_the_reference_is_the_trainers_step_one_loss(gcheck):
    """The CPU fp32 reference (a forward on the trainer's first batch) equals step 1 of an fp32 Trainer run."""
    setup = gcheck.tiny_setup()
    for cfg in (gcheck.METHODS["lora"], gcheck.METHODS["slim"]):
        row: dict = {}
        gcheck.train_on_device(setup, cfg, "cpu", 1, row, bf16=False, checkpointing=False)
        assert row["device_step1"] == pytest.approx(gcheck.reference_loss(setup, cfg), rel=1e-6)


def test_one_process_per_method_and_a_crashed_or_hung_child_is_recorded(gcheck, tmp_path, monkeypatch):
    out = tmp_path / "iso.md"
    args = ["--device", "cpu", "--tiny", "--steps", "2", "--out", str(out)]
    assert gcheck.main([*args, "--methods", "lora"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    (row,) = report["rows"]
    assert row["passed"] and len(row["losses"]) == 2 and "environment" in row["child"]
    assert report["settings"]["data"].startswith("64 random token sequences")

    crash = [sys.executable, "-c", "import sys; print('child boom'); sys.exit(3)"]
    monkeypatch.setattr(gcheck, "child_command", lambda *a: crash)
    assert gcheck.main([*args, "--methods", "lora"]) == 1
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["errors"] == [
        "child process: exit status 3: child boom"]
    monkeypatch.setattr(gcheck, "child_command", lambda *a: [sys.executable, "-c", "import time; time.sleep(60)"])
    assert gcheck.main([*args, "--methods", "lora", "--method-timeout-s", "1"]) == 1
    assert "timed out after 1 s" in json.loads(out.with_suffix(".json").read_text())["rows"][0]["errors"][0]


def test_no_method_starts_past_the_budget(gcheck, tmp_path):
    out = tmp_path / "b.md"
    argv = ["--device", "cpu", "--tiny", "--budget-s", "0", "--methods", "lora,ilora", "--out", str(out)]
    assert gcheck.main(argv) == 1
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["skipped"] for r in rows] == [True, True] and "not started" in rows[0]["errors"][0]
    assert "| ilora | - | - | - | 2e-02 | skipped |" in out.read_text()


def test_a_missing_model_cache_stops_at_once(gcheck, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIM_PEFT_CACHE", str(tmp_path / "empty"))
    problem = gcheck.model_cache_problem()
    assert "slim-peft fetch" in problem and str(tmp_path / "empty" / "models" / "smollm2-135m") in problem
    if not torch.cuda.is_available():
        assert gcheck.main(["--device", "cpu", "--out", str(tmp_path / "x.md")]) == 2
        assert "not in the local cache" in capsys.readouterr().err
        assert not (tmp_path / "x.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_default_device_exits_with_status_2(gcheck, tmp_path, capsys):
    assert gcheck.main(["--tiny", "--out", str(tmp_path / "x.md")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_unknown_methods_are_refused(gcheck, capsys):
    with pytest.raises(SystemExit):
        gcheck.main(["--methods", "lora,nope"])
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
