"""Test-split predictions in the GLUE (``<Task>.tsv``) and SuperGLUE (``<Task>.jsonl``) submission formats,
with the label values the servers expect."""

from __future__ import annotations

import json
from pathlib import Path

from lightmods.data.tasks import TaskSpec

GLUE_SPLIT_SUFFIX = {"test": "", "test_matched": "-m", "test_mismatched": "-mm"}


def _glue_value(task: TaskSpec, pred) -> str:
    if task.is_regression:
        return f"{min(5.0, max(0.0, float(pred))):.3f}"
    names = task.label_names
    return names[pred] if any("entailment" in n for n in names) else str(int(pred))  # NLI tasks: names; others 0/1


def _superglue_value(task: TaskSpec, pred):
    names = task.label_names
    if task.head == "multiple_choice":
        return int(pred)
    if names == ("False", "True"):
        return "true" if pred == 1 else "false"
    return names[pred]


def submission_path(task: TaskSpec, split: str, directory: Path) -> Path:
    if task.benchmark == "glue":
        return directory / f"{task.submission}{GLUE_SPLIT_SUFFIX.get(split, '')}.tsv"
    return directory / f"{task.submission}.jsonl"


def write_submission(task: TaskSpec, split: str, rows: list[dict], preds: list, directory: Path) -> Path:
    """``rows`` are the split's rows in order, ``preds`` one prediction (class index or float) per row."""
    path = submission_path(task, split, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    if task.benchmark == "glue":
        lines = ["index\tprediction"] + [f"{r['idx']}\t{_glue_value(task, p)}" for r, p in zip(rows, preds)]
        path.write_text("\n".join(lines) + "\n")
        return path
    if task.builder == "multirc":  # nested: passage -> questions -> answers
        passages: dict = {}
        for r, p in zip(rows, preds):
            i = r["idx"]
            questions = passages.setdefault(i["paragraph"], {})
            questions.setdefault(i["question"], []).append({"idx": i["answer"], "label": int(p)})
        records = [
            {"idx": pi, "passage": {"questions": [{"idx": qi, "answers": a} for qi, a in qs.items()]}}
            for pi, qs in passages.items()
        ]
    elif task.builder == "record":  # the predicted entity text per query
        records = [{"idx": r["idx"]["query"], "label": p} for r, p in zip(rows, preds)]
    else:
        records = [{"idx": r["idx"], "label": _superglue_value(task, p)} for r, p in zip(rows, preds)]
    path.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    return path
