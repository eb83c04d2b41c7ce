"""benchmarks/step_profile.py: op kinds, time shares and the report (no model is loaded, nothing is profiled)."""

from __future__ import annotations

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def sp():
    return load_benchmark("step_profile")


def test_op_kinds(sp):
    assert sp.op_kind("aten::mm") == "matmul"
    assert sp.op_kind("aten::mul") == "elementwise"
    assert sp.op_kind("aten::uniform_") == "random"
    assert sp.op_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert sp.op_kind("aten::something_new") == "other"


def test_kind_shares_sum_to_one_and_sort(sp):
    shares = sp.kind_shares([("aten::mm", 3.0), ("aten::mul", 1.0), ("aten::add", 1.0), ("aten::foo", 5.0)])
    assert list(shares) == ["other", "matmul", "elementwise"]
    assert shares["matmul"] == pytest.approx(0.3) and shares["elementwise"] == pytest.approx(0.2)
    assert sum(shares.values()) == pytest.approx(1.0)


def _result(allocator: str, wall: float) -> dict:
    return {"run": "lora:mds", "steps": 2, "wall": wall, "cpu": wall, "faults": 1000, "system": 1.0,
            "allocator": allocator, "rows": [("aten::mm", "[[4, 8], [8, 2]]", 1.5, 10)],
            "isolated": [{"op": "aten::mm", "shapes": "[[4, 8], [8, 2]]", "in_step_ms": 150.0, "alone_ms": 50.0,
                          "alone_bf16_ms": 10.0}]}


def test_markdown_gives_the_allocator_ratio_and_the_in_step_ratio(sp):
    text = sp.markdown([_result("glibc", 40.0), _result("libjemalloc.so.2", 20.0)], "python x")
    assert "| lora:mds | 20.0 | 10.0 | 2.00x |" in text
    assert "## lora:mds (glibc)" in text and "## lora:mds (libjemalloc.so.2)" in text
    assert "| 150.00 | 50.00 | 3.0x | 10.00 |" in text


def test_markdown_without_a_pair_has_no_ratio_table(sp):
    assert "preloaded allocator" not in sp.markdown([_result("glibc", 40.0)], "python x")


def test_isolated_times_the_heaviest_shapes(sp):
    rows = [("aten::mm", "[[4, 8], [8, 2]]", 0.5, 10), ("aten::mm", "[[16, 8], [8, 4]]", 2.0, 10),
            ("aten::mul", "[[3, 5], [3, 5]]", 0.1, 4), ("aten::mul", "[[3, 5], []]", 9.0, 4)]
    out = {e["op"]: e for e in sp.isolated(rows)}
    assert out["aten::mm"]["shapes"] == "[[16, 8], [8, 4]]" and out["aten::mm"]["in_step_ms"] == pytest.approx(200)
    assert out["aten::mul"]["shapes"] == "[[3, 5], [3, 5]]"  # the scalar form is not a same-shape product
    assert out["aten::mm"]["alone_ms"] > 0 and "alone_bf16_ms" in out["aten::mm"]


@pytest.mark.parametrize("argv, message", [(["--runs", "nope:mds"], "unknown run 'nope:mds'"),
                                           (["--runs", "slim:nosuch"], "unknown run 'slim:nosuch'"),
                                           (["--preload", "/no/such/lib.so"], "no such file")])
def test_bad_arguments_are_refused_before_any_work(sp, argv, message, capsys):
    with pytest.raises(SystemExit):
        sp.main(argv)
    assert message in capsys.readouterr().err
