"""benchmarks/continual.py's report on stored runs made by hand: seed means and their stderr, the mean matrix,
and the claim check's three verdicts."""

from __future__ import annotations

import pytest
from conftest import load_benchmark

script = load_benchmark("continual")


def stored(variant: str, seed: int, ap: float, bwt: float) -> dict:
    est = lambda v: {"value": v, "stderr": 0.01}  # noqa: E731
    return {"variant": variant, "seed": seed, "matrix": [[0.25] * 4] + [[ap] * 4] * 4,
            "metrics": {"average": est(ap), "backward_transfer": est(bwt), "forward_transfer": est(0.0),
                        "general_retention": [est(-0.01)] * 4}}


def test_summary_means_over_seeds_and_the_claim_verdicts():
    runs = {}
    for seed, (a, b, c) in enumerate([(0.50, 0.40, 0.45), (0.52, 0.41, 0.47), (0.54, 0.39, 0.43)]):
        runs[f"ilora__seed{seed}"] = stored("ilora", seed, a, -0.02)
        runs[f"lora__seed{seed}"] = stored("lora", seed, b, -0.10 - 0.01 * seed)
        runs[f"er__seed{seed}"] = stored("er", seed, c, -0.02 + 0.01 * (seed - 1))
    summary = script.summarize(runs)
    mean, se = summary["ilora"]["metrics"]["average"]
    assert mean == pytest.approx(0.52) and se == pytest.approx(0.02 / 3 ** 0.5)
    assert summary["lora"]["matrix"][1] == pytest.approx([0.40] * 4)
    verdicts = script.claim(summary)
    assert "AP: I-LoRA - LoRA (sequential)" in verdicts[0] and "**reproduces**" in verdicts[0]
    assert "BWT: I-LoRA - LoRA (sequential)" in verdicts[1] and "**reproduces**" in verdicts[1]
    assert "**not resolved**" in verdicts[3]  # BWT vs ER: equal on average
    text = script.report(runs)
    assert "| I-LoRA | 0,1,2 | 52.0 ± 1.2 |" in text and "Stored runs: 9 of 18." in text


def test_a_contradiction_and_a_missing_variant():
    runs = {f"ilora__seed{s}": stored("ilora", s, 0.30 + 0.01 * s, -0.2) for s in range(3)}
    runs.update({f"lora__seed{s}": stored("lora", s, 0.50 + 0.01 * s, -0.05) for s in range(3)})
    verdicts = script.claim(script.summarize(runs))
    assert "**contradicted**" in verdicts[0] and "ER: no stored run yet" in verdicts[2]
