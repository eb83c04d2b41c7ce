"""Where instruction and chat rows come from: files (JSONL, JSON, CSV, Parquet), a directory written by
`datasets.save_to_disk`, the embedded demo set, or (with internet and `datasets` installed) a Hugging Face
dataset id; several sources mixed with weights; a content-hash split into training and held-out rows.

Every row is parsed (`schemas.parse_row`) when its source is read, so a malformed row is a `DataError` naming
its file, line (or row) and field before any model is loaded.

Weights multiply a source's rows: 2.0 repeats every row twice, 0.3 keeps a seeded 30% of them; the share of
source i in the mixture is w_i n_i / sum_j w_j n_j.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slim_peft.errors import DataError

from .schemas import FORMATS, Row, parse_row

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# fields that hold lists of messages or pairs; in a CSV cell they are JSON text
JSON_FIELDS = ("messages", "conversations", "history", "prompt", "completion")
HELD_OUT_SALT = "slim-peft-heldout-v1"


@dataclass(frozen=True)
class DataSource:
    """One source of rows: a path, a registered name (`EMBEDDED_DATA`) or a Hub id, its weight in the
    mixture, and (Hub ids and save_to_disk dataset dicts) the split and subset to read."""

    path: str
    weight: float = 1.0
    split: str = "train"
    subset: str | None = None
    data_format: str | None = None

    def __post_init__(self) -> None:
        if not self.path:
            raise DataError("a data source has an empty path")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise DataError(f"data source {self.path!r}: weight must be a positive number, got {self.weight}")
        if self.data_format is not None and self.data_format not in FORMATS:
            raise DataError(f"data_format {self.data_format!r} is not one of {FORMATS}")

    @property
    def name(self) -> str:
        """A short name for tables: the file stem, or the Hub id / embedded name."""
        p = Path(self.path)
        return p.stem if p.suffix in FILE_SUFFIXES else self.path


@dataclass(frozen=True)
class SourcedRow:
    """A parsed row with where it came from ("file:line") and its raw fields (the held-out split hashes them)."""

    row: Row
    where: str
    source: str
    raw_json: str


def parse_sources(spec: str | Sequence[Any], *, split: str = "train", subset: str | None = None,
                  data_format: str | None = None) -> list[DataSource]:
    """`spec`: "a.jsonl,b.parquet*0.5" (comma-separated, `*W` a weight), or a list of those strings or of
    mappings {path, weight, split, subset, data_format} (YAML). `split`, `subset` and `data_format` are the
    defaults of the entries that do not name their own."""
    items = [s for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, dict):
            unknown = set(item) - {"path", "weight", "split", "subset", "data_format"}
            if unknown or "path" not in item:
                raise DataError(f"a data source mapping needs 'path' and may have weight, split, subset, "
                                f"data_format; got {sorted(item)}")
            out.append(DataSource(str(item["path"]), float(item.get("weight", 1.0)), item.get("split", split),
                                  item.get("subset", subset), item.get("data_format", data_format)))
            continue
        text = str(item).strip()
        if not text:
            continue
        path, star, weight = text.rpartition("*") if "*" in text else (text, "", "")
        try:
            w = float(weight) if star else 1.0
        except ValueError:
            raise DataError(f"data source {text!r}: the weight after '*' must be a number") from None
        out.append(DataSource(path.strip(), w, split, subset, data_format))
    if not out:
        raise DataError("no data source given: pass a file, a save_to_disk directory or a dataset id")
    return out


@dataclass(frozen=True)
class EmbeddedData:
    """A data set built from the shipped files: how to make its raw rows, what it is, and the evaluation tasks
    it was drawn from (a run that trains on it keeps those out of its general suite)."""

    load: Callable[[], list[dict[str, Any]]]
    description: str
    related_tasks: tuple[str, ...] = ()


# name -> the embedded data set; filled by `register_embedded_data`
EMBEDDED_DATA: dict[str, EmbeddedData] = {}


def register_embedded_data(name: str, data: EmbeddedData) -> None:
    """Make `name` a data source (the demo set of `slim_peft.data.demo`)."""
    EMBEDDED_DATA[name] = data


def related_tasks(sources: Sequence[DataSource]) -> set[str]:
    """The evaluation tasks the embedded sources among `sources` were drawn from."""
    return {t for s in sources if s.path in EMBEDDED_DATA for t in EMBEDDED_DATA[s.path].related_tasks}


def read_source(source: DataSource) -> list[SourcedRow]:
    """Every row of one source, parsed; a `DataError` names the first bad row, its field and the fix."""
    raw_rows = _raw_rows(source)
    if not raw_rows:
        raise DataError(f"data source {source.path!r} holds no rows")
    out = []
    for where, raw in raw_rows:
        row = parse_row(raw, where, source.data_format)
        out.append(SourcedRow(row, where, source.name, json.dumps(raw, sort_keys=True, ensure_ascii=False,
                                                                  default=str)))
    return out


def read_sources(sources: Sequence[DataSource], *, seed: int = 0) -> list[SourcedRow]:
    """The weighted mixture of every source's rows (source order; the trainer's sampler shuffles)."""
    rows: list[SourcedRow] = []
    for i, source in enumerate(sources):
        rows += weighted(read_source(source), source.weight, seed=seed + i)
    return rows


def weighted(rows: list[SourcedRow], weight: float, *, seed: int) -> list[SourcedRow]:
    """floor(weight) copies of `rows` plus a seeded fraction weight - floor(weight) of them."""
    whole, frac = int(weight), weight - int(weight)
    extra = []
    if frac > 0:
        k = int(round(frac * len(rows)))
        pick = np.sort(np.random.default_rng(seed).permutation(len(rows))[:k])
        extra = [rows[i] for i in pick]
    return rows * whole + extra


def held_out_split(rows: Sequence[SourcedRow], test_fraction: float) -> tuple[list[SourcedRow], list[SourcedRow]]:
    """(training rows, held-out rows): a row is held out when a hash of its raw fields falls below
    `test_fraction`, so the split depends on nothing but the row (duplicates land on the same side)."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"the held-out fraction must be in (0, 1), got {test_fraction}")
    import hashlib

    def unit(r: SourcedRow) -> float:
        return int(hashlib.sha256(f"{HELD_OUT_SALT}\n{r.raw_json}".encode()).hexdigest()[:16], 16) / 2.0**64

    train, test = [], []
    for r in rows:
        (test if unit(r) < test_fraction else train).append(r)
    return train, test


