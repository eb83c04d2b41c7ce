"""Stored runs on disk: JSON files written atomically, read back leniently, and hashed stably.

A study is resumable because every finished run is one JSON file; a reader must never see half a file (a killed
worker), so writes go through a temporary name and `os.replace`. A missing or unreadable file reads as None: the
run is then simply pending.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def json_digest(obj: Any) -> str:
    """The first 10 hex digits of the sha256 of `obj` as key-sorted JSON: the same value always gives the same
    digest, whatever the dict order (stored runs are matched to their protocol by it)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def load_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def collect(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """Every protocol directory under `runs_dir`: its base scores (`base.json`), its stored runs (by run_id,
    from `<setting>__<method>__seed<k>.json`) and its step timings (by file stem after `steps__`)."""
    out: dict[str, dict[str, Any]] = {}
    if not runs_dir.is_dir():
        return out
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        base = load_json(d / "base.json")
        runs = {}
        for f in sorted(d.glob("*__*__seed*.json")):
            data = load_json(f)
            if data and data.get("kind") == "run":
                runs[data["run_id"]] = data
        steps = {}
        for f in sorted(d.glob("steps__*.json")):
            data = load_json(f)
            if data and data.get("kind") == "steps":
                steps[f.stem.removeprefix("steps__")] = data
        if base or runs or steps:
            out[d.name] = {"base": base, "runs": runs, "steps": steps}
    return out
