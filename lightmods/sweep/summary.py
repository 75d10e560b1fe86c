"""``sweep_summary.csv``: one row per run dir under a folder (a sweep dir, or any folder of runs).

Columns, in this order: ``job`` (Hydra's job number), ``run_dir`` (relative to the folder), ``status``
(``summary.json``'s; ``completed`` for a run with only ``metrics.json``; ``incomplete`` for one with neither:
running, or killed), ``overrides`` (the job's overrides, space-separated), ``override/<key>`` per overridden
key, every ``metrics.json`` figure (``val/...``, ``test/...``), then every ``summary.json`` figure (nested
dicts flattened with dots, e.g. ``params_by_role.adapter.trainable``; lists as JSON). Rows are sorted by job
number, then path.

The multirun callback (:class:`lightmods.sweep.callbacks.SweepSummary`) writes it after every job; this module
rebuilds it from the run dirs alone::

    python -m lightmods.sweep.summary logs/train/multiruns/<time>            # -> <dir>/sweep_summary.csv
    python -m lightmods.sweep.summary logs/train/runs --out runs.csv         # any folder of run dirs
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILENAME = "sweep_summary.csv"
LEADING = ("job", "run_dir", "status", "overrides")
_SKIP_DIRS = {"checkpoints", "predictions", "export", "csv", "wandb", "forgetting", "__pycache__"}


def is_run_dir(path: Path) -> bool:
    return (
        (path / ".hydra" / "overrides.yaml").is_file()
        or (path / "summary.json").is_file()
        or (path / "metrics.json").is_file()
    )


def find_run_dirs(root: Path) -> list[Path]:
    """Run dirs at any depth under ``root`` (not below another run dir; hidden folders such as ``.submitit`` and
    a run's own folders are skipped)."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if child.name.startswith(".") or child.name in _SKIP_DIRS:
            continue
        found.extend(find_run_dirs(child))
    return found


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.to_container(OmegaConf.load(path))]


def _job_number(run_dir: Path) -> int | None:
    path = run_dir / ".hydra" / "hydra.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        num = OmegaConf.select(OmegaConf.load(path), "hydra.job.num", default=None, throw_on_missing=False)
        if isinstance(num, int):
            return num
    return int(run_dir.name) if run_dir.name.isdigit() else None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def _flatten(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def read_run(run_dir: Path, root: Path | None = None) -> dict[str, Any]:
    """One row: the run's identity, status, overrides, metrics and summary figures."""
    run_dir = Path(run_dir)
    metrics = read_json(run_dir / "metrics.json")
    summary = read_json(run_dir / "summary.json")
    overrides = _read_overrides(run_dir)
    status = summary.get("status") or ("completed" if metrics else "incomplete")
    rel = os.path.relpath(run_dir, root) if root is not None else str(run_dir)
    row: dict[str, Any] = {
        "job": _job_number(run_dir),
        "run_dir": rel,
        "status": status,
        "overrides": " ".join(overrides),
    }
    for o in overrides:
        row[f"override/{_override_key(o)}"] = o.split("=", 1)[1] if "=" in o else ""
    row.update(metrics)
    figures: dict[str, Any] = {}
    _flatten("", {k: v for k, v in summary.items() if k != "status"}, figures)
    for k, v in figures.items():
        row.setdefault(k, v)
    return row


def collect(root: Path) -> list[dict[str, Any]]:
    root = Path(root)
    rows = [read_run(d, root) for d in find_run_dirs(root)]
    return sorted(
        rows, key=lambda r: (r["job"] is None, r["job"] if r["job"] is not None else 0, r["run_dir"])
    )


def columns(rows: list[dict]) -> list[str]:
    """Leading columns, then overrides, metrics and the rest, each in first-seen order."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k)
    keys = [k for k in seen if k not in LEADING]
    overrides = [k for k in keys if k.startswith("override/")]
    metrics = [k for k in keys if k.startswith(("val/", "test/"))]
    rest = [k for k in keys if k not in overrides and k not in metrics]
    return [*LEADING, *overrides, *metrics, *rest]


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise writers (parallel joblib workers finish jobs at the same time)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the atomic rename still keeps the file whole
        yield
        return
    with open(root / ".sweep_summary.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_summary(root: Path, out: Path | None = None) -> Path:
    """(Re)build the summary of every run dir under ``root``; written atomically to ``out`` (default
    ``<root>/sweep_summary.csv``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = Path(out) if out is not None else root / FILENAME
    with _locked(root):
        rows = collect(root)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns(rows), extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
        os.replace(tmp, out)
    return out


def status_counts(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightmods.sweep.summary",
        description="Rebuild sweep_summary.csv from the run dirs under a folder.",
    )
    parser.add_argument(
        "root", type=Path, help="a sweep dir (logs/<task>/multiruns/<time>) or any folder of run dirs"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"output file (default: <root>/{FILENAME})")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"lightmods: {args.root} is not a folder", file=sys.stderr)
        return 2
    path = write_summary(args.root, args.out)
    rows = collect(args.root)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(status_counts(rows).items())) or "no run dirs"
    print(f"{path}: {len(rows)} runs ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
