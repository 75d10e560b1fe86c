"""The one writer of a run's figures: ``metrics.json``, ``summary.json`` and ``predictions/``.

Files are written atomically (temp file + rename) so an interrupted run never leaves half a JSON file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFiles:
    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def write_json(self, name: str, data: dict) -> Path:
        path = self.dir / name
        _atomic_write(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        return path

    def update_summary(self, figures: dict) -> Path:
        """Merge ``figures`` into ``summary.json`` (later stages add their figures to earlier ones)."""
        path = self.dir / "summary.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(figures)
        return self.write_json("summary.json", current)

    def write_predictions(self, split: str, rows: list[dict]) -> Path:
        path = self.dir / "predictions" / f"{split}.jsonl"
        _atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
        return path
