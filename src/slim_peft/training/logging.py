"""What a run writes while it trains: metrics JSONL (and TensorBoard), the progress bar, atomic JSON files."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` (always) and TensorBoard (when asked), main process only.
    On resume, records after the resumed step (from the interrupted run) are dropped first."""

    def __init__(self, run_dir: Path, report_to: Sequence[str], enabled: bool, truncate_after: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if truncate_after and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif self.path.exists() and not truncate_after:
            self.path.unlink()
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled or len(record) <= 1:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=disable)


def postfix(loss: float, aux: dict[str, float], tokens_per_s: float) -> dict[str, str]:
    """The progress bar's loss, auxiliary losses and tokens/s."""
    post = {"loss": f"{loss:.4f}"}
    post.update({k: f"{v:.3g}" for k, v in aux.items()})
    post["tok/s"] = f"{tokens_per_s:.0f}"
    return post


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
