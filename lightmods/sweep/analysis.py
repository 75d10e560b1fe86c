"""Tables and plot data for the analysis notebooks (``notebooks/``), from ``sweep_summary.csv``, run dirs or a
W&B export. Needs pandas (installed with ``datasets``); plotting stays in the notebooks (matplotlib).

Every frame has the columns of :mod:`lightmods.sweep.summary` (``status``, ``override/<key>``, ``val/...``,
``params_trainable``, ``flops_per_sample``, ``train_samples_per_s``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

from lightmods.sweep.summary import FILENAME, collect, columns

# x axes of the efficiency plots, first present wins: (label, candidate columns)
EFFICIENCY_AXES = {
    "trainable parameters": ("params_trainable",),
    "total parameters": ("params_final", "params_total"),
    "inference FLOPs per sample": ("flops_per_sample", "flops_after"),
    "training samples/s": ("train_samples_per_s",),
    "inference samples/s": ("inference_samples_per_s_after", "inference_samples_per_s_early_exit"),
}
SOURCE_ENV = "LIGHTMODS_SWEEP_DIR"
WANDB_EXPORT_ENV = "LIGHTMODS_WANDB_EXPORT"


def default_source(log_dir: str | Path = "logs") -> Path | None:
    """``$LIGHTMODS_SWEEP_DIR``, else the newest ``<log_dir>/*/multiruns/*``."""
    if os.environ.get(SOURCE_ENV):
        return Path(os.environ[SOURCE_ENV])
    sweeps = sorted(Path(log_dir).glob("*/multiruns/*"), key=lambda p: p.stat().st_mtime)
    return sweeps[-1] if sweeps else None


def load_runs(source: str | Path):
    """A sweep's rows: ``source`` is a ``sweep_summary.csv``, a folder holding one, or any folder of run dirs (the
    summary is then built from them without writing anything)."""
    import pandas as pd

    source = Path(source)
    if source.is_file():
        return pd.read_csv(source)
    if (source / FILENAME).is_file():
        return pd.read_csv(source / FILENAME)
    rows = collect(source)
    return pd.DataFrame(rows, columns=columns(rows))


def override_columns(df) -> list[str]:
    return [c for c in df.columns if c.startswith("override/")]


def varying_overrides(df, exclude: tuple[str, ...] = ("seed",)) -> list[str]:
    """The override columns that differ between runs (the sweep's axes), without ``exclude`` (seeds average)."""
    skip = {f"override/{k}" for k in exclude}
    return [c for c in override_columns(df) if c not in skip and df[c].astype(str).nunique(dropna=False) > 1]


def label_runs(df, keys: list[str] | None = None):
    """One label per run from its varying overrides, e.g. ``method=lora rank=8``."""
    keys = varying_overrides(df) if keys is None else keys
    if not keys:
        return df["run_dir"].astype(str)
    return (
        df[keys]
        .astype(str)
        .apply(lambda r: " ".join(f"{k.removeprefix('override/')}={v}" for k, v in zip(keys, r)), axis=1)
    )


def first_column(df, candidates: tuple[str, ...]) -> str | None:
    """The first candidate column with any figure."""
    for c in candidates:
        if c in df.columns and df[c].notna().any():
            return c
    return None


def axis_values(df, candidates: tuple[str, ...]):
    """Per run, the first candidate column that has a figure for it (``params_final`` for a pruned run,
    ``params_total`` otherwise); ``None`` when no candidate has any."""
    present = [c for c in candidates if c in df.columns and df[c].notna().any()]
    if not present:
        return None
    return df[present].bfill(axis=1).iloc[:, 0].astype(float)


def efficiency_columns(df):
    """The efficiency figures present, one column per axis, named by the axis's first candidate."""
    import pandas as pd

    cols = {cands[0]: v for cands in EFFICIENCY_AXES.values() if (v := axis_values(df, cands)) is not None}
    return pd.DataFrame(cols, index=df.index)


def ablation_table(df, metric: str = "val/score", by: list[str] | None = None):
    """Per setting (the varying overrides; seeds are averaged): the metric's mean, std and count over completed
    runs, the mean of each efficiency figure present, and the runs that did not complete (failed, incomplete)."""
    df = df.copy()
    by = varying_overrides(df) if by is None else by
    if not by:
        df["setting"] = "all runs"
        by = ["setting"]
    df[by] = df[by].astype(str)  # NaN (a key not overridden in that job) groups as "nan"
    done = df[df["status"] == "completed"]
    figures = efficiency_columns(done)
    grouped = done.groupby(by)
    table = grouped[metric].agg(["mean", "std", "count"]).rename(columns=lambda c: f"{metric} {c}")
    if len(figures.columns):
        table = table.join(figures.join(done[by]).groupby(by).mean())
    others = df[df["status"] != "completed"].groupby(by).size().rename("not completed")
    table = table.join(others, how="outer").fillna({"not completed": 0, f"{metric} count": 0})
    table = table.astype({"not completed": int, f"{metric} count": int})
    table.columns = [str(c).removeprefix("override/") for c in table.columns]
    table.index.names = [str(n).removeprefix("override/") for n in table.index.names]
    return table.sort_values(f"{metric} mean", ascending=False, na_position="last")


def efficiency_points(df, metric: str = "val/score") -> dict[str, tuple[str, object]]:
    """``{axis label: (columns, frame with x, y, label)}`` for each efficiency axis with figures."""
    done = df[df["status"] == "completed"]
    labels = label_runs(df).loc[done.index]  # the sweep's axes, including those only failed jobs vary
    points = {}
    if metric not in done.columns:
        return points
    for label, cands in EFFICIENCY_AXES.items():
        x = axis_values(done, cands)
        if x is None:
            continue
        frame = (
            done[[metric]].rename(columns={metric: "y"}).assign(x=x, label=labels).dropna(subset=["x", "y"])
        )
        if len(frame):
            used = "/".join(c for c in cands if c in done.columns and done[c].notna().any())
            points[label] = (used, frame)
    return points


def load_wandb_export(path: str | Path):
    """A table exported from the W&B UI ("Export CSV": one row per run, config keys, summary figures) in the
    columns above: ``State`` -> ``status``, ``Name`` (the job's overrides) -> ``overrides`` and ``override/<key>``,
    ``summary/<figure>`` -> ``<figure>``; metrics keep their names."""
    import pandas as pd

    df = pd.read_csv(path)
    out = pd.DataFrame(index=df.index)
    state = df.get("State", pd.Series(["finished"] * len(df)))
    out["status"] = state.map(lambda s: "completed" if str(s).lower() == "finished" else str(s).lower())
    names = df.get("Name", pd.Series([""] * len(df))).fillna("").astype(str)
    out["run_dir"] = df.get("ID", names)
    out["overrides"] = names.map(lambda n: " ".join(_split_items(n)))
    for i, name in names.items():
        for part in _split_items(name):
            if "=" in part:
                key, value = part.split("=", 1)
                out.loc[i, f"override/{key}"] = value
    for c in df.columns:
        if c.startswith(("val/", "test/")):
            out[c] = df[c]
        elif c.startswith("summary/"):
            out[c.removeprefix("summary/")] = df[c]
    return out


def _split_items(name: str, sep: str = ",") -> list[str]:
    """Hydra's ``override_dirname`` items (``a=1,b=[x,y]``): split at separators outside brackets and quotes."""
    items, depth, quote, current = [], 0, "", []
    for ch in name:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    return [i for i in items if i]