def train_and_held_out(rows: Sequence[SourcedRow], test_fraction: float, name: str
                       ) -> tuple[list[SourcedRow], list[SourcedRow]]:
    """(training rows, held-out rows that have an answer to generate): `held_out_split` for the generative
    judges; a `DataError` when either side would be empty."""
    train, held = held_out_split(rows, test_fraction)
    held = [r for r in held if r.row.messages]
    if not train or not held:
        raise DataError(f"{name}: {len(rows)} rows give {len(train)} for training and {len(held)} held out with an "
                        f"answer (held-out fraction {test_fraction}; plain text rows have none): give more rows")
    return train, held


# ------------------------------------------------------------------------------------------------ readers
def _raw_rows(source: DataSource) -> list[tuple[str, Any]]:
    if source.path in EMBEDDED_DATA:
        return [(f"{source.path}:{i + 1}", r) for i, r in enumerate(EMBEDDED_DATA[source.path].load())]
    path = Path(source.path).expanduser()
    if path.is_file():
        reader = FILE_READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)} "
                            f"or a directory written by datasets' save_to_disk")
        return reader(path)
    if path.is_dir():
        return _read_saved_dataset(path, source.split)
    if _looks_like_hub_id(source.path):
        return _read_hub_dataset(source)
    known = ", ".join(sorted(EMBEDDED_DATA)) or "none"
    raise DataError(f"data source {source.path!r} is not a file, a directory, an embedded data set ({known}) or a "
                    f"Hugging Face dataset id (owner/name)")


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); a .jsonl file holds "
                                f"one JSON object per line") from None
    return out


def _read_json(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        hint = " (one object per line is JSONL: name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}){hint}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...], ...}: the one list inside
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: a .json file must hold a list of rows (or an object with exactly one list "
                            f"of rows), found keys {sorted(data)}")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold a list of rows, got {type(data).__name__}")
    return [(f"{path}:row {i + 1}", r) for i, r in enumerate(data)]


def _read_csv(path: Path) -> list[tuple[str, Any]]:
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: the CSV file has no header row (the first line names the fields)")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError(f"{where}: more cells than header fields ({len(reader.fieldnames)})")
            out.append((where, _csv_values(row, where)))
    return out


def _csv_values(row: dict[str, str], where: str) -> dict[str, Any]:
    """CSV cells are strings: empty cells are absent, list fields are JSON text, sample_type an integer."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if v is None or v == "":
            continue
        if k in JSON_FIELDS and v.lstrip().startswith("["):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: field {k!r} starts like a JSON list but is not valid JSON ({e.msg})") \
                    from None
        elif k == "sample_type" and v.strip().lstrip("-").isdigit():
            v = int(v)
        out[k] = v
    return out


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return [(f"{path}:row {i + 1}", _no_nulls(r)) for i, r in enumerate(table.to_pylist())]


def _no_nulls(row: dict[str, Any]) -> dict[str, Any]:
    """Columnar formats give every row every column: a null means the field is absent."""
    return {k: v for k, v in row.items() if v is not None}


def _read_saved_dataset(path: Path, split: str) -> list[tuple[str, Any]]:
    """A `Dataset.save_to_disk` directory (state.json + Arrow stream files), or a `DatasetDict`'s
    (dataset_dict.json + one such directory per split), read with pyarrow (no `datasets` needed)."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DataError(f"{path}: the saved DatasetDict has splits {splits}, not {split!r}; set data_split")
        path = path / split
    state = path / "state.json"
    if not state.is_file():
        raise DataError(f"{path}: a directory must be written by datasets' save_to_disk (state.json missing); "
                        f"or pass a file ({', '.join(FILE_SUFFIXES)})")
    files = [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            with pa.OSFile(str(f), "rb") as source:
                rows += pa.ipc.open_stream(source).read_all().to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: not a readable Arrow file of a saved dataset ({e})") from None
    return [(f"{path}:row {i + 1}", _no_nulls(r)) for i, r in enumerate(rows)]


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and Path(name).suffix == ""


def _read_hub_dataset(source: DataSource) -> list[tuple[str, Any]]:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        raise DataError(f"dataset id {source.path!r} needs the Hugging Face Hub, but HF_HUB_OFFLINE / "
                        f"HF_DATASETS_OFFLINE is set: download it where there is internet (save_to_disk or "
                        f"to_json) and pass the local path")
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset id {source.path!r} needs the `datasets` package: pip install "
                        f"'slim-peft[datasets]', or pass a local file") from None
    try:
        ds = datasets.load_dataset(source.path, source.subset, split=source.split)
    except Exception as e:  # noqa: BLE001 - connection, missing dataset, wrong split: one clear message
        raise DataError(f"cannot load dataset {source.path!r} (subset {source.subset}, split {source.split!r}) "
                        f"from the Hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Without "
                        f"internet, pass a local file or save_to_disk directory instead") from None
    return [(f"{source.path}[{source.split}]:row {i + 1}", r) for i, r in enumerate(ds)]


FILE_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
